"""Decoding speed and quality: a diffusion LM against its AR counterpart, on the same machine, in one run.

The paper's Figure 4 (generation time vs length, DLM with T steps vs AR) extended with the quality of what was
generated. For each length L (64/128/256; also 512/1024/2048 on a GPU):
  AR            HF greedy `generate` (KV cache), the DLM's registered AR counterpart (or the same weights causally)
  T=L/4, L/2, L the diffusion sampler with T denoising steps (one block, confidence remasking)
  block32       semi-autoregressive blocks of 32 tokens, T = L/2
  thr0.9        Fast-dLLM parallel decoding: blocks of 32, confidence threshold 0.9 (nfe <= L)
  thr0.9+cache  the same with the approximate prefix KV cache
  blocks4+thr0.9 / blocks8+thr0.9   block diffusion (exact KV cache of finished blocks, only the current block
                recomputed), threshold 0.9 inside the block: needs a model trained with block attention
  recommended   the model's own sampler_config (its shipped default decoding)
Columns: seconds (model time only, best of --repeats), tokens/s, "vs AR" (tokens/s relative to the AR row of the
same length in the same run), NFE (forward evaluations), gen-PPL of the output under the judge (default: the AR
counterpart), distinct-2. Every row generates exactly L tokens (EOS suppressed, greedy).

    python -m bench.decode                       # or: python -m bench decode
    python -m bench.decode --quick               # lengths 16/32, a few seconds
    python -m bench.decode --model smollm2-135m --lengths 64,128 --out runs/bench/decode.html
"""
from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from bench.load_args import add_load_args, load_kwargs
from dlm.quality import distinct_n, judge_ppl

DEFAULT_PROMPT = "Once upon a time, in a small village by the sea, there lived"


@dataclass
class Row:
    method: str
    length: int
    steps: int
    nfe: int
    seconds: float
    tokens: int           # tokens produced (AR may stop at EOS before L)
    tokens_per_s: float
    gen_ppl: float
    distinct2: float
    text: str = ""
    vs_ar: float = float("nan")   # tokens/s relative to the AR row of the same length, same run


@dataclass
class Variant:
    name: str
    steps_fraction: float = 1.0          # T = max(1, round(L * fraction))
    block_length: Optional[int] = None
    threshold: Optional[float] = None
    use_cache: bool = False
    decoder: str = "full"
    recommended: bool = False            # the model's own sampler_config (greedy, exactly L tokens)


VARIANTS = (Variant("T=L/4", 0.25), Variant("T=L/2", 0.5), Variant("T=L", 1.0),
            Variant("block32", 0.5, block_length=32), Variant("thr0.9", 1.0, block_length=32, threshold=0.9),
            Variant("thr0.9+cache", 1.0, block_length=32, threshold=0.9, use_cache=True),
            Variant("blocks4+thr0.9", 1.0, block_length=4, threshold=0.9, decoder="blocks"),
            Variant("blocks8+thr0.9", 1.0, block_length=8, threshold=0.9, decoder="blocks"),
            Variant("recommended", recommended=True))


def _judge_score(judge, prompt: str, text: str) -> float:
    """Perplexity of `text` given `prompt` under the AR judge (NaN for empty text)."""
    ppl = judge_ppl(judge, prompt, text)
    return float("nan") if ppl is None else ppl


def _best_of(repeats: int, fn):
    """Run fn() `repeats` times; keep the result with the least model time (`.seconds`)."""
    best = None
    for _ in range(repeats):
        g = fn()
        if best is None or g.seconds < best.seconds:
            best = g
    return best


def bench_ar(model, ar_model, prompt: str, length: int, repeats: int, seed: int):
    """HF greedy `generate` with its KV cache, exactly `length` tokens (EOS suppressed, as for the DLM rows)."""
    kwargs = dict(max_new_tokens=length, temperature=0.0, seed=seed, suppress_eos=True)
    if ar_model is not model:
        kwargs["ar_model"] = ar_model
    return _best_of(repeats, lambda: model.ar_generate(prompt, **kwargs))


