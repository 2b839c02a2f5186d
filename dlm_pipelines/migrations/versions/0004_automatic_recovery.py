"""automatic recovery: export runs per event, next retry time, the sweep's indexes

Revision ID: 0004
Revises: 0003_api
Create Date: 2026-12-02 04:50:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import dlm_pipelines.catalog

revision: str = "0004"
down_revision: str | None = "0003_api"  # the revision id of 0003_exports_listing_index
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

FAILED = sa.text("status = 'failed'")
UNANNOUNCED = sa.text("status = 'verified' AND announced_at IS NULL")


def upgrade() -> None:
    op.add_column(
        "imaging_event",
        sa.Column("export_runs", sa.Integer(), nullable=False, server_default="0"),
    )
    op.add_column(
        "imaging_event",
        sa.Column("next_attempt_at", dlm_pipelines.catalog.UTCDateTime(timezone=True)),
    )
    op.create_index(
        "ix_imaging_event_retries",
        "imaging_event",
        ["next_attempt_at"],
        postgresql_where=FAILED,
        sqlite_where=FAILED,
    )
    op.create_index(
        "ix_imaging_event_unannounced",
        "imaging_event",
        ["verified_at"],
        postgresql_where=UNANNOUNCED,
        sqlite_where=UNANNOUNCED,
    )


def downgrade() -> None:
    op.drop_index("ix_imaging_event_unannounced", table_name="imaging_event")
    op.drop_index("ix_imaging_event_retries", table_name="imaging_event")
    op.drop_column("imaging_event", "next_attempt_at")
    op.drop_column("imaging_event", "export_runs")
