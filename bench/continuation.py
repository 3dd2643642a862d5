"""Does the DLM write? Held-out prompts continued by the diffusion LM and by its AR twin, in one run, one table.

For each prompt (the openings of held-out Gutenberg paragraphs, from the books DiffuSmol's training holds out, and
ROCStories openings), both models continue it by `--new-tokens` tokens with the same sampling (default
temperature 0.7, top-p 0.95, one seed per prompt):
  DLM  its own recommended decoding (`model.sampler_config`, e.g. block diffusion with the exact cache + threshold)
  AR   the AR twin with Hugging Face `generate` and its KV cache
and the table reports, per model:
  judge-PPL   perplexity of the continuations under the AR base (the judge), corpus level (lower = more fluent)
  distinct-2  unique word bigrams / bigrams, mean over outputs (higher = more varied)
  loops       share of outputs that repeat some word 3-gram 3+ times
  tok/s       useful new tokens (up to and including EOS) per second of model time; "speed" = DLM / AR
With --accuracy it also scores the full-attention mode on held-out Gutenberg blocks: masked-token accuracy at 15%
masking (DLM) against the AR base's next-token accuracy on the same text.

    python -m bench.continuation                          # default model vs its AR twin, 24 prompts x 48 tokens
    python -m bench.continuation --n 12 --accuracy --out runs/bench/continuation.json
"""
from __future__ import annotations

import argparse
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from bench.load_args import add_load_args, load_kwargs
from bench.output import write_json
from dlm.generation import cut_at_eos
from dlm.quality import corpus_ppl, distinct_n, has_loop, judge_nll, ppl_ratio_interval
from train.documents import HELDOUT_BOOKS  # noqa: F401  (re-exported: the books DiffuSmol's training holds out)

GOALS = "fluent: judge-PPL <= 2x AR | varied: distinct-2 >= 0.8x AR, loops <= AR + 15 pts | fast: speed >= 1.0x"


@dataclass
class Side:
    """One model's outputs over all prompts."""

    name: str
    texts: list
    nlls: list
    tokens: int = 0
    seconds: float = 0.0

    def summary(self) -> dict:
        d2 = [v for v in (distinct_n(t) for t in self.texts) if not math.isnan(v)]
        return {"model": self.name, "judge_ppl": corpus_ppl(self.nlls),
                "distinct2": sum(d2) / len(d2) if d2 else float("nan"),
                "loops": sum(has_loop(t) for t in self.texts) / max(1, len(self.texts)),
                "tokens": self.tokens, "seconds": self.seconds,
                "tokens_per_s": self.tokens / self.seconds if self.seconds else float("nan")}


def load_prompts(data_dir: Path, n: int, words: int = 32, dev: bool = False) -> list[str]:
    """n prompts: half the first `words` words of held-out Gutenberg paragraphs, half ROCStories openings (the
    first two sentences), picked evenly through each source so the set is fixed for a given n. `dev` picks the
    items halfway between those (a disjoint set for choosing decoder settings, so the reported run stays unseen)."""
    from evals import data as D
    paras: list[str] = []
    for book in HELDOUT_BOOKS:
        try:
            paras += [p.text for p in D.heldout_paragraphs(data_dir, book, min_words=words + 20)]
        except FileNotFoundError:
            continue
    stories = [f"{s.prefix}".strip() for s in D.load_rocstories(data_dir)]
    half = n // 2
    shift = 0.5 if dev else 0.0
    def pick(items, k):
        return [items[int((i + shift) * len(items) / k)] for i in range(k)] if k and items else []
    gutenberg = [" ".join(p.split()[:words]) for p in pick(paras, n - half)]
    return gutenberg + pick(stories, half)


def useful_tokens(token_ids: Sequence[int], eos_ids: Sequence[int]) -> int:
    """New tokens up to and including the first EOS (what a reader gets; later ones are padding work)."""
    kept = cut_at_eos(token_ids, eos_ids)
    return len(kept) + (1 if len(kept) < len(token_ids) else 0)


