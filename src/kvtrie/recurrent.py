"""Payloads of layers restorable only at node ends: recurrent state, and whole-state caches.

A recurrent layer's state after `p` tokens (conv tail + SSM / gated-delta state) folds
in all of them and cannot be rewound or sliced, so a node stores it only *at its end*,
and a prefix is restorable for such a model only at a position where every such layer
has a snapshot. The same rule serves other caches whose state is not one slice per
token (mlx-lm's RotatingKVCache window, CacheList, QuantizedKVCache): the payload is a
compact copy of the cache's whole `state` tree, put back with `cache.state = ...`.
"""

from __future__ import annotations

from typing import Any

import attrs
import mlx.core as mx
from mlx.utils import tree_flatten, tree_map

from .arrays import AnyArray, HostArray, to_device


def _is_array(x: Any) -> bool:
    return isinstance(x, (mx.array, HostArray))


@attrs.frozen(eq=False)
class RecurrentPayload:
    """The full state of one layer at a node's end, as the cache's `state` tree (arrays compact)."""

    states: Any

    def arrays(self) -> tuple[AnyArray, ...]:
        return tuple(a for _, a in tree_flatten(self.states) if _is_array(a))

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays())

    def map(self, fn) -> "RecurrentPayload":
        """The same payload with `fn` applied to every state array (e.g. a tier move)."""
        return RecurrentPayload(tree_map(lambda a: fn(a) if _is_array(a) else a, self.states))


@attrs.frozen
class RecurrentSignature:
    """What two caches of the same layer agree on: their type and the dtypes of their arrays.

    Shapes are left out: a rotating window's buffer grows until it is full.
    """

    kind: str
    dtypes: tuple[Any, ...]


def recurrent_signature(cache: Any) -> RecurrentSignature:
    arrays = [a for _, a in tree_flatten(cache.state) if isinstance(a, mx.array)]
    return RecurrentSignature(type(cache).__name__, tuple(a.dtype for a in arrays))


def capture_recurrent(cache: Any) -> RecurrentPayload:
    """A compact copy of the live state (lazy: evaluate with `snapshot.evaluate`).

    `mx.contiguous` gives a new array, compact even when the model left a view of a
    larger buffer, and never the live array itself, so later writes to the live cache
    cannot reach the payload.
    """
    state = cache.state
    if not any(isinstance(a, mx.array) for _, a in tree_flatten(state)):
        raise ValueError(f"{type(cache).__name__} holds no state yet (offset {getattr(cache, 'offset', 0)})")
    return RecurrentPayload(tree_map(lambda a: mx.contiguous(a) if isinstance(a, mx.array) else a, state))


def restore_recurrent(cache: Any, payload: RecurrentPayload, offset: int) -> None:
    """Load a snapshot into a fresh live cache; `offset` is the node end it was taken at."""
    cache.state = tree_map(lambda a: to_device(a) if _is_array(a) else a, payload.states)
    if hasattr(cache, "offset"):
        cache.offset = offset
