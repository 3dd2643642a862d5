"""Pre-training data: corpus -> documents -> one cached memory-mapped token file -> packed fixed-size blocks.

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

import glob
import gzip
import hashlib
import json
import logging
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import torch

from dlm.fileio import atomic_directory, cache_dir

log = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".txt.gz", ".jsonl", ".jsonl.gz", ".json.gz")
CACHE_VERSION = 1
_CHUNK_CHARS = 1 << 16  # long documents are tokenized in ~64k-character pieces split at newlines


class DataError(ValueError):
    """Missing, empty or unreadable training data; the message names the source."""


# ----- cleaning hooks -------------------------------------------------------------------------------------------------
_START = re.compile(r"\*\*\*\s*START OF", re.IGNORECASE)
_END = re.compile(r"\*\*\*\s*END OF", re.IGNORECASE)


def gutenberg_clean(text: str) -> str:
    """Keep only the book: drop everything outside the `*** START OF ... ***` / `*** END OF ... ***` markers
    (the Project Gutenberg licence header/footer), normalise CRLF / CR to LF. Books without markers are kept whole."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    start = _START.search(text)
    if start:
        close = text.find("***", start.end())  # the marker's closing stars (its title may wrap to the next line)
        cut = close + 3 if 0 <= close - start.end() < 400 else start.end()
        newline = text.find("\n", cut)
        text = text[newline + 1:] if newline >= 0 else ""
    end = _END.search(text)
    if end:
        text = text[:text.rfind("\n", 0, end.start()) + 1]
    return text.strip() + "\n" if text.strip() else ""


CLEANERS: dict[str, Callable[[str], str]] = {
    "none": lambda text: text,
    "gutenberg": gutenberg_clean,
}


# ----- sources -> documents -------------------------------------------------------------------------------------------
def _is_text_file(path: Path) -> bool:
    return path.name.endswith(TEXT_SUFFIXES)