def run(model, ar_model, judge, prompts: Sequence[str], new_tokens: int = 48, temperature: float = 0.7,
        top_p: float = 0.95, seed: int = 0, log=print) -> dict:
    """Continue every prompt with both models; returns {"dlm": summary, "ar": summary, "speed": ratio, ...}."""
    cfg = model.sampler_config.replace(max_new_tokens=new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                                       suppress_eos=False)
    model.generate(prompts[0], cfg, max_new_tokens=4)                   # warm-up (allocations, kernels)
    model.ar_generate(prompts[0], cfg, max_new_tokens=4, ar_model=ar_model)
    dlm_side, ar_side = Side(model.name, [], []), Side(ar_model.name, [], [])
    samples = []
    for i, prompt in enumerate(prompts):
        c = cfg.replace(seed=seed * 1_000_003 + i)
        d = model.generate(prompt, c)
        a = model.ar_generate(prompt, c, ar_model=ar_model)
        for side, g, m in ((dlm_side, d, model), (ar_side, a, ar_model)):
            side.texts.append(g.text)
            side.nlls.append(judge_nll(judge, prompt, g.text))
            side.tokens += useful_tokens(g.token_ids, m.eos_token_ids)
            side.seconds += g.seconds
        samples.append({"prompt": prompt, "dlm": d.text, "ar": a.text, "dlm_nfe": d.nfe,
                        "dlm_tokens": useful_tokens(d.token_ids, model.eos_token_ids)})
        log(f"[{i + 1}/{len(prompts)}] DLM {d.nfe:>3} nfe {d.seconds:6.2f}s | AR {a.seconds:6.2f}s | "
            f"{_clip(d.text)!r}")
    out = {"dlm": dlm_side.summary(), "ar": ar_side.summary(), "config": cfg.to_dict(), "n": len(prompts),
           "new_tokens": new_tokens, "samples": samples}
    out["speed"] = out["dlm"]["tokens_per_s"] / out["ar"]["tokens_per_s"]
    out["tokens_per_step"] = dlm_side.tokens / max(1, sum(s["dlm_nfe"] for s in samples))
    out["ppl_ratio"] = ppl_ratio_interval(dlm_side.nlls, ar_side.nlls, seed=seed)   # paired by prompt
    out["identical"] = sum(s["dlm"] == s["ar"] for s in samples)
    return out


@torch.no_grad()
def heldout_accuracy(model, ar_model, data_dir: Path, n_blocks: int = 16, block: int = 128, seed: int = 0,
                     mask_ratio: float = 0.15) -> dict:
    """Full-attention masked-token accuracy (DLM, `mask_ratio` of each block masked) and the AR base's next-token
    accuracy on the same held-out Gutenberg blocks; also the block-diffusion accuracy when the model decodes in
    blocks."""
    from dlm.likelihood import masked_token_accuracy
    from evals import data as D
    text = "\n\n".join(D.load_heldout_text(data_dir, b) for b in HELDOUT_BOOKS)
    ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
    stride = max(block, (len(ids) - block) // n_blocks)
    rows = torch.tensor([ids[i * stride: i * stride + block] for i in range(n_blocks)])
    out = {"blocks": n_blocks, "block_tokens": block,
           "dlm_masked_acc": masked_token_accuracy(model, rows, mask_ratio, seed=seed)}
    from dlm.decoders import DECODERS
    if DECODERS[model.sampler_config.decoder].block_mode:  # a block-mode decoder
        out["dlm_block_acc"] = masked_token_accuracy(model, rows, mask_ratio, seed=seed,
                                                     block_length=model.sampler_config.block_length)
    ar_logits = ar_model.ar_logits(rows.to(ar_model.device))
    out["ar_next_token_acc"] = float((ar_logits[:, :-1].argmax(-1).cpu() == rows[:, 1:]).float().mean())
    return out


def format_table(result: dict) -> str:
    d, a = result["dlm"], result["ar"]
    lines = ["| model | judge-PPL | distinct-2 | loops | tok/s |", "|---|---|---|---|---|"]
    for r in (d, a):
        lines.append(f"| {r['model']} | {r['judge_ppl']:.2f} | {r['distinct2']:.3f} | {100 * r['loops']:.0f}% | "
                     f"{r['tokens_per_s']:.2f} |")
    ok = {"fluent": d["judge_ppl"] <= 2 * a["judge_ppl"],
          "varied": d["distinct2"] >= 0.8 * a["distinct2"] and d["loops"] <= a["loops"] + 0.15,
          "fast": result["speed"] >= 1.0}
    lines.append("")
    r, lo, hi = result["ppl_ratio"]
    lines.append(f"ratios: judge-PPL {r:.2f}x AR [paired 95% bootstrap {lo:.2f}, {hi:.2f}], "
                 f"{result['identical']}/{result['n']} outputs identical to the AR's, distinct-2 "
                 f"{d['distinct2'] / a['distinct2']:.2f}x AR, loops {100 * (d['loops'] - a['loops']):+.0f} pts, "
                 f"speed {result['speed']:.2f}x AR ({result['tokens_per_step']:.2f} tokens per DLM step); "
                 f"n={result['n']} prompts x {result['new_tokens']} tokens")
    lines.append("goals (" + GOALS + "): " + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in ok.items()))
    if result.get("llama_cpp"):
        lc = result["llama_cpp"]
        rate = lc["tokens_per_s"]
        lines.append(f"{lc['what']}, {lc['threads']} threads, same prompts and sampling: judge-PPL "
                     f"{lc['judge_ppl']:.2f}, {rate:.2f} tok/s; DLM {d['tokens_per_s'] / rate:.2f}x llama.cpp, "
                     f"AR {a['tokens_per_s'] / rate:.2f}x")
    if "accuracy" in result:
        acc = result["accuracy"]
        extra = f", block-mode {acc['dlm_block_acc']:.3f}" if "dlm_block_acc" in acc else ""
        lines.append(f"held-out accuracy ({acc['blocks']} blocks x {acc['block_tokens']} tokens): DLM masked@15% "
                     f"{acc['dlm_masked_acc']:.3f}{extra} vs AR next-token {acc['ar_next_token_acc']:.3f}")
    return "\n".join(lines)


