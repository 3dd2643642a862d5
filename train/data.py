"""Pre-training data: corpus -> documents -> one cached memory-mapped token file -> packed fixed-size blocks.

Sources, the mixture and the cleaning hooks live in `train.documents` (re-exported here); this module tokenizes.
- Sources: `.txt`, `.txt.gz`, `.jsonl`, `.jsonl.gz` files (a text file is one document, a JSONL line is one),
  directories of those, glob patterns, or `hf:NAME[:CONFIG][#FIELD]` (a Hugging Face dataset, streamed; FIELD
  overrides `data.text_field` for that source, e.g. StarCoder's `content`).
- Mixture: with `data.weights` (one per source) the sources are interleaved document by document so that each
  one's share of the tokens follows its weight (`WeightedMixer`: seeded, resumable); without, read one after another.
- Cleaning hooks (`CLEANERS`) run per document; `gutenberg` strips the Project Gutenberg licence.
- Tokenized ONCE: all documents, EOS after each, into `<cache>/<key>/tokens.bin` (uint16/uint32) + `meta.json`.
  The key hashes the tokenizer, the files (path, size, mtime) and every setting that changes the tokens, so re-runs
  and other ranks reuse it (rank 0 builds inside `accelerator.main_process_first()`, the others then find it).
  The directory is written to a temp name and renamed, so a half-written cache is never used.
- Held-out split: the tail of the stream (whole documents when possible) or explicit `eval_sources`.
- Blocks: the stream cut into `block_size` pieces; `BlockSampler` yields a seeded, resumable order across ranks.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

from dlm.fileio import atomic_directory, cache_dir

from .documents import (  # noqa: F401  (re-exported: the loop, SFT and the tests import them from here)
    CLEANERS,
    TEXT_SUFFIXES,
    DataError,
    WeightedMixer,
    expand_sources,
    gutenberg_clean,
    iter_documents,
    iter_jsonl,
)

log = logging.getLogger(__name__)

CACHE_VERSION = 1
_CHUNK_CHARS = 1 << 16  # long documents are tokenized in ~64k-character pieces split at newlines


# ----- tokenizing into the cache --------------------------------------------------------------------------------------
def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of everything that decides token ids: the backend vocabulary/merges + added tokens + EOS."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps([len(tokenizer), tokenizer.eos_token_id, type(tokenizer).__name__]).encode())
    return h.hexdigest()[:16]


def _file_stamp(path: str) -> list:
    if path.startswith("hf:"):
        return [path]
    st = os.stat(path)
    return [os.path.abspath(path), st.st_size, st.st_mtime_ns]


def _split_long(text: str) -> list[str]:
    """Cut a long document into ~_CHUNK_CHARS pieces at newline boundaries (tokenizers are faster on pieces)."""
    if len(text) <= _CHUNK_CHARS:
        return [text]
    pieces, start = [], 0
    while start < len(text):
        end = min(start + _CHUNK_CHARS, len(text))
        if end < len(text):
            nl = text.rfind("\n", start, end)
            end = nl + 1 if nl > start else end
        pieces.append(text[start:end])
        start = end
    return pieces


def encode_document(tokenizer, text: str) -> list[int]:
    ids: list[int] = []
    for enc in tokenizer(_split_long(text), add_special_tokens=False)["input_ids"]:
        ids.extend(enc)
    return ids


@dataclass
class TokenCache:
    """A tokenized corpus on disk: tokens[:split] train, tokens[split:] held out."""

    directory: Path
    n_tokens: int
    split: int
    n_documents: int
    dtype: str
    built: bool  # True when this call tokenized (False: reused)

    def tokens(self) -> np.ndarray:
        return np.memmap(self.directory / "tokens.bin", dtype=self.dtype, mode="r", shape=(self.n_tokens,))

    def train_tokens(self) -> np.ndarray:
        return self.tokens()[: self.split]

    def eval_tokens(self) -> np.ndarray:
        return self.tokens()[self.split:]


def cache_key(data_cfg, tokenizer, files: list[str], eval_files: list[str]) -> str:
    settings = {
        "version": CACHE_VERSION, "tokenizer": tokenizer_fingerprint(tokenizer),
        "files": [_file_stamp(f) for f in files], "eval_files": [_file_stamp(f) for f in eval_files],
        "text_field": data_cfg.text_field, "hf_split": data_cfg.hf_split, "clean": data_cfg.clean,
        "eval_fraction": data_cfg.eval_fraction, "max_documents": data_cfg.max_documents,
        "max_tokens": data_cfg.max_tokens, "shuffle": data_cfg.shuffle_documents, "seed": data_cfg.seed,
    }
    if getattr(data_cfg, "weights", None):  # only mixtures carry the key: caches of plain runs keep theirs
        settings["weights"] = [float(w) for w in data_cfg.weights]
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:20]


def _load_meta(directory: Path) -> Optional[dict]:
    try:
        meta = json.loads((directory / "meta.json").read_text())
        size = (directory / "tokens.bin").stat().st_size
        if size != meta["n_tokens"] * np.dtype(meta["dtype"]).itemsize:
            return None
        return meta
    except (OSError, ValueError, KeyError):
        return None


def _source_files(data_cfg) -> tuple[list[str], list[list[str]], list[str]]:
    """(training files in reading order, the same per source when `data.weights` weighs them (else []),
    held-out files)."""
    weights = list(getattr(data_cfg, "weights", None) or [])
    if weights and len(weights) != len(data_cfg.sources):
        raise DataError(f"data.weights has {len(weights)} values for {len(data_cfg.sources)} data.sources "
                        "(one weight per source)")
    groups = [expand_sources([src]) for src in data_cfg.sources] if weights else []
    files = [f for g in groups for f in g] if weights else expand_sources(list(data_cfg.sources))
    if data_cfg.exclude:   # e.g. the books a benchmark holds out
        files = [f for f in files if Path(f).name not in set(data_cfg.exclude)]
        groups = [[f for f in g if Path(f).name not in set(data_cfg.exclude)] for g in groups]
    eval_files = expand_sources(list(data_cfg.eval_sources)) if data_cfg.eval_sources else []
    if any(f.startswith("hf:") for f in files + eval_files) and data_cfg.max_tokens <= 0:
        raise DataError("streaming a Hugging Face dataset needs data.max_tokens > 0 (how many tokens to cache)")
    if data_cfg.shuffle_documents:
        if weights:  # the file order inside each weighted source
            for g in groups:
                random.Random(data_cfg.seed).shuffle(g)
            files = [f for g in groups for f in g]
        else:
            random.Random(data_cfg.seed).shuffle(files)
    return files, groups, eval_files


def build_token_cache(data_cfg, tokenizer, *, progress: bool = False) -> TokenCache:
    """Tokenize `data_cfg.sources` once (or reuse the cache). Documents are joined with EOS after each one.

    data_cfg:  `train.config.DataConfig` (sources, text_field, hf_split, clean, eval_fraction, eval_sources,
               max_documents, max_tokens, shuffle_documents, seed, cache_dir).
    tokenizer: a Hugging Face tokenizer with an EOS token.
    Returns a `TokenCache` (memory-mapped; nothing is held in RAM).
    """
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no EOS token: documents cannot be separated")
    files, groups, eval_files = _source_files(data_cfg)
    root = Path(data_cfg.cache_dir).expanduser() if data_cfg.cache_dir else cache_dir() / "tokens"
    key = cache_key(data_cfg, tokenizer, files, eval_files)
    directory = root / key
    meta = _load_meta(directory)
    if meta is not None:
        log.info("reusing token cache %s (%d tokens)", directory, meta["n_tokens"])
        return TokenCache(directory, meta["n_tokens"], meta["split"], meta["n_documents"], meta["dtype"], False)

    if directory.exists():  # renamed into place, so it was complete once: damaged since, rebuild it
        log.warning("token cache %s is damaged (size/meta mismatch): rebuilding", directory)
        shutil.rmtree(directory, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    with atomic_directory(directory, keep_existing=True) as tmp:  # another rank may finish the same cache first
        writer = _TokenWriter(tmp / "tokens.bin", tokenizer, data_cfg.max_documents)
        with writer:
            mix = writer.mixture(groups, data_cfg, tokenizer) if groups else None   # groups: weighted sources
            if mix is None:
                writer.stream(files, data_cfg, tokenizer, data_cfg.max_tokens, progress)
            if writer.n_tokens == 0:
                raise DataError(f"no text found in {', '.join(data_cfg.sources)} (all documents empty after "
                                f"cleaning '{data_cfg.clean}')")
            if eval_files:
                split = before = writer.n_tokens
                writer.stream(eval_files, data_cfg, tokenizer,
                              writer.n_tokens + data_cfg.max_tokens if data_cfg.max_tokens else 0, progress)
                if writer.n_tokens == before:
                    raise DataError(f"no text found in eval sources {', '.join(data_cfg.eval_sources)}")
            else:
                split = _split_point(writer.boundaries, writer.n_tokens, data_cfg.eval_fraction)
        _write_meta(tmp, writer, split, files, eval_files, data_cfg, tokenizer, mix)
    theirs = _load_meta(directory)
    if theirs is None:
        raise DataError(f"token cache {directory} exists but is incomplete; delete it and re-run")
    log.info("tokenized %d documents -> %d tokens (%d held out) in %s", writer.n_docs, theirs["n_tokens"],
             theirs["n_tokens"] - theirs["split"], directory)
    return TokenCache(directory, theirs["n_tokens"], theirs["split"], theirs["n_documents"], theirs["dtype"], True)


class _TokenWriter:
    """Appends documents' token ids (EOS after each) to the cache's tokens.bin, counting tokens and documents and
    recording where each document ends; `add` says when `max_documents` or a token limit is reached."""

    def __init__(self, path: Path, tokenizer, max_documents: int):
        self.path, self.max_documents = path, max_documents
        self.dtype = np.uint16 if len(tokenizer) <= np.iinfo(np.uint16).max + 1 else np.uint32
        self.eos = int(tokenizer.eos_token_id)
        self.boundaries: list[int] = []  # token offset after each document
        self.n_tokens = self.n_docs = 0

    def __enter__(self):
        self.out = open(self.path, "wb")
        return self

    def __exit__(self, *exc) -> None:
        self.out.close()

    def add(self, ids: list[int], limit: int) -> bool:
        """Write one document's ids (EOS included); True when the limits are reached."""
        self.out.write(np.asarray(ids, dtype=self.dtype).tobytes())
        self.n_tokens += len(ids)
        self.n_docs += 1
        self.boundaries.append(self.n_tokens)
        return bool((self.max_documents and self.n_docs >= self.max_documents) or (limit and self.n_tokens >= limit))

    def stream(self, sources: list[str], data_cfg, tokenizer, limit: int, progress: bool) -> None:
        """The sources one after another, each document cleaned and tokenized."""
        clean = CLEANERS[data_cfg.clean]
        for src in _progress(sources, progress):
            n_src = 0
            for raw in iter_documents(src, data_cfg.text_field, data_cfg.hf_split):
                text = clean(raw)
                if not text.strip():
                    continue
                n_src += 1
                if self.add(encode_document(tokenizer, text) + [self.eos], limit):
                    return
            if n_src == 0:
                log.warning("data source %s has no non-empty documents", src)

    def mixture(self, groups: list[list[str]], data_cfg, tokenizer) -> dict:
        """The weighted sources interleaved (`WeightedMixer`) up to data.max_tokens; returns what the mix was."""
        clean = CLEANERS[data_cfg.clean]

        def open_source(i: int, skip: int) -> Iterator[list[int]]:
            return _group_token_docs(groups[i], data_cfg, tokenizer, clean, self.eos, skip)

        mixer = WeightedMixer(open_source, list(data_cfg.weights), seed=data_cfg.seed)
        for _, ids in mixer:
            if self.add(ids, data_cfg.max_tokens):
                break
        return {"sources": list(data_cfg.sources), "weights": mixer.weights, "shares": mixer.shares(),
                **mixer.state_dict()}


