"""dlm: turn Hugging Face causal LMs into diffusion language models (Gong et al. 2024, DiffuGPT / DiffuLLaMA).

    import dlm
    model = dlm.load("smollm2-135m-dlm")            # or a local dir, a .gguf, a hub id
    out = model.generate("The capital of France is", max_new_tokens=32)   # the model's recommended SamplerConfig
    print(out.text, out.nfe, out.seconds)
    model.generate("...", dlm.SamplerConfig(decoder="full", steps=16, remasking="margin"))

The names below are imported on first use, so `import dlm` (and `dlm.SamplerConfig`, the decoder registry, the
CLI's flags) does not import torch or transformers until a model is needed.
"""
from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING


def _version() -> str:
    """The installed distribution's version (pyproject.toml is the one place it is written)."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("dlm-studio")
    except PackageNotFoundError:   # a bare checkout on sys.path, never installed
        return "0+unknown"


__version__ = _version()

# public name -> the submodule that defines it
_EXPORTS = {
    "load": "loading", "load_tokenizer": "loading", "LoadError": "loading",
    "DiffusionLM": "model", "DLMConfig": "dlm_config", "DiffusionLossOutput": "losses",
    "BlockCache": "kv_cache", "PrefixCache": "kv_cache",
    "q_sample": "noise", "sample_t": "noise",
    "anneal_attention_mask": "attention",
    "SamplerConfig": "sampler_config", "SamplerConfigError": "sampler_config",
    "IgnoredSettingWarning": "sampler_config", "Task": "sampler_config",
    "DECODERS": "decoders.registry", "decoder": "decoders.registry",
    "REVEAL_RULES": "decoders.registry", "reveal_rule": "decoders.registry",
    "Frame": "types", "Generation": "types", "Score": "types",
}
__all__ = [*_EXPORTS, "model_registry"]


def __getattr__(name: str):
    """Import a public name (or a submodule, e.g. `dlm.generation`) the first time it is used."""
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    elif not name.startswith("__") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # what the names are, for type checkers and editors
    from . import model_registry
    from .attention import anneal_attention_mask
    from .decoders.registry import DECODERS, REVEAL_RULES, decoder, reveal_rule
    from .dlm_config import DLMConfig
    from .kv_cache import BlockCache, PrefixCache
    from .loading import LoadError, load, load_tokenizer
    from .losses import DiffusionLossOutput
    from .model import DiffusionLM
    from .noise import q_sample, sample_t
    from .sampler_config import IgnoredSettingWarning, SamplerConfig, SamplerConfigError, Task
    from .types import Frame, Generation, Score