def llama_cpp_side(ar_name: str, judge, prompts: list, args) -> Optional[dict]:
    """llama.cpp on the AR twin's own GGUF (the program a CPU user would otherwise run), with the same prompts,
    tokens, sampling and threads, when `llama_cpp` is importable and the twin is a registered GGUF; else None."""
    from bench import llama_cpp_row
    if not llama_cpp_row.available():
        return None
    try:
        gguf = llama_cpp_row.gguf_path(ar_name)
    except Exception:  # noqa: BLE001 - not a registry entry with a local GGUF: no row
        return None
    if gguf is None or Path(gguf).suffix != ".gguf":
        return None
    row = llama_cpp_row.run(prompts, Path(gguf), torch.get_num_threads(), args.new_tokens, args.temperature,
                            args.top_p, seed=args.seed)
    if row is not None:
        nlls = [judge_nll(judge, p, t) for p, t in zip(prompts, row["texts"])]
        row["judge_ppl"] = corpus_ppl(nlls)
    return row


def _clip(text: str, n: int = 70) -> str:
    text = re.sub(r"\s+", " ", text)
    return text if len(text) <= n else text[: n - 1] + "…"


def main(argv: Optional[Sequence[str]] = None) -> dict:
    p = argparse.ArgumentParser(prog="bench.continuation", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--model", default="smollm2-135m-dlm", help="the DLM (its sampler_config is used)")
    p.add_argument("--ar-model", default=None, help="the AR twin (default: the DLM's registered counterpart)")
    p.add_argument("--judge", default=None, help="judge for judge-PPL (default: the AR twin)")
    p.add_argument("--n", type=int, default=24, help="prompts (half Gutenberg, half ROCStories)")
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", dest="settings", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a field of the DLM's recommended SamplerConfig (repeatable), e.g. "
                        "--set decoder=blocks --set block_length=4 --set threshold=0.9")
    p.add_argument("--dev", action="store_true", help="the dev prompts (disjoint from the reported set): for "
                   "choosing settings")
    p.add_argument("--accuracy", action="store_true", help="also held-out masked vs next-token accuracy")
    p.add_argument("--data-dir", type=Path, default=None, help="default ../shared/data")
    add_load_args(p, device="cpu")
    p.add_argument("--out", type=Path, default=None, help="write the result (with every sample) as JSON")
    args = p.parse_args(argv)

    from transformers.utils import logging as hf_logging

    import dlm
    from evals.data import default_data_dir
    hf_logging.set_verbosity_error()
    data_dir = args.data_dir or default_data_dir()
    model = dlm.load(args.model, **load_kwargs(args))
    if args.settings:
        pairs = dict(item.split("=", 1) for item in args.settings if "=" in item)
        if len(pairs) != len(args.settings):
            p.error("--set takes FIELD=VALUE")
        model.sampler_config = dlm.SamplerConfig.from_dict({**model.sampler_config.to_dict(), **pairs})
    ar_name = args.ar_model or model.ar_counterpart
    if not ar_name:
        p.error("the model names no AR counterpart: pass --ar-model")
    ar_model = dlm.load(ar_name, **load_kwargs(args))
    judge = ar_model if args.judge in (None, ar_name) and ar_model.quantization == "none" else \
        dlm.load(args.judge or ar_name, **load_kwargs(args, judge=True))
    prompts = load_prompts(data_dir, args.n, dev=args.dev)
    print(f"# {args.model} ({model.sampler_config.decoder} decoder) vs {ar_name}: {len(prompts)} prompts x "
          f"{args.new_tokens} tokens, T={args.temperature}, top-p={args.top_p}, threads {torch.get_num_threads()}",
          flush=True)
    if model.device.type == "cpu":
        from dlm.cpu_kernel import describe
        print(f"# linear layers: DLM {describe(model.base)}, AR {describe(ar_model.base)}", flush=True)
    t0 = time.perf_counter()
    result = run(model, ar_model, judge, prompts, args.new_tokens, args.temperature, args.top_p, args.seed,
                 log=lambda line: print(line, flush=True))
    if args.accuracy:
        result["accuracy"] = heldout_accuracy(model, ar_model, data_dir, seed=args.seed)
    result["llama_cpp"] = llama_cpp_side(ar_name, judge, prompts, args)
    print(format_table(result))
    print(f"# {time.perf_counter() - t0:.0f} s")
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