def variant_config(model, v: Variant, length: int, seed: int):
    """The SamplerConfig of one benchmark row for a generation of `length` tokens (greedy, no early EOS stop)."""
    from dlm import SamplerConfig
    if v.recommended:
        return model.sampler_config.replace(max_new_tokens=length, temperature=0.0, seed=seed, suppress_eos=True)
    steps = max(1, round(length * v.steps_fraction))
    block = min(v.block_length, length) if v.block_length else None
    if block:
        steps = max(steps, math.ceil(length / block))  # every block needs a step
    return SamplerConfig(decoder=v.decoder, max_new_tokens=length, steps=steps, block_length=block,
                         threshold=v.threshold, use_cache=v.use_cache, remasking="confidence", temperature=0.0,
                         seed=seed, suppress_eos=True)


def bench_dlm(model, prompt: str, length: int, v: Variant, repeats: int, seed: int):
    cfg = variant_config(model, v, length, seed)
    return cfg.steps_for(length), _best_of(repeats, lambda: model.generate(prompt, cfg))


def run(model, ar_model, judge, lengths: Sequence[int], variants: Sequence[Variant], prompt: str = DEFAULT_PROMPT,
        repeats: int = 1, seed: int = 0, log=print) -> list[Row]:
    """Measure every (length, method); returns the rows (also printed one by one through `log`)."""
    model.generate(prompt, max_new_tokens=4, steps=2, seed=seed)  # warm-up (allocations, kernels)
    rows = []
    for L in lengths:
        g = bench_ar(model, ar_model, prompt, L, repeats, seed)
        n = len(g.token_ids)
        ar_rate = n / g.seconds if g.seconds else float("nan")
        rows.append(Row("AR", L, n, g.nfe, g.seconds, n, ar_rate, _judge_score(judge, prompt, g.text),
                        distinct_n(g.text), g.text, 1.0))
        log(_format_row(rows[-1]))
        for v in variants:
            steps, g = bench_dlm(model, prompt, L, v, repeats, seed)
            n = len(g.token_ids)
            rate = n / g.seconds if g.seconds else float("nan")
            rows.append(Row(v.name, L, steps, g.nfe, g.seconds, n, rate, _judge_score(judge, prompt, g.text),
                            distinct_n(g.text), g.text, rate / ar_rate))
            log(_format_row(rows[-1]))
    return rows


HEADER = (f"{'method':<16}{'L':>6}{'steps':>7}{'nfe':>6}{'seconds':>10}{'tok/s':>9}{'vs AR':>7}{'gen-PPL':>10}"
          f"{'dist-2':>8}")


def _format_row(r: Row) -> str:
    return (f"{r.method:<16}{r.length:>6}{r.steps:>7}{r.nfe:>6}{r.seconds:>10.3f}{r.tokens_per_s:>9.1f}"
            f"{r.vs_ar:>7.2f}{r.gen_ppl:>10.1f}{r.distinct2:>8.2f}")


def format_table(rows: Sequence[Row]) -> str:
    return "\n".join([HEADER] + [_format_row(r) for r in rows])


def write_chart(rows: Sequence[Row], path: Path, title: str) -> Path:
    """Plotly HTML: seconds vs length (the paper's Figure 4) and gen-PPL vs length, one line per method."""
    import plotly.colors
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots
    fig = make_subplots(rows=1, cols=2, subplot_titles=("model time per generation (s)", "gen-PPL of the output"))
    palette = plotly.colors.qualitative.Plotly
    for i, method in enumerate(dict.fromkeys(r.method for r in rows)):
        rs = [r for r in rows if r.method == method]
        line = {"dash": "solid" if method == "AR" else "dot", "color": palette[i % len(palette)]}
        fig.add_trace(go.Scatter(x=[r.length for r in rs], y=[r.seconds for r in rs], name=method,
                                 legendgroup=method, mode="lines+markers", line=line,
                                 customdata=[[r.nfe, r.tokens_per_s] for r in rs],
                                 hovertemplate="L=%{x}<br>%{y:.3f} s<br>nfe=%{customdata[0]}"
                                               "<br>%{customdata[1]:.1f} tok/s"), row=1, col=1)
        fig.add_trace(go.Scatter(x=[r.length for r in rs], y=[r.gen_ppl for r in rs], name=method,
                                 legendgroup=method, showlegend=False, mode="lines+markers", line=line),
                      row=1, col=2)
    fig.update_xaxes(title_text="generation length L (tokens)", type="log")
    fig.update_yaxes(type="log", row=1, col=1)
    fig.update_yaxes(type="log", row=1, col=2)
    fig.update_layout(title=title, height=480, width=1100)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.write_html(str(path), include_plotlyjs=True)  # self-contained: viewable offline
    return path


