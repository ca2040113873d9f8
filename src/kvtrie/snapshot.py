"""Payloads of transformer (KV) layers: capture, split, merge, stitch, nbytes.

A KV payload holds the keys/values of exactly one node's edge, `[B, H, end-start, D]`,
as compact arrays (on the device or the host tier): slicing an mx.array keeps the whole source buffer alive, so every
payload is made with `mx.contiguous` and evaluated before the live cache it came
from can go away. Live caches are reached only through mlx-lm's duck-typed
protocol (`state`, `offset`, and the `keys`/`values`/`offset` attributes).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import attrs
import mlx.core as mx
import numpy as np

from .arrays import AnyArray, HostArray, HostPool, concat_axis, from_numpy, numpy_view, on_cpu, slice_axis, to_device


@attrs.frozen(eq=False)
class KVPayload:
    """Keys and values of one layer over one edge: arrays of shape `[B, H, length, D]`.

    The arrays are `mx.array` on the device tier and `HostArray` on the host tier.
    """

    keys: AnyArray
    values: AnyArray

    @property
    def length(self) -> int:
        return self.keys.shape[2]

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes

    def arrays(self) -> tuple[AnyArray, AnyArray]:
        return self.keys, self.values

    def map(self, fn) -> "KVPayload":
        """The same payload with `fn` applied to both arrays (e.g. a tier move)."""
        return KVPayload(fn(self.keys), fn(self.values))


@attrs.frozen
class KVSignature:
    """What two KV caches of the same model layer agree on: batch, heads, head dims, dtype."""

    batch: int
    heads: int
    key_dim: int
    value_dim: int
    dtype: Any


def live_kv(cache: Any) -> tuple[mx.array, mx.array, int]:
    """The live cache's key/value buffers and offset; buffers may run past the offset."""
    state = cache.state
    keys, values = state[0], state[1]
    if keys is None or values is None:
        raise ValueError(f"{type(cache).__name__} holds no keys/values yet (offset {cache.offset})")
    return keys, values, int(cache.offset)


def kv_signature(cache: Any) -> KVSignature:
    """The layout of a live KV cache, used to refuse caches of another model."""
    keys, values, _ = live_kv(cache)
    if keys.ndim != 4 or values.ndim != 4:
        raise ValueError(f"KV cache arrays must be [B, H, T, D], got keys {keys.shape} and values {values.shape}")
    return KVSignature(keys.shape[0], keys.shape[1], keys.shape[3], values.shape[3], keys.dtype)


def capture_kv(cache: Any, start: int, end: int) -> KVPayload:
    """Compact copy of positions `[start, end)` of a live KV cache (lazy: evaluate with `evaluate`)."""
    keys, values, offset = live_kv(cache)
    if not 0 <= start < end <= min(offset, keys.shape[2]):
        raise ValueError(f"cannot capture [{start}, {end}) from a cache at offset {offset}")
    return KVPayload(mx.contiguous(keys[..., start:end, :]), mx.contiguous(values[..., start:end, :]))


def split_kv(payload: KVPayload, k: int) -> tuple[KVPayload, KVPayload]:
    """The first `k` positions and the rest, each a compact copy in the payload's tier (lazy)."""
    if not 0 < k < payload.length:
        raise ValueError(f"split offset {k} must lie strictly inside a payload of {payload.length} positions")
    n = payload.length
    return (
        KVPayload(slice_axis(payload.keys, 2, 0, k), slice_axis(payload.values, 2, 0, k)),
        KVPayload(slice_axis(payload.keys, 2, k, n), slice_axis(payload.values, 2, k, n)),
    )


def merge_kv(upper: KVPayload, lower: KVPayload) -> KVPayload:
    """One payload spanning `upper` then `lower` (lazy; on the host only if both are)."""
    return KVPayload(concat_axis([upper.keys, lower.keys], 2), concat_axis([upper.values, lower.values], 2))


