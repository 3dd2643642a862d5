"""Where a benchmark's result goes besides the printed table: `--out FILE`, one JSON document."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional


def write_json(path: Optional[Path], result) -> None:
    """Write `result` to `path` as indented JSON, creating its folder; nothing when no --out was given."""
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1))
