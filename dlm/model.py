"""DiffusionLM: a Hugging Face causal LM used as a time-embedding-free masked diffusion denoiser.

The paper's recipe (Gong et al. 2024, §3):
- attention: causal -> bidirectional, optionally annealed (`dlm.attention`);
- shift: the AR model's hidden state i predicts token i+1; the DLM keeps that, so the prediction for a masked
  token at position i is read from row i-1. This class is the only place that knows about it: `denoise_logits`
  returns *position-aligned* logits (row i predicts token i), so samplers, losses and scores never shift;
- absorbing [MASK] noise with no time embedding (`dlm.noise`);
- loss (Eq. 7): L = E_t [ 1/t * sum_{i masked} -log p_theta(x0_i | x_t) ], normalised by the number of masked tokens
  (`dlm.losses`).
The KV caches its decoders carry live in `dlm.kv_cache`, its saved config in `dlm.dlm_config`.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch import nn

from . import generation, likelihood, losses
from . import infill as infill_mod
from .adapter_routing import route
from .attention import anneal_attention_mask, bidirectional, block_pattern, prepared_mask, staircase
from .dlm_config import DLM_CONFIG_NAME, DLMConfig  # noqa: F401  (re-exported: callers import them from here)
from .fileio import atomic_directory
from .kv_cache import BlockCache, BlockLayout, BlockLogits, PrefixCache, block_layout  # noqa: F401  (re-exported)
from .kv_cache import truncate_cache as _truncate_cache  # the benchmarks import it from here
from .losses import DiffusionLossOutput
from .sampler_config import SamplerConfig, save_sampler_configs
from .tokens import start_token_id
from .types import Generation, Score


def _embedding_table(base) -> torch.Tensor:
    """The input embedding's weight without materialising it: peft's trainable-token wrapper answers `.weight` by
    rebuilding the whole table with the adapter's rows (a 113 MB copy for SmolLM2) on every access."""
    emb = base.get_input_embeddings()
    inner = getattr(getattr(emb, "token_adapter", None), "base_layer", None)
    return (inner if inner is not None else emb).weight


