"""Every shipped Infill example (`dlm/examples/infill/`) filled by the model, and scored: which ones it does well.

Per example, with the model's own infilling config and `--seeds` seeds (one fill when that config is greedy):

  judge x     judge-PPL of the filled text over judge-PPL of the same template filled with the example's `expected`
              spans (the AR base as judge, whole text): 1.0 = as fluent as the reference, lower = more fluent
  ROUGE-1     of the generated spans against the expected spans (word overlap x 100, stemmed)
  loop        some span repeats a word 3-gram 3 times

An example is marked hard (its `hard:` header) when most seeds miss `--max-ratio` (judge x) or loop; the Infill
tab opens on the best example that is not hard, and shows the hard ones marked.

    python -m bench.infill_examples                  # the shipped default, 3 seeds
"""
from __future__ import annotations

import argparse
import statistics
from typing import Optional, Sequence

from bench.load_args import add_load_args, load_kwargs


def reference_text(template: str, expected: Sequence[str]) -> str:
    """The template with each span replaced by its expected text (the template's own spaces around a marker stay)."""
    from dlm.infill import join_pieces, split_template
    return join_pieces([piece for _, piece in split_template(template)], [s.strip() for s in expected])


def score_example(model, judge, example, seeds: int) -> dict:
    from dlm.quality import has_loop, judge_ppl
    from evals.metrics import rouge_scores
    expected = [s.strip() for s in example.expected.split("|")] if example.expected else []
    ref = judge_ppl(judge, "", reference_text(example.prompt, expected)) if expected else None
    runs = []
    for seed in range(seeds if model.infill_config.temperature > 0 else 1):   # greedy: one fill is all of them
        g = model.fill(example.prompt, model.infill_config, seed=seed)
        spans = g.spans or []
        ppl = judge_ppl(judge, "", g.text)
        runs.append({"text": g.text, "spans": spans, "ratio": ppl / ref if ref and ppl else float("nan"),
                     "rouge1": rouge_scores(" ".join(spans), " ".join(expected))["rouge1"] if expected else
                     float("nan"), "loop": any(has_loop(s) for s in spans)})
    return {"name": example.name, "title": example.title, "runs": runs,
            "ratio": statistics.median(r["ratio"] for r in runs),
            "rouge1": statistics.mean(r["rouge1"] for r in runs)}


def main(argv: Optional[Sequence[str]] = None) -> list[dict]:
    p = argparse.ArgumentParser(prog="bench.infill_examples", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--model", default="smollm2-135m-dlm")
    p.add_argument("--judge", default=None, help="AR judge (default: the model's AR twin)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--max-ratio", type=float, default=1.5, help="judge x at or below which a fill counts as good")
    add_load_args(p, device="cpu")
    args = p.parse_args(argv)
    import dlm
    from dlm.fewshot import INFILL_EXAMPLES_DIR, load_examples
    model = dlm.load(args.model, **load_kwargs(args))
    judge = dlm.load(args.judge or model.ar_counterpart or args.model, device=model.device, dtype="float32",
                     quantization=None)
    rows = []
    for ex in load_examples(INFILL_EXAMPLES_DIR):
        r = score_example(model, judge, ex, args.seeds)
        good = sum(1 for run in r["runs"] if run["ratio"] <= args.max_ratio and not run["loop"])
        r["good"], r["verdict"] = good, "well" if good * 2 > len(r["runs"]) else "hard"
        rows.append(r)
    print(f"# {args.model}: dlm/examples/infill, its infilling config ({len(rows[0]['runs']) if rows else 0} fill(s) "
          f"each); judge-PPL ratio to the reference fill (good <= {args.max_ratio})")
    print("| example | judge x (median) | ROUGE-1 | good seeds | verdict | first fill |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        first = " / ".join(r["runs"][0]["spans"]).replace("|", "\\|").replace("\n", " ")
        print(f"| {r['name']} | {r['ratio']:.2f} | {r['rouge1']:.1f} | {r['good']}/{len(r['runs'])} | "
              f"{r['verdict']} | {first} |")
    return rows


if __name__ == "__main__":
    main()
