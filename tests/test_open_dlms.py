"""Today's open diffusion LMs (Dream-v0, LLaDA-8B, SDAR) loaded natively, checked on tiny checkpoints synthesized in
each family's released layout: its file names, config keys (with `auto_map` to modeling files that would fail if
they ever ran), weight names, tokenizer files and special tokens at their released ids. The real checkpoints are
never downloaded (no network): these layouts were learned from the authors' public code (`dlm/families/*.py` say
which parts are assumptions).

Each family: it loads through `dlm.load` without remote code; its logits equal those of an independent forward
written below from the released weight names (Qwen2 with biases + the shift for Dream; OLMo-style LLaMA without the
shift for LLaDA; Qwen3 with q/k norms, full and block-causal, for SDAR); the mask id, the shift and the recommended
sampler are right; 8-bit and 4-bit loading work; the app's backend serves it."""
from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file

import dlm
from dlm import families

H, LAYERS, HEADS, KV, HD, INTER = 64, 2, 4, 2, 16, 128
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                 "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                 "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>",
                 "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>",
                 "<|file_sep|>"]                                               # 151643 .. 151664
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
HEADERS = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
           "{{ m['content'] }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant"
           "<|end_header_id|>\n\n{% endif %}")
REMOTE_CODE = "raise RuntimeError('remote code ran: dlm.load must never import this file')\n"


# ----- synthesized layouts ---------------------------------------------------------------------------------------
def _bpe(n_vocab: int, specials: dict[int, str]):
    """A byte-level BPE learned from the repo's tiny corpus, its vocabulary padded with unused entries to
    `n_vocab`, and `specials` ({id: text}) added at exactly those ids (unused reserved tokens fill the gaps)."""
    from conftest import REPO
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    learn = Tokenizer(models.BPE())
    learn.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    learn.train([str(REPO / "train" / "data" / "tiny_corpus.txt")],
                trainers.BpeTrainer(vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                    show_progress=False))
    state = json.loads(learn.to_str())["model"]
    vocab = dict(state["vocab"])
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"]]
    for i in range(len(vocab), n_vocab):
        vocab[f"<unused{i}>"] = i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    added = []
    for i in range(n_vocab, max(specials) + 1):
        added.append(AddedToken(specials.get(i, f"<|reserved_token_{i}|>"), special=True, normalized=False))
    tok.add_special_tokens(added)
    for i, text in specials.items():
        assert tok.token_to_id(text) == i, (text, i, tok.token_to_id(text))
    return tok


def _added_decoder(tok) -> dict:
    return {str(i): {"content": t.content, "lstrip": False, "normalized": False, "rstrip": False,
                     "single_word": False, "special": True}
            for i, t in sorted(tok.get_added_tokens_decoder().items())}


def _shards(directory, state: dict, n: int = 2) -> None:
    """Save `state` as n shards with the hub's names and index."""
    keys = sorted(state)
    names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map = {}
    for i, name in enumerate(names):
        part = {k: state[k].contiguous() for k in keys[i::n]}
        save_file(part, str(directory / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    total = sum(v.numel() * v.element_size() for v in state.values())
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                        "weight_map": weight_map}))


def _rand(*shape, scale=0.2):
    return torch.randn(*shape) * scale


def _norm_w(n):
    return 1.0 + 0.1 * torch.randn(n)


