"""PrefixCache: the facade that ties the trie, the layer payloads and the sessions together.

A request calls `begin(tokens)`, runs the model over `tokens[session.cached:]` on
`session.caches`, then `session.commit(tokens)`; only the tokens the trie did not hold
yet are stored, as new nodes or edge splits. After every public call the byte budgets
hold: least recently used payloads move from device to host memory and, past the host
budget, are evicted (see `paging.py`).

Concurrency: every public method takes one lock, so a PrefixCache may be shared by
several threads. Matching, restoring (the copy into the new live caches), committing,
paging and eviction run under it, one call at a time; the model's forward passes run
outside it, on each session's own live caches, and so run concurrently.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Optional, Union

import attrs
import mlx.core as mx
import numpy as np

from .arrays import HostPool
from .errors import CacheMismatchError, SessionError
from .disk import DiskRef, DiskStore, PayloadCorrupt, WriteJob
from .paging import DEVICE, DISK, HOST, TIERS, Pager, check_budget, layers_to_device, layers_to_host, release
from .layers import SNAPSHOT, layer_kind
from .recurrent import RecurrentPayload, RecurrentSignature, capture_recurrent, recurrent_signature, restore_recurrent
from .snapshot import KVPayload, KVSignature, capture_kv, evaluate, kv_signature, merge_kv, split_kv, stitch_kv
from .trie import Match, Node, Trie, as_token_array

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


class Session:
    """One request's view of the cache: restored live caches, pinned path, one commit.

    `cached` tokens were restored into `caches` (at most `len(tokens) - 1`, so the
    caller always has logits to compute). For models with recurrent layers,
    `capture_at` lists the offsets at which the caller should call `capture()` while
    prefilling (the divergence point, `len(tokens) - 1`, every `snapshot_interval`), so
    later requests that stop there restore fully. Use as a context manager: the path
    stays pinned (never evicted) until the session closes.
    """

    def __init__(
        self,
        owner: "PrefixCache",
        namespace: str,
        tokens: np.ndarray,
        cached: int,
        caches: list,
        leaf: Optional[Node],
        capture_at: tuple[int, ...] = (),
    ):
        self._owner = owner
        self.namespace = namespace
        self.tokens = tokens
        self.cached = cached
        self.caches: Optional[list] = caches
        self.capture_at = capture_at
        self._captures: dict[int, tuple[RecurrentPayload, ...]] = {}
        self._leaf = leaf
        self._committed_tokens: Optional[np.ndarray] = None
        self._committed = False
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def committed(self) -> bool:
        return self._committed

    def _check_open(self, what: str) -> None:
        if self._closed:
            raise SessionError(f"{what} on a closed session: begin a new session for this request")
        if self._committed:
            raise SessionError(f"{what} after commit: this session has already committed; begin a new one")

    def capture(self) -> int:
        """Snapshot the recurrent layers' state at the caches' current offset; returns that offset.

        Call it when the prefill reaches an offset in `capture_at`; `commit` stores the
        snapshot at that position. A no-op returning the offset for pure transformers.
        """
        self._check_open("capture")
        return self._owner._capture(self)

    def commit(self, tokens: Sequence[int], caches: Optional[list] = None) -> int:
        """Store the state of `tokens` held by `caches` (default: this session's); returns tokens added.

        The caches' offsets must equal `len(tokens)` and `tokens` must begin with the
        restored prefix. On any error nothing is stored.
        """
        self._check_open("commit")
        return self._owner._commit(self, tokens, self.caches if caches is None else caches)

    def close(self) -> None:
        """Unpin the session's path and hand its live caches back; closing twice is harmless.

        After a commit, the caches may serve the next request that continues this
        sequence without copying (see `PrefixCache(hot_sessions=...)`): do not use them
        after closing.
        """
        if not self._closed:
            self._owner._close(self)

    def __enter__(self) -> "Session":
        if self._closed:
            raise SessionError("this session is closed: begin a new one")
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("committed" if self._committed else "open")
        return f"Session({len(self.tokens)} tokens, cached={self.cached}, {state})"


Signature = tuple[Union[KVSignature, RecurrentSignature], ...]


class PrefixCache:
    """Prefix-trie KV cache: every stored token's KV exists once, any stored prefix restores.

    `make_cache` is the model's `make_cache` (a callable returning one fresh live cache
    per layer, mlx-lm's protocol). `namespace` is the default namespace (model id,
    tenant salt); different namespaces never share nodes. For models with layers whose
    cache keeps a whole state (recurrent layers of hybrid models, and the other kinds
    `kvtrie.layers` lists), sessions also plan snapshots every `snapshot_interval`
    tokens (`None`: only at divergence points and ends), at most
    `max_snapshots_per_path` of those on one path.

    `device_bytes` / `host_bytes` are byte budgets (None: unlimited). Over the device
    budget the least recently used unpinned payloads move to host memory; over the host
    budget they are evicted (leaves first; an interior node first drops its recurrent
    snapshot). Paths pinned by open sessions never move, so a session whose own path
    exceeds a budget still works, and the budget holds again once it closes.
    `promote_on_restore=True` copies restored host payloads back to the device tier;
    by default cold payloads stay on host and restore straight from there.

    `disk_dir` adds a third tier under host memory (`disk_bytes` its budget): payloads
    leaving the host go to safetensors files there (written on a background thread)
    instead of being dropped, and `close()` writes everything with an index, so a new
    PrefixCache on the same directory with the same `fingerprint` (the model's identity,
    e.g. `kvtrie.models.model_fingerprint(model)`; required with a disk) starts warm. A
    damaged or missing file is a miss from that node down, never restored state.

    The live caches of the last `hot_sessions` committed sessions are kept after they
    close: a request that continues one of those sequences (the next turn of a chat)
    takes them over as they are, with no copy. They are live caches, outside the
    budgets, like those of open sessions.
    """

    def __init__(
        self,
        make_cache: Callable[[], list],
        *,
        namespace: str = "default",
        snapshot_interval: Optional[int] = 256,
        max_snapshots_per_path: int = 32,
        device_bytes: Optional[int] = None,
        host_bytes: Optional[int] = None,
        promote_on_restore: bool = False,
        hot_sessions: int = 1,
        disk_dir: Optional[str] = None,
        disk_bytes: Optional[int] = None,
        fingerprint: Optional[str] = None,
    ):
        if not callable(make_cache):
            raise TypeError(f"make_cache must be callable (a model's make_cache), got {type(make_cache).__name__}")
        if snapshot_interval is not None:
            _check_positive_int("snapshot_interval", snapshot_interval)
        _check_positive_int("max_snapshots_per_path", max_snapshots_per_path)
        if isinstance(hot_sessions, bool) or not isinstance(hot_sessions, int) or hot_sessions < 0:
            raise ValueError(f"hot_sessions must be a non-negative int, got {hot_sessions!r}")
        pager = Pager(device_bytes, host_bytes, disk_bytes)
        if disk_dir is not None and not isinstance(fingerprint, str):
            raise TypeError(
                "a disk tier needs fingerprint=str, the model's identity (e.g. kvtrie.models.model_fingerprint(model)), "
                "so that a restart never restores another model's state"
            )
        probe = make_cache()
        if not isinstance(probe, (list, tuple)) or not probe:
            raise ValueError("make_cache() must return a non-empty list with one live cache per layer")
        self._make_cache = make_cache
        self._layer_types = tuple(type(c) for c in probe)
        self._recurrent = tuple(i for i, c in enumerate(probe) if layer_kind(c) == SNAPSHOT)
        self._namespace = self._check_namespace(namespace)
        self._interval = snapshot_interval
        self._max_snapshots = max_snapshots_per_path
        self._signature: Optional[Signature] = None
        self._tries: dict[str, Trie] = {}
        self._lock = threading.RLock()
        self._clock = itertools.count(1)
        self._pager = pager
        self._pool = HostPool()
        self._promote = bool(promote_on_restore)
        self._hot: deque[tuple[str, np.ndarray, list]] = deque(maxlen=hot_sessions or None)
        self._hot_slots = hot_sessions
        self._hot_restores = 0
        self._snapshots = 0  # nodes where a hybrid model can restore
        self._requests = 0
        self._prompt_tokens = 0
        self._cached_tokens = 0
        self._cached_by_tier = {tier: 0 for tier in TIERS}
        self._hits = 0
        self._page_outs = 0
        self._host_restores = 0
        self._evictions = 0
        self._evicted_tokens = 0
        self._disk_writes = 0
        self._disk_restores = 0
        self._disk_errors = 0
        self._closed = False
        self._fingerprint = fingerprint
        self._disk = DiskStore(disk_dir) if disk_dir is not None else None
        self._pending: dict[int, tuple[Node, WriteJob]] = {}  # node id -> (node, its write in flight)
        self._index_signature: Optional[str] = None  # the model layout the disk's state was made with
        if self._disk is not None:
            self._load_index()

    @property
    def num_layers(self) -> int:
        return len(self._layer_types)

    @property
    def budgets(self) -> dict[str, Optional[int]]:
        """The byte budget per tier (None: unlimited)."""
        budgets = dict(self._pager.budgets)
        if self._disk is None:
            del budgets[DISK]
        return budgets

    def set_budgets(self, *, device_bytes: Any = ..., host_bytes: Any = ..., disk_bytes: Any = ...) -> None:
        """Change byte budgets at run time (omit one to keep it; None = unlimited); enforced at once."""
        new = dict(self._pager.budgets)
        for tier, value in ((DEVICE, device_bytes), (HOST, host_bytes), (DISK, disk_bytes)):
            if value is not ...:
                new[tier] = check_budget(f"{tier}_bytes", value)
        with self._lock:
            self._pager.budgets.update(new)
            self._enforce()

    @property
    def recurrent_layers(self) -> tuple[int, ...]:
        """Indices of the layers whose state is a snapshot at node ends, not per-token KV."""
        return self._recurrent

    # --- the request API -----------------------------------------------------------

    def begin(
        self, tokens: Sequence[int], *, namespace: Optional[str] = None, capture_hints: Sequence[int] = ()
    ) -> Session:
        """Restore the longest usable stored prefix of `tokens` (holding back at least one token).

        For a hybrid model the usable length is the deepest node end, up to the match,
        where every recurrent layer has a snapshot. `capture_hints` are offsets where
        later requests are likely to diverge (e.g. the ends of chat messages); they join
        the session's `capture_at` plan.
        """
        arr = as_token_array(tokens)
        ns = self._namespace if namespace is None else self._check_namespace(namespace)
        hints = _check_offsets(capture_hints)
        caches = self._make_cache()
        with self._lock:
            self._check_open()
            self._drain()
            trie = self._tries.get(ns)
            match = trie.match(arr) if trie is not None else Match((), 0)
            match, from_disk = self._resident(trie, arr, match, len(arr) - 1)
            limit = min(match.length, len(arr) - 1)
            if self._recurrent:
                cached = max((n.end for n in match.path if n.end <= limit and n.payload.has_state), default=0)
            else:
                cached = limit
            hot = self._take_hot(ns, arr, cached)
            if hot is not None:
                cached, caches = len(hot[1]), hot[2]
                self._hot_restores += 1
            used = [n for n in match.path if n.start < cached]
            if used and hot is None:
                self._restore(caches, used, cached, from_disk)
            leaf = used[-1] if used else None
            capture_at = self._plan_captures(used, match.length, cached, len(arr), hints) if self._recurrent else ()
            if self._promote:
                for node in used:
                    if node.payload.tier == HOST:
                        self._move(node, DEVICE)
            self._pin(leaf, +1)
            self._touch(used)
            self._requests += 1
            self._prompt_tokens += len(arr)
            self._cached_tokens += cached
            self._hits += bool(cached)
            self._enforce()
        logger.debug(
            "begin ns=%s: %d tokens, matched %d, restored %d from %d nodes, capture at %s",
            ns, len(arr), match.length, cached, len(used), capture_at,
        )
        return Session(self, ns, arr, cached, caches, leaf, capture_at)

    def _restore(self, caches: list, used: list[Node], cached: int, from_disk: set[int]) -> None:
        """Stitch the path's KV (from either tier) into the live caches and load the recurrent state at `cached`."""
        kv = [(cache, [n.payload.layers[i] for n in used]) for i, cache in enumerate(caches) if i not in self._recurrent]
        stitch_kv(kv, cached, self._pool)
        for i in self._recurrent:
            restore_recurrent(caches[i], used[-1].payload.layers[i], cached)
        mx.eval(_live_arrays(caches))
        for node in used:
            tier = DISK if node.id in from_disk else node.payload.tier
            self._cached_by_tier[tier] += min(node.end, cached) - node.start
            self._host_restores += tier == HOST

    def _take_hot(self, ns: str, arr: np.ndarray, cached: int) -> Optional[tuple[str, np.ndarray, list]]:
        """A kept session whose sequence `arr` continues, at least as deep as the trie restore."""
        for entry in self._hot:
            hot_ns, tokens, _ = entry
            n = len(tokens)
            if hot_ns == ns and cached <= n < len(arr) and np.array_equal(arr[:n], tokens):
                self._hot.remove(entry)
                return entry
        return None

    def _plan_captures(
        self, used: list[Node], matched: int, cached: int, n: int, hints: tuple[int, ...]
    ) -> tuple[int, ...]:
        """Offsets in `(cached, n)` where this prefill should snapshot the recurrent state."""
        points = {matched, n - 1, *hints}  # where this request diverges; where its regenerate restores
        if self._interval is not None:
            room = self._max_snapshots - sum(1 for node in used if node.payload.has_state)
            first = (cached // self._interval + 1) * self._interval
            points.update(itertools.islice(range(first, n, self._interval), max(room, 0)))
        return tuple(sorted(p for p in points if cached < p < n))

    def _capture(self, session: Session) -> int:
        caches = session.caches
        offsets = {int(c.offset) for c in caches if hasattr(c, "offset")}
        if len(offsets) != 1:
            raise CacheMismatchError(f"layer caches disagree on their offset ({sorted(offsets)}); capture between forward passes")
        (offset,) = offsets
        if self._recurrent and offset > session.cached:
            if offset > len(session.tokens):
                raise CacheMismatchError(f"caches are at offset {offset}, past the {len(session.tokens)} tokens of begin()")
            snap = tuple(capture_recurrent(caches[i]) for i in self._recurrent)
            evaluate(snap)
            session._captures[offset] = snap
        return offset

    def _commit(self, session: Session, tokens: Sequence[int], caches: Any) -> int:
        arr = as_token_array(tokens)
        n = len(arr)
        agreed = max([session.cached, *session._captures])
        if n < agreed or not np.array_equal(arr[:agreed], session.tokens[:agreed]):
            raise ValueError(
                f"committed tokens must begin with the {agreed} tokens this session restored or captured; "
                "commit the prompt (plus generated tokens) that was passed to begin()"
            )
        signature = self._check_caches(caches, n)
        snapshots = dict(session._captures)
        if self._recurrent:
            final = tuple(capture_recurrent(caches[i]) for i in self._recurrent)
            evaluate(final)
            snapshots[n] = final
        with self._lock:
            if self._signature is None:
                self._signature = signature
            elif signature != self._signature:
                raise CacheMismatchError(
                    f"caches do not match this PrefixCache's model: expected {self._signature}, got {signature}"
                )
            self._check_open()
            self._drain()
            if self._index_signature is not None and repr(signature) != self._index_signature:
                logger.warning("the caches do not match the model whose state is on disk: dropping the disk tier's nodes")
                self._drop_disk_nodes()
            self._index_signature = None
            trie = self._tries.get(session.namespace)
            if trie is None:
                trie = self._tries[session.namespace] = Trie(self._split_data, self._merge_data)
            match, _ = self._resident(trie, arr, trie.match(arr), n)
            added = n - match.length
            if added:
                layers = tuple(None if i in self._recurrent else capture_kv(c, match.length, n) for i, c in enumerate(caches))
                evaluate(layers)
                parent = self._split(trie, match.last, match.length) if match.ends_mid_edge else (match.last or trie.root)
                data = NodeData(layers)
                node = trie.add_child(parent, arr[match.length :], data)
                self._pager.bytes[DEVICE] += data.nbytes
                self._reindex(node, parent)
            for offset in sorted(snapshots):
                self._attach(self._boundary(trie, arr, offset), snapshots[offset])
            leaf = self._boundary(trie, arr, n)
            self._pin(session._leaf, -1)
            self._pin(leaf, +1)
            session._leaf = leaf
            self._touch(leaf.path())
            session._committed = True
            if caches is session.caches:  # only the session's own caches may be kept hot
                session._committed_tokens = arr
            self._enforce()
        logger.debug("commit ns=%s: %d tokens, %d new, snapshots at %s", session.namespace, n, added, sorted(snapshots))
        return added

    def store(self, tokens: Sequence[int], caches: list, *, namespace: Optional[str] = None) -> int:
        """Store the state `caches` hold for `tokens` (computed elsewhere: a file, another server).

        Like a session's commit: the caches' offsets must equal `len(tokens)`; they are
        copied, never kept. Returns the number of tokens added.
        """
        arr = as_token_array(tokens)
        ns = self._namespace if namespace is None else self._check_namespace(namespace)
        session = Session(self, ns, arr, 0, None, None)
        try:
            return self._commit(session, arr, caches)
        finally:
            self._close(session)

    @property
    def num_sequences(self) -> int:
        """Stored sequences that no other extends: the leaves of the tries."""
        with self._lock:
            return sum(1 for _, node, _ in self.walk() if node.is_leaf)

    def shrink(self, *, max_sequences: Optional[int] = None, max_bytes: Optional[int] = None) -> None:
        """Evict least recently used sequences now, until at most `max_sequences` / `max_bytes` remain.

        A one-off trim (mlx-lm's `trim_to`); budgets keep holding afterwards as before.
        Pinned paths stay.
        """
        if max_sequences is not None:
            check_budget("max_sequences", max_sequences)
        if max_bytes is not None:
            check_budget("max_bytes", max_bytes)
        pager = self._pager
        with self._lock:
            leaves = self.num_sequences
            self._drain()
            while (max_bytes is not None and sum(pager.bytes.values()) > max_bytes) or (
                max_sequences is not None and leaves > max_sequences
            ):
                candidates = [n for n in (pager.next_eviction(t) for t in self._tiers()) if n is not None]
                if not candidates:
                    break
                node = min(candidates, key=lambda n: (n.last_used, -n.start, n.id))
                parent = node.parent
                was_leaf = node.is_leaf
                self._evict(node)
                if was_leaf:
                    leaves -= 1
                    leaves += parent.parent is not None and parent.is_leaf  # gone if it merged

    def _boundary(self, trie: Trie, arr: np.ndarray, offset: int) -> Node:
        """The node on `arr`'s stored path that ends exactly at `offset`, splitting an edge if needed."""
        match = trie.match(arr[:offset])
        node = match.last
        return self._split(trie, node, offset) if node.end > offset else node

    def _split(self, trie: Trie, node: Node, at: int) -> Node:
        upper = trie.split(node, at)
        self._reindex(upper, node)
        return upper

    def _attach(self, node: Node, snapshot: tuple[RecurrentPayload, ...]) -> None:
        """Give `node` the recurrent snapshot taken at its end, unless it has one already."""
        data = node.payload
        had = data.has_state
        layers = list(data.layers)
        for i, payload in zip(self._recurrent, snapshot):
            if layers[i] is None:
                if data.tier == HOST:
                    (payload,) = layers_to_host([payload], self._pool)
                layers[i] = payload
                self._pager.bytes[data.tier] += payload.nbytes
        data.layers = tuple(layers)
        self._snapshots += data.has_state and not had
        self._reindex(node)

    def _close(self, session: Session) -> None:
        with self._lock:
            if self._hot_slots and session._committed_tokens is not None and session.caches is not None:
                # evaluated here: MLX cannot evaluate another thread's pending work later
                mx.eval(_live_arrays(session.caches))
                self._hot.append((session.namespace, session._committed_tokens, session.caches))
            self._pin(session._leaf, -1)
            session._leaf = None
            session._closed = True
            session.caches = None
            session._captures = {}
            self._enforce()

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

    def _check_open(self) -> None:
        if self._closed:
            raise SessionError("this PrefixCache is closed; make a new one (on the same disk_dir to start warm)")

    def close(self) -> None:
        """With a disk tier: write every payload that fits to disk, wait for the writes, write the index.

        A new PrefixCache on the same directory (same fingerprint) then starts warm.
        Without one, just marks the cache closed. Closing twice is harmless.
        """
        with self._lock:
            if self._closed:
                return
            if self._disk is not None:
                saved = dict(self._pager.budgets)
                self._pager.budgets.update({DEVICE: 0, HOST: 0})
                self._enforce()
                self._disk.flush()
                self._drain()
                self._pager.budgets.update(saved)
                self._write_index()
                self._disk.stop()
            self._closed = True

    def __enter__(self) -> "PrefixCache":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _trie_of(self, node: Node) -> Trie:
        root = node
        while root.parent is not None:
            root = root.parent
        return next(t for t in self._tries.values() if t.root is root)

    # --- validation ----------------------------------------------------------------

    @staticmethod
    def _check_namespace(namespace: Any) -> str:
        if not isinstance(namespace, str):
            raise TypeError(f"namespace must be a str (model id, tenant salt), got {type(namespace).__name__}")
        return namespace

    def _check_caches(self, caches: Any, offset: int) -> Signature:
        if not isinstance(caches, (list, tuple)):
            raise TypeError(f"caches must be the list of live layer caches, got {type(caches).__name__}")
        if len(caches) != self.num_layers:
            raise CacheMismatchError(
                f"got caches for {len(caches)} layers, this PrefixCache's model has {self.num_layers}; "
                "pass the caches of the model whose make_cache built this PrefixCache"
            )
        signature: list[Union[KVSignature, RecurrentSignature]] = []
        for i, (c, expected) in enumerate(zip(caches, self._layer_types)):
            if type(c).__name__ != expected.__name__:  # by name: mlx-lm's KVCache may stand in for kvtrie's
                raise CacheMismatchError(f"layer {i}: expected a {expected.__name__}, got {type(c).__name__}")
            if hasattr(c, "offset") and int(c.offset) != offset:
                raise CacheMismatchError(
                    f"layer {i}: cache offset is {c.offset} but {offset} tokens were committed; "
                    "run the model over every token before committing"
                )
            if i in self._recurrent:
                signature.append(recurrent_signature(c))
                continue
            sig = kv_signature(c)
            if sig.batch != 1:
                raise CacheMismatchError(f"layer {i}: batch size {sig.batch}; a session holds one sequence (batch 1)")
            signature.append(sig)
        return tuple(signature)

    # --- bookkeeping ---------------------------------------------------------------

    def _pin(self, leaf: Optional[Node], delta: int) -> None:
        node = leaf
        while node is not None and node.parent is not None:
            node.pins += delta
            self._reindex(node)
            node = node.parent

    def _touch(self, nodes: Sequence[Node]) -> None:
        now = next(self._clock)
        for node in nodes:
            node.last_used = now
            self._reindex(node)

    # --- inspection ----------------------------------------------------------------

    def walk(self) -> Iterator[tuple[str, Node, int]]:
        """Every node as `(namespace, node, depth)`, parents before children."""
        with self._lock:
            items = [(ns, node, depth) for ns in sorted(self._tries) for node, depth in self._tries[ns].walk()]
        return iter(items)

    def stats(self) -> dict[str, int]:
        """Counters since creation and the current size of the cache."""
        with self._lock:
            return {
                "requests": self._requests,
                "hits": self._hits,
                "prompt_tokens": self._prompt_tokens,
                "cached_tokens": self._cached_tokens,
                "nodes": sum(t.num_nodes for t in self._tries.values()),
                "tokens_stored": sum(t.num_tokens for t in self._tries.values()),
                "snapshots": self._snapshots,
                "device_bytes": self._pager.bytes[DEVICE],
                "host_bytes": self._pager.bytes[HOST],
                "disk_bytes": self._pager.bytes[DISK],
                "cached_tokens_device": self._cached_by_tier[DEVICE],
                "cached_tokens_host": self._cached_by_tier[HOST],
                "cached_tokens_disk": self._cached_by_tier[DISK],
                "page_outs": self._page_outs,
                "host_restores": self._host_restores,
                "hot_restores": self._hot_restores,
                "evictions": self._evictions,
                "evicted_tokens": self._evicted_tokens,
                "disk_writes": self._disk_writes,
                "disk_restores": self._disk_restores,
                "disk_errors": self._disk_errors,
            }

    def dump(self) -> str:
        """Readable tree: one line per node, `[start, end) tokens bytes tier pinned` (+ `state` at snapshots)."""
        lines: list[str] = []
        current = None
        for ns, node, depth in self.walk():
            if ns != current:
                lines.append(f"namespace {ns!r}")
                current = ns
            head = " ".join(str(t) for t in node.tokens[:8]) + (" ..." if len(node.tokens) > 8 else "")
            state = " state" if self._recurrent and node.payload.has_state else ""
            lines.append(
                f"{'  ' * depth}[{node.start}, {node.end}) {len(node.tokens)} tokens "
                f"{node.payload.nbytes} B {node.payload.tier} pinned={node.pins}{state} <{head}>"
            )
        return "\n".join(lines)


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be at least 1, got {value}")


def _check_offsets(offsets: Any) -> tuple[int, ...]:
    try:
        values = tuple(offsets)
    except TypeError:
        raise TypeError(f"capture_hints must be a sequence of token offsets, got {type(offsets).__name__}") from None
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
            raise ValueError(f"capture_hints must be non-negative int offsets, got {v!r}")
    return tuple(int(v) for v in values)


def _live_arrays(caches: Sequence[Any]) -> list[mx.array]:
    """The arrays a list of live caches holds (their `state`, whatever its layout)."""
    return [a for c in caches for a in c.state if isinstance(a, mx.array)]
