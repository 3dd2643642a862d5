"""SDAR (JetLM/SDAR-1.7B-Chat, SDAR-4B-Chat, SDAR-8B-Chat; Cheng et al. 2025): Qwen3 adapted into a block-diffusion
LM. Blocks of 4 tokens are denoised in parallel left to right; a clean block attends to itself bidirectionally and
to earlier blocks (block-causal), a noisy block to itself and the clean blocks before it. *No shift*: output row i
predicts token i of the block being denoised.

Released layout (the authors publish the 4B and 8B folders in JetAstra/SDAR under training/model/; learned from
there, not copied): config.json with model_type "sdar", architectures ["SDARForCausalLM"], auto_map to
configuration_sdar / modeling_sdar, Qwen3 keys (head_dim, rope_theta 1e6, rms_norm_eps 1e-6, tie_word_embeddings
false, vocab_size 151936) plus block_size 4 and mask_token_id 151669; weights under Qwen3's own names (q_norm /
k_norm included: the mapping renames nothing, the converted folder hard-links the shards); tokenizer.json +
vocab.json + merges.txt with a remote Qwen2Tokenizer copy, Qwen3's special tokens and <|MASK|> at 151669 as the
tokenizer's mask token; generation_config eos [151645, 151643].

Recommended sampler (the authors' generate.py and README): block_length = the config's block_size (4), as many
denoising steps per block as its tokens, `low_confidence_dynamic` with confidence threshold 0.9 (reveal every
position above the threshold if there are at least as many as the step's quota, else the quota's most confident:
exactly this project's `confidence` rule + `threshold`), greedy for evaluation. Run here by the `blocks` decoder
with block-causal clean attention (dlm_config clean_attention "block"). One difference: SDAR aligns blocks to
absolute positions from 0 (a prompt's last partial block is completed in the first decoded block); the `blocks`
decoder starts the first block right after the prompt.
"""
from __future__ import annotations

from . import Family

QWEN3_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "initializer_range",
              "rms_norm_eps", "rope_theta", "rope_scaling", "attention_bias", "attention_dropout",
              "tie_word_embeddings", "max_window_layers", "bos_token_id", "eos_token_id", "pad_token_id",
              "torch_dtype")


def hf_config(raw: dict) -> dict:
    config = {k: raw[k] for k in QWEN3_KEYS if k in raw}
    config.update(model_type="qwen3", architectures=["Qwen3ForCausalLM"], use_sliding_window=False,
                  sliding_window=None, use_cache=True)
    config.setdefault("tie_word_embeddings", False)
    return config


def block_size(raw: dict) -> int:
    return int(raw.get("block_size") or 4)


def sampler_configs(raw: dict):
    from ..sampler_config import SamplerConfig
    b = block_size(raw)
    generate = SamplerConfig(decoder="blocks", max_new_tokens=256, block_length=b, steps=None,
                             remasking="confidence", threshold=0.9, temperature=0.0, stop_at_eos=True)
    infill = SamplerConfig(decoder="full", max_new_tokens=64, steps=None, remasking="confidence", temperature=0.0)
    return generate, infill


FAMILY = Family(
    name="sdar", model_types=("sdar",), target_type="qwen3", shift=False, mask_token="<|MASK|>",
    mask_token_id=151669, hf_config=hf_config, tokenizer_class="Qwen2Tokenizer", clean_attention="block",
    ar_counterpart="qwen3-4b", sampler_configs=sampler_configs, extra_eos=("<|im_end|>",),
    notes="Qwen3 weights under their own names; block diffusion (block 4); no shift; mask <|MASK|> 151669",
)
