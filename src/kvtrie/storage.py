"""Where node payloads live and how they change: the tries, tiers, eviction and the disk tier.

`TieredStorage` is the PrefixCache's store: it owns the tries (one per namespace), adds,
splits and merges nodes with their payloads, attaches and drops recurrent snapshots, moves
payloads between tiers (page-out, write-back, fault-in), evicts leaf-first, and keeps the
disk tier's files and index. The `Pager` (paging.py) keeps the byte counters and the orders
that pick what moves next, in the policy's order (policy.py); `DiskStore` (disk.py) does the
file work. The facade calls it under its lock; nothing here takes a lock.
"""

from __future__ import annotations

import itertools
import logging
import queue
from collections.abc import Iterator, Sequence
from typing import Any, Optional, Union

import attrs
import numpy as np

from .arrays import AnyArray, HostPool, to_device, to_host
from .counters import Counters
from .disk import DiskRef, DiskStore, PayloadCorrupt, WriteJob
from .layers import STATE
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
    disk: Optional[DiskRef] = None  # on the disk tier: the file (layers None once written)
    logits: Optional[AnyArray] = None
    reasons: int = 0
    base: float = 0.0

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
        self.pool = HostPool()
        self.disk = disk
        self.clock = itertools.count(1)
        self.kv_bytes = 0
        self.snapshot_bytes = 0
        self.snapshots = 0  # nodes where a hybrid model can restore
        self._fingerprint = fingerprint
        self._layout = list(layout)
        self._pending: dict[int, tuple[Node, WriteJob]] = {}  # node id -> (node, its write in flight)
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
        return node

    def split(self, trie: Trie, node: Node, at: int) -> Node:
        before = node.payload
        self._account(before, -1)
        upper = trie.split(node, at)
        self._account(upper.payload, +1)
        self._account(node.payload, +1)
        self.reindex(upper, node)
        return upper

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
        return new

    def drop_snapshot(self, node: Node) -> None:
        """Drop the recurrent snapshot (and logits) at an interior node's end; its KV stays."""
        data = node.payload
        self.policy.forget(node)
        if data.layers is None or not data.has_snapshot:
            return
        had = data.has_state
        self._account(data, -1)
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
        """Per-token payloads split at `k`; a recurrent snapshot and logits stay with the lower part."""
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
            NodeData(tuple(upper), self.kinds, data.tier, base=data.base),
            attrs.evolve(data, layers=tuple(lower)),
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
        return attrs.evolve(lower, layers=tuple(merged))

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
                    self.pager.index(node, droppable, movable=False)
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
            node.payload = data.with_arrays(lambda a: to_host(a, self.pool), HOST)
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
        chain = self.tiers()
        progress = True
        while progress:
            progress = False
            for upper, lower in zip(chain, chain[1:]):
                while pager.over(upper) and (node := pager.next_move(upper)) is not None:
                    self.policy.removed(node)
                    self.move(node, lower)
                    progress = True
            last = chain[-1]
            while pager.over(last):
                node = pager.next_eviction(last)
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
        self.pager.unindex(node)
        self.trie_of(node).remove_leaf(node)
        if data.tier == DISK:
            if self._pending.pop(node.id, None) is None and data.disk.file:
                self.disk.delete(data.disk.file)
        else:  # a payload being written is still read by the writer: the pool gets it back later
            release(_everything(data), self.pool)
        self._account(data, -1)

    def _merge(self, node: Node) -> bool:
        """Fold a lone-child node into its child when both are unpinned and in the same memory tier."""
        (child,) = node.children.values()
        if node.pins or child.pins or node.payload.tier != child.payload.tier or node.payload.tier == DISK:
            return False
        self.policy.forget(node)
        self.counters.snapshots_dropped += self.hybrid and node.payload.has_state
        self._account(node.payload, -1)
        self._account(child.payload, -1)
        self.pager.unindex(node)
        self.pager.unindex(child)
        merged = self.trie_of(node).merge(node)
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
        self.snapshot_bytes += sign * snap
        self.kv_bytes += sign * (nbytes - snap)
        self.snapshots += sign * (self.hybrid and data.has_state)

    def pin(self, leaf: Optional[Node], delta: int) -> None:
        node = leaf
        while node is not None and node.parent is not None:
            node.pins += delta
            self.reindex(node)
            node = node.parent

    def touch(self, nodes: Sequence[Node]) -> None:
        now = next(self.clock)
        for node in nodes:
            node.last_used = now
            self.policy.touched(node)
            self.reindex(node)

    def trie_of(self, node: Node) -> Trie:
        root = node
        while root.parent is not None:
            root = root.parent
        return next(t for t in self.tries.values() if t.root is root)

    # --- the disk tier -------------------------------------------------------------------

    def _write_back(self, node: Node) -> None:
        """Host -> disk: the payload is queued for the writer and counts on the disk tier at once."""
        data = node.payload
        ref = DiskRef("", data.nbytes, data.snapshot_nbytes, data.has_state, data.has_snapshot)
        job = WriteJob(node.id, DiskStore.new_name(), data.layers, data.logits)
        self._account(data, -1)
        node.payload = attrs.evolve(data, tier=DISK, disk=ref)  # layers stay until the file is written
        self._account(node.payload, +1)
        self._pending[node.id] = (node, job)
        self.reindex(node)
        self.disk.submit(job)

    def drain(self) -> None:
        """Take in finished writes: the payload now lives in its file only."""
        if self.disk is None:
            return
        while True:
            try:
                job, name, error = self.disk.done.get_nowait()
            except queue.Empty:
                return
            entry = self._pending.get(job.node_id)
            if entry is None or entry[1] is not job:  # restored or evicted meanwhile
                if name:
                    self.disk.delete(name)
                continue
            del self._pending[job.node_id]
            node = entry[0]
            if error is not None:
                self.counters.disk_errors += 1
                logger.warning("writing a payload to %s failed (%s): dropping [%d, %d)", self.disk.dir, error, node.start, node.end)
                self.drop_subtree(node)
                continue
            node.payload = attrs.evolve(node.payload, layers=None, logits=None, disk=attrs.evolve(node.payload.disk, file=name))
            release(list(job.layers) + ([_Logits(job.logits)] if job.logits is not None else []), self.pool)
            self.counters.disk_writes += 1

    def resident(self, trie: Optional[Trie], arr: np.ndarray, match: Match, upto: int) -> tuple[Match, set[int]]:
        """Bring disk nodes of the matched path (those starting before `upto`) into host memory.

        A damaged file removes its node and everything under it: the match is redone and
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
        """Disk -> host for one node; False (and the subtree gone) if its file is damaged or missing."""
        data = node.payload
        entry = self._pending.pop(node.id, None)
        if entry is not None:  # still being written: take the payload back, the file is deleted later
            layers, logits = data.layers, data.logits
        else:
            try:
                layers, logits = self.disk.read(data.disk.file)
            except PayloadCorrupt as exc:
                self.counters.disk_errors += 1
                logger.warning("disk payload for [%d, %d) is unusable (%s): a miss from there", node.start, node.end, exc)
                self.drop_subtree(node)
                return False
            self.disk.delete_later(data.disk.file)
            self.counters.disk_restores += 1
        self._account(data, -1)
        node.payload = attrs.evolve(data, layers=tuple(layers), logits=logits, tier=HOST, disk=None)
        self._account(node.payload, +1)
        self.reindex(node)
        return True

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
        """Everything that fits goes to disk, the writes finish, and the index records it."""
        saved = dict(self.pager.budgets)
        self.pager.budgets.update({DEVICE: 0, HOST: 0})
        self.enforce()
        self.disk.flush()
        self.drain()
        self.pager.budgets.update(saved)
        self.write_index()

    def write_index(self, signature: Optional[str] = None) -> None:
        """The structure of every node whose whole path is in files, for the next process."""
        namespaces: dict[str, list] = {}
        for ns, trie in self.tries.items():
            entries = namespaces[ns] = []
            kept = {trie.root.id}
            for node, _ in trie.walk():
                data = node.payload
                if node.parent.id not in kept or data.tier != DISK or data.layers is not None:
                    continue
                kept.add(node.id)
                ref = data.disk
                entries.append({
                    "id": node.id, "parent": None if node.parent.is_root else node.parent.id,
                    "tokens": node.tokens.tolist(), "file": ref.file, "nbytes": ref.nbytes,
                    "snapshot_nbytes": ref.snapshot_nbytes, "has_state": ref.has_state,
                    "has_snapshot": ref.has_snapshot, "last_used": node.last_used,
                    "reasons": data.reasons,
                })
        self.disk.write_index({
            "format": 2,
            "fingerprint": self._fingerprint,
            "layers": self._layout,
            "signature": self.signature_text,
            "namespaces": namespaces,
        })

    signature_text: Optional[str] = None  # set by the facade once it knows the model's caches

    def load_index(self) -> None:
        """Start warm from the directory's index when it was made for the same model; else cold."""
        index = self.disk.read_index()
        reason = None
        if index is None:
            reason = "no index"
        elif index.get("format") != 2 or index.get("layers") != self._layout:
            reason = "another cache layout"
        elif index.get("fingerprint") != self._fingerprint:
            reason = f"another model (fingerprint {index.get('fingerprint')!r}, not {self._fingerprint!r})"
        if reason is not None:
            if index is not None or self.disk.files():
                logger.warning("disk tier %s starts cold: %s", self.disk.dir, reason)
            self.disk.clear()
            return
        self.index_signature = index.get("signature")
        referenced = set()
        latest = 0
        for ns, entries in index["namespaces"].items():
            trie = self.trie(ns, create=True)
            nodes = {None: trie.root}
            for e in entries:
                parent = nodes.get(e["parent"])
                if parent is None or not e["tokens"] or int(e["tokens"][0]) in parent.children:
                    continue
                ref = DiskRef(e["file"], int(e["nbytes"]), int(e["snapshot_nbytes"]), bool(e["has_state"]), bool(e["has_snapshot"]))
                data = NodeData(None, self.kinds, DISK, ref, reasons=int(e["reasons"]))
                node = trie.add_child(parent, np.asarray(e["tokens"], dtype=np.int32), data)
                node.last_used = int(e["last_used"])
                latest = max(latest, node.last_used)
                nodes[e["id"]] = node
                referenced.add(ref.file)
                self._account(data, +1)
            # keyed once the whole trie stands: a node's worth depends on the shape around it
            self.reindex(*(n for n in nodes.values() if n is not trie.root))
        self.clock = itertools.count(latest + 1)
        for name in self.disk.files() - referenced:
            self.disk.delete(name)
        logger.info("disk tier %s: %d nodes restored from the index", self.disk.dir, len(referenced))
        self.enforce()


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
