"""The disk tier's records: which records hold each node's payload, writing them, reading them back.

`DiskTier` keeps the trie and the directory of records (`DiskStore`, disk.py) describing each
other. It tracks which records every node reads from (an edge's positions may span several,
a snapshot has its own; a record nobody reads is deleted), which nodes no record holds yet
(`persist` queues them, parents first), the writes in flight (their copies counted in the
ledger until drained), write-back (host -> disk: the memory goes once written) and fault-in
(disk -> host), and at start-up rebuilds the tries from the records alone.

A full or failing disk degrades the tier, never a request (`DiskHealth` in disk.py says when
writes are tried): a write that fails is dropped (its copies' ledger charge settled, the node
kept in memory and saved again later; one leaving memory comes back to the host tier, and the
storage evicts it if it must); while degraded, nothing is queued and a node that would need a
record to leave memory is evicted instead (`accepts`); a read that fails is a miss from that
node down; unreadable records at start-up are skipped (deleted only when damaged).

It edits the tries and the tier counters only through the storage that owns them, seen as a
`TrieHost` (storage.py's `TieredStorage`); nothing here imports storage.py.
"""

from __future__ import annotations

import hashlib
import logging
import queue
from collections.abc import Sequence
from typing import Any, Literal, Optional, Protocol, overload

import attrs
import numpy as np

from .arrays import AnyArray, HostArray, HostPool, numpy_view
from .counters import Counters
from .disk import DiskReadError, DiskRef, DiskStore, PayloadCorrupt, WriteJob, WriteSkipped
from .layers import STATE
from .ledger import DISK, HOST, IN_FLIGHT, Ledger
from .nodedata import LayerPayload, Logits, NodeData, Segment, everything
from .paging import release
from .snapshot import merge_kv, split_kv
from .trie import Node, Trie, common_prefix

logger = logging.getLogger("kvtrie")


class TrieHost(Protocol):
    """What the disk tier asks of the storage that owns the tries, their orders and the tier counters."""

    @overload
    def trie(self, namespace: str, create: Literal[True]) -> Trie: ...

    @overload
    def trie(self, namespace: str, create: bool = False) -> Optional[Trie]: ...

    def trie(self, namespace: str, create: bool = False) -> Optional[Trie]:
        """The namespace's trie (made if `create`)."""

    def tenant_of_trie(self, trie: Trie) -> str:
        """The tenant whose namespace `trie` is."""

    def namespace_of(self, node: Node) -> str:
        """The namespace whose trie holds `node`."""

    def split(self, trie: Trie, node: Node, at: int) -> Node:
        """Split `node`'s edge at `at` with its payload; the new upper node."""

    def account(self, data: NodeData, sign: int) -> None:
        """Add (+1) or remove (-1) a payload's bytes in the counters."""

    def reindex(self, *nodes: Node) -> None:
        """Re-enter nodes into the orders (after a tier change)."""

    def drop_subtree(self, node: Node) -> None:
        """Remove a node and all its descendants."""


def files_of(data: NodeData) -> list[str]:
    """The records a payload reads from (each once per use)."""
    return [seg.stem for seg in data.segments] + ([data.state_file] if data.state_file else [])