def _take_prefix(parts: Sequence[KVPayload], length: int) -> list[tuple[KVPayload, int]]:
    """Which parts, and how many positions of each, make up the first `length` positions."""
    out = []
    left = length
    for p in parts:
        n = min(left, p.length)
        out.append((p, n))
        left -= n
        if left == 0:
            return out
    raise ValueError(f"payloads cover {length - left} positions, {length} were asked for")


def _assemble(arrays: Sequence[tuple[AnyArray, int]], capacity: int, pool: HostPool) -> np.ndarray:
    """Copy the first n positions of each array into one pooled `[B, H, capacity, D]` numpy buffer, zeros after."""
    first = numpy_view(arrays[0][0])
    B, H, _, D = first.shape
    buf = pool.take((B, H, capacity, D), first.dtype)
    at = 0
    for a, n in arrays:
        np.copyto(buf[:, :, at : at + n], numpy_view(a)[:, :, :n])
        at += n
    buf[:, :, at:] = 0
    return buf


_COPIERS = ThreadPoolExecutor(max_workers=2, thread_name_prefix="kvtrie-stitch")
_PARALLEL_BYTES = 8 << 20  # below this, threads cost more than they save


def stitch_kv(targets: Sequence[tuple[Any, Sequence[KVPayload]]], length: int, pool: HostPool) -> None:
    """Load the first `length` positions of each target's concatenated parts into its fresh live cache.

    `targets` pairs each live cache with the payloads of its layer along the path, from
    either tier. The result has zeroed room up to the cache's next step boundary, so the
    following prefill does not regrow the buffer, and it never aliases a payload, so the
    live cache may be written in place.
    """
    if length <= 0 or not targets:
        return
    plans = []
    for cache, parts in targets:
        step = int(getattr(cache, "step", 256))
        plans.append((cache, _take_prefix(parts, length), length + step - length % step))
    # Assemble in pooled numpy buffers, then hand each to MLX in one flat copy, when the
    # parts can be read as numpy cheaply: always on the CPU (where MLX's 4-D concatenate
    # copies element by element), and on a GPU when every part is on the host tier. A
    # GPU reading device payloads through numpy would migrate them to managed memory:
    # there MLX concatenates on the device. Large assemblies run on two threads (numpy
    # copies release the GIL); small ones inline, where a hand-off costs more.
    cpu = on_cpu()
    tasks = []
    for cache, taken, capacity in plans:
        for name in ("keys", "values"):
            parts = [(getattr(p, name), n) for p, n in taken]
            if cpu or all(isinstance(a, HostArray) for a, _ in parts):
                tasks.append((cache, name, taken[0][0].keys.dtype, parts, capacity))
            else:
                arrays = [to_device(a)[..., :n, :] for a, n in parts]
                B, H, _, D = arrays[0].shape
                arrays.append(mx.zeros((B, H, capacity - length, D), arrays[0].dtype))
                setattr(cache, name, mx.concatenate(arrays, axis=2))
    parallel = sum(a.nbytes for *_, parts, _ in tasks for a, _ in parts) >= _PARALLEL_BYTES
    for cache, name, dtype, job in [
        (cache, name, dtype, _COPIERS.submit(_assemble, parts, cap, pool) if parallel else _assemble(parts, cap, pool))
        for cache, name, dtype, parts, cap in tasks
    ]:
        buf = job.result() if parallel else job
        setattr(cache, name, from_numpy(buf, dtype))
        pool.give(buf)
    for cache, _, _ in plans:
        cache.offset = length


def evaluate(payloads: Iterable[Any]) -> None:
    """Evaluate the arrays of all payloads (any kind; `None` skipped) in one graph run.

    Until evaluated, a payload is a graph that still references the live buffers.
    """
    arrays = [a for p in payloads if p is not None for a in p.arrays() if isinstance(a, mx.array)]
    if arrays:
        mx.eval(*arrays)
