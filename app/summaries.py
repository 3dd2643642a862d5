"""The playground's Markdown lines and tables: a run's stats, the race's lines, the In-context scoreboard, the Model
tab's status and each tab's config summary. Pure functions of plain data (tabs reach them through `app.render`)."""
from __future__ import annotations

import math
from typing import Optional

from dlm.decoders import DECODERS
from dlm.sampler_config import SamplerConfig, Task


def finite(x) -> Optional[float]:
    """x as a float, or None for None / NaN / inf (which charts cannot place and JSON cannot carry)."""
    return float(x) if x is not None and math.isfinite(float(x)) else None


# ------------------------------------------------------------------------------------------- stats and tables
def run_stats(g, revealed: Optional[int] = None, first_frame: Optional[float] = None) -> str:
    """The line under a finished run: evaluations, model time, speed (tokens decided per second of model time)."""
    n = len(g.token_ids) if revealed is None else revealed
    rate = n / g.seconds if g.seconds > 0 else 0.0
    ttff = f" · first frame after {first_frame:.2f} s" if first_frame is not None else ""
    return (f"**{g.nfe}** network evaluations · model time **{g.seconds:.2f} s** · **{rate:.1f}** tokens/s · "
            f"{n} tokens{ttff}")


def _num(x, fmt: str) -> str:
    return "n/a" if finite(x) is None else format(x, fmt)


def race_side_stats(run: dict) -> str:
    """A race side's end-of-run line: model time, speed, evaluations, judge-PPL and distinct-2."""
    return (f"model time **{run['seconds']:.2f} s** · **{_num(run['tokens_per_second'], '.1f')}** tokens/s · "
            f"**{run['nfe']}** network evaluations · {run['tokens']} tokens · judge-PPL "
            f"**{_num(run.get('gen_ppl'), '.1f')}** · distinct-2 **{_num(run.get('distinct_2'), '.2f')}**")


def race_summary(summary: dict) -> str:
    """Who finished first in model time, and at what quality."""
    d, a = summary["dlm"], summary["ar"]
    winner, loser = (d, a) if summary["winner"] == "dlm" else (a, d)
    name = {"dlm": "The diffusion LM", "ar": "The AR model"}[summary["winner"]]
    return (f"**{name} finished first** in model time: {winner['seconds']:.2f} s against {loser['seconds']:.2f} s. "
            f"Quality — judge-PPL (perplexity under the AR model, lower = more fluent): DLM "
            f"{_num(d.get('gen_ppl'), '.1f')} · AR {_num(a.get('gen_ppl'), '.1f')}; distinct-2 (share of unique "
            f"token pairs, 1 = no repetition): DLM {_num(d.get('distinct_2'), '.2f')} · AR "
            f"{_num(a.get('distinct_2'), '.2f')}.")


SCOREBOARD_HEADERS = ["example", "expected", "DLM answer", "DLM", "AR answer", "AR"]


def scoreboard_rows(rows: list[dict], total: int) -> list[list[str]]:
    """The In-context scoreboard: one line per example run so far, then the accuracy of each model."""
    def tick(ok: bool) -> str:
        return "✓" if ok else "✗"
    out = [[r["title"], r["expected"], r["dlm"], tick(r["dlm_ok"]), r["ar"], tick(r["ar_ok"])] for r in rows]
    if rows:
        def acc(key):
            k = sum(1 for r in rows if r[key])
            return f"{k}/{len(rows)} ({100 * k / len(rows):.0f}%)"
        done = "" if len(rows) == total else f" (after {len(rows)} of {total})"
        out.append([f"accuracy{done}", "", "", acc("dlm_ok"), "", acc("ar_ok")])
    return out


