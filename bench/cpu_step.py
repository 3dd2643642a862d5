"""What one cached decoding forward costs on this CPU against its memory floor, per weight format.

A decoding step of either side is a forward of a few new rows over a KV cache: 1 row for the AR model (and the
DLM's speculative draft), a few for a DLM block. Its floor is reading every weight once: the bytes of the
weights it multiplies, over this machine's read bandwidth (measured here, same threads). Per variant, after a
40-token prompt, the median of `--steps` steps:

  fp32      the default load (`dlm.load`, fp32, the CPU paths it installs)
  bf16      bf16 weights (half the bytes; only pays where the CPU's bf16 matmul is fast for a few rows)
  8bit      LLM.int8 through bitsandbytes (`dlm.load(quantization="8bit")`)
  int8-wo   int8 weight-only through torchao (`Int8WeightOnlyConfig`), when torchao is installed
  compile   fp32 under `torch.compile(dynamic=True)` (only with --compile: it compiles for minutes on a CPU)

and top-1 agreement of its next-token choice with fp32's (teacher-forced on fp32's greedy tokens).

    python -m bench.cpu_step                      # one thread: the app's worker
    python -m bench.cpu_step --threads 2 --compile
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Optional, Sequence

import torch


def read_bandwidth_gbs(mib: int = 1024, repeats: int = 5) -> float:
    """Best-of read bandwidth of this process (a sum over a tensor far larger than the caches), in GB/s."""
    x = torch.ones(mib * 2**20 // 4)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return x.numel() * 4 / best / 1e9


def _nbytes(t: torch.Tensor) -> int:
    """Storage bytes of a tensor, through tensor subclasses (torchao's quantized weights hold int8 data + scales)."""
    if hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(_nbytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def weight_bytes(model) -> int:
    """Bytes a step reads: every parameter except the input embedding table (a step reads one row of it), with
    a head tied to that table counted once."""
    base = model.base
    emb = base.get_input_embeddings().weight
    head = base.get_output_embeddings()
    total = sum(_nbytes(p) for p in base.parameters() if p is not emb)
    total += sum(_nbytes(b) for b in base.buffers() if b.dtype in (torch.int8, torch.uint8))
    if head is not None and head.weight is emb:
        total += _nbytes(emb)
    return total


def time_steps(model, prompt: torch.Tensor, rows: int, steps: int, forced: Optional[list] = None):
    """Median ms of `steps` cached forwards of `rows` new rows, and the 1-row greedy tokens (or, with `forced`,
    the model's top-1 at each forced position)."""
    from dlm.model import _truncate_cache
    base = model.base
    times, tokens = [], []
    with torch.inference_mode():
        out = base(input_ids=prompt, use_cache=True)
        cache = out.cache if hasattr(out, "cache") else out.past_key_values
        nxt = out.logits[:, -1:].argmax(-1)
        tokens.append(int(nxt))
        for i in range(steps):
            feed = nxt if forced is None else torch.tensor([[forced[i]]])
            if rows > 1:
                feed = feed.expand(1, rows).clone()
            t0 = time.perf_counter()
            out = base(input_ids=feed, cache=cache, use_cache=True)
            times.append(time.perf_counter() - t0)
            if rows > 1:
                _truncate_cache(cache, prompt.shape[1] + i)   # keep the cache as a 1-row decode would
                out = base(input_ids=feed[:, :1], cache=cache, use_cache=True)
            nxt = out.logits[:, -1:].argmax(-1)
            tokens.append(int(nxt))
    return 1000 * statistics.median(times), tokens


def main(argv: Optional[Sequence[str]] = None) -> list[dict]:
    p = argparse.ArgumentParser(prog="bench.cpu_step", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--rows", type=int, default=4, help="rows of the multi-row step (a DLM block; the Denoise "
                   "tab's full-canvas step is ~40-70 rows)")
    p.add_argument("--compile", action="store_true", help="also time torch.compile (minutes of compiling)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    import dlm
    gbs = read_bandwidth_gbs()
    prompt = None

    variants = [("fp32", {}), ("bf16", {"dtype": "bfloat16"}), ("8bit", {"quantization": "8bit"})]
    try:
        import torchao  # noqa: F401
        variants.append(("int8-wo", {"torchao": True}))
    except ImportError:
        print("int8-wo skipped: pip install torchao")
    if args.compile:
        variants.append(("compile", {"compile": True}))

    rows, ref = [], None
    for name, opts in variants:
        kw = {"device": "cpu", "dtype": opts.get("dtype", "float32")}
        if "quantization" in opts:
            kw["quantization"] = opts["quantization"]
        try:
            model = dlm.load(args.model, **kw)
        except Exception as e:  # noqa: BLE001 - a variant this machine lacks is reported, not fatal
            print(f"{name} skipped: {type(e).__name__}: {e}")
            continue
        if prompt is None:   # 40 ordinary token ids of this vocabulary, the same for every variant
            v = model.vocab_size
            prompt = torch.randint(min(100, v // 2), min(40000, v), (1, 40), generator=torch.Generator().manual_seed(0))
        if opts.get("torchao"):
            from torchao.quantization import Int8WeightOnlyConfig, quantize_
            quantize_(model.base, Int8WeightOnlyConfig())
        t0 = time.perf_counter()
        if opts.get("compile"):
            model.base.forward = torch.compile(model.base.forward, dynamic=True)
        time_steps(model, prompt, 1, 3)                       # warm-up (compiles, for `compile`)
        time_steps(model, prompt, args.rows, 3)
        warm = time.perf_counter() - t0
        ms1, toks = time_steps(model, prompt, 1, args.steps, forced=None if ref is None else ref[:-1])
        msr, _ = time_steps(model, prompt, args.rows, args.steps, forced=None if ref is None else ref[:-1])
        if ref is None:
            ref = toks
        nbytes = weight_bytes(model)
        floor = nbytes / (gbs * 1e9) * 1000
        agree = sum(a == b for a, b in zip(toks, ref)) / len(ref)
        rows.append({"variant": name, "weights_mb": nbytes / 2**20, "ms_1row": ms1,
                     f"ms_{args.rows}rows": msr, "floor_ms": floor, "x_floor": ms1 / floor,
                     "vs_fp32": ms1 / rows[0]["ms_1row"] if rows else 1.0, "top1_agree": agree, "warmup_s": warm})
        del model
    print(f"# {args.model}: cached forward after a 40-token prompt, median of {args.steps} steps, threads "
          f"{args.threads}; read bandwidth {gbs:.1f} GB/s")
    print(f"| variant | weights MB | ms, 1 row | ms, {args.rows} rows | floor ms | x floor | vs fp32 | top-1 agree | warm-up s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['weights_mb']:.0f} | {r['ms_1row']:.1f} | {r[f'ms_{args.rows}rows']:.1f} | "
              f"{r['floor_ms']:.1f} | {r['x_floor']:.2f} | {r['vs_fp32']:.2f} | {r['top1_agree']:.2f} | "
              f"{r['warmup_s']:.1f} |")
    return rows


if __name__ == "__main__":
    main()
