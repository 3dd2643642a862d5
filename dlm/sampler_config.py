"""`SamplerConfig`: every decoding knob in one validated dataclass (the idea of transformers' GenerationConfig).

It is passed whole through the library (`model.generate(prompt, config, **overrides)`), the CLI (its flags are
generated from the fields), the app (its widgets are built from the fields), evals and bench. A model directory may
carry its recommended ones as `sampler_config.json` (`save_sampler_configs` / `load_sampler_configs`, this module
owns the file); `dlm.load` then makes them the model's defaults everywhere.

A new knob is one field here: its metadata says what it means (help), what the UI shows (label, range), which
value a UI control uses for "off" (`off`: e.g. threshold 0 = None) and whether only some decoders read it
(`per_decoder`: each decoder declares which it uses, `dlm.decoders.registry`), so the CLI, the widgets, the API
and the notes about ignored settings stay in step. This module does not import torch.

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
import warnings
from dataclasses import dataclass, field, fields
from enum import Enum
from pathlib import Path
from typing import Any, Optional, Union

from .decoders.registry import DECODERS, REVEAL_RULES

SAMPLER_CONFIG_NAME = "sampler_config.json"
MAX_SEED = 2**63 - 1
# Temperature: logits are divided by it in float32 (`dlm.token_sampling` upcasts first). float32 holds at most
# ~3.4e38, so at T = 1e-3 logits up to ~3.4e35 stay finite (real ones are < 1e4); below 1e-3, softmax(logits / T)
# is already one-hot to float32 precision for any logit gap over 0.1 (exp(-100) ~ 4e-44 is below its smallest
# normal), i.e. greedy, and 5e-324 or 1e-300 become 0 in float32 (a division by zero: no token, masks stay). Above
# 100 the draw is uniform to within exp(30 / 100) for any real logit range, and an infinite T turns the banned
# tokens' -inf into NaN. So a temperature is 0 (greedy) or in [1e-3, 100].
MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-3, 100.0


class SamplerConfigError(ValueError):
    """A bad sampler setting; the message names the field and what is allowed."""


class IgnoredSettingWarning(UserWarning):
    """A setting changed from its default that the chosen decoder does not read (`SamplerConfig.ignored_settings`)."""


def knob(default, help: str, *, label: str = "", minimum=None, maximum=None, step=None, off=None,
         choices: Optional[str] = None, per_decoder: bool = False, ar: bool = False, ui: bool = True):
    """A SamplerConfig field with what the CLI and the UI need to present it.

    minimum / maximum: the allowed range (maximum None = unbounded; the UI picks a slider range itself).
    off:         the value a UI control sends for None ("off"), e.g. 0 for the threshold slider, -1 for the seed.
    choices:     the name of the registry whose keys are the allowed values ("decoders", "reveal_rules").
    per_decoder: only the decoders that declare it in their `uses` read it; the others ignore it (and a config
                 that changes it for one of them gets a note). False = every decoder reads it.
    ar:          left-to-right generation (`model.ar_generate` / `ar_stream`, the AR baseline) reads it too; the
                 CLI refuses the others with --ar, evaluations leave the others out of an AR run's settings.
    ui:          False for knobs the playground does not show.
    """
    return field(default=default, metadata=dict(help=help, label=label, minimum=minimum, maximum=maximum, step=step,
                                                off=off, choices=choices, per_decoder=per_decoder, ar=ar, ui=ui))


REGISTRIES = {"decoders": DECODERS, "reveal_rules": REVEAL_RULES}


def registry_choices(name: str) -> list[str]:
    """The allowed values of a field whose metadata names a registry."""
    return list(REGISTRIES[name])


@dataclass
class SamplerConfig:
    """How a diffusion LM decodes. Defaults are the paper's full-attention sampler, one token per step, greedy.

    decoder:        the decoding algorithm, a name in `dlm.decoders.DECODERS` ("full": the paper's sampler, any
                    order, infilling; "blocks": block diffusion with an exact KV cache; "speculative": block drafts
                    verified by the model's own AR rows; or one you register). Each decoder declares which of the
                    per-decoder settings below it reads (`ignored_settings` lists the changed ones it does not).
    max_new_tokens: tokens to generate after a prompt (infilling templates fix their own lengths).
    steps:          denoising steps (= forward evaluations) for all max_new_tokens, 1 .. the number of tokens;
                    None = one token per step.
    block_length:   tokens per block: for "full", semi-autoregressive blocks decoded left to right (None = one
                    block over the whole region); for "blocks", the block size (required).
    remasking:      reveal rule, a name in `dlm.decoders.REVEAL_RULES` (`dlm.reveal`): confidence / margin /
                    entropy (most certain first) or random (the paper's Algorithm 2).
    threshold:      Fast-dLLM parallel decoding: also reveal every masked position of the current block whose
                    confidence >= threshold, so blocks may finish in fewer steps. None = off.
    temperature:    0 = greedy; > 0 samples from softmax(logits / temperature) (certainty stays untempered).
    top_p / top_k:  nucleus / top-k filtering of the sampling distribution (1.0 / 0 = off).
    suppress_eos:   never write an end-of-sequence token.
    stop_at_eos:    block-wise decoders: stop after the first block that holds an EOS (no fixed length).
    use_cache:      "full": Fast-dLLM's approximate prefix cache at block starts ("blocks" always caches exactly).
    Per-decoder settings (`per_decoder` in their metadata): steps, block_length, remasking, threshold,
    stop_at_eos, use_cache; the others apply to every decoder.
    seed:           seeds every random draw (None = fresh randomness).
    """

    decoder: str = knob("full", "decoding algorithm", label="Decoder", choices="decoders")
    max_new_tokens: int = knob(64, "tokens to generate after the prompt", label="Length (new tokens)", minimum=1,
                               maximum=None, step=1, ar=True)
    steps: Optional[int] = knob(None, "denoising steps for all new tokens, 1 .. the number of tokens (default: one "
                                      "token per step)", label="Steps (1 … length)", minimum=1, step=1,
                                per_decoder=True)
    block_length: Optional[int] = knob(None, "tokens per block (full: semi-autoregressive blocks, default one "
                                             "block; blocks: the block size)", label="Block length (0 = one block)",
                                       minimum=1, step=1, off=0, per_decoder=True)
    remasking: str = knob("confidence", "reveal rule: which proposals a step keeps", label="Remasking order",
                          choices="reveal_rules", per_decoder=True)
    threshold: Optional[float] = knob(None, "parallel decoding: also reveal every position whose confidence >= "
                                            "threshold (in (0, 1])", label="Parallel-decoding threshold (0 = off)",
                                      minimum=0.0, maximum=1.0, step=0.05, off=0.0, per_decoder=True)
    temperature: float = knob(0.0, "0 = greedy; > 0 samples", label="Temperature (0 = greedy)", minimum=0.0,
                              maximum=None, step=0.05, ar=True)
    top_p: float = knob(1.0, "nucleus sampling mass in (0, 1] (1 = off)", label="Top-p", minimum=0.0, maximum=1.0,
                        step=0.05, ar=True)
    top_k: int = knob(0, "top-k sampling (0 = off)", label="Top-k (0 = off)", minimum=0, step=1, ar=True)
    suppress_eos: bool = knob(False, "never generate an end-of-sequence token", label="Suppress EOS", ar=True)
    stop_at_eos: bool = knob(True, "blocks decoder: stop after the first block holding an EOS",
                             label="Stop at EOS (blocks)", per_decoder=True)
    use_cache: bool = knob(False, "full decoder: approximate prefix KV cache at block starts (Fast-dLLM)",
                           label="Prefix cache (full)", per_decoder=True)
    seed: Optional[int] = knob(None, "seed for reproducible sampling (an integer in 0..2**63-1)",
                               label="Seed (-1 = random)", minimum=0, maximum=MAX_SEED, step=1, off=-1,
                               ar=True)

    def __post_init__(self):
        self.validate()

    # ----- validation --------------------------------------------------------------------------------------------
    def validate(self) -> "SamplerConfig":
        """Check every field's type and range, and the combinations; raise SamplerConfigError naming the field.
        A changed setting the decoder does not read is not an error: it is reported as an `IgnoredSettingWarning`
        (one per `ignored_settings` line), as transformers' `GenerationConfig.validate` does."""
        for f in fields(self):
            setattr(self, f.name, _coerce(f, getattr(self, f.name), ui=False))
        if DECODERS[self.decoder].block_mode and self.block_length is None:
            raise SamplerConfigError(f"block_length: the {self.decoder} decoder needs a block size (an integer >= 1), "
                                     "e.g. the one the model was trained with (see its sampler_config.json)")
        if self.threshold is not None and not REVEAL_RULES[self.remasking].uses_threshold:
            with_threshold = ", ".join(name for name, rule in REVEAL_RULES.items() if rule.uses_threshold)
            raise SamplerConfigError(f"threshold: needs a certainty-based remasking ({with_threshold}), "
                                     f"not {self.remasking}")
        for note in self.ignored_settings():
            warnings.warn(note, IgnoredSettingWarning, stacklevel=2)
        return self

    def ignored_settings(self) -> list[str]:
        """One line per per-decoder setting that was changed from its default but that the chosen decoder does not
        read (by its declaration, `dlm.decoders.registry`), naming the field and the decoder. Settings left at
        their defaults are never reported. The CLI prints these; the app shows them with the config."""
        spec = DECODERS[self.decoder]
        uses = ", ".join(spec.uses) or "none"
        return [f"{f.name}={getattr(self, f.name)!r} is ignored: the {self.decoder} decoder does not use it "
                f"(its settings: {uses})"
                for f in fields(self) if f.metadata.get("per_decoder") and f.name not in spec.uses
                and getattr(self, f.name) != f.default]

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

    # ----- per-generation plan -----------------------------------------------------------------------------------
    def steps_for(self, n_tokens: int) -> int:
        """Steps for a region of `n_tokens`: `steps` (default one per token); more than `n_tokens` is an error."""
        if self.steps is not None and self.steps > n_tokens:
            raise SamplerConfigError(f"steps: must be between 1 and the generation length {n_tokens}, "
                                     f"got {self.steps}")
        return self.steps or n_tokens

    @staticmethod
    def describe() -> list[dict]:
        """Every field with its metadata (name, type, default, help, label, range, off, choices, per_decoder) for
        UIs. A field with choices lists the registered names, and its help ends with each one's description."""
        out = []
        for f in fields(SamplerConfig):
            meta = dict(f.metadata)
            if meta.get("choices"):
                registry = REGISTRIES[meta["choices"]]
                meta["choices"] = list(registry)
                meta["help"] += ": " + "; ".join(f"{name} = {spec.description}" if spec.description else name
                                                for name, spec in registry.items())
            out.append(dict(name=f.name, type=_base_type(f), optional=_optional(f), default=f.default, **meta))
        return out


def ar_settings() -> list[str]:
    """The settings left-to-right generation reads (`ar` in their metadata), in field order."""
    return [f.name for f in fields(SamplerConfig) if f.metadata.get("ar")]


def read_by(decoder: str, values: dict) -> dict:
    """`values` (sampler settings by name) without the per-decoder settings `decoder` does not read (by its
    declaration): what a UI sends for every widget, reduced to what this decoder can use."""
    uses = DECODERS[decoder].uses
    per_decoder = {f.name for f in fields(SamplerConfig) if f.metadata.get("per_decoder")}
    return {k: v for k, v in values.items() if k not in per_decoder or k in uses}


class Task(str, Enum):
    """Which of a model's recommended configs a run starts from. A `str` enum: "write" == Task.WRITE, so string
    callers and JSON keep working; `Task.parse` turns any other string into a one-line ValueError.

    WRITE:   `model.sampler_config` (generation after a prompt; the "generate" entry of sampler_config.json).
    INFILL:  `model.infill_config` (templates, edits: always the full-attention decoder; the "infill" entry).
    DENOISE: the writing config set to show tokens decided in parallel (the playground derives it:
             `app.model_lifecycle.denoise_config`).
    """

    WRITE = "write"
    INFILL = "infill"
    DENOISE = "denoise"

    def __str__(self) -> str:
        return self.value

    @classmethod
    def parse(cls, value: Union[str, "Task"], field: str = "task") -> "Task":
        """`value` as a Task; ValueError naming `field` and the allowed values for anything else."""
        try:
            return cls(value)
        except ValueError:
            allowed = ", ".join(t.value for t in cls)
            raise ValueError(f"{field}: must be one of {allowed}, got {_short(value)}") from None


# ----- sampler_config.json: the one reader and writer ---------------------------------------------------------------
def save_sampler_configs(directory: Union[str, os.PathLike], generate: SamplerConfig, infill: SamplerConfig) -> Path:
    """Write a model directory's `sampler_config.json`: {"generate": the recommended config for writing
    (`model.sampler_config`), "infill": the one for infilling (`model.infill_config`)}. Returns its path. (Not atomic
    by itself: `DiffusionLM.save_pretrained` and the exporters write it inside a temporary directory.)"""
    path = Path(directory, SAMPLER_CONFIG_NAME)
    path.write_text(json.dumps({"generate": generate.to_dict(), "infill": infill.to_dict()}, indent=2) + "\n")
    return path


def load_sampler_configs(directory: Union[str, os.PathLike]
                         ) -> tuple[Optional[SamplerConfig], Optional[SamplerConfig]]:
    """The (generate, infill) configs of a model directory's `sampler_config.json`; (None, None) without one, None
    for a missing entry. A flat file (one config's fields, transformers' generation_config.json style) is the
    generate config. A bad file raises SamplerConfigError naming it."""
    path = Path(directory, SAMPLER_CONFIG_NAME)
    if not path.is_file():
        return None, None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise SamplerConfigError(f"{path} is not valid JSON: {e}") from None
    try:
        if isinstance(data, dict) and set(data) <= {"generate", "infill"}:
            g, i = data.get("generate"), data.get("infill")
            return (SamplerConfig.from_dict(g) if g is not None else None,
                    SamplerConfig.from_dict(i) if i is not None else None)
        return SamplerConfig.from_dict(data), None
    except SamplerConfigError as e:
        raise SamplerConfigError(f"{path}: {e}") from None


# ----- coercion -------------------------------------------------------------------------------------------------------
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
        except (TypeError, ValueError, OverflowError):
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
        raise SamplerConfigError(f"{name}: must be true or false, got {_short(value)}")
    if kind is str:
        if not isinstance(value, str):
            raise SamplerConfigError(f"{name}: must be a string, got {_short(value)}")
        value = value.strip()
        if meta.get("choices"):
            allowed = registry_choices(meta["choices"])
            if value not in allowed:
                raise SamplerConfigError(f"{name}: must be one of {', '.join(allowed)}, got {_short(value)}")
        return value
    number = _number(name, value, integer=kind is int)
    lo, hi = meta.get("minimum"), meta.get("maximum")
    if name == "threshold" and not 0 < number <= 1:
        off = f"{meta['off']:g}" if ui else "None"
        raise SamplerConfigError(f"threshold: must be in (0, 1] (or {off} = off), got {_short(value)}")
    if name == "temperature" and number != 0 and not MIN_TEMPERATURE <= number <= MAX_TEMPERATURE:
        raise SamplerConfigError(f"temperature: must be 0 (greedy) or between {MIN_TEMPERATURE:g} and "
                                 f"{MAX_TEMPERATURE:g}, got {_short(value)}")
    if name == "top_p" and not 0 < number <= 1:
        raise SamplerConfigError(f"top_p: must be in (0, 1], got {_short(value)}")
    if lo is not None and number < lo or hi is not None and number > hi:
        span = f"between {lo} and {hi}" if hi is not None else f">= {lo}"
        what = "an integer" if kind is int else "a number"
        off = f" (or {meta['off']} = off)" if ui and meta.get("off") is not None else (
            " (or None)" if optional else "")
        raise SamplerConfigError(f"{name}: must be {what} {span}{off}, got {_short(value)}")
    return number


def _number(name: str, value: Any, *, integer: bool):
    what = "an integer" if integer else "a number"
    if isinstance(value, bool):
        raise SamplerConfigError(f"{name}: must be {what}, got {_short(value)}")
    if isinstance(value, str):
        text = value.strip()
        try:
            value = int(text) if integer and text.lstrip("+-").isdigit() else float(text)
        except ValueError:
            raise SamplerConfigError(f"{name}: must be {what}, got {_short(value)}") from None
    if isinstance(value, int):
        if integer:
            return value
        try:
            return float(value)
        except OverflowError:  # an int beyond float's range (10**400)
            raise SamplerConfigError(f"{name}: must be a finite number, got {_short(value)}") from None
    if isinstance(value, float):
        if not math.isfinite(value):
            raise SamplerConfigError(f"{name}: must be a finite {what[3:] if integer else 'number'}, "
                                     f"got {_short(value)}")
        if integer:
            if not value.is_integer():
                raise SamplerConfigError(f"{name}: must be a whole number, got {_short(value)}")
            return int(value)
        return value
    try:  # numpy scalars and the like
        return _number(name, float(value), integer=integer)
    except (TypeError, ValueError, OverflowError):
        raise SamplerConfigError(f"{name}: must be {what}, got {_short(value)}") from None


def _short(value: Any, limit: int = 40) -> str:
    """`repr(value)` cut to `limit` characters (messages quote a short excerpt of what was sent, never all of
    it): a 400-digit number or a 4 MB list becomes its first characters, an ellipsis and its size."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 128:
        return f"an integer of {len(str(abs(value))) if value.bit_length() < 14000 else 'thousands of'} digits"
    try:
        text = repr(value)
    except Exception:  # noqa: BLE001  (repr of anything a request may carry)
        return f"a {type(value).__name__}"
    if len(text) <= limit:
        return text
    size = f"{len(value)} items" if isinstance(value, (list, tuple, dict)) else f"{len(text)} characters"
    return f"{text[:limit]}… ({size})"
