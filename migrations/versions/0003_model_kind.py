"""files.kind and models.kind: the model kind (distill.kinds: 'mlp' | 'hf') as a column

Uploaded model files and finished models used to be told apart by string checks on
their JSON (details.format, architecture.kind). Backfilled from those; MLP model files
also get details.task = 'classification' and num_labels, which hf details already have.

Revision ID: 0003
Revises: 0002
"""
import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

files = sa.table("files", sa.column("id", sa.String), sa.column("purpose", sa.String),
                 sa.column("details", sa.JSON), sa.column("kind", sa.String))
models = sa.table("models", sa.column("id", sa.String), sa.column("architecture", sa.JSON),
                  sa.column("kind", sa.String))


def upgrade() -> None:
    with op.batch_alter_table("files") as batch_op:
        batch_op.add_column(sa.Column("kind", sa.String(16), nullable=True))
    with op.batch_alter_table("models") as batch_op:
        batch_op.add_column(sa.Column("kind", sa.String(16), nullable=False, server_default="mlp"))
    connection = op.get_bind()
    for row in connection.execute(sa.select(files.c.id, files.c.details).where(files.c.purpose == "model")):
        details = dict(row.details or {})
        kind = "hf" if details.get("format") == "hf" else "mlp"
        if kind == "mlp" and "architecture" in details:
            details.setdefault("task", "classification")
            details.setdefault("num_labels", details["architecture"].get("num_classes"))
        connection.execute(files.update().where(files.c.id == row.id).values(kind=kind, details=details))
    for row in connection.execute(sa.select(models.c.id, models.c.architecture)):
        kind = "hf" if (row.architecture or {}).get("kind") == "hf" else "mlp"
        connection.execute(models.update().where(models.c.id == row.id).values(kind=kind))


def downgrade() -> None:
    with op.batch_alter_table("models") as batch_op:
        batch_op.drop_column("kind")
    with op.batch_alter_table("files") as batch_op:
        batch_op.drop_column("kind")
