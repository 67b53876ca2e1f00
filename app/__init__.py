"""HTTP + persistence: FastAPI routes, SQLAlchemy tables, services, storage, serving."""
