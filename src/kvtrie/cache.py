"""PrefixCache: the facade that ties the trie, the layer payloads, the policy and the sessions together.

A request calls `begin(tokens)`, runs the model over `tokens[session.cached:]` on
`session.caches`, then `session.commit(tokens)`; only the tokens the trie did not hold
yet are stored, as new nodes or edge splits. After every public call the byte budgets
hold: the least valuable payloads (the policy's order) move from device to host memory
and, past the host budget, to disk or out (`storage.py` moves them, `persistence.py` keeps
the disk's records, `paging.py` and `policy.py` pick them).

Concurrency: every public method takes one lock, so a PrefixCache may be shared by
several threads. Matching, restoring (the copy into the new live caches), committing,
paging and eviction run under it, one call at a time; the model's forward passes run
outside it, on each session's own live caches, and so run concurrently.

Users steer it too: pins keep stored prefixes through any pressure (`kvtrie.pins`), clears drop
what is no longer wanted, and every restore that fell short says why (`kvtrie.misses`).
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Optional

import mlx.core as mx
import numpy as np

from .arrays import HostArray, on_cpu, to_device, tree_items
from .counters import Counters
from .disk import DiskStore
from .errors import CacheMismatchError, PinError, SessionError
from .history import History
from .layers import KV, STATE, WINDOW, KVRule, StateRule, WindowRule, leaves, rule_for
from .ledger import HOT, IN_FLIGHT, MLX_CACHE, POOL, RECYCLED, Ledger
from .misses import (
    BLOCK,
    EVICTED,
    NEW_PREFIX,
    NO_SNAPSHOT,
    NOT_CACHED,
    OTHER_NAMESPACE,
    WINDOW_HOLE,
    Recent,
    wanted,
)
from .nodedata import NodeData
from .paging import DEVICE, DISK, HOST, Pager, check_budget
from .pins import Pin, Pins, check_ttl, held_bytes
from .policy import END, POLICIES, REASON_NAMES, PlanRequest, WorthPolicy
from .recycle import Recycler
from .session import Session
from .shared import SharedTier, secret_bytes
from .snapshot import KVPayload, Piece, capture_tokens, evaluate, lays_out_in_numpy, stitch
from .storage import TieredStorage
from .tenants import share_function
from .trie import Match, Node, Tokens, as_token_array, common_prefix
from .window import Recorder, record, recorder_of, restorable, restorable_max

logger = logging.getLogger("kvtrie")


class PrefixCache:
    """Prefix-trie KV cache: every stored token's KV exists once, any stored prefix restores.

    `make_cache` is the model's `make_cache` (a callable returning one fresh live cache
    per layer, mlx-lm's protocol; `CacheList`s are expanded). `namespace` is the default
    namespace (model id, tenant salt); different namespaces never share nodes.

    Layers whose cache keeps a whole state (recurrent layers of hybrid models) are
    restorable only where a snapshot was taken: `policy="worth"` (default) plans them at
    divergence points, hints, prompt ends and every `snapshot_interval` tokens of new
    territory, and keeps the ones that pay for themselves (see `kvtrie.policy`);
    `policy="lru"` is the plain least-recently-used ablation. Sliding-window and chunked
    layers are stored per token like full attention.

    `device_bytes` / `host_bytes` are byte budgets (None: unlimited). Over the device
    budget the least valuable unpinned payloads move to host memory; over the host budget
    they go (leaves first; an interior node first drops its recurrent snapshot). Paths
    pinned by open sessions never move, so a session whose own path exceeds a budget
    still works, and the budget holds again once it closes. `promote_on_restore=True`
    copies restored host payloads back to the device tier.

    `disk_dir` adds a third tier under host memory (`disk_bytes` its budget): every stored
    payload is also written there as a self-describing record (on a background thread,
    within `persist_seconds` of being stored, each once), payloads leaving the host keep
    only their records instead of being dropped, and a new PrefixCache on the same directory
    with the same `fingerprint` (the model's identity, e.g.
    `kvtrie.models.model_fingerprint(model)`; required with a disk) starts warm from the
    records, after `close()` or after any end of the process (kill -9 included): what was
    stored more than `persist_seconds` (plus the write) before survives. A damaged or missing
    record is a miss from that node down, never restored state. A full or failing disk
    (ENOSPC, EIO, ...) never fails a call: the tier degrades to memory only (one warning,
    `stats()["disk_degraded"]`, `disk_write_errors` / `disk_read_errors`), retries writes
    every few seconds and resumes when one succeeds.

    `shared_url` (`redis://HOST:PORT/DB`, `rediss://`, a password in the URL, or any node of
    a Redis Cluster; needs `fingerprint`) adds a tier shared by processes and machines
    (`kvtrie.shared`): what is stored is published in the background as blocks of
    `shared_block_tokens` tokens (and snapshots), and a request whose local restore is shorter
    than what the shared tier holds brings the rest from there into the local tiers. Any
    Redis failure is a miss (`stats()["shared_errors"]`), never an error or a wrong state.
    `shared_secret` (bytes or str) authenticates the shared tier: values carry a keyed MAC and
    keys derive from the secret, so only processes with the same secret share blocks; a value
    that fails its MAC is a miss (`stats()["shared_rejected"]`). Values are not encrypted.

    The live caches of the last `hot_sessions` committed sessions are kept after they
    close: a request that continues one of those sequences takes them over as they are,
    with no copy.

    On the CPU a restore writes the stored bytes once, straight into new live arrays. Those
    are recycled from the live caches of closed sessions once nothing else refers to them
    (`kvtrie.recycle`: MLX itself proves no one else holds the buffer); otherwise they are
    zero-filled first (and, fresh from the OS, page-faulted), which costs more than the copy.
    `recycle_bytes` caps the kept arrays (0 turns recycling off; None: what the device budget
    leaves, or with no device budget one restore's worth, the largest closed session's caches).

    Every byte kvtrie keeps in memory is in one ledger (`kvtrie.ledger`), and the budgets
    bound all of it, not only the payloads: device = payloads there + hot sessions' caches +
    recycled arrays (+ MLX's buffer cache, with `mlx_cache_bytes`); host = payloads there + the
    free host pool + copies in flight to the disk writer and the shared tier. Under pressure
    the cheapest goes first: MLX's buffer cache and the free pool, then recycled arrays, then
    hot sessions, then payloads in the policy's order. The live caches of open sessions are
    the working set: reported (`stats()["in_use_bytes"]`), outside the budgets while they are
    open. `mlx_cache_bytes` (None: MLX's limit is left alone, and not counted) lets kvtrie set
    MLX's buffer-cache limit, process-wide, to at most that and what the device budget leaves.

    Control: `pin(tokens, ttl=...)` keeps a stored prefix whatever the policy does (in memory,
    within the budgets), `unpin` ends that, `clear()` drops everything, a namespace or a prefix,
    `lookup(tokens)` says how much is restorable. Each session's `miss_reason` says why it
    restored less than it could have (`kvtrie.misses`), counted in `stats()["miss_reasons"]`.

    Tenants: a namespace's tenant is what precedes its first "/" (`kvtrie.tenants`: a server's
    tenant "alice" and her salted requests, "alice/salt:..."). `tenant_bytes` (an int for every
    tenant, or a mapping by tenant name with "*" for the others) is each tenant's fair share of
    memory (device + host payloads): while some tier is over its budget, the payloads of a tenant
    past its share move down and go first, so one tenant's burst cannot flush the others. Shares
    are not reservations: a tenant may use memory nobody else needs. `stats()["tenants"]` has each
    tenant's payload bytes per tier.
    """

    def __init__(
        self,
        make_cache: Callable[[], list],
        *,
        namespace: str = "default",
        snapshot_interval: Optional[int] = 256,
        max_snapshots_per_path: int = 32,
        policy: str = "worth",
        speculative_ratio: float = 0.4,
        device_bytes: Optional[int] = None,
        host_bytes: Optional[int] = None,
        promote_on_restore: bool = False,
        hot_sessions: int = 1,
        disk_dir: Optional[str] = None,
        disk_bytes: Optional[int] = None,
        fingerprint: Optional[str] = None,
        persist_seconds: Optional[float] = 2.0,
        shared_url: Optional[str] = None,
        shared_block_tokens: int = 256,
        shared_timeout: float = 0.25,
        shared_secret: Optional[bytes | str] = None,
        recycle_bytes: Optional[int] = None,
        mlx_cache_bytes: Optional[int] = None,
        tenant_bytes: Optional[int | Mapping[str, int]] = None,
    ):
        shares = share_function(tenant_bytes)  # (checked before anything is built)
        if shared_secret is not None:  # before anything is built
            shared_secret = secret_bytes(shared_secret)
            if shared_url is None:
                raise ValueError("shared_secret needs shared_url (it authenticates the shared tier)")
        if not callable(make_cache):
            raise TypeError(f"make_cache must be callable (a model's make_cache), got {type(make_cache).__name__}")
        if snapshot_interval is not None:
            _check_positive_int("snapshot_interval", snapshot_interval)
        _check_positive_int("max_snapshots_per_path", max_snapshots_per_path)
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {sorted(POLICIES)}, got {policy!r}")
        if (
            isinstance(speculative_ratio, bool)
            or not isinstance(speculative_ratio, (int, float))
            or speculative_ratio < 0
        ):
            raise ValueError(f"speculative_ratio must be a non-negative number, got {speculative_ratio!r}")
        if isinstance(hot_sessions, bool) or not isinstance(hot_sessions, int) or hot_sessions < 0:
            raise ValueError(f"hot_sessions must be a non-negative int, got {hot_sessions!r}")
        check_budget("recycle_bytes", recycle_bytes)
        check_budget("mlx_cache_bytes", mlx_cache_bytes)
        if persist_seconds is not None and (
            isinstance(persist_seconds, bool)
            or not isinstance(persist_seconds, (int, float))
            or not persist_seconds > 0
        ):
            raise ValueError(f"persist_seconds must be a positive number of seconds or None, got {persist_seconds!r}")
        if shared_url is not None and not isinstance(fingerprint, str):
            raise TypeError(
                "a shared tier needs fingerprint=str, the model's identity (e.g. kvtrie.models.model_fingerprint(model)): "
                "processes share blocks only with the same fingerprint"
            )
        if disk_dir is not None and not isinstance(fingerprint, str):
            raise TypeError(
                "a disk tier needs fingerprint=str, the model's identity (e.g. kvtrie.models.model_fingerprint(model)), "
                "so that a restart never restores another model's state"
            )
        probe = make_cache()
        if not isinstance(probe, (list, tuple)) or not probe:
            raise ValueError("make_cache() must return a non-empty list with one live cache per layer")
        probe_leaves = leaves(probe)
        self._rules = tuple(rule_for(c) for c in probe_leaves)
        self._kinds = tuple(r.kind for r in self._rules)
        self._window_layers = tuple(i for i, k in enumerate(self._kinds) if k == WINDOW)
        self._state_layers = tuple(i for i, k in enumerate(self._kinds) if k == STATE)
        # the rules by kind, typed (a rule's kind is its class's)
        self._window_rules = {i: r for i, r in enumerate(self._rules) if isinstance(r, WindowRule)}
        self._state_rules = {i: r for i, r in enumerate(self._rules) if isinstance(r, StateRule)}
        self._geometry = {i: r.geometry(probe_leaves[i]) for i, r in self._window_rules.items()}
        self._layer_types = tuple(type(c).__name__ for c in probe_leaves)
        self._make_cache = make_cache
        self._namespace = self._check_namespace(namespace)
        self._policy: WorthPolicy = POLICIES[policy](
            snapshot_interval, max_snapshots_per_path, float(speculative_ratio)
        )
        self._policy.hybrid = STATE in self._kinds
        self._counters = Counters()
        self._ledger = ledger = Ledger({})
        worth = self._policy
        pager = Pager(
            device_bytes,
            host_bytes,
            disk_bytes,
            key=worth.key,
            ledger=ledger,
            deadline=worth.deadline,
            now=lambda: worth.now,
        )
        pager.set_shares(shares)
        self._policy.bounded = pager.bounded
        self._storage = TieredStorage(
            self._kinds,
            pager,
            self._policy,
            self._counters,
            DiskStore(disk_dir) if disk_dir is not None else None,
            fingerprint,
            layout=[f"{t}:{k}" for t, k in zip(self._layer_types, self._kinds)],
        )
        self._signature: Optional[tuple] = None
        self._signature_text: Optional[str] = None  # its repr, as records on disk and in the shared tier carry it
        self._lock = threading.RLock()
        self._promote = bool(promote_on_restore)
        self._hot: deque[tuple[str, np.ndarray, list, int]] = deque(maxlen=hot_sessions or None)
        self._hot_slots = hot_sessions
        self._hot_bytes = 0
        self._recycler = Recycler(recycle_bytes, room=lambda: ledger.room(DEVICE, RECYCLED))
        self._open: weakref.WeakSet[Session] = weakref.WeakSet()
        # what came back after its payloads went (per-token models, whose order learns reuse intervals)
        self._history = History(self._policy.chunk_tokens or 256) if self._policy.admits else None
        self._committed_blocks = History(BLOCK, capacity=1 << 15)  # what was stored once: tells `evicted` misses
        self._recent = Recent()  # the last requests' prompts: tells `not_cached` misses
        self._recent_stored = Recent()  # the last commits' sequences: tells `evicted` misses finer than a block
        self._pins = Pins(time.monotonic)
        self._mlx_cache_cap = mlx_cache_bytes
        self._mlx_cache_limit: Optional[int] = None
        self._closed = False
        # the holders besides payloads, in the order they give bytes back under pressure
        if mlx_cache_bytes is not None:
            ledger.register(MLX_CACHE, DEVICE, mx.get_cache_memory, self._release_mlx_cache)
        pool = self._storage.pool
        ledger.register(POOL, HOST, lambda: pool.free_bytes, pool.trim)
        ledger.register(RECYCLED, DEVICE, lambda: self._recycler.kept_bytes, self._recycler.trim)
        ledger.register(HOT, DEVICE, lambda: self._hot_bytes, self._release_hot)
        ledger.register_pushed(IN_FLIGHT, HOST)
        self._shared: Optional[SharedTier] = None
        if shared_url is not None:
            assert isinstance(fingerprint, str)  # (checked above)
            self._shared = SharedTier(
                shared_url,
                fingerprint=fingerprint,
                layout=[f"{t}:{k}" for t, k in zip(self._layer_types, self._kinds)],
                kinds=self._kinds,
                block_tokens=shared_block_tokens,
                timeout=float(shared_timeout),
                ledger=ledger,
                secret=shared_secret,
            )
        self._stop_persisting = threading.Event()
        self._persister: Optional[threading.Thread] = None
        if self._storage.disk is not None:
            self._storage.load_records()
            if persist_seconds is not None:
                self._persister = threading.Thread(
                    target=self._persist_loop, args=(float(persist_seconds),), name="kvtrie-persist", daemon=True
                )
                self._persister.start()

    @property
    def num_layers(self) -> int:
        """Leaf caches per model (a `CacheList` counts each of its caches)."""
        return len(self._kinds)

    @property
    def layer_kinds(self) -> tuple[str, ...]:
        """`"kv"`, `"window"` or `"state"` per leaf cache (see `kvtrie.layers`)."""
        return self._kinds

    @property
    def recurrent_layers(self) -> tuple[int, ...]:
        """Indices of the leaf caches whose state is a snapshot at node ends, not per-token KV."""
        return tuple(i for i, k in enumerate(self._kinds) if k == STATE)

    @property
    def policy(self) -> WorthPolicy:
        return self._policy

    @property
    def budgets(self) -> dict[str, Optional[int]]:
        """The byte budget per tier (None: unlimited)."""
        budgets = dict(self._storage.pager.budgets)
        if self._storage.disk is None:
            del budgets[DISK]
        return budgets

    def set_budgets(self, *, device_bytes: Any = ..., host_bytes: Any = ..., disk_bytes: Any = ...) -> None:
        """Change byte budgets at run time (omit one to keep it; None = unlimited); enforced at once."""
        pager = self._storage.pager
        new = dict(pager.budgets)
        for tier, value in ((DEVICE, device_bytes), (HOST, host_bytes), (DISK, disk_bytes)):
            if value is not ...:
                new[tier] = check_budget(f"{tier}_bytes", value)
        with self._lock:
            self._expire_pins()
            pager.budgets.update(new)
            self._policy.bounded = pager.bounded
            self._fit_pins()  # pinned bytes within the new budgets: the soonest to expire give way first
            self._enforce()

    # --- the request API -----------------------------------------------------------

    def begin(
        self,
        tokens: Tokens,
        *,
        namespace: Optional[str] = None,
        capture_hints: Sequence[int] = (),
        reuse_logits: bool = False,
    ) -> Session:
        """Restore the longest usable stored prefix of `tokens` (holding back at least one token).

        For a model with whole-state layers the usable length is the deepest node end,
        up to the match, where every such layer has a snapshot. `capture_hints` are
        offsets where later requests are likely to diverge (e.g. the ends of chat
        messages). With `reuse_logits=True` the caller promises to pass the last logits to
        `capture()` at the prompt's end, and accepts a whole-prompt restore: when the
        prompt is stored with its logits, `session.logits` holds them and nothing is left
        to prefill (a regenerated answer costs no prefill at all).
        """
        arr = as_token_array(tokens)
        ns = self._namespace if namespace is None else self._check_namespace(namespace)
        hints = _check_offsets(capture_hints) if capture_hints else ()
        caches = self._make_cache()
        storage = self._storage
        with self._lock:
            self._check_open()
            storage.drain()
            self._expire_pins()
            trie = storage.trie(ns)
            match = trie.match(arr) if trie is not None else Match((), 0)
            match, from_disk = storage.resident(trie, arr, match, len(arr))
            if self._shared is not None and self._fill_from_shared(self._shared, ns, arr, match):
                trie = storage.trie(ns, create=True)  # (the fill made it)
                match, more = storage.resident(trie, arr, trie.match(arr), len(arr))
                from_disk |= more
            cached, full = self._usable(match, len(arr), bool(reuse_logits))
            hot = self._take_hot(ns, arr, cached)
            if hot is not None:
                cached, caches, full = len(hot[1]), hot[2], None
                self._counters.hot_restores += 1
            used = [n for n in match.path if n.start < cached]
            logits = None
            if used and hot is None:
                self._restore(leaves(caches), used, cached, from_disk)
                if full is not None:
                    logits = _device(full.payload.logits)
                    self._counters.logits_restores += 1
            if hot is None and self._window_layers:
                live = leaves(caches)
                for i in self._window_layers:
                    record(live[i], cached)
            last = match.last
            plan: tuple[tuple[int, int], ...] = ()
            if self._policy.hybrid:  # (only whole-state layers are captured)
                plan = self._policy.plan(
                    PlanRequest(
                        tuple(match.path),
                        match.length,
                        cached,
                        len(arr),
                        hints,
                        bool(reuse_logits),
                        last is not None and last.is_leaf and match.length == last.end,
                    )
                )
            reason = self._miss_reason(ns, arr, match, cached) if cached < len(arr) - 1 else None
            self._recent.add(ns, arr)
            if self._promote:
                pinned = self._pins.nodes() if len(self._pins) else {}  # (pinned payloads stay where they are)
                for node in used:
                    if node.payload.tier == HOST and node.id not in pinned:
                        storage.move(node, DEVICE)
            leaf = used[-1] if used else None
            storage.pin(leaf, +1, reindex=False)  # (`used` is the leaf's path: touch re-enters it in the orders)
            if self._policy.hybrid or not used or used[-1].end <= cached:
                storage.touch(used, reused=True)
            else:  # the last node was restored in part: only its commit (which splits it there) uses it
                storage.touch(used[:-1], reused=True)
                storage.reindex(used[-1])
            c = self._counters
            c.requests += 1
            c.prompt_tokens += len(arr)
            c.cached_tokens += cached
            c.hits += bool(cached)
            c.snapshots_used += bool(self._policy.hybrid and cached and hot is None)
            if reason is not None:
                c.miss_reasons[reason] += 1
            self._enforce()
        session = Session(self, ns, arr, cached, caches, leaf, plan, logits, reason)
        self._open.add(session)
        logger.debug(
            "begin ns=%s: %d tokens, matched %d, restored %d from %d nodes, capture at %s, miss: %s",
            ns,
            len(arr),
            match.length,
            cached,
            len(used),
            plan,
            reason,
        )
        return session

    def _miss_reason(self, ns: str, arr: np.ndarray, match: Match, cached: int) -> Optional[str]:
        """Why a request restored `cached` < `len(arr) - 1` tokens (see `kvtrie.misses`; None: the
        rest is simply new). At most one pass over the tokens per check."""
        n = len(arr)
        limit = min(match.length, n - 1)
        if cached < limit:  # the trie held more than could be restored
            if self._policy.hybrid and not any(cached < x.end <= limit and x.payload.has_state for x in match.path):
                return NO_SNAPSHOT
            return WINDOW_HOLE  # (a snapshot past `cached`, or a per-token model: the windows stopped it)
        if self._committed_blocks.seen(ns, arr, cached) or self._recent_stored.saw(ns, arr, cached + 1):
            return EVICTED
        need = wanted(cached, n)
        for other, trie in self._storage.tries.items():
            if other != ns and trie.match(arr[:need]).length >= need:
                return OTHER_NAMESPACE
        if self._recent.saw(ns, arr, need):
            return NOT_CACHED
        return NEW_PREFIX if cached == 0 else None

    def _fill_from_shared(self, shared: SharedTier, ns: str, arr: np.ndarray, match: Match) -> bool:
        """Bring from the shared tier what it holds beyond the local restore into the local
        trie (host tier): per-token payloads past the local match and, for a hybrid model, the
        state where they end. True if anything came."""
        n = len(arr)
        cached, _ = self._usable(match, n, False)
        have = match.length
        storage = self._storage
        hit = shared.fetch(ns, arr, have, cached, n - 1, self._policy.hybrid)
        if hit is None:
            return False
        trie = storage.trie(ns, create=True)
        states = None
        if hit.states is not None:
            states = tuple(s.map(to_device) for s in hit.states)  # (a copy: the value's bytes are not kept)
        if hit.runs:  # one node per block: the restore copies straight from the values' bytes
            node = storage.boundary(trie, arr, have) if have else trie.root
            for lo, hi, layers in hit.runs:
                node = storage.add(trie, node, arr[lo:hi], NodeData(tuple(layers), self._kinds, HOST))
        else:
            node = storage.boundary(trie, arr, hit.end)
        if states is not None:
            storage.attach(node, states, None, END)
        shared.tokens += max(hit.end - have, 0)
        logger.debug("shared tier: [%d, %d) of %d tokens (states: %s)", have, hit.end, n, states is not None)
        return True

    def _usable(self, match: Match, n: int, reuse_logits: bool) -> tuple[int, Optional[Node]]:
        """How many tokens can be restored, and the node whose logits come along (whole-prompt restores)."""
        path = match.path
        if self._policy.hybrid:
            if reuse_logits and match.length >= n:
                node = next((x for x in path if x.end == n), None)
                if (
                    node is not None
                    and node.payload.has_state
                    and node.payload.logits is not None
                    and self._windows_ok(path, n)
                ):
                    return n, node
            limit = min(match.length, n - 1)
            for end in sorted((x.end for x in path if x.end <= limit and x.payload.has_state), reverse=True):
                if self._windows_ok(path, end):
                    return end, None
            return 0, None
        return self._windows_max(path, min(match.length, n - 1)), None

    def _holes(self, path: Sequence[Node], layer: int, upto: int) -> list[tuple[int, int]]:
        # (a node on disk counts as whole: its records say where its holes are once read)
        return [
            (x.start, x.end)
            for x in path
            if x.start < upto and x.payload.layers is not None and x.payload.layers[layer] is None
        ]

    def _windows_ok(self, path: Sequence[Node], p: int) -> bool:
        return all(restorable(g, p, self._holes(path, i, p)) for i, g in self._geometry.items())

    def _windows_max(self, path: Sequence[Node], limit: int) -> int:
        p = limit
        while self._geometry:
            q = min(restorable_max(g, p, self._holes(path, i, p)) for i, g in self._geometry.items())
            if q == p:
                break
            p = q
        return p

    def _restore(self, live: list, used: list[Node], cached: int, from_disk: set[int]) -> None:
        """Stitch the path's per-token payloads (from either tier) into the live caches and load
        the whole states at `cached`."""
        targets: list[tuple[list[Piece], int, tuple[Any, KVRule]]] = []
        spans = [(n, min(n.end, cached) - n.start) for n in used]  # (the same for every per-token layer)
        for i, (cache, rule) in enumerate(zip(live, self._rules)):
            if isinstance(rule, WindowRule):
                pieces = self._window_pieces(used, i, self._geometry[i].layout(cached))
                if pieces:
                    targets.append((pieces, sum(p.length for p in pieces), (cache, rule)))
                else:  # the window is empty here (a chunk boundary): only the position is set
                    rule.load_window(cache, None, cached)
            elif isinstance(rule, KVRule):
                if used[0].payload.layers[i] is not None:  # None: a layer the model never writes
                    pieces = [Piece(n.payload.layers[i], 0, k) for n, k in spans]
                    targets.append((pieces, rule.capacity(cache, cached), (cache, rule)))
        states = {i: used[-1].payload.layers[i] for i, kind in enumerate(self._kinds) if kind == STATE}
        # host-tier state arrays: copied in the same batch as the KV
        held = [a for p in states.values() for a in p.arrays if isinstance(a, HostArray)]
        # a growing KV cache may take up to a quarter more room, where a recycled buffer fits
        slack = [
            max(cap // 4, 256) if not isinstance(rule, WindowRule) and rule.grows else 0
            for _, cap, (_, rule) in targets
        ]
        stitched, copies = (
            stitch(targets, self._storage.pool, self._recycler, held, slack) if targets or held else ([], [])
        )
        fresh = iter(copies)
        for i, p in states.items():
            self._state_rules[i].restore(
                live[i], p.map(lambda a: next(fresh) if isinstance(a, HostArray) else a), cached
            )
        for (_, _, (cache, rule)), arrays in zip(targets, stitched):
            if isinstance(rule, WindowRule):
                rule.load_window(cache, arrays, cached)
            else:
                rule.load(cache, arrays, cached)
        if self._state_layers:
            mx.eval(_live_arrays([live[i] for i in self._state_layers]))
        for node in used:
            tier = DISK if node.id in from_disk else node.payload.tier
            self._counters.add_cached(tier, min(node.end, cached) - node.start)
            self._counters.host_restores += tier == HOST

    @staticmethod
    def _window_pieces(used: list[Node], layer: int, layout: list) -> list[Piece]:
        pieces: list[Piece] = []
        for span in layout:
            if span is None:
                pieces.append(Piece(None, 0, 1))
                continue
            lo, hi = span
            for node in used:
                if node.end > lo and node.start < hi:
                    pieces.append(
                        Piece(
                            node.payload.layers[layer], max(lo, node.start) - node.start, min(hi, node.end) - node.start
                        )
                    )
        return pieces if any(p.payload is not None for p in pieces) else []

    def _take_hot(self, ns: str, arr: np.ndarray, cached: int) -> Optional[tuple[str, np.ndarray, list, int]]:
        """A kept session whose sequence `arr` continues, at least as deep as the trie restore."""
        for i, entry in enumerate(self._hot):
            hot_ns, tokens, _, nbytes = entry
            n = len(tokens)
            if hot_ns == ns and cached <= n < len(arr) and np.array_equal(arr[:n], tokens):
                del self._hot[i]  # (by position: comparing entries would compare token arrays)
                self._hot_bytes -= nbytes  # an open session's working set from here on
                return entry
        return None

    def _release_hot(self, excess: int) -> int:
        """Under pressure: drop hot sessions' caches, oldest first, until `excess` bytes are gone."""
        freed = 0
        while self._hot and freed < excess:
            _, _, _, nbytes = self._hot.popleft()
            self._hot_bytes -= nbytes
            freed += nbytes
        return freed

    def _release_mlx_cache(self, excess: int) -> int:
        """Under pressure: lower MLX's buffer-cache limit by `excess` (MLX frees cached buffers past it)."""
        held = mx.get_cache_memory()
        self._mlx_cache_limit = max(held - excess, 0)
        mx.set_cache_limit(self._mlx_cache_limit)
        return held - mx.get_cache_memory()

    def _enforce(self) -> None:
        """Every budget holds again (see `TieredStorage.enforce`; should pinned payloads have grown
        past one, pins give way); then MLX's buffer-cache limit (where kvtrie sets it) is what the
        device budget leaves, at most `mlx_cache_bytes`."""
        storage = self._storage
        storage.enforce()
        if len(self._pins) and any(storage.pager.over(t) for t in (DEVICE, HOST)) and self._fit_pins():
            storage.enforce()
        if self._mlx_cache_cap is not None:
            room = self._ledger.room(DEVICE, MLX_CACHE)
            limit = self._mlx_cache_cap if room is None else min(self._mlx_cache_cap, room)
            if limit != self._mlx_cache_limit:
                self._mlx_cache_limit = limit
                mx.set_cache_limit(limit)

    def _capture(self, session: Session, offset: Optional[int], logits: Optional[mx.array]) -> int:
        if session.caches is None:
            raise SessionError("this session holds no live caches to capture")
        live = leaves(session.caches)
        held = _offset(live, self._rules)
        if offset is None:
            if held is None:
                raise ValueError(
                    "these caches do not count positions (no layer has an `offset`): pass capture(offset=...) "
                    "with the number of tokens the model has processed"
                )
            offset = held
        elif isinstance(offset, bool) or not isinstance(offset, (int, np.integer)):
            raise TypeError(f"offset must be an int number of tokens, got {type(offset).__name__}")
        elif held is not None and held != offset:
            raise CacheMismatchError(f"capture(offset={offset}) but the caches hold {held} positions")
        offset = int(offset)
        if self._policy.hybrid and offset > session.cached:
            if offset > len(session.tokens):
                raise CacheMismatchError(
                    f"caches are at offset {offset}, past the {len(session.tokens)} tokens of begin()"
                )
            snap = tuple(self._state_rules[i].capture(live[i]) for i in self.recurrent_layers)
            kept = None
            if logits is not None and offset == len(session.tokens):
                kept = mx.contiguous(logits)
            evaluate(list(snap))
            if kept is not None:
                mx.eval(kept)
            session._captures[offset] = (snap, kept)
        return offset

    def _commit(self, session: Session, tokens: Tokens, caches: Any) -> int:
        arr = as_token_array(tokens)
        n = len(arr)
        agreed = max([session.cached, *session._captures])
        if n < agreed or not np.array_equal(arr[:agreed], session.tokens[:agreed]):
            raise ValueError(
                f"committed tokens must begin with the {agreed} tokens this session restored or captured; "
                "commit the prompt (plus generated tokens) that was passed to begin()"
            )
        live = self._check_leaves(caches)
        signature = self._check_caches(live, n)
        snapshots = dict(session._captures)
        reasons = dict(session._reasons)
        if self._policy.hybrid:
            final = tuple(self._state_rules[i].capture(live[i]) for i in self.recurrent_layers)
            evaluate(list(final))
            snapshots[n] = (final, snapshots.get(n, (None, None))[1])
            reasons[n] = reasons.get(n, 0) | END
        storage = self._storage
        with self._lock:
            if self._signature is None:
                self._signature = signature
                self._signature_text = repr(signature)
                if storage.disk is not None:
                    storage.disk.signature_text = self._signature_text
            elif signature != self._signature:
                raise CacheMismatchError(
                    f"caches do not match this PrefixCache's model: expected {self._signature}, got {signature}"
                )
            self._check_open()
            storage.drain()
            if storage.disk is not None and storage.disk.settle_signature(repr(signature)):
                logger.warning(
                    "the caches do not match the model whose state is on disk: dropping the disk tier's nodes"
                )
                storage.drop_disk_nodes()
            self._expire_pins()
            trie = storage.trie(session.namespace, create=True)
            match, _ = storage.resident(trie, arr, trie.match(arr), n)
            self._committed_blocks.record(session.namespace, arr, match.length)
            self._recent_stored.add(session.namespace, arr)
            added = n - match.length
            branched = None  # where this commit's new edge hangs off a stored path, if it does
            new_nodes = []
            if added:
                stored = match.last
                if stored is None:
                    parent = trie.root
                elif match.ends_mid_edge:
                    parent = storage.split(trie, stored, match.length)
                else:
                    parent = stored
                branched = parent if parent.children else None
                for lo, hi, layers in self._new_payloads(live, match.length, n):
                    parent = storage.add(trie, parent, arr[lo:hi], storage.new_data(layers))
                    new_nodes.append(parent)
            if self._history is not None:  # a sequence that comes back after its payloads went: not new
                recalled = self._history.recall(session.namespace, arr, self._policy.now)
                for node in new_nodes:
                    last = next((t for end, t in recalled if node.start < end <= node.end), None)
                    if last is not None:
                        self._policy.recalled(node, self._policy.now - last)
            created: set[int] = set()
            for offset in sorted(snapshots):
                snap, logits = snapshots[offset]
                node = storage.boundary(trie, arr, offset)
                if storage.attach(node, snap, logits, reasons.get(offset, 0)):
                    created.add(node.id)
            leaf = storage.boundary(trie, arr, n)
            storage.pin(session._leaf, -1)
            storage.pin(leaf, +1)
            session._leaf = leaf
            path = leaf.path()
            proven = {branched.id} if branched is not None and not branched.is_root else set()
            standing = self._policy.stand_in(path, session.cached)
            if standing is not None:  # proven now, standing in for the branch point just below
                storage.rekey_below(standing)
                proven.add(standing.id)
            storage.touch(path)
            if self._shared is not None:
                self._shared.signature = self._signature_text
                ends = [
                    x.end for x in path if self._policy.hybrid and x.payload.layers is not None and x.payload.has_state
                ]
                self._shared.publish(session.namespace, arr, path, ends)
            self._policy.settle(path, created, lambda: storage.snapshot_bytes, storage.drop_snapshot, proven)
            session._committed = True
            if caches is session.caches:  # only the session's own caches may be kept hot
                session._committed_tokens = arr
            for leaf_cache in live:
                recorder = recorder_of(leaf_cache)
                if recorder is not None:
                    recorder.reset(n)
            self._enforce()
        logger.debug("commit ns=%s: %d tokens, %d new, snapshots at %s", session.namespace, n, added, sorted(snapshots))
        return added

    def _new_payloads(self, live: list, start: int, end: int) -> list[tuple[int, int, tuple]]:
        """Per-token payloads of positions `[start, end)`, cut where a window layer's coverage changes.

        A window layer's positions come from its recorder or from what its live buffer still
        holds; a run nobody has becomes a node of its own holding `None` for that layer.
        """
        sources: dict[int, list[tuple[int, int, int, Any]]] = {}
        cuts = {start, end}
        chunk = self._policy.chunk_tokens
        if chunk:  # runs of at most `chunk` positions: eviction takes a sequence's tail, chunk by chunk
            cuts.update(range((start // chunk + 1) * chunk, end, chunk))
        for i, window in self._window_rules.items():
            found: list[tuple[int, int, Any]] = []
            recorder = recorder_of(live[i])
            if recorder is not None and recorder.end == end:
                found.append((recorder.start, recorder.end, recorder))
            for first, arrays in window.segments(live[i]):
                found.append((first, first + arrays[0].shape[2], arrays))
            sources[i] = [(max(lo, start), min(hi, end), lo, src) for lo, hi, src in found if lo < end and hi > start]
            cuts.update(x for lo, hi, _, _ in sources[i] for x in (lo, hi))
        bounds = sorted(cuts)
        out = []
        for lo, hi in zip(bounds, bounds[1:]):
            layers: list[Any] = []
            for i, (cache, rule) in enumerate(zip(live, self._rules)):
                if isinstance(rule, WindowRule):
                    layers.append(_window_payload(sources[i], lo, hi))
                elif isinstance(rule, KVRule):
                    held = rule.live(cache)
                    layers.append(None if held is None else capture_tokens(held, lo, hi))
                else:
                    layers.append(None)
            out.append((lo, hi, tuple(layers)))
        evaluate(p for _, _, layers in out for p in layers)
        return out

    def store(
        self,
        tokens: Tokens,
        caches: list,
        *,
        namespace: Optional[str] = None,
        then: Optional[Callable[[], Any]] = None,
    ) -> int:
        """Store the state `caches` hold for `tokens` (computed elsewhere: a file, another server).

        Like a session's commit: the caches must hold `len(tokens)` positions; they are
        copied, never kept. Returns the number of tokens added. `then()`, if given, runs after
        the commit while the stored path is still held (e.g. to `pin` part of it before the
        budgets are enforced on it).
        """
        arr = as_token_array(tokens)
        ns = self._namespace if namespace is None else self._check_namespace(namespace)
        session = Session(self, ns, arr, 0, None, None)
        try:
            added = self._commit(session, arr, caches)
            if then is not None:
                then()
            return added
        finally:
            self._close(session)

    # --- control: pins and clears ----------------------------------------------------

    def pin(self, tokens: Tokens, *, namespace: Optional[str] = None, ttl: Optional[float] = None) -> int:
        """Keep the stored prefix `tokens` restorable regardless of the eviction policy, until
        `unpin(tokens)` or, with `ttl`, until that many seconds have passed; returns how many
        tokens are pinned (the part of `tokens` that is stored and restorable, 0 if none).

        A pinned prefix stays in memory where it is (device or host; one on disk is read back
        first): it never moves down a tier and is never evicted, and for a hybrid model the
        snapshot at its end stays, so it restores at once (the snapshots above its end on its
        path are the policy's to drop, like any other). Pinned bytes stay within the
        budgets: what a memory tier holds is within its budget, so a pin of it fits; a pin that
        would bring a prefix back from disk past a budget, or hold an open session's path past
        one, raises `PinError` and changes nothing. When `set_budgets` shrinks a budget below
        the pinned bytes, pins give way, the soonest to expire first, those without a ttl last
        (`stats()["pins_dropped"]`). Pinning the same tokens again replaces the pin (its ttl
        restarts, it covers what is stored now). Pins last as long as the process.
        """
        arr = as_token_array(tokens)
        ns = self._namespace if namespace is None else self._check_namespace(namespace)
        ttl = check_ttl(ttl)
        storage = self._storage
        with self._lock:
            self._check_open()
            storage.drain()
            self._expire_pins()
            trie = storage.trie(ns)
            if trie is None:
                return 0
            key = arr.tobytes()
            old = self._pins.get(ns, key)
            match = trie.match(arr)
            p = self._pinnable(match, len(arr))
            if p == 0:
                return 0
            self._check_pin_room(match, p, old)
            match, loaded = storage.resident(trie, arr[:p], trie.match(arr[:p]), p)
            p = min(p, self._pinnable(match, p))  # (a damaged record is a miss from there)
            if p == 0:
                return 0
            if storage.pager.budgets[HOST] == 0:  # no host tier to hold what came from disk
                for node in match.path:
                    if node.id in loaded:
                        storage.move(node, DEVICE)
            end = storage.boundary(trie, arr, p)
            storage.hold(end, +1)
            if old is not None:
                self._release_pin(old)
            self._pins.new(ns, key, arr[:p].copy(), end, ttl)
            self._enforce()
        return p

    def unpin(self, tokens: Tokens, *, namespace: Optional[str] = None) -> int:
        """End the pin made by `pin(tokens)` (the same tokens and namespace); returns the tokens it
        kept (0: there was none, or its ttl had passed). The prefix stays stored, for the
        eviction policy to judge like any other."""
        arr = as_token_array(tokens)
        ns = self._namespace if namespace is None else self._check_namespace(namespace)
        with self._lock:
            self._check_open()
            self._expire_pins()
            pin = self._pins.get(ns, arr.tobytes())
            if pin is None:
                return 0
            self._release_pin(pin)
            self._enforce()
        return len(pin.tokens)

    def clear(self, *, namespace: Optional[str] = None, prefix: Optional[Sequence[int]] = None) -> int:
        """Drop stored state now; returns how many stored tokens were dropped.

        No arguments: everything, in every namespace. `namespace` alone: that namespace.
        `prefix` (in `namespace`, default the default one): every stored sequence that begins
        with `prefix`, and the stored positions of `prefix` itself that no other stored
        sequence branches off (back to the deepest point another one shares). The pins of what
        is cleared end with it (not counted as dropped pins); what open sessions hold (their
        paths) stays and is not counted, and goes to the policy once they close. The disk
        tier's records of what was dropped are deleted (by its writer thread; `persist(wait=True)`
        or `close()` waits for it); the shared tier is left alone (other processes use it), so a
        cleared prefix may come back from there. A request for a cleared prefix reports the
        miss as `evicted`.
        """
        if namespace is not None:
            self._check_namespace(namespace)
        arr = None if prefix is None else as_token_array(prefix)
        storage = self._storage
        with self._lock:
            self._check_open()
            storage.drain()
            self._expire_pins()
            if arr is None:
                for pin in self._pins:
                    if namespace is None or pin.namespace == namespace:
                        self._release_pin(pin)
                self._drop_hot(lambda ns, tokens: namespace is None or ns == namespace)
                dropped = 0
                for ns, trie in list(storage.tries.items()):
                    if namespace is None or ns == namespace:
                        for child in list(trie.root.children.values()):
                            dropped += storage.clear_below(child)
            else:
                dropped = self._clear_prefix(self._namespace if namespace is None else namespace, arr)
            self._enforce()
        logger.debug("clear ns=%s prefix=%s: %d tokens dropped", namespace, None if arr is None else len(arr), dropped)
        return dropped

    def lookup(self, tokens: Tokens, *, namespace: Optional[str] = None) -> int:
        """How many leading tokens of `tokens` the tries hold restorable now (every tier, no
        holdback); nothing changes (kept hot sessions and the shared tier are not asked)."""
        arr = as_token_array(tokens)
        ns = self._namespace if namespace is None else self._check_namespace(namespace)
        with self._lock:
            self._expire_pins()
            trie = self._storage.trie(ns)
            return self._pinnable(trie.match(arr), len(arr)) if trie is not None else 0

    def _clear_prefix(self, ns: str, arr: np.ndarray) -> int:
        storage = self._storage
        for pin in self._pins:
            if pin.namespace == ns and pin.covered_by(arr):
                self._release_pin(pin)
        trie = storage.trie(ns)
        match = trie.match(arr) if trie is not None else Match((), 0)
        m, last = match.length, match.last
        top = None
        if last is not None and (m == len(arr) or (m == last.end and last.is_leaf)):
            top = last  # (else what is stored of the prefix continues elsewhere: nothing is its own)
            while (
                not top.pins
                and (parent := top.parent) is not None
                and not parent.is_root
                and len(parent.children) == 1
                and not parent.pins
            ):
                top = parent  # the prefix's own positions, back to where another sequence branches off
        kept = top.start if top is not None else m
        n = len(arr)
        self._drop_hot(
            lambda hns, tokens: (
                hns == ns
                and (common_prefix(tokens, arr) > kept or (len(tokens) >= n and common_prefix(tokens, arr) == n))
            )
        )
        return storage.clear_below(top) if top is not None else 0

    def _drop_hot(self, doomed: Callable[[str, np.ndarray], bool]) -> None:
        """Forget the kept hot sessions `doomed(namespace, tokens)` picks."""
        kept = [entry for entry in self._hot if not doomed(entry[0], entry[1])]
        self._hot_bytes = sum(entry[3] for entry in kept)
        self._hot.clear()
        self._hot.extend(kept)

    def _pinnable(self, match: Match, n: int) -> int:
        """How much of the first `n` matched tokens restores (all of them may: a pin has no holdback)."""
        return self._usable(match, n + 1, False)[0]

    def _check_pin_room(self, match: Match, p: int, old: Optional[Pin]) -> None:
        """Raise PinError if pinning the first `p` tokens of `match` would pass a tier's budget
        (what comes from disk lands in host memory, or the device's without a host tier)."""
        pager = self._storage.pager
        landing = HOST if pager.budgets[HOST] != 0 else DEVICE
        held = self._pins.nodes(exclude=old)
        now = held_bytes(held)
        more: dict[str, int] = {}
        for node in match.path:
            if node.start >= p or node.id in held:
                continue
            data = node.payload
            nbytes = data.nbytes
            if node.end > p:  # the pin ends inside this edge: its first part (the snapshot stays below)
                nbytes = (nbytes - data.snapshot_nbytes) * (p - node.start) // (node.end - node.start)
            tier = landing if data.tier == DISK else data.tier
            more[tier] = more.get(tier, 0) + nbytes
        for tier, extra in more.items():
            budget = pager.budgets[tier]
            if budget is not None and now.get(tier, 0) + extra > budget:
                raise PinError(
                    f"pinning these {p} tokens would hold {now.get(tier, 0) + extra} pinned bytes in the {tier} tier, "
                    f"past its budget of {budget}; unpin something first, pin a shorter prefix, or raise the budget"
                )

    def _release_pin(self, pin: Pin) -> None:
        self._pins.remove(pin)
        self._storage.hold(pin.node, -1)

    def _expire_pins(self) -> None:
        """Pins whose ttl has passed end (checked lazily, at the start of public calls)."""
        for pin in self._pins.due():
            self._release_pin(pin)
            self._counters.pins_expired += 1

    def _fit_pins(self) -> bool:
        """While pinned bytes pass a memory tier's budget, pins give way, the soonest to expire
        first; True if any did."""
        if not len(self._pins):
            return False
        budgets = self._storage.pager.budgets
        order = self._pins.give_way_order()
        dropped = False
        while order:
            held = held_bytes(self._pins.nodes())
            if not any((b := budgets[t]) is not None and held.get(t, 0) > b for t in (DEVICE, HOST)):
                break
            pin = order.pop(0)
            logger.info("a pin of %d tokens gives way to the budgets", len(pin.tokens))
            self._release_pin(pin)
            self._counters.pins_dropped += 1
            dropped = True
        return dropped

    @property
    def num_sequences(self) -> int:
        """Stored sequences that no other extends: the leaves of the tries."""
        with self._lock:
            return self._storage.num_sequences

    def shrink(self, *, max_sequences: Optional[int] = None, max_bytes: Optional[int] = None) -> None:
        """Evict now, least valuable first, until at most `max_sequences` / `max_bytes` remain.

        A one-off trim (mlx-lm's `trim_to`); budgets keep holding afterwards as before.
        Pinned paths stay (open sessions' and `pin`'s).
        """
        if max_sequences is not None:
            check_budget("max_sequences", max_sequences)
        if max_bytes is not None:
            check_budget("max_bytes", max_bytes)
        with self._lock:
            self._expire_pins()
            self._storage.drain()
            self._storage.shrink(max_sequences, max_bytes)

    def _close(self, session: Session) -> None:
        with self._lock:
            self._open.discard(session)
            if self._hot_slots and session._committed_tokens is not None and session.caches is not None:
                # evaluated here: MLX cannot evaluate another thread's pending work later
                mx.eval(_live_arrays(leaves(session.caches)))
                arrays = self._buffers(session.caches)
                if len(self._hot) == self._hot.maxlen:
                    _, _, old, nbytes = self._hot.popleft()
                    self._hot_bytes -= nbytes
                    self._retire(old)
                nbytes = sum(a.nbytes for a in arrays)
                self._hot.append((session.namespace, session._committed_tokens, session.caches, nbytes))
                self._hot_bytes += nbytes
            elif session.caches is not None:
                self._retire(session.caches)
            self._storage.pin(session._leaf, -1)
            session._leaf = None
            session._closed = True
            session.caches = None
            session._captures = {}
            self._enforce()

    def _retire(self, caches: list) -> None:
        """Offer the arrays of live caches that kvtrie hands out no more to the next restores."""
        if self._recycler.enabled and on_cpu():  # (only a restore on the CPU writes into kept buffers)
            arrays = self._buffers(caches)
            # a restore of caches this small lays out in numpy and never reclaims a buffer: kept, they
            # would pile up unused towards recycle_bytes; MLX's own buffer cache has them instead
            if not lays_out_in_numpy(arrays):
                self._recycler.keep(arrays)

    def _buffers(self, caches: list) -> list[mx.array]:
        """The arrays live caches keep alive: per-token layers' whole buffers (past their offset
        too), whole-state layers' states."""
        return [
            a
            for c, r in zip(leaves(caches), self._rules)
            for a in (_live_arrays([c]) if isinstance(r, StateRule) else (r.live(c) or ()))
        ]

    def _check_open(self) -> None:
        if self._closed:
            raise SessionError("this PrefixCache is closed; make a new one (on the same disk_dir to start warm)")

    def persist(self, wait: bool = False) -> int:
        """With a disk tier: queue a record for everything stored that no record holds yet (the
        background thread does this every `persist_seconds`); `wait=True` also waits until
        the records are written. Returns how many records were queued."""
        disk = self._storage.disk
        if disk is None:
            return 0
        storage = self._storage
        with self._lock:
            self._check_open()
            storage.drain()
            queued = disk.persist()
        if wait:
            disk.flush()
            with self._lock:
                storage.drain()
                queued += disk.persist()  # records whose parents were in flight
            disk.flush()
            with self._lock:
                storage.drain()
        return queued

    def _persist_loop(self, period: float) -> None:
        while not self._stop_persisting.wait(period):
            try:
                with self._lock:
                    if self._closed:
                        return
                    self._storage.drain()
                    self._storage.require_disk().persist()
            except Exception:  # never let the thread die: the next round tries again
                logger.exception("persisting records failed")

    def close(self) -> None:
        """With a disk tier: every payload that fits goes to disk, the writes finish.

        A new PrefixCache on the same directory (same fingerprint) then starts warm.
        Without one, just marks the cache closed. Closing twice is harmless.
        """
        self._stop_persisting.set()
        if self._persister is not None and self._persister is not threading.current_thread():
            self._persister.join()
        with self._lock:
            if self._closed:
                return
            if self._storage.disk is not None:
                self._storage.flush_to_disk()
                self._storage.disk.close()
            if self._shared is not None:
                self._shared.close()
            self._recycler.clear()
            self._closed = True

    def __enter__(self) -> PrefixCache:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # --- validation ----------------------------------------------------------------

    @staticmethod
    def _check_namespace(namespace: Any) -> str:
        if not isinstance(namespace, str):
            raise TypeError(f"namespace must be a str (model id, tenant salt), got {type(namespace).__name__}")
        return namespace

    def _check_leaves(self, caches: Any) -> list:
        if not isinstance(caches, (list, tuple)):
            raise TypeError(f"caches must be the list of live layer caches, got {type(caches).__name__}")
        try:
            live = leaves(caches)
        except AttributeError as exc:
            raise CacheMismatchError(f"caches are not this model's: {exc}") from None
        if len(live) != self.num_layers:
            raise CacheMismatchError(
                f"got {len(live)} layer caches, this PrefixCache's model has {self.num_layers}; "
                "pass the caches of the model whose make_cache built this PrefixCache"
            )
        return live

    def _check_caches(self, live: list, offset: int) -> tuple:
        signature: list[tuple] = []
        for i, (c, expected, rule) in enumerate(zip(live, self._layer_types, self._rules)):
            if type(c).__name__ != expected:  # by name: mlx-lm's KVCache may stand in for kvtrie's
                raise CacheMismatchError(f"layer {i}: expected a {expected}, got {type(c).__name__}")
            held = rule.offset(c)
            # a layer this model never writes
            if isinstance(rule, KVRule) and rule.kind == KV and held == 0 and rule.live(c) is None:
                signature.append((KV, "unused"))
                continue
            if held is not None and held != offset:
                raise CacheMismatchError(
                    f"layer {i}: cache offset is {held} but {offset} tokens were committed; "
                    "run the model over every token before committing"
                )
            try:
                sig = rule.signature(c)
            except ValueError as exc:
                raise CacheMismatchError(f"layer {i}: {exc}") from None
            if rule.kind != STATE and sig[2][0][0] != 1:
                raise CacheMismatchError(
                    f"layer {i}: batch size {sig[2][0][0]}; a session holds one sequence (batch 1)"
                )
            signature.append(sig)
        return tuple(signature)

    # --- inspection ----------------------------------------------------------------

    def walk(self) -> Iterator[tuple[str, Node, int]]:
        """Every node as `(namespace, node, depth)`, parents before children."""
        with self._lock:
            items = list(self._storage.walk())
        return iter(items)

    def stats(self) -> dict[str, Any]:
        """Counters since creation and the current size of the cache."""
        with self._lock:
            self._expire_pins()
            storage = self._storage
            tries = storage.tries.values()
            return {
                **self._counters.as_dict(),
                "pins": len(self._pins),
                "pinned_bytes": sum(held_bytes(self._pins.nodes()).values()),
                **(self._shared.stats() if self._shared is not None else {}),
                "nodes": sum(t.num_nodes for t in tries),
                "tokens_stored": sum(t.num_tokens for t in tries),
                "sequences": storage.num_sequences,
                "snapshots": storage.snapshots,
                "device_bytes": storage.pager.bytes[DEVICE],
                "host_bytes": storage.pager.bytes[HOST],
                "disk_bytes": storage.pager.bytes[DISK],
                # 1 while the disk tier is degraded to memory only (writes failed; retried every few seconds)
                "disk_degraded": int(storage.disk is not None and storage.disk.degraded),
                "kv_bytes": storage.kv_bytes,
                "snapshot_bytes": storage.snapshot_bytes,
                "recycle_hits": self._recycler.hits,  # live arrays a restore reclaimed instead of zero-filling
                "recycle_misses": self._recycler.misses,
                "recycle_bytes": self._recycler.kept_bytes,
                **self._ledger_stats(),
                "tenants": {  # payload bytes per tenant (a namespace's part before its first "/") and tier
                    tenant: {f"{tier}_bytes": n for tier, n in held.items()}
                    for tenant, held in storage.pager.tenant_bytes.items()
                    if any(held.values())
                },
            }

    def _ledger_stats(self) -> dict[str, Any]:
        """The ledger: what kvtrie holds in memory by tier and holder, and the open sessions' working set."""
        ledger = self._ledger
        breakdown = ledger.breakdown()
        device, host = ledger.held(DEVICE), ledger.held(HOST)
        return {
            "held_bytes": device + host,
            "held_device_bytes": device,
            "held_host_bytes": host,
            "held": {name: tiers[DEVICE] + tiers[HOST] for name, tiers in breakdown.items()},
            "held_by_tier": {tier: {name: tiers[tier] for name, tiers in breakdown.items()} for tier in (DEVICE, HOST)},
            "in_use_bytes": self.in_use_bytes(),
            "open_sessions": len(self._open),
            "heap_trims": ledger.trims,
        }

    def in_use_bytes(self) -> int:
        """Bytes of the open sessions' live caches: the requests' working set (outside the budgets)."""
        sessions = list(self._open)
        return sum(a.nbytes for s in sessions if s.caches is not None for a in self._buffers(s.caches))

    def dump(self) -> str:
        """Readable tree: one line per node, `[start, end) tokens bytes tier pinned` (+ `state` at snapshots)."""
        lines: list[str] = []
        current = None
        for ns, node, depth in self.walk():
            if ns != current:
                lines.append(f"namespace {ns!r}")
                current = ns
            data = node.payload
            head = " ".join(str(t) for t in node.tokens[:8]) + (" ..." if len(node.tokens) > 8 else "")
            state = ""
            if self._policy.hybrid and data.has_state:
                why = ",".join(name for flag, name in REASON_NAMES.items() if data.reasons & flag)
                state = f" state({why})" + (" logits" if data.logits is not None else "")
            lines.append(
                f"{'  ' * depth}[{node.start}, {node.end}) {len(node.tokens)} tokens "
                f"{data.nbytes} B {data.tier} pinned={node.pins}{state} <{head}>"
            )
        return "\n".join(lines)


def _window_payload(sources: list[tuple[int, int, int, Any]], lo: int, hi: int) -> Optional[KVPayload]:
    """Positions `[lo, hi)` of a window layer from the first source that holds all of them, or None."""
    for first, last, origin, src in sources:
        if first <= lo and hi <= last:
            if isinstance(src, Recorder):
                return KVPayload(src.take(lo, hi))
            return KVPayload(tuple(mx.contiguous(a[:, :, lo - origin : hi - origin]) for a in src))
    return None


def _offset(live: list, rules: Sequence[Any]) -> Optional[int]:
    """The positions the caches hold, from the layers that count them (None if none does)."""
    offsets = {
        o
        for c, r in zip(live, rules)
        if (o := r.offset(c)) is not None and not (r.kind == KV and o == 0 and r.live(c) is None)
    }
    if len(offsets) > 1:
        raise CacheMismatchError(
            f"layer caches disagree on their offset ({sorted(offsets)}); capture between forward passes"
        )
    return offsets.pop() if offsets else None


def _device(a: Any) -> mx.array:
    from .arrays import to_device

    return to_device(a)


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


def _live_arrays(live: Sequence[Any]) -> list[mx.array]:
    """The arrays a list of leaf caches holds (their `state`, whatever its layout)."""
    out: list[mx.array] = []
    for c in live:
        try:
            state = c.state
        except Exception:  # a cache whose state cannot be read yet
            continue
        out.extend(a for _, a in tree_items(state) if isinstance(a, mx.array))
    return out
