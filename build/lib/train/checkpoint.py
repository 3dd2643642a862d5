"""Fault-tolerant checkpoints: `OUTPUT_DIR/checkpoints/step-N/`, written atomically, validated on resume.

A checkpoint is `accelerator.save_state` (model, optimizer, scheduler, per-rank python/numpy/torch RNG; sharded
formats for DeepSpeed / FSDP come for free) plus:
  rank_state_<rank>.pt  per-rank loop state: the noise generator (t, masks and annealed attention patterns come
                        from it) and the not-yet-logged loss window, so a resumed run logs the same curve,
  trainer_state.json    step, data position, tokens seen, ... (written by the main process),
  manifest.json         every file's size, written last.
Everything is written into `.tmp-step-N/` and renamed to `step-N/` only when complete (after an fsync), so a crash
or SIGKILL while saving leaves the previous checkpoint as the newest one. On resume, a checkpoint whose manifest
does not match its files (truncated, missing, garbage) or that fails to load is reported and skipped in favour of
the one before it.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Optional

import torch

log = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step-(\d+)$")
MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.json"


def checkpoints_dir(output_dir: Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoint dirs (`step-N`), newest first. Temp dirs of interrupted saves are not listed."""
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def _fsync_tree(directory: Path) -> None:
    for path in directory.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(directory: Path) -> None:
    files = {str(p.relative_to(directory)): p.stat().st_size for p in sorted(directory.rglob("*"))
             if p.is_file() and p.name != MANIFEST}
    (directory / MANIFEST).write_text(json.dumps({"files": files, "time": time.time()}, indent=1))


def validate_checkpoint(directory: Path) -> Optional[str]:
    """None if `directory` looks complete and readable, else what is wrong (cheap: sizes + headers, no tensors)."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        return f"manifest unreadable ({type(e).__name__})"
    for name, size in manifest.get("files", {}).items():
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, expected {size}"
    try:
        state = json.loads((directory / TRAINER_STATE).read_text())
        int(state["step"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{TRAINER_STATE} unreadable ({type(e).__name__})"
    from safetensors import safe_open
    for path in directory.rglob("*.safetensors"):
        try:
            with safe_open(str(path), framework="pt") as f:
                f.keys()
        except Exception as e:
            return f"{path.name} is not valid safetensors ({e})"
    return None


def save_checkpoint(accelerator, output_dir: Path, step: int, trainer_state: dict, rank_state: dict,
                    keep_last: int) -> Path:
    """Collective: every rank calls it. `rank_state`: this rank's tensors (noise RNG state, loss window).
    Returns the final `step-N` path."""
    root = checkpoints_dir(output_dir)
    final, tmp = root / f"step-{step}", root / f".tmp-step-{step}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    torch.save(rank_state, tmp / f"rank_state_{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=1))
        write_manifest(tmp)
        _fsync_tree(tmp)
        if final.exists():  # the same step saved again (a resumed run re-reaching it): replace
            shutil.rmtree(final)
        os.rename(tmp, final)
        for old in list_checkpoints(output_dir)[keep_last:]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def clean_stale_temp(output_dir: Path) -> None:
    """Remove `.tmp-step-*` left by a save that was interrupted (they were never valid checkpoints)."""
    root = checkpoints_dir(output_dir)
    if root.is_dir():
        for p in root.glob(".tmp-step-*"):
            log.warning("removing incomplete checkpoint %s (a save was interrupted)", p)
            shutil.rmtree(p, ignore_errors=True)


def resolve_candidates(resume: str, output_dir: Path) -> list[Path]:
    """'auto' -> this run's checkpoints, newest first; a checkpoint dir -> [it]; an output dir -> its checkpoints."""
    if resume == "auto":
        return list_checkpoints(output_dir)
    path = Path(resume).expanduser()
    if (path / TRAINER_STATE).is_file() or (path / MANIFEST).is_file():
        return [path]
    found = list_checkpoints(path)
    if not found:
        raise FileNotFoundError(f"--resume {resume}: no checkpoints there (expected step-N/ or checkpoints/step-N/)")
    return found


def load_checkpoint(accelerator, candidates: list[Path], warn=log.warning) -> Optional[tuple[dict, dict]]:
    """Restore the newest usable checkpoint into the prepared objects; returns (trainer_state, this rank's
    rank_state) or None if none is usable.

    A corrupt or unloadable checkpoint is reported and the previous one is tried. Every rank runs the same
    validation on the shared files; the chosen step is checked to be the same on all ranks.
    """
    for directory in candidates:
        problem = validate_checkpoint(directory)
        if problem is None:
            try:
                accelerator.load_state(str(directory))
                rank_file = directory / f"rank_state_{accelerator.process_index}.pt"
                if not rank_file.is_file():
                    raise FileNotFoundError(f"{rank_file.name} missing (was it saved with fewer processes?)")
                rank_state = torch.load(rank_file, weights_only=True)
                state = json.loads((directory / TRAINER_STATE).read_text())
            except Exception as e:  # noqa: BLE001 - any failure means "use the previous one"
                problem = f"failed to load: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        if problem is None:
            _agree(accelerator, int(state["step"]))
            state["loaded_from"] = str(directory)
            return state, rank_state
        warn(f"checkpoint {directory} is unusable ({problem}); falling back to the previous one")
    return None


def _agree(accelerator, step: int) -> None:
    if accelerator.num_processes == 1:
        return
    from accelerate.utils import gather_object
    steps = gather_object([step])
    if len(set(steps)) != 1:
        raise RuntimeError(f"ranks resumed from different checkpoints: steps {steps}")
