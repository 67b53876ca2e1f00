"""The README's first command's payload: the digits demo on the embedded defaults
(SQLite, local artifacts, Celery's filesystem broker), in a clean folder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_digits_demo_runs_on_embedded_defaults(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISTILL_")}
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "digits_demo.py")], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "OK: student keeps >= 95%" in result.stdout
    assert "[succeeded]" in result.stdout and "validation accuracy" in result.stdout
    # Everything went where the embedded defaults say, under the working folder.
    assert (tmp_path / "var" / "distill.db").exists()
    assert any((tmp_path / "var" / "artifacts" / "models").iterdir())
    assert (tmp_path / "var" / "broker" / "queue").is_dir()
