"""A LLaMA-style decoder layer in two calls into C++ at inference on a CPU: transformers' layer, row by row.

A 1-row decoding step of SmolLM2-135M in int4 reads ~70 MB of weights (~3 ms on a 2-core CPU), but transformers'
decoder layer makes ~50 ATen calls and nine module calls from Python for each of the 30 layers, and at a few
microseconds of dispatch each, that overhead was 7.5 of a 17 ms step (profiled, 2-core Xeon). Here each layer of a
packed model (`dlm.packed_linear`, int8 / int4) runs as

    lean_attn_in:  input norm -> one fused q|k|v packed matmul (+ LoRA) -> rotary embedding          (C++)
    cache.update and the model's own attention function (dlm's row attention, sdpa, eager...)       (Python)
    lean_mlp_out:  o projection + residual -> norm -> one fused gate|up matmul -> silu * up -> down   (C++)

The C++ ops (`dlm/csrc/packed_rows.cpp`) do the norms, the rotary embedding, the residuals and silu * up in plain
loops, one row at a time in a fixed order of fp32 operations (ATen calls from C++ still cost ~1-2 us each, ~25 a
layer), and the packed kernel gives each output the same fixed-order sum whether a weight is fused with others or
not, and whatever rows share the call. So a position's result is the same bits in an AR step, a prompt's prefill or
a verify forward beside noisy rows (tests hold it to `torch.equal`): the verifier's clean rows under a row-gated
adapter are the base model's lean result exactly. Against transformers' layers on the same packed weights they
agree within fp32 rounding (the norm sums its squares in another order). The fused q|k|v and gate|up weights are
views of one buffer per group, not copies.

A LoRA adapter (peft, unmerged, the active one) is added per member with its scale, row-gated by
`dlm.adapter_routing` as the layer-by-layer path is (a row the gate closes is not touched: the base's result). Its A
and B run as packed int8 on the same kernel (copies built when the adapter changes; ranks padded to multiples of
32): the adapter's update moves by ~1% (SmolLM2's logits by <1e-3 more than the base's own rounding), and a DLM
verify forward's adapter costs half what fp32 A and B cost.
Everything else takes transformers' forward: gradients or training mode, other dtypes or devices, merged or
variant adapters (DoRA...), several active adapters, hooks on the attention or MLP modules (e.g. recording
attention weights).

Families: llama (SmolLM2, LLaMA 2/3, TinyLlama...) and qwen2 (its q|k|v biases fused too). `DLM_LEAN_LAYERS=off`
keeps transformers' layers.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from .adapter_routing import plain_lora, single_active_adapter
from .packed_linear import TILE

FAMILIES = ("llama", "qwen2")
MEMBERS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_NO_BIAS = torch.empty(0)
NO_ADAPTER = ((), (), (), (), [], None)


def enabled() -> bool:
    return os.environ.get("DLM_LEAN_LAYERS", "").strip().lower() not in ("off", "0", "false")


def _split(module):
    """(the PackedLinear, the peft LoRA layer or None) of a member, or None when it is neither."""
    from .packed_linear import PackedLinear
    if type(module) is PackedLinear:
        return module, None
    base = getattr(module, "base_layer", None)
    if type(base) is PackedLinear and hasattr(module, "lora_A"):
        return base, module
    return None


def _fused_buffers(parts: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One (qweight, scales, bias) for members stacked along the output dimension; each member's buffers become
    views of the stacked ones (no second copy of the weights)."""
    qweight = torch.cat([p.qweight for p in parts])
    scales = torch.cat([p.scales for p in parts])
    has_bias = any(p.bias is not None for p in parts)
    bias = (torch.cat([p.bias if p.bias is not None else torch.zeros(p.out_features) for p in parts])
            if has_bias else _NO_BIAS)
    row = 0
    for p in parts:
        p.qweight = qweight[row:row + p.out_features]
        p.scales = scales[row:row + p.out_features]
        if p.bias is not None:
            p.bias = bias[row:row + p.out_features]
        row += p.out_features
    return qweight, scales, bias