def _write_meta(tmp: Path, writer: _TokenWriter, split: int, files: list[str], eval_files: list[str], data_cfg,
                tokenizer, mix: Optional[dict]) -> None:
    meta = {"n_tokens": writer.n_tokens, "split": split, "n_documents": writer.n_docs,
            "dtype": np.dtype(writer.dtype).name, "eos": writer.eos, "files": files, "eval_files": eval_files,
            "clean": data_cfg.clean, "tokenizer": tokenizer_fingerprint(tokenizer)}
    if mix is not None:
        meta["mix"] = mix
        log.info("mixture: %s", ", ".join(f"{s} {share:.1%} of tokens (weight {w:.1%})" for s, share, w
                                          in zip(mix["sources"], mix["shares"], mix["weights"])))
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))


def _group_token_docs(files: list[str], data_cfg, tokenizer, clean, eos: int, skip: int = 0) -> Iterator[list[int]]:
    """One weighted source (its files read one after another) -> token ids of each non-empty cleaned document, EOS
    appended; the first `skip` documents are passed over without tokenizing (resuming a mixture)."""
    seen = 0
    for src in files:
        for raw in iter_documents(src, data_cfg.text_field, data_cfg.hf_split):
            text = clean(raw)
            if not text.strip():
                continue
            seen += 1
            if seen > skip:
                yield encode_document(tokenizer, text) + [eos]


