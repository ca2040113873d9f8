"""Payloads of transformer (KV) layers: capture, split, merge, stitch, nbytes.

A KV payload holds the keys/values of exactly one node's edge, `[B, H, end-start, D]`,
as compact arrays: slicing an mx.array keeps the whole source buffer alive, so every
payload is made with `mx.contiguous` and evaluated before the live cache it came
from can go away. Live caches are reached only through mlx-lm's duck-typed
protocol (`state`, `offset`, and the `keys`/`values`/`offset` attributes).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import attrs
import mlx.core as mx


@attrs.frozen(eq=False)
class KVPayload:
    """Keys and values of one layer over one edge: arrays of shape `[B, H, length, D]`."""

    keys: mx.array
    values: mx.array

    @property
    def length(self) -> int:
        return self.keys.shape[2]

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes

    def arrays(self) -> tuple[mx.array, mx.array]:
        return self.keys, self.values


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
    """The first `k` positions and the rest, each a compact copy (lazy)."""
    if not 0 < k < payload.length:
        raise ValueError(f"split offset {k} must lie strictly inside a payload of {payload.length} positions")
    keys, values = payload.keys, payload.values
    return (
        KVPayload(mx.contiguous(keys[..., :k, :]), mx.contiguous(values[..., :k, :])),
        KVPayload(mx.contiguous(keys[..., k:, :]), mx.contiguous(values[..., k:, :])),
    )


def merge_kv(upper: KVPayload, lower: KVPayload) -> KVPayload:
    """One payload spanning `upper` then `lower` (lazy)."""
    return KVPayload(
        mx.concatenate([upper.keys, lower.keys], axis=2),
        mx.concatenate([upper.values, lower.values], axis=2),
    )


def stitch_kv(cache: Any, parts: Sequence[KVPayload], length: int) -> None:
    """Load the first `length` positions of the concatenated `parts` into a fresh live cache.

    One concatenation per tensor, which also appends zeroed room up to the cache's next
    step boundary so the following prefill does not regrow the buffer; the result never
    aliases a payload, so the live cache may be written in place.
    """
    if length <= 0:
        return
    keys: list[mx.array] = []
    values: list[mx.array] = []
    left = length
    for p in parts:
        n = min(left, p.length)
        keys.append(p.keys if n == p.length else p.keys[..., :n, :])
        values.append(p.values if n == p.length else p.values[..., :n, :])
        left -= n
        if left == 0:
            break
    if left:
        raise ValueError(f"payloads cover {length - left} positions, {length} were asked for")
    step = int(getattr(cache, "step", 256))
    room = step - length % step
    B, H, _, dk = keys[0].shape
    dv = values[0].shape[3]
    keys.append(mx.zeros((B, H, room, dk), keys[0].dtype))
    values.append(mx.zeros((B, H, room, dv), values[0].dtype))
    cache.keys = mx.concatenate(keys, axis=2)
    cache.values = mx.concatenate(values, axis=2)
    cache.offset = length


def evaluate(payloads: Iterable[Any]) -> None:
    """Evaluate the arrays of all payloads (any kind; `None` skipped) in one graph run.

    Until evaluated, a payload is a graph that still references the live buffers.
    """
    arrays = [a for p in payloads if p is not None for a in p.arrays()]
    if arrays:
        mx.eval(*arrays)
