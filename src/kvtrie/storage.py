"""Where node payloads live and how they change: the tries, tiers, eviction and the disk tier.

`TieredStorage` is the PrefixCache's store: it owns the tries (one per namespace), adds,
splits and merges nodes with their payloads, attaches and drops recurrent snapshots, moves
payloads between tiers (page-out, write-back, fault-in), evicts leaf-first, and keeps the
disk tier's files and index. The `Pager` (paging.py) keeps the byte counters and the orders
that pick what moves next, in the policy's order (policy.py); `DiskStore` (disk.py) does the
file work. The facade calls it under its lock; nothing here takes a lock.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import queue
from collections.abc import Iterator, Sequence
from typing import Any, Optional, Union

import attrs
import numpy as np

from .arrays import AnyArray, HostArray, HostPool, copy_all, numpy_view, to_device, to_host
from .counters import Counters
from .disk import DiskRef, DiskStore, PayloadCorrupt, WriteJob
from .layers import STATE
from .ledger import IN_FLIGHT, POOL
from .paging import DEVICE, DISK, HOST, Pager, payloads_to_host, release
from .policy import WorthPolicy
from .recurrent import RecurrentPayload
from .snapshot import KVPayload, evaluate, merge_kv, split_kv
from .trie import Match, Node, Trie

logger = logging.getLogger("kvtrie")

LayerPayload = Optional[Union[KVPayload, RecurrentPayload]]


@attrs.define(slots=True, eq=False)
class NodeData:
    """Everything a node stores: one payload per layer, the tier it lives in, and policy state.

    Per-token layers (`KV`, `WINDOW`) hold the edge's positions (a `WINDOW` layer may hold
    `None`: positions nobody recorded); a `STATE` layer holds its state at the node's end, or
    `None` where no snapshot was taken. `logits` are the model's last logits at the end (kept
    with a prompt end's snapshot). `reasons` (why the snapshot was taken) and `base` (its
    priority's starting point) belong to the policy.
    """

    layers: Optional[tuple[LayerPayload, ...]]
    kinds: tuple[str, ...]
    tier: str = DEVICE
    disk: Optional[DiskRef] = None  # on the disk tier: what it holds (layers None once its records are written)
    logits: Optional[AnyArray] = None
    reasons: int = 0
    base: float = 0.0
    interval: float = 0.0  # clock ticks between its uses, as measured (0: never used again yet)
    expect: float = 0.0  # the interval the policy expected at its last use (its order's key)
    segments: tuple["Segment", ...] = ()  # the records holding the edge's positions, in order
    state_file: Optional[str] = None  # the record holding the snapshot (and logits) at the end

    @property
    def nbytes(self) -> int:
        if self.layers is None:
            return self.disk.nbytes
        return sum(p.nbytes for p in self.layers if p is not None) + (self.logits.nbytes if self.logits is not None else 0)

    @property
    def snapshot_nbytes(self) -> int:
        """Bytes of the recurrent snapshot and its logits (the rest is per-token KV)."""
        if self.layers is None:
            return self.disk.snapshot_nbytes
        states = sum(p.nbytes for p, k in zip(self.layers, self.kinds) if k == STATE and p is not None)
        return states + (self.logits.nbytes if self.logits is not None else 0)

    @property
    def has_state(self) -> bool:
        """Every whole-state layer has a snapshot at this node's end (true when there is none)."""
        if self.layers is None:
            return self.disk.has_state
        return all(p is not None for p, k in zip(self.layers, self.kinds) if k == STATE)

    @property
    def has_snapshot(self) -> bool:
        """Some whole-state layer holds a snapshot here (one that could be dropped under pressure)."""
        if self.layers is None:
            return self.disk.has_snapshot
        return any(p is not None for p, k in zip(self.layers, self.kinds) if k == STATE)

    def payloads(self) -> list[Any]:
        return [p for p in (self.layers or ()) if p is not None]

    def with_arrays(self, fn, tier: str) -> "NodeData":
        """A copy whose payload and logits arrays went through `fn` (a tier move)."""
        layers = tuple(None if p is None else p.map(fn) for p in self.layers)
        logits = None if self.logits is None else fn(self.logits)
        return attrs.evolve(self, layers=layers, logits=logits, tier=tier, disk=None)

    def with_host_arrays(self, pool: HostPool) -> "NodeData":
        """A copy on the host tier: every array copied into a pooled buffer, all copies at once."""
        pairs: list[tuple[np.ndarray, np.ndarray]] = []

        def plan(a: AnyArray) -> HostArray:
            if isinstance(a, HostArray):
                return a
            src = numpy_view(a)
            buf = pool.take(src.shape, src.dtype)
            pairs.append((buf, src))
            return HostArray(buf, a.dtype)

        moved = self.with_arrays(plan, HOST)
        copy_all(pairs)
        return moved


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
        self.disk = disk
        self.clock = itertools.count(1)
        self.kv_bytes = 0
        self.snapshot_bytes = 0
        self.snapshots = 0  # nodes where a hybrid model can restore
        self._fingerprint = fingerprint
        self._layout = list(layout)
        self._persisting: dict[int, tuple[Node, WriteJob, bool]] = {}  # node id -> (node, record in flight, drop memory once written)
        self._in_flight: dict[int, list[int]] = {}  # id(job) -> [bytes of its copies, bytes of node memory it holds]
        self._unsaved: dict[int, Node] = {}  # nodes whose payload no record holds yet
        self._files: dict[str, str] = {}  # record key -> file name
        self._refs: dict[str, int] = {}  # record key -> how many segments and snapshots use it
        self.index_signature: Optional[str] = None  # the model layout the disk's state was made with

    # --- structure ---------------------------------------------------------------------------

    def trie(self, namespace: str, create: bool = False) -> Optional[Trie]:
        trie = self.tries.get(namespace)
        if trie is None and create:
            trie = self.tries[namespace] = Trie(self._split_data, self._merge_data)
        return trie

    def walk(self) -> Iterator[tuple[str, Node, int]]:
        for ns in sorted(self.tries):
            for node, depth in self.tries[ns].walk():
                yield ns, node, depth

    def new_data(self, layers: tuple[LayerPayload, ...]) -> NodeData:
        return NodeData(layers, self.kinds)

    def add(self, trie: Trie, parent: Node, tokens: np.ndarray, data: NodeData) -> Node:
        """Hang a new device-tier node under `parent` and account for it."""
        node = trie.add_child(parent, tokens, data)
        self._account(data, +1)
        if data.layers and node.end > node.start:
            kv = data.nbytes - data.snapshot_nbytes
            if kv and not self.policy.kv_bytes_per_token:
                self.policy.kv_bytes_per_token = kv / (node.end - node.start)
        self.reindex(node)
        self.restructured(parent)
        self.unsaved(node)
        return node

    def split(self, trie: Trie, node: Node, at: int) -> Node:
        before = node.payload
        files = self.files_of(before)
        self._account(before, -1)
        upper = trie.split(node, at)
        self._account(upper.payload, +1)
        self._account(node.payload, +1)
        self._refile(files, self.files_of(upper.payload) + self.files_of(node.payload))
        self._supersede(node)
        self.reindex(upper, node)
        return upper

    def _supersede(self, node: Node) -> None:
        """A record in flight for `node` no longer matches it: written, it is deleted, and the node
        is saved again."""
        if self._persisting.pop(node.id, None) is not None:
            self.unsaved(node)

    def boundary(self, trie: Trie, arr: np.ndarray, offset: int) -> Node:
        """The node on `arr`'s stored path that ends exactly at `offset`, splitting an edge if needed."""
        node = trie.match(arr[:offset]).last
        return self.split(trie, node, offset) if node.end > offset else node

    def attach(self, node: Node, snapshot: Sequence[RecurrentPayload], logits: Optional[AnyArray], reasons: int) -> bool:
        """Give `node` the snapshot taken at its end (and its logits) unless it has one; True if stored."""
        data = node.payload
        data.reasons |= reasons
        if data.tier == DISK or data.has_state and (logits is None or data.logits is not None):
            self.rekey_below(node)
            return False
        self._account(data, -1)
        if data.state_file is not None:  # the logits join the state: a new record holds both
            self._refile([data.state_file], [])
            data.state_file = None
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
        self._account(data, +1)
        self.counters.snapshots_made += new
        self.rekey_below(node)
        self.unsaved(node)
        return new

    def drop_snapshot(self, node: Node) -> None:
        """Drop the recurrent snapshot (and logits) at an interior node's end; its KV stays."""
        data = node.payload
        self.policy.forget(node)
        if data.layers is None or not data.has_snapshot:
            return
        had = data.has_state
        self._account(data, -1)
        if data.state_file is not None:
            self._refile([data.state_file], [])
            data.state_file = None
        dropped = [p for p, k in zip(data.layers, self.kinds) if k == STATE and p is not None]
        data.layers = tuple(None if k == STATE else p for p, k in zip(data.layers, self.kinds))
        if data.logits is not None:
            dropped.append(_Logits(data.logits))
            data.logits = None
        release(dropped, self.pool)
        self.counters.snapshots_dropped += had
        self._account(data, +1)
        self.rekey_below(node)

    # --- payload callbacks for the trie --------------------------------------------------

    def _split_data(self, data: NodeData, k: int) -> tuple[NodeData, NodeData]:
        """Per-token payloads (and the records holding them) split at `k`; a recurrent snapshot
        and logits stay with the lower part."""
        top, bottom = _split_segments(data.segments, k)
        if data.layers is None:  # on disk: only the records' references split
            n = sum(seg.length for seg in data.segments)
            per_token = (data.disk.nbytes - data.disk.snapshot_nbytes) // n
            ref = data.disk
            return (
                NodeData(None, self.kinds, DISK, DiskRef(per_token * k, 0, not self.hybrid, False), base=data.base,
                         interval=data.interval, expect=data.expect, segments=top),
                attrs.evolve(data, disk=DiskRef(ref.nbytes - per_token * k, ref.snapshot_nbytes, ref.has_state, ref.has_snapshot), segments=bottom),
            )
        upper: list[LayerPayload] = []
        lower: list[LayerPayload] = []
        for p, kind in zip(data.layers, self.kinds):
            if kind == STATE or p is None:
                a, b = None, p
            else:
                a, b = split_kv(p, k)
            upper.append(a)
            lower.append(b)
        evaluate(upper + lower)
        release([p for p, kind in zip(data.layers, self.kinds) if kind != STATE], self.pool)
        return (
            NodeData(tuple(upper), self.kinds, data.tier, base=data.base, interval=data.interval, expect=data.expect,
                     segments=top),
            attrs.evolve(data, layers=tuple(lower), segments=bottom),
        )

    def _merge_data(self, upper: NodeData, lower: NodeData) -> NodeData:
        """Per-token payloads concatenate (a hole in either half is a hole in both); the upper
        node's snapshot (mid-edge now) is dropped."""
        merged = []
        for a, b, kind in zip(upper.layers, lower.layers, self.kinds):
            if kind == STATE:
                merged.append(b)
            elif a is None or b is None:
                merged.append(None)
            else:
                merged.append(merge_kv(a, b))
        evaluate(merged)
        release(upper.layers, self.pool)
        if upper.logits is not None:
            release([_Logits(upper.logits)], self.pool)
        release([p for p, kind in zip(lower.layers, self.kinds) if kind != STATE], self.pool)
        covered = upper.segments and lower.segments  # a merged edge is in records only if both halves were
        return attrs.evolve(lower, layers=tuple(merged), segments=upper.segments + lower.segments if covered else ())

    # --- paging and eviction -------------------------------------------------------------

    def _evictable(self, node: Node) -> bool:
        if node.payload.tier == DISK:  # a file is dropped whole: leaves only
            return node.is_leaf
        return node.is_leaf or (self.hybrid and node.payload.has_snapshot)

    def reindex(self, *nodes: Node) -> None:
        """Re-enter nodes into the orders. A pinned node never moves or goes, but a speculative
        snapshot on it may still be dropped: the session holds its own live state."""
        for node in nodes:
            self.pager.unindex(node)
            if node.parent is not None:
                if node.pins:
                    droppable = node.payload.tier != DISK and self.policy.speculative(node)
                    self.pager.index(node, droppable, movable=False, blocks=self.policy.admits and node.is_leaf)
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
            if data.tier == DEVICE:  # a host tier with no budget is skipped: through host memory
                self.move(node, HOST)
            self._write_back(node)
            return
        self._account(data, -1)
        if tier == HOST:
            node.payload = data.with_host_arrays(self.pool)
            self.counters.page_outs += 1
        else:
            moved = data.with_arrays(to_device, DEVICE)
            evaluate(_everything(moved))
            release(_everything(data), self.pool)
            node.payload = moved
        self._account(node.payload, +1)
        self.reindex(node)

    def enforce(self) -> None:
        """Move down and evict in the policy's order until every budget holds (or only pinned nodes are left).

        Over a tier's budget its first unpinned node moves one tier down; over the last
        tier's budget the first evictable node goes, and a node that waits for its children
        (still in upper tiers) makes them move first.
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
                    node = pager.next_move(upper) if pager.over(upper) else None
                    if node is None:
                        break
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
                upper = next((t for t in reversed(chain[:-1]) if pager.next_move(t) is not None), None)
                if upper is None:
                    break
                # the last tier holds only nodes waiting for their children: send a leaf down
                # (it can go from there), else whatever comes first
                leaf = next((n for n in pager.evictable_order(upper) if n.is_leaf and not n.pins), None)
                self.move(leaf or pager.next_move(upper), chain[chain.index(upper) + 1])
                progress = True

    def evict(self, node: Node) -> None:
        """Free what `node` holds: a leaf goes; an interior node drops its recurrent snapshot."""
        data = node.payload
        parent = node.parent
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
        inflight = self._persisting.pop(node.id, None)
        self._unsaved.pop(node.id, None)
        if self.disk is not None:
            self._refile(self.files_of(data), [])
        self._account(data, -1)  # (first: the pool keeps the buffers only where the budget has room)
        if data.layers is not None and not (inflight is not None and inflight[2]):
            release(_everything(data), self.pool)  # (arrays the writer still reads go when it is done)

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
        self._account(node.payload, -1)
        self._account(child.payload, -1)
        self.pager.unindex(node)
        self.pager.unindex(child)
        files = self.files_of(node.payload) + self.files_of(child.payload)
        self._supersede(node)
        self._supersede(child)
        self._unsaved.pop(node.id, None)
        merged = self.trie_of(node).merge(node)
        if self.disk is not None:
            self._refile(files, self.files_of(merged.payload))
            if not self.persisted(merged):
                self.unsaved(merged)
        self._account(merged.payload, +1)
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

    def _account(self, data: NodeData, sign: int) -> None:
        """Add (+1) or remove (-1) a payload's bytes in its tier's and its kind's counters."""
        nbytes, snap = data.nbytes, data.snapshot_nbytes
        self.pager.bytes[data.tier] += sign * nbytes
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

    # --- copies in flight to the disk writer (in the ledger) -------------------------------------

    def _charge(self, job: WriteJob, copies: int = 0, memory: int = 0) -> None:
        """`job` holds `copies` more bytes of copies / `memory` more bytes of a node's own arrays
        until it is drained (negative: less)."""
        entry = self._in_flight.setdefault(id(job), [0, 0])
        entry[0] += copies
        entry[1] += memory
        self.pager.ledger.add(IN_FLIGHT, HOST, copies + memory)

    def _settle(self, job: WriteJob) -> None:
        """`job` is drained: the bytes it held are released (or, for node memory, payload again)."""
        entry = self._in_flight.pop(id(job), None)
        if entry is not None:
            self.pager.ledger.add(IN_FLIGHT, HOST, -(entry[0] + entry[1]))

    def pin(self, leaf: Optional[Node], delta: int, reindex: bool = True) -> None:
        """Pin (+1) or unpin (-1) `leaf`'s path; `reindex=False` when the caller re-enters those nodes itself."""
        node = leaf
        while node is not None and node.parent is not None:
            node.pins += delta
            if reindex:
                self.reindex(node)
            node = node.parent

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

    # --- the disk tier: records ------------------------------------------------------------

    def files_of(self, data: NodeData) -> list[str]:
        """The records a payload reads from (each once per use)."""
        return [seg.stem for seg in data.segments] + ([data.state_file] if data.state_file else [])

    def _refile(self, before: Sequence[str], after: Sequence[str]) -> None:
        """Move record references from `before` to `after`; a record nobody uses is deleted."""
        refs = self._refs
        for stem in after:
            refs[stem] = refs.get(stem, 0) + 1
        for stem in before:
            left = refs.get(stem, 0) - 1
            if left > 0:
                refs[stem] = left
                continue
            refs.pop(stem, None)
            name = self._files.pop(stem, None)
            if name is not None:
                self.disk.delete_later(name)

    def persisted(self, node: Node) -> bool:
        """Every position of the node's edge is in some record, and so is its snapshot (if any)."""
        data = node.payload
        return self._covered(node) and (data.state_file is not None or not data.has_snapshot)

    def _key(self, ns: str, node: Node, state_only: bool) -> str:
        """A record's key: the model, the namespace and every token up to the node's end."""
        h = hashlib.blake2b(digest_size=16)
        h.update(f"{self._fingerprint}|{ns}|{'s' if state_only else 'kv'}|{node.start}|".encode())
        for n in node.path():
            h.update(np.ascontiguousarray(n.tokens, dtype=np.int32).tobytes())
        return h.hexdigest()

    def unsaved(self, node: Node) -> None:
        """`node`'s payload changed: the next `persist` writes what no record holds yet."""
        if self.disk is not None:
            self._unsaved[node.id] = node

    def persist(self) -> int:
        """Queue a record for every node whose payload no record holds yet (parents first, so a
        record's `parent` exists before it); returns how many were queued. Run every few
        seconds by the facade, so a process killed at any moment loses at most that much."""
        if self.disk is None or not self._unsaved:
            return 0
        nodes = sorted(self._unsaved.values(), key=lambda n: n.start)
        self._unsaved = {}
        queued = 0
        for node in nodes:
            if node.parent is None or node.payload.tier == DISK or node.id in self._persisting:
                continue
            if not self.persisted(node):
                queued += self._queue_record(node)
        return queued

    def _covered(self, node: Node) -> bool:
        return sum(seg.length for seg in node.payload.segments) == node.end - node.start

    def _parent_stem(self, node: Node, start: int) -> Optional[str]:
        """The record that holds the position just before `start` on `node`'s path (one in flight
        counts: its key is known before it is written)."""
        holder = node if start > node.start else node.parent
        if holder.parent is None:
            return None
        if holder.payload.segments and self._covered(holder):
            return holder.payload.segments[-1].stem
        inflight = self._persisting.get(holder.id)
        if inflight is not None and inflight[1].record["kv"]:
            return inflight[1].stem
        return None

    def _queue_record(self, node: Node, then_drop_memory: bool = False) -> int:
        queued = 0
        parent = node.parent
        if parent.parent is not None and not self._covered(parent) and parent.id not in self._persisting:
            queued += self._queue_record(parent)  # a record hangs off the one before it on its path
        return queued + self._queue_own(node, then_drop_memory)

    def _queue_own(self, node: Node, then_drop_memory: bool) -> int:
        data = node.payload
        if data.layers is None:
            return 0
        ns = self._namespace_of(node)
        covered = self._covered(node)
        state_only = covered and data.has_snapshot and data.state_file is None
        if covered and not state_only:
            return 0
        start = node.end if state_only else node.start
        layers = tuple(
            (p if kind == STATE or not state_only else None) if p is not None else None
            for p, kind in zip(data.layers, self.kinds)
        )
        record = {
            "fingerprint": self._fingerprint, "layout": self._layout, "signature": self.signature_text,
            "namespace": ns, "parent": self._parent_stem(node, start), "start": start,
            "tokens": [] if state_only else node.tokens.tolist(),
            "kv": not state_only, "has_state": data.has_state, "has_snapshot": data.has_snapshot,
            "logits": data.logits is not None, "reasons": data.reasons, "last_used": node.last_used,
            "kv_nbytes": 0 if state_only else data.nbytes - data.snapshot_nbytes,
            "snapshot_nbytes": data.snapshot_nbytes,
        }
        stem = self._key(ns, node, state_only)
        if stem in self._files:  # the same content is already on disk: use it
            self._applied(node, stem, record)
            return 0
        if then_drop_memory:  # the node's own host arrays: nothing else reads them until it is written
            job = WriteJob(node.id, stem, layers, data.logits, record, data, state_only)
        else:  # copies for the writer: the node's arrays may move or go meanwhile
            job = WriteJob(node.id, stem, tuple(_for_writer(p) for p in layers),
                           None if data.logits is None else _writer_array(data.logits), record, data, state_only, True)
        self._persisting[node.id] = (node, job, then_drop_memory)
        if job.copies:
            self._charge(job, copies=sum(a.nbytes for p in job.layers if p is not None for a in p.arrays)
                         + (job.logits.nbytes if job.logits is not None else 0))
        else:  # the node counts on the disk tier; its memory goes when the record is written
            self._charge(job, memory=data.nbytes)
        self.disk.submit(job)
        return 1

    def _applied(self, node: Node, stem: str, record: dict) -> None:
        """`node`'s payload (or snapshot) is in the record `stem` now."""
        data = node.payload
        before = self.files_of(data)
        if record["kv"]:
            data.segments = (Segment(stem, 0, len(record["tokens"])),)
        if record["has_snapshot"] and data.has_snapshot and (record["logits"] or data.logits is None):
            data.state_file = stem
        self._refile(before, self.files_of(data))

    def _namespace_of(self, node: Node) -> str:
        trie = self.trie_of(node)
        return next(ns for ns, t in self.tries.items() if t is trie)

    def _write_back(self, node: Node) -> None:
        """Host -> disk: the payload counts on the disk tier at once; a node whose records all
        exist needs no write, else its record is queued and its memory goes once written."""
        data = node.payload
        ref = DiskRef(data.nbytes, data.snapshot_nbytes, data.has_state, data.has_snapshot)
        self._account(data, -1)
        node.payload = attrs.evolve(data, tier=DISK, disk=ref)  # layers stay until the record is written
        self._account(node.payload, +1)
        inflight = self._persisting.get(node.id)
        if inflight is not None and not inflight[2]:  # a copy is being written: drop memory when it lands
            self._persisting[node.id] = (inflight[0], inflight[1], True)
            self._charge(inflight[1], memory=data.nbytes)  # (no tier counts the node's memory until then)
        else:
            if not self.persisted(node):
                self._queue_record(node, then_drop_memory=True)
            if node.id not in self._persisting:  # its records were all there
                self._drop_memory(node)
        self.reindex(node)

    def _drop_memory(self, node: Node) -> None:
        data = node.payload
        release(_everything(data), self.pool)
        node.payload = attrs.evolve(data, layers=None, logits=None)
        self._unsaved.pop(node.id, None)

    def drain(self) -> None:
        """Take in finished writes: the records are the nodes' from now on."""
        if self.disk is None:
            return
        while True:
            try:
                job, name, error = self.disk.done.get_nowait()
            except queue.Empty:
                return
            self._settle(job)
            if job.copies:
                release(list(p for p in job.layers if p is not None) + ([_Logits(job.logits)] if job.logits is not None else []), self.pool)
            entry = self._persisting.get(job.node_id)
            current = entry is not None and entry[1] is job
            if current:
                del self._persisting[job.node_id]
            if error is not None:
                self.counters.disk_errors += 1
                logger.warning("writing a record to %s failed (%s)", self.disk.dir, error)
                if current and entry[2]:  # its memory was to go: keep the node where it was
                    node = entry[0]
                    self._account(node.payload, -1)
                    node.payload = attrs.evolve(node.payload, tier=HOST, disk=None)
                    self._account(node.payload, +1)
                    self.reindex(node)
                continue
            node = entry[0] if current else None
            record = job.record
            start = record["start"]
            span = (start, start + len(record["tokens"])) if record["kv"] else None
            if node is None or (span is not None and span != (node.start, node.end)) or (span is None and start != node.end):
                if node is not None:
                    self.unsaved(node)
                if self._files.get(job.stem) != name:
                    self.disk.delete_later(name)  # superseded: the node changed or went meanwhile
                continue
            self._files[job.stem] = name
            self.counters.disk_writes += 1
            self._applied(node, job.stem, record)
            if entry[2]:
                self._drop_memory(node)
            elif not self.persisted(node):
                self.unsaved(node)

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
                if self._fault_in(node):
                    loaded.add(node.id)
                    continue
                match = trie.match(arr)
                break
            else:
                return match, loaded

    def _fault_in(self, node: Node) -> bool:
        """Disk -> host for one node (its records stay); False, and the subtree gone, if one of
        its records is damaged or missing."""
        data = node.payload
        entry = self._persisting.get(node.id)
        if data.layers is not None:  # its record is still being written: the memory is still here
            if entry is not None:
                self._persisting[node.id] = (entry[0], entry[1], False)
                held = self._in_flight.get(id(entry[1]))
                if held is not None and held[1]:
                    self._charge(entry[1], memory=-held[1])  # a host payload again, counted as one
            layers, logits = data.layers, data.logits
        else:
            try:
                layers, logits = self._read_records(node)
            except PayloadCorrupt as exc:
                self.counters.disk_errors += 1
                logger.warning("a record of [%d, %d) is unusable (%s): a miss from there", node.start, node.end, exc)
                self.drop_subtree(node)
                return False
            self.counters.disk_restores += 1
        self._account(data, -1)
        node.payload = attrs.evolve(data, layers=tuple(layers), logits=logits, tier=HOST, disk=None)
        self._account(node.payload, +1)
        self.reindex(node)
        return True

    def _read_records(self, node: Node) -> tuple[list[LayerPayload], Optional[AnyArray]]:
        """The node's payloads from its records: its positions sliced out of each KV record and
        joined, its whole states (and logits) from its state record; host arrays."""
        data = node.payload
        read: dict[str, tuple] = {}

        def get(stem: str) -> tuple:
            if stem not in read:
                name = self._files.get(stem)
                if name is None:
                    raise PayloadCorrupt(f"record {stem} is gone")
                read[stem] = self.disk.read(name, self.pool)
            return read[stem]

        parts: list[list[Any]] = [[] for _ in self.kinds]
        for seg in data.segments:
            layers = get(seg.stem)[0]
            for i, kind in enumerate(self.kinds):
                if kind == STATE:
                    continue
                p = layers[i] if i < len(layers) else None
                if p is None or seg.length == p.length:
                    parts[i].append(p)
                    continue
                lo, hi = seg.offset, seg.offset + seg.length
                if lo:
                    p = split_kv(p, lo)[1]
                if hi - lo < p.length:
                    p = split_kv(p, hi - lo)[0]
                parts[i].append(p)
        out: list[LayerPayload] = []
        logits = None
        state_layers = get(data.state_file)[0] if data.state_file else None
        if data.state_file:
            logits = get(data.state_file)[1]
        for i, kind in enumerate(self.kinds):
            if kind == STATE:
                out.append(state_layers[i] if state_layers is not None else None)
                continue
            ps = parts[i]
            if not ps or any(p is None for p in ps):
                out.append(None)
                continue
            merged = ps[0]
            for p in ps[1:]:
                merged = merge_kv(merged, p)
            out.append(merged)
        return out, logits

    def drop_subtree(self, node: Node) -> None:
        """Remove a node and all its descendants (none is pinned: pins reach every ancestor)."""
        parent = node.parent
        stack, order = [node], []
        while stack:
            n = stack.pop()
            order.append(n)
            stack.extend(n.children.values())
        for n in reversed(order):  # leaves first
            self.forget(n)
        self.restructured(parent)

    def drop_disk_nodes(self) -> None:
        for trie in self.tries.values():
            for child in list(trie.root.children.values()):
                if child.payload.tier == DISK:
                    self.drop_subtree(child)

    def flush_to_disk(self) -> None:
        """Everything that fits goes to disk and every write finishes (the records describe the trie)."""
        saved = dict(self.pager.budgets)
        self.pager.budgets.update({DEVICE: 0, HOST: 0})
        self.enforce()
        self.persist()
        self.disk.flush()
        self.drain()
        self.pager.budgets.update(saved)

    signature_text: Optional[str] = None  # set by the facade once it knows the model's caches

    def load_records(self) -> None:
        """Start warm from the directory's records that were made for the same model (any others
        are deleted): rebuild every namespace's trie on the disk tier, records of one path
        hanging off the record before them; an orphan (its parent gone) is deleted."""
        found = []
        for name in sorted(self.disk.files()):
            try:
                record = self.disk.header(name)
            except PayloadCorrupt as exc:
                logger.warning("disk record %s is unreadable (%s): deleted", name, exc)
                self.counters.disk_errors += 1
                self.disk.delete(name)
                continue
            found.append((name, record))
        foreign = [n for n, r in found if r.get("fingerprint") != self._fingerprint or r.get("layout") != self._layout]
        if foreign:
            logger.warning("disk tier %s: %d records of another model or cache layout deleted", self.disk.dir, len(foreign))
            for name in foreign:
                self.disk.delete(name)
        foreign = set(foreign)
        records = {DiskStore.stem(n): (n, r) for n, r in found if n not in foreign}
        ends: dict[str, Node] = {}  # record -> the node ending where the record ends
        latest = 0
        loaded = 0
        for stem, (name, record) in sorted(records.items(), key=lambda kv: (kv[1][1]["start"], not kv[1][1]["kv"])):
            try:
                node = self._insert_record(stem, record, ends)
            except (KeyError, TypeError, ValueError) as exc:
                logger.warning("disk record %s does not fit the trie (%s): deleted", name, exc)
                node = None
            if node is None:
                self.disk.delete(name)
                continue
            self._files[stem] = name
            ends[stem] = node
            loaded += 1
            latest = max(latest, int(record.get("last_used", 0)))
            if self.index_signature is None:
                self.index_signature = record.get("signature")
        for stem in [s for s in self._files if s not in self._refs]:  # loaded, but nothing uses it
            self.disk.delete(self._files.pop(stem))
        for trie in self.tries.values():
            self.reindex(*(n for n, _ in trie.walk()))
        self.clock = itertools.count(latest + 1)
        logger.info("disk tier %s: %d records restored", self.disk.dir, loaded)
        self.enforce()

    def _insert_record(self, stem: str, record: dict, ends: dict[str, Node]) -> Optional[Node]:
        """Hang one record's positions (or its state) in the trie on the disk tier; the node that
        ends where the record ends, or None for an orphan."""
        ns, start, tokens = record["namespace"], int(record["start"]), np.asarray(record["tokens"], dtype=np.int32)
        trie = self.trie(ns, create=True)
        parent_stem = record.get("parent")
        if parent_stem is None:
            if start != 0:
                return None
            at = trie.root
        else:
            anchor = ends.get(parent_stem)
            if anchor is None or anchor.parent is None:
                return None
            at = self._node_ending_at(trie, anchor, start)
            if at is None:
                return None
        if not record["kv"]:  # a state at `start`
            self._attach_record_state(at, stem, record)
            return at
        node, i = at, 0
        while i < len(tokens):
            child = node.children.get(int(tokens[i]))
            if child is None:
                break
            common = _common(child.tokens, tokens[i:])
            if common < len(child.tokens):
                node = self.split(trie, child, child.start + common)
                i += common
                break
            node, i = child, i + common
        if i < len(tokens):
            n = len(tokens)
            per_token = int(record["kv_nbytes"]) // n
            data = NodeData(None, self.kinds, DISK, DiskRef(per_token * (n - i), 0, not self.hybrid, False),
                            reasons=int(record["reasons"]))
            data.segments = (Segment(stem, i, n - i),)
            child = trie.add_child(node, tokens[i:], data)
            child.last_used = int(record.get("last_used", 0))
            self._account(data, +1)
            self._refile((), self.files_of(data))
            node = child
        if record["has_snapshot"]:
            self._attach_record_state(node, stem, record)
        return node

    def _node_ending_at(self, trie: Trie, anchor: Node, position: int) -> Optional[Node]:
        """The node on `anchor`'s path that ends at `position` (splitting one that spans it)."""
        node = anchor
        while node.parent is not None and node.start >= position:
            node = node.parent
        if node.parent is None:
            return node if position == 0 else None
        if node.end > position:
            return self.split(trie, node, position)
        return node if node.end == position else None

    def _attach_record_state(self, node: Node, stem: str, record: dict) -> None:
        data = node.payload
        if node.parent is None or data.tier != DISK or data.state_file is not None:
            return
        self._account(data, -1)
        ref = data.disk
        data.disk = DiskRef(ref.nbytes + int(record["snapshot_nbytes"]), int(record["snapshot_nbytes"]),
                            bool(record["has_state"]), bool(record["has_snapshot"]))
        data.state_file = stem
        data.reasons |= int(record["reasons"])
        self._account(data, +1)
        self._refile((), [stem])


