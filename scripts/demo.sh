#!/usr/bin/env bash
# The main job: the service on its embedded defaults (SQLite, local artifacts folder,
# Celery's filesystem broker — nothing else to install) plus a sample distillation.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python examples/digits_demo.py "$@"
