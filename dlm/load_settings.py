"""`dlm.load`'s settings resolved on this machine: device, dtype, quantization (bitsandbytes' 8bit / 4bit, dlm's packed
int8 / int4, "auto"), attention implementation; and what a loaded model turned out to be quantized as."""
from __future__ import annotations

import logging
from typing import Optional, Union

import torch

from .cpu_kernel import POLICIES as KERNEL_POLICIES
from .load_options import ATTN_IMPLEMENTATIONS, PACKED_QUANTIZATIONS, QUANTIZATIONS, LoadError

log = logging.getLogger(__name__)

_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
           "half": torch.float16, "float32": torch.float32, "fp32": torch.float32, "float": torch.float32}


def resolve_device(device: Union[str, torch.device, None] = "auto") -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LoadError("device 'cuda' requested but no CUDA GPU is available (use device='cpu' or 'auto')")
    return device


def resolve_dtype(dtype: Union[str, torch.dtype, None], device: torch.device) -> torch.dtype:
    """'auto' = bf16 on a GPU that supports it, else fp32 (exact on CPU; pass 'bf16' for ~3x CPU speed)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    try:
        return _DTYPES[str(dtype).lower().replace("torch.", "")]
    except KeyError:
        raise LoadError(f"unknown dtype {dtype!r}; use one of auto, {', '.join(_DTYPES)}") from None


def quantization_config(quantization: Optional[str], dtype: torch.dtype, device: torch.device):
    """bitsandbytes settings for `quantization` (None / "none" / "8bit" / "4bit"), or None for full precision.

    8bit is LLM.int8 (int8 weights, outlier columns kept in 16 bit); 4bit is NF4 with double quantization, computing
    in `dtype` (fp32 on a CPU, bf16 on a GPU: the activations stay at the model's precision, only the weights
    shrink). Both run on CUDA and, through bitsandbytes' CPU backend, on a CPU. The embeddings and the output head
    stay unquantized (transformers' rule), so the added [MASK] row and a LoRA adapter's token rows still fit.
    """
    if quantization in (None, "none", "", "auto"):   # auto resolves to none or int4 (resolve_auto_quantization)
        return None
    if quantization not in QUANTIZATIONS:
        raise LoadError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, got {quantization!r}")
    if quantization in PACKED_QUANTIZATIONS:   # dlm.packed_linear: packed after loading (see _place), not here
        if device.type != "cpu":
            raise LoadError(f"quantization {quantization} is dlm's packed CPU format; on {device.type} use 8bit / 4bit "
                            "(bitsandbytes)")
        if dtype != torch.float32:
            raise LoadError(f"quantization {quantization} keeps fp32 activations: use dtype fp32 (or auto), not "
                            f"{str(dtype).split('.')[-1]}")
        return None
    if device.type not in ("cpu", "cuda"):
        raise LoadError(f"quantization {quantization} runs on cpu or cuda, not on device {device.type!r}")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise LoadError(f"quantization {quantization} needs bitsandbytes: pip install bitsandbytes "
                        "(it runs on a CPU too)") from None
    from transformers import BitsAndBytesConfig
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype)


def resolve_auto_quantization(base, dtype: torch.dtype, device: torch.device) -> Optional[str]:
    """What `quantization="auto"` means for this base: "int4" on a CPU in fp32 when packing every linear layer as
    int4 reproduces its weights exactly (a base read from a Q4_1 GGUF, as the embedded default is: the packed
    model is the GGUF's own weights, read at 5 bits a weight instead of 32), else None (full precision). A GPU, a
    half-precision dtype or any other base keeps its weights: "auto" never changes a model's weights. The packed
    kernel rounds activations to int8 per block of 32 (as llama.cpp does for this format): SmolLM2's logits move by
    ~3% against fp32, top-1 0.97, judge-PPL level (docs/method.md); `quantization=None` keeps fp32."""
    if device.type != "cpu" or dtype != torch.float32:
        return None
    from .packed_linear import int4_exact
    return "int4" if int4_exact(base) else None


def quantized_modules(model) -> dict[str, int]:
    """How many layers of each bitsandbytes type `model` holds ({} when it is not quantized). peft's LoRA wrappers
    of such layers share their class names, so the test is on bitsandbytes' own classes."""
    import sys
    bnb = sys.modules.get("bitsandbytes")
    if bnb is None:   # never imported: nothing can be quantized
        return {}
    counts: dict[str, int] = {}
    for module in model.modules():
        if isinstance(module, (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit)):
            name = type(module).__name__
            counts[name] = counts.get(name, 0) + 1
    return counts


def quantization_name(base, quantized: dict) -> str:
    """"8bit" / "4bit" (bitsandbytes), "int8" / "int4" (dlm.packed_linear) or "none"."""
    if quantized:
        return "8bit" if "Linear8bitLt" in quantized else "4bit"
    from .packed_linear import model_format
    return model_format(base) or "none"


def resolve_attn_implementation(name: Optional[str], device: torch.device) -> str:
    """"auto" keeps transformers' default (sdpa). flash_attention_2 needs CUDA and the flash-attn package; where
    either is missing it degrades to sdpa with a warning rather than failing (flash-attn is an optional extra)."""
    name = (name or "auto").strip()
    if name not in ATTN_IMPLEMENTATIONS:
        raise LoadError(f"attn_implementation must be one of {', '.join(ATTN_IMPLEMENTATIONS)}, got {name!r}")
    if name == "flash_attention_2":
        import importlib.util
        why = ("it needs a CUDA device" if device.type != "cuda" else
               "the flash-attn package is not installed (pip install flash-attn --no-build-isolation)"
               if importlib.util.find_spec("flash_attn") is None else "")
        if why:
            log.warning("attn_implementation flash_attention_2 unavailable (%s); using sdpa", why)
            return "sdpa"
    return name


def resolve_settings(device, dtype, quantization: Optional[str], attn_implementation: str, cpu_kernel: Optional[str]):
    """`load`'s settings resolved on this machine: (device, dtype, bitsandbytes config, attention). A bad
    combination fails here, before any work."""
    if cpu_kernel is not None and cpu_kernel not in KERNEL_POLICIES:
        raise LoadError(f"cpu_kernel must be one of {', '.join(KERNEL_POLICIES)}, got {cpu_kernel!r}")
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    return (dev, torch_dtype, quantization_config(quantization, torch_dtype, dev),
            resolve_attn_implementation(attn_implementation, dev))
