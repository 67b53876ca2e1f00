"""The engine must not pull in service code or its dependencies (it runs as a plain library / CLI)."""

import json
import subprocess
from pathlib import Path
import sys

ROOT = Path(__file__).resolve().parents[2]
# every module of the engine, found on disk (a new recipe or loss file is covered without listing it)
ENGINE_MODULES = sorted(".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
                        for path in (ROOT / "distill").rglob("*.py") if path.stem != "__main__")
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
