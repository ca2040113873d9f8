"""User pins: stored prefixes kept regardless of the eviction policy, until unpinned or expired.

A `Pin` holds the node where its prefix ends; the storage's path pins (the refcounts open
sessions use) keep every node of that path from moving or going, and the end node's recurrent
snapshot from being dropped. `Pins` is the registry: pins by the tokens they were asked for,
expiry, the order they give way in when budgets shrink (the soonest to expire first, pins
without a ttl last, older before newer), and the bytes their paths hold per tier (paths that
share a prefix count it once). Pure Python + numpy: never imports mlx.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator
from typing import Any, Optional

import attrs
import numpy as np

from .trie import Node


@attrs.define(eq=False)
class Pin:
    """One pin: `tokens` (the pinned prefix) of `namespace`, ending at `node`, asked for with `key`."""

    namespace: str
    key: bytes  # the tokens `pin` was given (unpin finds the pin by them)
    tokens: np.ndarray  # the prefix kept: what was stored of them
    node: Node  # the node ending where the prefix ends (its identity survives splits)
    expires: Optional[float]  # clock time it goes (None: until unpinned)
    order: int

    @property
    def give_way(self) -> tuple:
        """Sort key of the order pins go in when budgets shrink: the soonest to expire first."""
        return (self.expires is None, self.expires if self.expires is not None else 0.0, self.order)

    def covered_by(self, prefix: np.ndarray) -> bool:
        """The pinned prefix begins with `prefix` (a clear of `prefix` takes it)."""
        n = len(prefix)
        return len(self.tokens) >= n and self.tokens[:n].tobytes() == prefix.tobytes()


class Pins:
    """The pins of one PrefixCache (see the module docstring); the facade calls it under its lock."""

    def __init__(self, clock: Callable[[], float]):
        self.clock = clock
        self._pins: dict[tuple[str, bytes], Pin] = {}
        self._order = itertools.count()
        self.next_expiry = math.inf

    def __len__(self) -> int:
        return len(self._pins)

    def __iter__(self) -> Iterator[Pin]:
        return iter(list(self._pins.values()))

    def get(self, namespace: str, key: bytes) -> Optional[Pin]:
        return self._pins.get((namespace, key))

    def new(self, namespace: str, key: bytes, tokens: np.ndarray, node: Node, ttl: Optional[float]) -> Pin:
        """Register a pin (replacing one asked for with the same tokens)."""
        expires = None if ttl is None else self.clock() + ttl
        pin = Pin(namespace, key, tokens, node, expires, next(self._order))
        self._pins[(namespace, key)] = pin
        if expires is not None:
            self.next_expiry = min(self.next_expiry, expires)
        return pin

    def remove(self, pin: Pin) -> None:
        del self._pins[(pin.namespace, pin.key)]
        if pin.expires is not None and pin.expires <= self.next_expiry:
            self.next_expiry = min((p.expires for p in self._pins.values() if p.expires is not None), default=math.inf)

    def due(self) -> list[Pin]:
        """The pins whose ttl has passed (cheap when none has: one clock read)."""
        if self.next_expiry > self.clock():
            return []
        now = self.clock()
        return [p for p in self._pins.values() if p.expires is not None and p.expires <= now]

    def give_way_order(self) -> list[Pin]:
        """Every pin, in the order they go when budgets shrink."""
        return sorted(self._pins.values(), key=lambda p: p.give_way)

    def nodes(self, exclude: Optional[Pin] = None) -> dict[int, Node]:
        """Every node on a pinned path (by id), each once."""
        out: dict[int, Node] = {}
        for pin in self._pins.values():
            if pin is exclude:
                continue
            node: Optional[Node] = pin.node
            while node is not None and node.parent is not None and node.id not in out:
                out[node.id] = node
                node = node.parent
        return out


def check_ttl(ttl: Any) -> Optional[float]:
    """A pin's ttl: None (until unpinned) or a positive, finite number of seconds."""
    if ttl is None:
        return None
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)):
        raise TypeError(f"ttl must be a number of seconds or None (until unpinned), got {type(ttl).__name__}")
    if not (ttl > 0 and math.isfinite(ttl)):
        raise ValueError(f"ttl must be a positive, finite number of seconds, got {ttl!r}")
    return float(ttl)


def held_bytes(nodes: dict[int, Node], tier_of: Callable[[Any], str] = lambda n: n.payload.tier) -> dict[str, int]:
    """Bytes of `nodes`' payloads per tier (`tier_of` says where each counts)."""
    out: dict[str, int] = {}
    for node in nodes.values():
        tier = tier_of(node)
        out[tier] = out.get(tier, 0) + node.payload.nbytes
    return out
