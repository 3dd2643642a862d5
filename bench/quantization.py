"""What quantization costs and gives: full precision vs bitsandbytes 8-bit (LLM.int8) and 4-bit (NF4), one table.

For the DLM (default: the shipped model, a GGUF base + LoRA adapter) and its AR twin, per setting:
  modules    bitsandbytes layers in the model (all linears but the output head)
  MB         `get_memory_footprint()` of the weights
  load s     time of `dlm.load` (the GGUF conversion is cached before the first row)
  rel.err    ||logits - logits_full|| / ||logits_full|| of the DLM's full-attention logits on held-out text
  top-1      share of positions whose most likely token is the full-precision one
  DLM tok/s  the DLM's recommended decoder, `--new-tokens` tokens after each prompt, per second of model time
  AR tok/s   the AR twin with Hugging Face generate and its KV cache, same prompts and length

    python -m bench.quantization                      # CPU, the shipped default, 4 prompts x 32 tokens
    python -m bench.quantization --device cuda --new-tokens 128
"""
from __future__ import annotations

import argparse
import time
from typing import Optional, Sequence

import torch

from bench.load_args import add_load_args, load_kwargs

TEXT = ("The old fisherman walked down to the sea every morning before sunrise. He cast his nets in the grey light, "
        "and by the time the sun stood over the hills he had filled his basket and turned for home.")
PROMPTS = ("Once upon a time", "The history of the city begins", "She opened the letter and", "In the morning we")


def measure(name: str, ar_name: Optional[str], quantization: str, args,
            reference_logits: Optional[torch.Tensor]) -> dict:
    import dlm
    from dlm.loading import quantized_modules
    args.quantization = quantization
    t0 = time.perf_counter()
    model = dlm.load(name, **load_kwargs(args))
    load_s = time.perf_counter() - t0
    ar = dlm.load(ar_name or model.ar_counterpart or name, **load_kwargs(args))
    base = model.base.get_base_model() if hasattr(model.base, "get_base_model") else model.base
    ids = model.tokenizer(TEXT, return_tensors="pt").input_ids.to(model.device)
    with torch.no_grad():
        logits = model.denoise_logits(ids).float().cpu()[0, model.first_predictable:]
    row = {"quantization": quantization, "modules": sum(quantized_modules(base).values()),
           "mb": base.get_memory_footprint() / 2**20, "load_s": load_s, "logits": logits}
    if reference_logits is not None:
        row["rel_err"] = ((logits - reference_logits).norm() / reference_logits.norm()).item()
        row["top1"] = (logits.argmax(-1) == reference_logits.argmax(-1)).float().mean().item()
    for side, m, call in (("dlm", model, model.generate), ("ar", ar, ar.ar_generate)):
        call(PROMPTS[0], max_new_tokens=4, seed=0)   # warm-up: kernels, caches
        tokens = seconds = 0.0
        for i, prompt in enumerate(PROMPTS[:args.n]):
            g = call(prompt, max_new_tokens=args.new_tokens, seed=i)
            tokens, seconds = tokens + len(g.token_ids), seconds + g.seconds
        row[f"{side}_tok_s"] = tokens / seconds if seconds else float("nan")
    return row


def format_table(rows: list[dict]) -> str:
    lines = ["| quantization | modules | MB | load s | rel.err | top-1 | DLM tok/s | AR tok/s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['quantization']} | {r['modules']} | {r['mb']:.0f} | {r['load_s']:.1f} | "
                     f"{r.get('rel_err', 0.0):.3f} | {r.get('top1', 1.0):.3f} | {r['dlm_tok_s']:.1f} | "
                     f"{r['ar_tok_s']:.1f} |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> list[dict]:
    p = argparse.ArgumentParser(prog="python -m bench.quantization", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-dlm")
    p.add_argument("--ar-model", default=None, help="default: the model's registered AR counterpart")
    p.add_argument("--settings", default="none,8bit,4bit", help="comma list of quantizations to compare")
    p.add_argument("--n", type=int, default=4, help="prompts per speed measurement (at most 4)")
    p.add_argument("--new-tokens", type=int, default=32)
    add_load_args(p, device="cpu")
    args = p.parse_args(argv)
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    print(f"# {args.model} (AR twin {args.ar_model or 'its counterpart'}) on {args.device}, "
          f"threads {torch.get_num_threads()}", flush=True)
    rows, reference = [], None
    for q in (["none"] if "none" not in settings else []) + settings:
        row = measure(args.model, args.ar_model, q, args, reference)
        reference = row["logits"] if q == "none" else reference
        if q in settings:
            rows.append(row)
            print(format_table([row]).splitlines()[-1], flush=True)
    print(format_table(rows))
    return rows


if __name__ == "__main__":
    main()
