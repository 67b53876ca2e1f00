#!/usr/bin/env bash
# Make .venv with everything the service, the demo and the tests need.
# torch goes in first, pinned, so the project's torch range adds nothing (on the
# dev/CI machines 2.13.0 is a CPU build that pip takes from local disk).
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-}
if [ -z "$python" ]; then
  for candidate in python3.11 python3; do
    if command -v "$candidate" >/dev/null 2>&1; then python=$candidate; break; fi
  done
fi
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -q torch==2.13.0

# Reinstall the project only when its requirements changed.
stamp=.venv/.distill-installed
wanted=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
  .venv/bin/python -m pip install -q -e '.[demo,test]'
  echo "$wanted" > "$stamp"
fi
