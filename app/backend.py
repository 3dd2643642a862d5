"""The playground's one road to a model, for the UI and the named API alike: a thin facade that composes

    app/checks.py       request checking (fields, sampler knobs, prompt limits, templates, edits) and messages
    app/worker.py       Run: the worker thread, cancellation, the time limit, throttled delivery
    app/model_lifecycle.py  load / switch / free the DLM and its AR counterpart; Display (how a model's tokens show)
    app/experiments.py  the race (+ RaceState, its one reader), the span-length sweep, the scoreboard, first frame
    app/render.py       all drawing, the Model tab's Markdown included

Each method checks its request before any model work and starts a `Run` whose `display` is the display context
of the model that run uses (tabs draw from `run.display`, never from whatever model is loaded by then). No Gradio.

    b = Backend(); b.load("smollm2-135m-dlm")
    cfg = b.sampler({"max_new_tokens": 32, "steps": 16})          # UI / API values on the model's recommended config
    run = b.generate("Once upon a time", cfg, session="s1")         # a Run: the work has started in its worker
    for batch in run.batches(): ...                                  # throttled Frames, then the Generation
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

from app import MAX_NEW_TOKENS, MAX_PROMPT_TOKENS, TIME_LIMIT_S, experiments, render
from app.checker import Checker, prompt_limit
from app.checks import DEFAULT_BOUNDS, Bounds, cap_steps, sampler_config
from app.model_lifecycle import Display, ModelInfo, Models, SwitchPolicy, memory_estimate, process_memory
from app.worker import Run, Worker, lane
from dlm.quality import judge_ppl
from dlm.sampler_config import SamplerConfig, Task


@dataclass
class Prompted:
    """The API's form of a finished canvas: the prompt (a one-message chat when `chat`) and the generated ids."""

    prompt: Any
    token_ids: Any
    chat: Any = False


def forwards(steps: Optional[int], tokens: int, default_steps: int) -> int:
    """A request's estimated work for the worker's order: `steps` forwards (None: `default_steps`) over a canvas of
    `tokens` tokens, in token-forwards. A rough guide (cached decoders do less); the worker learns its seconds."""
    return (steps or default_steps) * max(tokens, 1)