def _qwen_state(vocab: int, qkv_bias: bool, qk_norm: bool) -> dict:
    s = {"model.embed_tokens.weight": _rand(vocab, H, scale=1.0), "model.norm.weight": _norm_w(H),
         "lm_head.weight": _rand(vocab, H)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        s.update({p + "input_layernorm.weight": _norm_w(H), p + "post_attention_layernorm.weight": _norm_w(H),
                  p + "self_attn.q_proj.weight": _rand(HEADS * HD, H), p + "self_attn.k_proj.weight": _rand(KV * HD, H),
                  p + "self_attn.v_proj.weight": _rand(KV * HD, H), p + "self_attn.o_proj.weight": _rand(H, HEADS * HD),
                  p + "mlp.gate_proj.weight": _rand(INTER, H), p + "mlp.up_proj.weight": _rand(INTER, H),
                  p + "mlp.down_proj.weight": _rand(H, INTER)})
        if qkv_bias:
            s.update({p + "self_attn.q_proj.bias": _rand(HEADS * HD), p + "self_attn.k_proj.bias": _rand(KV * HD),
                      p + "self_attn.v_proj.bias": _rand(KV * HD)})
        if qk_norm:
            s.update({p + "self_attn.q_norm.weight": _norm_w(HD), p + "self_attn.k_norm.weight": _norm_w(HD)})
    return s


def _remote_code(directory, *names) -> None:
    for name in names:
        (directory / name).write_text(REMOTE_CODE)


def make_dream(directory):
    """Dream-v0-*-7B's layout: config model_type "Dream" (auto_map), Qwen2 weight names in 2 shards + index,
    vocab.json + merges.txt + tokenizer_config.json (remote DreamTokenizer) with <|beginoftext|> 151665 and
    <|mask|> 151666, generation_config.json with Dream's own keys."""
    directory.mkdir()
    vocab = 151667 + 13                          # the tiny model's rows cover the special tokens
    specials = {151643 + i: t for i, t in enumerate(QWEN_SPECIALS)}
    specials.update({151665: "<|beginoftext|>", 151666: "<|mask|>"})
    tok = _bpe(151643, specials)
    tok.model.save(str(directory))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "added_tokens_decoder": _added_decoder(tok), "bos_token": "<|beginoftext|>", "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>", "mask_token": "<|mask|>", "unk_token": None, "chat_template": CHATML,
        "clean_up_tokenization_spaces": False, "model_max_length": 131072, "tokenizer_class": "DreamTokenizer",
        "auto_map": {"AutoTokenizer": ["tokenization_dream.DreamTokenizer", None]}, "errors": "replace",
        "split_special_tokens": False}))
    (directory / "special_tokens_map.json").write_text(json.dumps({"bos_token": "<|beginoftext|>",
                                                                   "eos_token": "<|endoftext|>",
                                                                   "pad_token": "<|endoftext|>",
                                                                   "mask_token": "<|mask|>"}))
    (directory / "config.json").write_text(json.dumps({
        "architectures": ["DreamModel"], "model_type": "Dream",
        "auto_map": {"AutoConfig": "configuration_dream.DreamConfig", "AutoModel": "modeling_dream.DreamModel"},
        "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151643, "pad_token_id": 151643,
        "mask_token_id": 151666, "hidden_act": "silu", "hidden_size": H, "intermediate_size": INTER,
        "initializer_range": 0.02, "max_position_embeddings": 131072, "max_window_layers": 28,
        "num_attention_heads": HEADS, "num_hidden_layers": LAYERS, "num_key_value_heads": KV,
        "rms_norm_eps": 1e-6, "rope_scaling": None, "rope_theta": 1000000.0, "sliding_window": None,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.46.2",
        "use_cache": False, "use_sliding_window": False, "vocab_size": vocab}))
    (directory / "generation_config.json").write_text(json.dumps({
        "alg": "origin", "alg_temp": None, "bos_token_id": 151643, "eos_token_id": 151643, "eps": 0.001,
        "mask_token_id": None, "pad_token_id": 151643, "steps": 512, "temperature": 0.0}))
    _remote_code(directory, "configuration_dream.py", "modeling_dream.py", "generation_utils.py",
                 "tokenization_dream.py")
    _shards(directory, _qwen_state(vocab, qkv_bias=True, qk_norm=False))
    return directory


LLADA_SPECIALS = {126080: "<|startoftext|>", 126081: "<|endoftext|>", 126336: "<|mdm_mask|>",
                  126346: "<|start_header_id|>", 126347: "<|end_header_id|>", 126348: "<|eot_id|>"}