class _Layer:
    """What the lean forward of one decoder layer needs, gathered once at install."""

    def __init__(self, layer, routing):
        attn, mlp = layer.self_attn, layer.mlp
        split = {name: _split(getattr(attn if name in MEMBERS[:4] else mlp, name)) for name in MEMBERS}
        self.packed = {name: s[0] for name, s in split.items()}
        self.lora = {name: s[1] for name, s in split.items()}
        packed = list(self.packed.values())
        self.bits, self.group = packed[0].bits, packed[0].group
        self.qkv = _fused_buffers(packed[:3])
        self.o = (packed[3].qweight, packed[3].scales, packed[3].bias if packed[3].bias is not None else _NO_BIAS)
        self.gate_up = _fused_buffers(packed[4:6])
        self.down = (packed[6].qweight, packed[6].scales, packed[6].bias if packed[6].bias is not None else _NO_BIAS)
        # lean_mlp_out's weight arguments: [o, gate|up, down] qweights, scales, biases
        self.out_lists = tuple([g[i] for g in (self.o, self.gate_up, self.down)] for i in range(3))
        self.n_heads = packed[0].out_features // attn.head_dim
        self.n_kv = packed[1].out_features // attn.head_dim
        self.routing = routing
        self._lora_cache: dict = {}
        present = [m for m in self.lora.values() if m is not None]
        self._first, self._last = (present[0], present[-1]) if present else (None, None)

    def adapter(self) -> Optional[tuple]:
        """(lora lists for q|k|v, o, gate|up, down, their scales, the gated adapter's name or None) for the adapter
        active now; NO_ADAPTER without one; None when transformers' forward must run.

        Called for every layer of every forward, so it reads the state peft sets for a whole model at once
        (set_adapter, enable / disable, merge, train / eval) from the layer's first LoRA member only, and rebuilds
        the stacked matrices when the first or the last member's A or B has changed (an optimizer step or a
        load_state_dict changes every one of them)."""
        first = self._first
        if first is None:
            return NO_ADAPTER
        if first.training or first.merged:
            return None
        if first.disable_adapters:
            return NO_ADAPTER
        name = single_active_adapter(first)
        if name is None:
            return None
        probe = self._probe(name)
        cached = self._lora_cache.get(name)
        if cached is None or cached[0] != probe:
            cached = self._lora_cache[name] = (probe, self._build(name))
        if cached[1] is None:
            return None
        return (*cached[1], name if self.routing is not None and name == self.routing.gated else None)

    def _probe(self, name: str) -> tuple:
        out = []
        for m in (self._first, self._last):   # (the modules' dicts directly: this runs for every layer and forward)
            la, lb = m.lora_A._modules.get(name), m.lora_B._modules.get(name)
            if la is None or lb is None:
                out.append(None)
                continue
            a, b = la._parameters["weight"], lb._parameters["weight"]
            out += (id(a), a._version, id(b), b._version)
        return tuple(out)

    def _build(self, name: str) -> Optional[tuple]:
        """The stacked matrices of adapter `name`, or None when a member needs peft's forward (DoRA and other
        variants, a bias on B, another dtype)."""
        members = []
        for m in self.lora.values():
            if m is None or name not in m.lora_A:
                members.append(None)
                continue
            if not plain_lora(m, name, torch.float32):
                return None
            members.append((m.lora_A[name].weight, m.lora_B[name].weight, float(m.scaling[name])))
        return self._stack(members)

    def _stack(self, members: list) -> tuple:
        """Per group: [A stacked, B_0, B_1, ...] as packed int8 (qweight, scales) for lean ops' kernel, ranks padded
        to multiples of 32 with zeros (a member without the adapter: rank 0), and the scales."""
        from .packed_linear import BLOCK, quantize
        outs = [p.out_features for p in self.packed.values()]
        ins = [p.in_features for p in self.packed.values()]
        groups, scales = [], []
        for idx in ((0, 1, 2), (3,), (4, 5), (6,)):
            if all(members[i] is None for i in idx):
                groups.append(())
                continue
            a_parts, b_parts = [], []
            for i in idx:
                a, b = members[i][:2] if members[i] else (torch.zeros(0, ins[i]), torch.zeros(outs[i], 0))
                pad = -a.shape[0] % BLOCK
                a_parts.append(torch.cat([a.detach().float(), torch.zeros(pad, ins[i])]))
                b = torch.cat([b.detach().float(), torch.zeros(outs[i], pad)], 1)
                b_parts += list(quantize(b, 8)) if b.shape[1] else [torch.zeros(outs[i], 0, dtype=torch.int8),
                                                                  torch.zeros(outs[i], 0, dtype=torch.float16)]
            groups.append((*quantize(torch.cat(a_parts), 8), *b_parts))
            scales += [members[i][2] if members[i] else 0.0 for i in idx]
        return (*groups, scales)


