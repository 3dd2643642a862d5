"""The model lifecycle: load / switch / free the DLM and its AR counterpart, the default model with its fallback,
what the Model tab shows about them (`ModelInfo`), and how a model's tokens are displayed (`Display`).

Loading holds the worker's lock, so it waits for running generations; a failed load puts the previous model back.
Every loaded model gets the worker's layer hooks (cancellation and the time limit inside a forward).
"""
from __future__ import annotations

import gc
import importlib.util
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import dlm
from app.checks import as_text, as_whole, describe_error
from dlm import model_registry
from dlm.decoders import DECODERS
from dlm.generation import cut_at_eos
from dlm.load_options import QUANTIZATIONS
from dlm.sampler_config import SamplerConfig, Task

DEFAULT_DLM = "smollm2-135m-dlm"
FALLBACK_DLM = "smollm2-135m"  # the un-adapted base, used as a DLM when the adapted model is missing
DEVICES = ["auto", "cpu", "cuda", "mps"]
DTYPES = ["auto", "float32", "bfloat16", "float16"]
NOT_ADAPTED = "not diffusion-adapted yet: output is noise-like"


@dataclass
class ModelInfo:
    """What the Model tab shows about the loaded models."""

    name: str = ""
    source: str = ""
    kind: str = ""  # registry kind, "" for a local path / hub id
    adapter: str = ""
    quantization: str = "none"
    device: str = ""
    dtype: str = ""
    parameters: int = 0
    weights_mb: float = 0.0
    load_seconds: float = 0.0
    mask_token_id: int = -1
    max_length: int = 0
    ar_name: str = ""  # "" = the same weights run causally
    ar_load_seconds: float = 0.0
    ar_error: str = ""  # the AR counterpart could not be loaded: AR vs DLM is off, this says why
    attn_implementation: str = ""  # what the model runs ("sdpa", ...), and what was asked for when it differs
    verifier: str = ""  # who verifies the speculative decoder's drafts: "the AR base" with a draft adapter
    notice: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Display:
    """How one model's tokens are shown: its mask id, the ids drawn as labels (EOS, pad, chat markers), the
    display text of single ids (`decode`: a BPE piece decoded alone, special tokens by their name) and the text of
    generated ids (`text_of`, cut at the first EOS as `Generation.text`). Captured once per run (`Run.display`)."""

    mask_id: int
    special: frozenset
    decode: Callable[[list[int]], dict[int, str]]
    text_of: Callable[[list[int]], str]

    @classmethod
    def of(cls, model) -> "Display":
        tok, eos = model.tokenizer, list(model.eos_token_ids)
        special_tokens = set(getattr(tok, "all_special_ids", []) or [])

        def decode(ids: list[int]) -> dict[int, str]:
            return {i: tok.convert_ids_to_tokens(int(i)) if i in special_tokens else
                    tok.decode([int(i)], skip_special_tokens=False, clean_up_tokenization_spaces=False)
                    for i in ids}

        def text_of(ids: list[int]) -> str:
            return tok.decode(cut_at_eos(list(ids), eos), skip_special_tokens=True, clean_up_tokenization_spaces=False)

        return cls(int(model.mask_token_id), frozenset(special_tokens | set(eos)), decode, text_of)

    def trace(self, prompt_end: Optional[int] = None):
        """An empty `render.Trace` for this model's tokens."""
        from app.render import Trace
        return Trace(mask_id=self.mask_id, special=set(self.special), prompt_end=prompt_end)


def bitsandbytes_available() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None


