"""The memory ledger: every byte kvtrie holds in memory, by holder and tier, against the budgets.

"Bounded in bytes" means the process, not the payloads alone. Each holder of bytes reports
here: the stored payloads per tier (pushed by the storage, exact), hot sessions' live caches,
recycled live arrays, the host pool's free buffers, copies in flight to the disk writer and the
shared tier, and MLX's buffer cache where kvtrie sets its limit. The device budget bounds
what is held in the device tier (MLX's allocator), the host budget what is held in host memory.

Under pressure the cheapest to lose goes first: `reclaim` asks the holders in the order they
were registered (MLX's buffer cache and the free pool, then recycled arrays, then hot
sessions); payloads go last, in the policy's order, moved or evicted by the storage. The live
caches of open sessions are the working set: reported apart (`in_use`), never reclaimed.

Memory given back is returned to the operating system where the C library keeps freed blocks
(glibc): `heap.trim_heap` after large releases. This module never imports mlx.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Optional

import attrs

from .heap import trim_heap

DEVICE, HOST, DISK = "device", "host", "disk"  # (paging.py's names: this module sits below it)

PAYLOAD = "payload"  # stored payloads of the trie's nodes
HOT = "hot"  # live caches of recently committed sessions, kept for a continuation
RECYCLED = "recycled"  # live arrays of closed sessions, kept for the next restores to write into
POOL = "pool"  # free host buffers kept for the next page-outs
IN_FLIGHT = "in_flight"  # copies the disk writer and the shared-tier publisher still hold
MLX_CACHE = "mlx_cache"  # freed buffers MLX keeps for reuse, where kvtrie sets the limit
HOLDERS = (PAYLOAD, HOT, RECYCLED, POOL, IN_FLIGHT, MLX_CACHE)

TRIM_AFTER = 32 << 20  # released bytes after which the C heap is trimmed


@attrs.define(slots=True, eq=False)
class Holder:
    """Bytes kept by one part of kvtrie in one tier: how many (`nbytes()`), and how to give some
    back (`release(excess)` frees at least `excess` bytes if it can and returns what it freed;
    None: nothing to give back on demand, e.g. copies in flight)."""

    name: str
    tier: str
    nbytes: Callable[[], int]
    release: Optional[Callable[[int], int]] = None


class Ledger:
    """Budgets per tier, the payloads' bytes per tier, and the other holders (see the module docstring).

    `budgets` maps a tier to its byte budget (None: unlimited); the storage adds and removes
    payload bytes in `payload`; other holders are registered with `register`, in the order
    they are reclaimed. Counters pushed from other threads go through `add` (locked).
    """

    def __init__(self, budgets: dict[str, Optional[int]]):
        self.budgets = budgets
        self.payload = {DEVICE: 0, HOST: 0, DISK: 0}
        self._holders: list[Holder] = []
        self._pushed: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()
        self._released = 0  # bytes given back since the heap was last trimmed
        self.trims = 0

    # --- reporting ---------------------------------------------------------------------------

    def register(
        self, name: str, tier: str, nbytes: Callable[[], int], release: Optional[Callable[[int], int]] = None
    ) -> None:
        """Add a holder; holders are reclaimed in the order they were registered."""
        if name not in HOLDERS or name == PAYLOAD:
            raise ValueError(f"unknown holder {name!r}: one of {HOLDERS[1:]}")
        self._holders.append(Holder(name, tier, nbytes, release))

    def add(self, name: str, tier: str, delta: int) -> None:
        """Change a pushed counter (`in_flight` copies, from any thread)."""
        key = (name, tier)
        with self._lock:
            self._pushed[key] = self._pushed.get(key, 0) + delta

    def pushed(self, name: str, tier: str) -> int:
        return self._pushed.get((name, tier), 0)

    def register_pushed(self, name: str, tier: str) -> None:
        """A holder whose bytes are pushed with `add` (it cannot give bytes back on demand)."""
        self.register(name, tier, lambda: self._pushed.get((name, tier), 0))

    # --- reading -----------------------------------------------------------------------------

    def held(self, tier: str) -> int:
        """Every byte held in `tier`: its payloads and every holder there."""
        return self.payload[tier] + sum(h.nbytes() for h in self._holders if h.tier == tier)

    def breakdown(self) -> dict[str, dict[str, int]]:
        """`{holder: {tier: bytes}}` for the memory tiers (device, host)."""
        out = {name: {DEVICE: 0, HOST: 0} for name in HOLDERS}
        for tier in (DEVICE, HOST):
            out[PAYLOAD][tier] = self.payload[tier]
        for h in self._holders:
            out[h.name][h.tier] += h.nbytes()
        return out

    def over(self, tier: str) -> int:
        """Bytes held in `tier` beyond its budget (0 within it or without one)."""
        budget = self.budgets[tier]
        if budget is None:
            return 0
        held = self.payload[tier] if tier == DISK else self.held(tier)
        return max(held - budget, 0)

    def room(self, tier: str, name: str) -> Optional[int]:
        """What holder `name` may keep in `tier` within the budget besides everything else held
        there (None: the tier is unlimited)."""
        budget = self.budgets[tier]
        if budget is None:
            return None
        others = self.payload[tier] + sum(h.nbytes() for h in self._holders if h.tier == tier and h.name != name)
        return max(budget - others, 0)

    # --- pressure ----------------------------------------------------------------------------

    def reclaim(self, tier: str) -> int:
        """Take bytes back from the holders of `tier` (cheapest first) until it is within its
        budget or none can give more; returns the bytes freed (payloads are the caller's)."""
        freed = 0
        for h in self._holders:
            if h.tier != tier or h.release is None:
                continue
            excess = self.over(tier)
            if excess <= 0:
                break
            if h.nbytes() > 0:
                freed += h.release(excess)
        self.released(freed)
        return freed

    def released(self, nbytes: int) -> None:
        """`nbytes` went back to the allocator; past `TRIM_AFTER` the C heap is trimmed so the
        operating system gets them back."""
        self._released += nbytes
        if self._released >= TRIM_AFTER:
            self._released = 0
            if trim_heap():
                self.trims += 1
