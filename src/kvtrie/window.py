"""Windowed attention layers stored per token: which positions a restore needs, and where to find them.

A sliding-window layer (mlx-lm's `RotatingKVCache`: `keep` sink positions plus a window of
`max_size`) or a chunked-attention layer (`ChunkedKVCache`: the current chunk of
`chunk_size`) only ever attends to a few recent positions, but which ones depends on where
a request resumes. So kvtrie stores their keys/values per token like full attention, and a
restore at position `p` rebuilds the live cache from the positions `p` needs.

The live cache forgets positions as its window scrolls; to store every token anyway, the
caches kvtrie hands out carry a `Recorder` that keeps what each `update_and_fetch` was
given since the last commit. Positions nobody recorded are *holes*: a node stores `None`
for that layer, and a restore avoids positions whose window reaches into a hole.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any, Optional, Union

import attrs
import mlx.core as mx

Range = tuple[int, int]


def _merge(ranges: Sequence[Range]) -> list[Range]:
    out: list[Range] = []
    for lo, hi in sorted(r for r in ranges if r[1] > r[0]):
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def _hits(ranges: Sequence[Range], holes: Sequence[Range]) -> bool:
    return any(lo < he and hs < hi for lo, hi in ranges for hs, he in holes)


@attrs.frozen
class RotatingWindow:
    """mlx-lm's RotatingKVCache: sink `[0, keep)` plus the last `max_size - 1 - keep` positions.

    Those are exactly the positions the cache's next update attends to, whichever path
    (one-token rotation or multi-token concatenation) it takes.
    """

    keep: int
    max_size: int

    @property
    def tail(self) -> int:
        return self.max_size - 1 - self.keep

    def needed(self, p: int) -> list[Range]:
        return _merge([(0, min(self.keep, p)), (max(self.keep, p - self.tail), p)])

    def candidates(self, limit: int, holes: Sequence[Range]) -> list[int]:
        """Positions that may be the largest restorable one at or below `limit`."""
        return [limit, *(hs for hs, _ in holes if hs <= limit), 0]

    def layout(self, p: int) -> list[Optional[Range]]:
        """The live buffer in order: position ranges, and `None` for one slot the next update overwrites.

        Below `max_size` positions the buffer is every position in order (as after one
        prefill); from there on, sink + a spare slot + tail, rotated to the spare slot, so
        a one-token update overwrites the spare and a prefill drops it.
        """
        if p < self.max_size:
            return [(0, p)] if p else []
        return [r for r in [(0, self.keep)] if r[1] > 0] + [None, (p - self.tail, p)]


@attrs.frozen
class ChunkWindow:
    """mlx-lm's ChunkedKVCache (llama4): attention within fixed chunks of `chunk` positions."""

    chunk: int

    def needed(self, p: int) -> list[Range]:
        return _merge([((p // self.chunk) * self.chunk, p)])

    def candidates(self, limit: int, holes: Sequence[Range]) -> list[int]:
        out = [limit, 0]
        for hs, he in holes:
            if hs <= limit:
                out.append(hs)
                out.append((min(he, limit) // self.chunk) * self.chunk)
        return out

    def layout(self, p: int) -> list[Optional[Range]]:
        return [r for r in self.needed(p)]


Geometry = Union[RotatingWindow, ChunkWindow]


def restorable_max(geometry: Geometry, limit: int, holes: Sequence[Range]) -> int:
    """The largest position `p <= limit` whose needed positions avoid every hole."""
    if not holes:
        return limit
    for p in sorted(set(geometry.candidates(limit, holes)), reverse=True):
        if p <= limit and not _hits(geometry.needed(p), holes):
            return p
    return 0


def restorable(geometry: Geometry, p: int, holes: Sequence[Range]) -> bool:
    return not _hits(geometry.needed(p), holes)


# --- recording what scrolls out -------------------------------------------------------------


class Recorder:
    """Stands in for a window cache's `update_and_fetch` and keeps every position it was given.

    Installed as an instance attribute, so the model's calls reach it first; the cache is
    held weakly (no reference cycle keeps a dropped live cache's buffers alive).
    """

    def __init__(self, cache: Any, start: int):
        self._cache = weakref.ref(cache)
        self._update = type(cache).update_and_fetch
        self.start = start
        self.pieces: list[tuple[mx.array, ...]] = []
        self.length = 0

    def __call__(self, keys: mx.array, values: mx.array):
        self.pieces.append((keys, values))
        self.length += keys.shape[2]
        return self._update(self._cache(), keys, values)

    @property
    def end(self) -> int:
        return self.start + self.length

    def take(self, lo: int, hi: int) -> tuple[mx.array, ...]:
        """Positions `[lo, hi)` (within `[start, end)`) as compact arrays (lazy)."""
        at = self.start
        chosen = []
        for piece in self.pieces:
            n = piece[0].shape[2]
            if at + n > lo and at < hi:
                chosen.append(tuple(a[:, :, max(lo - at, 0) : min(hi - at, n)] for a in piece))
            at += n
        return tuple(mx.contiguous(mx.concatenate(list(parts), axis=2)) for parts in zip(*chosen))

    def reset(self, start: int) -> None:
        """Forget everything recorded: the positions before `start` are stored elsewhere now."""
        self.start = start
        self.pieces = []
        self.length = 0


def record(cache: Any, start: int) -> Recorder:
    """Make `cache` record every position from `start` on (replacing an earlier recorder)."""
    recorder = Recorder(cache, start)
    cache.update_and_fetch = recorder
    return recorder


def recorder_of(cache: Any) -> Optional[Recorder]:
    found = getattr(cache, "__dict__", {}).get("update_and_fetch")
    return found if isinstance(found, Recorder) else None
