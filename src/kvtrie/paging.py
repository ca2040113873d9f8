"""Tiers, byte budgets and the orders that pick what moves down a tier or goes next.

Device payloads are mx.arrays in MLX's allocator; host payloads are numpy buffers outside
it (`kvtrie.arrays.HostArray`); disk payloads are files. The `Pager` keeps byte counters per
tier and, per tier, two orders in sorted containers (O(log n) per update): the unpinned
nodes (candidates to move a tier down) and the evictable ones (a leaf, or an interior node
whose recurrent snapshot can be dropped). The order is the policy's (`kvtrie.policy`); the
storage carries out the structural part of an eviction.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, Optional

import mlx.core as mx
from sortedcontainers import SortedList

from .arrays import HostArray, HostPool, to_device, to_host
from .ledger import DEVICE, DISK, HOST, Ledger

TIERS = (DEVICE, HOST, DISK)


def check_budget(name: str, value: Any) -> Optional[int]:
    """A byte budget is None (unlimited) or a non-negative int."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int number of bytes or None (unlimited), got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name} must be a non-negative number of bytes, got {value}")
    return value


def payloads_to_host(payloads: Iterable[Any], pool: HostPool) -> tuple[Any, ...]:
    """Copy every payload array to pooled host buffers (all copies first, then one return)."""
    return tuple(None if p is None else p.map(lambda a: to_host(a, pool)) for p in payloads)


def payloads_to_device(payloads: Iterable[Any]) -> tuple[Any, ...]:
    moved = tuple(None if p is None else p.map(to_device) for p in payloads)
    arrays = [a for p in moved if p is not None for a in p.arrays]
    if arrays:
        mx.eval(*arrays)
    return moved


def release(payloads: Iterable[Any], pool: HostPool) -> None:
    """Give the host buffers of payloads that are being dropped back to the pool."""
    for p in payloads:
        if p is not None:
            for a in p.arrays:
                if isinstance(a, HostArray):
                    pool.give(a.data)


