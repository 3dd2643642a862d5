"""Files: writing a directory atomically (readers see the old complete directory or the new complete one, never
half), and where the shared datasets lie (`default_data_dir`, for evaluation and for training data tools alike)."""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Union


@contextmanager
def atomic_directory(directory: Union[str, os.PathLike], *, keep_existing: bool = False) -> Iterator[Path]:
    """Yield a fresh temp dir beside `directory`; fill it in the `with` block.

    On success it takes `directory`'s place: an existing one is moved aside first and deleted only once the new one
    is in place (a crash in between leaves it recoverable as `.NAME.old-PID`). With `keep_existing` (caches that
    several processes may build at once) a `directory` that exists by then wins: ours is dropped. If the block
    raises, the temp dir is deleted and `directory` is left exactly as it was.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; a saved model is meant to be readable like any other file
    try:
        yield tmp
        if keep_existing:
            try:
                os.rename(tmp, directory)  # fails when another process got there first: theirs is kept
            except OSError:
                if not directory.exists():
                    raise
            return
        old = None
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(directory, old)
        os.replace(tmp, directory)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


CACHE_ENV = "DLM_CACHE_DIR"


def cache_dir() -> Path:
    """The one folder for derived files (GGUF conversions, token caches, extracted tokenizers):
    $DLM_CACHE_DIR, else ~/.cache/dlm-studio."""
    value = os.environ.get(CACHE_ENV)
    return Path(value).expanduser() if value else Path.home() / ".cache" / "dlm-studio"


def default_data_dir() -> Path:
    """$DLM_DATA_DIR, else `../shared/data` relative to the repository root (resolved from this package)."""
    env = os.environ.get("DLM_DATA_DIR")
    return Path(env) if env else Path(__file__).resolve().parent.parent.parent / "shared" / "data"
