"""The paper's Fig. 4 at its own scale: decoding time of a LLaMA-2-7B-shaped model, AR with a KV cache vs the
DLM's full-attention decoder, plus what the block decoders pay per forward and the attention kernels.

Time does not depend on the weights, so the model is random (LLaMA-2-7B's shape: 32 layers, width 4096, MLP
11008, 32 heads; SmolLM2's tokenizer, so the vocabulary is 49,153 rows instead of 32,000: ~1% more compute).
Rows, in priority order, until `--budget-s` is spent (whatever is measured by then is written):
  decode    AR (HF generate, KV cache, `L` tokens, EOS suppressed) and DLM (decoder "full", `--steps` steps) at each
            length: seconds, tokens/s, peak GPU memory
  rows      one forward of q = 1/2/4/8/32 query rows over a `--cache-len` token KV cache (what the blocks and
            speculative decoders pay per step), ms
  attention one full-attention forward of `--attn-len` tokens with sdpa / eager / flash_attention_2 (when
            importable), ms
  4bit      the decode rows again with bitsandbytes NF4 weights (saved, then loaded through dlm.load)
The paper (its Fig. 4, FlashAttention 2, A100): DiffuLLaMA 13.3 s vs LLaMA 17.5 s for 1,024 tokens.

    python -m bench.fig4 --out runs/fig4.json                     # on a GPU: the 7B shape
    python -m bench.fig4 --shape tiny --device cpu --budget-s 30  # the same rows on a tiny shape (dry run)
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from bench.output import write_json

SHAPES = {
    "llama-2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, max_position_embeddings=4096),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, max_position_embeddings=4096),
}
PROMPT = "The history of the city begins"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_gb(device: torch.device) -> Optional[float]:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def build(shape: str, device: torch.device, dtype: torch.dtype, attn: str = "sdpa"):
    """A random-weight DiffusionLM of `shape` with the shipped tokenizer (mask token added, as dlm.load does)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from dlm.dlm_config import DLMConfig
    from dlm.model import DiffusionLM
    from dlm.model_registry import asset_dir
    tokenizer = AutoTokenizer.from_pretrained(asset_dir("smollm2-135m-dlm"))
    mask_id = tokenizer.convert_tokens_to_ids(tokenizer.mask_token) if tokenizer.mask_token else len(tokenizer) - 1
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False, **SHAPES[shape])
    config._attn_implementation = attn
    torch.manual_seed(0)
    with torch.device(device):
        base = LlamaForCausalLM(config).to(dtype).eval()
    return DiffusionLM(base, tokenizer, DLMConfig(mask_token_id=int(mask_id), base_family="llama", adapted=True),
                       name=f"random {shape}")


