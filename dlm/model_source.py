"""Where a model's files are, and every base as a plain Hugging Face directory (the first two stages of `dlm.load`).

locate:    a registry name, a local directory or .gguf file, or a hub id (owner/name, downloaded once) -> `Source`.
normalize: a GGUF file, the DiffuGPT wrapper layout and the released diffusion-LM layouts of `dlm.families` are
           converted once into a plain HF directory in the cache, so that one `from_pretrained` call (with its dtype,
           device map, attention and bitsandbytes quantization) builds every base.
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

from . import model_registry
from .dlm_config import DLM_CONFIG_NAME
from .fileio import atomic_directory, cache_dir
from .load_options import LoadError

log = logging.getLogger(__name__)

SUPPORTED_FAMILIES = ("gpt2", "llama", "qwen2", "mistral", "qwen3", "gemma3_text")
# + the released diffusion-LM layouts of `dlm.families` (Dream, LLaDA, SDAR), converted once into one of these
WRAPPER_PREFIX = "denoise_model."   # the DiffuGPT / DiffuLLaMA wrapper's module prefix


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


def safetensors_keys(path: Path) -> list[str]:
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
            safetensors_keys(f)  # fail early and clearly on a truncated file
        return
    pickled = list(directory.glob("*.bin")) + list(directory.glob("*.pt")) + list(directory.glob("*.pth"))
    if pickled and not allow_pickle:
        raise LoadError(f"{directory} has only pickled weights ({pickled[0].name}); loading them can execute code. "
                        "Convert to safetensors, or pass allow_pickle=True if you trust the file.")
    if not pickled:
        raise LoadError(f"no weights found in {directory} (expected *.safetensors, or a .gguf file)")


# ----- locating the source -------------------------------------------------------------------------------------------
class Source:
    """Where the base weights are: `directory` (+ `gguf_file`), and what the registry says about them."""

    def __init__(self, directory: Path, gguf_file: Optional[str] = None, spec=None, label: str = ""):
        self.directory, self.gguf_file, self.spec, self.label = directory, gguf_file, spec, label or str(directory)


def locate(source: Union[str, os.PathLike], revision: Optional[str] = None) -> Source:
    text = str(source)
    if model_registry.is_registered(text):
        spec = model_registry.get(text)
        kind, where = spec.origin
        if kind == "hub":
            return Source(_hub_download(where, revision), None, spec, text)
        try:
            path = spec.local_path()
        except FileNotFoundError as e:
            raise LoadError(str(e)) from None
        if kind == "gguf":
            return Source(path.parent, path.name, spec, text)
        if not (path / DLM_CONFIG_NAME).is_file():
            raise LoadError(f"{text!r}: its files are missing from {path} (the adapted model has not been "
                            "produced or shipped yet; see train/ and assets/)")
        return Source(path, None, spec, text)
    path = Path(text).expanduser()
    if path.is_file():
        if path.suffix == ".gguf":
            return Source(path.parent, path.name, None, text)
        raise LoadError(f"{path} is a file; expected a model directory or a .gguf file")
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if ggufs and not (path / "config.json").is_file() and not (path / DLM_CONFIG_NAME).is_file():
            if len(ggufs) > 1:
                raise LoadError(f"{path} holds several .gguf files; pass the file itself: "
                                + ", ".join(g.name for g in ggufs))
            return Source(path, ggufs[0].name, None, text)
        return Source(path, None, None, text)
    if text.count("/") == 1 and not text.startswith((".", "/", "~")):
        return Source(_hub_download(text, revision), None, None, text)
    known = ", ".join(s.name for s in model_registry.list_models())
    raise LoadError(f"unknown model {text!r}: not a registry name ({known}), not an existing path, "
                    "not a hub id (owner/name)")


# ----- normalising the source: every base becomes a Hugging Face directory --------------------------------------
# A GGUF file and the DiffuGPT wrapper layout are converted once into a plain HF directory in the cache, so that one
# `from_pretrained` call (with its dtype, device map, attention and bitsandbytes quantization) builds every base.
def _is_wrapper_layout(directory: Path) -> bool:
    files = _weight_files(directory)
    return any(k.startswith(WRAPPER_PREFIX) for f in files for k in safetensors_keys(f))


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


def convert_gguf(src: Source) -> Path:
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
        raise LoadError(f"could not read GGUF {gguf}: {type(e).__name__}: {first_line(e)}") from None
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
            elif key.startswith(WRAPPER_PREFIX):
                state["transformer." + key[len(WRAPPER_PREFIX):]] = value
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


def _convert_family(family, src: Source) -> Path:
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


def normalize(src: Source, allow_pickle: bool, trust_remote_code: bool) -> Source:
    """`src` as a plain Hugging Face model directory (converting a GGUF, the DiffuGPT wrapper layout or a released
    diffusion-LM layout of `dlm.families`)."""
    if src.gguf_file:
        return Source(convert_gguf(src), None, src.spec, src.label)
    if not (src.directory / "config.json").is_file():
        raise LoadError(f"{src.directory} has no config.json (not a Hugging Face model directory)")
    from . import families
    family = families.detect(src.directory)   # its own modeling code is never run: mapped onto transformers' classes
    if family is not None:
        _check_weights_present(src.directory, allow_pickle)
        return Source(_convert_family(family, src), None, src.spec, src.label)
    from transformers import AutoConfig
    try:
        config = AutoConfig.from_pretrained(src.directory, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise LoadError(f"{src.directory}/config.json could not be read: {first_line(e)}") from None
    if config.model_type not in SUPPORTED_FAMILIES and not trust_remote_code:
        raise LoadError(f"unsupported architecture {config.model_type!r}; supported: {', '.join(SUPPORTED_FAMILIES)}")
    _check_weights_present(src.directory, allow_pickle)
    if _is_wrapper_layout(src.directory):
        return Source(_convert_wrapper(src.directory), None, src.spec, src.label)
    return src


def first_line(e: BaseException) -> str:
    lines = [line for line in str(e).strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""
