"""The output directory of a run: config, per-example predictions (append-only JSONL) and results.

    OUT/config.json                 model, dtype, kind and every setting that changes predictions; the SHA-256 of
                                    every data file each task read ("data"), the examples chosen ("selection"),
                                    the command line and library versions ("command", "environment")
    OUT/predictions/<task>.jsonl    one record per finished example (appended and flushed as it finishes)
    OUT/results.json                {"<task>": {"<metric>": value, "stderr": value, "n": count, ...}}
    OUT/table.md                    this run as one row of the paper's Table 1

A rerun with the same settings skips every example already in predictions/ (resumable after a crash or with a
larger --limit); a rerun with different settings, or with a task's data files changed (another SHA-256), is refused
unless --overwrite, so a file never mixes settings or data.
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Iterable


class ConfigMismatch(ValueError):
    pass


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN / inf
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def write_json(path: Path, obj) -> None:
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_jsonable(obj), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)


def read_json(path: Path, default=None):
    path = Path(path)
    if not path.is_file():
        return default
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e.msg}); delete it or use another --out") from None


def prepare_out_dir(out: Path, config: dict, overwrite: bool = False) -> None:
    """Create OUT and write config.json; refuse to reuse a directory made with different settings."""
    out = Path(out)
    old = read_json(out / "config.json")
    identity = ("model", "dtype", "settings")
    same = old is None or all(old.get(k) == config.get(k) for k in identity)
    changed = [] if old is None else data_changes(old.get("data") or {}, config.get("data") or {})
    if (not same or changed) and not overwrite:
        before, after = old.get("settings", {}), config.get("settings", {})
        diff = [f"{k}: {before.get(k)!r} -> {v!r}" for k, v in after.items() if before.get(k) != v]
        diff[:0] = [f"{k}: {old.get(k)!r} -> {config.get(k)!r}" for k in ("model", "dtype")
                    if old.get(k) != config.get(k)]
        raise ConfigMismatch(f"{out} holds predictions made with other settings or data ({'; '.join(diff + changed)}); "
                             "use another --out, or --overwrite to discard them")
    if old is not None and not overwrite:  # keep the hashes, example ranges and commands of the earlier runs
        config = {**config, **{k: {**(old.get(k) or {}), **config[k]} for k in ("data", "examples") if k in config}}
        earlier = list(old.get("earlier_commands") or []) + ([old["command"]] if old.get("command") else [])
        if earlier and "command" in config:
            config["earlier_commands"] = [c for i, c in enumerate(earlier) if c not in earlier[:i]
                                          and c != config["command"]]
    if overwrite:
        shutil.rmtree(out / "predictions", ignore_errors=True)
        for name in ("results.json", "table.md"):
            (out / name).unlink(missing_ok=True)
    (out / "predictions").mkdir(parents=True, exist_ok=True)
    write_json(out / "config.json", config)


def data_changes(before: dict, after: dict) -> list[str]:
    """Files whose SHA-256 differs between two `{task: {file: {"sha256", ...}}}` records, for the tasks in both."""
    out = []
    for task in sorted(set(before) & set(after)):
        old_files, new_files = before[task], after[task]
        for name in sorted(set(old_files) | set(new_files)):
            a, b = (old_files.get(name) or {}).get("sha256"), (new_files.get(name) or {}).get("sha256")
            if a != b:
                out.append(f"{task} data {name}: sha256 {(a or 'absent')[:12]} -> {(b or 'absent')[:12]}")
    return out


class PredictionStore:
    """Append-only per-example records of one task, keyed by example id."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.records: dict[int, dict] = self.read(self.path)
        if self.path.is_file():  # rewrite without a torn last line so later appends stay valid JSONL
            self.write(self.path, self.records)

    @staticmethod
    def read(path: Path) -> dict[int, dict]:
        """The records of a predictions file by example id, without touching it (a run may be appending)."""
        records: dict[int, dict] = {}
        if not Path(path).is_file():
            return records
        lines = Path(path).read_text(encoding="utf-8").splitlines()
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                if n == len(lines):
                    continue  # a line cut short by a crash (or being written): that example simply runs again
                raise ValueError(f"{path}:{n} is not valid JSON; delete the file to recompute") from None
            records[int(rec["id"])] = rec
        return records

    @staticmethod
    def write(path: Path, records: dict[int, dict]) -> None:
        """Replace the file with `records`, one JSON line each (written aside, then renamed: never half a file)."""
        tmp = Path(path).with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records.values()), encoding="utf-8")
        tmp.replace(path)

    def __contains__(self, example_id: int) -> bool:
        return example_id in self.records

    def add(self, record: dict) -> None:
        record = _jsonable(record)
        self.records[int(record["id"])] = record
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            f.flush()

    def select(self, ids: Iterable[int]) -> list[dict]:
        return [self.records[i] for i in ids if i in self.records]