def decode_rows(model, lengths: Sequence[int], steps: int, label: str, deadline: float) -> list[dict]:
    rows = []
    for L in lengths:
        for side in ("ar", "dlm"):
            if time.monotonic() > deadline:
                return rows
            if model.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(model.device)
            call: Callable = model.ar_generate if side == "ar" else model.generate
            kwargs = dict(max_new_tokens=L, suppress_eos=True, seed=0)
            if side == "dlm":
                kwargs.update(decoder="full", steps=min(steps, L))
            g = call(PROMPT, **kwargs)
            rows.append({"row": "decode", "model": label, "side": side, "tokens": L, "new": len(g.token_ids),
                         "steps": g.nfe, "seconds": g.seconds, "tokens_per_s": len(g.token_ids) / g.seconds,
                         "peak_gb": _peak_gb(model.device)})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def forward_rows(model, cache_len: int, queries: Sequence[int], repeats: int, deadline: float) -> list[dict]:
    """One forward of q rows over a fixed KV cache (cropped back after each call, so every call sees the same)."""
    from transformers import DynamicCache
    device = model.device
    ids = torch.randint(100, 1000, (1, cache_len + max(queries)), device=device)
    cache = DynamicCache()
    with torch.inference_mode():
        model.base(input_ids=ids[:, :cache_len], past_key_values=cache, use_cache=True)
        rows = []
        for q in queries:
            if time.monotonic() > deadline:
                break
            times = []
            for _ in range(repeats + 1):   # the first call warms up
                _sync(device)
                t0 = time.perf_counter()
                model.base(input_ids=ids[:, cache_len:cache_len + q], past_key_values=cache, use_cache=True)
                _sync(device)
                times.append(time.perf_counter() - t0)
                cache.crop(-q)   # drop the q rows just appended (transformers 5: a negative count)
            median = sorted(times[1:])[len(times[1:]) // 2]
            rows.append({"row": "rows", "q": q, "cache": cache_len, "ms": 1000 * median})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def attention_rows(model, length: int, repeats: int, deadline: float) -> list[dict]:
    import importlib.util
    impls = ["sdpa", "eager"] + (["flash_attention_2"] if model.device.type == "cuda"
                                 and importlib.util.find_spec("flash_attn") else [])
    ids = torch.randint(100, 1000, (1, length), device=model.device)
    rows = []
    for impl in impls:
        if time.monotonic() > deadline:
            break
        model.base.set_attn_implementation(impl)
        times = []
        with torch.inference_mode():
            for _ in range(repeats + 1):
                _sync(model.device)
                t0 = time.perf_counter()
                model.denoise_logits(ids)
                _sync(model.device)
                times.append(time.perf_counter() - t0)
        rows.append({"row": "attention", "impl": impl, "tokens": length,
                     "ms": 1000 * sorted(times[1:])[len(times[1:]) // 2], "peak_gb": _peak_gb(model.device)})
        print(json.dumps(rows[-1]), flush=True)
    model.base.set_attn_implementation("sdpa")
    return rows


def quantized_model(model, quantization: str):
    """The same random weights through the user's path: saved as safetensors, loaded by dlm.load quantized."""
    import dlm
    tmp = Path(tempfile.mkdtemp(prefix="fig4-"))
    model.base.save_pretrained(tmp, safe_serialization=True)
    model.tokenizer.save_pretrained(tmp)
    return dlm.load(tmp, device=model.device, dtype=model.dtype, quantization=quantization,
                    mask_token_id=model.mask_token_id)


def main(argv: Optional[Sequence[str]] = None) -> list[dict]:
    p = argparse.ArgumentParser(prog="python -m bench.fig4", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama-2-7b")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--lengths", default="512,1024,2048")
    p.add_argument("--steps", type=int, default=256, help="DLM diffusion steps per length (at most the length)")
    p.add_argument("--cache-len", type=int, default=1024)
    p.add_argument("--queries", default="1,2,4,8,32")
    p.add_argument("--attn-len", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--quantized", default="4bit", help="comma list of quantizations for the last rows ('' = none)")
    p.add_argument("--budget-s", type=float, default=120.0, help="stop starting new rows after this long")
    p.add_argument("--out", type=Path, default=None, help="write every row as JSON")
    args = p.parse_args(argv)
    from transformers.utils import logging as hf_logging

    from dlm.loading import resolve_device, resolve_dtype
    hf_logging.set_verbosity_error()
    deadline = time.monotonic() + args.budget_s
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    lengths = [int(x) for x in args.lengths.split(",") if x.strip()]
    t0 = time.perf_counter()
    model = build(args.shape, device, dtype)
    rows: list[dict] = [{"row": "setup", "shape": args.shape, "device": str(device), "dtype": str(dtype),
                         "params_b": sum(p.numel() for p in model.base.parameters()) / 1e9,
                         "build_s": time.perf_counter() - t0, "steps": args.steps,
                         "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}]
    print(json.dumps(rows[0]), flush=True)
    rows += decode_rows(model, lengths[:2], args.steps, "bf16" if dtype == torch.bfloat16 else str(dtype), deadline)
    rows += forward_rows(model, args.cache_len, [int(q) for q in args.queries.split(",")], args.repeats, deadline)
    rows += attention_rows(model, args.attn_len, args.repeats, deadline)
    rows += decode_rows(model, lengths[2:], args.steps, str(dtype).split(".")[-1], deadline)
    for q in [q.strip() for q in args.quantized.split(",") if q.strip()]:
        if time.monotonic() > deadline:
            break
        model = quantized_model(model, q)
        rows += decode_rows(model, lengths[:2], args.steps, q, deadline)
        if time.monotonic() < deadline:   # the playground's first frame: the first Frame of a stream
            t1 = time.perf_counter()
            next(iter(model.stream(PROMPT, max_new_tokens=64, decoder="full", steps=64)))
            rows.append({"row": "first_frame", "model": q, "seconds": time.perf_counter() - t1})
    write_json(args.out, rows)
    print(format_table(rows))
    return rows


def format_table(rows: list[dict]) -> str:
    lines = ["| row | setting | tokens | seconds / ms | tokens/s | peak GB |", "|---|---|---|---|---|---|"]
    for r in rows:
        if r["row"] == "decode":
            lines.append(f"| decode | {r['model']} {r['side']} (steps {r['steps']}) | {r['tokens']} | "
                         f"{r['seconds']:.2f} s | {r['tokens_per_s']:.1f} | {r['peak_gb'] or '-'} |")
        elif r["row"] == "rows":
            lines.append(f"| forward | {r['q']} rows over {r['cache']} cached | {r['q']} | {r['ms']:.2f} ms | - | - |")
        elif r["row"] == "attention":
            lines.append(f"| attention | {r['impl']} | {r['tokens']} | {r['ms']:.2f} ms | - | {r['peak_gb'] or '-'} |")
        elif r["row"] == "first_frame":
            lines.append(f"| first frame | {r['model']} | 64 | {r['seconds']:.2f} s | - | - |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
