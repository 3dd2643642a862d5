"""The frames of one run, kept small enough to hold one run per session for many sessions.

A `Frame` carries the whole canvas, so a run of S steps over a canvas of L tokens would keep S x L Python ints
(~36 bytes each: a 512-step run over a 1.5k-token canvas, ~28 MB per session, and the playground keeps one trace per
tab per session). Between two steps only the revealed (and drafted) positions change, so `FrameLog` keeps every
`KEY`-th canvas whole (int32) and the others as the positions that changed since the step before: a max-size run
then holds a few hundred kB, and reading frame k replays at most `KEY - 1` diffs. It reads like the list of frames
it was given (`len`, indexing, slicing, iteration: equal `Frame`s); `headers()` gives the frames without their
canvas, for what only counts reveals and drafts.
"""
from __future__ import annotations

import dataclasses
from typing import Iterator, Optional, Sequence

import numpy as np

from dlm.types import Frame


class FrameLog(Sequence):
    KEY = 32   # a whole canvas every KEY frames: bounds the replay of one random access

    def __init__(self, frames: Sequence[Frame] = ()):
        self._headers: list[Frame] = []           # each frame with tokens=[]
        self._keys: dict[int, np.ndarray] = {}    # frame index -> whole canvas
        self._diffs: list[Optional[tuple[np.ndarray, np.ndarray]]] = []   # (positions, tokens) vs the frame before
        self._last: Optional[np.ndarray] = None
        for frame in frames:
            self.append(frame)

    def append(self, frame: Frame) -> None:
        canvas = np.asarray(frame.tokens, dtype=np.int64)
        i = len(self._headers)
        if i % self.KEY == 0 or self._last is None or canvas.shape != self._last.shape:
            self._keys[i] = canvas
            self._diffs.append(None)
        else:
            pos = np.flatnonzero(canvas != self._last)
            self._diffs.append((pos.astype(np.int32), canvas[pos]))
        self._last = canvas
        self._headers.append(dataclasses.replace(frame, tokens=[]))

    def __len__(self) -> int:
        return len(self._headers)

    def _canvas(self, k: int) -> np.ndarray:
        key = next(j for j in range(k, -1, -1) if j in self._keys)   # the key frame at or before k (<= KEY back)
        canvas = self._keys[key].copy()
        for j in range(key + 1, k + 1):
            pos, tok = self._diffs[j]
            canvas[pos] = tok
        return canvas

    def _frame(self, k: int, canvas: np.ndarray) -> Frame:
        return dataclasses.replace(self._headers[k], tokens=canvas.tolist())

    def __getitem__(self, k):
        if isinstance(k, slice):
            return [self[j] for j in range(*k.indices(len(self)))] if (k.step or 1) != 1 else \
                list(self._iter(*k.indices(len(self))[:2]))
        if k < 0:
            k += len(self)
        if not 0 <= k < len(self):
            raise IndexError("frame index out of range")
        return self._frame(k, self._canvas(k))

    def _iter(self, start: int, stop: int) -> Iterator[Frame]:
        canvas = None
        for k in range(start, stop):
            if canvas is None or self._diffs[k] is None:
                canvas = self._canvas(k)
            else:
                pos, tok = self._diffs[k]
                canvas[pos] = tok
            yield self._frame(k, canvas)

    def __iter__(self) -> Iterator[Frame]:
        return self._iter(0, len(self))

    def headers(self) -> list[Frame]:
        """The frames without their canvas (`tokens` empty): steps, reveals, confidences, drafts."""
        return list(self._headers)

    def nbytes(self) -> int:
        """The canvases' bytes (whole and diffs): what grows with steps x canvas length."""
        return sum(a.nbytes for a in self._keys.values()) + sum(p.nbytes + t.nbytes for p, t in
                                                                filter(None, self._diffs))
