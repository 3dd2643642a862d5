"""Which LoRA adapter runs on which rows of a forward: the draft adapter on the noisy rows only.

A DLM that writes by self-speculation (`dlm.decoders.speculative`) verifies its drafts with its clean rows. If the
adapter also runs on the clean rows, the verifier is the adapted model, and what it writes is the adapter's text,
not the base model's. Here the *draft adapter* is row-gated: in a block forward its LoRA update is added only on
the rows of the noisy block (the masks being drafted); the clean rows, and so their keys and values in the cache,
are the base model's own, bit for bit the AR model's computation. Exact speculative sampling then writes text
distributed exactly as the AR base's sampling (greedy: the AR base's greedy text), at several tokens per forward
when the drafts are accepted (cf. arXiv 2507.11851: a LoRA gated to mask positions leaves next-token behaviour
unchanged).

The gate is a forward hook on each LoRA layer's `lora_B` module of the gated adapter: its output (the low-rank
update, [B, T, out]) is multiplied by a [T] or [B, T] row mask. The base layer's output is never touched, so the
ungated rows are the base layer's result exactly (not base + 0 * update computed in a different order).

A model may carry two adapters (`DLMConfig.draft_adapter`): the *any-order* adapter ("default", the paper's full
attention: infilling, the `full` decoder, scoring) on every row, and the row-gated draft adapter ("draft") for
block forwards. `AdapterRouting.use(mode)` switches between them only when the mode changes (peft's set_adapter
walks every module):
    "full":  the any-order adapter on every row (a draft-only model: its draft adapter on every row);
    "block": the draft adapter on the noisy rows only (`rows`); without a gated adapter, the one adapter on all;
    "ar":    no adapter (the base model).
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch

DRAFT = "draft"      # the draft adapter's peft name in a two-adapter model
ANY_ORDER = "default"


class AdapterRouting:
    """Row gating and adapter switching for a peft-wrapped base (see the module docstring).

    base:      the `PeftModel`.
    gated:     the name of the row-gated (draft) adapter.
    any_order: the name of the adapter used on every row in full-attention forwards; None = the gated one.
    """

    def __init__(self, base, gated: str, any_order: Optional[str] = None):
        self.base, self.gated, self.any_order = base, gated, any_order
        self.rows: Optional[torch.Tensor] = None     # the current gate; None = every row
        self._gates: dict = {}                       # `rows` converted for the layers' outputs (device, dtype)
        self.mode: Optional[str] = None
        gated_layers = [m.lora_B[gated] for m in base.modules()
                        if isinstance(getattr(m, "lora_B", None), torch.nn.ModuleDict) and gated in m.lora_B]
        for layer in gated_layers:
            layer.register_forward_hook(self._gate)
        if not gated_layers:
            raise ValueError(f"adapter {gated!r} has no LoRA layers to gate")
        from peft.tuners.trainable_tokens.layer import TrainableTokensLayer
        self.token_layers = [m for m in base.modules() if isinstance(m, TrainableTokensLayer)]
        self.merged_tokens: Optional[str] = None

    def gate_for(self, output: torch.Tensor) -> Optional[torch.Tensor]:
        """The current row gate shaped to multiply a layer's update `output` ([T, 1] or [B, T, 1]), or None (every
        row). Converted once per forward and dtype, not once per layer."""
        if self.rows is None:
            return None
        key = (output.device, output.dtype)
        gate = self._gates.get(key)
        if gate is None:
            gate = self._gates[key] = self.rows.to(device=output.device, dtype=output.dtype)[..., None]
        return gate

    def row_gate(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """The current gate as one entry per row of `x` ([..., K] -> [rows]), or None (every row); once per forward
        and shape."""
        if self.rows is None:
            return None
        key = (x.device, x.dtype, x.shape[:-1])
        gate = self._gates.get(key)
        if gate is None:
            gate = self._gates[key] = self.rows.to(device=x.device, dtype=x.dtype).expand(x.shape[:-1]).reshape(-1)
        return gate

    def _gate(self, module, inputs, output):
        gate = self.gate_for(output)
        return output if gate is None else output * gate

    def _merge_tokens(self, name: Optional[str]) -> None:
        """Write adapter `name`'s trained token rows (the [MASK] row) into the base embedding, or none. peft's
        unmerged trainable tokens rebuild the whole 49k-row embedding (and a tied head) on every forward, ~36 ms
        each on a 2-core CPU; merged, a forward reads the base weights. Only the mask id's row changes, which no
        clean row embeds and whose logit every decoder bans, so the base stays the AR base. Training (grad mode on
        a module in train mode) keeps them unmerged so that the rows get gradients. The layers' own state is
        checked, not only the last call's: peft's `disable_adapter()` context unmerges them behind the routing's
        back (a 3x slower forward after it, until this noticed)."""
        def wanted(layer) -> bool:   # (peft's disabled layers unmerge themselves: leave them be)
            return name is not None and name in layer.token_indices and not layer.disable_adapters

        if name == self.merged_tokens and all(layer.merged == wanted(layer) for layer in self.token_layers):
            return
        for layer in self.token_layers:
            if layer.merged:
                layer.unmerge()
        for layer in self.token_layers:
            if wanted(layer):
                layer.merge(adapter_names=[name])
        self.merged_tokens = name

    def _switch(self, mode: str) -> None:
        adapter = None if mode == "ar" else self.gated if mode == "block" or self.any_order is None else self.any_order
        if mode != self.mode:
            if adapter is None:
                self.base.base_model.disable_adapter_layers()
            else:
                if self.mode in (None, "ar"):
                    self.base.base_model.enable_adapter_layers()
                if self.base.active_adapter != adapter:
                    self.base.set_adapter(adapter)
            self.mode = mode
        if self.token_layers:   # after the layers are enabled or disabled (a disabled layer is left unmerged)
            training = self.base.training and torch.is_grad_enabled()
            self._merge_tokens(None if training else adapter)

    @contextlib.contextmanager
    def use(self, mode: str, rows: Optional[torch.Tensor] = None):
        """Run the enclosed forward in `mode` ("full", "block", "ar"); `rows` ([T] or [B, T], 1 = noisy row)
        gates the draft adapter in "block" mode."""
        if mode not in ("full", "block", "ar"):
            raise ValueError(f"adapter routing mode must be full, block or ar, got {mode!r}")
        self._switch(mode)
        previous, self.rows = (self.rows, self._gates), (rows if mode == "block" else None)
        self._gates = {}
        try:
            yield
        finally:
            self.rows, self._gates = previous


def route(model, mode: str, rows: Optional[torch.Tensor] = None):
    """`model.routing.use(mode, rows)` when the DiffusionLM has adapter routing, else a no-op context."""
    routing = getattr(model, "routing", None)
    return routing.use(mode, rows) if routing is not None else contextlib.nullcontext()


# ----- inference without peft's per-call bookkeeping -------------------------------------------------------------
def install_inference_forward(base, routing: Optional[AdapterRouting] = None) -> int:
    """Give every unmerged peft LoRA linear of `base` a lean inference forward; returns how many.

    peft's `Linear.forward` checks its arguments, walks the active adapters, casts and calls dropout, lora_A and
    lora_B as modules (and the routing hook on lora_B): about a dozen torch calls and several Python frames per
    layer, ~25 ms a forward over SmolLM2's 210 layers on a 2-core CPU, more than the adapter's arithmetic. Under
    `torch.no_grad` in eval mode with one plain LoRA active in the input's dtype, the lean forward computes the
    same sum, `base(x) + scaling * gate * B(A x)`, in a few calls (mm, a row gate, addmm_ in place); the gate is
    `routing`'s, so an ungated row is `base(x) + 0`, the base layer's result exactly. Anything else (training,
    merged or disabled layers, DoRA and other variants, several adapters, extra arguments) takes peft's own
    forward."""
    from peft.tuners.lora.layer import Linear as LoraLinear
    n = 0
    for layer in base.modules():
        if type(layer) is LoraLinear:
            layer.forward = _lean_forward(layer, routing)
            n += 1
    return n


def single_active_adapter(layer) -> Optional[str]:
    """The name of a peft LoRA layer's active adapter, or None when several are active."""
    name = layer._active_adapter
    if isinstance(name, (list, tuple)):
        return name[0] if len(name) == 1 else None
    return name


