"""The paper's ablations as one command: the same recipe and the same tokens with one switch flipped per run.

    python -m train.ablate --config smollm2-135m --max-steps 80 --out runs/ablation
    python -m train.ablate --config tiny-cpu --variants adapted,no-anneal --max-steps 20 --out runs/abl-tiny

Each variant is an ordinary `python -m train pretrain` run in `OUT/<variant>/` (own checkpoints, `--resume auto`,
so re-running the command continues an interrupted study and skips finished variants). All variants read the
same token cache in the same order with the same seed, so they see exactly the same tokens; the held-out metrics
(masked-token accuracy at 0.15/0.5/0.9, ELBO perplexity bound) use the same blocks and masks. At the end the
command prints a Markdown table (metrics at the last evaluation and at every common step) and writes
`OUT/ablation.md`, `OUT/ablation.json` and a plotly chart `OUT/ablation.html`.

Variants (`VARIANTS`; the first is the reference):
    adapted     the config as it is (paper recipe: annealing, shift, 1/t weighting, pretrained weights)
    no-anneal   diffusion.anneal_steps=0: bidirectional from the first step
    no-shift    model.shift=false: hidden state i predicts token i, not i+1
    no-1/t      diffusion.weighting=none: plain masked cross-entropy
    scratch     model.from_scratch=true: the same architecture, randomly initialised, all weights trained (LoRA
                off: a low-rank update of random weights is not a model); the paper's adaptation-vs-scratch claim
    full        lora.enabled=false: full fine-tuning instead of the config's LoRA (pair it with optim.lr)
    attn-full / attn-blocks / attn-mixture
                diffusion.attention: the paper's full attention, block diffusion, or a mixture of the two (one
                adapter for both modes); pass run.eval_block_length=N so every variant is also scored as a
                block denoiser
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence

from .curve import eval_columns, read_metrics

VARIANTS: dict[str, list[str]] = {
    "adapted": [],
    "no-anneal": ["diffusion.anneal_steps=0"],
    "no-shift": ["model.shift=false"],
    "no-1/t": ["diffusion.weighting=none"],
    "scratch": ["model.from_scratch=true", "lora.enabled=false"],
    "full": ["lora.enabled=false"],
    "attn-full": ["diffusion.attention=full"],
    "attn-blocks": ["diffusion.attention=blocks"],
    "attn-mixture": ["diffusion.attention=mixture"],
}
DEFAULT_VARIANTS = ("adapted", "no-anneal", "no-shift", "scratch")


def run_dir(out: Path, variant: str) -> Path:
    return out / variant.replace("/", "")            # "no-1/t" -> OUT/no-1t


def run_variant(config: str, variant: str, out: Path, max_steps: Optional[int], overrides: Sequence[str],
                log_file=None) -> int:
    """One `python -m train pretrain` subprocess for `variant` (resumes its own checkpoints); -> exit status."""
    cmd = [sys.executable, "-m", "train", "pretrain", "--config", config, "--output-dir", str(run_dir(out, variant)),
           "--resume", "auto", *([f"--max-steps={max_steps}"] if max_steps else []), *overrides, *VARIANTS[variant]]
    return subprocess.call(cmd, stdout=log_file, stderr=subprocess.STDOUT if log_file else None)


def summarize(out: Path, variants: Sequence[str]) -> dict:
    """{variant: {"steps", "tokens", "seconds", "last": {metric: value}, "curve": [eval records]}} of finished runs."""
    rows = {}
    for v in variants:
        d = run_dir(out, v)
        if not (d / "metrics.jsonl").is_file():
            continue
        evals, train = read_metrics(d)
        if not evals:
            continue
        times = [r["time"] for r in train if "time" in r]
        summary = json.loads((d / "run_summary.json").read_text()) if (d / "run_summary.json").is_file() else {}
        rows[v] = {"steps": evals[-1]["step"], "tokens": evals[-1]["tokens"], "finished": bool(summary),
                   "tokens_per_s": summary.get("tokens_per_s"),
                   "seconds": (times[-1] - times[0]) if len(times) > 1 else None,
                   "last": {m: evals[-1][m] for m in eval_columns(evals[-1:])},
                   "curve": [{k: r[k] for k in ("step", "tokens", *eval_columns([r]))} for r in evals]}
    return rows


def headline(columns: list[str]) -> str:
    """The accuracy column followed step by step: the middle mask ratio (acc@0.5 with the default ratios)."""
    accs = [c for c in columns if c.startswith("eval/acc@")]
    return accs[len(accs) // 2] if accs else columns[0]


def markdown(rows: dict) -> str:
    """Last-eval table (delta to the first variant) + the headline accuracy at every evaluated step."""
    if not rows:
        return "(no finished variant)"
    ref = next(iter(rows.values()))["last"]
    columns = eval_columns([r["last"] for r in rows.values()])
    names = [c[5:] if "acc@" in c else "ELBO PPL" for c in columns]
    lines = ["| variant | steps | tokens | " + " | ".join(names) + " | tok/s |", "|---|" + "---:|" * (len(columns) + 3)]
    for v, r in rows.items():
        cells = []
        for m in columns:
            val = r["last"].get(m)
            if val is None:
                cells.append("-")
                continue
            fmt = "{:.3f}" if "acc@" in m else "{:.1f}"
            delta = "" if v == next(iter(rows)) or m not in ref else \
                f" ({'+' if val >= ref[m] else '-'}{fmt.format(abs(val - ref[m]))})"
            cells.append(fmt.format(val) + delta)
        tps = f"{r['tokens_per_s']:.0f}" if r.get("tokens_per_s") else "-"
        lines.append(f"| {v}{'' if r['finished'] else ' (running)'} | {r['steps']} | {r['tokens']:,} | "
                     + " | ".join(cells) + f" | {tps} |")
    steps = sorted({p["step"] for r in rows.values() for p in r["curve"]})
    acc = headline(columns)
    lines += ["", f"{acc[5:]} (held out) by step:", "",
              "| step | " + " | ".join(rows) + " |", "|---:|" + "---:|" * len(rows)]
    for s in steps:
        cells = [next((f"{p[acc]:.3f}" for p in r["curve"] if p["step"] == s and acc in p), "-")
                 for r in rows.values()]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def figure(rows: dict, title: str = ""):
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots
    acc = headline(eval_columns([r["last"] for r in rows.values()]))
    fig = make_subplots(rows=1, cols=2, subplot_titles=(f"masked-token accuracy {acc[5:]} (held out)",
                                                        "ELBO perplexity bound (held out)"))
    for i, (v, r) in enumerate(rows.items()):
        color = f"hsl({(i * 67) % 360},65%,45%)"
        xs = [p["tokens"] for p in r["curve"]]
        fig.add_trace(go.Scatter(x=xs, y=[p.get(acc) for p in r["curve"]], name=v, legendgroup=v,
                                 mode="lines+markers", line=dict(color=color)), row=1, col=1)
        fig.add_trace(go.Scatter(x=xs, y=[p.get("eval/elbo_ppl") for p in r["curve"]], name=v, legendgroup=v,
                                 showlegend=False, mode="lines+markers", line=dict(color=color)), row=1, col=2)
    fig.update_xaxes(title_text="tokens seen")
    fig.update_yaxes(type="log", row=1, col=2)
    fig.update_layout(title=title, height=420, width=1100)
    return fig


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.ablate", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="preset name (train/configs) or YAML path")
    p.add_argument("--out", type=Path, required=True, help="one run directory per variant goes here")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                   help=f"comma-separated, from: {', '.join(VARIANTS)} (default: %(default)s)")
    p.add_argument("--max-steps", type=int, default=None, help="run.max_steps of every variant")
    p.add_argument("--report-only", action="store_true", help="do not train: tabulate what the runs hold")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides applied to every variant")
    a = p.parse_intermixed_args(argv)
    variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        print(f"error: unknown variant(s) {unknown or a.variants!r}; choose from {', '.join(VARIANTS)}",
              file=sys.stderr)
        return 2
    a.out.mkdir(parents=True, exist_ok=True)
    if not a.report_only:
        for v in variants:
            if (run_dir(a.out, v) / "run_summary.json").is_file():
                print(f"[ablate] {v}: finished earlier, skipped", flush=True)
                continue
            print(f"[ablate] {v}: training ({' '.join(VARIANTS[v]) or 'the config as is'})", flush=True)
            rc = run_variant(a.config, v, a.out, a.max_steps, a.overrides)
            if rc != 0:
                print(f"error: variant {v} failed (exit {rc}); its checkpoints stay in {run_dir(a.out, v)}: "
                      "re-run the same command to resume", file=sys.stderr)
                return rc
    rows = summarize(a.out, variants)
    table = markdown(rows)
    print(table)
    (a.out / "ablation.md").write_text(table + "\n")
    (a.out / "ablation.json").write_text(json.dumps(rows, indent=1))
    if rows:
        figure(rows, title=f"ablation: {a.config}").write_html(str(a.out / "ablation.html"), include_plotlyjs=True)
        print(f"chart: {a.out / 'ablation.html'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
