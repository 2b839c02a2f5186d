"""unfinished-events index (the imaging sensor's sweep and claims check)

A partial index over the events not yet done with: never tried (`received`) and
claimed (`exporting`). The sweep (stale never-tried events per partition) and the
claims check (partition and run of every claim) read only this index, whose size
follows the work in flight, not the catalog: with a backlog of 50,000 never-tried
events in a 1,000,000-event catalog the sweep took 179 ms through the status index
and the table, 60 ms index-only (bench/README.md, sensor_tick).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02 05:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UNFINISHED = sa.text("status IN ('received', 'exporting')")


def upgrade() -> None:
    op.create_index(
        "ix_imaging_event_unfinished",
        "imaging_event",
        ["status", "received_at", "partition_key", "run_id"],
        postgresql_where=UNFINISHED,
        sqlite_where=UNFINISHED,
    )


def downgrade() -> None:
    op.drop_index("ix_imaging_event_unfinished", table_name="imaging_event")
