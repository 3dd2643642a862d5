"""Markdown tables in the paper's Table 1 layout: one row per evaluated model, one column per task.

Every number carries its 95% interval `value [lo, hi]`: accuracies / exact match / pass@1 in percent (Wilson),
ROCStories as ROUGE-1/2/L with the ROUGE-1 interval, perplexities as they are (bootstrap). Results written before
intervals existed fall back to `value ± stderr`. `python -m evals table DIR [DIR ...]` merges runs into one table.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

from .metrics import paired_difference
from .store import PredictionStore, read_json
from .tasks import PROPORTION_METRICS, TABLE_ORDER, get_task


def _num(x) -> bool:
    return isinstance(x, (int, float)) and not (isinstance(x, float) and math.isnan(x))


def format_value(res: dict, metric: str, digits: int = 1) -> str:
    """`value [lo, hi]` (the 95% interval) for one metric of a task's results; proportions in percent. Older
    results without an interval show `value ± stderr`."""
    scale = 100.0 if metric in PROPORTION_METRICS else 1.0
    text = f"{res[metric] * scale:.{digits}f}"
    ci, se = res.get(f"{metric}_ci"), res.get(f"{metric}_stderr")
    if isinstance(ci, (list, tuple)) and len(ci) == 2 and all(_num(x) for x in ci):
        return text + f" [{ci[0] * scale:.{digits}f}, {ci[1] * scale:.{digits}f}]"
    return text + (f" ± {se * scale:.{digits}f}" if _num(se) else "")


def format_cell(task: str, res: dict) -> str:
    """One table cell for a task's results (empty results -> an en dash)."""
    if not res:
        return "–"
    if "rouge1" in res:
        r = "/".join(f"{res[k]:.1f}" for k in ("rouge1", "rouge2", "rougeL") if _num(res.get(k)))
        ci = res.get("rouge1_ci")
        return r + (f" (R1 [{ci[0]:.1f}, {ci[1]:.1f}])" if ci and all(_num(x) for x in ci) else "")
    if "gen_ppl" in res:
        d2 = f" (d2 {res['distinct2']:.2f})" if _num(res.get("distinct2")) else ""
        return (format_value(res, "gen_ppl") if _num(res["gen_ppl"]) else "–") + d2
    if "ppl" in res and "acc" not in res:
        return format_value(res, "ppl")
    main = _main_metric(task)
    if main and _num(res.get(main)):
        return format_value(res, main)
    for metric in ("acc", "em", "pass@1"):
        if _num(res.get(metric)):  # e.g. HellaSwag under the DLM 'paper' estimator, which has no acc_norm
            return format_value(res, metric) + (f" ({metric})" if main and main != metric else "")
    return "–"


def _main_metric(task: str):
    try:
        return get_task(task).main
    except KeyError:  # a --task-file task
        return None


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
    elif spec.main != "acc" and spec.main in PROPORTION_METRICS:
        title += f" ({spec.main})"
    return title


def row_label(config: dict) -> str:
    """The model and its kind, plus the in-context settings that make two runs of one model different rows."""
    s = config.get("settings", {})
    label = config.get("label") or config.get("model", "?")
    kind = s.get("kind", "?").upper()
    label = label if f"({kind})" in label else f"{label} ({kind})"  # a label that already names the kind
    extras = []
    if s.get("shots"):
        extras.append(f"{s['shots']}-shot")
    if (s.get("samples") or 1) > 1:
        extras.append(f"self-consistency {s['samples']}")
    return label + (", " + ", ".join(extras) if extras else "")


def _prompting(s: dict, tasks: Sequence[str]) -> str:
    """How the generative tasks were prompted, when it differs from the zero-shot greedy default."""
    parts = []
    if s.get("chat"):
        parts.append("chat template")
    if s.get("shots"):
        parts.append(f"{s['shots']} solved example{'s' if s['shots'] > 1 else ''} before each question "
                     "(seeded per example)")
    if (s.get("samples") or 1) > 1:
        parts.append(f"majority of {s['samples']} answers sampled at temperature {s.get('sample_temperature')}")
    if "gsm8k" in tasks and s.get("gsm8k_format") not in (None, "full"):
        parts.append(f"GSM8K in its {s['gsm8k_format']} form")
    return "".join(f"; {p}" for p in parts)


def ordered_tasks(results: Sequence[dict]) -> list[str]:
    seen = {t for r in results for t in r}
    return [t for t in TABLE_ORDER if t in seen] + sorted(seen.difference(TABLE_ORDER))


INTERVALS = ("value [95% interval]: accuracy / exact match / pass@1 in % (Wilson score interval); ROCStories "
             "ROUGE-1/2/L F1 x 100 with the ROUGE-1 interval and perplexities (percentile bootstrap over examples, "
             "seeded); PPL of a DLM is the ELBO upper bound.")


def _run_lines(runs: Sequence[tuple[dict, dict]], tasks: Sequence[str]) -> list[str]:
    """One line per run: n per task, how it scored and generated, the data files' SHA-256."""
    lines = []
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
        data = config.get("data") or {}
        files = {name: fp.get("sha256", "?") for t in tasks for name, fp in data.get(t, {}).items()}
        hashes = ", ".join(f"{name} {sha[:12]}" for name, sha in files.items())
        lines.append(f"- {row_label(config)}: n = {ns}; {how}; {length}{_prompting(s, tasks)}; seed {s.get('seed')}"
                     + (f"; data sha256 {hashes}" if hashes else "") + ".")
    return lines


