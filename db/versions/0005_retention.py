"""series / job: when the retention policy deleted their files (rows are kept)

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-06 16:40:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("series", sa.Column("purged_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("job", sa.Column("outputs_purged_at", sa.DateTime(timezone=True),
                                   nullable=True))


def downgrade() -> None:
    # batch mode: SQLite recreates the tables (neither has triggers to lose)
    with op.batch_alter_table("job") as batch:
        batch.drop_column("outputs_purged_at")
    with op.batch_alter_table("series") as batch:
        batch.drop_column("purged_at")
