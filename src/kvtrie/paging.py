"""Tiers, byte budgets and LRU order: which payloads to page out to host, which to evict.

Device payloads are mx.arrays in MLX's allocator; host payloads are numpy buffers
outside it (`kvtrie.arrays.HostArray`). The `Pager` keeps byte counters per tier and
two orders in sorted containers (O(log n) per update): unpinned device nodes by last
use (page-out candidates) and evictable host nodes by last use (a leaf, or an interior
node whose recurrent snapshot can be dropped). It decides; the PrefixCache carries out
the structural part of an eviction (removing a leaf, merging a lone child).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Optional

import mlx.core as mx
from sortedcontainers import SortedList

from .arrays import HostArray, HostPool, to_device, to_host

DEVICE = "device"
HOST = "host"
TIERS = (DEVICE, HOST)


def check_budget(name: str, value: Any) -> Optional[int]:
    """A byte budget is None (unlimited) or a non-negative int."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int number of bytes or None (unlimited), got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name} must be a non-negative number of bytes, got {value}")
    return value


def layers_to_host(layers: Iterable[Any], pool: HostPool) -> tuple[Any, ...]:
    """Copy every payload array to pooled host buffers (all copies first, then one return)."""
    return tuple(None if p is None else p.map(lambda a: to_host(a, pool)) for p in layers)


def layers_to_device(layers: Iterable[Any]) -> tuple[Any, ...]:
    moved = tuple(None if p is None else p.map(to_device) for p in layers)
    arrays = [a for p in moved if p is not None for a in p.arrays()]
    if arrays:
        mx.eval(*arrays)
    return moved


def release(layers: Iterable[Any], pool: HostPool) -> None:
    """Give the host buffers of payloads that are being dropped back to the pool."""
    for p in layers:
        if p is not None:
            for a in p.arrays():
                if isinstance(a, HostArray):
                    pool.give(a.data)


class Pager:
    """Byte counters per tier, budgets, and the LRU orders that pick what moves next."""

    def __init__(self, device_bytes: Optional[int] = None, host_bytes: Optional[int] = None):
        self.device_budget = check_budget("device_bytes", device_bytes)
        self.host_budget = check_budget("host_bytes", host_bytes)
        self.bytes = {DEVICE: 0, HOST: 0}
        self._device = SortedList()  # (last_used, -start, id) of unpinned device nodes
        self._evictable = SortedList()  # same key, unpinned host nodes that can give bytes back
        self._nodes: dict[int, Any] = {}
        self._keys: dict[int, tuple[Optional[tuple], Optional[tuple]]] = {}

    # --- indexing: call `unindex` before changing a node, `index` after ------------------

    def index(self, node: Any, evictable: bool) -> None:
        """Enter `node` into the orders it qualifies for; `evictable` is the caller's structural verdict."""
        if node.parent is None or node.pins:
            return
        key = (node.last_used, -node.start, node.id)
        dev = key if node.payload.tier == DEVICE else None
        ev = key if node.payload.tier == HOST and evictable else None
        if dev is None and ev is None:
            return
        if dev is not None:
            self._device.add(dev)
        if ev is not None:
            self._evictable.add(ev)
        self._nodes[node.id] = node
        self._keys[node.id] = (dev, ev)

    def unindex(self, node: Any) -> None:
        keys = self._keys.pop(node.id, None)
        if keys is None:
            return
        dev, ev = keys
        if dev is not None:
            self._device.remove(dev)
        if ev is not None:
            self._evictable.remove(ev)
        del self._nodes[node.id]

    # --- decisions -----------------------------------------------------------------------

    def over(self, tier: str) -> bool:
        budget = self.device_budget if tier == DEVICE else self.host_budget
        return budget is not None and self.bytes[tier] > budget

    def next_page_out(self) -> Optional[Any]:
        """The least recently used unpinned device node, or None."""
        return self._nodes[self._device[0][2]] if self._device else None

    def next_eviction(self) -> Optional[Any]:
        """The least recently used evictable host node, or None."""
        return self._nodes[self._evictable[0][2]] if self._evictable else None

    def evictable_order(self) -> list[Any]:
        """Evictable host nodes, least recently used first (for tests and debugging)."""
        return [self._nodes[k[2]] for k in self._evictable]
