"""event manifests, the store's ETag, the purge's trash (issue 12)

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02 04:50:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

import dlm_pipelines.catalog

revision: str = "0005"
# The lead rechains revisions at merge time (the brief names "0003"; main's is "0003_api").
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("imaging_event", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("etag", sqlmodel.sql.sqltypes.AutoString(length=128), nullable=True)
        )
        batch_op.add_column(
            sa.Column("trash_path", sqlmodel.sql.sqltypes.AutoString(length=1024), nullable=True)
        )
    op.create_table(
        "event_manifest",
        sa.Column("ref_id", sqlmodel.sql.sqltypes.AutoString(length=36), nullable=False),
        sa.Column("tar_sha256", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("mtime_resolution_ns", sa.BigInteger(), nullable=False),
        sa.Column("source", sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
        sa.Column("members", sa.JSON(), nullable=False),
        sa.Column("recorded_at", dlm_pipelines.catalog.UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["ref_id"], ["imaging_event.ref_id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("ref_id"),
    )


def downgrade() -> None:
    op.drop_table("event_manifest")
    with op.batch_alter_table("imaging_event", schema=None) as batch_op:
        batch_op.drop_column("trash_path")
        batch_op.drop_column("etag")
