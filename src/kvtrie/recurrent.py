"""Payloads of recurrent layers (conv tail + SSM / gated-delta state): whole state, never split.

A recurrent layer's state after `p` tokens folds in all of them and cannot be rewound
or sliced, so a node stores it only *at its end*, and a prefix is restorable for a
hybrid model only at a position where every recurrent layer has such a snapshot.
Live caches are reached through the duck-typed protocol: `cache.state` is the list
of state arrays, `cache.offset` the positions absorbed.
"""

from __future__ import annotations

from typing import Any, Optional

import attrs
import mlx.core as mx

from .arrays import AnyArray, to_device


@attrs.frozen(eq=False)
class RecurrentPayload:
    """The full state of one recurrent layer at a node's end (`None` entries stay `None`)."""

    states: tuple[Optional[AnyArray], ...]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.states if a is not None)

    def arrays(self) -> tuple[AnyArray, ...]:
        return tuple(a for a in self.states if a is not None)

    def map(self, fn) -> "RecurrentPayload":
        """The same payload with `fn` applied to every state array (e.g. a tier move)."""
        return RecurrentPayload(tuple(None if a is None else fn(a) for a in self.states))


@attrs.frozen
class RecurrentSignature:
    """What two caches of the same recurrent layer agree on: shapes and dtypes of the state."""

    shapes: tuple[Optional[tuple[int, ...]], ...]
    dtypes: tuple[Any, ...]


def is_recurrent(cache: Any) -> bool:
    """A live cache is recurrent when it cannot append keys/values (no `update_and_fetch`)."""
    return not hasattr(cache, "update_and_fetch")


def recurrent_signature(cache: Any) -> RecurrentSignature:
    states = list(cache.state)
    return RecurrentSignature(
        tuple(None if a is None else tuple(a.shape) for a in states),
        tuple(None if a is None else a.dtype for a in states),
    )


def capture_recurrent(cache: Any) -> RecurrentPayload:
    """A compact copy of the live state (lazy: evaluate with `evaluate`).

    `mx.contiguous` gives a new array, compact even when the model left a view of a
    larger buffer, and never the live array itself, so later writes to the live cache
    cannot reach the payload.
    """
    states = list(cache.state)
    if all(a is None for a in states):
        raise ValueError(f"{type(cache).__name__} holds no state yet (offset {getattr(cache, 'offset', 0)})")
    return RecurrentPayload(tuple(None if a is None else mx.contiguous(a) for a in states))


def restore_recurrent(cache: Any, payload: RecurrentPayload, offset: int) -> None:
    """Load a snapshot into a fresh live cache; `offset` is the node end it was taken at."""
    cache.state = [None if a is None else to_device(a) for a in payload.states]
    if hasattr(cache, "offset"):
        cache.offset = offset