def padding_position_ids(attention_mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Left padding must not shift positions: position = number of real tokens before it."""
    if attention_mask is None or bool(attention_mask.bool().all()):
        return None
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class DiffusionLM(nn.Module):
    """A causal LM (`base`) + mask id + shift flag, used as a diffusion denoiser.

    Build with `dlm.load(...)`; save with `save_pretrained(dir)`.
    sampler_config: the recommended `SamplerConfig` for writing (every `generate` / `stream` call's default).
    infill_config:  the recommended one for infilling (`fill` / `infill`; always the full-attention decoder).
    Both come from the model directory's `sampler_config.json` when it has one.
    """

    def __init__(self, base: nn.Module, tokenizer, config: DLMConfig, name: str = "",
                 sampler_config: Optional[SamplerConfig] = None, infill_config: Optional[SamplerConfig] = None):
        super().__init__()
        self.base = base
        self.tokenizer = tokenizer
        self.config = config
        self.sampler_config = sampler_config or SamplerConfig()
        self.infill_config = infill_config or SamplerConfig()
        self.name = name or getattr(getattr(base, "config", None), "_name_or_path", "") or "dlm"
        self.routing = None   # an `AdapterRouting` when a row-gated draft adapter is loaded (`dlm.adapter_routing`)
        vocab = self.vocab_size
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
    def clean_causal(self) -> bool:
        """Block diffusion: clean tokens attend token-causally (`DLMConfig.clean_attention == "causal"`)."""
        return self.config.clean_attention == "causal"

    @property
    def first_predictable(self) -> int:
        """The first canvas position the denoiser can predict: 1 under the shift (row 0 predicts nothing), else 0.
        Samplers, likelihoods and losses ask this instead of reasoning about the shift themselves."""
        return 1 if self.shift else 0

    @property
    def start_token_id(self) -> Optional[int]:
        """The token put in front of a text that has no context: BOS, else the first EOS, never the mask."""
        return start_token_id(self.tokenizer, self.eos_token_ids, self.mask_token_id)

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
        return _embedding_table(self.base).dtype

    @property
    def vocab_size(self) -> int:
        return _embedding_table(self.base).shape[0]

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
        """Parameters of the model; a packed int8 / int4 layer (buffers, not parameters) counts its weights, except
        a head tied to the input embedding (counted there)."""
        n = sum(p.numel() for p in self.base.parameters() if p.requires_grad or not trainable_only)
        if not trainable_only:
            from .packed_linear import PackedLinear
            tied = getattr(getattr(self.base, "config", None), "tie_word_embeddings", False)
            head = self.base.get_output_embeddings() if tied else None
            n += sum(m.in_features * m.out_features for m in self.base.modules()
                     if isinstance(m, PackedLinear) and m is not head)
        return n

    # ----- forward passes --------------------------------------------------------------------------------------
    def _base_logits(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor], ratio: float,
                     generator: Optional[torch.Generator] = None, **kwargs) -> torch.Tensor:
        """Raw base-model logits (row i predicts token i+1 when shift) under the chosen attention pattern."""
        with route(self, "ar" if ratio <= 0.0 else "full"):
            return self._full_forward(input_ids, attention_mask, ratio, generator, **kwargs)

    def _full_forward(self, input_ids, attention_mask, ratio, generator, **kwargs) -> torch.Tensor:
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
            mask4d = prepared_mask(self.base.config, allowed, B, self.dtype, attention_mask)
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
                       generator: Optional[torch.Generator] = None, rows: Optional[torch.Tensor] = None
                       ) -> torch.Tensor:
        """Position-aligned denoiser logits.

        input_ids:            [B, L] noisy canvas (mask ids where unknown).
        attention_mask:       [B, L] 1 = token, 0 = padding (left padding supported), None = no padding.
        attention_mask_ratio: 1.0 = bidirectional (inference), 0.0 = the base's causal attention, in between =
                              annealed (training only; the random pattern comes from `generator`).
        prefix_cache:         from `build_prefix_cache`; then only positions >= prefix_cache.length are computed.
        rows:                 [R] ascending positions whose predictions are wanted (decoders: the masked ones);
                              only their rows go through the output layer, a 49k-vocabulary matmul that is ~20%
                              of a SmolLM2 forward. Under the shift, position 0 (predicted by nothing) is not allowed.
        Returns [B, L, V] with row i the prediction for token i, or [B, L - P, V] for rows P.. with a cache, or
        [B, R, V] for `rows` (row j the prediction for token rows[j]).
        """
        if rows is not None:
            first = (prefix_cache.length if prefix_cache is not None else 0) or self.first_predictable
            if rows.numel() == 0 or int(rows.min()) < first or int(rows.max()) >= input_ids.shape[1]:
                raise ValueError(f"rows must be non-empty positions in {first}..{input_ids.shape[1] - 1}")
        if prefix_cache is None:
            if rows is not None:   # raw row r - 1 predicts token r under the shift
                return self._base_logits(input_ids, attention_mask, attention_mask_ratio, generator,
                                         logits_to_keep=rows - int(self.shift))
            return self._align(self._base_logits(input_ids, attention_mask, attention_mask_ratio, generator))
        n = prefix_cache.n_cached
        mask = prefix_cache.attention_mask
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0) if mask is not None else \
            torch.arange(input_ids.shape[1], device=input_ids.device)[None].expand(input_ids.shape[0], -1)
        keep = {} if rows is None else {"logits_to_keep": rows - n - int(self.shift)}
        with bidirectional(self.base.config), route(self, "full"):
            out = self.base(input_ids=input_ids[:, n:], attention_mask=mask, position_ids=positions[:, n:],
                            cache=prefix_cache.kv, use_cache=True, **keep)
        _truncate_cache(prefix_cache.kv, n)  # leave the cache as it was
        logits = out.logits
        if rows is not None:
            return logits
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
        with bidirectional(self.base.config), route(self, "full"):
            out = self.base(input_ids=input_ids, attention_mask=attention_mask,
                            position_ids=padding_position_ids(attention_mask), use_cache=True)
        kv = out.cache
        _truncate_cache(kv, n)
        logits = self._align(out.logits)[:, prefix_length:]
        return PrefixCache(kv=kv, length=prefix_length, n_cached=n, attention_mask=attention_mask, logits=logits)

    def new_block_cache(self) -> BlockCache:
        from .attention import full_length_cache
        return BlockCache(kv=full_length_cache(self.base.config))

    def block_commit(self, cache: BlockCache, clean_ids: torch.Tensor, clean_blocks: Optional[torch.Tensor] = None,
                     clean_padding: Optional[torch.Tensor] = None) -> None:
        """Append finished tokens to the exact block cache in one forward, denoising nothing (e.g. the prompt).
        clean_ids [B, c]; clean_blocks / clean_padding as for `block_denoise`. With the shift the last clean row
        becomes `cache.next_logits` (the prediction for the next block's first token)."""
        self._block_forward(cache, None, clean_ids, clean_blocks, clean_padding)

    def block_denoise(self, cache: BlockCache, noisy_ids: torch.Tensor, clean_ids: Optional[torch.Tensor] = None,
                      clean_blocks: Optional[torch.Tensor] = None, clean_padding: Optional[torch.Tensor] = None, *,
                      predict_after: bool = False, noisy_from: Optional[int] = None) -> torch.Tensor:
        """One block-diffusion forward over the exact cache: commit `clean_ids` (finished tokens) to the cache and
        denoise the noisy block `noisy_ids` that follows them, in one call.

        cache:         a `BlockCache` (from `new_block_cache`), updated in place with the clean tokens only.
        noisy_ids:     [B, n] the block being denoised (mask ids where unknown).
        clean_ids:     [B, c] tokens to append to the cache first (the prompt, or the block just finished).
        clean_blocks:  [c] block index of each clean token, relative (default: one block); ordered, >= 0.
        clean_padding: [B, c] 1 = token, 0 = left padding (prompts of a batch), default all tokens.
        predict_after: also return the prediction for the position right after the noisy block (the shift puts it
                       on the last noisy row): n + 1 rows, so a drafter needs no mask at the last position it drafts.
        noisy_from:    token-causal clean attention only: the noisy block sees just the first `noisy_from` clean
                       tokens of this call (1..c; default c, all of them) and sits at the position of clean token
                       `noisy_from`, beside the clean tokens after it rather than after them (a sibling: drafts that
                       must not depend on drafts still unverified). Row 0 is then clean token `noisy_from - 1`'s row.
        Attention is the block rule of `dlm.attention`: clean tokens see the cache and the clean tokens of their own
        and earlier blocks; the noisy block sees the cache, the clean tokens before it and itself (bidirectional).
        Returns position-aligned logits [B, n, V] (row i predicts noisy token i; n + 1 rows with predict_after).
        """
        return self._block_forward(cache, noisy_ids, clean_ids, clean_blocks, clean_padding,
                                   predict_after=predict_after, noisy_from=noisy_from)[0]

    def block_verify(self, cache: BlockCache, noisy_ids: Optional[torch.Tensor], clean_ids: torch.Tensor, *,
                     clean_from: int = 0, predict_after: bool = False, noisy_from: Optional[int] = None
                     ) -> BlockLogits:
        """`block_denoise` that also returns the clean rows from `clean_from` on: clean row i predicts the token
        after clean token clean_from + i, an AR next-token prediction when clean attention is causal, with which the
        speculative decoder verifies its drafts (rows before `clean_from`, e.g. a prompt's, are not computed).
        noisy_ids may be None (nothing left to draft). Returns `BlockLogits(noisy=[B, n(+1), V] or None,
        clean=[B, c - clean_from, V])`; clean_from must be <= noisy_from - 1 with a sibling block."""
        return BlockLogits(*self._block_forward(cache, noisy_ids, clean_ids, clean_from=clean_from,
                                                predict_after=predict_after, noisy_from=noisy_from))

    def _block_forward(self, cache: BlockCache, noisy_ids: Optional[torch.Tensor], clean_ids: Optional[torch.Tensor],
                       clean_blocks: Optional[torch.Tensor] = None, clean_padding: Optional[torch.Tensor] = None, *,
                       clean_from: Optional[int] = None, predict_after: bool = False, noisy_from: Optional[int] = None
                       ) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """The one forward behind `block_commit` / `block_denoise` / `block_verify` (arguments as there; the index
        arithmetic is `block_layout`): (aligned noisy logits or None, clean rows from clean_from on or None)."""
        B = (noisy_ids if noisy_ids is not None else clean_ids).shape[0]
        device = self.device
        c = clean_ids.shape[1] if clean_ids is not None else 0
        n = noisy_ids.shape[1] if noisy_ids is not None else 0
        past = cache.length
        lay = block_layout(past, cache.n_blocks, c, n, shift=self.shift, clean_causal=self.clean_causal,
                           clean_blocks=clean_blocks, noisy_from=noisy_from, clean_from=clean_from,
                           predict_after=predict_after, device=device)
        ids = torch.cat([x for x in (clean_ids, noisy_ids) if x is not None], dim=1).to(device)
        pattern = block_pattern(lay.q_noisy, lay.q_block, lay.k_noisy, lay.k_block)      # [c + n, past + c + n]
        pad_new = torch.ones(B, c + n, dtype=torch.long, device=device)
        if clean_padding is not None:
            pad_new[:, :c] = clean_padding.to(device)
        padding = pad_new if cache.padding is None else torch.cat([cache.padding.to(device), pad_new], dim=1)
        has_pad = not bool(padding.bool().all())
        every = ((padding.long().cumsum(-1) - 1).clamp(min=0) if has_pad else
                 torch.arange(past + c + n, device=device)[None].expand(B, -1))
        positions = every[:, past:]
        if lay.noisy_at != c:  # a sibling block starts where clean token `noisy_at` is
            positions = torch.cat([positions[:, :c], positions[:, lay.noisy_at:lay.noisy_at + 1] +
                                   torch.arange(n, device=device)], dim=1)
        key_positions = torch.cat([every[0, :past], positions[0]])   # sliding windows count positions, not order
        mask = prepared_mask(self.base.config, pattern, B, self.dtype, padding if has_pad else None, key_positions)
        with route(self, "block", lay.q_noisy):   # a draft adapter runs on the noisy rows only
            out = self.base(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache.kv,
                            use_cache=True, logits_to_keep=lay.keep)
        _truncate_cache(cache.kv, past + c)  # keep the clean tokens only: the noisy block is not final
        cache.length, cache.padding, cache.n_blocks = past + c, padding[:, :past + c], lay.n_blocks
        clean_rows, rows = out.logits[:, :lay.n_clean_rows], out.logits[:, lay.n_clean_rows:]
        if self.shift and c:
            cache.next_logits = clean_rows[:, -1]
        aligned = None
        if n and not self.shift:
            aligned = rows
        elif n:  # the shift: the noisy block's first token is predicted by the clean row before it
            lead = clean_rows[:, lay.lead] if lay.lead is not None else cache.next_logits
            if lead is None:
                raise ValueError("the first block needs clean tokens before it (a prompt or a start token)")
            aligned = torch.cat([lead[:, None], rows if predict_after else rows[:, :-1]], dim=1)
        return aligned, (clean_rows if clean_from is not None else None)

    def crop_block_cache(self, cache: BlockCache, length: int) -> None:
        """Drop clean tokens from the end of the cache, keeping the first `length` (rejected drafts)."""
        if length < cache.length:
            _truncate_cache(cache.kv, length)
            cache.length = length
            if cache.padding is not None:
                cache.padding = cache.padding[:, :length]
            cache.next_logits = None

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
    def default_maskable(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                         maskable: Optional[torch.Tensor] = None) -> torch.Tensor:
        """[B, L] bool: the positions the denoiser can be asked to predict. Real tokens (not padding), within
        `maskable` when given (e.g. an SFT response), minus the positions before `first_predictable` (position 0
        under the shift: no row predicts it). Losses, likelihoods and evaluations all take their targets here."""
        out = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool().clone()
        if maskable is not None:
            out &= maskable.to(out.device).bool()
        out[:, : self.first_predictable] = False
        return out

    def block_denoise_logits(self, x_t: torch.Tensor, x0: torch.Tensor, block_length: int, offset: int = 0,
                             attention_mask: Optional[torch.Tensor] = None, with_clean: bool = False
                             ) -> torch.Tensor:
        """Position-aligned block-diffusion logits [B, L, V]: row j predicts token j of block b from the noisy
        block b (`x_t`) and the clean blocks before it (`x0`), in one staircase forward over [x_t; x_0].
        with_clean: also return the L clean rows after them ([B, 2L, V]; clean row i = the next-token prediction
        after x0[:i+1], an AR prediction when clean attention is causal)."""
        B, L = x0.shape
        pattern, positions, rows = staircase(L, block_length, offset, self.shift, device=x0.device,
                                             clean_causal=self.clean_causal)
        if with_clean:  # also the clean rows (AR predictions under token-causal clean attention)
            rows = torch.cat([rows, torch.arange(L, 2 * L, device=x0.device)])
        pad = torch.cat([attention_mask, attention_mask], 1) if attention_mask is not None else None
        if pad is not None and not bool(pad.bool().all()):
            half = padding_position_ids(attention_mask)
            position_ids = torch.cat([half, half], 1)
        else:
            pad, position_ids = None, positions[None].expand(B, -1)
        mask = prepared_mask(self.base.config, pattern, B, self.dtype, pad, position_ids[0])   # staircase positions
        noisy_rows = torch.cat([torch.ones(L, device=x0.device), torch.zeros(L, device=x0.device)])
        with route(self, "block", noisy_rows):   # a draft adapter runs on x_t's rows only
            out = self.base(input_ids=torch.cat([x_t, x0], 1), attention_mask=mask, position_ids=position_ids,
                            logits_to_keep=rows)
        return out.logits

    def diffusion_loss(self, input_ids: torch.Tensor, *args, **kwargs) -> DiffusionLossOutput:
        """Eq. 7 on a batch of clean sequences (`dlm.losses.diffusion_loss`)."""
        return losses.diffusion_loss(self, input_ids, *args, **kwargs)

    def block_diffusion_loss(self, input_ids: torch.Tensor, block_length: int, **kwargs) -> DiffusionLossOutput:
        """Block-diffusion training, every block in one pass (`dlm.losses.block_diffusion_loss`)."""
        return losses.block_diffusion_loss(self, input_ids, block_length, **kwargs)

    # ----- persistence -------------------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | os.PathLike, base_model: Optional[str] = None) -> None:
        """Write the model so that `dlm.load(directory)` restores it exactly, atomically: safetensors weights (or,
        for a peft-wrapped base, only the adapter plus a dlm config naming `base_model`, default the model's own
        source), the tokenizer, `dlm_config.json` and the recommended `sampler_config.json`."""
        from .packed_linear import model_format
        packed = None if hasattr(self.base, "peft_config") else model_format(self.base)
        if packed:   # transformers would write qweight / scales that a load reads back as random weights
            raise ValueError(f"save_pretrained: the weights are packed ({packed}, a CPU runtime format that loading "
                             "does not read back); load the model with quantization=None to save it")
        cfg = DLMConfig(**self.config.__dict__)
        options = {}
        if hasattr(self.base, "peft_config"):
            cfg.base_model = base_model or cfg.base_model or getattr(self, "source", None)
            if not cfg.base_model:
                raise ValueError("saving an adapter needs base_model= (registry name or path of the base weights)")
            if any(getattr(c, "trainable_token_indices", None) for c in self.base.peft_config.values()):
                # the trained rows are saved as their own delta; peft would also write the whole frozen (resized)
                # embedding (~110 MB for SmolLM2), which `dlm.load` rebuilds from the base anyway
                options["save_embedding_layers"] = False
        with atomic_directory(directory) as tmp:
            self.base.save_pretrained(str(tmp), safe_serialization=True, **options)
            self.tokenizer.save_pretrained(str(tmp))
            cfg.save(tmp)
            save_sampler_configs(tmp, self.sampler_config, self.infill_config)

    # ----- algorithms: the public call style (the code lives in one module per job) -----------------------------------
    def generate(self, prompt=None, config: Optional[SamplerConfig] = None, **kwargs) -> Generation:
        """Diffusion generation after a prompt (`dlm.generation.generate`: config + keyword overrides)."""
        return generation.generate(self, prompt, config, **kwargs)

    def stream(self, prompt=None, config: Optional[SamplerConfig] = None, **kwargs):
        """`generate`, yielding each step's Frame live and then the Generation."""
        return generation.stream(self, prompt, config, **kwargs)

    def generate_batch(self, prompts, config: Optional[SamplerConfig] = None, **kwargs) -> list[Generation]:
        return generation.generate_batch(self, prompts, config, **kwargs)

    def ar_generate(self, prompt=None, config: Optional[SamplerConfig] = None, **kwargs) -> Generation:
        """Left-to-right baseline with the same weights run causally (or `ar_model=`)."""
        return generation.ar_generate(self, prompt, config, **kwargs)

    def infill(self, prefix: str, suffix: str, length: int, config: Optional[SamplerConfig] = None, **kwargs
               ) -> Generation:
        return infill_mod.infill(self, prefix, suffix, length, config, **kwargs)

    def fill(self, template: str, config: Optional[SamplerConfig] = None, **kwargs) -> Generation:
        return infill_mod.fill(self, template, config, **kwargs)

    def stream_fill(self, template: str, config: Optional[SamplerConfig] = None, **kwargs):
        return infill_mod.stream_fill(self, template, config, **kwargs)

    def stream_infill(self, prefix: str, suffix: str, length: int, config: Optional[SamplerConfig] = None, **kwargs):
        return infill_mod.stream_infill(self, prefix, suffix, length, config, **kwargs)

    def redenoise(self, tokens, fixed, edits, config: Optional[SamplerConfig] = None, **kwargs) -> Generation:
        """Remask spans of a finished canvas and denoise only them (`dlm.infill.redenoise`)."""
        return infill_mod.redenoise(self, tokens, fixed, edits, config, **kwargs)

    def stream_redenoise(self, tokens, fixed, edits, config: Optional[SamplerConfig] = None, **kwargs):
        return infill_mod.stream_redenoise(self, tokens, fixed, edits, config, **kwargs)

    def ar_stream(self, prompt=None, config: Optional[SamplerConfig] = None, **kwargs):
        """Left-to-right generation one token per step, yielding a Frame per token (`dlm.generation.ar_stream`)."""
        return generation.ar_stream(self, prompt, config, **kwargs)

    def score(self, context: str, continuation: str, **kwargs) -> Score:
        return likelihood.score(self, context, continuation, **kwargs)

    def ar_score(self, context: str, continuation: str, **kwargs) -> Score:
        return likelihood.ar_score(self, context, continuation, **kwargs)