class DiskTier:
    """The disk tier's records and what each node has in them (see the module docstring)."""

    def __init__(
        self,
        store: DiskStore,
        host: TrieHost,
        kinds: tuple[str, ...],
        pool: HostPool,
        counters: Counters,
        ledger: Ledger,
        fingerprint: Optional[str] = None,
        layout: Sequence[str] = (),
    ):
        self.store = store
        self._host = host
        self.kinds = kinds
        self.hybrid = STATE in kinds
        self.pool = pool
        self.counters = counters
        self.ledger = ledger
        self._fingerprint = fingerprint
        self._layout = list(layout)
        self._degraded = store.health.degraded  # as of the last drain (the counters agree with it)
        if self._degraded:  # (the directory could not be made: a write that failed)
            counters.disk_write_errors += 1
            counters.disk_errors += 1
        self._persisting: dict[
            int, tuple[Node, WriteJob, bool]
        ] = {}  # node id -> (node, record in flight, drop memory once written)
        self._in_flight: dict[int, list[int]] = {}  # id(job) -> [bytes of its copies, bytes of node memory it holds]
        self._unsaved: dict[int, Node] = {}  # nodes whose payload no record holds yet
        self._files: dict[str, str] = {}  # record key -> file name
        self._refs: dict[str, int] = {}  # record key -> how many segments and snapshots use it
        # a record stays while records (on disk or in flight) hang off it: a start rebuilds their path from it
        self._children: dict[str, int] = {}  # record key -> records naming it as their `parent`
        self._parent_of: dict[str, str] = {}  # record key (on disk) -> its `parent`
        self.index_signature: Optional[str] = None  # the model layout the disk's state was made with
        self.signature_text: Optional[str] = None  # set by the facade once it knows the model's caches

    def settle_signature(self, text: str) -> bool:
        """The caches' signature is known (`text`): True if the records loaded at start-up were made
        with another one, so their nodes must go. Only the first call can answer True."""
        stale = self.index_signature is not None and text != self.index_signature
        self.index_signature = None
        return stale

    # --- the trie changed: records follow ------------------------------------------------------

    def unsaved(self, node: Node) -> None:
        """`node`'s payload changed: the next `persist` writes what no record holds yet."""
        self._unsaved[node.id] = node

    def split(self, before: NodeData, upper: Node, lower: Node) -> None:
        """An edge was split (its payload was `before`): the two halves read its records now, and
        a record in flight for the lower node no longer matches it."""
        self._refile(files_of(before), files_of(upper.payload) + files_of(lower.payload))
        self._supersede(lower)

    def merged(self, upper: Node, before: Sequence[NodeData], merged: Node) -> None:
        """`upper` was folded into its child `merged` (their payloads were `before`): records in
        flight for either no longer match, and the merged node reads what they read."""
        self._supersede(upper)
        self._supersede(merged)
        self._unsaved.pop(upper.id, None)
        self._refile([f for data in before for f in files_of(data)], files_of(merged.payload))
        if not self.persisted(merged):
            self.unsaved(merged)

    def release_state(self, data: NodeData) -> None:
        """The snapshot at `data`'s node changed or went: the record that held it is read no more
        from there (and is deleted once nobody reads it)."""
        if data.state_file is not None:
            self._refile([data.state_file], [])
            data.state_file = None

    def forget(self, node: Node) -> bool:
        """`node` left the trie: its records are read no more from it and a write for it is moot.
        True if the writer still reads the node's own arrays (they go when it is done)."""
        inflight = self._persisting.pop(node.id, None)
        self._unsaved.pop(node.id, None)
        self._refile(files_of(node.payload), [])
        return inflight is not None and inflight[2]

    def _supersede(self, node: Node) -> None:
        """A record in flight for `node` no longer matches it: written, it is deleted, and the node
        is saved again."""
        if self._persisting.pop(node.id, None) is not None:
            self.unsaved(node)

    def _refile(self, before: Sequence[str], after: Sequence[str]) -> None:
        """Move record references from `before` to `after`; a record nobody uses is deleted (once
        no other record hangs off it)."""
        refs = self._refs
        for stem in after:
            refs[stem] = refs.get(stem, 0) + 1
        for stem in before:
            left = refs.get(stem, 0) - 1
            if left > 0:
                refs[stem] = left
                continue
            refs.pop(stem, None)
            if not self._children.get(stem):
                self._drop_record(stem)

    def _hang(self, parent: Optional[str]) -> None:
        """A record naming `parent` as the one before it is queued (or loaded)."""
        if parent is not None:
            self._children[parent] = self._children.get(parent, 0) + 1

    def _unhang(self, parent: Optional[str]) -> None:
        """A record naming `parent` is gone, or was never written: `parent` goes too if nothing else
        uses it (a record superseded while records hung off it was kept for them)."""
        if parent is not None and self._last_child_gone(parent):
            self._drop_record(parent)

    def _last_child_gone(self, parent: str) -> bool:
        """One record fewer hangs off `parent`: True when none is left and nothing else uses it."""
        left = self._children.get(parent, 0) - 1
        if left > 0:
            self._children[parent] = left
            return False
        self._children.pop(parent, None)
        return parent not in self._refs

    def _drop_record(self, stem: str) -> None:
        """Delete a record nothing uses or hangs off, and let go of the one it hangs off (iterative:
        a chain of kept records goes at once)."""
        while True:
            name = self._files.pop(stem, None)
            parent = self._parent_of.pop(stem, None)
            if name is None:
                return
            self.store.delete_later(name)
            if parent is None or not self._last_child_gone(parent):
                return
            stem = parent

    # --- writing records -----------------------------------------------------------------------

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

    @property
    def degraded(self) -> bool:
        """Writes (or reads) failed and no write has succeeded since (see `DiskHealth`), as of the
        last `drain`, which counted those failures."""
        return self._degraded

    def accepts(self, node: Node) -> bool:
        """Whether `node` can leave memory for the disk tier now: its records all exist (or one is
        in flight), or writes are tried (the tier is healthy, or a retry is due)."""
        return self.store.health.writable() or node.id in self._persisting or self.persisted(node)

    def retry_now(self) -> None:
        """Degraded: let the next write try now (at close)."""
        self.store.health.retry_now()

    def persist(self) -> int:
        """Queue a record for every node whose payload no record holds yet (parents first, so a
        record's `parent` exists before it); returns how many were queued. Run every few
        seconds by the facade, so a process killed at any moment loses at most that much.
        While the tier is degraded (and no retry is due) nothing is queued: the nodes wait."""
        if not self._unsaved or not self.store.health.writable():
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
        holder = node if start > node.start else node.up
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
        parent = node.up
        if parent.parent is not None and not self._covered(parent) and parent.id not in self._persisting:
            queued += self._queue_record(parent)  # a record hangs off the one before it on its path
        return queued + self._queue_own(node, then_drop_memory)

    def _queue_own(self, node: Node, then_drop_memory: bool) -> int:
        data = node.payload
        if data.layers is None:
            return 0
        ns = self._host.namespace_of(node)
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
            "fingerprint": self._fingerprint,
            "layout": self._layout,
            "signature": self.signature_text,
            "namespace": ns,
            "parent": self._parent_stem(node, start),
            "start": start,
            "tokens": [] if state_only else node.tokens.tolist(),
            "kv": not state_only,
            "has_state": data.has_state,
            "has_snapshot": data.has_snapshot,
            "logits": data.logits is not None,
            "reasons": data.reasons,
            "last_used": node.last_used,
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
            job = WriteJob(
                node.id,
                stem,
                tuple(_for_writer(p) for p in layers),
                None if data.logits is None else _writer_array(data.logits),
                record,
                data,
                state_only,
                True,
            )
        self._persisting[node.id] = (node, job, then_drop_memory)
        self._hang(record["parent"])
        if job.copies:
            self._charge(
                job,
                copies=sum(a.nbytes for p in job.layers if p is not None for a in p.arrays)
                + (job.logits.nbytes if job.logits is not None else 0),
            )
        else:  # the node counts on the disk tier; its memory goes when the record is written
            self._charge(job, memory=data.nbytes)
        self.store.submit(job)
        return 1

    def _applied(self, node: Node, stem: str, record: dict) -> None:
        """`node`'s payload (or snapshot) is in the record `stem` now."""
        data = node.payload
        before = files_of(data)
        if record["kv"]:
            data.segments = (Segment(stem, 0, len(record["tokens"])),)
        if record["has_snapshot"] and data.has_snapshot and (record["logits"] or data.logits is None):
            data.state_file = stem
        self._refile(before, files_of(data))

    def write_back(self, node: Node) -> None:
        """Host -> disk: the payload counts on the disk tier at once; a node whose records all
        exist needs no write, else its record is queued and its memory goes once written."""
        host = self._host
        data = node.payload
        ref = DiskRef(data.nbytes, data.snapshot_nbytes, data.has_state, data.has_snapshot)
        host.account(data, -1)
        node.payload = attrs.evolve(data, tier=DISK, disk=ref)  # layers stay until the record is written
        host.account(node.payload, +1)
        inflight = self._persisting.get(node.id)
        if inflight is not None and not inflight[2]:  # a copy is being written: drop memory when it lands
            self._persisting[node.id] = (inflight[0], inflight[1], True)
            self._charge(inflight[1], memory=data.nbytes)  # (no tier counts the node's memory until then)
        else:
            if not self.persisted(node):
                self._queue_record(node, then_drop_memory=True)
            if node.id not in self._persisting:  # its records were all there
                self._drop_memory(node)
        host.reindex(node)

    def _drop_memory(self, node: Node) -> None:
        data = node.payload
        release(everything(data), self.pool)
        node.payload = attrs.evolve(data, layers=None, logits=None)
        self._unsaved.pop(node.id, None)

    def drain(self) -> int:
        """Take in finished writes: the records are the nodes' from now on. A write that failed
        (or was skipped while degraded) leaves its node in memory, to be saved again; returns how
        many nodes came back to the host tier that way (the caller enforces the budgets)."""
        host = self._host
        returned = 0
        degraded = self.store.health.degraded  # (first: the writes that changed it are in `done`)
        while True:
            try:
                job, name, error = self.store.done.get_nowait()
            except queue.Empty:
                self._degraded = degraded
                return returned
            if isinstance(job, str):  # a delete failed (the file stays; a later start may load it: it is whole)
                self._count_write_error()
                logger.debug("deleting %s failed (%s)", job, error)
                continue
            self._settle(job)
            if job.copies:
                release(
                    list(p for p in job.layers if p is not None)
                    + ([Logits(job.logits)] if job.logits is not None else []),
                    self.pool,
                )
            entry = self._persisting.get(job.node_id)
            if entry is not None and entry[1] is not job:
                entry = None  # (the node's current write is a later one)
            if entry is not None:
                del self._persisting[job.node_id]
            if error is not None:
                self._unhang(job.record["parent"])
                if not isinstance(error, WriteSkipped):
                    self._count_write_error()
                    logger.debug("writing a record to %s failed (%s)", self.store.dir, error)
                if entry is not None:
                    back = entry[0]
                    if entry[2]:  # its memory was to go: the node is back in the host tier
                        host.account(back.payload, -1)
                        back.payload = attrs.evolve(back.payload, tier=HOST, disk=None)
                        host.account(back.payload, +1)
                        host.reindex(back)
                        returned += 1
                    self.unsaved(back)  # (written once writes resume)
                continue
            node = entry[0] if entry is not None else None
            assert name is not None  # (a write that succeeded names its file)
            record = job.record
            start = record["start"]
            span = (start, start + len(record["tokens"])) if record["kv"] else None
            superseded = (
                node is None
                or (span is not None and span != (node.start, node.end))
                or (span is None and start != node.end)
            )
            if superseded and node is not None:
                self.unsaved(node)
            if not self._keep_written(job, name, superseded):
                continue
            assert node is not None and entry is not None  # (kept: not superseded, so the node's current write)
            self.counters.disk_writes += 1
            self._applied(node, job.stem, record)
            if entry[2]:
                self._drop_memory(node)
            elif not self.persisted(node):
                self.unsaved(node)

    def _keep_written(self, job: WriteJob, name: str, superseded: bool) -> bool:
        """A record was written: keep it (True: it is the node's now), or, where its node changed or
        went meanwhile, delete it unless records hang off it (they were queued naming it: it is kept
        for them, read by no node). A second file of the same key (identical content) goes."""
        parent = job.record["parent"]
        known = self._files.get(job.stem)
        if known is not None:  # (written twice: the first one stays)
            if known != name:
                self.store.delete_later(name)
            self._unhang(parent)
            return not superseded
        if superseded and not self._children.get(job.stem):
            self.store.delete_later(name)
            self._unhang(parent)
            return False
        self._files[job.stem] = name
        if parent is not None:
            self._parent_of[job.stem] = parent
        return not superseded

    def _delete_now(self, name: str) -> None:
        if not self.store.delete_quietly(name):
            self._count_write_error()

    def _count_write_error(self) -> None:
        self.counters.disk_write_errors += 1
        self.counters.disk_errors += 1

    def flush(self) -> None:
        """Wait until every queued write has finished (the next `drain` takes them in)."""
        self.store.flush()

    def close(self) -> None:
        """Finish the queued writes and stop the writer thread; the records stay for the next start."""
        self.store.stop()

    # --- copies in flight to the disk writer (in the ledger) -------------------------------------

    def _charge(self, job: WriteJob, copies: int = 0, memory: int = 0) -> None:
        """`job` holds `copies` more bytes of copies / `memory` more bytes of a node's own arrays
        until it is drained (negative: less)."""
        entry = self._in_flight.setdefault(id(job), [0, 0])
        entry[0] += copies
        entry[1] += memory
        self.ledger.add(IN_FLIGHT, HOST, copies + memory)

    def _settle(self, job: WriteJob) -> None:
        """`job` is drained: the bytes it held are released (or, for node memory, payload again)."""
        entry = self._in_flight.pop(id(job), None)
        if entry is not None:
            self.ledger.add(IN_FLIGHT, HOST, -(entry[0] + entry[1]))

    # --- reading records -----------------------------------------------------------------------

    def fault_in(self, node: Node) -> bool:
        """Disk -> host for one node (its records stay); False, and the subtree gone, if one of
        its records is damaged or missing."""
        host = self._host
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
            except Exception as exc:  # (PayloadCorrupt, DiskReadError, or a record that does not fit)
                self.counters.disk_read_errors += 1
                self.counters.disk_errors += 1
                if isinstance(exc, DiskReadError):  # the disk fails: one warning for the episode
                    self.store.health.failed(exc, "reading a record")
                    self._degraded = True
                    logger.debug(
                        "reading a record of [%d, %d) failed (%s): a miss from there", node.start, node.end, exc
                    )
                else:
                    logger.warning(
                        "a record of [%d, %d) is unusable (%s): a miss from there", node.start, node.end, exc
                    )
                host.drop_subtree(node)
                return False
            self.counters.disk_restores += 1
        host.account(data, -1)
        node.payload = attrs.evolve(data, layers=tuple(layers), logits=logits, tier=HOST, disk=None)
        host.account(node.payload, +1)
        host.reindex(node)
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
                read[stem] = self.store.read(name, self.pool)
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

    # --- start-up: the tries from the records ----------------------------------------------------

    def load(self) -> int:
        """Rebuild every namespace's trie on the disk tier from the directory's records that were
        made for the same model (any others are deleted), records of one path hanging off the
        record before them; an orphan (its parent gone) is deleted. Returns the last clock tick
        a record was used at; the caller enters the nodes into its orders.

        A record the disk fails to read (EIO) is skipped and left for a later start, and so are
        the records hanging off it; a damaged one is deleted; one warning says how many.
        """
        store = self.store
        found = []
        damaged, unread, first = 0, set(), None
        try:
            names = sorted(store.files())
        except OSError as exc:  # the directory cannot be listed: start cold (the tier is degraded)
            store.health.failed(exc, "listing the records")
            self.counters.disk_read_errors += 1
            self.counters.disk_errors += 1
            self._degraded = True
            return 0
        for name in names:
            try:
                record = store.header(name)
            except PayloadCorrupt as exc:
                self.counters.disk_read_errors += 1
                self.counters.disk_errors += 1
                first = first or exc
                if isinstance(exc, DiskReadError):
                    unread.add(DiskStore.stem(name))
                else:
                    damaged += 1
                    self._delete_now(name)
                continue
            found.append((name, record))
        if first is not None:  # one warning
            summary = (
                f"{damaged + len(unread)} unreadable records skipped ({damaged} damaged, deleted; {len(unread)} "
                f"the disk failed to read, left for a later start), the first: {first}"
            )
            if unread:  # the disk fails: the tier is degraded (its warning says this)
                store.health.failed(summary, "reading the records")
            else:
                logger.warning("disk tier %s: %s", store.dir, summary)
        foreign = [n for n, r in found if r.get("fingerprint") != self._fingerprint or r.get("layout") != self._layout]
        if foreign:
            logger.warning("disk tier %s: %d records of another model or cache layout deleted", store.dir, len(foreign))
            for name in foreign:
                self._delete_now(name)
        gone = set(foreign)
        records = {DiskStore.stem(n): (n, r) for n, r in found if n not in gone}
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
                if record.get("parent") in unread:  # hangs off a record not read this time: kept for later
                    unread.add(stem)
                else:
                    self._delete_now(name)
                continue
            self._files[stem] = name
            if record.get("parent") is not None:
                self._parent_of[stem] = record["parent"]
                self._hang(record["parent"])
            ends[stem] = node
            loaded += 1
            latest = max(latest, int(record.get("last_used", 0)))
            if self.index_signature is None:
                self.index_signature = record.get("signature")
        for stem in [s for s in self._files if s not in self._refs]:  # loaded, but nothing uses it
            if stem in self._files and not self._children.get(stem):
                self._drop_record(stem)  # (and what it hangs off, if that is left unused)
        self._degraded = store.health.degraded
        logger.info("disk tier %s: %d records restored", store.dir, loaded)
        return latest

    def _insert_record(self, stem: str, record: dict, ends: dict[str, Node]) -> Optional[Node]:
        """Hang one record's positions (or its state) in the trie on the disk tier; the node that
        ends where the record ends, or None for an orphan."""
        host = self._host
        ns, start, tokens = record["namespace"], int(record["start"]), np.asarray(record["tokens"], dtype=np.int32)
        trie = host.trie(ns, create=True)
        parent_stem = record.get("parent")
        at: Optional[Node]
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
            common = common_prefix(child.tokens, tokens[i:])
            if common < len(child.tokens):
                node = host.split(trie, child, child.start + common)
                i += common
                break
            node, i = child, i + common
        if i < len(tokens):
            n = len(tokens)
            per_token = int(record["kv_nbytes"]) // n
            data = NodeData(
                None,
                self.kinds,
                DISK,
                DiskRef(per_token * (n - i), 0, not self.hybrid, False),
                reasons=int(record["reasons"]),
                tenant=host.tenant_of_trie(trie),
            )
            data.segments = (Segment(stem, i, n - i),)
            child = trie.add_child(node, tokens[i:], data)
            child.last_used = int(record.get("last_used", 0))
            host.account(data, +1)
            self._refile((), files_of(data))
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
            return self._host.split(trie, node, position)
        return node if node.end == position else None

    def _attach_record_state(self, node: Node, stem: str, record: dict) -> None:
        data = node.payload
        if node.parent is None or data.tier != DISK or data.state_file is not None:
            return
        self._host.account(data, -1)
        ref = data.disk
        data.disk = DiskRef(
            ref.nbytes + int(record["snapshot_nbytes"]),
            int(record["snapshot_nbytes"]),
            bool(record["has_state"]),
            bool(record["has_snapshot"]),
        )
        data.state_file = stem
        data.reasons |= int(record["reasons"])
        self._host.account(data, +1)
        self._refile((), [stem])


def _writer_array(a: AnyArray) -> HostArray:
    """A copy of `a` the writer thread can read while the node's own arrays move or go."""
    return HostArray(np.array(numpy_view(a)), a.dtype)


def _for_writer(p: LayerPayload) -> LayerPayload:
    return None if p is None else p.map(_writer_array)
