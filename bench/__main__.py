"""`python -m bench`: one entry point for every benchmark; each prints its own table, then one summary table.

    python -m bench                      # all: decode, continuation, first frame, sampler overhead, training throughput
    python -m bench --quick              # all, small settings (decode --quick; the others' defaults are small)
    python -m bench decode --lengths 64  # one benchmark; the remaining arguments go to it
    make bench ARGS="decode --quick"

Benchmarks are imported lazily, so a missing or broken one is reported and skipped, never fatal for the rest.
"""
from __future__ import annotations

import importlib
import sys
import time
import traceback
from typing import Optional, Sequence

# name -> (module, arguments added for --quick)
BENCHMARKS = {
    "decode": ("bench.decode", ["--quick"]),
    "continuation": ("bench.continuation", ["--n", "4", "--new-tokens", "16"]),
    "first-frame": ("bench.first_frame", ["--repeats", "2"]),
    "overhead": ("bench.sampler_overhead", []),
    "throughput": ("bench.train_throughput", []),
    "quantization": ("bench.quantization", ["--n", "2", "--new-tokens", "16"]),
    "latency": ("bench.latency", ["--long-clients", "4", "--short", "4"]),
    "denoise-default": ("bench.denoise_default", ["--n", "2", "--new-tokens", "16"]),
    "infill-forward": ("bench.infill_forward", ["--repeats", "3"]),
    "infill-examples": ("bench.infill_examples", []),
    "cpu-step": ("bench.cpu_step", ["--steps", "8"]),
    "draft-acceptance": ("bench.draft_acceptance", ["--rows", "8", "--blocks", "2,4"]),
}


def run_one(name: str, argv: list[str]) -> tuple[str, float, str]:
    """Run benchmark `name` with `argv` -> (status, seconds, note)."""
    module_name = BENCHMARKS[name][0]
    t0 = time.perf_counter()
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name == module_name:
            return "skipped", 0.0, f"{module_name.replace('.', '/')}.py is not present"
        return "failed", 0.0, f"import error: {e}"
    print(f"\n===== {name} ({module_name}) {' '.join(argv)} =====", flush=True)
    try:
        result = module.main(argv)
    except SystemExit as e:  # argparse errors and explicit exits
        if e.code not in (0, None):
            return "failed", time.perf_counter() - t0, f"exit status {e.code}"
        result = None
    except Exception as e:
        traceback.print_exc()
        return "failed", time.perf_counter() - t0, f"{type(e).__name__}: {e}"
    seconds = time.perf_counter() - t0
    if isinstance(result, int) and not isinstance(result, bool) and result != 0:
        return "failed", seconds, f"exit status {result}"
    note = f"{len(result)} rows" if isinstance(result, (list, tuple)) else ""
    return "ok", seconds, note


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    if argv and argv[0] in BENCHMARKS:
        names, rest = [argv[0]], argv[1:]
    elif argv and argv[0] == "all":
        names, rest = list(BENCHMARKS), argv[1:]
    elif argv and not argv[0].startswith("-"):
        print(f"unknown benchmark {argv[0]!r}; choose from all, {', '.join(BENCHMARKS)}", file=sys.stderr)
        return 2
    else:
        names, rest = list(BENCHMARKS), argv
    quick = "--quick" in rest
    summary = []
    for name in names:
        if len(names) > 1:  # running all: --quick maps to each one's own small settings
            args = list(BENCHMARKS[name][1]) if quick else []
        else:
            args = rest
        summary.append((name, *run_one(name, args)))
    print("\n===== summary =====")
    print(f"{'benchmark':<12}{'status':<9}{'seconds':>9}  note")
    for name, status, seconds, note in summary:
        print(f"{name:<12}{status:<9}{seconds:>9.1f}  {note}")
    return 1 if any(s == "failed" for _, s, _, _ in summary) else 0


if __name__ == "__main__":
    sys.exit(main())
