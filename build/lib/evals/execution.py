"""Run model-written programs safely enough for pass@1: never in this process, always in a child with limits.

The child is `python -I` (isolated mode: no user site, no PYTHON* variables) in a fresh temporary directory with a
minimal environment, a wall-clock timeout (the whole process group is killed), CPU / memory / file-size / core
limits, and no network: `unshare -n` puts it in an empty network namespace when the kernel allows it (root, or
`unshare -rn` with user namespaces); otherwise proxies point nowhere and the timeout is the last line of defence.
This is a sandbox for honest benchmark completions, not for hostile code.
"""
from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Optional

MEMORY_LIMIT_BYTES = 2 * 1024 ** 3
FILE_SIZE_LIMIT_BYTES = 16 * 1024 ** 2


@dataclass
class ExecResult:
    passed: bool
    status: str          # "passed" | "failed" | "timeout"
    detail: str = ""     # last line of stderr for a failure


@lru_cache(maxsize=1)
def network_isolation_prefix() -> tuple[str, ...]:
    """The command prefix that cuts the network here: ("unshare", "-n") or ("unshare", "-rn"), else ()."""
    exe = shutil.which("unshare")
    if exe is None:
        return ()
    for flags in ("-n", "-rn"):
        try:
            ok = subprocess.run([exe, flags, "true"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                timeout=10).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            ok = False
        if ok:
            return (exe, flags)
    return ()


def _limit_child(cpu_seconds: int) -> None:
    """Runs in the child between fork and exec: resource limits (best effort; some are not allowed everywhere)."""
    for res, value in ((resource.RLIMIT_CPU, cpu_seconds), (resource.RLIMIT_AS, MEMORY_LIMIT_BYTES),
                       (resource.RLIMIT_FSIZE, FILE_SIZE_LIMIT_BYTES), (resource.RLIMIT_CORE, 0)):
        try:
            resource.setrlimit(res, (value, value))
        except (ValueError, OSError):
            pass


def run_program(program: str, timeout: float = 10.0, python: Optional[str] = None) -> ExecResult:
    """Execute `program` (Python source) in a sandboxed child process; passed = exit status 0 within `timeout`.

    program: the whole file to run (e.g. prompt + completion + suffix + tests + `check(entry_point)`).
    timeout: wall-clock seconds before the child's process group is killed (default 10); CPU time is limited to
             the same number of seconds (+1).
    python:  interpreter to use (default: this one, `sys.executable`).
    """
    with tempfile.TemporaryDirectory(prefix="evals-exec-") as tmp:
        path = Path(tmp) / "program.py"
        path.write_text(program, encoding="utf-8")
        cmd = [*network_isolation_prefix(), python or sys.executable, "-I", "-B", str(path)]
        env = {"PATH": "/usr/bin:/bin", "HOME": tmp, "TMPDIR": tmp, "LANG": "C.UTF-8", "PYTHONHASHSEED": "0",
               # if the network namespace is unavailable, make proxy-aware clients fail fast
               "http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9", "no_proxy": ""}
        proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, start_new_session=True,
                                preexec_fn=lambda: _limit_child(int(timeout) + 1))
        try:
            _, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.communicate()
            return ExecResult(False, "timeout", f"no exit within {timeout:g} s")
    if proc.returncode == 0:
        return ExecResult(True, "passed")
    lines = err.decode("utf-8", "replace").strip().splitlines()
    return ExecResult(False, "failed", lines[-1][:300] if lines else f"exit status {proc.returncode}")


def humaneval_program(prompt: str, completion: str, suffix: str, test: str, entry_point: str) -> str:
    """The file human-eval-infilling runs: prefix + middle + suffix, then the tests and `check(entry_point)`."""
    return f"{prompt}{completion}{suffix}\n\n{test}\n\ncheck({entry_point})\n"


def single_line(completion: str) -> str:
    """Single-line infilling: keep the generated middle up to and including its first newline (add one if none)."""
    i = completion.find("\n")
    return completion[: i + 1] if i != -1 else completion + "\n"
