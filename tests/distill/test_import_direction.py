"""The engine must not pull in service code or its dependencies (it runs as a plain library / CLI)."""

import json
import subprocess
import sys

ENGINE_MODULES = ["distill", "distill.train", "distill.loop", "distill.cli", "distill.evaluate", "distill.checkpoint",
                  "distill.data", "distill.models", "distill.spec", "distill.losses", "distill.losses.registry",
                  "distill.losses.token", "distill.losses.chunked", "distill.losses.classic", "distill.teacher_signal",
                  "distill.recipes", "distill.recipes.classification", "distill.recipes.causal_lm",
                  "distill.recipes.causal_lm_sequence", "distill.recipes.text_classification", "distill.kinds",
                  "distill.kinds.mlp", "distill.kinds.hf", "distill.hf", "distill.archive", "distill.text_data"]
# pydantic is allowed: the job spec is declared once, in distill/spec.py, and the API reuses it.
FORBIDDEN = ["app", "worker", "fastapi", "celery", "sqlalchemy", "starlette", "redis", "uvicorn"]

PROBE = f"""
import importlib, json, sys
for name in {ENGINE_MODULES!r}:
    importlib.import_module(name)
loaded = sorted({{m.split('.')[0] for m in sys.modules}})
print(json.dumps(loaded))
"""


def test_engine_imports_no_service_code(tmp_path):
    proc = subprocess.run([sys.executable, "-c", PROBE], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    loaded = set(json.loads(proc.stdout))
    assert {"distill", "torch", "safetensors"} <= loaded  # the probe really imported the engine
    assert not loaded & set(FORBIDDEN), sorted(loaded & set(FORBIDDEN))
