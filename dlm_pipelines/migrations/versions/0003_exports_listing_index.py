"""exports listing index (the API's GET /api/1/exports)

A partial index over verified uploads in the listing's order: it serves the
window count (index-only) and the newest-first page without a sort, at any
catalog size.

Revision ID: 0003_api
Revises: 0002
Create Date: 2026-12-01 09:40:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003_api"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

VERIFIED = sa.text("verified_at IS NOT NULL AND object_key IS NOT NULL")


def upgrade() -> None:
    op.create_index(
        "ix_imaging_event_exports",
        "imaging_event",
        ["event_type", sa.text("uploaded_at DESC"), "ref_id"],
        postgresql_where=VERIFIED,
        sqlite_where=VERIFIED,
    )


def downgrade() -> None:
    op.drop_index("ix_imaging_event_exports", table_name="imaging_event")
