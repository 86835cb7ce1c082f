"""What every benchmark harness shares: writing its JSON result."""

from __future__ import annotations

import json
from pathlib import Path


def write_json(path: Path, result: dict) -> None:
    """Write `result` as indented JSON to `path` (parent folders created) and say where."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written to {path}")
