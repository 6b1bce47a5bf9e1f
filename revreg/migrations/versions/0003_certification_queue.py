"""certification queue

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "cert_requests",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("version_id", sa.Integer(), nullable=False),
        sa.Column("ref", sa.String(length=256), nullable=False),
        sa.Column("base", sa.Text(), nullable=False),
        sa.Column("factory", sa.String(length=256), nullable=True),
        sa.Column("probes", sa.String(length=512), nullable=False),
        sa.Column("device", sa.String(length=32), nullable=False),
        sa.Column("cycles", sa.Integer(), nullable=False),
        sa.Column("baselines", sa.Text(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("requested_by", sa.String(length=256), nullable=False),
        sa.Column("requested_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("lease_owner", sa.String(length=256), nullable=True),
        sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("result", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(["version_id"], ["versions.id"], name=op.f("fk_cert_requests_version_id_versions")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_cert_requests")),
    )
    with op.batch_alter_table("cert_requests", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_cert_requests_state"), ["state"], unique=False)
        batch_op.create_index(batch_op.f("ix_cert_requests_version_id"), ["version_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("cert_requests", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_cert_requests_version_id"))
        batch_op.drop_index(batch_op.f("ix_cert_requests_state"))

    op.drop_table("cert_requests")