def _split_point(boundaries: list[int], n_tokens: int, fraction: float) -> int:
    """Where the held-out tail starts: the document boundary nearest to (1 - fraction) of the stream, unless
    that leaves either side empty or is far off (few, long documents), then the exact token position."""
    if fraction <= 0:
        return n_tokens
    target = int(round(n_tokens * (1 - fraction)))
    inner = [b for b in boundaries if 0 < b < n_tokens]
    if inner:
        best = min(inner, key=lambda b: abs(b - target))
        if abs(best - target) <= max(1, n_tokens * fraction * 0.5):
            return best
    return max(1, min(target, n_tokens - 1))


def _progress(items, enabled: bool):
    if not enabled:
        return items
    from tqdm.auto import tqdm
    return tqdm(items, desc="tokenizing", unit="file")


# ----- packed blocks and their order ----------------------------------------------------------------------------------
class PackedBlocks:
    """A 1-D token array cut into non-overlapping `block_size` blocks (the ragged tail is dropped)."""

    def __init__(self, tokens: np.ndarray, block_size: int, name: str = "train"):
        self.tokens, self.block_size = tokens, block_size
        self.n = len(tokens) // block_size
        if self.n == 0:
            raise DataError(f"the {name} split has {len(tokens)} tokens, fewer than one block of {block_size} "
                            "(add data, lower data.block_size, or change data.eval_fraction)")

    def __len__(self) -> int:
        return self.n

    def batch(self, indices) -> dict:
        """indices -> {"input_ids": LongTensor [B, block_size]} (no padding, every token maskable)."""
        rows = [np.asarray(self.tokens[i * self.block_size:(i + 1) * self.block_size], dtype=np.int64)
                for i in indices]
        return {"input_ids": torch.from_numpy(np.stack(rows))}


