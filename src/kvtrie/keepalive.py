"""Cache breakpoints as keep-alive promises: a prefix marked with `cache_control` stays stored for
its TTL (`ephemeral`: 5 minutes; `"ttl": "1h"`), unless the budget cannot hold it.

A request's breakpoints are noted before its prefill (positions in its prompt); once the server has
stored the prompt up to a breakpoint, that prefix is pinned in the PrefixCache with the TTL
(`PrefixCache.pin(..., ttl=)`: pinned payloads are never evicted or moved down a tier). When a pin
is refused for want of room, the keep-alive pins that expire soonest give way first, one at a time,
and that is counted; pins of the same prefix renew. Nothing here touches MLX.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import attrs
import numpy as np

from .errors import PinError

logger = logging.getLogger("kvtrie.serve")

TTL_SECONDS = {"5m": 300.0, "1h": 3600.0}
PENDING = 64  # prompts whose breakpoints wait for their prefill to store them


@attrs.define(slots=True, eq=False)
class _Kept:
    cache: Any  # the PrefixCache holding the pin
    tokens: np.ndarray
    expires: float
    namespace: str = "default"


@attrs.define(slots=True, eq=False)
class KeepAlive:
    """Breakpoints noted per prompt, then pinned as their prefixes are stored (see the module docstring)."""

    clock: Callable[[], float] = time.monotonic
    _pending: dict = attrs.field(
        factory=dict, init=False
    )  # (namespace, prompt tuple) -> [(position, ttl seconds), ...] not yet stored
    _pinned: dict = attrs.field(factory=dict, init=False)  # (id(cache), namespace, prefix bytes) -> _Kept
    _lock: threading.Lock = attrs.field(factory=threading.Lock, init=False)
    kept: int = attrs.field(default=0, init=False)  # breakpoint prefixes pinned (renewals included)
    given_way: int = attrs.field(default=0, init=False)  # keep-alive pins ended early to make room for newer ones
    unkept: int = attrs.field(default=0, init=False)  # breakpoints the budget could not hold at all

    def note(
        self, prompt: Sequence[int], positions: Sequence[int], ttls: Sequence[str], namespace: str = "default"
    ) -> None:
        """Remember `prompt`'s breakpoints (offsets, each with "5m" or "1h") until they are stored in `namespace`."""
        marks = sorted((int(p), TTL_SECONDS[t]) for p, t in zip(positions, ttls) if int(p) > 0)
        if not marks:
            return
        with self._lock:
            self._pending[(namespace, tuple(prompt))] = marks
            while len(self._pending) > PENDING:
                self._pending.pop(next(iter(self._pending)))

    def stored(self, cache: Any, tokens: Sequence[int], namespace: str = "default") -> int:
        """`tokens` were just stored in `cache` (call it while the store still holds them:
        `PrefixCache.store(..., then=)`): pin every noted breakpoint prefix they now cover; returns
        how many were pinned. Where the budget cannot hold a new one, the keep-alive pins that
        expire soonest give way."""
        n = len(tokens)
        with self._lock:
            due = []
            for key, marks in list(self._pending.items()):
                ns, prompt = key
                ready = [(p, ttl) for p, ttl in marks if p <= n]
                if ns != namespace or not ready or prompt[0] != tokens[0] or not _same(prompt, tokens, ready[-1][0]):
                    continue
                due += ready
                rest = [(p, ttl) for p, ttl in marks if p > n]
                if rest:
                    self._pending[key] = rest
                else:
                    del self._pending[key]
            if not due:
                return 0
            arr = np.asarray(tokens, dtype=np.int64)
            return sum(self._pin(cache, arr[:p], ttl, namespace) for p, ttl in due)

    def _pin(self, cache: Any, prefix: np.ndarray, ttl: float, namespace: str) -> int:
        key = (id(cache), namespace, prefix.tobytes())
        now = self.clock()
        self._pinned = {k: v for k, v in self._pinned.items() if v.expires > now}
        # a recurrent model restores only where a snapshot is: any pinned part will do there
        enough = 1 if getattr(cache, "recurrent_layers", ()) else len(prefix)
        released: list[_Kept] = []
        while True:
            try:
                got = cache.pin(prefix, ttl=ttl, namespace=namespace)
            except PinError:
                got = -1
            if got >= enough:
                self._pinned[key] = _Kept(cache, prefix, now + ttl, namespace)
                self.kept += 1
                return 1
            if got > 0:
                cache.unpin(prefix, namespace=namespace)  # a part only: make room and take it whole
            victims = sorted((v.expires, k) for k, v in self._pinned.items() if v.cache is cache and k != key)
            if not victims:
                self.unkept += 1
                logger.info("cache breakpoint at %d tokens not kept: the budget cannot hold it", len(prefix))
                for old in released:  # it did not fit even alone: the ones that gave way come back
                    self._restore(old)
                return 0
            old = self._pinned.pop(victims[0][1])
            cache.unpin(old.tokens, namespace=old.namespace)
            released.append(old)
            self.given_way += 1

    def _restore(self, old: _Kept) -> None:
        left = old.expires - self.clock()
        try:
            if left > 0 and old.cache.pin(old.tokens, ttl=left, namespace=old.namespace) > 0:
                self._pinned[(id(old.cache), old.namespace, old.tokens.tobytes())] = old
                self.given_way -= 1
        except PinError:
            pass

    def stats(self) -> dict[str, int]:
        """Counters for `/kvtrie/stats`: kept, given way, not kept, and how many are held now."""
        with self._lock:
            now = self.clock()
            held = sum(v.expires > now for v in self._pinned.values())
            return {
                "breakpoints_kept": self.kept,
                "breakpoints_given_way": self.given_way,
                "breakpoints_unkept": self.unkept,
                "breakpoints_held": held,
            }


def _same(prompt: tuple, tokens: Sequence[int], upto: int) -> bool:
    return np.array_equal(np.asarray(prompt[:upto]), np.asarray(tokens[:upto]))
