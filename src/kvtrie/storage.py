"""Where node payloads live: device, host and disk tiers, moving and evicting in LRU order.

`TieredStorage` is the part of the PrefixCache that changes where payloads are: the
payload callbacks the trie splits and merges with, moves between tiers (page-out,
write-back, fault-in), leaf-first eviction, and the disk tier's files and index. The
`Pager` (paging.py) keeps the byte counters and LRU orders that pick what moves next;
`DiskStore` (disk.py) does the file work. Every method here runs under the cache's lock.
"""

from __future__ import annotations

import itertools
import logging
import queue
from typing import Optional, Union

import attrs
import numpy as np

from .arrays import HostPool
from .disk import DiskRef, DiskStore, PayloadCorrupt, WriteJob
from .paging import DEVICE, DISK, HOST, Pager, layers_to_device, layers_to_host, release
from .recurrent import RecurrentPayload
from .snapshot import KVPayload, evaluate, merge_kv, split_kv
from .trie import Match, Node, Trie

logger = logging.getLogger("kvtrie")

LayerPayload = Optional[Union[KVPayload, RecurrentPayload]]


@attrs.define(slots=True, eq=False)
class NodeData:
    """Everything a node stores: one payload per model layer, and the tier it lives in.

    KV layers always hold the edge's keys/values; a recurrent layer holds its state at
    the node's end, or `None` where no snapshot was captured.
    """

    layers: Optional[tuple[LayerPayload, ...]]
    tier: str = DEVICE
    disk: Optional[DiskRef] = None  # on the disk tier: the file (layers None once written)

    @property
    def nbytes(self) -> int:
        if self.layers is None:
            return self.disk.nbytes
        return sum(p.nbytes for p in self.layers if p is not None)

    @property
    def has_state(self) -> bool:
        """Every layer can be restored at this node's end (always true for a pure transformer)."""
        if self.layers is None:
            return self.disk.has_state
        return all(p is not None for p in self.layers)

    @property
    def has_snapshot(self) -> bool:
        """Some recurrent layer holds a snapshot here (one that could be dropped under pressure)."""
        if self.layers is None:
            return self.disk.has_snapshot
        return any(isinstance(p, RecurrentPayload) for p in self.layers)


