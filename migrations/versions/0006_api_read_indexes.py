"""Indexes for the API's hot reads (issue 9: create + get at 64 clients)

- jobs (status, created_at, id): a job's place in the queue is the count of queued jobs at or
  before its (created_at, id): an index range count instead of ranking every queued job.
- jobs (tenant_id, status): the per-tenant quota counts the tenant's queued + running jobs on
  every submit, under the tenant's lock.
- jobs (tenant_id, created_at, id): a tenant's job listing, newest first, read in index order.
- job_events (job_id, id): a job's events after a cursor, in order (polling and event streams).

The single-column indexes of 0001 stay (the tables declare them).

Revision ID: 0006
Revises: 0005
"""
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

INDEXES = [
    ("ix_jobs_status_created_at_id", "jobs", ["status", "created_at", "id"]),
    ("ix_jobs_tenant_id_status", "jobs", ["tenant_id", "status"]),
    ("ix_jobs_tenant_id_created_at_id", "jobs", ["tenant_id", "created_at", "id"]),
    ("ix_job_events_job_id_id", "job_events", ["job_id", "id"]),
]


def upgrade() -> None:
    for name, table, columns in INDEXES:
        op.create_index(name, table, columns)


def downgrade() -> None:
    for name, table, _ in reversed(INDEXES):
        op.drop_index(name, table_name=table)
