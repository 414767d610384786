"""job: which attempt was last handed to the broker (the celery executor)

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-06 05:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("job", sa.Column("published_attempt", sa.Integer(), nullable=True))


def downgrade() -> None:
    # batch mode: SQLite recreates the table (job has no triggers to lose)
    with op.batch_alter_table("job") as batch:
        batch.drop_column("published_attempt")
