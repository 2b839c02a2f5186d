"""reconciliation reports and findings; archive locations learnt by reconciliation

A report per reconciliation run; a finding row stays open (``open_key`` set) while
every report sees it and is closed by the first report that does not. An archive
location recovered from an object's ``archived=true`` tag has no archiver job, so
``archive.job_id`` becomes nullable and each member records where it was learnt
(``origin``: ``archiver`` or ``reconciled``).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02 04:45:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import dlm_pipelines.catalog

revision: str = "0006"
# The lead rechains revisions on merge (this branch was cut when 0003_api was the head).
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UTC = dlm_pipelines.catalog.UTCDateTime


def upgrade() -> None:
    op.create_table(
        "reconcile_report",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("started_at", UTC(timezone=True), nullable=False),
        sa.Column("ran_at", UTC(timezone=True), nullable=True),
        sa.Column("run_id", sa.String(length=64), nullable=True),
        sa.Column("counts", sa.JSON(), nullable=False),
        sa.Column("scanned", sa.JSON(), nullable=False),
        sa.Column("closed", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("reconcile_report", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_reconcile_report_ran_at"), ["ran_at"], unique=False)

    op.create_table(
        "reconcile_finding",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("open_key", sa.String(length=64), nullable=True),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("severity", sa.String(length=16), nullable=False),
        sa.Column("ref_id", sa.String(length=36), nullable=True),
        sa.Column("key", sa.String(length=1024), nullable=True),
        sa.Column("path", sa.String(length=2048), nullable=True),
        sa.Column("partition_key", sa.String(length=96), nullable=True),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.Column("first_report_id", sa.Integer(), nullable=False),
        sa.Column("last_report_id", sa.Integer(), nullable=False),
        sa.Column("closed_report_id", sa.Integer(), nullable=True),
        sa.Column("first_seen_at", UTC(timezone=True), nullable=False),
        sa.Column("last_seen_at", UTC(timezone=True), nullable=False),
        sa.Column("closed_at", UTC(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["first_report_id"], ["reconcile_report.id"]),
        sa.ForeignKeyConstraint(["last_report_id"], ["reconcile_report.id"]),
        sa.ForeignKeyConstraint(["closed_report_id"], ["reconcile_report.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("open_key", name="uq_reconcile_finding_open_key"),
    )
    with op.batch_alter_table("reconcile_finding", schema=None) as batch_op:
        batch_op.create_index(
            "ix_reconcile_finding_report", ["last_report_id", "severity", "kind", "id"]
        )
        batch_op.create_index(
            batch_op.f("ix_reconcile_finding_closed_report_id"), ["closed_report_id"]
        )

    with op.batch_alter_table("archive", schema=None) as batch_op:
        batch_op.alter_column("job_id", existing_type=sa.String(length=64), nullable=True)
    with op.batch_alter_table("archive_member", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("origin", sa.String(length=16), nullable=False, server_default="archiver")
        )


def downgrade() -> None:
    with op.batch_alter_table("archive_member", schema=None) as batch_op:
        batch_op.drop_column("origin")
    with op.batch_alter_table("archive", schema=None) as batch_op:
        batch_op.alter_column("job_id", existing_type=sa.String(length=64), nullable=False)
    op.drop_table("reconcile_finding")
    op.drop_table("reconcile_report")