def make_llada(directory):
    """LLaDA-8B's layout: config model_type "llada" (OLMo keys, auto_map), weights under model.transformer.*
    in 2 shards + index, tokenizer.json with its special tokens (the mask only an additional special token)."""
    directory.mkdir()
    vocab = 126464 - 96                          # a multiple of 8 above the specials (the real one: 126464)
    tok = _bpe(126080, LLADA_SPECIALS)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "added_tokens_decoder": _added_decoder(tok), "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>", "additional_special_tokens": ["<|mdm_mask|>"], "chat_template": HEADERS,
        "clean_up_tokenization_spaces": False, "model_max_length": 1000000000000000019884624838656,
        "tokenizer_class": "PreTrainedTokenizerFast"}))
    (directory / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
        "additional_special_tokens": ["<|mdm_mask|>"]}))
    (directory / "config.json").write_text(json.dumps({
        "activation_type": "silu", "alibi": False, "alibi_bias_max": 8.0, "architectures": ["LLaDAModelLM"],
        "attention_dropout": 0.0, "attention_layer_norm": False, "attention_layer_norm_with_affine": True,
        "auto_map": {"AutoConfig": "configuration_llada.LLaDAConfig",
                     "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM", "AutoModel": "modeling_llada.LLaDAModelLM"},
        "bias_for_layer_norm": False, "block_group_size": 1, "block_type": "llama", "d_model": H,
        "embedding_dropout": 0.0, "embedding_size": vocab, "eos_token_id": 126081, "flash_attention": False,
        "include_bias": False, "include_qkv_bias": False, "init_device": "meta", "init_fn": "mitchell",
        "init_std": 0.02, "input_emb_norm": False, "layer_norm_type": "rms", "layer_norm_with_affine": True,
        "mask_token_id": 126336, "max_sequence_length": 4096, "mlp_hidden_size": INTER, "mlp_ratio": 4,
        "model_type": "llada", "multi_query_attention": None, "n_heads": HEADS, "n_kv_heads": HEADS,
        "n_layers": LAYERS, "pad_token_id": 126081, "precision": "amp_bf16", "residual_dropout": 0.0,
        "rms_norm_eps": 1e-5, "rope": True, "rope_full_precision": True, "rope_theta": 500000.0,
        "scale_logits": False, "use_cache": False, "vocab_size": vocab, "weight_tying": False}))
    _remote_code(directory, "configuration_llada.py", "modeling_llada.py")
    s = {"model.transformer.wte.weight": _rand(vocab, H, scale=1.0), "model.transformer.ln_f.weight": _norm_w(H),
         "model.transformer.ff_out.weight": _rand(vocab, H)}
    for i in range(LAYERS):
        p = f"model.transformer.blocks.{i}."
        s.update({p + "attn_norm.weight": _norm_w(H), p + "ff_norm.weight": _norm_w(H),
                  p + "q_proj.weight": _rand(H, H), p + "k_proj.weight": _rand(H, H), p + "v_proj.weight": _rand(H, H),
                  p + "attn_out.weight": _rand(H, H), p + "ff_proj.weight": _rand(INTER, H),
                  p + "up_proj.weight": _rand(INTER, H), p + "ff_out.weight": _rand(H, INTER)})
    _shards(directory, s)
    return directory


