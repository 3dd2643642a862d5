"""Training configuration: dataclasses with working defaults, YAML presets that only override, `key=value` overrides.
(The dataclasses, their defaults and declared ranges are `train.config_schema`; this module reads and checks.)

A config is `TrainConfig` with one section per concern (model, lora, data, sft, diffusion, optim, run). A YAML file
is a nested mapping of the same shape; anything it leaves out keeps the dataclass default. Command-line overrides
are `section.field=value` (or just `field=value` when the field name is unique across sections); values are parsed
as YAML scalars/lists and then checked against the field's type.

Every error names the offending key: unknown keys (with a "did you mean"), wrong types, out-of-range values and
invalid combinations fail before any model or data is touched.
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from pathlib import Path
from typing import Optional

from .config_schema import (  # noqa: F401  (callers import the sections from here)
    SECTIONS,
    DataConfig,
    DiffusionConfig,
    LoraConfigSection,
    ModelConfig,
    OptimConfig,
    RunConfig,
    SFTConfig,
    TrainConfig,
)

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
PACKAGE_DIR = Path(__file__).resolve().parent


class ConfigError(ValueError):
    """A bad configuration key or value; the message names the key."""



# ----- keys ----------------------------------------------------------------------------------------------------------
def _field_types(cls) -> dict:
    return typing.get_type_hints(cls)


def _all_keys() -> dict[str, list[str]]:
    """field name -> sections that have it (for short `field=value` overrides)."""
    out: dict[str, list[str]] = {}
    for section in SECTIONS:
        cls = _field_types(TrainConfig)[section]
        for f in dataclasses.fields(cls):
            out.setdefault(f.name, []).append(section)
    return out


def _unknown(key: str) -> ConfigError:
    candidates = [f"{s}.{n}" for n, secs in _all_keys().items() for s in secs] + SECTIONS
    close = difflib.get_close_matches(key, candidates, n=3, cutoff=0.6)
    hint = f" (did you mean {', '.join(close)}?)" if close else f"; sections: {', '.join(SECTIONS)}"
    return ConfigError(f"unknown config key {key!r}{hint}")


def resolve_key(key: str) -> tuple[str, str]:
    """'optim.lr' or 'lr' -> ('optim', 'lr'); ConfigError for unknown or ambiguous keys."""
    if "." in key:
        section, _, name = key.partition(".")
        if section not in SECTIONS:
            raise _unknown(key)
        cls = _field_types(TrainConfig)[section]
        if name not in {f.name for f in dataclasses.fields(cls)}:
            raise _unknown(key)
        return section, name
    sections = _all_keys().get(key)
    if not sections:
        raise _unknown(key)
    if len(sections) > 1:
        raise ConfigError(f"config key {key!r} is ambiguous; write one of "
                          + ", ".join(f"{s}.{key}" for s in sections))
    return sections[0], key


def parse_override(text: str) -> tuple[str, str]:
    """'optim.lr=1e-4' -> ('optim.lr', '1e-4'): the key and the raw value (OmegaConf parses it)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not key=value")
    key, _, raw = text.partition("=")
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has no key")
    return key, raw.strip()


# ----- merging: OmegaConf structured configs do the typing ----------------------------------------------------------
def _layer(data, origin: str):
    """A YAML mapping / dotlist as an OmegaConf layer over TrainConfig: unknown keys are refused with a "did you
    mean", and YAML 1.1 booleans given to string fields (`mixed_precision: no`) are read back as the words."""
    from omegaconf import DictConfig, OmegaConf
    if data is None:
        return OmegaConf.create({})
    if not isinstance(data, DictConfig):
        raise ConfigError(f"{origin}: expected a mapping of sections ({', '.join(SECTIONS)}), got {data!r}")
    hints = _field_types(TrainConfig)
    for section in list(data.keys()):
        if section not in SECTIONS:
            raise _unknown(str(section))
        values = data[section]
        if values is None:
            del data[section]
            continue
        if not isinstance(values, DictConfig):
            raise ConfigError(f"{origin}: section {section!r} must be a mapping, got {values!r}")
        types = _field_types(hints[section])
        for name in list(values.keys()):
            resolve_key(f"{section}.{name}")
            if types[name] is str and isinstance(values[name], bool):
                values[name] = "yes" if values[name] else "no"
    return data


