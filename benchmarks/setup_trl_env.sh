#!/usr/bin/env bash
# Make benchmarks/.venv-trl: the environment of benchmarks/bench_vs_trl.py, which runs TRL's
# GKDTrainer and the engine side by side. TRL is not a dependency of the service, so it gets
# its own venv. torch goes in first, pinned (on the dev/CI machines 2.13.0 is a CPU build pip
# takes from local disk), so nothing after it pulls another torch; then TRL with the
# transformers the service uses (trl 1.16.0 works with transformers 5.x: GKDTrainer lives in
# trl.experimental.gkd); then the engine from this checkout, editable and without the
# service's dependencies, plus the few the engine imports.
#
#   benchmarks/setup_trl_env.sh          # ~1 min the first time; a no-op when up to date
#   benchmarks/.venv-trl/bin/python benchmarks/bench_vs_trl.py
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '==> %s\n' "$*"; }
venv=${TRL_VENV:-benchmarks/.venv-trl}  # TRL_VENV: another place (e.g. to try a fresh one)
pip_install() { "$venv/bin/python" -m pip install --progress-bar off "$@" 2>&1 | sed -u '/^Requirement already satisfied/d;/is ignored: it is neither a file nor a directory/d'; }

TORCH=2.13.0
TRL=1.16.0
TRANSFORMERS=5.24.0

python=${PYTHON:-}
if [ -z "$python" ]; then
  for candidate in python3.11 python3; do
    if command -v "$candidate" >/dev/null 2>&1; then python=$candidate; break; fi
  done
fi
if [ ! -x "$venv/bin/python" ]; then
  say "creating $venv with $python ($("$python" --version 2>&1))"
  "$python" -m venv "$venv"
fi

stamp=$venv/.installed
wanted="torch==$TORCH trl==$TRL transformers==$TRANSFORMERS $(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" == "$wanted" ]; then
  say "$venv is up to date (torch $TORCH, trl $TRL, transformers $TRANSFORMERS)"
  exit 0
fi
say "installing torch $TORCH first (CPU build)"
pip_install "torch==$TORCH"
say "installing trl $TRL and transformers $TRANSFORMERS (pulls accelerate, datasets)"
pip_install "torch==$TORCH" "trl==$TRL" "transformers==$TRANSFORMERS" numpy
say "installing the engine from this checkout (editable, --no-deps) and its light dependencies"
pip_install --no-deps -e .
pip_install "torch==$TORCH" "transformers==$TRANSFORMERS" "pydantic>=2.6" "safetensors>=0.4" "tokenizers>=0.21" numpy
TRL_EXPERIMENTAL_SILENCE=1 "$venv/bin/python" - <<'EOF'
import torch, transformers, trl
from trl.experimental.gkd import GKDTrainer  # noqa: F401
import distill.loop, distill.recipes.causal_lm  # noqa: F401
print(f"==> ready: torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}")
EOF
echo "$wanted" > "$stamp"
