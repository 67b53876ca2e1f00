#!/usr/bin/env bash
# Make .venv with everything the service, the demo and the tests need, saying what it does.
# torch goes in first, pinned, so the project's torch range adds nothing (on the
# dev/CI machines 2.13.0 is a CPU build that pip takes from local disk).
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '==> %s\n' "$*"; }
# pip's own output, minus the "already satisfied" wall (sed, not grep: an empty result is fine)
pip_install() { .venv/bin/python -m pip install --progress-bar on "$@" 2>&1 | sed -u '/^Requirement already satisfied/d'; }

python=${PYTHON:-}
if [ -z "$python" ]; then
  for candidate in python3.11 python3; do
    if command -v "$candidate" >/dev/null 2>&1; then python=$candidate; break; fi
  done
fi
if [ ! -x .venv/bin/python ]; then
  say "creating .venv with $python ($("$python" --version 2>&1))"
  "$python" -m venv .venv
  say "upgrading pip"
  .venv/bin/python -m pip install -q --upgrade pip
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  say "installing torch 2.13.0 (CPU build; pip's progress follows)"
  pip_install torch==2.13.0
fi

# Reinstall the project only when its requirements changed.
stamp=.venv/.distill-installed
wanted=$(cat pyproject.toml client/pyproject.toml | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
  say "installing the service, the engine and the demo/test dependencies from pyproject.toml (first run: 1-3 min)"
  pip_install -e '.[demo,test]'
  say "installing the Python client and CLI (client/: httpx + pydantic only)"
  pip_install -e ./client
  echo "$wanted" > "$stamp"
  say "environment ready: .venv"
else
  say "environment up to date: .venv (pyproject.toml and client/pyproject.toml unchanged)"
fi
