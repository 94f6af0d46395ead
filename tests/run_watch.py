"""Reading a live campaign's run directory from a test that waits for a point to inject a fault."""

from __future__ import annotations

import json
from pathlib import Path


def rounds_completed(run: Path) -> int:
    """state.json's count, 0 before the first round completes (or while the file is being replaced)."""
    try:
        return json.loads((run / "state.json").read_text())["rounds_completed"]
    except (FileNotFoundError, json.JSONDecodeError):
        return 0
