"""Which setting should the playground's Denoise tab open on? Candidates that show what a diffusion LM does
(several tokens revealed per step, out of left-to-right order) against the model's fast writing default
(speculative), on the held-out prompts of `bench.continuation`, one table.

Per setting, over the same prompts and seeds (temperature 0.7, top-p 0.95, as `bench.continuation`):
  judge-PPL     perplexity of the continuations under the AR twin (corpus level; lower = more fluent)
  distinct-2    unique word bigrams / bigrams, mean over outputs (higher = more varied)
  tok/step      useful tokens per denoising step (> 1: tokens revealed in parallel)
  out of order  share of revealed tokens decided while an earlier generated position was still masked
  in parallel   share of tokens decided at a step that decided two or more (several tokens per forward)
  tok/s         useful tokens per second of model time
The AR twin is one reference row.

    python -m bench.denoise_default --n 8 --new-tokens 32
    python -m bench.denoise_default --candidate "decoder=full,block_length=0,steps=16"   # replace the candidates
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from bench.continuation import Side, load_prompts, useful_tokens
from bench.load_args import add_load_args, load_kwargs
from bench.output import write_json
from dlm.quality import judge_nll
from dlm.types import Frame, Generation

# name -> SamplerConfig changes on the model's writing config ({n} = the number of new tokens); the first is the
# model's own default, the others the candidates for the first screen.
CANDIDATES = {
    "speculative (writing default)": {},
    "speculative, blocks of 4": dict(decoder="speculative", block_length=4, threshold=None),
    "speculative, blocks of 8": dict(decoder="speculative", block_length=8, threshold=None),
    "full, one block, 2 tok/step": dict(decoder="full", block_length=None, steps="{half}", threshold=None),
    "full, blocks of 8, 2 tok/step": dict(decoder="full", block_length=8, steps="{half}", threshold=None),
    "blocks of 8, 2 tok/step": dict(decoder="blocks", block_length=8, steps="{half}", threshold=None),
}


def out_of_order(frames: list[Frame], mask_id: int) -> tuple[int, int]:
    """(revealed tokens decided while an earlier generated position was still masked, revealed tokens)."""
    late = total = 0
    for f in frames:
        if not f.revealed:
            continue
        masked = [i for i in range(f.start, len(f.tokens)) if f.tokens[i] == mask_id]
        first_masked = min(masked) if masked else len(f.tokens)
        late += sum(1 for p in f.revealed if p > first_masked)
        total += len(f.revealed)
    return late, total


def in_parallel(frames: list[Frame]) -> int:
    """Tokens decided at a step that decided two or more."""
    return sum(len(f.revealed) for f in frames if len(f.revealed) >= 2)


def measure(model, judge, prompts: Sequence[str], cfg, seed: int) -> dict:
    side, steps, late, revealed, parallel = Side(cfg.decoder, [], []), 0, 0, 0, 0
    for i, prompt in enumerate(prompts):
        frames, g = [], None
        for item in model.stream(prompt, cfg.replace(seed=seed * 1_000_003 + i)):
            if isinstance(item, Generation):
                g = item
            else:
                frames.append(item)
        a, b = out_of_order(frames, model.mask_token_id)
        late, revealed, parallel = late + a, revealed + b, parallel + in_parallel(frames)
        add(side, judge, prompt, g, model)
        steps += g.nfe
    return dict(side.summary(), tokens_per_step=side.tokens / max(1, steps), out_of_order=late / max(1, revealed),
                in_parallel=parallel / max(1, revealed), samples=side.texts)


def add(side: Side, judge, prompt: str, g: Generation, model) -> None:
    """One continuation into a side's totals (`bench.continuation.Side`), judged as `bench.continuation` does."""
    side.texts.append(g.text)
    side.nlls.append(judge_nll(judge, prompt, g.text))
    side.tokens += useful_tokens(g.token_ids, model.eos_token_ids)
    side.seconds += g.seconds


def format_table(rows: dict) -> str:
    lines = ["| setting | judge-PPL | distinct-2 | tok/step | in parallel | out of order | tok/s |",
             "|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['judge_ppl']:.1f} | {r['distinct2']:.3f} | {r['tokens_per_step']:.2f} | "
                     f"{100 * r.get('in_parallel', 0.0):.0f}% | {100 * r['out_of_order']:.0f}% | "
                     f"{r['tokens_per_s']:.1f} |")
    return "\n".join(lines)


def parse_candidate(text: str) -> tuple[str, dict]:
    pairs = dict(item.split("=", 1) for item in text.split(",") if "=" in item)
    return text, {k: (None if v in ("0", "none") and k in ("block_length", "threshold") else v)
                  for k, v in pairs.items()}


def main(argv: Optional[Sequence[str]] = None) -> dict:
    p = argparse.ArgumentParser(prog="bench.denoise_default", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--model", default="smollm2-135m-dlm")
    p.add_argument("--n", type=int, default=8, help="held-out prompts (half Gutenberg, half ROCStories)")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--candidate", action="append", default=[], metavar="FIELD=VALUE,...",
                   help="a setting to compare instead of the built-in candidates (repeatable)")
    p.add_argument("--data-dir", type=Path, default=None)
    add_load_args(p, device="cpu")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)

    import dlm
    from evals.data import default_data_dir
    model = dlm.load(args.model, **load_kwargs(args))
    ar = dlm.load(model.ar_counterpart, **load_kwargs(args))
    prompts = load_prompts(args.data_dir or default_data_dir(), args.n)
    base = model.sampler_config.replace(max_new_tokens=args.new_tokens, temperature=0.7, top_p=0.95)
    candidates = dict(parse_candidate(c) for c in args.candidate) if args.candidate else CANDIDATES
    print(f"# {args.model}: {len(prompts)} held-out prompts x {args.new_tokens} tokens, T=0.7, top-p 0.95, "
          f"threads {torch.get_num_threads()}", flush=True)
    model.generate(prompts[0], base, max_new_tokens=4)  # warm-up
    rows, t0 = {}, time.perf_counter()
    for name, changes in candidates.items():
        values = {k: (v.format(half=args.new_tokens // 2) if isinstance(v, str) else v) for k, v in changes.items()}
        cfg = dlm.SamplerConfig.from_dict({**base.to_dict(), **values})
        rows[name] = measure(model, ar, prompts, cfg, args.seed)
        print(f"# {name}: {time.perf_counter() - t0:.0f} s", flush=True)
    ar_side = Side(ar.name, [], [])
    for i, prompt in enumerate(prompts):
        add(ar_side, ar, prompt, model.ar_generate(prompt, base.replace(seed=args.seed * 1_000_003 + i), ar_model=ar),
            ar)
    rows[f"AR twin ({ar.name})"] = dict(ar_side.summary(), tokens_per_step=1.0, out_of_order=0.0, in_parallel=0.0,
                                        samples=ar_side.texts)
    print(format_table(rows))
    write_json(args.out, rows)
    return rows


if __name__ == "__main__":
    main()