def _default_model() -> str:
    from dlm import model_registry
    return "smollm2-135m-dlm" if model_registry.is_available("smollm2-135m-dlm") else "smollm2-135m"


def main(argv: Optional[Sequence[str]] = None) -> list[Row]:
    p = argparse.ArgumentParser(prog="bench.decode", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--model", default=None, help="the DLM (default smollm2-135m-dlm, else the un-adapted "
                                                 "smollm2-135m used as a DLM)")
    p.add_argument("--ar-model", default=None, help="AR counterpart (default: the model's registered one, else "
                                                    "the same weights run causally)")
    p.add_argument("--judge", default=None, help="gen-PPL judge (default: the AR model)")
    p.add_argument("--lengths", default=None, help="comma list (default 64,128,256; +512,1024,2048 on CUDA)")
    p.add_argument("--variants", default=",".join(v.name for v in VARIANTS),
                   help=f"DLM methods: {', '.join(v.name for v in VARIANTS)}")
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--repeats", type=int, default=1, help="timed calls per row; the fastest counts")
    p.add_argument("--seed", type=int, default=0)
    add_load_args(p, device="auto")
    p.add_argument("--out", type=Path, default=Path("runs/bench/decode.html"), help="plotly chart (HTML)")
    p.add_argument("--quick", action="store_true", help="lengths 16,32, methods T=L/2 and thr0.9 only")
    args = p.parse_args(argv)

    from transformers.utils import logging as hf_logging

    import dlm
    hf_logging.set_verbosity_error()
    model_name = args.model or _default_model()
    model = dlm.load(model_name, **load_kwargs(args))
    cuda = model.device.type == "cuda"
    if args.lengths:
        lengths = [int(x) for x in args.lengths.split(",") if x.strip()]
    else:
        lengths = [16, 32] if args.quick else [64, 128, 256] + ([512, 1024, 2048] if cuda else [])
    wanted = ["T=L/2", "thr0.9"] if args.quick and args.variants == p.get_default("variants") else \
        [v.strip() for v in args.variants.split(",") if v.strip()]
    known = {v.name: v for v in VARIANTS}
    unknown = [w for w in wanted if w not in known]
    if unknown:
        p.error(f"unknown variant(s) {unknown}; choose from {', '.join(known)}")
    too_long = [L for L in lengths if L + 64 > model.max_length]
    if too_long:
        p.error(f"lengths {too_long} do not fit the model's context of {model.max_length} tokens with the prompt")
    ar_name = args.ar_model or (model.ar_counterpart if getattr(model.config, "adapted", False) else None)
    if ar_name and ar_name not in (model_name, getattr(model, "source", None)):
        ar_model, ar_source = dlm.load(ar_name, **load_kwargs(args)), ar_name
    else:
        ar_model, ar_source, ar_name = model, model_name, f"{model_name} (same weights, causal)"
    judge = ar_model if args.judge in (None, ar_name) and ar_model.quantization == "none" else \
        dlm.load(args.judge or ar_source, **load_kwargs(args, judge=True))
    note = "" if getattr(model.config, "adapted", False) else \
        "  [note: not diffusion-adapted: DLM rows are the un-adapted baseline; expect poor quality]"
    print(f"# DLM {model_name} vs AR {ar_name}; judge {args.judge or ar_name}; device {model.device}, "
          f"dtype {str(model.dtype).split('.')[-1]}, threads {torch.get_num_threads()}{note}", flush=True)
    if model.device.type == "cpu":
        from dlm.cpu_kernel import describe
        print(f"# linear layers: DLM {describe(model.base)}, AR {describe(ar_model.base)}", flush=True)
    print(HEADER, flush=True)
    t0 = time.perf_counter()
    rows = run(model, ar_model, judge, lengths, [known[w] for w in wanted], args.prompt, args.repeats, args.seed,
               log=lambda line: print(line, flush=True))
    chart = write_chart(rows, args.out, f"Decoding: {model_name} (DLM) vs {ar_name} (AR) on {model.device}")
    print(f"# {len(rows)} rows in {time.perf_counter() - t0:.0f} s; chart: {chart}")
    return rows


__all__ = ["main", "run", "Row", "Variant", "VARIANTS", "format_table", "write_chart"]

if __name__ == "__main__":
    main()
