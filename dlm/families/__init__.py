"""Released diffusion-LM layouts loaded natively: one file per family, no remote code.

Dream, LLaDA and SDAR ship their own modeling code on the Hugging Face hub (`auto_map` in config.json), which
`dlm.load` never runs. Their weights are ordinary transformer weights, though: Dream is Qwen2 with the shift, LLaDA
is a LLaMA-shaped network under OLMo-style names, SDAR is Qwen3 with block-causal attention. Each family module here
says how its released directory maps onto one of transformers' own classes:

    model_types      the `model_type` values of its config.json (how `detect` recognises it)
    hf_config(raw)   the released config.json -> the config of the transformers class it runs as
    rename(key)      a released weight name -> the transformers name (None drops it; identity for Dream and SDAR)
    tokenizer(raw)   the released tokenizer_config.json -> one a built-in tokenizer class reads (no auto_map)
    dlm_config(...)  what makes it a DLM here: mask id, shift, clean attention (block diffusion), AR counterpart
    sampler_configs  its authors' recommended sampler, as `SamplerConfig` values (generate, infill)

`dlm.loading` detects the layout and calls `write_conversion` once per source into the cache (as it converts the
DiffuGPT wrapper and GGUF files): config.json, the weights (hard links when no name changes, else rewritten
shard by shard), the tokenizer files, generation_config.json, dlm_config.json and sampler_config.json. After that
the directory is a plain Hugging Face model that `from_pretrained` loads with every option (dtype, bitsandbytes,
attention implementation).

This package does not import torch at module level (the CLI's `dlm info` sizes a model from its config without it).

Verified against synthesized layouts only: the tests build tiny checkpoints with each family's released file
names, config keys, weight names and special tokens (learned from the authors' public code) and compare the
converted model's logits with an independent forward written in the test. No real checkpoint was downloaded.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

# Tokenizer files copied as they are (tokenizer_config.json is rewritten, generation_config.json regenerated).
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "special_tokens_map.json", "added_tokens.json",
                   "chat_template.jinja", "tokenizer.model")
CONVERTED_MARK = "dlm_family.json"   # written into every conversion: which family, from where


class LayoutError(ValueError):
    """A released directory that looks like a known family but does not fit its mapping (the message says why)."""


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    target_type: str                       # transformers model_type it runs as
    shift: bool                            # hidden state i predicts token i + 1 (Dream) or token i (LLaDA, SDAR)
    mask_token: str                        # the mask token's text in its tokenizer
    mask_token_id: int                     # the released id of that token
    hf_config: Callable[[dict], dict]
    tokenizer_class: str                   # the built-in tokenizer class its files load with
    rename: Callable[[str], Optional[str]] = staticmethod(lambda key: key)
    clean_attention: str = "causal"        # block diffusion: "block" = bidirectional inside a clean block (SDAR)
    ar_counterpart: str = ""               # registry name of the default AR model to compare with
    sampler_configs: Callable[[dict], tuple] = staticmethod(lambda raw: (None, None))
    extra_eos: tuple[str, ...] = ()        # tokens that end a turn besides EOS (generation_config eos list)
    notes: str = ""
    renames_weights: bool = False          # False: the weight names already are transformers' (hard links)
    checks: tuple = field(default=())      # (config key, allowed values, what it means) the mapping relies on


def _families() -> dict[str, Family]:
    from . import dream, llada, sdar
    return {f.name: f for f in (dream.FAMILY, llada.FAMILY, sdar.FAMILY)}


def families() -> list[Family]:
    return list(_families().values())


def get(name: str) -> Family:
    return _families()[name]


def read_config(directory: os.PathLike) -> dict:
    try:
        return json.loads(Path(directory, "config.json").read_text())
    except (OSError, ValueError):
        return {}


def detect(directory: os.PathLike) -> Optional[Family]:
    """The released family whose layout `directory` holds (by config.json's model_type), or None."""
    raw = read_config(directory)
    kind = str(raw.get("model_type", "")).lower()
    for fam in _families().values():
        if kind in fam.model_types:
            return fam
    return None


def check_config(family: Family, raw: dict) -> None:
    """Refuse a variant the mapping does not cover (e.g. a LLaDA config with biases or another block type)."""
    for key, allowed, meaning in family.checks:
        value = raw.get(key, allowed[0])
        if value not in allowed:
            raise LayoutError(f"{family.name}: config.json {key}={value!r} is not supported by the native mapping "
                              f"({meaning}; supported: {', '.join(map(repr, allowed))})")


def _link_or_copy(src: Path, dst: Path) -> None:
    src = src.resolve()
    try:
        os.link(src, dst)              # no second copy of 15 GB of weights when no name changes
    except OSError:
        try:
            dst.symlink_to(src)
        except OSError:
            shutil.copy2(src, dst)


def _write_weights(family: Family, src: Path, out: Path) -> None:
    files = sorted(f for f in src.glob("*.safetensors") if not f.name.startswith("adapter_"))
    if not family.renames_weights:
        for f in files:
            _link_or_copy(f, out / f.name)
        index = src / "model.safetensors.index.json"
        if index.is_file():
            shutil.copy(index, out / index.name)
        return
    from safetensors import safe_open
    from safetensors.torch import save_file
    weight_map: dict[str, str] = {}
    seen = False
    for f in files:   # shard by shard: one shard in memory at a time
        state = {}
        with safe_open(str(f), framework="pt") as reader:
            for key in reader.keys():
                new = family.rename(key)
                if new is not None:
                    state[new] = reader.get_tensor(key)
        if not state:
            continue
        seen = True
        save_file({k: v.contiguous() for k, v in state.items()}, str(out / f.name), metadata={"format": "pt"})
        weight_map.update({k: f.name for k in state})
    if not seen:
        raise LayoutError(f"{family.name}: no weights with the released names in {src}")
    if len(files) > 1:
        (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map},
                                                                     indent=2))


