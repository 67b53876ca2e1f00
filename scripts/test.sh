#!/usr/bin/env bash
# The whole test suite, against a real PostgreSQL, Redis and Celery worker processes.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
echo "==> PostgreSQL and Redis: starting them if they are down"
bash scripts/services.sh
# The dashboard test drives a real headless browser: Debian's chromium (tests/app/test_dashboard.py).
if ! command -v chromium >/dev/null 2>&1; then
    echo "test.sh: installing chromium for the dashboard test (apt-get)"
    if [ "$(id -u)" -eq 0 ]; then
        (export DEBIAN_FRONTEND=noninteractive; apt-get install -y -q chromium >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null; }) \
            || echo "test.sh: could not install chromium; the dashboard test will fail" >&2
    else
        echo "test.sh: chromium is missing and this is not root: sudo apt-get install -y chromium" >&2
    fi
fi
echo "==> running the test suite: pytest $* (real PostgreSQL, Redis, Celery workers, HTTP; ~10 min on 2 cores)"
exec .venv/bin/python -m pytest "$@"