def expand_sources(sources: list[str]) -> list[str]:
    """Files / directories / globs -> sorted file list (+ `hf:` entries kept as they are). Errors name the source."""
    out: list[str] = []
    for src in sources:
        if src.startswith("hf:"):
            out.append(src)
            continue
        path = Path(src).expanduser()
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and _is_text_file(p))
            if not files:
                raise DataError(f"data source {src}: directory has no {', '.join(TEXT_SUFFIXES)} files")
            out.extend(str(p) for p in files)
        elif path.is_file():
            if not _is_text_file(path):
                raise DataError(f"data source {src}: unsupported file type (use {', '.join(TEXT_SUFFIXES)})")
            out.append(str(path))
        elif any(ch in src for ch in "*?["):
            files = sorted(p for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
            if not files:
                raise DataError(f"data source {src}: glob matches no files")
            out.extend(files)
        else:
            raise DataError(f"data source {src}: no such file or directory")
    if not out:
        raise DataError("no data sources given (set data.sources)")
    return out


def _open_text(path: str):
    return gzip.open(path, "rt", encoding="utf-8", errors="replace") if path.endswith(".gz") else \
        open(path, "r", encoding="utf-8", errors="replace")


def iter_jsonl(path: str) -> Iterator[tuple[int, object]]:
    """(line number, parsed record) for each non-blank line; a malformed line raises DataError naming file:line."""
    with _open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None


def _read_jsonl(path: str, text_field: str) -> Iterator[str]:
    for lineno, record in iter_jsonl(path):
        if not isinstance(record, dict) or text_field not in record:
            keys = ", ".join(record) if isinstance(record, dict) else type(record).__name__
            raise DataError(f"{path}:{lineno}: no field {text_field!r} (has: {keys}); set data.text_field")
        yield str(record[text_field])


def _read_hf(spec: str, text_field: str, split: str) -> Iterator[str]:
    spec, _, field_override = spec.partition("#")
    text_field = field_override or text_field
    name, _, config = spec[3:].partition(":")
    try:
        import datasets
    except ImportError:
        raise DataError(f"{spec}: Hugging Face datasets need `pip install datasets`") from None
    try:
        stream = datasets.load_dataset(name, config or None, split=split, streaming=True)
        for record in stream:
            if text_field not in record:
                raise DataError(f"{spec}: records have no field {text_field!r} (has: {', '.join(record)}); "
                                "set data.text_field")
            yield str(record[text_field])
    except DataError:
        raise
    except Exception as e:  # offline, unknown dataset, gated ...
        raise DataError(f"{spec}: could not stream the Hugging Face dataset ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}). It needs the network; offline, point "
                        "data.sources at local .txt/.jsonl files.") from None


def iter_documents(source: str, text_field: str = "text", hf_split: str = "train") -> Iterator[str]:
    """One source (file or hf: spec) -> its documents (raw text)."""
    if source.startswith("hf:"):
        yield from _read_hf(source, text_field, hf_split)
        return
    try:
        if ".jsonl" in Path(source).name or source.endswith(".json.gz"):
            yield from _read_jsonl(source, text_field)
        else:
            with _open_text(source) as f:
                yield f.read()
    except (OSError, EOFError, UnicodeError) as e:
        raise DataError(f"{source}: unreadable ({type(e).__name__}: {e})") from None


# ----- weighted mixture of sources ------------------------------------------------------------------------------------
class WeightedMixer:
    """Interleave the documents of several sources so that each source's share of the TOKENS follows its weight
    (DiffuLLaMA's SlimPajama ~70% + StarCoder ~30%, TinyLlama's token-weighted mix), deterministic for a seed and
    resumable at any point with the same order.

    open_source: (i, skip) -> iterator over source i's items after its first `skip` items (resuming re-opens
                 every source this way; items are e.g. token-id lists).
    weights:     one positive number per source (normalised here).
    seed:        the order is a function of the seed and of the sources' contents only.
    length:      item -> tokens (default `len`).

    Draw k takes the next item of source i with probability proportional to weight_i / (mean length of the items
    taken from source i so far), so the expected token share is weight_i whatever the sources' document lengths;
    the uniform number of draw k depends only on (seed, k). Iteration stops when a source runs out (the mix never
    drifts from the weights). `state_dict()` is a few integers (draws, items and tokens taken per source): a mixer
    built with `state=` continues exactly where that one stopped.
    """

    _CHUNK = 4096  # uniform numbers are generated in counter-addressed chunks: draw k uses chunk k // _CHUNK

    def __init__(self, open_source: Callable[[int, int], Iterator], weights, seed: int = 0,
                 length: Callable = len, state: Optional[dict] = None):
        weights = [float(w) for w in weights]
        if not weights or any(not np.isfinite(w) or w <= 0 for w in weights):
            raise ValueError(f"mixture weights must be positive numbers, got {weights}")
        total = sum(weights)
        self.weights = [w / total for w in weights]
        self.seed, self.length = int(seed), length
        n = len(weights)
        state = state or {"draws": 0, "taken": [0] * n, "tokens": [0] * n}
        if len(state["taken"]) != n or len(state["tokens"]) != n:
            raise ValueError(f"mixer state is for {len(state['taken'])} sources, this mixture has {n}")
        self.draws, self.taken, self.tokens = int(state["draws"]), list(state["taken"]), list(state["tokens"])
        self._iters = [open_source(i, self.taken[i]) for i in range(n)]
        self._chunk_id, self._chunk = -1, None

    def _uniform(self, k: int) -> float:
        if k // self._CHUNK != self._chunk_id:
            self._chunk_id = k // self._CHUNK
            self._chunk = np.random.default_rng([self.seed, self._chunk_id]).random(self._CHUNK)
        return float(self._chunk[k % self._CHUNK])

    def choose(self, k: int) -> int:
        """The source of draw k given the items taken so far (token-weighted, seeded)."""
        means = [self.tokens[i] / self.taken[i] if self.taken[i] else 1.0 for i in range(len(self.weights))]
        p = np.array([w / max(m, 1e-9) for w, m in zip(self.weights, means)])
        return int(min(np.searchsorted(np.cumsum(p / p.sum()), self._uniform(k), side="right"), len(p) - 1))

    def __iter__(self):
        return self

    def __next__(self) -> tuple[int, object]:
        """-> (source index, item)."""
        i = self.choose(self.draws)
        item = next(self._iters[i])  # StopIteration: that source ran out, the mixture ends
        self.draws += 1
        self.taken[i] += 1
        self.tokens[i] += int(self.length(item))
        return i, item

    def state_dict(self) -> dict:
        return {"draws": self.draws, "taken": list(self.taken), "tokens": list(self.tokens)}

    def shares(self) -> list[float]:
        """Each source's share of the tokens taken so far."""
        total = sum(self.tokens)
        return [t / total if total else 0.0 for t in self.tokens]


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


def build_token_cache(data_cfg, tokenizer, *, progress: bool = False) -> TokenCache:
    """Tokenize `data_cfg.sources` once (or reuse the cache). Documents are joined with EOS after each one.

    data_cfg:  `train.config.DataConfig` (sources, text_field, hf_split, clean, eval_fraction, eval_sources,
               max_documents, max_tokens, shuffle_documents, seed, cache_dir).
    tokenizer: a Hugging Face tokenizer with an EOS token.
    Returns a `TokenCache` (memory-mapped; nothing is held in RAM).
    """
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no EOS token: documents cannot be separated")
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
    dtype = np.uint16 if len(tokenizer) <= np.iinfo(np.uint16).max + 1 else np.uint32
    clean = CLEANERS[data_cfg.clean]
    eos = int(tokenizer.eos_token_id)
    with atomic_directory(directory, keep_existing=True) as tmp:  # another rank may finish the same cache first
        boundaries: list[int] = []  # token offset after each document
        n_tokens = n_docs = 0
        with open(tmp / "tokens.bin", "wb") as out:
            def write_stream(sources: list[str], limit: int) -> None:
                nonlocal n_tokens, n_docs
                bar = _progress(sources, progress)
                for src in bar:
                    n_src = 0
                    for raw in iter_documents(src, data_cfg.text_field, data_cfg.hf_split):
                        text = clean(raw)
                        if not text.strip():
                            continue
                        ids = encode_document(tokenizer, text) + [eos]
                        out.write(np.asarray(ids, dtype=dtype).tobytes())
                        n_tokens += len(ids)
                        n_docs += 1
                        n_src += 1
                        boundaries.append(n_tokens)
                        if (data_cfg.max_documents and n_docs >= data_cfg.max_documents) or \
                                (limit and n_tokens >= limit):
                            return
                    if n_src == 0:
                        log.warning("data source %s has no non-empty documents", src)

            def write_mixture(limit: int) -> dict:
                nonlocal n_tokens, n_docs

                def open_source(i: int, skip: int) -> Iterator[list[int]]:
                    return _group_token_docs(groups[i], data_cfg, tokenizer, clean, eos, skip)

                mixer = WeightedMixer(open_source, weights, seed=data_cfg.seed)
                for _, ids in mixer:
                    out.write(np.asarray(ids, dtype=dtype).tobytes())
                    n_tokens += len(ids)
                    n_docs += 1
                    boundaries.append(n_tokens)
                    if (data_cfg.max_documents and n_docs >= data_cfg.max_documents) or (limit and n_tokens >= limit):
                        break
                return {"sources": list(data_cfg.sources), "weights": mixer.weights, "shares": mixer.shares(),
                        **mixer.state_dict()}

            mix = write_mixture(data_cfg.max_tokens) if weights else None
            if not weights:
                write_stream(files, data_cfg.max_tokens)
            if n_tokens == 0:
                raise DataError(f"no text found in {', '.join(data_cfg.sources)} (all documents empty after "
                                f"cleaning '{data_cfg.clean}')")
            if eval_files:
                split = n_tokens
                before = n_tokens
                write_stream(eval_files, n_tokens + data_cfg.max_tokens if data_cfg.max_tokens else 0)
                if n_tokens == before:
                    raise DataError(f"no text found in eval sources {', '.join(data_cfg.eval_sources)}")
            else:
                split = _split_point(boundaries, n_tokens, data_cfg.eval_fraction)
        meta = {"n_tokens": n_tokens, "split": split, "n_documents": n_docs, "dtype": np.dtype(dtype).name,
                "eos": eos, "files": files, "eval_files": eval_files, "clean": data_cfg.clean,
                "tokenizer": tokenizer_fingerprint(tokenizer)}
        if mix is not None:
            meta["mix"] = mix
            log.info("mixture: %s", ", ".join(f"{s} {share:.1%} of tokens (weight {w:.1%})" for s, share, w
                                              in zip(mix["sources"], mix["shares"], mix["weights"])))
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    theirs = _load_meta(directory)
    if theirs is None:
        raise DataError(f"token cache {directory} exists but is incomplete; delete it and re-run")
    meta, n_tokens, split = theirs, theirs["n_tokens"], theirs["split"]
    log.info("tokenized %d documents -> %d tokens (%d held out) in %s", n_docs, n_tokens, n_tokens - split,
             directory)
    return TokenCache(directory, meta["n_tokens"], meta["split"], meta["n_documents"], meta["dtype"], True)


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
