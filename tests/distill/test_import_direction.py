"""The engine must not pull in service code or its dependencies (it runs as a plain library / CLI)."""

import json
import subprocess
import sys

ENGINE_MODULES = ["distill", "distill.train", "distill.cli", "distill.evaluate", "distill.checkpoint",
                  "distill.data", "distill.models", "distill.spec", "distill.losses", "distill.teacher_signal",
                  "distill.llm_losses", "distill.text_train", "distill.hf", "distill.archive", "distill.text_data"]
FORBIDDEN = ["app", "worker", "fastapi", "celery", "sqlalchemy", "starlette", "redis", "pydantic", "uvicorn"]

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