class Pager:
    """Per tier two orders by `key(node)`: the unpinned nodes (candidates to move a tier down)
    and the evictable ones; the budgets and byte counts are the ledger's (`bytes`: payloads per
    tier; a tier is over when everything held there is past its budget)."""

    def __init__(
        self,
        device_bytes: Optional[int] = None,
        host_bytes: Optional[int] = None,
        disk_bytes: Optional[int] = None,
        key: Optional[Callable[[Any], tuple]] = None,
        ledger: Optional[Ledger] = None,
        deadline: Optional[Callable[[Any], float]] = None,
        now: Optional[Callable[[], float]] = None,
    ):
        if deadline is not None and now is None:
            raise ValueError("a Pager with a deadline needs now (the clock deadlines are on)")
        budgets = {
            DEVICE: check_budget("device_bytes", device_bytes),
            HOST: check_budget("host_bytes", host_bytes),
            DISK: check_budget("disk_bytes", disk_bytes),
        }
        if ledger is None:
            ledger = Ledger(budgets)
        else:
            ledger.budgets.update(budgets)
        self.ledger = ledger
        self.budgets = ledger.budgets
        self.bytes = ledger.payload
        self.key = key or (lambda node: (node.last_used, -node.start, node.id))
        self._movable = {tier: SortedList() for tier in TIERS}
        self._evictable = {tier: SortedList() for tier in TIERS}
        # with `deadline`: the same nodes by the time past which, unused, they are presumed dead
        self.deadline, self.now = deadline, now
        self._dead_movable = {tier: SortedList() for tier in TIERS}
        self._dead_evictable = {tier: SortedList() for tier in TIERS}
        self._nodes: dict[int, Any] = {}
        self._keys: dict[int, tuple[str, tuple, bool, bool, Optional[tuple]]] = {}
        self._blocking: set[int] = set()
        # fair shares (`set_shares`): each tenant's payload bytes per tier, and its own orders,
        # so a tenant past its share of memory is the one whose payloads move and go first
        self.tenant_bytes: dict[str, dict[str, int]] = {}
        self._shares: Optional[Callable[[str], Optional[int]]] = None
        self._tenant_movable: dict[tuple[str, str], SortedList] = {}
        self._tenant_evictable: dict[tuple[str, str], SortedList] = {}
        self._tenant_of: dict[int, str] = {}  # node id -> the tenant it was indexed under

    @property
    def device_budget(self) -> Optional[int]:
        return self.budgets[DEVICE]

    @property
    def host_budget(self) -> Optional[int]:
        return self.budgets[HOST]

    @property
    def bounded(self) -> bool:
        """Some tier has a budget."""
        return any(b is not None for b in self.budgets.values())

    # --- fair shares ---------------------------------------------------------------------

    def set_shares(self, share: Optional[Callable[[str], Optional[int]]]) -> None:
        """`share(tenant)`: the bytes of memory (device + host payloads) a tenant may hold before
        its own payloads move down and go first (None: no share); None turns shares off. Set before
        anything is indexed."""
        if self._nodes:
            raise RuntimeError("set_shares before anything is stored")
        self._shares = share

    def tenant_held(self, tenant: str, tier: str, delta: int) -> None:
        """Count `delta` payload bytes of `tenant` in `tier` (the storage calls it as it accounts)."""
        held = self.tenant_bytes.get(tenant)
        if held is None:
            held = self.tenant_bytes[tenant] = {DEVICE: 0, HOST: 0, DISK: 0}
        held[tier] += delta

    def over_share(self) -> list[str]:
        """Tenants holding more memory than their share, the furthest over first."""
        if self._shares is None:
            return []
        over = []
        for tenant, held in self.tenant_bytes.items():
            share = self._shares(tenant)
            if share is not None and held[DEVICE] + held[HOST] > share:
                over.append((held[DEVICE] + held[HOST] - share, tenant))
        return [t for _, t in sorted(over, reverse=True)]

    def _first_over_share(self, orders: dict[tuple[str, str], SortedList], tier: str) -> tuple[Optional[Any], int]:
        """The first candidate of `tier` (not an open session's leaf) of a tenant past its share,
        and the bytes of those tenants' open sessions' leaves passed over (they go at close)."""
        waiting = 0
        for tenant in self.over_share():
            for key in orders.get((tier, tenant), ()):
                if key[-1] not in self._blocking:
                    return self._nodes[key[-1]], waiting
                waiting += self._nodes[key[-1]].payload.nbytes
        return None, waiting

    # --- indexing: call `unindex` before changing a node, `index` after ------------------

    def index(self, node: Any, evictable: bool, movable: bool = True, blocks: bool = False) -> None:
        """Enter `node` into its tier's orders; `evictable` and `movable` are the caller's verdicts.

        A node that `blocks` (a pinned leaf, under a policy that admits new sequences only where
        they are worth more than what they would push out) takes its place in the eviction order
        without being a candidate: the bytes it will free when its session closes are not taken
        from what comes after it (`eviction`), and once its session closes it is the one that
        goes. (Moves down a tier are not held up: they lose nothing.)
        """
        if blocks:
            evictable = True
            self._blocking.add(node.id)
        if node.parent is None or not (evictable or movable):
            return
        key = (*self.key(node), node.id)
        dead = (self.deadline(node), node.id) if self.deadline is not None and not blocks else None
        tier = node.payload.tier
        if movable:
            self._movable[tier].add(key)
            if dead is not None:
                self._dead_movable[tier].add(dead)
        if evictable:
            self._evictable[tier].add(key)
            if dead is not None:
                self._dead_evictable[tier].add(dead)
        self._nodes[node.id] = node
        self._keys[node.id] = (tier, key, evictable, movable, dead)
        if self._shares is not None:
            tenant = self._tenant_of[node.id] = node.payload.tenant
            if movable:
                self._tenant_movable.setdefault((tier, tenant), SortedList()).add(key)
            if evictable:
                self._tenant_evictable.setdefault((tier, tenant), SortedList()).add(key)

    def unindex(self, node: Any) -> None:
        self._blocking.discard(node.id)
        entry = self._keys.pop(node.id, None)
        if entry is None:
            return
        tier, key, evictable, movable, dead = entry
        if self._shares is not None:
            tenant = self._tenant_of.pop(node.id)
            if movable:
                self._tenant_movable[(tier, tenant)].remove(key)
            if evictable:
                self._tenant_evictable[(tier, tenant)].remove(key)
        if movable:
            self._movable[tier].remove(key)
            if dead is not None:
                self._dead_movable[tier].remove(dead)
        if evictable:
            self._evictable[tier].remove(key)
            if dead is not None:
                self._dead_evictable[tier].remove(dead)
        del self._nodes[node.id]

    # --- decisions -----------------------------------------------------------------------

    def over(self, tier: str) -> bool:
        return self.ledger.over(tier) > 0

    def _first(self, order: SortedList, dead: SortedList) -> tuple[Optional[Any], int]:
        """The most overdue node if one is past its deadline, else the first candidate in the
        policy's order, and the bytes of the blocking nodes that come before it."""
        if dead and self.now is not None and dead[0][0] < self.now():
            return self._nodes[dead[0][-1]], 0
        ahead = 0
        for key in order:
            node = self._nodes[key[-1]]
            if key[-1] not in self._blocking:
                return node, ahead
            ahead += node.payload.nbytes
        return None, ahead

    def next_move(self, tier: str) -> Optional[Any]:
        """The first unpinned node of `tier` in the policy's order (one presumed dead first), or None.
        A tenant past its share moves its own first."""
        if self._shares is not None:
            node = self._first_over_share(self._tenant_movable, tier)[0]
            if node is not None:
                return node
        return self._first(self._movable[tier], self._dead_movable[tier])[0]

    def next_eviction(self, tier: str = HOST) -> Optional[Any]:
        """The first evictable node of `tier` in the policy's order (one presumed dead first), or None."""
        return self.eviction(tier)[0]

    def eviction(self, tier: str) -> tuple[Optional[Any], int]:
        """`next_eviction`, and the bytes of the open sessions' own new leaves that come before it
        in the order (blocking): they go once their sessions close, so up to that many bytes past
        the budget wait for them instead of pushing out what is worth more. A tenant past its
        share loses its own first."""
        if self._shares is None:
            return self._first(self._evictable[tier], self._dead_evictable[tier])
        node, waiting = self._first_over_share(self._tenant_evictable, tier)
        if node is not None:
            return node, 0
        # (a tenant past its share whose open sessions' leaves are all it has: those bytes wait for them too)
        node, ahead = self._first(self._evictable[tier], self._dead_evictable[tier])
        return node, ahead + waiting

    def next_page_out(self) -> Optional[Any]:
        return self.next_move(DEVICE)

    def evictable_order(self, tier: str = HOST) -> Iterator[Any]:
        """Evictable nodes of `tier` in the order they would go, lazily."""
        return (self._nodes[k[-1]] for k in self._evictable[tier])
