"""`kvtrie serve`: mlx_lm.server with its prompt cache on kvtrie, bounded in bytes, observable.

It runs mlx-lm's own server (every flag of `mlx_lm.server` works) with four parts swapped in:
the prompt cache (`ServerPromptCache`: a `TriePromptCache` with device + host budgets that
always hold, an optional disk tier, one log line per request), the batch generator (which,
for hybrid models, also stops the prefill where a prompt leaves the trie and at its
`cache_control` breakpoints, so the recurrent state there is stored), the single-request path
(`serve_single`: seeded requests, `--kv-bits`, a draft model; the same stops) and the HTTP
handler (`GET /kvtrie/stats`, `GET /metrics`, Anthropic's `POST /v1/messages` and
`/v1/messages/count_tokens`, see `serve_messages`; cache control: `POST /kvtrie/prefill`,
`POST|DELETE /kvtrie/pin`, `DELETE /kvtrie/cache`, see `kvtrie.control`). Each request's log
line says why it restored less than it could (`, miss: evicted`).
After each chat reply the conversation's next turn (the reply as the chat template renders it back)
is prefilled in the background while the server is idle (`kvtrie.next_turn`, `--no-next-turn`).
SIGTERM and Ctrl-C stop the server and flush the cache to its disk tier.

`--prompt-cache-bytes B` bounds everything kvtrie holds in memory (its ledger: stored payloads,
recycled live arrays, free host buffers, copies in flight, and MLX's buffer cache, whose limit
kvtrie sets within B). Outside B: the model's weights and the requests being served (their live
caches and activations). Large freed blocks go back to the operating system at once (glibc's
mmap threshold is fixed at start), so the process's resident memory follows the ledger.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any, Optional, cast

import attrs

from . import guard, serve_single
from .compat import UntestedDependencyError, check_mlx_lm
from .control import Controller, with_jobs
from .disk import private_directory
from .errors import UnsafeDirectoryError
from .heap import exec_with_huge_pages, huge_pages, return_large_frees, rss_bytes
from .integrations.mlx_lm import TriePromptCache, cache_offset
from .keepalive import KeepAlive
from .misses import MISS_REASONS, NEW_PREFIX, OTHER_NAMESPACE
from .models.fingerprint import model_fingerprint
from .next_turn import with_next_turn
from .serve_tenants import Gate, Tagged, namespace_of_caches, with_tenants
from .tenants import DEFAULT_TENANT, KeysFileError, Tenants, tenant_of

logger = logging.getLogger("kvtrie.serve")

MEMORY_FRACTION = 0.25  # the default bound: a quarter of the machine's memory
HOST_SHARE = 0.5  # of the bound, what the host tier may hold (the rest is the device tier)
MLX_CACHE_SHARE = 0.125  # of the bound, at most what MLX's buffer cache keeps (in the device tier's share)
MMAP_THRESHOLD = 1 << 20  # blocks this large are mapped on their own and unmapped when freed


def machine_memory() -> int:
    """Physical memory in bytes (0 where the platform does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def default_cache_bytes() -> int:
    """The byte bound when `--prompt-cache-bytes` is not given: a quarter of the machine's memory."""
    return int(machine_memory() * MEMORY_FRACTION) or 4 << 30


@attrs.frozen
class ServeOptions:
    """kvtrie's side of the server: byte budgets, the disk tier, the sequence cap."""

    cache_bytes: int  # device + host tiers together
    host_bytes: int  # of which the host tier
    disk_dir: Optional[str] = None
    disk_bytes: Optional[int] = None
    max_sequences: Optional[int] = None  # --prompt-cache-size, only when given
    persist_seconds: float = 2.0  # a stored sequence is on disk this long after (plus the write)
    shared_url: Optional[str] = None  # a Redis shared by servers (redis://, rediss://, a cluster node)
    shared_block_tokens: int = 256
    shared_secret: Optional[bytes] = attrs.field(default=None, repr=False)  # authenticates the shared tier
    recycle_bytes: Optional[int] = None  # freed live caches kept for the next restores (None: what B leaves)
    mlx_cache_bytes: Optional[int] = None  # MLX's buffer cache, at most (None: an eighth of B)
    next_turn: bool = True  # compute each conversation's next turn in the background (kvtrie.next_turn)
    tenants: Optional[Tenants] = attrs.field(default=None, repr=False)  # --api-keys: who may ask, each its namespace
    tenant_bytes: Any = None  # --tenant-bytes: each tenant's fair share of memory (bytes, or {tenant: bytes, "*": ...})
    max_request_bytes: int = guard.MAX_REQUEST_BYTES  # a request body past this is a 413 (kvtrie.guard)
    max_prompt_tokens: Optional[int] = None  # a prompt past this is a 400 (None: the model's context length)
    request_timeout: float = guard.REQUEST_TIMEOUT  # seconds a client may stay silent while we read its request

    def __attrs_post_init__(self) -> None:
        if self.cache_bytes < 0 or not 0 <= self.host_bytes <= self.cache_bytes:
            raise ValueError(
                f"--prompt-cache-bytes must be >= 0 and --host-bytes within it, got {self.cache_bytes} and {self.host_bytes}"
            )
        if self.disk_bytes is not None and self.disk_bytes < 0:
            raise ValueError(f"--disk-bytes must be >= 0, got {self.disk_bytes}")
        if not self.persist_seconds > 0:
            raise ValueError(f"--persist-seconds must be > 0, got {self.persist_seconds}")
        if self.recycle_bytes is not None and self.recycle_bytes < 0:
            raise ValueError(f"--recycle-bytes must be >= 0, got {self.recycle_bytes}")
        if self.mlx_cache_bytes is not None and self.mlx_cache_bytes < 0:
            raise ValueError(f"--mlx-cache-bytes must be >= 0, got {self.mlx_cache_bytes}")
        if not self.max_request_bytes > 0:
            raise ValueError(f"--max-request-bytes must be > 0, got {self.max_request_bytes}")
        if self.max_prompt_tokens is not None and not self.max_prompt_tokens > 0:
            raise ValueError(f"--max-prompt-tokens must be > 0, got {self.max_prompt_tokens}")
        if not 0 < self.request_timeout < float("inf"):
            raise ValueError(f"--request-timeout must be a number of seconds > 0, got {self.request_timeout}")

    @property
    def device_bytes(self) -> int:
        return self.cache_bytes - self.host_bytes

    @property
    def mlx_cache_limit(self) -> int:
        """What MLX's buffer cache may keep: the flag, or an eighth of B (within the device share)."""
        share = int(self.cache_bytes * MLX_CACHE_SHARE) if self.mlx_cache_bytes is None else self.mlx_cache_bytes
        return min(share, self.device_bytes)


@attrs.define(slots=True)
class TenantFigures:
    """One tenant's requests on this server: how many, their prompt tokens, the tokens restored,
    and the reasons they restored less than they could."""

    requests: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    miss_reasons: dict = attrs.field(factory=lambda: dict.fromkeys(MISS_REASONS, 0))

    def count(self, prompt_tokens: int, cached_tokens: int, reason: Optional[str]) -> None:
        self.requests += 1
        self.prompt_tokens += prompt_tokens
        self.cached_tokens += cached_tokens
        if reason is not None:
            self.miss_reasons[reason] += 1

    def as_dict(self, *, own_view: bool = False) -> dict[str, Any]:
        """The figures; `own_view`: as the tenant itself may see them, where another namespace's
        holding a prefix is not told apart from a new one (that would say what others sent)."""
        reasons = dict(self.miss_reasons)
        if own_view:
            reasons[NEW_PREFIX] += reasons.pop(OTHER_NAMESPACE)
        return {
            "requests": self.requests,
            "prompt_tokens": self.prompt_tokens,
            "cached_tokens": self.cached_tokens,
            "hit_rate": self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0,
            "miss_reasons": reasons,
        }


class ServerPromptCache(TriePromptCache):
    """The server's prompt cache: one PrefixCache per loaded model, bounded in bytes, with a
    log line per request and a hit-rate record; `split_points` tells the batch generator and the
    single path where a hybrid model's prefill should stop to store its state."""

    def __init__(self, options: ServeOptions, model_provider: Any):
        super().__init__(
            max_size=options.max_sequences if options.max_sequences is not None else 1 << 62,
            max_bytes=options.cache_bytes,
            make_cache=self._fresh_caches,
            device_bytes=options.device_bytes,
            host_bytes=options.host_bytes,
        )
        self.options = options
        self._provider = model_provider
        self._lock = threading.Lock()
        self._splits: dict[tuple[str, tuple[int, ...]], tuple[int, ...]] = {}
        self._breakpoints: dict[tuple[str, tuple[int, ...]], tuple[tuple[int, ...], tuple[str, ...]]] = {}
        self.breakpoint_requests = 0
        self.breakpoints = 0
        self.keep_alive = KeepAlive()  # breakpoints kept for their TTL once stored
        self.requests = 0
        self.prompt_tokens = 0
        self.cached_tokens = 0
        self.restore_seconds = 0.0
        self.miss_reasons = dict.fromkeys(MISS_REASONS, 0)
        self.tenants: dict[str, TenantFigures] = {}  # per tenant: requests, tokens, hits, miss reasons
        self.active_namespace = DEFAULT_TENANT  # the namespace of the request the generation thread serves
        self.next_turn: Any = None  # the server's kvtrie.next_turn.NextTurn, told of every prompt served

    # --- building the per-model caches -----------------------------------------------------

    def _fresh_caches(self, model_key: Any) -> list:
        from mlx_lm.models.cache import make_prompt_cache

        model, draft = self._model_for(model_key), self._provider.draft_model
        # with a draft model, its caches follow the main model's in one list (as speculative decoding takes them)
        return make_prompt_cache(model) + (make_prompt_cache(draft) if draft is not None else [])

    def _model_for(self, model_key: Any) -> Any:
        provider = self._provider
        if provider.model_key != model_key or provider.model is None:
            raise RuntimeError(f"model {model_key!r} is not the one loaded ({provider.model_key!r})")
        return provider.model

    def _trie(self, model: Any, like: Optional[list] = None):
        pc = self._tries.get(model)
        if pc is None:
            from .cache import PrefixCache

            kwargs = dict(
                self._kwargs,
                recycle_bytes=self.options.recycle_bytes,
                mlx_cache_bytes=self.options.mlx_cache_limit,
                tenant_bytes=self.options.tenant_bytes,
            )
            if self.options.disk_dir is not None or self.options.shared_url is not None:
                kwargs["fingerprint"] = self._fingerprint(model)
            if self.options.shared_url is not None:
                kwargs.update(
                    shared_url=self.options.shared_url,
                    shared_block_tokens=self.options.shared_block_tokens,
                    shared_secret=self.options.shared_secret,
                )
            if self.options.disk_dir is not None:
                fingerprint = kwargs["fingerprint"]
                kwargs.update(
                    disk_dir=os.path.join(self.options.disk_dir, fingerprint[:16]),
                    disk_bytes=self.options.disk_bytes,
                    fingerprint=fingerprint,
                    persist_seconds=self.options.persist_seconds,
                )
            # several models share the budgets: each new one gets the whole bound, and
            # `trim_to` (called with the total) keeps the sum within it
            pc = self._tries[model] = PrefixCache(lambda: self._fresh_caches(model), **kwargs)
        return pc

    def _fingerprint(self, model_key: Any) -> str:
        """The loaded model's fingerprint (with a draft model: of both, as their caches are stored together)."""
        main, draft = model_fingerprint(self._model_for(model_key)), self._provider.draft_model
        return main if draft is None else hashlib.sha256(f"{main}+{model_fingerprint(draft)}".encode()).hexdigest()

    # --- mlx-lm's prompt-cache interface -------------------------------------------------

    def serving(self, namespace: str) -> None:
        """The generation thread takes a request of `namespace` (its tenant's, salted or not):
        what it fetches, and stores without a tagged cache, is that namespace's."""
        self.active_namespace = namespace

    def fetch_nearest_cache(self, model: Any, tokens: Sequence[int]) -> tuple[Optional[list], list[int]]:
        tokens = list(tokens)
        ns = self.active_namespace
        if self.next_turn is not None:
            self.next_turn.saw_prompt(tokens, ns)
        tic = time.perf_counter()
        pc = self._trie(model) if tokens else None
        if pc is None:
            return None, tokens
        before = pc.stats()
        with pc.begin(tokens, namespace=ns) as session:
            cached, caches, branches, reason = (
                session.cached,
                session.caches,
                session.branch_points,
                session.miss_reason,
            )
        seconds = time.perf_counter() - tic
        after = pc.stats()
        tier = next(
            (t for t in ("disk", "host", "device") if after[f"cached_tokens_{t}"] > before[f"cached_tokens_{t}"]),
            "hot" if after["hot_restores"] > before["hot_restores"] else "-",
        )
        with self._lock:
            self.requests += 1
            self.prompt_tokens += len(tokens)
            self.cached_tokens += cached
            self.restore_seconds += seconds
            if reason is not None:
                self.miss_reasons[reason] += 1
            self.tenants.setdefault(tenant_of(ns), TenantFigures()).count(len(tokens), cached, reason)
            if pc.recurrent_layers:
                # a hybrid model's state is stored only where the prefill stops: stop where the
                # prompt leaves the trie (a branch point) and at its cache breakpoints; the
                # batch generator and the single path split there
                marks = self._breakpoints.get((ns, tuple(tokens)), ((), ()))[0]
                branch = tuple(sorted({p for p in (*branches, *marks) if cached < p < len(tokens) - 1}))
                if branch:
                    self._splits[(ns, tuple(tokens))] = branch
                    while len(self._splits) > 64:
                        self._splits.pop(next(iter(self._splits)))
        logger.info(
            "request: %d prompt tokens, %d cached (%s), restore %.2f ms%s%s",
            len(tokens),
            cached,
            tier if cached else "miss",
            seconds * 1e3,
            f", miss: {reason}" if reason else "",
            f", namespace {ns}" if ns != DEFAULT_TENANT else "",
        )
        if not cached and not any(k == "window" for k in pc.layer_kinds):
            return None, tokens
        return caches, tokens[cached:]

    def prefix_cache(self, model_key: Any) -> Any:
        """The loaded model's PrefixCache (made on first use)."""
        return self._trie(model_key)

    def prefix_caches(self) -> list:
        """Every model's PrefixCache."""
        return list(self._tries.values())

    def trim_sequences(self, pc: Any) -> None:
        """Hold `--prompt-cache-size` (when given) after storing outside a request."""
        if self.options.max_sequences is not None:
            pc.shrink(max_sequences=self.options.max_sequences)

    def trim_to(self, *, n_sequences: Optional[int] = None, n_bytes: Optional[int] = None) -> None:
        """The server's trim: the byte budgets already bound the device and host tiers (active
        requests' live caches are theirs, not the cache's), so only a sequence cap applies."""
        if n_sequences is not None:
            for pc in self._tries.values():
                pc.shrink(max_sequences=n_sequences)

    def split_points(self, tokens: Sequence[int]) -> tuple[int, ...]:
        """Absolute offsets where the prefill of `tokens` (the request being served) should stop to
        store its state (taken once)."""
        with self._lock:
            return self._splits.pop((self.active_namespace, tuple(tokens)), ())

    def note_breakpoints(
        self, tokens: Sequence[int], positions: Sequence[int], ttls: Sequence[str], namespace: str = DEFAULT_TENANT
    ) -> None:
        """Record a request's cache breakpoints: offsets in its prompt `tokens` where blocks marked with
        `cache_control` end, each with its TTL ("5m" or "1h"). Kept per prompt (the last 64,
        `breakpoints_for`), counted in the stats; on a hybrid model they are capture points
        (`split_points`), and each is a keep-alive promise: once stored, each prefix up to a
        breakpoint is pinned for its TTL unless the budget cannot hold it (`KeepAlive`)."""
        positions, ttls = tuple(int(p) for p in positions), tuple(ttls)
        if len(positions) != len(ttls):
            raise ValueError(f"one TTL per breakpoint: {len(positions)} positions, {len(ttls)} TTLs")
        if any(not 0 <= p <= len(tokens) for p in positions) or any(t not in ("5m", "1h") for t in ttls):
            raise ValueError(
                f"breakpoints must lie within the prompt (0..{len(tokens)}) with TTL 5m or 1h, "
                f"got {list(zip(positions, ttls))}"
            )
        if not positions:
            return
        with self._lock:
            self._breakpoints[(namespace, tuple(tokens))] = (positions, ttls)
            while len(self._breakpoints) > 64:
                self._breakpoints.pop(next(iter(self._breakpoints)))
            self.breakpoint_requests += 1
            self.breakpoints += len(positions)
        self.keep_alive.note(tokens, positions, ttls, namespace)

    def breakpoints_for(
        self, tokens: Sequence[int], namespace: str = DEFAULT_TENANT
    ) -> tuple[tuple[int, ...], tuple[str, ...]]:
        """The breakpoints noted for the prompt `tokens`: (positions, TTLs), empty when none were."""
        with self._lock:
            return self._breakpoints.get((namespace, tuple(tokens)), ((), ()))

    def insert_cache(
        self, model: Any, tokens: Sequence[int], prompt_cache: list, *, cache_type: str = "assistant"
    ) -> None:
        """Store what `prompt_cache` holds of `tokens` in its request's namespace (the one it is
        tagged with, else the request being served); never raises (a failed store is logged)."""
        ns = namespace_of_caches(prompt_cache) or self.active_namespace
        try:
            pc = self._trie(model)
            prompt_cache = serve_single.dequantized(prompt_cache)  # --kv-bits: stored as the KVCaches kvtrie holds
            serve_single.settle_offsets(prompt_cache)
            held = cache_offset(prompt_cache)
            tokens = list(tokens)[: len(tokens) if held is None else held]
            if tokens:
                pc.store(tokens, prompt_cache, namespace=ns, then=lambda: self._keep(pc, tokens, ns))
            if self.options.max_sequences is not None:
                pc.shrink(max_sequences=self.options.max_sequences)
        except Exception:  # never fail a request over a cache store
            logger.exception("storing %d tokens in the prompt cache failed", len(tokens))

    def _keep(self, pc: Any, tokens: list[int], namespace: str) -> None:
        try:  # pinned while the store still holds the path, so the budget's enforcement spares it
            self.keep_alive.stored(pc, tokens, namespace)
        except Exception:  # never fail a request over a keep-alive pin
            logger.exception("keeping a cache breakpoint failed")

    # --- what the endpoints show -----------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Per model: the PrefixCache's stats; and the server's totals, budgets and hit rate."""
        with self._lock:
            totals = {
                "requests": self.requests,
                "prompt_tokens": self.prompt_tokens,
                "cached_tokens": self.cached_tokens,
                "hit_rate": self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0,
                "restore_ms_mean": 1e3 * self.restore_seconds / self.requests if self.requests else 0.0,
                "breakpoint_requests": self.breakpoint_requests,  # requests with cache_control breakpoints
                "breakpoints": self.breakpoints,
                **self.keep_alive.stats(),
                "miss_reasons": dict(self.miss_reasons),  # requests per reason they restored less (kvtrie.misses)
            }
        jobs = self.next_turn
        totals.update(
            jobs.stats()
            if jobs is not None
            else {"next_turn_jobs": 0, "next_turn_tokens": 0, "next_turn_cancelled": 0, "next_turn_pending": 0}
        )
        models = {json.dumps(list(k) if isinstance(k, tuple) else k): pc.stats() for k, pc in list(self._tries.items())}
        return {
            **totals,
            "tenants": self._tenant_stats(models),
            "held_bytes": sum(m["held_bytes"] for m in models.values()),  # everything kvtrie holds, within B
            "huge_pages": huge_pages(),
            "process_resident_bytes": rss_bytes(),  # the whole server: + weights, requests in flight, Python
            "budgets": {
                "prompt_cache_bytes": self.options.cache_bytes,
                "device_bytes": self.options.device_bytes,
                "host_bytes": self.options.host_bytes,
                "disk_bytes": self.options.disk_bytes,
                "disk_dir": self.options.disk_dir,
                "mlx_cache_bytes": self.options.mlx_cache_limit,
            },
            "models": models,
        }

    def _tenant_stats(self, models: dict[str, Any], only: Optional[str] = None) -> dict[str, Any]:
        """Per tenant: its requests' figures and the bytes its namespaces hold, per tier."""
        with self._lock:
            figures = {
                name: f.as_dict(own_view=only is not None)
                for name, f in self.tenants.items()
                if only is None or name == only
            }
        for s in models.values():
            for name, held in s.get("tenants", {}).items():
                if only is None or name == only:
                    entry = figures.setdefault(name, TenantFigures().as_dict(own_view=only is not None))
                    for key, value in held.items():
                        entry[key] = entry.get(key, 0) + value
        return figures

    def tenant_stats(self, tenant: str) -> dict[str, Any]:
        """What one tenant may see: its own figures and bytes, and the server's budgets."""
        models = {json.dumps(list(k) if isinstance(k, tuple) else k): pc.stats() for k, pc in list(self._tries.items())}
        own = self._tenant_stats(models, only=tenant).get(tenant, TenantFigures().as_dict(own_view=True))
        return {"tenant": tenant, **own, "budgets": {"prompt_cache_bytes": self.options.cache_bytes}}

    def close(self) -> None:
        """Flush every model's cache (to its disk tier, where there is one)."""
        for pc in list(self._tries.values()):
            pc.close()


def metrics_text(cache: ServerPromptCache) -> bytes:
    """The Prometheus text exposition of `cache.stats()`."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    stats = cache.stats()

    class Collector:
        def collect(self):
            for name in (
                "requests",
                "prompt_tokens",
                "cached_tokens",
                "breakpoints_kept",
                "breakpoints_given_way",
                "breakpoints_unkept",
                "next_turn_jobs",
                "next_turn_tokens",
                "next_turn_cancelled",
            ):
                yield CounterMetricFamily(
                    f"kvtrie_{name}", f"{name.replace('_', ' ')} since the server started", value=stats[name]
                )
            yield GaugeMetricFamily(
                "kvtrie_breakpoints_held", "cache breakpoints pinned for their TTL now", value=stats["breakpoints_held"]
            )
            yield GaugeMetricFamily("kvtrie_hit_rate", "cached tokens / prompt tokens", value=stats["hit_rate"])
            yield GaugeMetricFamily(
                "kvtrie_next_turn_pending", "next-turn jobs waiting or running", value=stats["next_turn_pending"]
            )
            misses = CounterMetricFamily(
                "kvtrie_misses", "requests that restored less than they could, per reason", labels=["reason"]
            )
            for reason, count in stats["miss_reasons"].items():
                misses.add_metric([reason], count)
            yield misses
            yield from tenant_metrics(stats["tenants"])
            yield GaugeMetricFamily(
                "kvtrie_held_bytes",
                "bytes kvtrie holds in memory (bounded by --prompt-cache-bytes)",
                value=stats["held_bytes"],
            )
            yield GaugeMetricFamily(
                "kvtrie_process_resident_bytes",
                "the server process's resident memory (RSS)",
                value=stats["process_resident_bytes"],
            )
            held = GaugeMetricFamily(
                "kvtrie_cache_ledger_bytes",
                "the ledger: bytes held per holder and tier",
                labels=["model", "holder", "tier"],
            )
            for model, s in stats["models"].items():
                for tier, holders in s["held_by_tier"].items():
                    for holder, value in holders.items():
                        held.add_metric([model, holder, tier], value)
            yield held
            budget = GaugeMetricFamily("kvtrie_budget_bytes", "byte budget per tier", labels=["tier"])
            for tier in ("device", "host", "disk"):
                value = stats["budgets"][f"{tier}_bytes"]
                if value is not None:
                    budget.add_metric([tier], value)
            yield budget
            per_model: dict[str, Any] = {}
            for model, s in stats["models"].items():
                for key, value in s.items():
                    if isinstance(value, (int, float)):
                        family = per_model.get(key)
                        if family is None:
                            kind = CounterMetricFamily if key not in _GAUGES else GaugeMetricFamily
                            family = per_model[key] = kind(
                                f"kvtrie_cache_{key}", f"PrefixCache stats()['{key}']", labels=["model"]
                            )
                        family.add_metric([model], value)
            yield from per_model.values()

    registry = CollectorRegistry()
    registry.register(Collector())
    return generate_latest(registry)


def tenant_metrics(tenants: dict[str, Any]) -> list:
    """Per-tenant metric families: requests, prompt and cached tokens, hit rate, bytes per tier."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    counters = {
        name: CounterMetricFamily(f"kvtrie_tenant_{name}", f"{name.replace('_', ' ')} per tenant", labels=["tenant"])
        for name in ("requests", "prompt_tokens", "cached_tokens")
    }
    hit = GaugeMetricFamily("kvtrie_tenant_hit_rate", "cached tokens / prompt tokens per tenant", labels=["tenant"])
    held = GaugeMetricFamily("kvtrie_tenant_bytes", "payload bytes per tenant and tier", labels=["tenant", "tier"])
    for tenant, figures in tenants.items():
        for name, family in counters.items():
            family.add_metric([tenant], figures.get(name, 0))
        hit.add_metric([tenant], figures.get("hit_rate", 0.0))
        for tier in ("device", "host", "disk"):
            held.add_metric([tenant, tier], figures.get(f"{tier}_bytes", 0))
    return [*counters.values(), hit, held]


