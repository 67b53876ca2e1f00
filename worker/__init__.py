"""Celery app and thin tasks: load the job row, call the engine, record the result."""
