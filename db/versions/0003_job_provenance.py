"""job: the sha256 of the weights a job ran and of the config that queued it

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-06 05:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("job", sa.Column("weights_sha256", sa.String(length=64), nullable=True))
    op.add_column("job", sa.Column("config_sha256", sa.String(length=64), nullable=True))


def downgrade() -> None:
    # batch mode: SQLite recreates the table (job has no triggers to lose)
    with op.batch_alter_table("job") as batch:
        batch.drop_column("config_sha256")
        batch.drop_column("weights_sha256")