_GAUGES = {
    "nodes",
    "tokens_stored",
    "sequences",
    "snapshots",
    "device_bytes",
    "host_bytes",
    "disk_bytes",
    "kv_bytes",
    "snapshot_bytes",
    "recycle_bytes",
    "held_bytes",
    "held_device_bytes",
    "held_host_bytes",
    "in_use_bytes",
    "open_sessions",
    "pins",
    "pinned_bytes",
    "disk_degraded",
}


def make_handler(base: type, cache: ServerPromptCache, limits: Optional[guard.Limits] = None) -> type:
    """mlx-lm's APIHandler with `GET /kvtrie/stats` (JSON), `GET /metrics` (Prometheus) and the
    Anthropic Messages API (`POST /v1/messages`, `POST /v1/messages/count_tokens`) and the cache
    control endpoints (`kvtrie.control`: prefill, pin, clear)."""
    limits = limits or guard.Limits.for_server(cache.options, cache._provider)  # (request bodies: kvtrie.guard)
    control = Controller(cache, limits)
    gate = Gate(cache.options.tenants)  # (who asks: kvtrie.serve_tenants)

    class Handler(base):
        timeout = cache.options.request_timeout  # (the socket's: a client silent this long is dropped)

        def do_POST(self):
            from . import serve_messages

            if gate.admit(self, lambda: guard.admit(self, limits)) is None:  # a key, then the body, then its salt
                return
            count_only = serve_messages.ROUTES.get(self.path.split("?", 1)[0])
            if count_only is not None:
                serve_messages.serve(self, cache, count_only=count_only)
            elif not control.route(self, "POST"):
                super().do_POST()

        def do_DELETE(self):
            if gate.admit(self, lambda: guard.admit(self, limits)) is not None:
                control.route(self, "DELETE")

        def handle_completion(self, request, stop_words):
            try:
                super().handle_completion(request, stop_words)
            except guard.Refusal as refusal:  # the generation thread refused the prompt (its length, the template)
                exc = refusal.rejected
                guard.send_error(self, exc.status, exc.message, param=exc.param, code=exc.code)

        def do_GET(self):
            caller = gate.admit(self)
            if caller is None:
                return
            path = self.path.split("?", 1)[0]
            if path == "/kvtrie/stats":
                stats = cache.stats() if caller.admin else cache.tenant_stats(caller.name)
                body, kind = json.dumps(stats).encode(), "application/json"
            elif path == "/metrics":
                if not caller.admin:
                    return guard.send_error(
                        self, 403, "/metrics shows every tenant: it needs an admin key", kind="permission_error"
                    )
                body, kind = metrics_text(cache), "text/plain; version=0.0.4; charset=utf-8"
            else:
                return super().do_GET()
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return Handler


