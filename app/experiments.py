"""Composed experiments: work made of several model calls, run as one request in the worker: the race of the DLM
against its AR counterpart (+ a steps sweep), the span-length sweep, the In-context scoreboard, and the time to the
first frame. Each `*_job` returns a job for `Worker.start` (a generator function of `(lane, item)` events); the
request is checked before (`app.checker.Checker`).

`RaceState` is the one reader of the race's events: the race tab and the /race, /compare endpoints fold a run's
batches into it and draw or serialise what it holds.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from app.checker import Infill, Prompt
from app.checks import cap_steps, masked_tokens, with_span_length
from app.render import Trace, finite
from dlm.fewshot import answer_of, run_example
from dlm.infill import attach_spaces, split_template
from dlm.quality import distinct_n, judge_ppl
from dlm.sampler_config import SamplerConfig, Task
from dlm.types import Generation

LANES = ("dlm", "ar")


def judged(g: Generation, context: str, ar) -> dict:
    """One finished side of a race: its speed, and its quality (judge-PPL under the AR model, distinct-2)."""
    return dict(text=g.text, seconds=g.seconds, tokens=len(g.token_ids), nfe=g.nfe,
                tokens_per_second=g.tokens_per_second, gen_ppl=judge_ppl(ar, context, g.text),
                distinct_2=finite(distinct_n(g.text, 2)))


# -------------------------------------------------------------------------------------------------------- race
def race_job(model, ar, prompt: Prompt, config: SamplerConfig, sweep_field: str, sweep_values: list):
    """The DLM against the AR model on one prompt, both streaming. On one device the two take turns: the side
    whose model-time clock is behind makes the next step, so both clocks advance fairly and "who finished
    first" is decided in model time. Lanes: "dlm" / "ar" (Frames, then the Generation), "clock" ({"dlm": s,
    "ar": s}, after every step), "summary" ({"dlm": run, "ar": run, "winner"}, each run `judged`), then one
    "sweep" row per value of `sweep_field` in `sweep_values` ({field, value, <field>: value, seconds, nfe, ppl,
    text, distinct_2}). `ar`: the AR model
    (loaded with the DLM: `Models.ar_model`)."""
    def job():
        sides = {"dlm": model.stream(prompt.text, config, messages=prompt.messages),
                 "ar": model.ar_stream(prompt.text, config, messages=prompt.messages, ar_model=ar)}
        clock, results = {"dlm": 0.0, "ar": 0.0}, {}
        while sides:
            lane = min(sides, key=clock.get)  # the side behind in model time goes next
            t0 = time.perf_counter()
            item = next(sides[lane])
            clock[lane] += time.perf_counter() - t0
            if isinstance(item, Generation):
                del sides[lane]
                clock[lane] = item.seconds  # the exact model time replaces the measured one
                results[lane] = item
            yield lane, item
            yield "clock", dict(clock)
        context = results["dlm"].prompt
        summary = {lane: judged(g, context, ar) for lane, g in results.items()}
        summary["winner"] = min(LANES, key=lambda k: summary[k]["seconds"])
        yield "summary", summary
        for v in sweep_values:
            g = model.generate(prompt.text, config.replace(**{sweep_field: v}), messages=prompt.messages)
            yield "sweep", {"field": sweep_field, "value": v, sweep_field: v, "seconds": g.seconds, "nfe": g.nfe,
                            "ppl": judge_ppl(ar, context, g.text), "text": g.text,
                            "distinct_2": finite(distinct_n(g.text, 2))}
    return job


@dataclass
class RaceState:
    """What a race's events have told so far, folded batch by batch (`fold`): each side's Trace (drawn with the
    run's display context), its model-time clock and Generation, the summary, the sweep rows; `new_summary` /
    `new_rows` say what the last batch brought (the tab redraws its plots only then)."""

    traces: dict[str, Trace]
    decode: Callable[[list[int]], dict[int, str]]
    clock: dict[str, float] = field(default_factory=lambda: {lane: 0.0 for lane in LANES})
    results: dict[str, Generation] = field(default_factory=dict)
    summary: Optional[dict] = None
    sweep: list[dict] = field(default_factory=list)
    cancelled: bool = False
    reason: str = ""  # why it ended early when not by Stop (the time limit)
    new_summary: bool = False
    new_rows: int = 0

    @classmethod
    def of(cls, run) -> "RaceState":
        return cls({lane: run.display.trace(run.prompt_tokens) for lane in LANES}, run.display.decode)

    def fold(self, batch) -> "RaceState":
        for lane in LANES:
            for f in batch.frames(lane):
                self.traces[lane].add(f, self.decode)
            if batch.result(lane) is not None:
                self.results[lane] = batch.result(lane)
        self.clock = batch.result("clock") or self.clock
        summary, rows = batch.result("summary"), batch.items("sweep")
        self.new_summary, self.new_rows = summary is not None, len(rows)
        self.summary = summary or self.summary
        self.sweep += rows
        self.cancelled |= batch.cancelled
        self.reason = batch.reason or self.reason
        return self

    def running(self, lane: str) -> bool:
        return lane not in self.results and not self.cancelled

    def side(self, lane: str) -> dict:
        """A side while racing, for the API: {"step", "total_steps", "partial" (masked as '·'), "seconds"}."""
        t = self.traces[lane]
        now = dict(step=t.frames[-1].step, total_steps=t.frames[-1].total_steps, partial=t.partial()) \
            if t.frames else {}
        return {**now, "seconds": self.clock[lane]}

    def result(self) -> dict:
        """The finished race, for the API: {"dlm": run, "ar": run, "winner", "sweep"}."""
        s = self.summary
        return dict(dlm=s["dlm"], ar=s["ar"], winner=s["winner"], sweep=list(self.sweep))


# ------------------------------------------------------------------------------------------------------ sweeps
def infill_sweep_job(model, request: Infill, config: SamplerConfig, lengths: list[int]):
    """Fill the same template with every span set to each n in `lengths` (steps capped at the masked tokens of
    each run). Lane "sweep": {n, text, spans, segments: [(text, generated?)], nfe, seconds} per n."""
    def job():
        for n in lengths:
            if request.use_template:
                filled = with_span_length(request.template, n)
                g = model.fill(filled, cap_steps(config, masked_tokens(filled)))
                spans = iter(g.spans or [])
                segments = [(p, False) if isinstance(p, str) else (next(spans, ""), True)
                            for _, p in attach_spaces(split_template(filled))[0]]   # as the text was rebuilt
            else:
                g = model.infill(request.prefix, request.suffix, n, cap_steps(config, n))
                segments = [(request.prefix, False), ((g.spans or [""])[0], True), (request.suffix, False)]
            yield "sweep", dict(n=n, text=g.text, spans=g.spans or [], segments=segments, nfe=g.nfe,
                                seconds=g.seconds)
    return job


def scoreboard_job(model, ar, examples: list, base: SamplerConfig):
    """Every example (with an expected answer) through the DLM (`base` with the example's length and steps) and
    the AR model `ar` (`dlm.fewshot.run_example`, as `dlm-eval --tasks incontext`). Lane "row": {name, title,
    expected, dlm, dlm_ok, ar, ar_ok} per example."""
    def job():
        for e in examples:
            d, d_ok = run_example(model, e, base, "dlm")
            a, a_ok = run_example(model, e, base, "ar", ar_model=ar)
            yield "row", dict(name=e.name, title=e.label, expected=e.expected, dlm=answer_of(d), dlm_ok=d_ok,
                              ar=answer_of(a), ar_ok=a_ok)
    return job


# -------------------------------------------------------------------------------------------------- measuring
def time_to_first_frame(backend, prompt: str, config: Optional[SamplerConfig] = None, **overrides) -> float:
    """Seconds from asking `backend` for a generation to its first animated frame, as a user of the playground
    waits for it (tokenizing, the worker start and the first forward; the rest of the run is cancelled)."""
    cfg = (config or backend.base_config(Task.WRITE)).replace(**overrides)
    t0 = time.perf_counter()
    run = backend.generate(prompt, cfg)
    try:
        for batch in run.batches():
            if batch.frames():
                return time.perf_counter() - t0
    finally:
        run.cancel()
    raise ValueError("the run ended without a frame")
