"""The client package lives in client/ (its own distribution). Installed or not, the tests
import it from the checkout, and hand the same path to the subprocesses they start."""

from __future__ import annotations

import sys
from pathlib import Path

CLIENT_DIR = Path(__file__).resolve().parents[2] / "client"
if str(CLIENT_DIR) not in sys.path:
    sys.path.insert(0, str(CLIENT_DIR))


def client_env(base: dict, **extra: str) -> dict:
    """``base`` with the client's folder on PYTHONPATH (and ``extra`` variables)."""
    path = base.get("PYTHONPATH")
    return {**base, "PYTHONPATH": str(CLIENT_DIR) + (f":{path}" if path else ""), **extra}