def _split_segments(segments: tuple["Segment", ...], k: int) -> tuple[tuple["Segment", ...], tuple["Segment", ...]]:
    """The records' references of an edge's first `k` positions and of the rest."""
    top: list[Segment] = []
    bottom: list[Segment] = []
    left = k
    for seg in segments:
        if left >= seg.length:
            top.append(seg)
        elif left <= 0:
            bottom.append(seg)
        else:
            top.append(Segment(seg.stem, seg.offset, left))
            bottom.append(Segment(seg.stem, seg.offset + left, seg.length - left))
        left -= seg.length
    return tuple(top), tuple(bottom)


def _common(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if len(diff) else n


def _writer_array(a: AnyArray) -> HostArray:
    """A copy of `a` the writer thread can read while the node's own arrays move or go."""
    return HostArray(np.array(numpy_view(a)), a.dtype)


def _for_writer(p: LayerPayload) -> LayerPayload:
    return None if p is None else p.map(_writer_array)


@attrs.frozen
class Segment:
    """Positions of a node's edge held by a record: `length` of them from the record's `offset`-th."""

    stem: str
    offset: int
    length: int


@attrs.frozen(eq=False)
class _Logits:
    """Logits wrapped as a payload, so tier moves and releases treat them like the rest."""

    array: AnyArray

    @property
    def arrays(self) -> tuple[AnyArray, ...]:
        return (self.array,)


def _everything(data: NodeData) -> list[Any]:
    """A node's payloads and its logits, for moves and releases."""
    return data.payloads() + ([_Logits(data.logits)] if data.logits is not None else [])