def plain_lora(layer, name: str, dtype: torch.dtype) -> bool:
    """Whether adapter `name` of a peft LoRA layer is the plain `scaling * B(A x)` in `dtype` that the lean
    inference forwards compute (no DoRA or other variant, no bias on B)."""
    return (name not in layer.lora_variant and layer.lora_B[name].bias is None
            and layer.lora_A[name].weight.dtype == dtype)


def _lean_forward(layer, routing: Optional[AdapterRouting]):
    from .packed_linear import PackedLinear
    peft_forward = type(layer).forward

    def forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if args or kwargs or layer.training or layer.merged or torch.is_grad_enabled():
            return peft_forward(layer, x, *args, **kwargs)
        if layer.disable_adapters:
            return layer.base_layer(x)
        name = single_active_adapter(layer)
        if name is None:
            return peft_forward(layer, x)
        if name not in layer.lora_A:
            return layer.base_layer(x)
        a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
        if not plain_lora(layer, name, x.dtype):
            return peft_forward(layer, x)
        gate = routing.row_gate(x) if routing is not None and name == routing.gated else None   # [rows] or None
        base_layer = layer.base_layer
        if type(base_layer) is PackedLinear:   # the whole sum in one call into the packed kernel, where it runs
            out = base_layer.forward_lora(x, a, b, layer.scaling[name], gate)
            if out is not None:
                return out
        result = base_layer(x)
        # on 2-D views with mm / addmm_: F.linear on [B, T, K] decomposes into several more calls per layer
        low = torch.mm(x.reshape(-1, x.shape[-1]), a.t())                 # [B*T, r]
        if gate is not None:
            low = low.mul_(gate[:, None])
        if not result.is_contiguous():
            result = result.contiguous()
        # result + scaling * low @ b^T in place: a row of `low` that is 0 leaves its row of `result` exactly as is
        result.view(-1, result.shape[-1]).addmm_(low, b.t(), alpha=layer.scaling[name])
        return result

    return forward
