"""What one cached decoding forward costs on this CPU against its memory floor, per weight format.

A decoding step of either side is a forward of a few new rows over a KV cache: 1 row for the AR model (and the
DLM's speculative draft), a few for a DLM block. Its floor is reading every weight once: the bytes of the
weights it multiplies, over this machine's read bandwidth (measured here, same threads). Per variant, after a
40-token prompt, the median of `--steps` steps for 1 row and for each of `--rows`:

  fp32      full precision (`dlm.load(quantization=None)`, fp32, the CPU paths it installs)
  bf16      bf16 weights (half the bytes; only pays where the CPU's bf16 matmul is fast for a few rows)
  8bit      LLM.int8 through bitsandbytes (`dlm.load(quantization="8bit")`)
  int8      dlm's packed int8 (`quantization="int8"`: blocks of 32, fp16 scales, GGUF Q8_0's layout)
  int4      dlm's packed int4 (`quantization="int4"`: blocks of 32, fp16 scale + minimum, GGUF Q4_1's; head int8)
            (an adapter model's LoRA stays unmerged on the packed base, fp32, in int8 and int4 alike)
  int8-wo   int8 weight-only through torchao (`Int8WeightOnlyConfig`), when torchao is installed
  compile   fp32 under `torch.compile(dynamic=True)` (only with --compile: it compiles for minutes on a CPU)

All variants are loaded first and timed in interleaved rounds (`--rounds`), so a busy moment of a shared machine hits
them alike. Quality against fp32, teacher-forced on fp32's greedy tokens: top-1 agreement of the next-token choice
and the relative logit error ||logits - fp32|| / ||fp32|| at each step.

    python -m bench.cpu_step                      # one thread: the app's worker
    python -m bench.cpu_step --threads 2 --variants fp32,int8,int4 --rows 4,8
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Optional, Sequence

import torch

VARIANTS = {"fp32": {}, "bf16": {"dtype": "bfloat16"}, "8bit": {"quantization": "8bit"},
            "int8": {"quantization": "int8"}, "int4": {"quantization": "int4"},
            "int8-wo": {"torchao": True},
            "compile": {"compile": True}}


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
    """Bytes a step reads: every parameter except the input embedding table (a step reads one row of it), the
    packed layers' buffers (dlm.packed_linear: weights, scales, bias) and bitsandbytes' int8 buffers, with a head
    tied to that table counted once."""
    from dlm.packed_linear import PackedLinear
    base = model.base
    emb = base.get_input_embeddings().weight
    head = base.get_output_embeddings()
    total = sum(_nbytes(p) for p in base.parameters() if p is not emb)
    total += sum(_nbytes(b) for b in base.buffers() if b.dtype in (torch.int8, torch.uint8))
    total += sum(_nbytes(b) for m in base.modules() if isinstance(m, PackedLinear)
                 for b in m.buffers(recurse=False) if b.dtype not in (torch.int8, torch.uint8))
    if head is not None and not isinstance(head, PackedLinear) and head.weight is emb:
        total += _nbytes(emb)
    return total


CLOCK = time.perf_counter   # --clock thread: this thread's CPU time (one thread only; ignores time the OS gave others)


def time_steps(model, prompt: torch.Tensor, rows: int, steps: int, forced: Optional[list] = None):
    """Per-step seconds of `steps` cached forwards of `rows` new rows, the 1-row greedy tokens (or, with `forced`,
    the model's top-1 at each forced position) and the last-position logits of each 1-row step."""
    from dlm.model import _truncate_cache
    base = model.base
    times, tokens, logits = [], [], []
    with torch.inference_mode():
        out = base(input_ids=prompt, use_cache=True)
        cache = out.cache if hasattr(out, "cache") else out.past_key_values
        nxt = out.logits[:, -1:].argmax(-1)
        tokens.append(int(nxt))
        logits.append(out.logits[0, -1].float())
        for i in range(steps):
            feed = nxt if forced is None else torch.tensor([[forced[i]]])
            if rows > 1:
                feed = feed.expand(1, rows).clone()
            t0 = CLOCK()
            out = base(input_ids=feed, cache=cache, use_cache=True)
            times.append(CLOCK() - t0)
            if rows > 1:
                _truncate_cache(cache, prompt.shape[1] + i)   # keep the cache as a 1-row decode would
                out = base(input_ids=feed[:, :1], cache=cache, use_cache=True)
            nxt = out.logits[:, -1:].argmax(-1)
            tokens.append(int(nxt))
            logits.append(out.logits[0, -1].float())
    return times, tokens, logits


def main(argv: Optional[Sequence[str]] = None) -> list[dict]:
    p = argparse.ArgumentParser(prog="bench.cpu_step", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--rounds", type=int, default=4, help="interleaved rounds the steps are split into")
    p.add_argument("--rows", default="4", help="rows of the multi-row steps, comma-separated (a DLM block: 2-8; "
                   "the Denoise tab's full-canvas step is ~40-70 rows)")
    p.add_argument("--variants", default="fp32,bf16,8bit,int8,int4,int8-wo",
                   help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--compile", action="store_true", help="also time torch.compile (minutes of compiling)")
    p.add_argument("--clock", choices=("wall", "thread"), default="wall", help="thread: the step's CPU time in this "
                   "thread (with --threads 1: steadier on a machine shared with other jobs)")
    args = p.parse_args(argv)
    global CLOCK
    CLOCK = time.thread_time if args.clock == "thread" else time.perf_counter
    if args.clock == "thread" and args.threads != 1:
        p.error("--clock thread needs --threads 1")
    torch.set_num_threads(args.threads)
    import dlm
    gbs = read_bandwidth_gbs()
    multi = [int(r) for r in str(args.rows).split(",") if r.strip()]
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    if args.compile and "compile" not in names:
        names.append("compile")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    if "fp32" in names:
        names.remove("fp32")
    names.insert(0, "fp32")   # the reference comes first

    models, prompt = {}, None
    for name in names:
        opts = VARIANTS[name]
        kw = {"device": "cpu", "dtype": opts.get("dtype", "float32"), "quantization": opts.get("quantization")}
        if opts.get("torchao"):
            try:
                import torchao  # noqa: F401
            except ImportError:
                print(f"{name} skipped: pip install torchao")
                continue
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
        time_steps(model, prompt, 1, 3)                       # warm-up (compiles, for `compile`; builds kernels)
        for r in multi:
            time_steps(model, prompt, r, 2)
        models[name] = (model, time.perf_counter() - t0)

    # fp32's greedy tokens; every variant teacher-forced on them (quality), then timed in interleaved rounds
    _, ref_tokens, _ = time_steps(models["fp32"][0], prompt, 1, args.steps)
    forced = ref_tokens[:-1]
    quality = {name: time_steps(model, prompt, 1, args.steps, forced=forced)[1:] for name, (model, _) in models.items()}
    per_round = max(1, args.steps // max(1, args.rounds))
    times: dict = {(n, r): [] for n in models for r in [1, *multi]}
    for start in range(0, args.steps, per_round):
        k = min(per_round, args.steps - start)
        for name, (model, _) in models.items():
            for r in [1, *multi]:
                times[(name, r)].extend(time_steps(model, prompt, r, k, forced=forced)[0])
    ref_toks, ref_logits = quality["fp32"]
    rows = []
    for name, (model, warm) in models.items():
        nbytes = weight_bytes(model)
        floor = nbytes / (gbs * 1e9) * 1000
        toks, logits = quality[name]
        agree = sum(a == b for a, b in zip(toks, ref_toks)) / len(ref_toks)
        errs = [((lg - rl).norm() / rl.norm()).item() for lg, rl in zip(logits, ref_logits)]
        row = {"variant": name, "weights_mb": nbytes / 2**20, "ms_1row": 1000 * statistics.median(times[(name, 1)]),
               "floor_ms": floor, "top1_agree": agree, "logit_rel_err": statistics.mean(errs), "warmup_s": warm}
        for r in multi:
            row[f"ms_{r}rows"] = 1000 * statistics.median(times[(name, r)])
        row["x_floor"] = row["ms_1row"] / floor
        rows.append(row)
    for row in rows:
        row["vs_fp32"] = row["ms_1row"] / rows[0]["ms_1row"]
    print(f"# {args.model}: cached forward after a 40-token prompt, median of {args.steps} steps in {args.rounds} "
          f"interleaved rounds, threads {args.threads}, {args.clock} clock; read bandwidth {gbs:.1f} GB/s; CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}")
    cols = " | ".join(f"ms, {r} rows (x floor)" for r in multi)
    print(f"| variant | weights MB | ms, 1 row (x floor) | {cols} | floor ms | vs fp32 | top-1 agree | logit err | "
          "warm-up s |")
    print("|---" * (8 + len(multi)) + "|")
    for r in rows:
        multi_cells = " | ".join(f"{r[f'ms_{m}rows']:.1f} ({r[f'ms_{m}rows'] / r['floor_ms']:.2f})" for m in multi)
        print(f"| {r['variant']} | {r['weights_mb']:.0f} | {r['ms_1row']:.1f} ({r['x_floor']:.2f}) | {multi_cells} | "
              f"{r['floor_ms']:.1f} | {r['vs_fp32']:.2f} | {r['top1_agree']:.2f} | {r['logit_rel_err']:.4f} | "
              f"{r['warmup_s']:.1f} |")
    return rows


if __name__ == "__main__":
    main()
