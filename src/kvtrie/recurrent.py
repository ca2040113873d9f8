"""Whole-state payloads: the state of a layer that cannot be sliced or rewound, at a node's end.

A recurrent layer's state after `p` tokens (conv tail + SSM / gated-delta state) folds in
all of them, so a node stores it only *at its end*, and a prefix is restorable for such a
model only where every such layer has a snapshot. The same rule serves any cache whose
state is not one slice per token (deepseek-v4's compressed window, a cache type a user
registers). The payload is a compact copy of the state tree (lists, tuples, dicts of arrays
and scalars).
"""

from __future__ import annotations

from typing import Any

import attrs
import mlx.core as mx
from mlx.utils import tree_map

from .arrays import AnyArray, HostArray, tree_items


def _is_array(x: Any) -> bool:
    return isinstance(x, (mx.array, HostArray))


@attrs.frozen(eq=False)
class RecurrentPayload:
    """The full state of one layer at a node's end, as a tree whose array leaves are compact."""

    states: Any
    _arrays: tuple = attrs.field(init=False, repr=False)  # the tree's array leaves, flattened once
    nbytes: int = attrs.field(init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        arrays = tuple(a for _, a in tree_items(self.states) if _is_array(a))
        object.__setattr__(self, "_arrays", arrays)
        object.__setattr__(self, "nbytes", sum(a.nbytes for a in arrays))

    @property
    def arrays(self) -> tuple[AnyArray, ...]:
        return self._arrays

    def map(self, fn) -> RecurrentPayload:
        """The same payload with `fn` applied to every state array (e.g. a tier move)."""
        return RecurrentPayload(tree_map(lambda a: fn(a) if _is_array(a) else a, self.states))


def capture_state(tree: Any) -> RecurrentPayload:
    """A compact copy of a state tree (lazy: evaluate with `snapshot.evaluate`).

    `mx.contiguous` gives a new array, compact even when the model left a view of a larger
    buffer, and never the live array itself, so later writes to the live cache cannot
    reach the payload.
    """
    if not any(isinstance(a, mx.array) for _, a in tree_items(tree)):
        raise ValueError("the cache holds no state yet: run the model before capturing")
    return RecurrentPayload(tree_map(lambda a: mx.contiguous(a) if isinstance(a, mx.array) else a, tree))


def state_dtypes(tree: Any) -> tuple[Any, ...]:
    """The dtypes of a state tree's arrays, in order (part of a layer's signature)."""
    return tuple(a.dtype for _, a in tree_items(tree) if isinstance(a, mx.array))
