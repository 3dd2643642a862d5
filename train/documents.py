"""Training data before tokens: sources -> documents (files, directories, globs, Hugging Face datasets), the
cleaning hooks, and the weighted mixture of sources (`train.data` tokenizes what these yield into its cache)."""
from __future__ import annotations

import glob
import gzip
import json
import logging
import re
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np

log = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".txt.gz", ".jsonl", ".jsonl.gz", ".json.gz")
# The Gutenberg books DiffuSmol's training never reads (its configs' `data.exclude`): `bench.continuation` takes its
# held-out prompts from them, and `train.self_distill` never prompts with them.
HELDOUT_BOOKS = ("11-0.txt.gz", "25344-0.txt.gz", "The-Art-of-War.txt.gz", "pg55.txt.gz")


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