class TieredStorage:
    """Payload placement for PrefixCache (a base class sharing its state).

    Expects the attributes PrefixCache.__init__ sets: `_tries`, `_pager` (Pager), `_pool`
    (HostPool), `_disk` (DiskStore or None), `_pending`, `_recurrent`, `_snapshots`,
    `_layer_types`, `_fingerprint`, `_signature`, `_index_signature`, `_clock` and the
    counters `_page_outs`, `_evictions`, `_evicted_tokens`, `_disk_writes`,
    `_disk_restores`, `_disk_errors`.
    """

    _tries: dict[str, Trie]
    _pager: Pager
    _pool: HostPool
    _disk: Optional[DiskStore]

    # --- payload callbacks for the trie ----------------------------------------------------

    def _split_data(self, data: NodeData, k: int) -> tuple[NodeData, NodeData]:
        """KV payloads split at `k`; a recurrent snapshot stays with the lower part (it is at the end)."""
        upper: list[LayerPayload] = []
        lower: list[LayerPayload] = []
        for p in data.layers:
            a, b = split_kv(p, k) if isinstance(p, KVPayload) else (None, p)
            upper.append(a)
            lower.append(b)
        evaluate(upper + lower)
        release([p for p in data.layers if isinstance(p, KVPayload)], self._pool)
        return NodeData(tuple(upper), data.tier), NodeData(tuple(lower), data.tier)

    def _merge_data(self, upper: NodeData, lower: NodeData) -> NodeData:
        """KV payloads concatenate; the upper node's recurrent snapshot (mid-edge now) is dropped."""
        merged = tuple(merge_kv(a, b) if isinstance(b, KVPayload) else b for a, b in zip(upper.layers, lower.layers))
        evaluate(merged)
        release(upper.layers, self._pool)
        release([p for p in lower.layers if isinstance(p, KVPayload)], self._pool)
        return NodeData(merged, lower.tier)

    # --- paging and eviction (under the lock) ----------------------------------------------

    def _evictable(self, node: Node) -> bool:
        if node.payload.tier == DISK:  # a file is dropped whole: leaves only
            return node.is_leaf
        return node.is_leaf or node.payload.has_snapshot

    def _reindex(self, *nodes: Node) -> None:
        for node in nodes:
            self._pager.unindex(node)
            if node.parent is not None:
                self._pager.index(node, self._evictable(node))

    def _tiers(self) -> tuple[str, ...]:
        return (DEVICE, HOST, DISK) if self._disk is not None else (DEVICE, HOST)

    def _move(self, node: Node, tier: str) -> None:
        """Move a node's payloads one tier (device <-> host, host -> disk) and account for it."""
        data = node.payload
        if tier == DISK:
            self._write_back(node)
            return
        if tier == HOST:
            layers = layers_to_host(data.layers, self._pool)
            self._page_outs += 1
        else:
            layers = layers_to_device(data.layers)
            release(data.layers, self._pool)
        self._pager.bytes[data.tier] -= data.nbytes
        node.payload = NodeData(layers, tier)
        self._pager.bytes[tier] += node.payload.nbytes
        self._reindex(node)

    def _enforce(self) -> None:
        """Move down and evict in LRU order until every budget holds (or only pinned nodes are left).

        Over a tier's budget its least recently used unpinned node moves one tier down;
        over the last tier's budget the least recently used evictable node goes, and a
        node that waits for its children (still in upper tiers) makes them move first.
        """
        pager = self._pager
        chain = self._tiers()
        progress = True
        while progress:
            progress = False
            for upper, lower in zip(chain, chain[1:]):
                while pager.over(upper) and (node := pager.next_move(upper)) is not None:
                    self._move(node, lower)
                    progress = True
            last = chain[-1]
            while pager.over(last):
                node = pager.next_eviction(last)
                if node is not None:
                    self._evict(node)
                    progress = True
                    continue
                upper = next((t for t in reversed(chain[:-1]) if pager.next_move(t) is not None), None)
                if upper is None:
                    break
                self._move(pager.next_move(upper), chain[chain.index(upper) + 1])
                progress = True

    def _evict(self, node: Node) -> None:
        """Free what `node` holds: a leaf goes; an interior node drops its recurrent snapshot."""
        trie = self._trie_of(node)
        data = node.payload
        parent = node.parent
        if node.is_leaf:
            self._forget(node)
            self._evictions += 1
            self._evicted_tokens += len(node.tokens)
            logger.debug("evict [%d, %d) %d B from %s", node.start, node.end, data.nbytes, data.tier)
            self._reindex(parent)
            if not parent.is_root and len(parent.children) == 1 and not parent.payload.has_snapshot:
                self._merge(trie, parent)  # keep the trie a radix trie: no lone-child chains
            return
        if len(node.children) == 1 and self._merge(trie, node):
            return
        self._snapshots -= data.has_state
        dropped = [p for p in data.layers if isinstance(p, RecurrentPayload)]
        data.layers = tuple(None if isinstance(p, RecurrentPayload) else p for p in data.layers)
        release(dropped, self._pool)
        self._pager.bytes[data.tier] -= sum(p.nbytes for p in dropped)
        self._reindex(node)

    def _forget(self, node: Node) -> None:
        """Remove a leaf and everything it holds (memory, file, a write in flight)."""
        data = node.payload
        self._pager.unindex(node)
        self._trie_of(node).remove_leaf(node)
        if data.tier == DISK:
            if self._pending.pop(node.id, None) is None and data.disk.file:
                self._disk.delete(data.disk.file)
        else:  # a payload being written is still read by the writer: the pool gets it back later
            release(data.layers, self._pool)
        self._pager.bytes[data.tier] -= data.nbytes
        self._snapshots -= bool(self._recurrent) and data.has_state

    def _merge(self, trie: Trie, node: Node) -> bool:
        """Fold a lone-child node into its child when both are unpinned and in the same memory tier."""
        (child,) = node.children.values()
        if node.pins or child.pins or node.payload.tier != child.payload.tier or node.payload.tier == DISK:
            return False
        self._snapshots -= bool(self._recurrent) and node.payload.has_state
        before = node.payload.nbytes + child.payload.nbytes
        self._pager.unindex(node)
        self._pager.unindex(child)
        merged = trie.merge(node)
        self._pager.bytes[merged.payload.tier] += merged.payload.nbytes - before
        self._reindex(merged)
        return True

    # --- the disk tier (under the lock) ----------------------------------------------------

    def _write_back(self, node: Node) -> None:
        """Host -> disk: the payload is queued for the writer and counts on the disk tier at once."""
        data = node.payload
        ref = DiskRef("", data.nbytes, data.has_state, data.has_snapshot)
        job = WriteJob(node.id, DiskStore.new_name(), data.layers)
        self._pager.bytes[HOST] -= data.nbytes
        node.payload = NodeData(data.layers, DISK, ref)  # layers stay until the file is written
        self._pager.bytes[DISK] += data.nbytes
        self._pending[node.id] = (node, job)
        self._reindex(node)
        self._disk.submit(job)

    def _drain(self) -> None:
        """Take in finished writes: the payload now lives in its file only."""
        if self._disk is None:
            return
        while True:
            try:
                job, name, error = self._disk.done.get_nowait()
            except queue.Empty:
                return
            entry = self._pending.get(job.node_id)
            if entry is None or entry[1] is not job:  # restored or evicted meanwhile
                if name:
                    self._disk.delete(name)
                continue
            del self._pending[job.node_id]
            node = entry[0]
            if error is not None:
                self._disk_errors += 1
                logger.warning("writing a payload to %s failed (%s): dropping [%d, %d)", self._disk.dir, error, node.start, node.end)
                self._drop_subtree(node)
                continue
            node.payload = NodeData(None, DISK, attrs.evolve(node.payload.disk, file=name))
            release(job.layers, self._pool)
            self._disk_writes += 1

    def _resident(self, trie: Optional[Trie], arr: np.ndarray, match: Match, upto: int) -> tuple[Match, set[int]]:
        """Bring disk nodes of the matched path (those starting before `upto`) into host memory.

        A damaged file removes its node and everything under it: the match is redone and
        ends there, a miss from that node down.
        """
        loaded: set[int] = set()
        if self._disk is None or trie is None:
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
            layers = data.layers
        else:
            try:
                layers = self._disk.read(data.disk.file)
            except PayloadCorrupt as exc:
                self._disk_errors += 1
                logger.warning("disk payload for [%d, %d) is unusable (%s): a miss from there", node.start, node.end, exc)
                self._drop_subtree(node)
                return False
            self._disk.delete_later(data.disk.file)
            self._disk_restores += 1
        self._pager.bytes[DISK] -= data.nbytes
        node.payload = NodeData(layers, HOST)
        self._pager.bytes[HOST] += node.payload.nbytes
        self._reindex(node)
        return True

    def _drop_subtree(self, node: Node) -> None:
        """Remove a node and all its descendants (none is pinned: pins reach every ancestor)."""
        parent = node.parent
        stack, order = [node], []
        while stack:
            n = stack.pop()
            order.append(n)
            stack.extend(n.children.values())
        for n in reversed(order):  # leaves first
            self._forget(n)
        self._reindex(parent)

    def _drop_disk_nodes(self) -> None:
        for trie in self._tries.values():
            for child in list(trie.root.children.values()):
                if child.payload.tier == DISK:
                    self._drop_subtree(child)

    def _write_index(self) -> None:
        """The structure of every node whose whole path is in files, for the next process."""
        namespaces: dict[str, list] = {}
        for ns, trie in self._tries.items():
            entries = namespaces[ns] = []
            kept = {trie.root.id}
            for node, _ in trie.walk():
                data = node.payload
                if node.parent.id not in kept or data.tier != DISK or data.layers is not None:
                    continue
                kept.add(node.id)
                entries.append({
                    "id": node.id, "parent": None if node.parent.is_root else node.parent.id,
                    "tokens": node.tokens.tolist(), "file": data.disk.file,
                    "nbytes": data.nbytes, "has_state": data.has_state, "has_snapshot": data.has_snapshot,
                    "last_used": node.last_used,
                })
        self._disk.write_index({
            "format": 1,
            "fingerprint": self._fingerprint,
            "layers": [t.__name__ for t in self._layer_types],
            "signature": repr(self._signature) if self._signature is not None else self._index_signature,
            "namespaces": namespaces,
        })

    def _load_index(self) -> None:
        """Start warm from the directory's index when it was made for the same model; else cold."""
        index = self._disk.read_index()
        layers = [t.__name__ for t in self._layer_types]
        reason = None
        if index is None:
            reason = "no index"
        elif index.get("format") != 1 or index.get("layers") != layers:
            reason = "another cache layout"
        elif index.get("fingerprint") != self._fingerprint:
            reason = f"another model (fingerprint {index.get('fingerprint')!r}, not {self._fingerprint!r})"
        if reason is not None:
            if index is not None or self._disk.files():
                logger.warning("disk tier %s starts cold: %s", self._disk.dir, reason)
            self._disk.clear()
            return
        self._index_signature = index.get("signature")
        referenced = set()
        latest = 0
        for ns, entries in index["namespaces"].items():
            trie = self._tries[ns] = Trie(self._split_data, self._merge_data)
            nodes = {None: trie.root}
            for e in entries:
                parent = nodes.get(e["parent"])
                if parent is None or not e["tokens"] or int(e["tokens"][0]) in parent.children:
                    continue
                ref = DiskRef(e["file"], int(e["nbytes"]), bool(e["has_state"]), bool(e["has_snapshot"]))
                node = trie.add_child(parent, np.asarray(e["tokens"], dtype=np.int32), NodeData(None, DISK, ref))
                node.last_used = int(e["last_used"])
                latest = max(latest, node.last_used)
                nodes[e["id"]] = node
                referenced.add(ref.file)
                self._pager.bytes[DISK] += ref.nbytes
                self._snapshots += bool(self._recurrent) and ref.has_state
                self._reindex(node)
        self._clock = itertools.count(latest + 1)
        for name in self._disk.files() - referenced:
            self._disk.delete(name)
        logger.info("disk tier %s: %d nodes restored from the index", self._disk.dir, len(referenced))
        self._enforce()

    def _trie_of(self, node: Node) -> Trie:
        root = node
        while root.parent is not None:
            root = root.parent
        return next(t for t in self._tries.values() if t.root is root)
