"""Per-token payloads: the keys/values (or quantized parts) of exactly one node's edge.

A per-token payload holds one or more arrays that share their token axis (axis 2):
`(keys, values)` for a plain attention layer, the six packed/scale/bias arrays of a
quantized one. It can be split at any token and concatenated with its neighbours, so
any prefix of a stored path restores. Every payload is compact: slicing an mx.array
keeps the whole source buffer alive, so payloads are made with `mx.contiguous` and
evaluated before the live cache they came from can go away.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Sequence
from concurrent.futures import Future
from typing import Any, Optional

import attrs
import mlx.core as mx
import numpy as np

from .arrays import (
    COPIERS,
    NUMPY_DTYPES,
    PARALLEL_BYTES,
    AnyArray,
    HostArray,
    HostPool,
    TwoHands,
    concat_axis,
    copy_rows,
    from_numpy,
    numpy_view,
    on_cpu,
    slice_axis,
    to_device,
)
from .recycle import Recycler

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

    def map(self, fn) -> KVPayload:
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


def _assemble(pieces: Sequence[Piece], index: int, template: AnyArray, capacity: int, pool: HostPool) -> np.ndarray:
    """Copy array `index` of each piece into one pooled numpy buffer of `capacity` positions, zeros after."""
    first = numpy_view(template)
    shape = list(first.shape)
    shape[TOKEN_AXIS] = capacity
    buf = pool.take(tuple(shape), first.dtype)
    _copy_into(pieces, index, buf, 0, _rows(buf), dirty=True)  # (a pooled buffer holds old bytes)
    return buf


def stitch(
    targets: Sequence[tuple[Sequence[Piece], int, Any]],
    pool: HostPool,
    recycler: Recycler,
    whole: Sequence[HostArray] = (),
    slack: Sequence[int] = (),
) -> tuple[list[list[mx.array]], list[mx.array]]:
    """New live arrays for each target: its pieces laid end to end, then zeros up to `capacity`.

    `targets` holds `(pieces, capacity, _)` per layer; the result lists, per target, one
    fresh mx.array per payload array (it never aliases a payload, so a live cache may be
    written in place). The pieces may come from either tier. On the CPU, and on a GPU when
    every piece is on the host tier, the pieces are assembled in pooled numpy buffers and
    handed to MLX in one flat copy (MLX's 4-D concatenate copies element by element on the
    CPU); a GPU concatenates device payloads on the device instead. Large assemblies run on
    two threads (numpy copies release the GIL). On the CPU the new arrays come from
    `recycler` (see `_write_fresh`); small ones run no MLX graph at all (`_stitch_small`).
    `whole` host arrays (a hybrid model's recurrent states) are copied into new arrays in the
    same batch, returned second. `slack[t]` lets target `t` take that many more positions of
    room where a recycled buffer of that size is free (0: exactly `capacity`). Every array
    returned is evaluated.
    """
    cpu = on_cpu()
    layout = _small_layout(targets, whole) if cpu else None
    if layout is not None:
        copies = [mx.array(a.data) if a.dtype in NUMPY_DTYPES else to_device(a) for a in whole]
        if any(a.dtype not in NUMPY_DTYPES for a in whole):
            mx.eval(copies)  # (bfloat16: a lazy view; the others are evaluated as they are made)
        return _stitch_small(targets, layout), copies
    results: list[list[Optional[mx.array]]] = []
    jobs = []
    for t, (pieces, capacity, _) in enumerate(targets):
        stored = [p.payload for p in pieces if p.payload is not None]
        template = stored[0]
        results.append([None] * len(template.arrays))
        for i, a in enumerate(template.arrays):
            if cpu or all(isinstance(s.arrays[i], HostArray) for s in stored):
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
    parallel = total >= PARALLEL_BYTES
    if cpu:
        copies = _write_fresh(
            jobs, results, recycler, total + sum(a.nbytes for a in whole) >= PARALLEL_BYTES, whole, slack
        )
        return results, copies  # type: ignore[return-value]
    futures = [
        (
            t,
            i,
            a.dtype,
            COPIERS.submit(_assemble, pieces, i, a, cap, pool) if parallel else _assemble(pieces, i, a, cap, pool),
        )
        for t, i, pieces, a, cap in jobs
    ]
    copies = [to_device(a) for a in whole]
    for t, i, dtype, job in futures:
        buf = job.result() if isinstance(job, Future) else job  # (a future when parallel)
        results[t][i] = from_numpy(buf, dtype)
        pool.give(buf)
    mx.eval(results, copies)
    return results, copies  # type: ignore[return-value]


# live arrays below this in all are laid out in numpy and copied once more (`_stitch_small`); such a
# restore never reclaims a recycled buffer, so a buffer that small is not worth keeping (`Recycler`)
SMALL_RESTORE_BYTES = 256 << 10


def _small_layout(targets: Sequence[tuple[Sequence[Piece], int, Any]], whole: Sequence[HostArray]) -> Optional[list]:
    """Per target, the (shape, numpy dtype) of each new live array, if they are small (below
    `SMALL_RESTORE_BYTES` in all) and numpy holds their dtypes; else None."""
    live = sum(a.nbytes for a in whole)
    layout = []
    for pieces, capacity, _ in targets:
        template = next(p.payload for p in pieces if p.payload is not None)
        specs = []
        for a in template.arrays:
            dtype = NUMPY_DTYPES.get(a.dtype)
            if dtype is None:
                return None
            shape = (*a.shape[:TOKEN_AXIS], capacity, *a.shape[TOKEN_AXIS + 1 :])
            live += math.prod(shape) * a.dtype.size
            specs.append((shape, dtype))
        layout.append(specs)
    return layout if live < SMALL_RESTORE_BYTES else None


def lays_out_in_numpy(live: Sequence[mx.array]) -> bool:
    """A restore into live arrays like these takes the small path on the CPU (`_stitch_small`):
    under `SMALL_RESTORE_BYTES` in all, every dtype one numpy holds."""
    return sum(a.nbytes for a in live) < SMALL_RESTORE_BYTES and all(a.dtype in NUMPY_DTYPES for a in live)


def _stitch_small(targets: Sequence[tuple[Sequence[Piece], int, Any]], layout: list) -> list[list[mx.array]]:
    """`stitch` for small restores on the CPU: each live array laid out in a numpy buffer and
    copied into MLX by `mx.array`, which is evaluated as it is made. A second copy, but no graph
    run: a graph run hands work to MLX's stream thread and back, more than small copies cost.
    The buffers of one shape and dtype are rows of one zero-filled block (one allocation)."""
    counts: dict[tuple, int] = {}
    for specs in layout:
        for spec in specs:
            counts[spec] = counts.get(spec, 0) + 1
    rows = {spec: iter(np.zeros((k, *spec[0]), spec[1])) for spec, k in counts.items()}
    results = []
    for (pieces, _, _), specs in zip(targets, layout):
        arrays = []
        for i, spec in enumerate(specs):
            buf = next(rows[spec])
            _copy_into(pieces, i, buf, 0, _rows(buf))
            arrays.append(mx.array(buf))
        results.append(arrays)
    return results


def _capacities(jobs: list, recycler: Recycler, slack: Sequence[int]) -> list[int]:
    """Each job's capacity: as asked, or up to `slack[target]` more where kept buffers of that
    size can serve it. Only targets whose arrays share one shape and dtype (keys and values of
    a plain KV cache) grow, and all of a target's arrays by the same amount."""
    caps = [cap for _, _, _, _, cap in jobs]
    by_target: dict[int, list[int]] = {}
    for k, (t, _, _, _, _) in enumerate(jobs):
        if slack and slack[t] > 0:
            by_target.setdefault(t, []).append(k)
    by_spec: dict[tuple, list[int]] = {}
    for t, ks in by_target.items():
        specs = {(jobs[k][3].shape[:2], jobs[k][3].shape[3:], jobs[k][3].dtype, jobs[k][4]) for k in ks}
        if len(specs) == 1:
            by_spec.setdefault((*specs.pop(), slack[t]), []).extend(ks)
    for (head, tail, dtype, cap, extra), ks in by_spec.items():
        grown = recycler.capacity((*head, cap, *tail), dtype, cap + extra, len(ks))
        for k in ks:
            caps[k] = grown
    return caps


def _write_fresh(
    jobs: list, results: list, recycler: Recycler, parallel: bool, whole: Sequence[HostArray], slack: Sequence[int] = ()
) -> list[mx.array]:
    """One copy: each payload is written once, straight into the new live array's memory.

    The arrays come from `recycler` (a dead live cache's buffer, else zero-filled), are
    evaluated, and nobody else holds them; they are written through numpy views that are
    dropped before the arrays are handed out. Past 8 MiB the allocations (MLX's thread)
    run ahead of the copies, array by array, and the copies are shared by this thread and
    a worker, balanced by bytes (`TwoHands`).
    Returns the copies of `whole`.
    """
    fresh, writers = [], []
    caps = _capacities(jobs, recycler, slack)
    for (_t, i, pieces, a, _), cap in zip(jobs, caps):
        shape = list(a.shape)
        shape[TOKEN_AXIS] = cap
        f = recycler.take(shape, a.dtype)
        fresh.append(f)
        writers.append(functools.partial(_copy_into, pieces, i, dirty=f.recycled))
    for a in whole:
        fresh.append(recycler.take(a.shape, a.dtype))
        writers.append(functools.partial(copy_rows, a.data))
    lives = [f.live for f in fresh]
    # zero fills run on MLX's thread ahead of the copies, array by array; recycled arrays (nothing
    # to fill) are made in one graph run
    ahead = parallel and not all(f.recycled for f in fresh)
    (mx.async_eval if ahead else mx.eval)(lives)
    hands = TwoHands(parallel)
    for f, write in zip(fresh, writers):
        if ahead:
            mx.eval(f.live)  # this one is ready; the next ones are still being made
        dst = numpy_view(f.live)
        hands.copy(functools.partial(write, dst), _rows(dst), dst.nbytes)
        del dst
    hands.wait()  # no numpy view outlives the copies: the live arrays own their buffers alone
    del lives
    for (t, i, _, _, _), f in zip(jobs, fresh):
        results[t][i] = f.live
    return [f.live for f in fresh[len(jobs) :]]


def _rows(dst: np.ndarray) -> int:
    """How many slices along axis 1 (the heads of a KV array) the copy can be split into."""
    return dst.shape[1] if dst.ndim >= 2 else 1


def _copy_into(pieces: Sequence[Piece], index: int, dst: np.ndarray, h0: int, h1: int, dirty: bool = False) -> None:
    """Heads `[h0, h1)` of array `index` of each piece laid end to end into `dst`; holes and the
    rest are zero (written only when `dirty`: a zero-filled `dst` has them already)."""
    whole = h0 == 0 and h1 == _rows(dst)
    if not whole:
        dst = dst[:, h0:h1]
    at = 0
    for piece in pieces:
        n = piece.length
        if piece.payload is not None:
            src = numpy_view(piece.payload.arrays[index])
            if not whole or piece.lo or piece.hi != src.shape[TOKEN_AXIS]:
                src = src[:, h0:h1, piece.lo : piece.hi]
            np.copyto(dst[:, :, at : at + n], src)
        elif dirty:
            dst[:, :, at : at + n] = 0
        at += n
    if dirty:
        dst[:, :, at:] = 0


def evaluate(payloads: Iterable[Any]) -> None:
    """Evaluate the arrays of all payloads (any kind; `None` skipped) in one graph run.

    Until evaluated, a payload is a graph that still references the live buffers.
    """
    arrays = [a for p in payloads if p is not None for a in p.arrays if isinstance(a, mx.array)]
    if arrays:
        mx.eval(*arrays)