class _LeanForward:
    """The forward installed on one decoder layer (the layer's own forward signature)."""

    def __init__(self, layer, spec: _Layer):
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        from .packed_linear import _fast
        ops = torch.ops.dlm_packed
        self.attn_in, self.mlp_out, self.path = ops.lean_attn_in.default, ops.lean_mlp_out.default, _fast()[1]
        self.layer, self.spec, self.hf_forward = layer, spec, type(layer).forward
        self.attn, self.norm1, self.norm2 = layer.self_attn, layer.input_layernorm, layer.post_attention_layernorm
        self.watched = (layer.self_attn, layer.mlp, layer.input_layernorm, layer.post_attention_layernorm)
        attn = self.attn
        self.extra = {"sliding_window": attn.sliding_window} if hasattr(attn, "sliding_window") else {}
        self.interfaces = ALL_ATTENTION_FUNCTIONS
        module = __import__(type(attn).__module__, fromlist=["eager_attention_forward"])
        self.eager = getattr(module, "eager_attention_forward", None)

    def __call__(self, hidden_states: torch.Tensor, attention_mask=None, position_ids=None, cache=None,
                 use_cache=False, position_embeddings=None, past_key_values=None, **kwargs):
        layer, spec, attn, x = self.layer, self.spec, self.attn, hidden_states
        cache = cache if cache is not None else past_key_values
        state = None
        if not (torch.is_grad_enabled() or layer.training or position_embeddings is None or x.dim() != 3
                or x.dtype != torch.float32 or x.device.type != "cpu"
                or any(m._forward_hooks or m._forward_pre_hooks for m in self.watched)):
            state = spec.adapter()
        if state is None:
            return self.hf_forward(layer, x, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                                   use_cache=use_cache, position_embeddings=position_embeddings, **kwargs)
        l_qkv, l_o, l_gu, l_down, l_scales, gated = state
        gate = spec.routing.row_gate(x) if gated is not None else None
        cos, sin = position_embeddings
        q, k, v = self.attn_in(x, self.norm1.weight, self.norm1.variance_epsilon, *spec.qkv, spec.bits, spec.group,
                               self.path, l_qkv, l_scales[:3] if l_qkv else [], gate, cos, sin, spec.n_heads,
                               spec.n_kv, attn.head_dim)
        kw = {"position_ids": position_ids, "use_cache": use_cache, **kwargs}   # what the attention module passes on
        if cache is not None:
            k, v = cache.update(k, v, attn.layer_idx, kwargs=kw)
        interface = self.interfaces.get_interface(attn.config._attn_implementation, self.eager)
        out, _ = interface(attn, q, k, v, attention_mask, dropout=0.0, scaling=attn.scaling, **self.extra, **kw)
        out = out.reshape(*x.shape[:-1], -1).contiguous()
        rest = l_scales[3:] if l_qkv else l_scales
        return self.mlp_out(out, x, *spec.out_lists, spec.bits, spec.group, self.path, l_o, l_gu, l_down, rest, gate,
                            self.norm2.weight, self.norm2.variance_epsilon)


def decoder_layers(base) -> list:
    """The decoder layers of a transformers causal LM (through a peft wrapper)."""
    return [m for m in base.modules() if type(m).__name__.endswith("DecoderLayer") and hasattr(m, "self_attn")]


def install(base, routing=None) -> int:
    """Give each decoder layer of `base` whose seven linears are packed (dlm.packed_linear, one format) the lean
    forward of this module; returns how many. A no-op for other families, unpacked models, without the compiled
    kernel, or with DLM_LEAN_LAYERS=off."""
    from .packed_linear import available
    config = getattr(base, "config", None)
    if not enabled() or getattr(config, "model_type", None) not in FAMILIES or not available():
        return 0
    n = 0
    for layer in decoder_layers(base):
        if getattr(layer, "_dlm_lean", False) or not _eligible(layer):
            continue
        layer.forward = _LeanForward(layer, _Layer(layer, routing))
        layer._dlm_lean = True
        n += 1
    return n


def _eligible(layer) -> bool:
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    norms = ("input_layernorm", "post_attention_layernorm")
    if attn is None or mlp is None or not all(hasattr(layer, n) for n in norms):
        return False
    if hasattr(attn, "q_norm") or type(getattr(mlp, "act_fn", None)).__name__ != "SiLUActivation":
        return False   # Qwen3-style q/k norms, other activations: transformers' layer
    for norm in (layer.input_layernorm, layer.post_attention_layernorm):
        if not (hasattr(norm, "variance_epsilon") and type(norm).__name__.endswith("RMSNorm")):
            return False
    split = [_split(getattr(attn if name in MEMBERS[:4] else mlp, name, None)) for name in MEMBERS]
    if any(s is None for s in split):
        return False
    formats = {(s[0].bits, s[0].group) for s in split}
    stacked_whole = all(split[i][0].out_features % TILE == 0 for i in (0, 1, 4))   # q, k, gate: whole weight tiles
    return len(formats) == 1 and split[0][0].out_features % attn.head_dim == 0 and stacked_whole
