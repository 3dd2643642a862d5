"""Dream-v0 (Dream-org/Dream-v0-Base-7B, Dream-v0-Instruct-7B; Ye et al. 2025): Qwen2.5-7B adapted into a
diffusion LM, this paper's method at scale, *with the shift* (its generation code reads the prediction for token i
from output row i - 1).

Released layout (learned from the authors' public code, DreamLM/Dream and its copies; not from the real files):
- config.json: model_type "Dream", architectures ["DreamModel"], auto_map to configuration_dream / modeling_dream,
  Qwen2 keys (hidden_size 3584, intermediate_size 18944, 28 layers, 28 heads, 4 KV heads, vocab_size 152064,
  rope_theta 1e6, rms_norm_eps 1e-6, tie_word_embeddings false) plus mask_token_id 151666, pad/bos/eos 151643.
- weights: Qwen2's names exactly (`model.embed_tokens`, `model.layers.N.self_attn.{q,k,v}_proj` with biases,
  `o_proj`, `mlp.{gate,up,down}_proj`, `input_layernorm`, `post_attention_layernorm`, `model.norm`, `lm_head`):
  the mapping renames nothing, the converted folder hard-links the shards.
- tokenizer: Qwen2's byte-level BPE (vocab.json + merges.txt) under a remote `DreamTokenizer` class; special tokens
  of Qwen2.5 (151643 <|endoftext|> .. 151664 <|file_sep|>) plus 151665 <|beginoftext|> and 151666 <|mask|>
  (ASSUMPTION: the ids of these two as the Dream config and tokenizer code give them; the tests synthesize them so).
  It loads as transformers' own Qwen2Tokenizer.

Recommended sampler (the authors' README): as many steps as new tokens, `alg="entropy"` (lowest predictive entropy
revealed first), temperature 0.2, top-p 0.95, over the whole answer (no blocks). Dream's entropy is computed from
the tempered, top-p-filtered distribution; this project's `entropy` rule ranks by the untempered one (the order at
temperature 0.2 is nearly the same).
"""
from __future__ import annotations

from . import Family

QWEN2_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps",
              "rope_theta", "rope_scaling", "attention_dropout", "tie_word_embeddings", "max_window_layers",
              "bos_token_id", "eos_token_id", "pad_token_id", "torch_dtype")


def hf_config(raw: dict) -> dict:
    config = {k: raw[k] for k in QWEN2_KEYS if k in raw}
    config.update(model_type="qwen2", architectures=["Qwen2ForCausalLM"], use_sliding_window=False,
                  sliding_window=None, use_cache=True)
    config.setdefault("num_key_value_heads", config.get("num_attention_heads"))
    config.setdefault("tie_word_embeddings", False)
    return config


def sampler_configs(raw: dict):
    from ..sampler_config import SamplerConfig
    generate = SamplerConfig(decoder="full", max_new_tokens=256, steps=None, remasking="entropy", temperature=0.2,
                             top_p=0.95)
    infill = SamplerConfig(decoder="full", max_new_tokens=64, steps=None, remasking="entropy", temperature=0.0)
    return generate, infill


FAMILY = Family(
    name="dream", model_types=("dream",), target_type="qwen2", shift=True, mask_token="<|mask|>",
    mask_token_id=151666, hf_config=hf_config, tokenizer_class="Qwen2Tokenizer", ar_counterpart="qwen2.5-7b",
    sampler_configs=sampler_configs, extra_eos=("<|im_end|>",),
    notes="Qwen2 weights under their own names; shift; mask <|mask|> 151666",
)
