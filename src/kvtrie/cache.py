"""PrefixCache: the facade that ties the trie, the layer payloads and the sessions together.

A request calls `begin(tokens)`, runs the model over `tokens[session.cached:]` on
`session.caches`, then `session.commit(tokens)`; only the tokens the trie did not hold
yet are stored, as new nodes or edge splits. After every public call the byte budgets
hold: least recently used payloads move from device to host memory and, past the host
budget, are evicted (`storage.py` moves payloads, `paging.py` picks them).

Concurrency: every public method takes one lock, so a PrefixCache may be shared by
several threads. Matching, restoring (the copy into the new live caches), committing,
paging and eviction run under it, one call at a time; the model's forward passes run
outside it, on each session's own live caches, and so run concurrently.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Optional, Union

import mlx.core as mx
import numpy as np

from .arrays import HostPool
from .disk import DiskStore, WriteJob
from .errors import CacheMismatchError, SessionError
from .layers import SNAPSHOT, layer_kind
from .paging import DEVICE, DISK, HOST, TIERS, Pager, check_budget, layers_to_host
from .recurrent import RecurrentPayload, RecurrentSignature, capture_recurrent, recurrent_signature, restore_recurrent
from .session import Session
from .snapshot import KVSignature, capture_kv, evaluate, kv_signature, stitch_kv
from .storage import NodeData, TieredStorage
from .trie import Match, Node, Trie, as_token_array

logger = logging.getLogger("kvtrie")

Signature = tuple[Union[KVSignature, RecurrentSignature], ...]


class PrefixCache(TieredStorage):
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
            return sum(t.num_leaves for t in self._tries.values())

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
            self._drain()
            while (max_bytes is not None and sum(pager.bytes.values()) > max_bytes) or (
                max_sequences is not None and self.num_sequences > max_sequences
            ):
                candidates = [n for n in (pager.next_eviction(t) for t in self._tiers()) if n is not None]
                if not candidates:
                    break
                node = min(candidates, key=lambda n: (n.last_used, -n.start, n.id))
                self._evict(node)

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
