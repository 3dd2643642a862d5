"""dlm: turn Hugging Face causal LMs into diffusion language models (An et al. 2024, DiffuGPT / DiffuLLaMA).

    import dlm
    model = dlm.load("smollm2-135m-dlm")            # or a local dir, a .gguf, a hub id
    out = model.generate("The capital of France is", max_new_tokens=32)   # the model's recommended SamplerConfig
    print(out.text, out.nfe, out.seconds)
    model.generate("...", dlm.SamplerConfig(decoder="full", steps=16, remasking="margin"))
"""
from .loading import LoadError, load, load_tokenizer
from .model import BlockCache, DiffusionLM, DiffusionLossOutput, DLMConfig, PrefixCache
from .noise import q_sample, sample_t
from .attention import anneal_attention_mask
from .sampler_config import SamplerConfig, SamplerConfigError
from .decoders import DECODERS, decoder
from .reveal import REVEAL_RULES, reveal_rule
from .types import Frame, Generation, Score
from . import registry

__all__ = ["load", "load_tokenizer", "LoadError", "DiffusionLM", "DLMConfig", "DiffusionLossOutput", "PrefixCache",
           "BlockCache", "SamplerConfig", "SamplerConfigError", "DECODERS", "decoder", "REVEAL_RULES", "reveal_rule",
           "q_sample", "sample_t", "anneal_attention_mask", "Frame", "Generation", "Score", "registry"]
__version__ = "0.1.0"
