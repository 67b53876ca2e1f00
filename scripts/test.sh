#!/usr/bin/env bash
# The whole test suite, against a real PostgreSQL, Redis and Celery worker processes.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/services.sh
exec .venv/bin/python -m pytest "$@"
