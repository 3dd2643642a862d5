"""The training curve of a run: tokens seen vs held-out masked-token accuracy and ELBO perplexity (and loss).

    python -m train.curve runs/smollm2-135m-dlm [--html runs/smollm2-135m-dlm/curve.html]

Reads `OUTPUT_DIR/metrics.jsonl` (written by `train.loop`), prints a Markdown table of the eval records and, with
`--html`, writes a plotly chart (accuracy at each mask ratio and ELBO perplexity against tokens, training loss).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence


def read_metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """-> (eval records, training records) of `run_dir/metrics.jsonl`, in step order."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a train output directory?")
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    evals = [r for r in records if any(k.startswith("eval/") for k in r)]
    train = [r for r in records if "loss" in r]
    return sorted(evals, key=lambda r: r["step"]), sorted(train, key=lambda r: r["step"])


def eval_columns(evals: list[dict]) -> list[str]:
    """The metric columns the eval records hold: full-attention accuracy by mask ratio, then block-diffusion
    accuracy (runs with run.eval_block_length), then the ELBO perplexity bound."""
    def by_ratio(prefix: str) -> list[str]:
        return sorted({k for r in evals for k in r if k.startswith(prefix)}, key=lambda k: float(k.split("@")[1]))
    return by_ratio("eval/acc@") + by_ratio("eval/block_acc@") + \
        [k for k in ("eval/elbo_ppl",) if any(k in r for r in evals)]


def markdown(evals: list[dict]) -> str:
    cols = eval_columns(evals)
    head = "| step | tokens | " + " | ".join(c[5:] for c in cols) + " |"
    rows = [head, "|" + "---|" * (len(cols) + 2)]
    for r in evals:
        cells = [f"{r[c]:.4f}" if "acc@" in c else f"{r[c]:.1f}" for c in cols if c in r]
        rows.append(f"| {r['step']} | {r['tokens']:,} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def figure(evals: list[dict], train: list[dict], title: str = ""):
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots
    fig = make_subplots(rows=1, cols=3, subplot_titles=("masked-token accuracy (held out)",
                                                        "ELBO perplexity bound (held out)", "training loss (Eq. 7)"))
    for c in eval_columns(evals):
        xs = [r["tokens"] for r in evals if c in r]
        ys = [r[c] for r in evals if c in r]
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines+markers", name=c[5:]),
                      row=1, col=2 if c == "eval/elbo_ppl" else 1)
    fig.add_trace(go.Scatter(x=[r["tokens"] for r in train], y=[r["loss"] for r in train], name="loss"),
                  row=1, col=3)
    fig.update_xaxes(title_text="tokens seen")
    fig.update_yaxes(type="log", row=1, col=2)
    fig.update_layout(title=title, height=420, width=1300)
    return fig


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.curve", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--html", type=Path, default=None, help="write a plotly chart here")
    a = p.parse_args(argv)
    try:
        evals, train = read_metrics(a.run_dir)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not evals:
        print(f"error: {a.run_dir}/metrics.jsonl has no eval records (run.eval_every / eval_batches?)",
              file=sys.stderr)
        return 2
    print(markdown(evals))
    if a.html:
        a.html.parent.mkdir(parents=True, exist_ok=True)
        figure(evals, train, title=str(a.run_dir)).write_html(str(a.html), include_plotlyjs=True)
        print(f"chart: {a.html}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