def make_sdar(directory):
    """SDAR-*-Chat's layout (JetAstra/SDAR training/model/): config model_type "sdar" with block_size 4 and
    mask_token_id 151669 (auto_map), Qwen3 weight names in 2 shards + index, tokenizer.json + vocab.json +
    merges.txt + tokenizer_config.json (remote Qwen2Tokenizer copy, mask_token <|MASK|>), generation_config."""
    directory.mkdir()
    vocab = 151936 - 256
    specials = {151643 + i: t for i, t in enumerate(QWEN_SPECIALS[:14] + [
        "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
        "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>", "<think>", "</think>", "<|MASK|>"])}
    tok = _bpe(151643, specials)
    tok.save(str(directory / "tokenizer.json"))
    tok.model.save(str(directory))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": False, "add_prefix_space": False, "added_tokens_decoder": _added_decoder(tok),
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<|MASK|>"],
        "auto_map": {"AutoTokenizer": ["tokenization_qwen2.Qwen2Tokenizer", None]}, "bos_token": None,
        "chat_template": CHATML, "clean_up_tokenization_spaces": False, "eos_token": "<|endoftext|>",
        "mask_token": "<|MASK|>", "errors": "replace", "model_max_length": 131072, "pad_token": "<|endoftext|>",
        "split_special_tokens": False, "tokenizer_class": "Qwen2Tokenizer", "unk_token": None}))
    (directory / "config.json").write_text(json.dumps({
        "architectures": ["SDARForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_sdar.SDARConfig", "AutoModel": "modeling_sdar.SDARModel",
                     "AutoModelForCausalLM": "modeling_sdar.SDARForCausalLM"},
        "attention_bias": False, "attention_dropout": 0.0, "attn_implementation": "flex_attention",
        "bos_token_id": 151643, "debug": False, "eos_token_id": 151643, "block_size": 4, "mask_token_id": 151669,
        "ep_size": 1, "fuse_cross_entropy": True, "head_dim": HD, "hidden_act": "silu", "hidden_size": H,
        "initializer_range": 0.02, "intermediate_size": INTER, "max_position_embeddings": 32768,
        "max_window_layers": LAYERS, "micro_forward": False, "model_type": "sdar", "num_attention_heads": HEADS,
        "num_hidden_layers": LAYERS, "num_key_value_heads": KV, "rms_norm_eps": 1e-6, "rope_scaling": None,
        "rope_theta": 1000000, "skip_checkpoint": False, "sliding_window": None, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "transformers_version": "4.52.4", "use_cache": False, "use_deepep": False,
        "use_sliding_window": False, "vocab_size": vocab}))
    (directory / "generation_config.json").write_text(json.dumps({
        "bos_token_id": 151643, "do_sample": True, "eos_token_id": [151645, 151643], "pad_token_id": 151643,
        "temperature": 0.6, "top_k": 20, "top_p": 0.95}))
    _remote_code(directory, "configuration_sdar.py", "modeling_sdar.py", "tokenization_qwen2.py",
                 "tokenization_qwen2_fast.py", "fused_linear_diffusion_cross_entropy.py")
    _shards(directory, _qwen_state(vocab, qkv_bias=False, qk_norm=True))
    return directory


MAKERS = {"dream": make_dream, "llada": make_llada, "sdar": make_sdar}
MASK_IDS = {"dream": (151666, "<|mask|>"), "llada": (126336, "<|mdm_mask|>"), "sdar": (151669, "<|MASK|>")}


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    built = {}

    def get(name):
        if name not in built:
            torch.manual_seed(0)
            built[name] = MAKERS[name](tmp_path_factory.mktemp(name) / name)
        return built[name]
    return get


@pytest.fixture(scope="module", autouse=True)
def _own_cache(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("DLM_CACHE_DIR", str(tmp_path_factory.mktemp("dlm-cache")))
    yield
    mp.undo()


# ----- an independent reference forward, from the released weight names -----------------------------------------
def _weights(directory) -> dict:
    from safetensors.torch import load_file
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _rms(x, w, eps):
    x32 = x.float()
    return w * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps))


