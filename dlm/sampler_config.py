"""`SamplerConfig`: every decoding knob in one validated dataclass (the idea of transformers' GenerationConfig).

It is passed whole through the library (`model.generate(prompt, config, **overrides)`), the CLI (its flags are
generated from the fields), the app (its widgets are built from the fields), evals and bench. A model directory may
carry its recommended one as `sampler_config.json`; `dlm.load` then makes it the model's default everywhere.

A new knob is one field here: its metadata says what it means (help), what the UI shows (label, range) and which
value a UI control uses for "off" (`off`: e.g. threshold 0 = None), so the CLI, the widgets and the API stay in step.

    cfg = SamplerConfig(max_new_tokens=48, decoder="blocks", block_length=4, threshold=0.9)
    cfg = cfg.replace(temperature=0.7)                      # validated copy
    SamplerConfig.from_dict({"steps": "8", "seed": -1}, ui=True)   # UI values: strings, sentinels
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional, Union

from .decoders import DECODERS
from .reveal import REVEAL_RULES

SAMPLER_CONFIG_NAME = "sampler_config.json"
MAX_SEED = 2**63 - 1


class SamplerConfigError(ValueError):
    """A bad sampler setting; the message names the field and what is allowed."""


def knob(default, help: str, *, label: str = "", minimum=None, maximum=None, step=None, off=None,
         choices: Optional[str] = None, ui: bool = True):
    """A SamplerConfig field with what the CLI and the UI need to present it.

    minimum / maximum: the allowed range (maximum None = unbounded; the UI picks a slider range itself).
    off:      the value a UI control sends for None ("off"), e.g. 0 for the threshold slider, -1 for the seed.
    choices:  the name of the registry whose keys are the allowed values ("decoders", "reveal_rules").
    ui:       False for knobs the playground does not show.
    """
    return field(default=default, metadata=dict(help=help, label=label, minimum=minimum, maximum=maximum, step=step,
                                                off=off, choices=choices, ui=ui))


def registry_choices(name: str) -> list[str]:
    """The allowed values of a field whose metadata names a registry."""
    return list({"decoders": DECODERS, "reveal_rules": REVEAL_RULES}[name])


@dataclass
class SamplerConfig:
    """How a diffusion LM decodes. Defaults are the paper's full-attention sampler, one token per step, greedy.

    decoder:        "full" = the paper's full attention over the whole canvas (any order, infilling, LLaDA-style
                    semi-autoregressive blocks, approximate prefix cache); "blocks" = block diffusion with an
                    exact KV cache of finished blocks (causal across blocks, bidirectional inside one; needs a
                    model trained for it) that stops at EOS; "speculative" = block diffusion drafting a block in
                    parallel and verifying it with the model's own clean (AR) rows (exact speculative sampling).
    max_new_tokens: tokens to generate after a prompt (infilling templates fix their own lengths).
    steps:          denoising steps (= forward evaluations) for all max_new_tokens, 1 .. the number of tokens;
                    None = one token per step.
    block_length:   tokens per block: for "full", semi-autoregressive blocks decoded left to right (None = one
                    block over the whole region); for "blocks", the block size (required).
    remasking:      reveal rule (`dlm.reveal`): confidence / margin / entropy (most certain first) or random (the
                    paper's Algorithm 2).
    threshold:      Fast-dLLM parallel decoding: also reveal every masked position of the current block whose
                    confidence >= threshold, so blocks may finish in fewer steps. None = off.
    temperature:    0 = greedy; > 0 samples from softmax(logits / temperature) (certainty stays untempered).
    top_p / top_k:  nucleus / top-k filtering of the sampling distribution (1.0 / 0 = off).
    suppress_eos:   never write an end-of-sequence token.
    stop_at_eos:    "blocks": stop after the first block that holds an EOS (no fixed length).
    use_cache:      "full": Fast-dLLM's approximate prefix cache at block starts ("blocks" always caches exactly).
    seed:           seeds every random draw (None = fresh randomness).
    """

    decoder: str = knob("full", "decoding algorithm: full (the paper's full attention: any order, infilling), "
                                "blocks (block diffusion, exact KV cache, stops at EOS) or speculative (block "
                                "drafts verified by the model's own AR rows)",
                        label="Decoder", choices="decoders")
    max_new_tokens: int = knob(64, "tokens to generate after the prompt", label="Length (new tokens)", minimum=1,
                               maximum=None, step=1)
    steps: Optional[int] = knob(None, "denoising steps for all new tokens, 1 .. the number of tokens (default: one "
                                      "token per step)", label="Steps (1 … length)", minimum=1, step=1)
    block_length: Optional[int] = knob(None, "tokens per block (full: semi-autoregressive blocks, default one "
                                             "block; blocks: the block size)", label="Block length (0 = one block)",
                                       minimum=1, step=1, off=0)
    remasking: str = knob("confidence", "reveal rule: confidence, margin, entropy (most certain first) or random "
                                        "(the paper's Algorithm 2)", label="Remasking order", choices="reveal_rules")
    threshold: Optional[float] = knob(None, "parallel decoding: also reveal every position whose confidence >= "
                                            "threshold (in (0, 1])", label="Parallel-decoding threshold (0 = off)",
                                      minimum=0.0, maximum=1.0, step=0.05, off=0.0)
    temperature: float = knob(0.0, "0 = greedy; > 0 samples", label="Temperature (0 = greedy)", minimum=0.0,
                              maximum=None, step=0.05)
    top_p: float = knob(1.0, "nucleus sampling mass in (0, 1] (1 = off)", label="Top-p", minimum=0.0, maximum=1.0,
                        step=0.05)
    top_k: int = knob(0, "top-k sampling (0 = off)", label="Top-k (0 = off)", minimum=0, step=1)
    suppress_eos: bool = knob(False, "never generate an end-of-sequence token", label="Suppress EOS")
    stop_at_eos: bool = knob(True, "blocks decoder: stop after the first block holding an EOS",
                             label="Stop at EOS (blocks)")
    use_cache: bool = knob(False, "full decoder: approximate prefix KV cache at block starts (Fast-dLLM)",
                           label="Prefix cache (full)")
    seed: Optional[int] = knob(None, "seed for reproducible sampling (an integer in 0..2**63-1)",
                               label="Seed (-1 = random)", minimum=0, maximum=MAX_SEED, step=1, off=-1)

    def __post_init__(self):
        self.validate()

    # ----- validation --------------------------------------------------------------------------------------------
    def validate(self) -> "SamplerConfig":
        """Check every field's type and range, and the combinations; raise SamplerConfigError naming the field."""
        for f in fields(self):
            setattr(self, f.name, _coerce(f, getattr(self, f.name), ui=False))
        if getattr(DECODERS[self.decoder], "needs_block_length", False) and self.block_length is None:
            raise SamplerConfigError(f"block_length: the {self.decoder} decoder needs a block size (an integer >= 1), "
                                     "e.g. the one the model was trained with (see its sampler_config.json)")
        if self.threshold is not None and not getattr(REVEAL_RULES[self.remasking], "uses_threshold", True):
            raise SamplerConfigError(f"threshold: needs a certainty-based remasking ("
                                     f"{', '.join(r for r, f in REVEAL_RULES.items() if getattr(f, 'uses_threshold', True))}"
                                     f"), not {self.remasking}")
        return self

    def replace(self, **changes) -> "SamplerConfig":
        """A validated copy with some fields changed (values are coerced as in `from_dict`)."""
        if not changes:
            return self
        _check_names(changes)
        values = self.to_dict()
        values.update(changes)
        return SamplerConfig.from_dict(values)

    # ----- conversions -------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict, *, ui: bool = False) -> "SamplerConfig":
        """Build from a mapping (JSON, CLI, API or UI values). Unknown keys are an error naming them; values are
        coerced to the field's type ("8" -> 8, 8.0 -> 8) with a message naming the field when that fails.
        ui=True also maps each field's `off` sentinel (e.g. threshold 0, seed -1) to None and drops None values
        (a cleared UI box keeps the default)."""
        if not isinstance(values, dict):
            raise SamplerConfigError(f"sampler config: expected a mapping of fields, got {type(values).__name__}")
        _check_names(values)
        kwargs = {}
        by_name = {f.name: f for f in fields(cls)}
        for name, value in values.items():
            if ui and (value is None or (isinstance(value, str) and not value.strip())):
                continue
            kwargs[name] = _coerce(by_name[name], value, ui=ui)
        return cls(**kwargs)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"

    def save_pretrained(self, directory: Union[str, os.PathLike]) -> Path:
        """Write `sampler_config.json` into a model directory (the model's recommended decoding)."""
        path = Path(directory) / SAMPLER_CONFIG_NAME
        path.write_text(self.to_json_string())
        return path

    @classmethod
    def from_pretrained(cls, directory: Union[str, os.PathLike]) -> Optional["SamplerConfig"]:
        """The `sampler_config.json` of a model directory, or None when it has none."""
        path = Path(directory) / SAMPLER_CONFIG_NAME
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise SamplerConfigError(f"{path} is not valid JSON: {e}") from None
        try:
            return cls.from_dict(data)
        except SamplerConfigError as e:
            raise SamplerConfigError(f"{path}: {e}") from None

    # ----- per-generation plan -----------------------------------------------------------------------------------
    def steps_for(self, n_tokens: int) -> int:
        """Steps for a region of `n_tokens`: `steps` (default one per token); more than `n_tokens` is an error."""
        if self.steps is not None and self.steps > n_tokens:
            raise SamplerConfigError(f"steps: must be between 1 and the generation length {n_tokens}, "
                                     f"got {self.steps}")
        return self.steps or n_tokens

    @staticmethod
    def describe() -> list[dict]:
        """Every field with its metadata (name, type, default, help, label, range, off, choices) for UIs."""
        out = []
        for f in fields(SamplerConfig):
            meta = dict(f.metadata)
            if meta.get("choices"):
                meta["choices"] = registry_choices(meta["choices"])
            out.append(dict(name=f.name, type=_base_type(f), optional=_optional(f), default=f.default, **meta))
        return out


# ----- coercion ----------------------------------------------------------------------------------------------------------
_TRUE, _FALSE = {"true", "yes", "on", "1"}, {"false", "no", "off", "0"}


def _optional(f) -> bool:
    return "Optional" in str(f.type) or "None" in str(f.type)


def _base_type(f) -> type:
    text = str(f.type)
    for name, t in (("bool", bool), ("int", int), ("float", float), ("str", str)):
        if name in text:
            return t
    return str


def _check_names(values: dict) -> None:
    known = [f.name for f in fields(SamplerConfig)]
    for key in values:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=2, cutoff=0.6)
            hint = f" (did you mean {' or '.join(close)}?)" if close else f"; known: {', '.join(known)}"
            raise SamplerConfigError(f"unknown sampler setting {key!r}{hint}")