def make_batch_generator(base: type, cache: ServerPromptCache) -> type:
    """mlx-lm's BatchGenerator that also stops a prompt's prefill at the points `cache` asks for
    (where a hybrid model's prompt leaves the trie) and stores the state there, without telling
    the server (whose own segment bookkeeping stays as it is)."""

    class SplittingBatchGenerator(base):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._kvtrie_splits: dict[int, list[Any]] = {}  # uid -> [segments seen, segment ends to store quietly]
            self._kvtrie_namespaces: dict[int, str] = {}  # uid -> its request's namespace
            self._kvtrie_model_key = cache._provider.model_key

        def remove(self, uids, *args, **kwargs):
            out = super().remove(uids, *args, **kwargs)
            for uid in uids:
                self._kvtrie_namespaces.pop(uid, None)
            return out

        def insert_segments(self, segments, max_tokens=None, caches=None, all_tokens=None, **kwargs):
            extra: list[list[int]] = []
            new_segments = []
            for i, seq in enumerate(segments):
                seq = [s for s in seq if len(s)]
                done = list(all_tokens[i]) if all_tokens else []
                prompt = done + [t for s in seq for t in s]
                cuts = [p - len(done) for p in cache.split_points(prompt)]
                pieces, ends, pos = [], [], 0
                for s in seq:
                    lo, hi = pos, pos + len(s)
                    inner = [c - lo for c in cuts if lo < c < hi - 1]
                    last = 0
                    for c in inner:
                        pieces.append(s[last:c])
                        ends.append(len(pieces) - 1)
                        last = c
                    pieces.append(s[last:])
                    pos = hi
                new_segments.append(pieces)
                extra.append(ends)
            uids = super().insert_segments(new_segments, max_tokens, caches, all_tokens, **kwargs)
            for uid in uids:  # (inserted as the generation thread takes the request: its namespace is the one served)
                self._kvtrie_namespaces[uid] = cache.active_namespace
            for uid, ends in zip(uids, extra):
                if ends:
                    self._kvtrie_splits[uid] = [0, set(ends)]
            return uids

        def extract_cache(self, uids):
            extracted = super().extract_cache(uids)
            return {uid: (self._kvtrie_tag(uid, c), tokens) for uid, (c, tokens) in extracted.items()}

        def _kvtrie_tag(self, uid: int, caches: Any) -> Any:
            namespace = self._kvtrie_namespaces.get(uid)
            return caches if namespace is None or caches is None else Tagged.of(caches, namespace)

        def _next(self):
            prompt_responses, generation_responses = super()._next()
            for r in generation_responses:  # a finished request's cache is stored in its own namespace
                if r.finish_reason is not None:
                    r.prompt_cache = self._kvtrie_tag(r.uid, r.prompt_cache)
                    self._kvtrie_namespaces.pop(r.uid, None)
            for r in prompt_responses:
                entry = self._kvtrie_splits.get(r.uid)
                if entry is None or not r.end_of_segment or r.end_of_prompt:
                    continue
                index = entry[0]
                entry[0] += 1
                if index in entry[1]:
                    r.end_of_segment = False  # the server's segments end elsewhere
                    extracted = self.extract_cache([r.uid]).get(r.uid)
                    if extracted is not None:
                        prompt_cache, tokens = extracted
                        try:
                            cache.insert_cache(self._kvtrie_model_key, list(tokens), prompt_cache)
                        except Exception:  # never fail a request over a cache insert
                            logger.exception("storing the state at a branch point failed")
                    if index >= max(entry[1]):
                        del self._kvtrie_splits[r.uid]
            return prompt_responses, generation_responses

    SplittingBatchGenerator._kvtrie_base = base
    return SplittingBatchGenerator


