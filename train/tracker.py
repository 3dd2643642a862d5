"""The run's metrics as JSON lines (`OUTPUT_DIR/metrics.jsonl`), an accelerate tracker beside TensorBoard's."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from accelerate.tracking import GeneralTracker


class JSONLTracker(GeneralTracker):
    """An accelerate tracker (the `GeneralTracker` interface) that appends one JSON line per `log` call to
    `OUTPUT_DIR/metrics.jsonl`: the run's curve, readable without TensorBoard. `truncate(step)` drops lines past a
    resumed step (they came from steps that are about to be recomputed)."""

    name, requires_logging_directory, main_process_only = "jsonl", False, True

    def __init__(self, path: Path):
        super().__init__(_blank=True)
        self.path = path

    @property
    def tracker(self):
        return self.path

    def start(self):
        pass

    def store_init_configuration(self, values: dict):
        pass

    def log(self, values: dict, step: Optional[int] = None, **kwargs):
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")

    def finish(self):
        pass

    def truncate(self, resume_step: Optional[int]) -> None:
        if not self.path.is_file():
            return
        if resume_step is None:
            self.path.unlink()
            return
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= resume_step]
        self.path.write_text("".join(line + "\n" for line in kept))
