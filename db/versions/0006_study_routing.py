"""study_decision / job_series: study-level routing (rules with ``requires``)

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06 20:20:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "study_decision",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("rule_name", sa.String(length=64), nullable=False),
        sa.Column("state", sa.Enum("WAITING", "QUEUED", "INCOMPLETE", "REFUSED",
                                   name="study_state", native_enum=False, length=16),
                  nullable=False),
        sa.Column("roles", sa.JSON(), nullable=False),
        sa.Column("reason", sa.String(length=300), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("decided_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_study_decision")),
        sa.UniqueConstraint("study_instance_uid", "rule_name",
                            name=op.f("uq_study_decision_study_instance_uid_rule_name")),
    )
    op.create_table(
        "job_series",
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("series_id", sa.Integer(), nullable=False),
        sa.Column("role", sa.String(length=32), nullable=False),
        sa.ForeignKeyConstraint(["job_id"], ["job.id"], name=op.f("fk_job_series_job_id_job")),
        sa.ForeignKeyConstraint(["series_id"], ["series.id"],
                                name=op.f("fk_job_series_series_id_series")),
        sa.PrimaryKeyConstraint("job_id", "series_id", name=op.f("pk_job_series")),
    )


def downgrade() -> None:
    op.drop_table("job_series")
    op.drop_table("study_decision")