class Backend:
    """The worker (`worker`: lock, limits, fair order, runs per session) and the models (`models`) behind one
    object.

    min_frame_interval: at most one delivery per this many seconds while streaming (default 1/15 s).
    max_prompt_tokens:  the longest prompt (or infilling context) one request may have (None = the model's context).
    max_new_tokens:     the most tokens one request may generate or fill (None = the model's context); with the
                        prompt limit it bounds every canvas, checked before anything is built for a request.
    time_limit:         seconds of model work one request may take (None = no limit).
    per_client:         requests one client address may have waiting besides its running one (more are refused
                        before they wait, as information).
    max_waiting:        requests allowed to wait in all (None = no bound).
    policy:             which models users may switch to (`SwitchPolicy`; default: none).
    attn_implementation: for every `dlm.load` (auto / sdpa / eager / flash_attention_2).
    """

    def __init__(self, min_frame_interval: float = 1 / 15, *, max_prompt_tokens: Optional[int] = MAX_PROMPT_TOKENS,
                 time_limit: Optional[float] = TIME_LIMIT_S, per_client: int = 4, max_waiting: Optional[int] = None,
                 policy: SwitchPolicy = SwitchPolicy(), attn_implementation: str = "auto",
                 max_new_tokens: Optional[int] = MAX_NEW_TOKENS):
        self.worker = Worker(min_frame_interval, time_limit, per_client=per_client, max_waiting=max_waiting)
        self.models = Models(self.worker, policy, attn_implementation)
        self.max_prompt_tokens = max_prompt_tokens
        self.max_new_tokens = max_new_tokens

    # ---------------------------------------------------------------------------------------- the models
    @property
    def model(self):
        return self.models.model

    @property
    def info(self) -> ModelInfo:
        return self.models.info

    @property
    def loads(self) -> int:
        return self.models.loads

    def load(self, source: str, **kwargs) -> ModelInfo:
        """`Models.load`: the DLM from a registry name, local path or hub id (the previous one back on failure)."""
        return self.models.load(source, **kwargs)

    def switch(self, source: str, **kwargs) -> ModelInfo:
        """`Models.switch`: a user's load, within this server's `SwitchPolicy` (refused when switching is off)."""
        return self.models.switch(source, **kwargs)

    @property
    def switching(self) -> SwitchPolicy:
        return self.models.policy

    def load_default(self, model: Optional[str] = None, ar_model: Optional[str] = None, **kwargs) -> ModelInfo:
        """`Models.load_default`: what app.py asked for, or the adapted default with its fallback."""
        return self.models.load_default(model, ar_model, **kwargs)

    def free(self) -> None:
        self.models.free()

    def require_model(self):
        return self.models.require()

    def ar_model(self):
        return self.models.ar_model()

    def notice(self) -> str:
        return self.models.info.notice

    @staticmethod
    def memory_estimate(name: str) -> Optional[dict]:
        """`app.model_lifecycle.memory_estimate`: a registry model's weights per precision (GiB), before it loads."""
        return memory_estimate(name)

    def status_markdown(self) -> str:
        """The Model tab's summary of what is loaded, its memory, the limits per request and each tab's mode."""
        model = self.models.model
        if model is None:
            return render.NO_MODEL
        return render.model_status(
            self.info, prompt_limit=prompt_limit(model, self.max_prompt_tokens), time_limit=self.worker.time_limit,
            memory=process_memory(), modes=render.decoding_modes(self.base_config(Task.WRITE),
                                                                  self.base_config(Task.INFILL),
                                                                  self.base_config(Task.DENOISE)))

    # ---------------------------------------------------------------------------------------- configs
    def base_config(self, task: Task = Task.WRITE) -> SamplerConfig:
        return self.models.base_config(task)

    def sampler(self, values: Optional[dict] = None, task: Task = Task.WRITE) -> SamplerConfig:
        """UI / API sampler values -> a validated SamplerConfig on the model's recommended one for `task`,
        each knob within what one request may cost (`bounds`)."""
        task = Task.parse(task)
        return sampler_config(values or {}, self.base_config(task), infill=task is Task.INFILL, bounds=self.bounds())

    def bounds(self) -> Bounds:
        """The size bounds of one request under the loaded model and this server's limits."""
        model = self.models.model
        if model is None:
            return DEFAULT_BOUNDS
        return Checker(model, self.max_prompt_tokens, self.max_new_tokens).bounds

    # ---------------------------------------------------------------------------------------- runs
    def start(self, job: Callable[[], Iterator[tuple[str, Any]]], session: Optional[str] = None, model=None,
              cost: float = 0.0) -> Run:
        """Run `job` in the worker; `model` (the one the job uses) gives the run its display context; `cost` its
        estimated work (`forwards`), for the worker's fair order."""
        return self.worker.start(job, session, Display.of(model) if model is not None else None, cost)

    def stop(self, session: Optional[str]) -> bool:
        """Stop the session's running work now (before the next transformer layer); True if one was running."""
        return self.worker.stop(session)

    def _checked(self, session: Optional[str] = None):
        """(the loaded model, a Checker of one request against it and this server's limits); a client already at
        its bound of waiting requests is refused first, before anything is tokenized (`Worker.admit`)."""
        self.worker.admit(session)
        model = self.require_model()
        return model, Checker(model, self.max_prompt_tokens, self.max_new_tokens)

    # ---------------------------------------------------------------------------------------- model work
    def generate(self, prompt, config: SamplerConfig, *, chat=False, pins=None, session: Optional[str] = None
                 ) -> Run:
        """Denoise a continuation of `prompt` (a one-message chat when `chat`; `pins` = {offset: word} held fixed,
        full decoder only). Lane "dlm": Frames, then the Generation."""
        model, check = self._checked(session)
        pins = check.pins(pins, config)
        if pins:  # the steps of the shared slider count the positions left to generate
            config = cap_steps(config, config.max_new_tokens - len(pins))
        p = check.prompt(prompt, chat, new_tokens=config.max_new_tokens)
        n = config.max_new_tokens
        run = self.start(lambda: lane("dlm", model.stream(p.text, config, messages=p.messages, pins=pins or None)),
                         session, model, forwards(config.steps, p.n_tokens + n, n))
        run.prompt_tokens = p.n_tokens
        return run

    def prompt_ids(self, prompt, chat=False) -> list[int]:
        """The token ids of a prompt (or a one-message chat) as the model sees it, after the limits."""
        return self._checked()[1].prompt(prompt, chat).ids

    def infill(self, config: SamplerConfig, *, template=None, prefix=None, suffix=None, length=None,
               use_template: Optional[bool] = None, session: Optional[str] = None) -> Run:
        """Fill a `[MASK:n]` template, or prefix + `length` tokens + suffix (use_template None: a template when one
        is given). Steps above the masked tokens are capped. Lane "dlm": Frames, then the Generation."""
        model, check = self._checked(session)
        r = check.infill(template, prefix, suffix, length, use_template)
        config = cap_steps(config, r.masked)
        cost = forwards(config.steps, r.fixed + r.masked, r.masked)
        if r.use_template:
            return self.start(lambda: lane("dlm", model.stream_fill(r.template, config)), session, model, cost)
        return self.start(lambda: lane("dlm", model.stream_infill(r.prefix, r.suffix, r.masked, config)), session,
                          model, cost)

    def redenoise(self, tokens, n_prompt: Optional[int], edits, config: SamplerConfig, *,
                  session: Optional[str] = None) -> Run:
        """Remask spans of a finished canvas (`tokens` = prompt ids + generated ids, the first `n_prompt` fixed; or
        a `Prompted`: a prompt and the generated ids, as the API gets them) and denoise only them, everything else
        identical. `edits`: [(start, end, new_length or None)] offsets into the generated tokens, end exclusive.
        Lane "dlm": Frames, then the Generation (whole canvas); `run.prompt_tokens` = the prompt's length."""
        model, check = self._checked(session)
        if isinstance(tokens, Prompted):
            prompt_ids = check.prompt(tokens.prompt, tokens.chat).ids
            tokens, n_prompt = prompt_ids + check.fields(token_ids=tokens.token_ids)["token_ids"], len(prompt_ids)
        e = check.edit(tokens, n_prompt, edits)
        config = cap_steps(config, e.remasked)
        run = self.start(lambda: lane("dlm", model.stream_redenoise(e.tokens, e.fixed, e.edits, config)), session,
                         model, forwards(config.steps, len(e.tokens), e.remasked))
        run.prompt_tokens = n_prompt
        return run

    def ar_continue(self, prompt, max_new_tokens: int, config: SamplerConfig, *, session: Optional[str] = None
                    ) -> Run:
        """The AR counterpart continuing `prompt` (for infilling: the prefix only, as in the paper's Table 1).
        Lane "ar": Frames, then the Generation."""
        model, check = self._checked(session)
        ar = self.ar_model()
        n = check.fields(length=max_new_tokens)["length"] or config.max_new_tokens
        check.new_tokens(n, "length")
        p = check.prompt(prompt, False, new_tokens=n, what="prefix")
        cfg = config.replace(max_new_tokens=n)
        return self.start(lambda: lane("ar", model.ar_stream(p.text, cfg, ar_model=ar)), session, model,
                          p.n_tokens + n)  # cached: one token per forward

    def gen_ppl(self, prompt: str, continuation: str) -> Optional[float]:
        """Judge-PPL: perplexity of `continuation` given `prompt` under the AR model (lower = more fluent);
        None for an empty continuation."""
        with self.worker.lock:
            return judge_ppl(self.ar_model(), prompt, continuation)

    # ---------------------------------------------------------------------------------------- experiments
    def race(self, prompt, config: SamplerConfig, *, chat=False, sweep_steps=None, sweep_field: Optional[str] = None,
             session: Optional[str] = None) -> Run:
        """The DLM against the AR model, taking turns by model time, then a sweep of one setting: `sweep_steps`
        are the values of `sweep_field` (None: the decoder's own, `requests.sweep_field`: steps for full /
        blocks, block_length for speculative), each checked with `config` before anything runs
        (`experiments.race_job`). Read its batches with `experiments.RaceState`."""
        model, check = self._checked(session)
        ar = self.ar_model()
        field, values = check.sweep(sweep_steps, config, sweep_field)
        p = check.prompt(prompt, chat, new_tokens=config.max_new_tokens)
        n = config.max_new_tokens
        steps = [config.steps] + [v if field == "steps" else config.steps for v in values]
        cost = sum(forwards(s, p.n_tokens + n, n) for s in steps) + p.n_tokens + n
        run = self.start(experiments.race_job(model, ar, p, config, field, values), session, model, cost)
        run.prompt_tokens = p.n_tokens
        return run

    def infill_sweep(self, config: SamplerConfig, lengths, *, template=None, prefix=None, suffix=None,
                     use_template: Optional[bool] = None, session: Optional[str] = None) -> Run:
        """Fill the same template with every span set to each n in `lengths` (`experiments.infill_sweep_job`)."""
        model, check = self._checked(session)
        lengths = check.span_lengths(lengths)
        r = check.infill(template, prefix, suffix, None, use_template, lengths=lengths)
        cost = sum(forwards(min(config.steps or n * r.spans, n * r.spans), r.fixed + n * r.spans, n * r.spans)
                   for n in lengths)
        return self.start(experiments.infill_sweep_job(model, r, config, lengths), session, model, cost)

    def scoreboard(self, examples, *, session: Optional[str] = None) -> Run:
        """Every example with an expected answer through both models (`experiments.scoreboard_job`)."""
        model, ar = self.require_model(), self.ar_model()
        scored = [e for e in examples if e.expected]
        if not scored:
            raise ValueError("examples: none has an expected answer to score")
        job = experiments.scoreboard_job(model, ar, scored, self.base_config(Task.WRITE))
        cost = sum(forwards(e.steps, len(e.prompt) // 4 + e.max_new_tokens, e.max_new_tokens) + e.max_new_tokens
                   for e in scored)
        return self.start(job, session, model, cost)

    def export(self, trace, *, session: Optional[str] = None) -> Run:
        """A run's animation as a GIF and an HTML replay (`render.export_animation`: frames x tokens bounded, one
        bounded folder), as work of the worker: in its fair order, under its lock and time limit. Lane "files"."""
        render.export_cells(trace)  # refused before it waits, when even two frames are too big

        def job():
            yield "files", render.export_animation(trace)
        return self.start(job, session)

    def time_to_first_frame(self, prompt: str, config: Optional[SamplerConfig] = None, **overrides) -> float:
        """Seconds until the first animated frame (for bench/: `experiments.time_to_first_frame`)."""
        return experiments.time_to_first_frame(self, prompt, config, **overrides)


# The tabs import this facade (with app.events, app.render and app.tabs.common) and nothing else of app/: what they
# need from behind it is re-exported here (load options, the race's lanes and reader, sweeps, edits, widget values).
from app.checks import check_sweep, default_sweep, sweep_field, sweep_fields, ui_edit, ui_value  # noqa: E402, I001
from app.experiments import LANES, RaceState  # noqa: E402
from app.model_lifecycle import DEVICES, DTYPES, QUANTIZATIONS  # noqa: E402

__all__ = ["Backend", "Prompted", "forwards", "check_sweep", "default_sweep", "sweep_field", "sweep_fields", "ui_edit",
           "ui_value", "LANES", "RaceState", "DEVICES", "DTYPES", "QUANTIZATIONS", "Run"]