def _coerce(f, value: Any, *, ui: bool) -> Any:
    """One value -> the field's type and range, or SamplerConfigError naming the field."""
    name, meta, kind, optional = f.name, f.metadata, _base_type(f), _optional(f)
    if ui and meta.get("off") is not None and value is not None and not isinstance(value, bool):
        try:
            if float(value) == float(meta["off"]):
                return None if optional else f.default
        except (TypeError, ValueError):
            pass
    if value is None:
        if optional:
            return None
        raise SamplerConfigError(f"{name}: required, got None")
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, (int, float)) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise SamplerConfigError(f"{name}: must be true or false, got {value!r}")
    if kind is str:
        if not isinstance(value, str):
            raise SamplerConfigError(f"{name}: must be a string, got {value!r}")
        value = value.strip()
        if meta.get("choices"):
            allowed = registry_choices(meta["choices"])
            if value not in allowed:
                raise SamplerConfigError(f"{name}: must be one of {', '.join(allowed)}, got {value!r}")
        return value
    number = _number(name, value, integer=kind is int)
    lo, hi = meta.get("minimum"), meta.get("maximum")
    if name == "threshold" and not 0 < number <= 1:
        off = f"{meta['off']:g}" if ui else "None"
        raise SamplerConfigError(f"threshold: must be in (0, 1] (or {off} = off), got {value!r}")
    if name == "top_p" and not 0 < number <= 1:
        raise SamplerConfigError(f"top_p: must be in (0, 1], got {value!r}")
    if lo is not None and number < lo or hi is not None and number > hi:
        span = f"between {lo} and {hi}" if hi is not None else f">= {lo}"
        what = "an integer" if kind is int else "a number"
        off = f" (or {meta['off']} = off)" if ui and meta.get("off") is not None else (
            " (or None)" if optional else "")
        raise SamplerConfigError(f"{name}: must be {what} {span}{off}, got {value!r}")
    return number


def _number(name: str, value: Any, *, integer: bool):
    what = "an integer" if integer else "a number"
    if isinstance(value, bool):
        raise SamplerConfigError(f"{name}: must be {what}, got {value!r}")
    if isinstance(value, str):
        text = value.strip()
        try:
            value = int(text) if integer and text.lstrip("+-").isdigit() else float(text)
        except ValueError:
            raise SamplerConfigError(f"{name}: must be {what}, got {value!r}") from None
    if isinstance(value, int):
        return value if integer else float(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise SamplerConfigError(f"{name}: must be a finite {what[3:] if integer else 'number'}, got {value!r}")
        if integer:
            if not value.is_integer():
                raise SamplerConfigError(f"{name}: must be a whole number, got {value!r}")
            return int(value)
        return value
    try:  # numpy scalars and the like
        return _number(name, float(value), integer=integer)
    except (TypeError, ValueError):
        raise SamplerConfigError(f"{name}: must be {what}, got {value!r}") from None