def _rope(x, theta):                                  # x [B, heads, L, d]: rotate the two halves of each head
    d, L = x.shape[-1], x.shape[-2]
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = torch.arange(L, dtype=torch.float64)[:, None] * inv[None]
    cos, sin = torch.cat([ang.cos(), ang.cos()], -1).float(), torch.cat([ang.sin(), ang.sin()], -1).float()
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def reference_logits(family: str, directory, ids: torch.Tensor, allowed: torch.Tensor = None) -> torch.Tensor:
    """Raw logits [B, L, V] (row i = hidden state i) of the released network, written from its own weight names;
    `allowed` [L, L] bool (query, key), default all True (bidirectional)."""
    W, raw = _weights(directory), json.loads((directory / "config.json").read_text())
    if family == "llada":
        g = {"emb": "model.transformer.wte.weight", "norm": "model.transformer.ln_f.weight",
             "head": "model.transformer.ff_out.weight"}
        layer = lambda i, r: W[f"model.transformer.blocks.{i}." + {  # noqa: E731
            "ln1": "attn_norm", "ln2": "ff_norm", "q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "attn_out",
            "gate": "ff_proj", "up": "up_proj", "down": "ff_out"}[r] + ".weight"]
        heads, kv, eps, theta = raw["n_heads"], raw["n_kv_heads"], raw["rms_norm_eps"], raw["rope_theta"]
        n_layers = raw["n_layers"]
    else:
        g = {"emb": "model.embed_tokens.weight", "norm": "model.norm.weight", "head": "lm_head.weight"}
        layer = lambda i, r: W[f"model.layers.{i}." + {  # noqa: E731
            "ln1": "input_layernorm", "ln2": "post_attention_layernorm", "q": "self_attn.q_proj",
            "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj", "gate": "mlp.gate_proj",
            "up": "mlp.up_proj", "down": "mlp.down_proj"}[r] + ".weight"]
        heads, kv, eps, theta = raw["num_attention_heads"], raw["num_key_value_heads"], raw["rms_norm_eps"], \
            raw["rope_theta"]
        n_layers = raw["num_hidden_layers"]
    B, L = ids.shape
    x = W[g["emb"]][ids]
    allowed = torch.ones(L, L, dtype=torch.bool) if allowed is None else allowed
    for i in range(n_layers):
        h = _rms(x, layer(i, "ln1"), eps)
        q, k, v = (h @ layer(i, r).T for r in "qkv")
        if family == "dream":
            q, k, v = (t + W[f"model.layers.{i}.self_attn.{r}_proj.bias"] for t, r in zip((q, k, v), "qkv"))
        d = q.shape[-1] // heads
        q = q.view(B, L, heads, d).transpose(1, 2)
        k = k.view(B, L, kv, d).transpose(1, 2)
        v = v.view(B, L, kv, d).transpose(1, 2)
        if family == "sdar":
            q = _rms(q, W[f"model.layers.{i}.self_attn.q_norm.weight"], eps)
            k = _rms(k, W[f"model.layers.{i}.self_attn.k_norm.weight"], eps)
        q, k = _rope(q, theta), _rope(k, theta)
        k, v = k.repeat_interleave(heads // kv, 1), v.repeat_interleave(heads // kv, 1)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(d)
        scores = scores.masked_fill(~allowed, float("-inf"))
        att = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, L, heads * d)
        x = x + att @ layer(i, "o").T
        h = _rms(x, layer(i, "ln2"), eps)
        x = x + (torch.nn.functional.silu(h @ layer(i, "gate").T) * (h @ layer(i, "up").T)) @ layer(i, "down").T
    return _rms(x, W[g["norm"]], eps) @ W[g["head"]].T


def _ids(n=12, batch=2, seed=0):
    return torch.randint(20, 500, (batch, n), generator=torch.Generator().manual_seed(seed))


# ----- the checks ----------------------------------------------------------------------------------------------
FAMILIES = ["dream", "llada", "sdar"]


@pytest.mark.parametrize("family", FAMILIES)
def test_layout_is_detected_and_converted_without_remote_code(family, layout):
    src = layout(family)
    assert families.detect(src).name == family
    model = dlm.load(src, device="cpu", dtype="float32")     # the stub modeling files raise if imported
    fam = families.get(family)
    mask_id, mask_text = MASK_IDS[family]
    assert model.mask_token_id == mask_id and model.tokenizer.mask_token == mask_text
    assert model.tokenizer.convert_tokens_to_ids(mask_text) == mask_id
    assert model.shift is fam.shift and model.config.base_family == fam.target_type
    assert model.config.adapted and not model.config.added_mask_token
    assert model.config.clean_attention == ("block" if family == "sdar" else "causal")
    assert type(model.base).__name__ == {"dream": "Qwen2ForCausalLM", "llada": "LlamaForCausalLM",
                                         "sdar": "Qwen3ForCausalLM"}[family]
    assert model.ar_counterpart == fam.ar_counterpart
    text = "Once upon a time"
    assert model.tokenizer.decode(model.tokenizer(text, add_special_tokens=False).input_ids) == text