def _write_tokenizer(family: Family, src: Path, out: Path) -> dict:
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy(src / name, out / name)
    try:
        tok = json.loads((src / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        tok = {}
    tok.pop("auto_map", None)                    # the released class lives in remote code: use the built-in one
    tok["tokenizer_class"] = family.tokenizer_class
    tok["mask_token"] = family.mask_token        # LLaDA lists its mask only as an additional special token
    (out / "tokenizer_config.json").write_text(json.dumps(tok, indent=2, ensure_ascii=False))
    return tok


def _token_id(tok: dict, text: str, src: Path) -> Optional[int]:
    for key, value in (tok.get("added_tokens_decoder") or {}).items():
        if isinstance(value, dict) and value.get("content") == text:
            return int(key)
    try:
        for entry in json.loads((src / "tokenizer.json").read_text()).get("added_tokens", []):
            if entry.get("content") == text:
                return int(entry["id"])
    except (OSError, ValueError):
        pass
    return None


def write_conversion(family: Family, src: os.PathLike, out: os.PathLike, *, ar_counterpart: Optional[str] = None,
                     label: str = "") -> None:
    """Write `src` (a released `family` directory) into `out` as a plain transformers directory + dlm configs."""
    from ..sampler_config import save_sampler_configs
    src, out = Path(src), Path(out)
    raw = read_config(src)
    check_config(family, raw)
    config = family.hf_config(raw)
    tok = _write_tokenizer(family, src, out)
    mask_id = _token_id(tok, family.mask_token, src)
    if mask_id is None:
        mask_id = int(raw.get("mask_token_id", family.mask_token_id))
    if mask_id >= int(config["vocab_size"]):
        raise LayoutError(f"{family.name}: mask id {mask_id} is outside the vocabulary ({config['vocab_size']})")
    eos = config.get("eos_token_id")
    eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
    for text in family.extra_eos:
        extra = _token_id(tok, text, src)
        if extra is not None and extra not in eos_ids:
            eos_ids.append(extra)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    generation = {"bos_token_id": config.get("bos_token_id"), "pad_token_id": config.get("pad_token_id"),
                  "eos_token_id": eos_ids[0] if len(eos_ids) == 1 else eos_ids}
    (out / "generation_config.json").write_text(json.dumps({k: v for k, v in generation.items() if v is not None},
                                                           indent=2))
    _write_weights(family, src, out)
    dlm_config = {"mask_token_id": mask_id, "shift": family.shift, "base_family": family.target_type,
                  "ar_counterpart": ar_counterpart or family.ar_counterpart or None, "adapted": True,
                  "added_mask_token": False, "clean_attention": family.clean_attention,
                  "training": {"released": family.name, "source": label or str(src),
                               "converted_by": "dlm.families (native mapping, no remote code)"},
                  "format_version": 1}
    (out / "dlm_config.json").write_text(json.dumps(dlm_config, indent=2) + "\n")
    generate, infill = family.sampler_configs(raw)
    if generate is not None:
        from ..sampler_config import SamplerConfig
        save_sampler_configs(out, generate, infill or SamplerConfig())
    (out / CONVERTED_MARK).write_text(json.dumps({"family": family.name, "source": label or str(src)}, indent=2))


def is_conversion(directory: os.PathLike) -> bool:
    return Path(directory, CONVERTED_MARK).is_file()


from .memory import estimate_memory, memory_for  # noqa: E402,F401  (torch-free)
