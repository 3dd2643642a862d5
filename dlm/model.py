"""DiffusionLM: a Hugging Face causal LM used as a time-embedding-free masked diffusion denoiser.

The paper's recipe (An et al. 2024, §3):
- attention: causal -> bidirectional, optionally annealed (`dlm.attention`);
- shift: the AR model's hidden state i predicts token i+1; the DLM keeps that, so the prediction for a masked
  token at position i is read from row i-1. This class is the only place that knows about it: `denoise_logits`
  returns *position-aligned* logits (row i predicts token i), so samplers, losses and scores never shift;
- absorbing [MASK] noise with no time embedding (`dlm.noise`);
- loss (Eq. 7): L = E_t [ 1/t * sum_{i masked} -log p_theta(x0_i | x_t) ], normalised by the number of masked tokens.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .attention import additive_4d_mask, anneal_attention_mask, bidirectional
from .noise import q_sample, sample_t

DLM_CONFIG_NAME = "dlm_config.json"


@dataclass
class DLMConfig:
    """What turns a causal LM into a DLM; saved as `dlm_config.json` next to the weights.

    mask_token_id:    id of [MASK] (absorbing state).
    shift:            hidden state i predicts token i+1 (True for DiffuGPT / DiffuLLaMA).
    base_family:      transformers model_type of the base (gpt2, llama, qwen2, ...).
    ar_counterpart:   registry name / path of the AR model to compare with (side-by-side, eval).
    adapted:          True when the weights were trained with the diffusion objective.
    added_mask_token: the mask token was added to the base vocabulary (its AR logit is suppressed).
    base_model:       for adapter-only saves: the registry name / path of the base weights.
    training:         free-form record of how the weights were made (recipe, tokens seen).
    """

    mask_token_id: int
    shift: bool = True
    base_family: str = ""
    ar_counterpart: Optional[str] = None
    adapted: bool = False
    added_mask_token: bool = False
    base_model: Optional[str] = None
    training: dict = field(default_factory=dict)
    format_version: int = 1

    def save(self, directory: str | os.PathLike) -> None:
        Path(directory, DLM_CONFIG_NAME).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "DLMConfig":
        path = Path(directory, DLM_CONFIG_NAME)
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
        known = {f.name for f in fields(cls)}
        if "mask_token_id" not in data:
            raise ValueError(f"{path} has no mask_token_id")
        return cls(**{k: v for k, v in data.items() if k in known})


class DiffusionLossOutput(NamedTuple):
    loss: torch.Tensor       # Eq. 7: (1/t)-weighted masked CE, normalised by the masked-token count
    masked_ce: torch.Tensor  # the same CE without the 1/t weight (a readable training signal)


@dataclass
class PrefixCache:
    """KV of the first `length` canvas positions (Fast-dLLM-style approximate prefix cache).

    With the shift, the prediction for position `length` is read from row `length - 1`, so the cache holds the
    first `length - 1` positions and the forward re-feeds position `length - 1`.
    `logits`: position-aligned logits for positions >= length from the forward that built the cache
    ([B, L - length, V]); a sampler may use them for its first step instead of a second forward.
    """

    kv: object
    length: int
    n_cached: int
    attention_mask: Optional[torch.Tensor]
    logits: Optional[torch.Tensor] = None


def _truncate_cache(cache, length: int) -> None:
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)  # negative = number of tokens to drop (transformers >= 4.4x and 5.x)


def padding_position_ids(attention_mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Left padding must not shift positions: position = number of real tokens before it."""
    if attention_mask is None or bool(attention_mask.bool().all()):
        return None
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class DiffusionLM(nn.Module):
    """A causal LM (`base`) + mask id + shift flag, used as a diffusion denoiser.

    Build with `dlm.load(...)` / `DiffusionLM.from_pretrained(...)`; save with `save_pretrained(dir)`.
    """

    def __init__(self, base: nn.Module, tokenizer, config: DLMConfig, name: str = ""):
        super().__init__()
        self.base = base
        self.tokenizer = tokenizer
        self.config = config
        self.name = name or getattr(getattr(base, "config", None), "_name_or_path", "") or "dlm"
        vocab = self.base.get_input_embeddings().weight.shape[0]
        if not 0 <= config.mask_token_id < vocab:
            raise ValueError(f"mask_token_id {config.mask_token_id} is outside the vocabulary (0..{vocab - 1})")

    # ----- attributes ------------------------------------------------------------------------------------------
    @property
    def mask_token_id(self) -> int:
        return self.config.mask_token_id

    @property
    def shift(self) -> bool:
        return self.config.shift

    @shift.setter
    def shift(self, value: bool) -> None:
        self.config.shift = bool(value)

    @property
    def ar_counterpart(self) -> Optional[str]:
        return self.config.ar_counterpart

    @property
    def hf_config(self):
        return self.base.config

    @property
    def device(self) -> torch.device:
        return next(self.base.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return self.base.get_input_embeddings().weight.dtype

    @property
    def vocab_size(self) -> int:
        return self.base.get_input_embeddings().weight.shape[0]

    @property
    def max_length(self) -> int:
        cfg = self.base.config
        for key in ("max_position_embeddings", "n_positions", "n_ctx"):
            value = getattr(cfg, key, None)
            if value:
                return int(value)
        return 2048

    @property
    def eos_token_ids(self) -> list[int]:
        ids = set()
        for source in (self.tokenizer, getattr(self.base, "generation_config", None), self.base.config):
            value = getattr(source, "eos_token_id", None)
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, (list, tuple)):
                ids.update(int(v) for v in value)
        ids.discard(self.mask_token_id)
        return sorted(ids)

    @property
    def attn_implementation(self) -> str:
        return getattr(self.base.config, "_attn_implementation", None) or "eager"

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.base.parameters() if p.requires_grad or not trainable_only)

    # ----- forward passes --------------------------------------------------------------------------------------
    def _base_logits(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor], ratio: float,
                     generator: Optional[torch.Generator] = None, **kwargs) -> torch.Tensor:
        """Raw base-model logits (row i predicts token i+1 when shift) under the chosen attention pattern."""
        position_ids = kwargs.pop("position_ids", None)
        if position_ids is None:
            position_ids = padding_position_ids(attention_mask)
        if ratio <= 0.0:
            out = self.base(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs)
        elif ratio >= 1.0:
            with bidirectional(self.base.config):
                out = self.base(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                **kwargs)
        else:
            if self.attn_implementation.startswith("flash"):
                raise ValueError("attention-mask annealing (0 < ratio < 1) needs attn_implementation 'sdpa' or "
                                 "'eager'; flash-attention supports only full attention (ratio = 1)")
            B, L = input_ids.shape
            allowed = anneal_attention_mask(L, ratio, generator=generator, device=input_ids.device)
            mask4d = additive_4d_mask(allowed, attention_mask, B, self.dtype)
            if position_ids is None:
                position_ids = torch.arange(L, device=input_ids.device)[None].expand(B, L)
            out = self.base(input_ids=input_ids, attention_mask=mask4d, position_ids=position_ids, **kwargs)
        return out.logits

    def _align(self, logits: torch.Tensor) -> torch.Tensor:
        """Raw logits -> position-aligned (row i predicts token i). Row 0 is never predicted under the shift."""
        if not self.shift:
            return logits
        return torch.cat([torch.zeros_like(logits[:, :1]), logits[:, :-1]], dim=1)

    def denoise_logits(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                       attention_mask_ratio: float = 1.0, prefix_cache: Optional[PrefixCache] = None,
                       generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Position-aligned denoiser logits.

        input_ids:            [B, L] noisy canvas (mask ids where unknown).
        attention_mask:       [B, L] 1 = token, 0 = padding (left padding supported), None = no padding.
        attention_mask_ratio: 1.0 = bidirectional (inference), 0.0 = the base's causal attention, in between =
                              annealed (training only; the random pattern comes from `generator`).
        prefix_cache:         from `build_prefix_cache`; then only positions >= prefix_cache.length are computed.
        Returns [B, L, V] with row i the prediction for token i, or [B, L - P, V] for rows P.. with a cache.
        """
        if prefix_cache is None:
            return self._align(self._base_logits(input_ids, attention_mask, attention_mask_ratio, generator))
        P, n = prefix_cache.length, prefix_cache.n_cached
        mask = prefix_cache.attention_mask
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0) if mask is not None else \
            torch.arange(input_ids.shape[1], device=input_ids.device)[None].expand(input_ids.shape[0], -1)
        with bidirectional(self.base.config):
            out = self.base(input_ids=input_ids[:, n:], attention_mask=mask, position_ids=positions[:, n:],
                            past_key_values=prefix_cache.kv, use_cache=True)
        _truncate_cache(prefix_cache.kv, n)  # leave the cache as it was
        logits = out.logits
        return logits[:, :-1] if self.shift else logits  # with the shift, row 0 is position P-1 -> predicts P

    def build_prefix_cache(self, input_ids: torch.Tensor, prefix_length: int,
                           attention_mask: Optional[torch.Tensor] = None) -> PrefixCache:
        """One bidirectional forward over the whole canvas; keep the KV of the first `prefix_length` positions.

        input_ids: [B, L]; prefix_length: P (0 < P <= L). The cached prefix saw the canvas as it is now (masks
        included); later calls reuse it while the rest changes (the Fast-dLLM approximation). The forward's
        position-aligned logits for positions >= P are returned in `.logits`.
        """
        L = input_ids.shape[1]
        if not 0 < prefix_length <= L:
            raise ValueError(f"prefix_length must be in 1..{L}, got {prefix_length}")
        n = prefix_length - 1 if self.shift else prefix_length
        with bidirectional(self.base.config):
            out = self.base(input_ids=input_ids, attention_mask=attention_mask,
                            position_ids=padding_position_ids(attention_mask), use_cache=True)
        kv = out.past_key_values
        _truncate_cache(kv, n)
        logits = self._align(out.logits)[:, prefix_length:]
        return PrefixCache(kv=kv, length=prefix_length, n_cached=n, attention_mask=attention_mask, logits=logits)

    def ar_logits(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Plain causal next-token logits of the same weights (row i predicts token i+1) -> [B, L, V].

        An added mask token gets -inf so the AR distribution is the base model's own.
        """
        logits = self._base_logits(input_ids, attention_mask, 0.0)
        if self.config.added_mask_token:
            logits = logits.clone()
            logits[..., self.mask_token_id] = float("-inf")
        return logits

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                attention_mask_ratio: float = 1.0) -> torch.Tensor:
        return self.denoise_logits(input_ids, attention_mask, attention_mask_ratio)

    # ----- training objective (Eq. 7) --------------------------------------------------------------------------
    def default_maskable(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """[B, L] bool: real tokens, minus position 0 under the shift (nothing predicts it)."""
        maskable = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        if self.shift:
            maskable = maskable.clone()
            maskable[:, 0] = False
        return maskable

    def diffusion_loss(self, input_ids: torch.Tensor, t: Optional[torch.Tensor] = None,
                       maskable: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None,
                       attention_mask_ratio: float = 1.0, weighting: str = "inverse_t", eps: float = 1e-3,
                       generator: Optional[torch.Generator] = None) -> DiffusionLossOutput:
        """Eq. 7 on a batch of clean sequences.

        input_ids: [B, L] clean tokens x0.
        t:         [B] noise levels; default t ~ U(eps, 1) per sequence.
        maskable:  [B, L] bool, positions that may be noised (SFT: the response only). Default: every real token
                   except position 0 under the shift. Position 0 is never maskable under the shift.
        attention_mask_ratio: annealing ratio for this step (1 = bidirectional).
        weighting: "inverse_t" (Eq. 7) or "none" (ablation: plain masked CE).
        Returns (loss, masked_ce): both normalised by the number of masked tokens.
        """
        if weighting not in ("inverse_t", "none"):
            raise ValueError(f"weighting must be 'inverse_t' or 'none', got {weighting!r}")
        B = input_ids.shape[0]
        if maskable is None:
            maskable = self.default_maskable(input_ids, attention_mask)
        elif self.shift:
            maskable = maskable.bool().clone()
            maskable[:, 0] = False
        if t is None:
            t = sample_t(B, eps, generator=generator, device=input_ids.device)
        t = torch.as_tensor(t, dtype=torch.float32, device=input_ids.device).expand(B)
        x_t, masked = q_sample(input_ids, t, self.mask_token_id, maskable, generator=generator)
        logits = self.denoise_logits(x_t, attention_mask, attention_mask_ratio, generator=generator)  # [B, L, V]
        if not bool(masked.any()):
            zero = logits.sum() * 0.0  # keeps the graph (and DDP) happy when nothing was masked
            return DiffusionLossOutput(zero, zero.detach())
        ce = F.cross_entropy(logits[masked].float(), input_ids[masked], reduction="none")  # [N]
        n = masked.sum()
        weight = (1.0 / t)[:, None].expand_as(masked)[masked] if weighting == "inverse_t" else torch.ones_like(ce)
        return DiffusionLossOutput((ce * weight).sum() / n, ce.detach().sum() / n)

    # ----- persistence -------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, source, **kwargs) -> "DiffusionLM":
        from .loading import load
        return load(source, **kwargs)

    def save_pretrained(self, directory: str | os.PathLike, **kwargs) -> None:
        """Write safetensors weights (or only the LoRA adapter), the tokenizer and `dlm_config.json`."""
        from .loading import save_pretrained
        save_pretrained(self, directory, **kwargs)

    # ----- algorithms (thin delegates; the code lives in one module per job) --------------------------------------
    def generate(self, prompt=None, **kwargs):
        from .sampling import generate
        return generate(self, prompt, **kwargs)

    def stream(self, prompt=None, **kwargs):
        from .sampling import stream
        return stream(self, prompt, **kwargs)

    def generate_batch(self, prompts, **kwargs):
        from .sampling import generate_batch
        return generate_batch(self, prompts, **kwargs)

    def ar_generate(self, prompt=None, **kwargs):
        from .sampling import ar_generate
        return ar_generate(self, prompt, **kwargs)

    def infill(self, prefix, suffix, length, **kwargs):
        from .infill import infill
        return infill(self, prefix, suffix, length, **kwargs)

    def fill(self, template, **kwargs):
        from .infill import fill
        return fill(self, template, **kwargs)

    def stream_fill(self, template, **kwargs):
        from . import infill
        return infill.stream_fill(self, template, **kwargs)

    def stream_infill(self, prefix, suffix, length, **kwargs):
        from . import infill
        return infill.stream_infill(self, prefix, suffix, length, **kwargs)

    def score(self, context, continuation, **kwargs):
        from .likelihood import score
        return score(self, context, continuation, **kwargs)

    def ar_score(self, context, continuation, **kwargs):
        from .likelihood import ar_score
        return ar_score(self, context, continuation, **kwargs)