def test_special_tokens_keep_their_released_ids(layout):
    dream = dlm.load(layout("dream"), device="cpu")
    assert dream.tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>", "<|beginoftext|>"]) == \
        [151643, 151645, 151665]
    assert {151643, 151645} <= set(dream.eos_token_ids)
    llada = dlm.load(layout("llada"), device="cpu")
    assert llada.tokenizer.bos_token_id == 126080 and llada.tokenizer.eos_token_id == 126081
    assert {126081, 126348} <= set(llada.eos_token_ids)           # <|eot_id|> ends an instruct turn
    chat = llada.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                               tokenize=False)
    assert chat.startswith("<|startoftext|><|start_header_id|>user<|end_header_id|>")
    sdar = dlm.load(layout("sdar"), device="cpu")
    assert {151643, 151645} <= set(sdar.eos_token_ids)


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_equal_an_independent_forward(family, layout):
    src = layout(family)
    model = dlm.load(src, device="cpu", dtype="float32")
    x = _ids()
    with torch.no_grad():
        got = model.denoise_logits(x)
    ref = reference_logits(family, src, x)
    if model.shift:      # Dream: the prediction for token i is read from row i - 1
        torch.testing.assert_close(got[:, 1:], ref[:, :-1], atol=2e-4, rtol=2e-4)
    else:
        torch.testing.assert_close(got, ref, atol=2e-4, rtol=2e-4)