def memory_mb(model) -> float:
    """Bytes held by the model's parameters and buffers (quantized weights counted at their packed size)."""
    try:
        return model.base.get_memory_footprint() / 2**20
    except Exception:
        tensors = list(model.base.parameters()) + list(model.base.buffers())
        return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def process_memory() -> str:
    """Resident memory of this process, plus CUDA memory when a GPU is in use."""
    parts = []
    try:
        import psutil
        parts.append(f"process RSS {psutil.Process().memory_info().rss / 2**30:.2f} GiB")
    except Exception:
        try:
            pages = int(Path("/proc/self/statm").read_text().split()[1])
            parts.append(f"process RSS {pages * os.sysconf('SC_PAGE_SIZE') / 2**30:.2f} GiB")
        except Exception:
            pass
    try:
        import torch
        if torch.cuda.is_available():
            parts.append(f"CUDA allocated {torch.cuda.memory_allocated() / 2**30:.2f} GiB "
                         f"(reserved {torch.cuda.memory_reserved() / 2**30:.2f} GiB)")
    except Exception:
        pass
    return " · ".join(parts)


def memory_estimate(name: str) -> Optional[dict]:
    """What a registry model's weights need in each precision (GiB: fp32, bf16, 8bit, 4bit, int8, int4, and the
    rule-of-thumb `overhead_gib` on top), computed from its config before anything loads
    (`dlm.families.memory_for`); None for a name the registry does not know or a model whose config is unknown
    (a local path is not probed: the Model tab sizes registry models only)."""
    if not name or not model_registry.is_registered(name):
        return None
    from dlm.families import memory_for
    try:
        return memory_for(name)
    except Exception:   # a damaged cached config: no table rather than a broken tab
        return None


@dataclass(frozen=True)
class SwitchPolicy:
    """Which models users may switch to from the Model tab: none unless the operator enables it
    (dlm-studio --allow-model-switch), then registry names and folders inside the operator's `dirs`
    (--model-dir, repeatable). The same message for a path that exists and one that does not."""

    allowed: bool = False
    dirs: tuple[str, ...] = ()

    def check(self, what: str, source: Optional[str]) -> None:
        if not source:
            return
        if not self.allowed:
            raise ValueError("model switching is off on this server (the operator enables it with dlm-studio "
                             "--allow-model-switch)")
        if model_registry.is_registered(source):
            return
        try:
            path = Path(source).expanduser().resolve()
        except (OSError, RuntimeError, ValueError):
            path = None
        for d in self.dirs:
            root = Path(d).expanduser().resolve()
            if path is not None and (path == root or root in path.parents):
                return
        where = f"a path inside {', '.join(self.dirs)}" if self.dirs else "no folder (dlm-studio --model-dir)"
        raise ValueError(f"{what}: {source!r} is neither a registry model nor inside a folder this server allows; "
                         f"choose a registry model or {where}")


# What the Denoise tab (the first screen) opens on when the model's writing decoder works block by block (blocks of 2
# reveal left to right: the picture an AR model would give): the full-attention decoder over the whole region, two
# tokens per step, so tokens appear in parallel and out of order; at most 32 tokens, so that the first click takes
# seconds, not half a minute, on a CPU (every step is a forward over the whole canvas). Chosen by measurement:
# `python -m bench.denoise_default` (the table is in docs/app.md).
DENOISE_CHANGES = dict(decoder="full", block_length=None, threshold=None, use_cache=False)
DENOISE_TOKENS_PER_STEP = 2
DENOISE_MAX_TOKENS = 32


# A model whose drafts are verified by its AR base (a draft adapter, `dlm.adapter_routing`) opens on its own
# speculative writing with blocks of at least DENOISE_DRAFT_BLOCK: each forward's drafts appear together (faint),
# then the kept ones turn solid and a rejected one is struck, and the text is the AR base's. Chosen by
# `python -m bench.denoise_default` (docs/app.md).
DENOISE_DRAFT_BLOCK = 4


