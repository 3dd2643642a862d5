"""Small-row fp32 linears on the CPU: torch's linear vs the project's small-row kernel vs torch.compile's CPU GEMM
template (Inductor, max-autotune, frozen weights), on SmolLM2-135M's layer shapes and 1-8 rows.

Each path runs the seven linears of one SmolLM2 layer (q, k, v, o, gate, up, down) 30 times (one forward's
worth); the table gives ms per forward, the median of `--repeats` timings, the paths interleaved within each repeat
so that their ratios hold even on a busy machine. The compiled path pays its compile time
once per shape (reported); it must be paid again for every new row count a decoder meets.

    python -m bench.linear_kernels                     # this CPU's own kernels
    ATEN_CPU_CAPABILITY=avx2 python -m bench.linear_kernels --rows 1,2,4,8
"""
from __future__ import annotations

import argparse
import time
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

# SmolLM2-135M: hidden 576, 9 query heads / 3 kv heads of 64, MLP 1536; (out, in) of each linear of a layer
LAYER = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]
LAYERS = 30


def main(argv: Optional[Sequence[str]] = None) -> list[dict]:
    p = argparse.ArgumentParser(prog="python -m bench.linear_kernels", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="1,2,3,4,8")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile path (minutes to compile)")
    args = p.parse_args(argv)
    from dlm import cpu_kernel
    torch.manual_seed(0)
    weights = [(torch.randn(o, i) * 0.02, torch.zeros(o)) for o, i in LAYER for _ in range(1)]
    kernel_ok = cpu_kernel.available()
    paths = {"torch": lambda x, w, b: F.linear(x, w, b)}
    if kernel_ok:
        paths["dlm kernel"] = lambda x, w, b: (cpu_kernel.small_rows_linear(x, w, b)
                                               if cpu_kernel.MIN_ROWS <= x.shape[0] <= cpu_kernel.MAX_ROWS
                                               else F.linear(x, w, b))
    print(f"# CPU capability {torch.backends.cpu.get_cpu_capability()}, threads {torch.get_num_threads()}, "
          f"dlm kernel {'built' if kernel_ok else 'unavailable'}", flush=True)
    rows_list = [int(r) for r in args.rows.split(",") if r.strip()]
    results = []
    for rows in rows_list:
        xs = [torch.randn(rows, i) for _, i in LAYER]
        row: dict = {"rows": rows}
        forwards = {}
        for name, fn in paths.items():
            def forward(fn=fn):
                for _ in range(LAYERS):
                    for x, (w, b) in zip(xs, weights):
                        fn(x, w, b)
            forwards[name] = forward
        if not args.no_compile:
            import torch._inductor.config as inductor
            inductor.freezing = True
            seq = torch.nn.ModuleList(torch.nn.Linear(i, o) for o, i in LAYER).eval()
            for m, (w, b) in zip(seq, weights):
                m.weight.data, m.bias.data = w, b
            compiled = torch.compile(lambda inputs: [m(x) for m, x in zip(seq, inputs)], mode="max-autotune",
                                     dynamic=False)
            t0 = time.perf_counter()
            with torch.no_grad():
                compiled(xs)
            row["compile_s"] = time.perf_counter() - t0

            def forward_compiled():
                for _ in range(LAYERS):
                    compiled(xs)
            forwards["inductor max-autotune"] = forward_compiled
        # interleaved: every repeat times each path once, so a busy moment of the machine hits all of them alike
        times: dict = {name: [] for name in forwards}
        with torch.inference_mode():
            for f in forwards.values():
                f()   # warm-up
            for _ in range(args.repeats):
                for name, f in forwards.items():
                    t0 = time.perf_counter()
                    f()
                    times[name].append(time.perf_counter() - t0)
        for name, ts in times.items():
            row[name] = 1000 * sorted(ts)[len(ts) // 2]
        results.append(row)
        print(" | ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()), flush=True)
    names = [k for k in results[0] if k not in ("rows", "compile_s")]
    print("| rows | " + " | ".join(f"{n} (ms)" for n in names) + " | compile s |")
    print("|---" * (len(names) + 2) + "|")
    for r in results:
        print(f"| {r['rows']} | " + " | ".join(f"{r[n]:.1f}" for n in names) + f" | {r.get('compile_s', 0):.0f} |")
    return results


if __name__ == "__main__":
    main()