def test_sdar_block_decoding_is_its_block_causal_forward(layout):
    """A prompt of two whole blocks in the exact cache, then a noisy block of masks: the noisy rows equal SDAR's
    own forward with its block mask (block i sees blocks <= i, bidirectionally inside a block), no shift."""
    src = layout("sdar")
    model = dlm.load(src, device="cpu", dtype="float32")
    prompt = _ids(8, 1, 3)
    noisy = torch.full((1, 4), model.mask_token_id)
    with torch.no_grad():
        cache = model.new_block_cache()
        model.block_commit(cache, prompt, clean_blocks=torch.tensor([0] * 4 + [1] * 4))
        got = model.block_denoise(cache, noisy)
    blocks = torch.arange(12) // 4
    ref = reference_logits("sdar", src, torch.cat([prompt, noisy], 1), blocks[None, :] <= blocks[:, None])
    torch.testing.assert_close(got, ref[:, 8:], atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_recommended_samplers(family, layout):
    model = dlm.load(layout(family), device="cpu", dtype="float32")
    cfg = model.sampler_config
    if family == "dream":
        assert (cfg.decoder, cfg.remasking, cfg.temperature, cfg.top_p, cfg.steps) == ("full", "entropy", 0.2, 0.95,
                                                                                      None)
    elif family == "llada":
        assert (cfg.decoder, cfg.remasking, cfg.block_length, cfg.temperature) == ("full", "confidence", 32, 0.0)
    else:
        assert (cfg.decoder, cfg.block_length, cfg.threshold, cfg.remasking) == ("blocks", 4, 0.9, "confidence")
    assert model.infill_config.decoder == "full"
    out = model.generate("Once upon a time", cfg.replace(max_new_tokens=8, seed=0))
    assert model.mask_token_id not in out.token_ids and 0 < len(out.token_ids) <= 8
    filled = model.fill("The [MASK:2] fox.")
    assert model.mask_token_id not in filled.token_ids


@pytest.mark.parametrize("q", ["8bit", "4bit"])
@pytest.mark.parametrize("family", FAMILIES)
def test_quantized_loading(family, q, layout):
    pytest.importorskip("bitsandbytes")
    from dlm.loading import quantized_modules
    src = layout(family)
    ref = dlm.load(src, device="cpu", dtype="float32")
    quant = dlm.load(src, device="cpu", dtype="float32", quantization=q)
    assert quant.quantization == q
    assert sum(quantized_modules(quant.base).values()) == LAYERS * 7
    assert quant.mask_token_id == ref.mask_token_id and quant.shift == ref.shift
    x = _ids()
    with torch.no_grad():
        a, b = ref.denoise_logits(x), quant.denoise_logits(x)
    # random weights of 0.2 scale amplify rounding more than trained ones: measured ~0.05 (8-bit), ~0.4 (4-bit)
    assert torch.isfinite(b).all() and ((b - a).norm() / a.norm()).item() < {"8bit": 0.12, "4bit": 0.7}[q]
    g = quant.generate("the", quant.sampler_config.replace(max_new_tokens=4, seed=0))
    assert quant.mask_token_id not in g.token_ids


@pytest.mark.parametrize("family", FAMILIES)
def test_app_backend_serves_each(family, layout):
    from app.backend import Backend
    backend = Backend()
    backend.load(str(layout(family)), device="cpu", dtype="float32")
    assert backend.base_config("write").decoder == families.get(family).sampler_configs({"block_size": 4})[0].decoder
    config = backend.sampler({"max_new_tokens": 8})
    out = backend.generate("the", config).wait().result()
    assert out.token_ids and backend.require_model().mask_token_id not in out.token_ids


def test_registry_entries_name_hub_ids_counterparts_and_memory():
    from dlm import model_registry
    for name, hub, family in [("dream-v0-base-7b", "Dream-org/Dream-v0-Base-7B", "dream"),
                              ("dream-v0-instruct-7b", "Dream-org/Dream-v0-Instruct-7B", "dream"),
                              ("llada-8b-base", "GSAI-ML/LLaDA-8B-Base", "llada"),
                              ("llada-8b-instruct", "GSAI-ML/LLaDA-8B-Instruct", "llada"),
                              ("sdar-4b-chat", "JetLM/SDAR-4B-Chat", "sdar"),
                              ("sdar-8b-chat", "JetLM/SDAR-8B-Chat", "sdar")]:
        spec = model_registry.get(name)
        assert spec.source == hub and spec.family == family and spec.kind == "dlm"
        assert spec.mask_token_id == families.get(family).mask_token_id
        assert model_registry.get(spec.ar_counterpart).kind == "ar"
        mem = families.memory_for(name)
        assert mem["4bit"] < mem["8bit"] < mem["bf16"] < mem["fp32"]
        assert mem["4bit"] + mem["overhead_gib"] < 24          # sized for a 24 GB GPU in 4-bit
    # SDAR-8B's released index says 16,381,470,720 bytes in bf16: the estimate from its config is exact
    assert families.memory_for("sdar-8b-chat")["bf16"] == round(16381470720 / 1024 ** 3, 2)


@pytest.mark.parametrize("family", FAMILIES)
def test_memory_from_a_local_layout(family, layout):
    src = layout(family)
    mem = families.memory_for(str(src))
    model = dlm.load(src, device="cpu", dtype="float32")
    assert mem["parameters"] == model.num_parameters()


def test_an_unsupported_variant_is_refused_with_the_key(layout, tmp_path):
    import shutil
    bad = tmp_path / "llada-bias"
    shutil.copytree(layout("llada"), bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["include_bias"] = True
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(dlm.LoadError, match="include_bias"):
        dlm.load(bad, device="cpu")


def test_dlm_info_shows_memory_before_loading(capsys):
    from dlm.cli import main
    assert main(["info", "--model", "sdar-8b-chat", "--json"]) in (0, None)   # a hub model: nothing is loaded
    out = json.loads(capsys.readouterr().out)
    assert out["memory_gib"]["bf16"] == 15.26 and out["memory_gib"]["4bit"] < 6