def _merge(layers) -> TrainConfig:
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException
    try:
        merged = OmegaConf.merge(OmegaConf.structured(TrainConfig), *layers)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:  # wrong type: OmegaConf names the key, we keep one line
        key = getattr(e, "full_key", None) or "config"
        msg = str(e).splitlines()[0]
        raise ConfigError(f"{key}: {msg}") from None


def _file_layers(name_or_path: str, chain: tuple) -> list:
    """The layers of a YAML file: those of the preset it names in `include:` (a variant states only what it
    changes, e.g. gsm8k-sft-ar over gsm8k-sft), then its own."""
    from omegaconf import DictConfig, OmegaConf
    file = find_config(name_or_path)
    if file.resolve() in chain:
        raise ConfigError(f"{file}: include cycle ({' -> '.join(p.name for p in chain)} -> {file.name})")
    try:
        data = OmegaConf.load(file)
    except Exception as e:
        raise ConfigError(f"{file}: not valid YAML: {e}") from None
    layers = []
    if isinstance(data, DictConfig) and "include" in data:
        parent = data.pop("include")
        if not isinstance(parent, str):
            raise ConfigError(f"{file}: include must be one preset name or path, got {parent!r}")
        layers = _file_layers(parent, chain + (file.resolve(),))
    return layers + [_layer(data, str(file))]


