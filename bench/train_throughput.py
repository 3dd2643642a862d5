"""Training throughput: the diffusion objective (Eq. 7) vs plain causal-LM fine-tuning of the same model, in the
same training loop (`train.loop.train`), same batch, same precision. Target: diffusion overhead <= 5%.

    overhead = tokens/s(ar) / tokens/s(diffusion) - 1

The diffusion step does the same forward/backward as the AR step plus sampling t and the masks, the annealed
attention pattern (only while annealing), the shift of the logits and a cross-entropy over the masked rows.
Each (variant, objective) pair runs `--repeats` times, alternating objectives so that load from other processes
hits both alike; the best run counts (on a shared machine the best run is the least disturbed one). The first
optimizer step of every run (warm-up, allocation, compilation) is excluded from the timing.

    python bench/train_throughput.py                                  # tiny random model (tiny-cpu preset)
    python bench/train_throughput.py --model smollm2-135m --steps 4 --batch-size 4 --seq-len 256 \
        --variants fp32,bf16-autocast,bf16 --lora both
    python -m bench train_throughput ...                              # through the bench aggregator

On a GPU the table adds MFU = 6 * params * tokens/s / peak FLOP/s (peak: --peak-tflops, else a table of known
GPUs; the 6N rule counts matmul FLOPs of a full fine-tune, LoRA rows use 4N: no weight gradients).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

# variant -> (model.dtype, run.mixed_precision)
VARIANTS = {"fp32": ("float32", "no"), "bf16-autocast": ("float32", "bf16"), "bf16": ("bfloat16", "no"),
            "fp16-autocast": ("float32", "fp16")}
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "4090": 165.0}


@dataclass
class Row:
    model: str
    variant: str
    lora: bool
    batch: int
    seq_len: int
    diffusion_tok_s: float
    ar_tok_s: float
    overhead_pct: float
    params_m: float
    trainable_m: float
    mfu_pct: Optional[float] = None


def _preset_overrides(model: str) -> tuple[str, list[str]]:
    """Throughput does not depend on the text, so every model reads the small shipped corpus (no long
    tokenization of a real corpus before the first step)."""
    if model in ("tiny", "tiny-cpu"):
        return "tiny-cpu", []
    return "smollm2-135m", [f"model.source={model}", "data.sources=[train/data/tiny_corpus.txt]",
                            "data.clean=none", "data.eval_fraction=0"]


def run_once(model: str, variant: str, lora: bool, objective: str, steps: int, batch: int, seq_len: int,
             threads: int, workdir: Path, extra: Sequence[str] = ()) -> dict:
    """One short training run through the real loop; returns its summary (tokens/s excludes the first step)."""
    from train.config import load_config
    from train.loop import train
    preset, base = _preset_overrides(model)
    dtype, mp = VARIANTS[variant]
    out = workdir / f"{model.replace('/', '_')}-{variant}-{int(lora)}-{objective}"
    overrides = [*base, f"model.dtype={dtype}", f"run.mixed_precision={mp}", f"lora.enabled={lora}",
                 f"diffusion.objective={objective}", f"run.max_steps={steps}", f"run.batch_size={batch}",
                 f"data.block_size={seq_len}", "run.grad_accum=1", "run.save_every=0", "run.eval_batches=0",
                 "run.export=false", "run.progress=false", f"run.log_every={steps}", f"run.output_dir={out}",
                 "run.tensorboard=false", f"run.threads={threads}", *extra]
    cfg = load_config(preset, overrides)
    try:
        return train(cfg, "pretrain")
    finally:  # this benchmark runs several trainings in one process: each needs a fresh accelerate state
        from accelerate.state import AcceleratorState
        AcceleratorState._reset_state(reset_partial_state=True)


def _count_params(model: str, lora: bool) -> tuple[float, float]:
    """(total, trainable) parameters in millions, from a model built exactly as the loop builds it."""
    from train.config import load_config
    from train.modeling import build_model
    preset, base = _preset_overrides(model)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(preset, [*base, f"lora.enabled={lora}", f"run.output_dir={tmp}"])
        m = build_model(cfg, Path(tmp) / "init-model")
        total = sum(p.numel() for p in m.parameters())
        trainable = sum(p.numel() for p in m.parameters() if p.requires_grad)
    return total / 1e6, trainable / 1e6


def _peak_flops(peak_tflops: Optional[float]) -> Optional[float]:
    if peak_tflops:
        return peak_tflops * 1e12
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(0)
    for key, tflops in PEAK_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    return None


def measure(model: str, variants: Sequence[str], loras: Sequence[bool], steps: int, batch: int, seq_len: int,
            repeats: int, threads: int, peak_tflops: Optional[float] = None) -> list[Row]:
    rows = []
    peak = _peak_flops(peak_tflops)
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        for lora in loras:
            total_m, trainable_m = _count_params(model, lora)
            for variant in variants:
                best = {"diffusion": 0.0, "ar": 0.0}
                for _ in range(repeats):
                    for objective in ("diffusion", "ar"):
                        s = run_once(model, variant, lora, objective, steps, batch, seq_len, threads, Path(tmp))
                        best[objective] = max(best[objective], s["tokens_per_s"] or 0.0)
                mfu = None
                if peak:
                    flops_per_token = (4 if lora else 6) * total_m * 1e6
                    mfu = 100 * flops_per_token * best["diffusion"] / peak
                rows.append(Row(model, variant, lora, batch, seq_len, best["diffusion"], best["ar"],
                                100 * (best["ar"] / best["diffusion"] - 1) if best["diffusion"] else float("nan"),
                                total_m, trainable_m, mfu))
                print(_format([rows[-1]], header=len(rows) == 1), flush=True)
    return rows


def _format(rows: list[Row], header: bool = True) -> str:
    head = (f"{'model':<14} {'variant':<14} {'lora':<5} {'B x L':>9} {'diffusion tok/s':>16} {'AR tok/s':>10} "
            f"{'overhead':>9} {'params':>9} {'trainable':>10} {'MFU':>6}")
    lines = [head, "-" * len(head)] if header else []
    for r in rows:
        mfu = f"{r.mfu_pct:5.1f}%" if r.mfu_pct is not None else "   -  "
        lines.append(f"{r.model:<14} {r.variant:<14} {str(r.lora):<5} {f'{r.batch}x{r.seq_len}':>9} "
                     f"{r.diffusion_tok_s:>16,.0f} {r.ar_tok_s:>10,.0f} {r.overhead_pct:>8.1f}% "
                     f"{r.params_m:>8.1f}M {r.trainable_m:>9.2f}M {mfu:>6}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> list[Row]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny", help="tiny (the tiny-cpu preset) or a model source (smollm2-135m)")
    p.add_argument("--variants", default="fp32", help=f"comma list of {', '.join(VARIANTS)}")
    p.add_argument("--lora", default="off", choices=["off", "on", "both"])
    p.add_argument("--steps", type=int, default=12, help="optimizer steps per run (the first is not timed)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2, help="runs per objective; the best counts")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    p.add_argument("--peak-tflops", type=float, default=None, help="GPU peak for MFU (default: known GPUs)")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    loras = {"off": [False], "on": [True], "both": [False, True]}[args.lora]
    import logging
    logging.basicConfig(level=logging.WARNING)
    rows = measure(args.model, variants, loras, args.steps, args.batch_size, args.seq_len, args.repeats,
                   args.threads, args.peak_tflops)
    print()
    print(_format(rows))
    print("\noverhead = AR tokens/s / diffusion tokens/s - 1 (target <= 5%); first step of each run not timed")
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in rows], indent=1))
    return rows


if __name__ == "__main__":
    main()
