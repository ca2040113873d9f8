"""Per-token payloads: the keys/values (or quantized parts) of exactly one node's edge.

A per-token payload holds one or more arrays that share their token axis (axis 2):
`(keys, values)` for a plain attention layer, the six packed/scale/bias arrays of a
quantized one. It can be split at any token and concatenated with its neighbours, so
any prefix of a stored path restores. Every payload is compact: slicing an mx.array
keeps the whole source buffer alive, so payloads are made with `mx.contiguous` and
evaluated before the live cache they came from can go away.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional

import attrs
import mlx.core as mx
import numpy as np

from .arrays import AnyArray, HostArray, HostPool, concat_axis, from_numpy, numpy_view, on_cpu, slice_axis, to_device

TOKEN_AXIS = 2


@attrs.frozen(eq=False)
class KVPayload:
    """The arrays of one layer over one edge, all `[B, H, length, ...]` (token axis 2).

    The arrays are `mx.array` on the device tier and `HostArray` on the host tier.
    """

    arrays: tuple[AnyArray, ...]

    @property
    def length(self) -> int:
        return self.arrays[0].shape[TOKEN_AXIS]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays)

    @property
    def keys(self) -> AnyArray:
        """The first array (the keys of a plain attention layer)."""
        return self.arrays[0]

    @property
    def values(self) -> AnyArray:
        """The array that starts the second half (the values of a plain attention layer)."""
        return self.arrays[len(self.arrays) // 2]

    def map(self, fn) -> "KVPayload":
        """The same payload with `fn` applied to every array (e.g. a tier move)."""
        return KVPayload(tuple(fn(a) for a in self.arrays))


def capture_tokens(arrays: Sequence[mx.array], start: int, end: int) -> KVPayload:
    """A compact copy of token positions `[start, end)` of live arrays (lazy: `evaluate` it)."""
    return KVPayload(tuple(mx.contiguous(a[:, :, start:end]) for a in arrays))


def split_kv(payload: KVPayload, k: int) -> tuple[KVPayload, KVPayload]:
    """The first `k` positions and the rest, each a compact copy in the payload's tier (lazy)."""
    if not 0 < k < payload.length:
        raise ValueError(f"split offset {k} must lie strictly inside a payload of {payload.length} positions")
    n = payload.length
    return (
        KVPayload(tuple(slice_axis(a, TOKEN_AXIS, 0, k) for a in payload.arrays)),
        KVPayload(tuple(slice_axis(a, TOKEN_AXIS, k, n) for a in payload.arrays)),
    )


def merge_kv(upper: KVPayload, lower: KVPayload) -> KVPayload:
    """One payload spanning `upper` then `lower` (lazy; on the host only if both are)."""
    return KVPayload(tuple(concat_axis([a, b], TOKEN_AXIS) for a, b in zip(upper.arrays, lower.arrays)))


@attrs.frozen
class Piece:
    """Positions `[lo, hi)` of a stored payload, or `hi - lo` zero positions where `payload` is None."""

    payload: Optional[KVPayload]
    lo: int
    hi: int

    @property
    def length(self) -> int:
        return self.hi - self.lo


def prefix_pieces(parts: Sequence[KVPayload], length: int) -> list[Piece]:
    """The pieces that make up the first `length` positions of `parts` laid end to end."""
    out: list[Piece] = []
    left = length
    for p in parts:
        n = min(left, p.length)
        out.append(Piece(p, 0, n))
        left -= n
        if left == 0:
            return out
    raise ValueError(f"payloads cover {length - left} positions, {length} were asked for")


def _assemble(pieces: Sequence[Piece], index: int, template: AnyArray, capacity: int, pool: HostPool) -> np.ndarray:
    """Copy array `index` of each piece into one pooled numpy buffer of `capacity` positions, zeros after."""
    first = numpy_view(template)
    shape = list(first.shape)
    shape[TOKEN_AXIS] = capacity
    buf = pool.take(tuple(shape), first.dtype)
    at = 0
    for piece in pieces:
        n = piece.length
        if piece.payload is None:
            buf[:, :, at : at + n] = 0
        else:
            np.copyto(buf[:, :, at : at + n], numpy_view(piece.payload.arrays[index])[:, :, piece.lo : piece.hi])
        at += n
    buf[:, :, at:] = 0
    return buf


_COPIERS = ThreadPoolExecutor(max_workers=2, thread_name_prefix="kvtrie-stitch")
_PARALLEL_BYTES = 8 << 20  # below this, threads cost more than they save


