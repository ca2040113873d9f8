"""Where node payloads live and how they change: the tries, the memory tiers, eviction.

`TieredStorage` is the PrefixCache's store: it owns the tries (one per namespace), adds,
splits and merges nodes with their payloads, attaches and drops recurrent snapshots, moves
payloads between tiers (page-out, page-in; write-back and fault-in through the disk tier),
and evicts leaf-first. The `Pager` (paging.py) keeps the byte counters and the orders that
pick what moves next, in the policy's order (policy.py). The disk tier's records (which
record holds what, writing, reading, the start-up rebuild) are `DiskTier`'s (persistence.py),
which edits the tries only through the few methods of this class its `TrieHost` names; what
a node stores is `NodeData` (nodedata.py). The facade calls it under its lock; nothing here
takes a lock.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator, Sequence
from typing import Any, Literal, Optional, overload

import attrs
import numpy as np

from .arrays import AnyArray, HostPool, to_device, to_host
from .counters import Counters
from .disk import DiskRef, DiskStore
from .layers import STATE
from .ledger import POOL
from .nodedata import LayerPayload, Logits, NodeData, everything, split_segments
from .paging import DEVICE, DISK, HOST, Pager, payloads_to_host, release
from .persistence import DiskTier
from .policy import WorthPolicy
from .recurrent import RecurrentPayload
from .snapshot import KVPayload, evaluate, merge_kv, split_kv
from .tenants import DEFAULT_TENANT, tenant_of
from .trie import Match, Node, Trie

logger = logging.getLogger("kvtrie")


class TieredStorage:
    """The tries and where their payloads live (see the module docstring)."""

    def __init__(
        self,
        kinds: tuple[str, ...],
        pager: Pager,
        policy: WorthPolicy,
        counters: Counters,
        disk: Optional[DiskStore] = None,
        fingerprint: Optional[str] = None,
        layout: Sequence[str] = (),
    ):
        self.kinds = kinds
        self.hybrid = STATE in kinds
        self.tries: dict[str, Trie] = {}
        self.pager = pager
        self.policy = policy
        self.counters = counters
        self.pool = HostPool(room=self._pool_room)
        self.host_peak = 0
        self._moved = 0  # bytes moved down a tier by the running `enforce` (freed in the tier above)
        self.disk: Optional[DiskTier] = None  # the disk tier's records, writes and reads (None: no disk tier)
        if disk is not None:
            self.disk = DiskTier(disk, self, kinds, self.pool, counters, pager.ledger, fingerprint, layout)
        self.clock = itertools.count(1)
        self.kv_bytes = 0
        self.snapshot_bytes = 0
        self.snapshots = 0  # nodes where a hybrid model can restore
        self.kept: dict[
            int, int
        ] = {}  # node id -> user pins ending there (`hold`): its snapshot stays, it never blocks
        self._tenants: dict[int, str] = {}  # a trie's root id -> the tenant of its namespace
        self.held: dict[
            int, int
        ] = {}  # node id -> user pins whose path passes through it (`hold`), ending there or below

    # --- structure ---------------------------------------------------------------------------

    @overload
    def trie(self, namespace: str, create: Literal[True]) -> Trie: ...

    @overload
    def trie(self, namespace: str, create: bool = False) -> Optional[Trie]: ...

    def trie(self, namespace: str, create: bool = False) -> Optional[Trie]:
        """The namespace's trie; None if it has none, unless `create`."""
        trie = self.tries.get(namespace)
        if trie is None and create:
            trie = self.tries[namespace] = Trie(self._split_data, self._merge_data)
            self._tenants[trie.root.id] = tenant_of(namespace)
        return trie

    def walk(self) -> Iterator[tuple[str, Node, int]]:
        for ns in sorted(self.tries):
            for node, depth in self.tries[ns].walk():
                yield ns, node, depth

    def new_data(self, layers: tuple[LayerPayload, ...]) -> NodeData:
        return NodeData(layers, self.kinds)

    def add(self, trie: Trie, parent: Node, tokens: np.ndarray, data: NodeData) -> Node:
        """Hang a new device-tier node under `parent` and account for it."""
        data.tenant = self.tenant_of_trie(trie)
        node = trie.add_child(parent, tokens, data)
        self.account(data, +1)
        if data.layers and node.end > node.start:
            kv = data.nbytes - data.snapshot_nbytes
            if kv and not self.policy.kv_bytes_per_token:
                self.policy.kv_bytes_per_token = kv / (node.end - node.start)
        self.reindex(node)
        self.restructured(parent)
        self._changed(node)
        return node

    def split(self, trie: Trie, node: Node, at: int) -> Node:
        before = node.payload
        self.account(before, -1)
        upper = trie.split(node, at)
        if node.id in self.held:  # (the upper part lies on the same pinned paths)
            self.held[upper.id] = self.held[node.id]
        self.account(upper.payload, +1)
        self.account(node.payload, +1)
        if self.disk is not None:
            self.disk.split(before, upper, node)
        self.reindex(upper, node)
        return upper

    def boundary(self, trie: Trie, arr: np.ndarray, offset: int) -> Node:
        """The node on `arr`'s stored path that ends exactly at `offset`, splitting an edge if needed."""
        node = trie.match(arr[:offset]).last
        assert node is not None, "the path to `offset` is stored"
        return self.split(trie, node, offset) if node.end > offset else node

    def attach(
        self, node: Node, snapshot: Sequence[RecurrentPayload], logits: Optional[AnyArray], reasons: int
    ) -> bool:
        """Give `node` the snapshot taken at its end (and its logits) unless it has one; True if stored."""
        data = node.payload
        data.reasons |= reasons
        if data.tier == DISK or (data.has_state and (logits is None or data.logits is not None)):
            self.rekey_below(node)
            return False
        self.account(data, -1)
        if self.disk is not None:
            self.disk.release_state(data)  # the logits join the state: a new record holds both
        layers = list(data.layers)
        states = iter(snapshot)
        new = not data.has_state
        for i, kind in enumerate(self.kinds):
            if kind == STATE:
                payload = next(states)
                if layers[i] is None:
                    (layers[i],) = payloads_to_host([payload], self.pool) if data.tier == HOST else (payload,)
        data.layers = tuple(layers)
        if logits is not None and data.logits is None:
            data.logits = to_host(logits, self.pool) if data.tier == HOST else logits
        self.account(data, +1)
        self.counters.snapshots_made += new
        self.rekey_below(node)
        self._changed(node)
        return new

    def drop_snapshot(self, node: Node) -> None:
        """Drop the recurrent snapshot (and logits) at an interior node's end; its KV stays."""
        data = node.payload
        self.policy.forget(node)
        if data.layers is None or not data.has_snapshot or node.id in self.kept:
            return  # (a pinned prefix's own snapshot is what makes it restorable)
        had = data.has_state
        self.account(data, -1)
        if self.disk is not None:
            self.disk.release_state(data)
        dropped = [p for p, k in zip(data.layers, self.kinds) if k == STATE and p is not None]
        data.layers = tuple(None if k == STATE else p for p, k in zip(data.layers, self.kinds))
        if data.logits is not None:
            dropped.append(Logits(data.logits))
            data.logits = None
        release(dropped, self.pool)
        self.counters.snapshots_dropped += had
        self.account(data, +1)
        self.rekey_below(node)

    # --- payload callbacks for the trie --------------------------------------------------

    def _split_data(self, data: NodeData, k: int) -> tuple[NodeData, NodeData]:
        """Per-token payloads (and the records holding them) split at `k`; a recurrent snapshot
        and logits stay with the lower part."""
        top, bottom = split_segments(data.segments, k)
        if data.layers is None:  # on disk: only the records' references split
            n = sum(seg.length for seg in data.segments)
            ref = data.on_disk
            per_token = (ref.nbytes - ref.snapshot_nbytes) // n
            return (
                NodeData(
                    None,
                    self.kinds,
                    DISK,
                    DiskRef(per_token * k, 0, not self.hybrid, False),
                    base=data.base,
                    interval=data.interval,
                    expect=data.expect,
                    segments=top,
                    tenant=data.tenant,
                ),
                attrs.evolve(
                    data,
                    disk=DiskRef(ref.nbytes - per_token * k, ref.snapshot_nbytes, ref.has_state, ref.has_snapshot),
                    segments=bottom,
                ),
            )
        upper: list[LayerPayload] = []
        lower: list[LayerPayload] = []
        for p, kind in zip(data.layers, self.kinds):
            if kind == STATE or not isinstance(p, KVPayload):
                a, b = None, p
            else:
                a, b = split_kv(p, k)
            upper.append(a)
            lower.append(b)
        evaluate(upper + lower)
        release([p for p, kind in zip(data.layers, self.kinds) if kind != STATE], self.pool)
        return (
            NodeData(
                tuple(upper),
                self.kinds,
                data.tier,
                base=data.base,
                interval=data.interval,
                expect=data.expect,
                segments=top,
                tenant=data.tenant,
            ),
            attrs.evolve(data, layers=tuple(lower), segments=bottom),
        )

    def _merge_data(self, upper: NodeData, lower: NodeData) -> NodeData:
        """Per-token payloads concatenate (a hole in either half is a hole in both); the upper
        node's snapshot (mid-edge now) is dropped."""
        merged: list[LayerPayload] = []
        for a, b, kind in zip(upper.in_memory, lower.in_memory, self.kinds):
            if kind == STATE:
                merged.append(b)
            elif not isinstance(a, KVPayload) or not isinstance(b, KVPayload):
                merged.append(None)
            else:
                merged.append(merge_kv(a, b))
        evaluate(merged)
        release(upper.in_memory, self.pool)
        if upper.logits is not None:
            release([Logits(upper.logits)], self.pool)
        release([p for p, kind in zip(lower.in_memory, self.kinds) if kind != STATE], self.pool)
        covered = upper.segments and lower.segments  # a merged edge is in records only if both halves were
        return attrs.evolve(lower, layers=tuple(merged), segments=upper.segments + lower.segments if covered else ())

    # --- paging and eviction -------------------------------------------------------------

    def _evictable(self, node: Node) -> bool:
        if node.payload.tier == DISK:  # a file is dropped whole: leaves only
            return node.is_leaf
        return node.is_leaf or (self.hybrid and node.payload.has_snapshot)

    def reindex(self, *nodes: Node) -> None:
        """Re-enter nodes into the orders. A pinned node never moves or goes, but a speculative
        snapshot on it may still be dropped (the session holds its own live state), unless a
        user pin ends there; so may any snapshot on a user pin's path above its end (the pin
        keeps that path's KV and its end's snapshot, nothing else: held for good, such a
        snapshot would pass the budgets in the pin's name). A leaf a user pin holds never
        blocks (it is not about to go)."""
        for node in nodes:
            self.pager.unindex(node)
            if node.parent is not None:
                if node.pins:
                    kept = node.id in self.kept
                    droppable = (
                        not kept
                        and node.payload.tier != DISK
                        and (
                            self.policy.speculative(node)
                            or (self.hybrid and node.id in self.held and node.payload.has_snapshot)
                        )
                    )
                    blocks = self.policy.admits and node.is_leaf and not kept
                    self.pager.index(node, droppable, movable=False, blocks=blocks)
                else:
                    self.pager.index(node, self._evictable(node))
                self.policy.rekey(node)

    def rekey_below(self, node: Node) -> None:
        """Re-key the nodes whose worth depends on `node`'s snapshot: its descendants down to the
        next snapshot that is not a guess (and `node` itself)."""
        self.reindex(node)
        if not self.hybrid:
            return
        stack = list(node.children.values())
        while stack:
            child = stack.pop()
            self.reindex(child)
            if not child.payload.has_state or not self.policy.is_proven(child):  # worth looks past these
                stack.extend(child.children.values())

    def restructured(self, node: Node) -> None:
        """`node` gained or lost a child: re-key it (a leaf or branch point is worth more) and those below it."""
        if node.parent is not None:
            self.rekey_below(node)

    def require_disk(self) -> DiskTier:
        """The disk tier, for what runs only with one."""
        if self.disk is None:
            raise RuntimeError("this cache has no disk tier (disk_dir)")
        return self.disk

    def tiers(self) -> tuple[str, ...]:
        """The tiers payloads move down through. A tier below the device with a zero budget (and
        nothing in it) is left out: what would move there is evicted from the tier above."""
        chain = (DEVICE, HOST, DISK) if self.disk is not None else (DEVICE, HOST)
        pager = self.pager
        return tuple(t for t in chain if t == DEVICE or pager.budgets[t] != 0 or pager.bytes[t] > 0)

    def move(self, node: Node, tier: str) -> None:
        """Move a node's payloads one tier (device <-> host, host -> disk) and account for it."""
        data = node.payload
        if tier == DISK:
            disk = self.require_disk()
            if not disk.accepts(node):  # the disk tier is degraded and the node has no record
                self._drop_unwritable(node)
                return
            if data.tier == DEVICE:  # a host tier with no budget is skipped: through host memory
                self.move(node, HOST)
            disk.write_back(node)
            return
        self.account(data, -1)
        if tier == HOST:
            node.payload = data.with_host_arrays(self.pool)
            self.counters.page_outs += 1
        else:
            moved = data.with_arrays(to_device, DEVICE)
            evaluate(everything(moved))
            release(everything(data), self.pool)
            node.payload = moved
        self.account(node.payload, +1)
        self.reindex(node)

    def _drop_unwritable(self, node: Node) -> None:
        """`node` should leave memory for the disk tier but cannot be written (the tier is degraded):
        it goes as an ordinary eviction, from the tier it is in (a hybrid node first loses its
        snapshot, and comes up again); an interior node goes with what hangs below it (the policy
        sent those down first; none is pinned, as pins reach every ancestor)."""
        if node.is_leaf or (self.hybrid and node.payload.has_snapshot):  # (a snapshot goes first, then the node)
            TieredStorage.evict(self, node)
            return
        stack, gone = [node], []
        while stack:
            n = stack.pop()
            gone.append(n)
            stack.extend(n.children.values())
        self.counters.evictions += len(gone)
        self.counters.evicted_tokens += sum(len(n.tokens) for n in gone)
        logger.debug("evict [%d, %d) and %d below it: the disk tier is degraded", node.start, node.end, len(gone) - 1)
        self.drop_subtree(node)

    def enforce(self) -> None:
        """Move down and evict in the policy's order until every budget holds (or only pinned nodes are left).

        Over a tier's budget its first unpinned node moves one tier down (where only pinned
        nodes are left, the first snapshot that may go of theirs is dropped: see `reindex`);
        over the last tier's budget the first evictable node goes, and a node that waits for
        its children (still in upper tiers) makes them move first.
        """
        pager = self.pager
        if not any(pager.over(t) for t in pager.budgets):
            return  # every budget holds: nothing to do (the common case)
        ledger = pager.ledger
        freed = sum(pager.bytes[t] for t in (DEVICE, HOST))
        self._enforce(pager, ledger)
        # what left memory goes back to the operating system (the C heap is trimmed now and then)
        ledger.released(max(freed - sum(pager.bytes[t] for t in (DEVICE, HOST)), 0) + self._moved)
        self._moved = 0

    def _enforce(self, pager: Pager, ledger: Any) -> None:
        for tier in (DEVICE, HOST):  # the cheap holders first, in every tier (one left out of the chain too)
            if pager.over(tier):
                ledger.reclaim(tier)
        chain = self.tiers()
        progress = True
        while progress:
            progress = False
            for upper, lower in zip(chain, chain[1:]):
                while pager.over(upper):
                    ledger.reclaim(upper)  # the cheap holders first: buffer caches, free pools, recycled, hot
                    if not pager.over(upper):
                        break
                    node = pager.next_move(upper)
                    if node is None:  # only pinned payloads are left here: what may go of them is a snapshot
                        node = pager.next_eviction(upper)  # (see `reindex`; they never move down a tier)
                        if node is None:
                            break
                        self.policy.removed(node)
                        self.evict(node)
                        progress = True
                        continue
                    self.policy.removed(node)
                    self._moved += node.payload.nbytes
                    self.move(node, lower)
                    progress = True
            last = chain[-1]
            if pager.over(last):
                ledger.reclaim(last)
            while pager.over(last):
                node, waiting = pager.eviction(last)
                if ledger.over(last) <= waiting:  # open sessions' new sequences come first: they go at close
                    break
                if node is not None:
                    self.policy.removed(node)
                    self.evict(node)
                    progress = True
                    continue
                above = next((t for t in reversed(chain[:-1]) if pager.next_move(t) is not None), None)
                if above is None:
                    break
                # the last tier holds only nodes waiting for their children: send a leaf down
                # (it can go from there), else whatever comes first
                leaf = next((n for n in pager.evictable_order(above) if n.is_leaf and not n.pins), None)
                first = leaf or pager.next_move(above)
                assert first is not None  # (`above` was picked for having one)
                self.move(first, chain[chain.index(above) + 1])
                progress = True

    def evict(self, node: Node) -> None:
        """Free what `node` holds: a leaf goes; an interior node drops its recurrent snapshot."""
        data = node.payload
        parent = node.up  # (the root is never evicted)
        if node.is_leaf:
            self.counters.evictions += 1
            self.counters.evicted_tokens += len(node.tokens)
            logger.debug("evict [%d, %d) %d B from %s", node.start, node.end, data.nbytes, data.tier)
            self.forget(node)
            self.restructured(parent)
            if not parent.is_root and len(parent.children) == 1 and not parent.payload.has_snapshot:
                self._merge(parent)  # keep the trie a radix trie: no lone-child chains
            return
        if len(node.children) == 1 and self._merge(node):
            return
        self.drop_snapshot(node)

    def forget(self, node: Node) -> None:
        """Remove a leaf and everything it holds (memory, file, a write in flight)."""
        data = node.payload
        self.counters.snapshots_dropped += self.hybrid and data.has_state
        self.policy.forget(node)
        self.policy.gone(node)
        self.pager.unindex(node)
        self.trie_of(node).remove_leaf(node)
        writing = self.disk.forget(node) if self.disk is not None else False
        self.account(data, -1)  # (first: the pool keeps the buffers only where the budget has room)
        if data.layers is not None and not writing:
            release(everything(data), self.pool)  # (arrays the writer still reads go when it is done)

    def _merge(self, node: Node) -> bool:
        """Fold a lone-child node into its child when both are unpinned and in the same memory tier
        (and, where the policy stores sequences in chunks, the two fit in one)."""
        (child,) = node.children.values()
        if node.pins or child.pins or node.payload.tier != child.payload.tier or node.payload.tier == DISK:
            return False
        chunk = self.policy.chunk_tokens
        if chunk and child.end - node.start > chunk:
            return False
        self.policy.forget(node)
        self.policy.gone(node)
        self.counters.snapshots_dropped += self.hybrid and node.payload.has_state
        self.account(node.payload, -1)
        self.account(child.payload, -1)
        self.pager.unindex(node)
        self.pager.unindex(child)
        before = (node.payload, child.payload)
        merged = self.trie_of(node).merge(node)
        if self.disk is not None:
            self.disk.merged(node, before, merged)
        self.account(merged.payload, +1)
        self.restructured(merged)
        return True

    def shrink(self, max_sequences: Optional[int], max_bytes: Optional[int]) -> None:
        """Evict in the policy's order until at most `max_sequences` leaves / `max_bytes` bytes remain."""
        pager = self.pager
        while (max_bytes is not None and sum(pager.bytes.values()) > max_bytes) or (
            max_sequences is not None and self.num_sequences > max_sequences
        ):
            candidates = [n for n in (pager.next_eviction(t) for t in self.tiers()) if n is not None]
            if not candidates:
                break
            node = min(candidates, key=lambda n: pager.key(n))
            self.policy.removed(node)
            self.evict(node)

    @property
    def num_sequences(self) -> int:
        return sum(t.num_leaves for t in self.tries.values())

    # --- bookkeeping ---------------------------------------------------------------------

    def account(self, data: NodeData, sign: int) -> None:
        """Add (+1) or remove (-1) a payload's bytes in its tier's and its kind's counters."""
        nbytes, snap = data.nbytes, data.snapshot_nbytes
        self.pager.bytes[data.tier] += sign * nbytes
        self.pager.tenant_held(data.tenant, data.tier, sign * nbytes)
        if data.tier == HOST:
            self.host_peak = max(self.host_peak, self.pager.bytes[HOST])
        self.snapshot_bytes += sign * snap
        self.kv_bytes += sign * (nbytes - snap)
        self.snapshots += sign * (self.hybrid and data.has_state)

    def _pool_room(self) -> int:
        """Free host buffers kept for reuse: what the host budget leaves besides everything else
        held in host memory (the ledger's room), or with no host budget 256 MiB, or more where
        the host tier held more at its peak than it does now."""
        room = self.pager.ledger.room(HOST, POOL)
        if room is not None:
            return room
        return max(self.host_peak - self.pager.bytes[HOST], 256 << 20)

    def pin(self, leaf: Optional[Node], delta: int, reindex: bool = True) -> None:
        """Pin (+1) or unpin (-1) `leaf`'s path; `reindex=False` when the caller re-enters those nodes itself."""
        node = leaf
        while node is not None and node.parent is not None:
            node.pins += delta
            if reindex:
                self.reindex(node)
            node = node.parent

    def hold(self, node: Node, delta: int) -> None:
        """A user pin ending at `node` starts (+1) or ends (-1): its path is pinned like an open
        session's, and `node`'s snapshot stays (the snapshots above it on its path may go: see
        `reindex`)."""
        for counts, nodes in ((self.kept, (node,)), (self.held, node.path())):
            for n in nodes:
                count = counts.get(n.id, 0) + delta
                if count:
                    counts[n.id] = count
                else:
                    counts.pop(n.id, None)
        self.pin(node, delta)

    def clear_below(self, node: Node) -> int:
        """Remove `node` and its descendants but what open sessions pin (those and their paths
        stay: pins reach every ancestor), keeping the trie a radix trie around what went.
        Returns the tokens removed."""
        dropped = 0
        stack = [node]
        while stack:
            top = stack.pop()
            if top.pins:  # an open session uses it: keep it, look below
                stack.extend(top.children.values())
                continue
            parent = top.up
            order, below = [], [top]
            while below:
                m = below.pop()
                order.append(m)
                below.extend(m.children.values())
            for m in reversed(order):  # leaves first
                dropped += len(m.tokens)
                self.forget(m)
            self.restructured(parent)
            if not parent.is_root and len(parent.children) == 1 and not parent.payload.has_snapshot:
                self._merge(parent)  # (refused where pinned)
        self.counters.cleared_tokens += dropped
        return dropped

    def touch(self, nodes: Sequence[Node], reused: bool = False) -> None:
        """`nodes` were written or (`reused`) restored from: they are used now; a reuse also tells
        the policy how long after its last use the node came back."""
        now = next(self.clock)
        self.policy.now = now
        for node in nodes:
            if reused:
                self.policy.reused(node, now)
            node.last_used = now
            self.policy.touched(node)
            self.reindex(node)

    def trie_of(self, node: Node) -> Trie:
        root = node
        while root.parent is not None:
            root = root.parent
        return next(t for t in self.tries.values() if t.root is root)

    def tenant_of_trie(self, trie: Trie) -> str:
        """The tenant whose namespace `trie` is."""
        return self._tenants.get(trie.root.id, DEFAULT_TENANT)

    def namespace_of(self, node: Node) -> str:
        """The namespace whose trie holds `node`."""
        trie = self.trie_of(node)
        return next(ns for ns, t in self.tries.items() if t is trie)

    # --- the disk tier (persistence.py keeps its records) ------------------------------------

    def _changed(self, node: Node) -> None:
        """`node`'s payload changed: the disk tier (if any) writes it at its next persist."""
        if self.disk is not None:
            self.disk.unsaved(node)

    def drain(self) -> None:
        """Take in the disk writer's finished writes (see `DiskTier.drain`); without a disk tier, nothing.
        Nodes whose write failed are back in memory: the budgets are enforced again."""
        if self.disk is not None and self.disk.drain():
            self.enforce()

    def resident(self, trie: Optional[Trie], arr: np.ndarray, match: Match, upto: int) -> tuple[Match, set[int]]:
        """Bring disk nodes of the matched path (those starting before `upto`) into host memory
        (a large record is mapped: its page cache holds the host tier's copy).

        A damaged record removes its node and everything under it: the match is redone and
        ends there, a miss from that node down.
        """
        loaded: set[int] = set()
        if self.disk is None or trie is None:
            return match, loaded
        while True:
            for node in match.path:
                if node.start >= upto or node.payload.tier != DISK:
                    continue
                if self.disk.fault_in(node):
                    loaded.add(node.id)
                    continue
                match = trie.match(arr)
                break
            else:
                return match, loaded

    def drop_subtree(self, node: Node) -> None:
        """Remove a node and all its descendants (none is pinned: pins reach every ancestor)."""
        parent = node.up
        stack, order = [node], []
        while stack:
            n = stack.pop()
            order.append(n)
            stack.extend(n.children.values())
        for n in reversed(order):  # leaves first
            self.forget(n)
        self.restructured(parent)

    def drop_disk_nodes(self) -> None:
        """Remove every root child on the disk tier and everything under it (records made for other caches)."""
        for trie in self.tries.values():
            for child in list(trie.root.children.values()):
                if child.payload.tier == DISK:
                    self.drop_subtree(child)

    def flush_to_disk(self) -> None:
        """Everything that fits goes to disk and every write finishes (the records describe the trie)."""
        saved = dict(self.pager.budgets)
        disk = self.require_disk()
        disk.retry_now()  # (degraded: one last try, so as not to lose what a recovered disk would take)
        self.pager.budgets.update({DEVICE: 0, HOST: 0})
        self.enforce()
        disk.persist()
        disk.flush()
        disk.drain()
        self.pager.budgets.update(saved)

    def load_records(self) -> None:
        """Start warm from the directory's records that were made for the same model (see
        `DiskTier.load`): the rebuilt nodes enter the orders, the clock goes on from the last
        recorded use, and the budgets are enforced."""
        latest = self.require_disk().load()
        for trie in self.tries.values():
            self.reindex(*(n for n, _ in trie.walk()))
        self.clock = itertools.count(latest + 1)
        self.enforce()
