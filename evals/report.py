"""Markdown tables in the paper's Table 1 layout: one row per evaluated model, one column per task.

Accuracies / exact match / pass@1 are shown in percent with their standard error, ROCStories as ROUGE-1/2/L,
perplexities as they are. `python -m evals table DIR [DIR ...]` merges several runs into one table.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

from .store import read_json
from .tasks import TABLE_ORDER, get_task

PERCENT = {"acc", "acc_norm", "em", "pass@1"}


def _num(x) -> bool:
    return isinstance(x, (int, float)) and not (isinstance(x, float) and math.isnan(x))


def _pm(value, se, scale: float = 1.0, digits: int = 1) -> str:
    text = f"{value * scale:.{digits}f}"
    return text + (f" ± {se * scale:.{digits}f}" if _num(se) else "")


def format_cell(task: str, res: dict) -> str:
    """One table cell for a task's results (empty results -> an en dash)."""
    if not res:
        return "–"
    if "rouge1" in res:
        return "/".join(f"{res[k]:.1f}" for k in ("rouge1", "rouge2", "rougeL") if _num(res.get(k)))
    if "gen_ppl" in res:
        d2 = f" (d2 {res['distinct2']:.2f})" if _num(res.get("distinct2")) else ""
        return (_pm(res["gen_ppl"], res.get("gen_ppl_stderr")) if _num(res["gen_ppl"]) else "–") + d2
    if "ppl" in res and "acc" not in res:
        return _pm(res["ppl"], res.get("ppl_stderr"))
    for metric in ("acc", "em", "pass@1"):
        if _num(res.get(metric)):
            return _pm(res[metric], res.get(f"{metric}_stderr"), 100.0)
    return "–"


def column_title(task: str) -> str:
    try:
        spec = get_task(task)
    except KeyError:
        return task
    title = spec.title
    if task == "rocstories":
        title += " (R1/R2/RL)"
    elif task == "humaneval_infill":
        title += " (pass@1)"
    return title


def row_label(config: dict) -> str:
    label = config.get("label") or config.get("model", "?")
    kind = config.get("settings", {}).get("kind", "?").upper()
    return label if f"({kind})" in label else f"{label} ({kind})"  # a label that already names the kind


def ordered_tasks(results: Sequence[dict]) -> list[str]:
    seen = {t for r in results for t in r}
    return [t for t in TABLE_ORDER if t in seen] + sorted(seen.difference(TABLE_ORDER))


def markdown_table(runs: Sequence[tuple[dict, dict]]) -> str:
    """runs: (config, results) per model -> the Markdown table plus one line per run with n and the settings."""
    tasks = ordered_tasks([res for _, res in runs])
    lines = ["| Model | " + " | ".join(column_title(t) for t in tasks) + " |",
             "|---|" + "---|" * len(tasks)]
    for config, res in runs:
        lines.append(f"| {row_label(config)} | " + " | ".join(format_cell(t, res.get(t, {})) for t in tasks) + " |")
    lines.append("")
    lines.append("Accuracy / exact match / pass@1 in % ± standard error; ROCStories ROUGE-1/2/L F1 x 100; "
                 "PPL of a DLM is the ELBO upper bound.")
    for config, res in runs:
        s = config.get("settings", {})
        ns = ", ".join(f"{t} {res[t].get('n', '?')}" for t in tasks if t in res)
        how = ("AR: exact causal log-likelihood (acc = summed, acc_norm = per byte), greedy decoding"
               if s.get("kind") == "ar" else
               f"DLM: score={s.get('score_method')} x{s.get('n_samples')}, sampler overrides "
               f"{s.get('sampler') or 'none (the model’s own decoding)'}, infill overrides "
               f"{s.get('infill_sampler') or 'none'}")
        length = "oracle answer length" if s.get("oracle_length") else \
            f"fixed answer budget ({s.get('max_new_tokens') or 'task default'})"
        lines.append(f"- {row_label(config)}: n = {ns}; {how}; {length}; seed {s.get('seed')}.")
    return "\n".join(lines) + "\n"


def table_from_dirs(dirs: Sequence[Path]) -> str:
    runs = []
    for d in dirs:
        res = read_json(Path(d) / "results.json")
        if res is None:
            raise FileNotFoundError(f"{d} has no results.json (not an evals --out directory?)")
        runs.append((read_json(Path(d) / "config.json", {}), res))
    return markdown_table(runs)


__all__ = ["markdown_table", "table_from_dirs", "format_cell"]
