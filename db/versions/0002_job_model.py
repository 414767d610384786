"""job: the model a job runs (name and version; part of the idempotency key)

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22 17:22:54
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("job", sa.Column("model_name", sa.String(length=64), nullable=True))
    op.add_column("job", sa.Column("model_version", sa.String(length=32), nullable=True))


def downgrade() -> None:
    # batch mode: SQLite recreates the table (job has no triggers to lose)
    with op.batch_alter_table("job") as batch:
        batch.drop_column("model_version")
        batch.drop_column("model_name")