def denoise_config(write: SamplerConfig, drafts_verified_by_base: bool = False) -> SamplerConfig:
    """The Denoise tab's config: `write` itself when its decoder is not block-wise (it already shows any-order
    reveals); with `drafts_verified_by_base` and the speculative decoder, `write` with blocks of at least
    DENOISE_DRAFT_BLOCK (parallel drafts, the base's text); else `write` with DENOISE_CHANGES, at most
    DENOISE_MAX_TOKENS tokens, DENOISE_TOKENS_PER_STEP tokens per step."""
    if not DECODERS[write.decoder].block_mode:
        return write
    if drafts_verified_by_base and write.decoder == "speculative":
        return write.replace(block_length=max(int(write.block_length or 0), DENOISE_DRAFT_BLOCK))
    n = min(write.max_new_tokens, DENOISE_MAX_TOKENS)
    return write.replace(**DENOISE_CHANGES, max_new_tokens=n, steps=max(1, n // DENOISE_TOKENS_PER_STEP))


_HEAP = {"frozen": False}


def freeze_heap(again: bool = False) -> None:
    """Collect once, then move every object alive now (the models, the tokenizer, Gradio's ~700k objects of blocks
    and configs) into the collector's permanent generation. They live as long as the server (or until `Models.free`
    unfreezes them), and a full collection walked them all: ~350 ms on a 2-core machine, every client stalled.
    The server calls it once started (`app.launch`); `again=True` (after a model switch) only where it did."""
    if again and not _HEAP["frozen"]:
        return
    gc.collect()
    gc.freeze()
    _HEAP["frozen"] = True


class Models:
    """The loaded DLM (`model`) and its AR counterpart, loaded under `worker.lock` with `worker`'s layer hooks.

    `ar_source` None: the DLM's own weights run causally (no second copy). `loads` counts the models loaded so far
    (pages built earlier refresh their widgets when it changes)."""

    def __init__(self, worker, policy: SwitchPolicy = SwitchPolicy(), attn_implementation: str = "auto"):
        self.worker = worker
        self.policy = policy
        self.attn_implementation = attn_implementation
        self.model = None  # DiffusionLM
        self.ar = None  # the AR counterpart (a DiffusionLM used causally); None = the DLM's own weights
        self.ar_source: Optional[str] = None
        self.info = ModelInfo()
        self.loads = 0
        self._load_args: Optional[dict] = None

    def switch(self, source: str, *, adapter: Optional[str] = None, ar_source: Optional[str] = None,
               **kwargs) -> ModelInfo:
        """A user's load (the Model tab): `load` when this server's `policy` allows the model, its adapter and
        its AR counterpart; refused before anything is read from disk otherwise."""
        self.policy.check("model", as_text("model", source).strip())
        self.policy.check("adapter", as_text("adapter", adapter).strip())
        self.policy.check("AR model", as_text("AR model", ar_source).strip())
        return self.load(source, adapter=adapter, ar_source=ar_source, **kwargs)

    def load(self, source: str, *, adapter: Optional[str] = None, quantization: Optional[str] = "auto",
             device: str = "auto", dtype: str = "auto", mask_token_id: Optional[int] = None,
             ar_source: Optional[str] = None, notice: str = "") -> ModelInfo:
        """Load `source` (registry name, local path or hub id) as the DLM, freeing the current models first.

        adapter:      optional peft LoRA directory applied on top.
        quantization: auto (int4 on a CPU where it is exact, as for the embedded default; else none) / none /
                      int8 / int4 (dlm's packed CPU formats, fast on a CPU) / 8bit / 4bit (bitsandbytes).
        device/dtype: as for `dlm.load` ("auto" = GPU with bf16 when there is one, else CPU float32).
        ar_source:    the AR model to compare with; None = the DLM's registered counterpart, and when that is
                      the DLM's own base (or unknown) the same weights are run causally (no second copy). It is
                      loaded now: if it fails, the DLM stays loaded with AR vs DLM off and the notice says why.
        If loading fails the previous model is loaded back, and the error is raised. Operator's call: no policy
        here (users go through `switch`).
        """
        source = as_text("model", source).strip()
        if not source:
            raise ValueError("model: choose a registry model or type a local model path")
        adapter = as_text("adapter", adapter).strip() or None
        quantization = as_text("quantization", quantization).strip().lower() or "auto"
        if quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization: must be one of {', '.join(QUANTIZATIONS)}, got {quantization!r}")
        if quantization in ("8bit", "4bit") and not bitsandbytes_available():
            raise ValueError(f"quantization: {quantization} needs the optional package bitsandbytes "
                             "(pip install bitsandbytes). Note: on a CPU it only saves memory; it runs slower "
                             "than float32 / bfloat16.")
        if adapter is not None and not Path(adapter).expanduser().is_dir():
            raise ValueError(f"adapter: LoRA adapter directory not found: {adapter}")
        mask_token_id = as_whole("mask token id", mask_token_id, -1)
        if mask_token_id is not None and mask_token_id < 0:
            mask_token_id = None
        args = dict(source=source, adapter=adapter, quantization=quantization, device=device or "auto",
                    dtype=dtype or "auto", mask_token_id=mask_token_id,
                    ar_source=as_text("AR model", ar_source).strip() or None, notice=notice)
        with self.worker.lock:
            previous = self._load_args
            self.free()
            try:
                self._load(**args)
            except BaseException:
                if previous is not None and previous != args:
                    try:
                        self._load(**previous)
                    except Exception:
                        self.free()
                raise
            freeze_heap(again=True)
            return self.info

    def _dlm_load(self, source, quantization, device, dtype, **kwargs):
        """`dlm.load` with this server's settings, and the worker's layer hooks on the result."""
        model = dlm.load(source, device=device, dtype=dtype, attn_implementation=self.attn_implementation,
                         quantization=None if quantization == "none" else quantization, **kwargs)
        self.worker.install_hooks(model)
        return model

    def _load(self, source, adapter, quantization, device, dtype, mask_token_id, ar_source, notice) -> None:
        t0 = time.perf_counter()
        try:
            model = self._dlm_load(source, quantization, device, dtype, mask_token_id=mask_token_id, adapter=adapter)
        except Exception as e:
            if mask_token_id is None:
                raise
            raise ValueError(f"mask token id: {source} does not load with mask token id {mask_token_id} "
                             f"({describe_error(e)}); leave it at -1 (automatic)") from None
        seconds = time.perf_counter() - t0
        n_tokens = len(model.tokenizer)
        if n_tokens > model.vocab_size:  # a token the embedding has no row for (an overridden mask id)
            raise ValueError(f"mask token id: the tokenizer has {n_tokens} tokens but the model's embedding only "
                             f"{model.vocab_size} rows with mask token id {model.mask_token_id}; leave the mask "
                             f"token id at -1 (automatic)")
        spec = model_registry.get(source) if model_registry.is_registered(source) else None
        if not notice and spec is not None and spec.kind == "ar" and adapter is None:
            notice = (f"{source} is an autoregressive model used as a diffusion LM without adaptation — "
                      f"{NOT_ADAPTED}.")
        counterpart = ar_source or model.ar_counterpart
        same = counterpart is None or counterpart in (source, getattr(model, "source", None), model.name)
        ar, ar_error, ar_seconds = None, "", 0.0
        if not same:  # loaded and checked now, under the lock: never inside a run, never silently bad
            t1 = time.perf_counter()
            try:
                ar = self._dlm_load(counterpart, quantization, device, dtype)
            except Exception as e:
                ar_error = f"AR counterpart {counterpart} could not be loaded: {describe_error(e)}; AR vs DLM is off"
            ar_seconds = time.perf_counter() - t1
        self.model = model
        self.loads += 1
        self.worker.epoch += 1  # requests asked of the previous model are refused when their turn comes
        self.ar, self.ar_source = ar, None if same else counterpart
        self._load_args = dict(source=source, adapter=adapter, quantization=quantization, device=device,
                               dtype=dtype, mask_token_id=mask_token_id, ar_source=ar_source, notice=notice)
        attn = model.attn_implementation
        asked = self.attn_implementation
        self.info = ModelInfo(
            name=model.name, source=source, kind=spec.kind if spec else "", adapter=adapter or "",
            quantization=model.quantization, device=str(model.device), dtype=str(model.dtype).replace("torch.", ""),
            parameters=model.num_parameters(), weights_mb=memory_mb(model), load_seconds=seconds,
            mask_token_id=int(model.mask_token_id), max_length=int(model.max_length),
            ar_name=self.ar_source or "", ar_load_seconds=ar_seconds, ar_error=ar_error,
            attn_implementation=attn if asked in ("auto", attn) else f"{attn} (asked for {asked})",
            verifier=("the AR base itself (a row-gated draft adapter drafts)" if model.routing is not None else
                      "the model's own causal rows" if model.clean_causal else ""),
            notice=" ".join(n for n in (notice, ar_error) if n),
        )

    def load_default(self, model: Optional[str] = None, ar_model: Optional[str] = None, *,
                     quantization: str = "none", device: str = "auto", dtype: str = "auto",
                     adapter: Optional[str] = None) -> ModelInfo:
        """Load what `app.py` asked for; with no `model`, the project's adapted default, falling back to the
        un-adapted base (with a visible notice) when the adapted artifact is absent or fails to load."""
        if model:
            return self.load(model, adapter=adapter, quantization=quantization, device=device, dtype=dtype,
                             ar_source=ar_model)
        reason = ""
        if model_registry.is_available(DEFAULT_DLM):
            try:
                return self.load(DEFAULT_DLM, adapter=adapter, quantization=quantization, device=device,
                                 dtype=dtype, ar_source=ar_model)
            except Exception as e:  # corrupt / incompatible artifact: say so and keep going
                reason = f"it failed to load ({describe_error(e)})"
        else:
            reason = "its files are not in assets/ yet"
        notice = (f"The project's adapted model {DEFAULT_DLM} is unavailable ({reason}); using the un-adapted "
                  f"{FALLBACK_DLM} as a diffusion LM instead — {NOT_ADAPTED}.")
        return self.load(FALLBACK_DLM, adapter=adapter, quantization=quantization, device=device, dtype=dtype,
                         ar_source=ar_model or FALLBACK_DLM, notice=notice)

    def free(self) -> None:
        """Drop both models and return their memory (to the CUDA allocator's pool as well)."""
        with self.worker.lock:
            self.model = None
            self.ar = None
            self.info = ModelInfo()
            gc.unfreeze()   # the models were frozen with everything else (`freeze_heap`): collectable again
            gc.collect()
            try:
                import torch
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            except Exception:
                pass

    def require(self):
        if self.model is None:
            raise ValueError("model: none is loaded; load one in the Model tab")
        return self.model

    def ar_model(self):
        """The AR model to compare with (loaded with the DLM: same device/dtype/quantization); the DLM itself
        when that is its own base. A ValueError saying why when it could not be loaded."""
        model = self.require()
        if self.info.ar_error:
            raise ValueError(self.info.ar_error)
        return model if self.ar_source is None else self.ar

    def base_config(self, task: Task = Task.WRITE) -> SamplerConfig:
        """The loaded model's recommended config: WRITE (In-context, race, the API's /denoise) or INFILL
        (Infill, edits: always the full-attention decoder); DENOISE is what the Denoise tab opens on
        (`denoise_config`). Another task string: a ValueError naming the allowed ones."""
        task = Task.parse(task)
        model = self.require()
        if task is Task.DENOISE:
            return denoise_config(model.sampler_config or SamplerConfig(), model.routing is not None)
        cfg = model.infill_config if task is Task.INFILL else model.sampler_config
        return cfg or SamplerConfig()