def find_config(name_or_path: str) -> Path:
    """A path, or the name of a preset in train/configs (with or without .yaml)."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    for candidate in (CONFIG_DIR / name_or_path, CONFIG_DIR / f"{name_or_path}.yaml"):
        if candidate.is_file():
            return candidate
    presets = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
    raise ConfigError(f"config {name_or_path!r} not found (not a file; presets: {presets})")


def _resolve_relative(cfg: TrainConfig, base_dir: Path) -> None:
    """Relative data paths that do not exist from the working directory are taken from the repository root
    (presets say `train/data/...` and `../shared/data/...`), so commands work from any directory."""
    repo = PACKAGE_DIR.parent

    def fix(p: str) -> str:
        if p.startswith("hf:") or Path(p).is_absolute() or Path(p).exists():
            return p
        return str(repo / p) if (repo / p).exists() else p

    cfg.data.sources = [fix(s) for s in cfg.data.sources]
    cfg.data.eval_sources = [fix(s) for s in cfg.data.eval_sources]


def load_config(path: Optional[str] = None, overrides: Optional[list[str]] = None) -> TrainConfig:
    """Defaults <- YAML preset/file <- `key=value` overrides (merged by OmegaConf over the dataclasses), then
    `validate`."""
    from omegaconf import OmegaConf
    layers = _file_layers(path, ()) if path else []
    dotlist = []
    for text in overrides or []:
        key, value = parse_override(text)
        section, name = resolve_key(key)
        dotlist.append(f"{section}.{name}={value}")
    if dotlist:
        layers.append(_layer(OmegaConf.from_dotlist(dotlist), "overrides"))
    cfg = _merge(layers)
    _resolve_relative(cfg, Path.cwd())
    validate(cfg)
    return cfg


def _range_error(bounds: tuple, value) -> Optional[str]:
    """The message for a value outside its declared range (`_min` / `_within`), or None."""
    lo, hi, brackets, note = bounds
    above = value > lo if brackets[0] == "(" else value >= lo
    if hi is None:
        return None if above else f"must be {'>' if brackets[0] == '(' else '>='} {lo}" + \
            (f" ({note})" if note else "") + f", got {value}"
    below = value < hi if brackets[1] == ")" else value <= hi
    return None if above and below else f"must be in {brackets[0]}{lo}, {hi}{brackets[1]}, got {value}"


def _check_fields(cfg: TrainConfig) -> None:
    """Each field against what its metadata declares: its choices, then its range (None = unset is not checked;
    LoRA's numbers only when LoRA is on)."""
    for section in SECTIONS:
        sec = getattr(cfg, section)
        for f in dataclasses.fields(sec):
            value, choices, bounds = getattr(sec, f.name), f.metadata.get("choices"), f.metadata.get("range")
            if choices and value not in choices:
                raise ConfigError(f"{section}.{f.name}: must be one of {', '.join(choices)}, got {value!r}")
            skip = value is None or (section == "lora" and not cfg.lora.enabled)
            if bounds and not skip and (msg := _range_error(bounds, value)):
                raise ConfigError(f"{section}.{f.name}: {msg}")


def validate(cfg: TrainConfig, task: str = "pretrain") -> TrainConfig:
    """Declared choices and ranges (the fields' metadata), then lists and combinations; each message names the
    key."""
    def need(cond: bool, key: str, msg: str) -> None:
        if not cond:
            raise ConfigError(f"{key}: {msg}")

    _check_fields(cfg)
    r, d, m, dc = cfg.run, cfg.data, cfg.model, cfg.diffusion
    need(bool(r.output_dir), "run.output_dir", "must not be empty")
    for x in r.eval_mask_ratios:
        need(isinstance(x, (int, float)) and not isinstance(x, bool) and 0 < float(x) <= 1,
             "run.eval_mask_ratios", f"each ratio must be a number in (0, 1], got {x!r}")
    need(not d.weights or len(d.weights) == len(d.sources), "data.weights",
         f"needs one weight per data.sources entry ({len(d.sources)}), got {len(d.weights)}")
    need(all(isinstance(w, (int, float)) and not isinstance(w, bool) and 0 < w < float("inf") for w in d.weights),
         "data.weights", f"must be positive numbers, got {list(d.weights)}")
    dc.block_lengths = [int(b) if isinstance(b, str) and b.strip().isdigit() else b for b in dc.block_lengths]
    need(bool(dc.block_lengths) and all(isinstance(b, int) and not isinstance(b, bool) and b >= 1
                                        for b in dc.block_lengths),
         "diffusion.block_lengths", f"must be a list of positive integers, got {dc.block_lengths!r}")
    need(dc.distill_weight == 0 or cfg.lora.enabled, "diffusion.distill_weight",
         "needs lora.enabled: the frozen base (the adapter disabled) is the teacher")
    need(dc.distill_weight == 0 or dc.attention != "full", "diffusion.distill_weight",
         "applies to block steps: needs diffusion.attention blocks or mixture")
    need(not cfg.lora.row_gate or (cfg.lora.enabled and dc.attention == "blocks"), "lora.row_gate",
         "needs lora.enabled and diffusion.attention blocks (a draft adapter trains on block steps only)")
    need((dc.draft_loss == "ce" and not dc.reach) or cfg.lora.enabled, "diffusion.draft_loss",
         "needs lora.enabled: the verifier is the base model (the adapter gated or disabled)")
    if dc.attention != "full":
        need(m.attn_implementation != "flash_attention_2", "diffusion.attention",
             "block attention needs sdpa/eager attention (flash_attention_2 takes no custom mask)")
    need(bool(m.source) or bool(m.init), "model.source", "set a model source, or model.init for a random model")
    if m.init:
        need("model_type" in m.init, "model.init", "needs a model_type (e.g. llama, gpt2)")
        need(bool(m.tokenizer), "model.tokenizer", "a random model (model.init) needs a tokenizer source")
    if cfg.lora.enabled:
        need(bool(cfg.lora.target_modules), "lora.target_modules", "must name at least one module (or all-linear)")
        need(not m.from_scratch, "lora.enabled", "LoRA on randomly initialised weights (model.from_scratch) "
                                                 "makes no sense; use full training")
    if m.attn_implementation == "flash_attention_2":
        need(dc.anneal_steps == 0 or dc.objective == "ar", "diffusion.anneal_steps",
             "attention-mask annealing needs sdpa/eager attention; flash_attention_2 supports only full attention "
             "(set diffusion.anneal_steps=0 or model.attn_implementation=sdpa)")
    if r.mixed_precision == "fp16" and m.dtype != "float32":
        raise ConfigError("run.mixed_precision: fp16 autocast needs float32 master weights (model.dtype=float32)")
    if r.resume not in ("", "auto") and not Path(r.resume).expanduser().exists():
        raise ConfigError(f"run.resume: {r.resume!r} does not exist (use auto, or a checkpoint directory)")
    if task == "sft":
        need(bool(d.sources), "data.sources", "SFT needs a JSONL file of prompt/response records")
    return cfg
