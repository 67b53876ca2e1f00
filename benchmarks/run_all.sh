#!/usr/bin/env bash
# Run every benchmark with its defaults and print each one's table, then ONE summary table of the
# headline figures (figure, engine, peer or baseline, ratio, goal, met) that every script records
# through benchmarks/_summary.py. Tables only; nothing is asserted.
#
#   benchmarks/run_all.sh            # ~25 min on a quiet 2-core CPU (TRL: bash benchmarks/setup_trl_env.sh first)
#   benchmarks/run_all.sh --quick    # smaller: 1 repeat, vocab 8k only, fewer variants (~10 min)
#
# Run from anywhere; it uses the repository's .venv (or $PYTHON).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"

engine_args=() lm_args=() paths_args=() methods_args=() trl_args=() completions_args=() api_args=()
if [[ "${1:-}" == "--quick" ]]; then
    engine_args=(--repeats 1)
    lm_args=(--vocab 8192)
    paths_args=(--vocab 8192 --repeats 2)
    methods_args=(--epochs 2)
    trl_args=(--vocab 8192 --epochs 1 --threads 1)
    completions_args=(--repeats 1 --seconds 6)
elif [[ $# -gt 0 ]]; then
    echo "usage: $0 [--quick]" >&2
    exit 2
fi

summary=$(mktemp)
trap 'rm -f "$summary"' EXIT
export DISTILL_BENCH_SUMMARY=$summary

run() {
    local title=$1
    shift
    echo
    echo "================================================================================================"
    echo "== $title"
    echo "== $*"
    echo "================================================================================================"
    local start=$SECONDS
    "$PYTHON" "$@" || echo "(failed: exit $?)"
    echo "(took $((SECONDS - start)) s)"
}

run "MLP classification: engine (run_distillation, start -> finish) vs hand-written online-KD loop" \
    benchmarks/bench_engine_vs_hand_loop.py "${engine_args[@]}"
run "Causal-LM KD training step: engine recipe + loop vs TRL/torchtune-style hand loop" \
    benchmarks/bench_lm_kd_step.py "${lm_args[@]}"
run "LM KD loss forward + backward: fused vs materialized vs chunked vs checkpointed (time, memory)" \
    benchmarks/bench_loss_paths.py "${paths_args[@]}"
run "Teacher-signal store: first job vs repeat job teacher time, bytes per token" \
    benchmarks/bench_teacher_cache.py
run "/predict at 32 concurrent single-row clients: micro-batched vs unbatched vs HEAD vs bare route" \
    benchmarks/bench_predict.py
run "API create + get at 64 concurrent clients (PostgreSQL, Redis broker, no worker) vs the previous app/" \
    benchmarks/bench_api.py "${api_args[@]}"
run "Completions at 16 concurrent clients: batched generation vs one at a time" \
    benchmarks/bench_completions.py "${completions_args[@]}"
run "Distillation methods side by side: token, sequence, on-policy, intermediate (held-out ppl, teacher NLL)" \
    benchmarks/bench_methods.py "${methods_args[@]}"
if [[ -x benchmarks/.venv-trl/bin/python ]]; then  # TRL lives in its own venv: bash benchmarks/setup_trl_env.sh
    PYTHON=benchmarks/.venv-trl/bin/python run "Causal-LM KD: engine vs TRL's GKDTrainer (own venv benchmarks/.venv-trl)" \
        benchmarks/bench_vs_trl.py "${trl_args[@]}"
else
    echo "(skipped engine vs TRL: run  bash benchmarks/setup_trl_env.sh  first; TRL is not a service dependency)"
fi

echo
echo "================================================================================================"
echo "== Summary: every benchmark's headline figures (ratio > 1 is better, except where the goal says <=)"
echo "== $(nproc) CPUs, $(uname -m), $(.venv/bin/python -c 'import torch; print("torch", torch.__version__)' 2>/dev/null)"
echo "================================================================================================"
.venv/bin/python benchmarks/_summary.py "$summary"
