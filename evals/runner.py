"""Run tasks for one model into an output directory (the library behind `python -m evals`)."""
from __future__ import annotations

import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional, Sequence

from tqdm.auto import tqdm

from .eval_model import EvalModel, EvalSettings
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
             log=print, data: Optional[dict] = None, selection: Optional[dict] = None) -> dict:
    """Run each (task, examples) for `model` into `out`; returns and writes results.json and table.md.

    out:       output directory (see `evals.store`); existing predictions with the same settings are reused.
    model_id:  what identifies the weights in config.json (default: the model's source / name).
    label:     the row name in the table (default: model_id).
    data:      {task: {file: {"sha256", "bytes"}}} of the files each task read (`evals.data.file_fingerprints`);
               recorded in config.json, and a rerun whose files hash differently is refused.
    selection: how the examples were chosen (e.g. {"limit": 200, "skip": 0}); recorded in config.json.
    """
    out = Path(out)
    model_id = model_id or getattr(model, "source", None) or model.name
    config = {"model": model_id, "label": label or model_id, "dtype": str(model.dtype).replace("torch.", ""),
              "settings": asdict(settings), "data": data or {}, "selection": selection or {},
              "examples": {spec.name: [ex.id for ex in examples[:1] + examples[-1:]] for spec, examples in tasks},
              "command": sys.argv, "environment": environment()}
    prepare_out_dir(out, config, overwrite=overwrite)
    backend = EvalModel(model, settings)
    results = read_json(out / "results.json", {}) or {}
    for spec, examples in tasks:
        t0 = time.perf_counter()
        store = PredictionStore(out / "predictions" / f"{spec.name}.jsonl")
        results[spec.name] = run_task(backend, spec, examples, store, progress)
        write_json(out / "results.json", results)  # after every task, so a crash keeps the finished ones
        r = results[spec.name]
        value, (lo, hi) = r.get(spec.main), r.get("ci") or (None, None)
        nan = float("nan")
        log(f"{spec.name}: {spec.main} = {nan if value is None else value:.4f}, 95% interval "
            f"[{nan if lo is None else lo:.4f}, {nan if hi is None else hi:.4f}] (n = {r['n']}, "
            f"{time.perf_counter() - t0:.0f} s)")
    (out / "table.md").write_text(markdown_table([(read_json(out / "config.json", config), results)]),
                                  encoding="utf-8")
    return results


def rescore(out: Path, log=print) -> dict:
    """Read the answers of `out`'s finished tasks again from their stored generations (tasks whose spec has a
    `rescore`, e.g. GSM8K after its answer rule changed), rewrite their records and results; nothing is generated.
    Not for a directory a run is still appending to."""
    from .tasks import get_task
    out = Path(out)
    results = read_json(out / "results.json")
    if results is None:
        raise FileNotFoundError(f"{out} has no results.json (not an evals --out directory?)")
    config = read_json(out / "config.json", {}) or {}
    for name in list(results):
        try:
            spec = get_task(name)
        except KeyError:
            continue
        if spec.rescore is None:
            continue
        path = out / "predictions" / f"{name}.jsonl"
        old = PredictionStore.read(path)
        new = {i: spec.rescore(r) for i, r in old.items()}
        changed = sum(new[i].get(spec.main) != old[i].get(spec.main) for i in new)
        PredictionStore.write(path, new)
        first_last = config.get("examples", {}).get(name)
        ids = [i for i in sorted(new) if not first_last or first_last[0] <= i <= first_last[-1]]  # the run's slice
        before = results[name].get(spec.main)
        results[name] = aggregate(spec, [new[i] for i in ids])
        log(f"{out}: {name}: {spec.main} {before} -> {results[name].get(spec.main)} ({changed} records changed)")
    write_json(out / "results.json", results)
    (out / "table.md").write_text(markdown_table([(config, results)]), encoding="utf-8")
    return results


def environment() -> dict:
    """Versions that can change a number: Python, torch, transformers, peft, rouge-score, this project."""
    import platform
    from importlib import metadata
    env = {"python": platform.python_version(), "platform": platform.platform()}
    for dist in ("dlm-studio", "torch", "transformers", "peft", "tokenizers", "rouge-score", "lm-eval", "numpy"):
        try:
            env[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return env


def eprint(*args) -> None:
    print(*args, file=sys.stderr)