def stitch(targets: Sequence[tuple[Sequence[Piece], int, Any]], pool: HostPool) -> list[list[mx.array]]:
    """New live arrays for each target: its pieces laid end to end, then zeros up to `capacity`.

    `targets` holds `(pieces, capacity, _)` per layer; the result lists, per target, one
    fresh mx.array per payload array (it never aliases a payload, so a live cache may be
    written in place). The pieces may come from either tier. On the CPU, and on a GPU when
    every piece is on the host tier, the pieces are assembled in pooled numpy buffers and
    handed to MLX in one flat copy (MLX's 4-D concatenate copies element by element on the
    CPU); a GPU concatenates device payloads on the device instead. Large assemblies run on
    two threads (numpy copies release the GIL).
    """
    cpu = on_cpu()
    results: list[list[Optional[mx.array]]] = []
    jobs = []
    for t, (pieces, capacity, _) in enumerate(targets):
        stored = [p for p in pieces if p.payload is not None]
        template = stored[0].payload
        results.append([None] * len(template.arrays))
        for i, a in enumerate(template.arrays):
            if cpu or all(isinstance(p.payload.arrays[i], HostArray) for p in stored):
                jobs.append((t, i, pieces, a, capacity))
                continue
            chunks = []
            for p in pieces:
                if p.payload is None:
                    shape = list(a.shape)
                    shape[TOKEN_AXIS] = p.length
                    chunks.append(mx.zeros(tuple(shape), a.dtype))
                else:
                    chunks.append(to_device(p.payload.arrays[i])[:, :, p.lo : p.hi])
            used = sum(p.length for p in pieces)
            if capacity > used:
                shape = list(a.shape)
                shape[TOKEN_AXIS] = capacity - used
                chunks.append(mx.zeros(tuple(shape), a.dtype))
            results[t][i] = mx.concatenate(chunks, axis=TOKEN_AXIS) if len(chunks) > 1 else mx.contiguous(chunks[0])
    total = sum(p.payload.arrays[i].nbytes for _, i, pieces, _, _ in jobs for p in pieces if p.payload is not None)
    parallel = total >= _PARALLEL_BYTES
    if cpu:
        # one copy: each payload is written once, straight into the new live array's memory
        # (a fresh, evaluated, zero-filled MLX buffer nobody else holds, written through numpy)
        fresh = []
        for t, i, pieces, a, cap in jobs:
            shape = list(a.shape)
            shape[TOKEN_AXIS] = cap
            fresh.append(mx.zeros(tuple(shape), a.dtype))
        mx.eval(fresh)
        copies = [(pieces, i, numpy_view(dst)) for (t, i, pieces, a, cap), dst in zip(jobs, fresh)]
        if parallel:
            for job in [_COPIERS.submit(_copy_into, *c) for c in copies]:
                job.result()
        else:
            for c in copies:
                _copy_into(*c)
        del copies  # no numpy view outlives the copy: the live arrays own their buffers alone
        for (t, i, _, _, _), dst in zip(jobs, fresh):
            results[t][i] = dst
        return results  # type: ignore[return-value]
    futures = [
        (t, i, a.dtype, _COPIERS.submit(_assemble, pieces, i, a, cap, pool) if parallel else _assemble(pieces, i, a, cap, pool))
        for t, i, pieces, a, cap in jobs
    ]
    for t, i, dtype, job in futures:
        buf = job.result() if parallel else job
        results[t][i] = from_numpy(buf, dtype)
        pool.give(buf)
    return results  # type: ignore[return-value]


def _copy_into(pieces: Sequence[Piece], index: int, dst: np.ndarray) -> None:
    """Array `index` of each piece laid end to end into `dst` (already zero: holes stay zero)."""
    at = 0
    for piece in pieces:
        n = piece.length
        if piece.payload is not None:
            np.copyto(dst[:, :, at : at + n], numpy_view(piece.payload.arrays[index])[:, :, piece.lo : piece.hi])
        at += n


def evaluate(payloads: Iterable[Any]) -> None:
    """Evaluate the arrays of all payloads (any kind; `None` skipped) in one graph run.

    Until evaluated, a payload is a graph that still references the live buffers.
    """
    arrays = [a for p in payloads if p is not None for a in p.arrays if isinstance(a, mx.array)]
    if arrays:
        mx.eval(*arrays)
