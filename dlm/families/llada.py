"""LLaDA-8B (GSAI-ML/LLaDA-8B-Base, LLaDA-8B-Instruct; Nie et al. 2025): a masked diffusion LM trained from
scratch, *no shift* (output row i predicts token i), full bidirectional attention.

Released layout (learned from the authors' public code, ML-GSAI/LLaDA and its copies; not from the real files):
- config.json: model_type "llada", architectures ["LLaDAModelLM"], auto_map to configuration_llada /
  modeling_llada, OLMo-style keys: d_model 4096, n_layers 32, n_heads 32, n_kv_heads 32, mlp_hidden_size 12288,
  vocab_size = embedding_size = 126464, max_sequence_length 4096, rope_theta 500000, rms_norm_eps 1e-5,
  block_type "llama", layer_norm_type "rms", activation_type "silu", rope true, weight_tying false, include_bias
  false, mask_token_id 126336, eos/pad 126081.
- weights (under `model.transformer.`): `wte`, `blocks.N.{attn_norm, q_proj, k_proj, v_proj, attn_out, ff_norm,
  ff_proj, up_proj, ff_out}`, `ln_f`, `ff_out` (the output head). Its LLaMA block computes
  ff_out(silu(ff_proj(x)) * up_proj(x)), so ff_proj is LLaMA's gate_proj, up_proj its up_proj, the block's ff_out
  its down_proj; the rotary embedding rotates halves (as transformers' LLaMA does), so q/k need no permutation.
- tokenizer: tokenizer.json (a fast BPE) with <|startoftext|> 126080 (ASSUMPTION: BOS id), <|endoftext|> 126081,
  <|mdm_mask|> 126336, <|start_header_id|> 126346, <|end_header_id|> 126347, <|eot_id|> 126348 (the ids of the
  header tokens are an ASSUMPTION; EOS, mask and eot are in the authors' generation code); the mask is only an
  additional special token there, the conversion names it the tokenizer's mask token.

Mapped onto transformers' LlamaForCausalLM. Variants the mapping does not cover (biases, another block type or
norm, ALiBi, q/k layer norms, scaled logits or embeddings) are refused with the key named.

Recommended sampler (the authors' generate.py / chat.py): steps = answer length, semi-autoregressive blocks of 32,
low-confidence remasking (= `confidence` here), temperature 0. LLaDA's `cfg_scale` (classifier-free guidance) is
0 in those examples and has no counterpart here.
"""
from __future__ import annotations

import re
from typing import Optional

from . import Family

_BLOCK = {"attn_norm": "input_layernorm", "ff_norm": "post_attention_layernorm", "q_proj": "self_attn.q_proj",
          "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj", "attn_out": "self_attn.o_proj",
          "ff_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj", "ff_out": "mlp.down_proj"}
_TOP = {"wte": "model.embed_tokens", "ln_f": "model.norm", "ff_out": "lm_head"}
_BLOCK_KEY = re.compile(r"(?:model\.)?transformer\.blocks\.(\d+)\.([a-z_]+)\.(weight|bias)")
_TOP_KEY = re.compile(r"(?:model\.)?transformer\.([a-z_]+)\.(weight|bias)")


def rename(key: str) -> Optional[str]:
    m = _BLOCK_KEY.fullmatch(key)
    if m and m.group(2) in _BLOCK:
        return f"model.layers.{m.group(1)}.{_BLOCK[m.group(2)]}.{m.group(3)}"
    m = _TOP_KEY.fullmatch(key)
    if m and m.group(1) in _TOP:
        return f"{_TOP[m.group(1)]}.{m.group(2)}"
    return None   # nothing else is part of the 8B checkpoints (rotary caches are not saved)


def hf_config(raw: dict) -> dict:
    d_model, n_heads = int(raw["d_model"]), int(raw["n_heads"])
    kv = 1 if raw.get("multi_query_attention") else int(raw.get("n_kv_heads") or n_heads)
    hidden = raw.get("mlp_hidden_size") or int(raw.get("mlp_ratio", 4)) * d_model
    return {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"],
        "vocab_size": int(raw.get("embedding_size") or raw["vocab_size"]), "hidden_size": d_model,
        "intermediate_size": int(hidden), "num_hidden_layers": int(raw["n_layers"]), "num_attention_heads": n_heads,
        "num_key_value_heads": kv, "head_dim": d_model // n_heads, "hidden_act": "silu",
        "max_position_embeddings": int(raw.get("max_sequence_length", 4096)),
        "rms_norm_eps": float(raw.get("rms_norm_eps", 1e-5)), "rope_theta": float(raw.get("rope_theta", 10000.0)),
        "rope_scaling": None, "attention_bias": False, "mlp_bias": False,
        "tie_word_embeddings": bool(raw.get("weight_tying", False)),
        "bos_token_id": 126080,   # ASSUMPTION (see the module docstring); the chat template writes it
        "eos_token_id": int(raw.get("eos_token_id", 126081)), "pad_token_id": int(raw.get("pad_token_id", 126081)),
        "torch_dtype": "bfloat16", "use_cache": True,
    }


def sampler_configs(raw: dict):
    from ..sampler_config import SamplerConfig
    generate = SamplerConfig(decoder="full", max_new_tokens=128, steps=None, block_length=32,
                             remasking="confidence", temperature=0.0)
    infill = SamplerConfig(decoder="full", max_new_tokens=64, steps=None, remasking="confidence", temperature=0.0)
    return generate, infill


FAMILY = Family(
    name="llada", model_types=("llada",), target_type="llama", shift=False, mask_token="<|mdm_mask|>",
    mask_token_id=126336, hf_config=hf_config, tokenizer_class="PreTrainedTokenizerFast", rename=rename,
    renames_weights=True, ar_counterpart="llama-3.1-8b", sampler_configs=sampler_configs, extra_eos=("<|eot_id|>",),
    notes="OLMo-style names -> LLaMA; no shift; mask <|mdm_mask|> 126336",
    checks=(("block_type", ("llama",), "the LLaMA-style block"),
            ("layer_norm_type", ("rms",), "RMSNorm"),
            ("activation_type", ("silu",), "SiLU-gated MLP"),
            ("rope", (True,), "rotary positions"),
            ("alibi", (False,), "no ALiBi"),
            ("include_bias", (False,), "no biases"),
            ("include_qkv_bias", (False, None), "no q/k/v biases"),
            ("attention_layer_norm", (False,), "no q/k layer norms"),
            ("scale_logits", (False,), "unscaled logits"),
            ("input_emb_norm", (False,), "unscaled embeddings"),
            ("block_group_size", (1,), "one block per group")),
)