def markdown_table(runs: Sequence[tuple[dict, dict]]) -> str:
    """runs: (config, results) per model -> the Markdown table plus one line per run with n and the settings."""
    tasks = ordered_tasks([res for _, res in runs])
    lines = ["| Model | " + " | ".join(column_title(t) for t in tasks) + " |",
             "|---|" + "---|" * len(tasks)]
    for config, res in runs:
        lines.append(f"| {row_label(config)} | " + " | ".join(format_cell(t, res.get(t, {})) for t in tasks) + " |")
    return "\n".join(lines + ["", INTERVALS] + _run_lines(runs, tasks)) + "\n"


def shots_table(runs: Sequence[tuple[dict, dict]]) -> str:
    """The in-context layout: one row per model (with its self-consistency) and task, one column per number of
    solved examples in the prompt (`--shots`). Two runs giving the same cell are refused."""
    tasks = ordered_tasks([res for _, res in runs])
    shots = sorted({int(c.get("settings", {}).get("shots") or 0) for c, _ in runs})
    rows: dict[tuple[str, str], dict[int, str]] = {}
    for config, res in runs:
        s = config.get("settings", {})
        k = int(s.get("shots") or 0)
        label = row_label({**config, "settings": {**s, "shots": 0}})
        for t in (t for t in tasks if t in res):
            row = rows.setdefault((label, t), {})
            if k in row:
                raise ValueError(f"two runs give {label}, {t}, {k}-shot; pass one of them")
            row[k] = format_cell(t, res[t])
    lines = ["| Model | Task | " + " | ".join(f"{k}-shot" for k in shots) + " |",
             "|---|---|" + "---|" * len(shots)]
    for t in tasks:     # a task's rows together, models in the order given
        for (label, task), row in rows.items():
            if task == t:
                lines.append(f"| {label} | {column_title(t)} | " + " | ".join(row.get(k, "–") for k in shots) + " |")
    return "\n".join(lines + ["", INTERVALS] + _run_lines(runs, tasks)) + "\n"


def table_from_dirs(dirs: Sequence[Path], by: str = "model") -> str:
    """The table of run directories: `by="model"` is Table 1's layout, `by="shots"` the in-context one."""
    runs = []
    for d in dirs:
        res = read_json(Path(d) / "results.json")
        if res is None:
            raise FileNotFoundError(f"{d} has no results.json (not an evals --out directory?)")
        runs.append((read_json(Path(d) / "config.json", {}), res))
    return shots_table(runs) if by == "shots" else markdown_table(runs)


def comparison_table(dir_a: Path, dir_b: Path, tasks: Sequence[str] = ()) -> str:
    """B against A, task by task, on the examples both runs scored: each one's mean, the difference B - A with its
    paired 95% interval, and for 0/1 scores the discordant counts and the exact McNemar p-value. Tasks scored
    only as a corpus (perplexities) are left out."""
    runs = [(read_json(Path(d) / "config.json", {}), read_json(Path(d) / "results.json", {}) or {})
            for d in (dir_a, dir_b)]
    names = [row_label(c) for c, _ in runs]
    common = [t for t in ordered_tasks([r for _, r in runs]) if t in runs[0][1] and t in runs[1][1]]
    lines = [f"A = {names[0]}: {dir_a}; B = {names[1]}: {dir_b}", "",
             "| Task | metric | n | A | B | B - A [95% interval] | B only / A only right | McNemar p |",
             "|---|---|---|---|---|---|---|---|"]
    for t in (t for t in common if not tasks or t in tasks):
        recs = [PredictionStore.read(Path(d) / "predictions" / f"{t}.jsonl") for d in (dir_a, dir_b)]
        metric = _main_metric(t) or "acc"
        ids = sorted(i for i in set(recs[0]) & set(recs[1])
                     if _num(recs[0][i].get(metric)) and _num(recs[1][i].get(metric)))
        if len(ids) < 2:
            continue
        d = paired_difference([recs[0][i][metric] for i in ids], [recs[1][i][metric] for i in ids])
        scale = 100.0 if metric in PROPORTION_METRICS else 1.0
        f = lambda v: f"{v * scale:.1f}"  # noqa: E731
        disc = f"{d['b_only']} / {d['a_only']}" if "b_only" in d else "–"
        p = "–" if "p_mcnemar" not in d else "< 0.001" if d["p_mcnemar"] < 1e-3 else f"{d['p_mcnemar']:.3f}"
        lines.append(f"| {column_title(t)} | {metric} | {d['n']} | {f(d['a'])} | {f(d['b'])} | {f(d['diff'])} "
                     f"[{f(d['ci'][0])}, {f(d['ci'][1])}] | {disc} | {p} |")
    lines += ["", "Proportions in %. 95% intervals of the paired difference: Newcombe's score interval for "
              "accuracies (method 10, 1998), a bootstrap over example pairs for ROUGE (2000 resamples, seed 0). "
              "An interval that holds 0 means the runs are not told apart on these examples."]
    return "\n".join(lines) + "\n"


__all__ = ["markdown_table", "shots_table", "comparison_table", "table_from_dirs", "format_cell", "format_value"]