# ---------------------------------------------------------------------------------------------- the Model tab
def model_status(i, *, prompt_limit: int, time_limit: Optional[float], memory: str, modes: str) -> str:
    """The Model tab's summary of what is loaded (`i`: an `app.model_lifecycle.ModelInfo`)."""
    ar = i.ar_name or f"{i.name} (same weights, causal attention)"
    lines = [
        f"**DLM:** `{i.name}`" + (f" ({i.kind})" if i.kind else "")
        + (f" + LoRA `{i.adapter}`" if i.adapter else ""),
        f"**Parameters:** {i.parameters / 1e6:.1f} M · **weights:** {i.weights_mb:.0f} MB · "
        f"**device:** {i.device} · **dtype:** {i.dtype} · **quantization:** {i.quantization}",
        f"**Load time:** {i.load_seconds:.1f} s · **context:** {i.max_length} tokens · "
        f"**mask token id:** {i.mask_token_id} · **attention:** {i.attn_implementation or 'n/a'}",
        f"**AR counterpart:** {i.ar_error}" if i.ar_error else
        f"**AR counterpart:** `{ar}`" + (f" (loaded in {i.ar_load_seconds:.1f} s)" if i.ar_load_seconds else ""),
        f"**Memory in use:** {memory}",
        *([f"**Writing:** the speculative decoder's drafts are verified by {i.verifier}"] if i.verifier else []),
        f"**Limits per request:** {prompt_limit} prompt tokens · "
        + (f"{time_limit:g} s of model time" if time_limit else "no time limit"),
        modes,
    ]
    return "\n\n".join(lines)


NO_MODEL = "**No model loaded.** Choose one below and press *Load*."


def decoding_modes(write: SamplerConfig, infill: SamplerConfig, denoise: Optional[SamplerConfig] = None) -> str:
    """Which decoder each tab starts from (`Models.base_config`: the model's recommended configs, and the Denoise
    tab's own when it differs)."""
    if denoise is None or denoise == write:
        return (f"**Decoding modes:** Denoise, In-context and AR vs DLM use the writing config — "
                f"{config_summary(write)}; Infill and edits use the infilling config — {config_summary(infill)}.")
    shows = ("each forward's drafts, kept or rejected" if denoise.decoder == "speculative"
             else "tokens in parallel and out of order")
    return (f"**Decoding modes:** Denoise opens on {config_summary(denoise)} ({shows}); "
            f"In-context and AR vs DLM use the writing config — {config_summary(write)}; Infill and edits use the "
            f"infilling config — {config_summary(infill)}.")


CONFIG_ORIGINS = {Task.WRITE: "the model's recommended writing config",
                  Task.INFILL: "the model's recommended infilling config",
                  Task.DENOISE: "the playground's Denoise config (the model's writing config, set to show tokens "
                             "decided in parallel: drafts verified in one pass, or full attention out of order)"}


def config_origin(task: Task) -> str:
    """Where a tab's settings start from (`Models.base_config(task)`)."""
    return CONFIG_ORIGINS[Task.parse(task)]


def config_summary(cfg: SamplerConfig) -> str:
    """One line saying how a config decodes, from its decoder's declaration (`dlm.decoders.registry`): what the
    decoder is, the settings it reads, and a note for each changed setting it ignores, e.g. "**blocks** decoder
    (block diffusion: ..., blocks of 4), 64 tokens, one token per step, confidence, threshold 0.9, greedy"."""
    spec = DECODERS[cfg.decoder]
    uses = set(spec.uses)
    details = [spec.description] if spec.description else []
    if "block_length" in uses and cfg.block_length:
        details.append(f"blocks of {cfg.block_length}")
    mode = f"**{cfg.decoder}** decoder" + (f" ({', '.join(details)})" if details else "")
    extra = [f"{cfg.max_new_tokens} tokens"]
    if "steps" in uses:
        extra.append(f"{cfg.steps} steps" if cfg.steps else "one token per step")
    if "remasking" in uses:
        extra.append(cfg.remasking)
    if cfg.threshold and "threshold" in uses:
        extra.append(f"threshold {cfg.threshold:g}")
    extra.append("greedy" if cfg.temperature == 0 else f"temperature {cfg.temperature:g}")
    notes = cfg.ignored_settings()
    return mode + ", " + ", ".join(extra) + "".join(f"; note: {note}" for note in notes)
