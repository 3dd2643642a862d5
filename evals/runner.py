"""Run tasks for one model into an output directory (the library behind `python -m evals`)."""
from __future__ import annotations

import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional, Sequence

from tqdm.auto import tqdm

from .backends import EvalModel, EvalSettings
from .report import markdown_table
from .store import PredictionStore, prepare_out_dir, read_json, write_json
from .tasks import TaskSpec, aggregate


def run_task(backend: EvalModel, spec: TaskSpec, examples: list, store: PredictionStore,
             progress: Optional[bool] = None) -> dict:
    """Evaluate the examples not yet in `store` (appending each record as it finishes), then aggregate all of
    `examples` from the store. progress: tqdm bar (None = only on a terminal)."""
    todo = [ex for ex in examples if ex.id not in store]
    bar = tqdm(todo, desc=spec.name, unit="ex", disable=None if progress is None else not progress,
               initial=len(examples) - len(todo), total=len(examples), dynamic_ncols=True)
    for ex in bar:
        store.add(spec.evaluate(backend, ex))
    bar.close()
    return aggregate(spec, store.select(ex.id for ex in examples))


def evaluate(model, tasks: Sequence[tuple[TaskSpec, list]], out: Path, settings: EvalSettings,
             model_id: str = "", label: str = "", overwrite: bool = False, progress: Optional[bool] = None,
             log=print) -> dict:
    """Run each (task, examples) for `model` into `out`; returns and writes results.json and table.md.

    out:      output directory (see `evals.store`); existing predictions with the same settings are reused.
    model_id: what identifies the weights in config.json (default: the model's source / name).
    label:    the row name in the table (default: model_id).
    """
    out = Path(out)
    model_id = model_id or getattr(model, "source", None) or model.name
    config = {"model": model_id, "label": label or model_id, "dtype": str(model.dtype).replace("torch.", ""),
              "settings": asdict(settings)}
    prepare_out_dir(out, config, overwrite=overwrite)
    backend = EvalModel(model, settings)
    results = read_json(out / "results.json", {}) or {}
    for spec, examples in tasks:
        t0 = time.perf_counter()
        store = PredictionStore(out / "predictions" / f"{spec.name}.jsonl")
        results[spec.name] = run_task(backend, spec, examples, store, progress)
        write_json(out / "results.json", results)  # after every task, so a crash keeps the finished ones
        r = results[spec.name]
        value, se = r.get(spec.main), r.get("stderr")
        log(f"{spec.name}: {spec.main} = {float('nan') if value is None else value:.4f} ± "
            f"{float('nan') if se is None else se:.4f} (n = {r['n']}, {time.perf_counter() - t0:.0f} s)")
    (out / "table.md").write_text(markdown_table([(config, results)]), encoding="utf-8")
    return results


def eprint(*args) -> None:
    print(*args, file=sys.stderr)
