#!/usr/bin/env bash
# Run every benchmark with its defaults (each ~1-3 min on a quiet 2-core CPU) and print the
# tables one after another. Tables only; nothing is asserted.
#
#   benchmarks/run_all.sh            # ~4-5 min in all on a quiet 2-core CPU
#   benchmarks/run_all.sh --quick    # smaller: 1 repeat, vocab 8k only, 3 loss variants (~2 min)
#
# Run from anywhere; it uses the repository's .venv (or $PYTHON).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"

engine_args=() lm_args=() loss_args=() methods_args=() trl_args=()
if [[ "${1:-}" == "--quick" ]]; then
    engine_args=(--repeats 1)
    lm_args=(--vocab 8192)
    loss_args=(--variants full topk64 full/c128 --repeats 1)
    methods_args=(--epochs 2)
    trl_args=(--vocab 8192 --epochs 1 --threads 1)
elif [[ $# -gt 0 ]]; then
    echo "usage: $0 [--quick]" >&2
    exit 2
fi

run() {
    local title=$1
    shift
    echo
    echo "================================================================================================"
    echo "== $title"
    echo "== $*"
    echo "================================================================================================"
    local start=$SECONDS
    "$PYTHON" "$@"
    echo "(took $((SECONDS - start)) s)"
}

run "MLP classification: engine (run_distillation, start -> finish) vs hand-written online-KD loop" \
    benchmarks/bench_engine_vs_hand_loop.py "${engine_args[@]}"
run "Causal-LM KD training step: engine recipe + loop vs TRL/torchtune-style hand loop" \
    benchmarks/bench_lm_kd_step.py "${lm_args[@]}"
run "Token-level KD loss alone: peak memory and time, full vs top-k vs chunked" \
    benchmarks/bench_loss_memory.py "${loss_args[@]}"
run "Teacher-signal store: first job vs repeat job teacher time, bytes per token" \
    benchmarks/bench_teacher_cache.py
run "/predict at 32 concurrent single-row clients: micro-batched vs unbatched vs HEAD vs bare route" \
    benchmarks/bench_predict.py
run "Distillation methods side by side: token, sequence, on-policy, intermediate (held-out ppl, teacher NLL)" \
    benchmarks/bench_methods.py "${methods_args[@]}"
if [[ -x benchmarks/.venv-trl/bin/python ]]; then  # TRL lives in its own venv: bash benchmarks/setup_trl_env.sh
    PYTHON=benchmarks/.venv-trl/bin/python run "Causal-LM KD: engine vs TRL's GKDTrainer (own venv benchmarks/.venv-trl)" \
        benchmarks/bench_vs_trl.py "${trl_args[@]}"
else
    echo "(skipped engine vs TRL: run  bash benchmarks/setup_trl_env.sh  first; TRL is not a service dependency)"
fi