# --- the command line ----------------------------------------------------------------------


def _size(text: str) -> int:
    """Bytes from `123`, `512M`, `4G`, `1.5GB` (powers of 1024)."""
    s = text.strip().upper().removesuffix("B").removesuffix("I")
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    try:
        if s and s[-1] in units:
            return int(float(s[:-1]) * units[s[-1]])
        return int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size in bytes: {text!r} (e.g. 800000000, 512M, 4G)") from None


KVTRIE_HELP = f"""\
The prompt cache is a prefix trie (kvtrie). Sequences that share a prefix store it once,
any stored prefix restores, and memory is bounded in bytes: --prompt-cache-bytes B bounds
everything kvtrie holds in memory (default: {int(MEMORY_FRACTION * 100)}% of this machine's memory, never unbounded):
the stored prefixes on the device and host tiers, recycled live caches, free host buffers,
copies in flight to disk or Redis, and MLX's buffer cache (its limit is set within B). Not
in B: the model's weights, and the requests being served (their own caches and activations).
--prompt-cache-size no longer throttles sequences that share storage; given explicitly it
caps the number of stored sequences (trie leaves). Also: GET /kvtrie/stats, GET /metrics,
POST /kvtrie/prefill, POST|DELETE /kvtrie/pin, DELETE /kvtrie/cache.
After each chat reply, the conversation as its next request will render it (the reply
re-rendered by the chat template) is prefilled in the background when the server is idle
(--no-next-turn turns that off).
Every request body is checked before anything is computed: at most --max-request-bytes
(413), valid UTF-8 JSON, each field mlx-lm reads of the right type and range (400 in the
endpoint's error shape), a prompt of at most --max-prompt-tokens tokens (400); a client
silent for --request-timeout seconds while sending is disconnected.
Where glibc and the kernel allow it, the server restarts itself at once with malloc on
transparent huge pages (GLIBC_TUNABLES=glibc.malloc.hugetlb=1): fresh buffers fault in
2 MiB at a time, 4-6x faster; KVTRIE_HUGE_PAGES=0 in the environment turns that off."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("kvtrie", KVTRIE_HELP)
    group.add_argument(
        "--host-bytes",
        type=_size,
        default=None,
        help=f"of --prompt-cache-bytes, what the host tier holds (default {int(HOST_SHARE * 100)}%%)",
    )
    group.add_argument(
        "--disk-dir",
        default=None,
        help="directory of the persistent tier (a subdirectory per model, named by its weights)",
    )
    group.add_argument(
        "--disk-bytes", type=_size, default=None, help="byte budget of the disk tier (default: unbounded)"
    )
    group.add_argument(
        "--shared-url",
        default=None,
        help="a Redis that servers of the same model share prefixes through: redis://HOST:PORT/DB, "
        "rediss://, a password in the URL, or any node of a Redis Cluster",
    )
    group.add_argument(
        "--shared-block-tokens",
        type=int,
        default=256,
        help="tokens per shared block (every server sharing a Redis must use the same)",
    )
    group.add_argument(
        "--shared-secret-file",
        default=None,
        help="a file holding a secret (its bytes, less a trailing newline) that authenticates the "
        "shared tier: values carry a keyed MAC and keys derive from it, so only servers with the "
        "same secret share blocks (values are not encrypted)",
    )
    group.add_argument(
        "--persist-seconds",
        type=float,
        default=2.0,
        help="with --disk-dir: what was stored this many seconds ago is on disk, so a server killed "
        "at any moment (kill -9 included) restarts warm with it (default 2)",
    )
    group.add_argument(
        "--recycle-bytes",
        type=_size,
        default=None,
        help="at most this much of freed live caches kept (within B) for the next restores to write "
        "into: a restore then skips MLX's zero fill (default: what B leaves; 0 turns it off)",
    )
    group.add_argument(
        "--no-next-turn",
        action="store_true",
        help="do not compute a conversation's next turn in the background after each chat reply "
        "(the reply as the client sends it back, re-rendered by the chat template)",
    )
    group.add_argument(
        "--api-keys",
        default=None,
        metavar="FILE",
        help="a file of `KEY TENANT [admin]` lines: every /v1/* and /kvtrie/* request then needs "
        "`Authorization: Bearer KEY` or `x-api-key: KEY` (401 without), and each tenant's cache is "
        "its own namespace on every tier (memory, disk, the shared tier); /health stays open; "
        "only admin keys see every tenant in /kvtrie/stats and read /metrics",
    )
    group.add_argument(
        "--tenant-bytes",
        default=None,
        metavar="SHARE|FILE",
        help="each tenant's fair share of memory: a size (512M), a percentage of --prompt-cache-bytes "
        "(25%%), or a file of `TENANT SHARE` lines (`*` for the others); when memory is full, a "
        "tenant past its share loses its own payloads first (shares are not reservations)",
    )
    group.add_argument(
        "--mlx-cache-bytes",
        type=_size,
        default=None,
        help=f"at most this much of freed buffers MLX keeps for reuse (within B; default "
        f"{int(MLX_CACHE_SHARE * 100)}%% of B)",
    )
    group.add_argument(
        "--max-request-bytes",
        type=_size,
        default=guard.MAX_REQUEST_BYTES,
        help="a request body larger than this is refused with a 413, unread (default 32M)",
    )
    group.add_argument(
        "--max-prompt-tokens",
        type=int,
        default=None,
        help="a prompt that renders to more tokens than this is refused with a 400 before it is "
        "computed (default: the model's context length, max_position_embeddings in its "
        f"config.json, else {guard.DEFAULT_PROMPT_TOKENS})",
    )
    group.add_argument(
        "--request-timeout",
        type=float,
        default=guard.REQUEST_TIMEOUT,
        help="seconds a client may stay silent while sending its request before the connection "
        f"is closed (default {guard.REQUEST_TIMEOUT:g})",
    )


class _Parser(argparse.ArgumentParser):
    """mlx_lm.server's parser with kvtrie's meaning of the prompt-cache flags and its own flags."""

    def add_argument(self, *names, **kwargs):
        if "--prompt-cache-size" in names:
            kwargs.update(
                default=None,
                help="with kvtrie: the most stored sequences (trie leaves); unset, only bytes bound the cache",
            )
        elif "--prompt-cache-bytes" in names:
            kwargs.update(
                type=_size,
                help="bytes of the device + host tiers together, e.g. 800000000, 512M, 4G "
                "(default: a quarter of the machine's memory)",
            )
        return super().add_argument(*names, **kwargs)

    def parse_args(self, args=None, namespace=None):
        if not any(a.title == "kvtrie" for a in self._action_groups):
            add_arguments(self)
        return super().parse_args(args, namespace)


def options_from(args: argparse.Namespace) -> ServeOptions:
    total = args.prompt_cache_bytes if args.prompt_cache_bytes is not None else default_cache_bytes()
    host = args.host_bytes if args.host_bytes is not None else int(total * HOST_SHARE)
    return ServeOptions(
        cache_bytes=total,
        host_bytes=min(host, total),
        disk_dir=args.disk_dir,
        disk_bytes=args.disk_bytes,
        max_sequences=args.prompt_cache_size,
        persist_seconds=args.persist_seconds,
        shared_url=args.shared_url,
        shared_block_tokens=args.shared_block_tokens,
        shared_secret=read_secret(getattr(args, "shared_secret_file", None), args.shared_url),
        recycle_bytes=args.recycle_bytes,
        mlx_cache_bytes=args.mlx_cache_bytes,
        next_turn=not getattr(args, "no_next_turn", False),
        tenants=read_api_keys(getattr(args, "api_keys", None)),
        tenant_bytes=tenant_shares(getattr(args, "tenant_bytes", None), total),
        max_request_bytes=getattr(args, "max_request_bytes", guard.MAX_REQUEST_BYTES),
        max_prompt_tokens=getattr(args, "max_prompt_tokens", None),
        request_timeout=getattr(args, "request_timeout", guard.REQUEST_TIMEOUT),
    )


def tenant_shares(value: Optional[str], total: int) -> Any:
    """`--tenant-bytes`: a size (`512M`), a percentage of B (`25%`), or a file of `TENANT SHARE`
    lines (`*` for every tenant not named) -> what `PrefixCache(tenant_bytes=)` takes."""
    if value is None:
        return None

    def share(text: str, where: str) -> int:
        text = text.strip()
        try:
            if text.endswith("%"):
                pct = float(text[:-1])
                if not 0 <= pct <= 100:
                    raise ValueError
                return int(total * pct / 100)
            return _size(text)
        except (ValueError, argparse.ArgumentTypeError):
            raise SystemExit(
                f"kvtrie serve: --tenant-bytes: {where}: not a share: {text!r} "
                "(a size such as 512M, or a percentage of --prompt-cache-bytes such as 25%)"
            ) from None

    if not os.path.isfile(value):
        return share(value, "the value")
    shares: dict[str, int] = {}
    with open(value, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            fields = line.split("#", 1)[0].split()
            if not fields:
                continue
            if len(fields) != 2:
                raise SystemExit(f"kvtrie serve: --tenant-bytes: {value}, line {number}: expected `TENANT SHARE`")
            shares[fields[0]] = share(fields[1], f"{value}, line {number}")
    return shares


def read_api_keys(path: Optional[str]) -> Optional[Tenants]:
    """The tenants of `--api-keys` (None without one); a file that cannot be used ends the server at start."""
    if path is None:
        return None
    try:
        tenants = Tenants.load(path)
    except KeysFileError as exc:
        raise SystemExit(f"kvtrie serve: --api-keys: {exc}") from None
    mode = os.stat(path).st_mode
    if mode & 0o077:
        logger.warning("kvtrie serve: --api-keys %s can be read by other users (chmod 600 it)", path)
    return tenants


def read_secret(path: Optional[str], shared_url: Optional[str] = None) -> Optional[bytes]:
    """The secret in `--shared-secret-file` (its bytes less one trailing newline), None without
    one; an unreadable or empty file ends the server at start with a clear message."""
    if path is None:
        return None
    if shared_url is None:
        raise SystemExit("kvtrie serve: --shared-secret-file needs --shared-url (it authenticates the shared tier)")
    try:
        with open(path, "rb") as f:
            secret = f.read()
    except OSError as exc:
        raise SystemExit(f"kvtrie serve: --shared-secret-file: cannot read {path}: {exc}") from None
    secret = secret[:-2] if secret.endswith(b"\r\n") else secret[:-1] if secret.endswith(b"\n") else secret
    if not secret:
        raise SystemExit(f"kvtrie serve: --shared-secret-file: {path} is empty")
    return secret


def run(
    host: str, port: int, model_provider: Any, server_class: Optional[type] = None, handler_class: Optional[type] = None
) -> None:
    """mlx_lm.server.run with kvtrie's prompt cache, batch generator, single path and handler;
    stops cleanly on SIGTERM / Ctrl-C, flushing the cache."""
    import mlx.core as mx
    import mlx_lm.server as server

    try:
        options = options_from(model_provider.cli_args)
    except ValueError as exc:
        raise SystemExit(f"kvtrie serve: {exc}") from None
    if options.disk_dir is not None:
        try:  # refused at start, not at the first write: created 0700, never one others can write to
            private_directory(options.disk_dir)
        except (UnsafeDirectoryError, OSError) as exc:
            raise SystemExit(f"kvtrie serve: --disk-dir: {exc}") from None
    # MLX keeps freed buffers for reuse up to a limit the PrefixCache sets within B (its ledger
    # counts them); blocks past 1 MiB that anyone frees go back to the operating system at once
    mx.set_cache_limit(options.mlx_cache_limit)
    return_large_frees(MMAP_THRESHOLD)
    cache = ServerPromptCache(options, model_provider)
    # (mlx-lm's class replaced by a subclass made at run time: mypy allows no such assignment)
    cast(Any, server).BatchGenerator = make_batch_generator(_original_batch_generator(server), cache)
    limits = guard.Limits.for_server(options, model_provider)
    generator_class = with_tenants(guard.with_prompt_limit(server.ResponseGenerator, limits), cache)
    generator = with_jobs(with_next_turn(generator_class, cache, enabled=options.next_turn))(model_provider, cache)
    serve_single.install(server, generator, cache)
    handler = make_handler(handler_class or server.APIHandler, cache, limits)
    logger.info(
        "kvtrie serve: request bodies at most %d B, prompts at most %d tokens, clients silent at most %g s "
        "while sending",
        limits.max_request_bytes,
        limits.max_prompt_tokens,
        options.request_timeout,
    )
    logger.info(
        "kvtrie serve: prompt cache %d B (device %d, host %d; MLX's buffer cache at most %d of it), huge pages %s%s",
        options.cache_bytes,
        options.device_bytes,
        options.host_bytes,
        options.mlx_cache_limit,
        "on" if huge_pages() else "off",
        f", disk tier {options.disk_dir}" + (f" ({options.disk_bytes} B)" if options.disk_bytes else "")
        if options.disk_dir
        else "",
    )

    def stop(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        server._run_http_server(
            host, port, generator, handler_class=handler, **({"server_class": server_class} if server_class else {})
        )
    except KeyboardInterrupt:
        generator.stop_and_join()
    finally:
        signal.signal(signal.SIGTERM, previous)
        serve_single.uninstall(server)
        cache.close()
        logger.info("kvtrie serve: stopped, cache flushed")


def _original_batch_generator(server: Any) -> type:
    bg = server.BatchGenerator
    return getattr(bg, "_kvtrie_base", bg)


def main(argv: Optional[Sequence[str]] = None) -> None:
    """`kvtrie serve [mlx_lm.server flags] [kvtrie flags]`."""
    try:  # before anything of mlx-lm's is imported: a release it is not tested with is refused by name
        check_mlx_lm()
    except UntestedDependencyError as exc:
        raise SystemExit(f"kvtrie serve: {exc}") from None
    import mlx_lm.server as server

    saved = server.argparse, server.run, sys.argv
    shim = argparse.Namespace(**{k: getattr(argparse, k) for k in dir(argparse) if not k.startswith("__")})
    shim.ArgumentParser = _Parser
    patched = cast(Any, server)  # (its argparse module and run function replaced: mypy allows no such assignment)
    patched.argparse, patched.run = shim, run
    if argv is not None:
        sys.argv = ["kvtrie serve", *argv]
    else:
        sys.argv = ["kvtrie serve", *sys.argv[1:]]
    try:
        server.main()
    finally:
        server.argparse, server.run, sys.argv = saved


if __name__ == "__main__":
    exec_with_huge_pages()
    main()