class BlockSampler:
    """Seeded order of `n` items over epochs, sharded across ranks, resumable from one integer.

    `position` counts items consumed by all ranks together. A micro-batch of `batch_size` for rank r takes global
    items [position + r * B, position + (r + 1) * B); epoch e uses permutation rng(seed, e). Restoring `position`
    (in the checkpoint) reproduces the exact same future batches. `start`: the first position (`data.skip_blocks`:
    a continuation run skips the part of the order its warm start already trained on).
    """

    def __init__(self, n: int, seed: int, world_size: int = 1, rank: int = 0, shuffle: bool = True, start: int = 0):
        self.n, self.seed, self.world_size, self.rank, self.shuffle = n, seed, world_size, rank, shuffle
        self.position = start
        self._epoch, self._perm = -1, None

    def _order(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._perm = (np.random.default_rng([self.seed, epoch]).permutation(self.n) if self.shuffle
                          else np.arange(self.n))
            self._epoch = epoch
        return self._perm

    def next_indices(self, batch_size: int) -> list[int]:
        start = self.position + self.rank * batch_size
        out = []
        for g in range(start, start + batch_size):
            out.append(int(self._order(g // self.n)[g % self.n]))
        self.position += batch_size * self.world_size
        return out

    @property
    def epoch(self) -> float:
        return self.position / self.n

    def state_dict(self) -> dict:
        return {"position": self.position, "n": self.n, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state.get("n", self.n) != self.n:
            raise ValueError(f"checkpoint data has {state['n']} items, this run has {self.n}: the data changed")
        self.position = int(state["position"])
