"""The model-loading flags every benchmark shares (device, dtype, quantization, attention), in one place.

The judge of a quality metric is always loaded at full precision: quantizing it would move the yardstick."""
from __future__ import annotations

import argparse

from dlm.load_options import ATTN_IMPLEMENTATIONS, QUANTIZATIONS


def add_load_args(p: argparse.ArgumentParser, device: str = "auto") -> None:
    p.add_argument("--device", default=device)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--quantization", choices=QUANTIZATIONS, default="auto",
                   help="weights of the DLM and its AR twin (dlm.load's: auto = int4 on a CPU where exact); the judge "
                        "stays full precision")
    p.add_argument("--attn-implementation", default="auto",
                   choices=ATTN_IMPLEMENTATIONS,
                   help="attention kernel (flash_attention_2 falls back to sdpa without CUDA / flash-attn)")


def load_kwargs(args: argparse.Namespace, *, judge: bool = False) -> dict:
    """`dlm.load` keyword arguments from the flags; `judge=True` loads at full precision."""
    return dict(device=args.device, dtype=args.dtype, attn_implementation=args.attn_implementation,
                quantization=None if judge or args.quantization == "none" else args.quantization)
