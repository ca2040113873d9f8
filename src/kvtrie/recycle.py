"""Buffers for new live caches: recycled from caches nobody uses any more, else zero-filled.

A restore on the CPU writes payloads straight into the memory of the new live arrays
(through numpy), so each new array must be evaluated and held by nobody else. MLX has
no uninitialised allocation: `mx.zeros` writes every byte, a pass that costs half a copy.
The live arrays of closed sessions are usually garbage by the next restore, so a
`Recycler` keeps them (up to `max_bytes`) and reclaims one of the same byte size with a
one-byte `mx.slice_update`: MLX performs that update in the input's own buffer only
when no other array, view or numpy export holds it (donation), and copies the buffer
otherwise, so the result is always a buffer nobody else holds. MLX proves the ownership;
kvtrie never guesses it. Stale bytes past the restored positions are zeroed by the caller.
"""

from __future__ import annotations

import math
import sys
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from typing import Optional

import attrs
import mlx.core as mx

_AT_ZERO = mx.array([0], mx.int32)
_ONE_ZERO: dict = {}  # dtype -> a one-element zero array, the update that proves ownership


@attrs.define(slots=True, eq=False)
class Fresh:
    """A new live array (lazy until evaluated) and whether it reuses a kept buffer (whose old
    bytes the writer must overwrite or zero) or is zero-filled."""

    live: mx.array
    recycled: bool


def _shape_key(shape: Sequence[int], dtype: mx.Dtype) -> tuple:
    return (dtype, len(shape), tuple(shape[:2]), tuple(shape[3:]))


class Recycler:
    """Arrays of closed sessions' live caches, by byte size, oldest dropped first past the limit.

    The limit is `max_bytes` (0: keep nothing) and what `room()` says the budget leaves (the
    ledger's room for recycled arrays; None: no budget). With neither (`max_bytes=None`, no
    budget) it is the largest set of arrays offered at once: one closed session's caches, so
    the next restore of that size writes into warm memory whatever its size.
    Only arrays no Python object other than the recycler refers to are reclaimed (a cache
    the user still holds keeps its arrays); the rest stay until they are free or pushed out.
    Arrays under `min_bytes` are not kept: held, they would only keep MLX from reusing them.
    An array's byte size never changes (MLX's in-place `a[...] = b` keeps the shape).
    """

    def __init__(
        self,
        max_bytes: Optional[int] = None,
        min_bytes: int = 64 << 10,
        room: Optional[Callable[[], Optional[int]]] = None,
    ):
        self.max_bytes = max_bytes
        self.min_bytes = min_bytes  # smaller arrays are not kept: zero-filling them costs next to nothing
        self._room = room
        self.largest_offer = 0  # bytes of the largest set of arrays offered at once
        self._order: OrderedDict[int, mx.array] = OrderedDict()  # id -> array, oldest first
        self._by_size: dict[tuple[int, mx.Dtype], dict[int, mx.array]] = {}
        self._by_shape: dict[tuple, dict[int, mx.array]] = {}  # (dtype, shape but axis 2) -> arrays
        self._bytes = 0
        self.hits = 0
        self.misses = 0
        probe = mx.zeros((1,), mx.uint8)
        key, size = id(probe), (probe.nbytes, probe.dtype)
        self._add(probe)
        del probe
        self._baseline = self._references(size, key)  # the recycler's own references
        self._remove(key, size)

    @property
    def kept_bytes(self) -> int:
        return self._bytes

    @property
    def enabled(self) -> bool:
        return self.max_bytes is None or self.max_bytes > 0

    def limit(self) -> int:
        """The bytes it may keep now (see the class docstring)."""
        room = self._room() if self._room is not None else None
        if self.max_bytes is not None:
            return self.max_bytes if room is None else min(self.max_bytes, room)
        return self.largest_offer if room is None else room

    def keep(self, arrays: Iterable[mx.array]) -> None:
        """Offer arrays that a closed session's live caches held (the caches may still be in use)."""
        if not self.enabled:
            return
        offered = [
            a for a in arrays if isinstance(a, mx.array) and a.nbytes >= self.min_bytes and id(a) not in self._order
        ]
        self.largest_offer = max(self.largest_offer, sum(a.nbytes for a in offered))
        for a in offered:
            self._add(a)
        self.trim(self._bytes - self.limit())

    def trim(self, excess: int) -> int:
        """Drop kept arrays, oldest first, until at least `excess` bytes are gone; returns the bytes dropped."""
        freed = 0
        while freed < excess and self._order:
            key, old = next(iter(self._order.items()))
            freed += old.nbytes
            self._remove(key, (old.nbytes, old.dtype))
        return freed

    def clear(self) -> None:
        self._order.clear()
        self._by_size.clear()
        self._by_shape.clear()
        self._bytes = 0

    def _add(self, a: mx.array) -> None:
        self._order[id(a)] = a
        self._by_size.setdefault((a.nbytes, a.dtype), {})[id(a)] = a
        self._by_shape.setdefault(_shape_key(a.shape, a.dtype), {})[id(a)] = a
        self._bytes += a.nbytes

    def _remove(self, key: int, size: tuple[int, mx.Dtype]) -> mx.array:
        a = self._order.pop(key)
        for index, k in ((self._by_size, size), (self._by_shape, _shape_key(a.shape, a.dtype))):
            same = index[k]
            del same[key]
            if not same:
                del index[k]
        self._bytes -= size[0]
        return a

    def capacity(self, shape: Sequence[int], dtype: mx.Dtype, most: int, count: int) -> int:
        """A length along axis 2 in `[shape[2], most]` at which kept free arrays of this shape
        otherwise can serve as many of `count` takes as possible (the smallest such), or
        `shape[2]` when none can: a KV restore may take a little more room than it asked for
        and reuse a buffer of the last turn's size."""
        need = shape[2]
        found: dict[int, int] = {}
        index = self._by_shape.get(_shape_key(shape, dtype), {})
        for key in list(index):
            n = index[key].shape[2]
            if need <= n <= most and sys.getrefcount(index[key]) <= self._baseline:
                found[n] = found.get(n, 0) + 1
        if not found:
            return need
        return min(found, key=lambda n: (-min(found[n], count), n))

    def _references(self, size: tuple[int, mx.Dtype], key: int) -> int:
        return sys.getrefcount(self._by_size[size][key])

    def _reclaim(self, size: tuple[int, mx.Dtype]) -> Optional[mx.array]:
        """A kept array of this byte size and dtype that only the recycler refers to, taken out."""
        for key in list(self._by_size.get(size, ())):
            if self._references(size, key) <= self._baseline:
                return self._remove(key, size)
        return None

    def take(self, shape: Sequence[int], dtype: mx.Dtype) -> Fresh:
        """A lazy array of `shape`/`dtype` for a restore to write into (evaluate before writing)."""
        old = self._reclaim((math.prod(shape) * dtype.size, dtype)) if self._by_size else None
        if old is None:
            self.misses += 1
            return Fresh(mx.zeros(tuple(shape), dtype), False)
        self.hits += 1
        flat = old.reshape(-1)
        del old  # the lazy graph holds the only reference: MLX may update the buffer in place
        one = _ONE_ZERO.get(dtype)
        if one is None:
            one = _ONE_ZERO[dtype] = mx.zeros((1,), dtype)
        return Fresh(mx.slice_update(flat, one, _AT_ZERO, [0]).reshape(tuple(shape)), True)
