"""Small-row linears on the CPU: torch's linear vs the project's small-row kernel vs torch.compile's CPU GEMM
template (Inductor, max-autotune, frozen weights), on SmolLM2-135M's layer shapes and 1-8 rows; with --packed also
the packed weight-only formats: dlm's int8 / int4 kernel (`dlm.packed_linear`) and torch's own CPU ops
(`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`, fp32 activations), each with its memory floor.

Each path runs the seven linears of one SmolLM2 layer (q, k, v, o, gate, up, down) 30 times (one forward's
worth); the table gives ms per forward, the median of `--repeats` timings, the paths interleaved within each repeat
so that their ratios hold even on a busy machine. The compiled path pays its compile time
once per shape (reported); it must be paid again for every new row count a decoder meets.

    python -m bench.linear_kernels                     # this CPU's own kernels
    ATEN_CPU_CAPABILITY=avx2 python -m bench.linear_kernels --rows 1,2,4,8
    python -m bench.linear_kernels --packed --no-compile --rows 1,4,8     # + int8 / int4, with x floor
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
    p.add_argument("--packed", action="store_true", help="also dlm's packed int8 / int4 and torch's int8 / int4 ops "
                   "(each layer its own weights, so the weights stream from memory as in a model)")
    p.add_argument("--no-torch-packed", action="store_true", help="with --packed: skip torch's int8 / int4 ops "
                   "(17-40x slower than their floor here)")
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
    packed_forwards, nbytes = (_packed_paths(not args.no_torch_packed) if args.packed else ({}, {}))
    if nbytes:
        from bench.cpu_step import read_bandwidth_gbs
        gbs = read_bandwidth_gbs()
        nbytes["torch"] = 4 * sum(o * i for o, i in LAYER) * LAYERS
        print(f"# read bandwidth {gbs:.1f} GB/s; floors (ms): " + ", ".join(
            f"{k} {v / gbs / 1e6:.1f}" for k, v in nbytes.items()), flush=True)
    results = []
    for rows in rows_list:
        xs = [torch.randn(rows, i) for _, i in LAYER]
        row: dict = {"rows": rows}
        forwards = {name: make(rows) for name, make in packed_forwards.items()}
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
        if nbytes:
            for name in list(times):
                key = next((k for k in nbytes if name.startswith(k)), "torch" if name in ("torch", "dlm kernel") else None)
                if key:
                    row[f"{name} x floor"] = row[name] / (nbytes[key] / gbs / 1e6)
        results.append(row)
        print(" | ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()), flush=True)
    names = [k for k in results[0] if k not in ("rows", "compile_s")]
    print("| rows | " + " | ".join(f"{n} (ms)" for n in names) + " | compile s |")
    print("|---" * (len(names) + 2) + "|")
    for r in results:
        print(f"| {r['rows']} | " + " | ".join(f"{r[n]:.1f}" for n in names) + f" | {r.get('compile_s', 0):.0f} |")
    return results


def _packed_paths(torch_ops: bool):
    """name -> (rows -> one forward's worth of calls), and name prefix -> bytes read per forward. Every layer has its
    own packed weights (30 x the seven linears), so they stream from memory as in a model."""
    from dlm import packed_linear as pl
    torch.manual_seed(1)
    layers = [[torch.randn(o, i) * 0.02 for o, i in LAYER] for _ in range(LAYERS)]
    paths, nbytes = {}, {}
    nbytes["fp32 own weights"] = 4 * sum(o * i for o, i in LAYER) * LAYERS

    def make32(rows):
        xs = [torch.randn(rows, i) for _, i in LAYER]

        def forward():
            for layer in layers:
                for x, w in zip(xs, layer):
                    F.linear(x, w)
        return forward
    paths["fp32 own weights"] = make32
    if pl.available():
        for bits in (8, 4):
            packs = [[pl.quantize(w, bits) for w in layer] for layer in layers]
            nbytes[f"dlm int{bits}"] = sum(pl.packed_bytes(bits, o, i) for o, i in LAYER) * LAYERS

            def make(rows, packs=packs, bits=bits):
                xs = [torch.randn(rows, i) for _, i in LAYER]

                def forward():
                    for layer in packs:
                        for x, (q, s) in zip(xs, layer):
                            pl.packed_matmul(x, q, s, None, bits)
                return forward
            paths[f"dlm int{bits}"] = make
    else:
        print(f"# dlm's packed kernel unavailable: {pl._build()}")
    if torch_ops and hasattr(torch.ops.aten, "_weight_int8pack_mm"):
        i8 = []
        for layer in layers:
            row = []
            for w in layer:
                s = w.abs().amax(1) / 127
                row.append((torch.round(w / s[:, None]).to(torch.int8), s))
            i8.append(row)
        nbytes["torch int8"] = sum(o * i + 4 * o for o, i in LAYER) * LAYERS

        def make8(rows):
            xs = [torch.randn(rows, i) for _, i in LAYER]

            def forward():
                for layer in i8:
                    for x, (q, s) in zip(xs, layer):
                        torch.ops.aten._weight_int8pack_mm(x, q, s)
            return forward
        paths["torch int8"] = make8
    if torch_ops and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        i4 = []
        for layer in layers:
            row = []
            for w in layer:
                o, i = w.shape
                wg = w.view(o, i // 32, 32)
                lo, hi = wg.amin(-1), wg.amax(-1)
                scale = ((hi - lo) / 15).clamp(min=1e-8)
                q = torch.round((wg - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32).view(o, i)
                row.append((torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2),
                            torch.stack([scale.T, (lo + 8 * scale).T], -1).contiguous()))
            i4.append(row)
        nbytes["torch int4"] = sum(o * i // 2 + o * i // 32 * 8 for o, i in LAYER) * LAYERS

        def make4(rows):
            xs = [torch.randn(rows, i) for _, i in LAYER]

            def forward():
                for layer in i4:
                    for x, (q, sz) in zip(xs, layer):
                        torch.ops.aten._weight_int4pack_mm_for_cpu(x, q, 32, sz)
            return forward
        paths["torch int4"] = make4
    return paths, nbytes


if __name__ == "__main__":
    main()
