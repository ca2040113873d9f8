"""Caching strategies replaying a trace: no cache, a single-entry cache, mlx-lm's LRUPromptCache, kvtrie.

Every strategy serves each request the same way (restore what it can, prefill the rest,
decode the recorded reply) and reports what it computed and how long it took.
"""

from __future__ import annotations

import time
from typing import Any, Optional

import attrs
import mlx.core as mx
import numpy as np

from kvtrie import PrefixCache
from kvtrie.models import generate

from workloads import Request, unique_tokens


@attrs.frozen
class Served:
    """What serving one request cost."""

    cached: int
    prefilled: int
    ttft_s: float
    restore_s: float
    hot: bool = False


def _lcp(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    diff = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(diff[0]) if len(diff) else n


def _is_recurrent(cache: Any) -> bool:
    return not hasattr(cache, "update_and_fetch")


def run_request(model, caches: list, cached: int, r: Request, step: int = 512) -> float:
    """Prefill `r.prompt[cached:]` in chunks, decode the recorded reply (forced); returns the prefill time."""
    t = time.perf_counter()
    rest = r.prompt[cached:]
    for i in range(0, len(rest), step):
        logits = model(mx.array(rest[i : i + step], dtype=mx.int32)[None], cache=caches)
        mx.eval(logits)
    prefill = time.perf_counter() - t
    for tok in r.reply[:-1]:
        mx.eval(model(mx.array([[tok]], dtype=mx.int32), cache=caches))
    return prefill


class NoCache:
    name = "no cache"

    def __init__(self, model):
        self.model = model

    def serve(self, r: Request) -> Served:
        ttft = run_request(self.model, self.model.make_cache(), 0, r)
        return Served(0, len(r.prompt), ttft, 0.0)

    def held(self) -> tuple[int, int]:
        return 0, 0


class SingleEntry:
    """Keeps the live caches of the last request only; reuses them when the next prompt shares a prefix.

    KV layers are trimmed back to the common prefix; recurrent layers cannot be, so a
    hybrid model reuses them only when the prompt extends the whole stored sequence.
    """

    name = "single entry"

    def __init__(self, model):
        self.model = model
        self.tokens: list[int] = []
        self.caches: Optional[list] = None

    def serve(self, r: Request) -> Served:
        t = time.perf_counter()
        caches, cached = self.caches, 0
        if caches is not None:
            common = min(_lcp(r.prompt, self.tokens), len(r.prompt) - 1)
            if any(_is_recurrent(c) for c in caches):
                cached = len(self.tokens) if common == len(self.tokens) else 0
            else:
                cached = common
                for c in caches:
                    c.trim(c.offset - cached)
        if cached == 0:
            caches = self.model.make_cache()
        restore = time.perf_counter() - t
        ttft = restore + run_request(self.model, caches, cached, r)
        self.tokens, self.caches = r.committed, caches
        return Served(cached, len(r.prompt) - cached, ttft, restore)

    def held(self) -> tuple[int, int]:
        return (sum(c.nbytes for c in self.caches) if self.caches else 0), len(self.tokens)


class MlxLmLRU:
    """mlx-lm's own cross-request cache (`mlx_lm.models.cache.LRUPromptCache`), used as mlx_lm.server does."""

    def __init__(self, model, max_bytes: Optional[int] = None, label: str = "mlx-lm LRUPromptCache"):
        from mlx_lm.models.cache import LRUPromptCache, can_trim_prompt_cache, trim_prompt_cache

        self.model = model
        self.name = label
        self.lru = LRUPromptCache(max_size=1 << 20, max_bytes=(1 << 63) if max_bytes is None else max_bytes)
        self._can_trim, self._trim = can_trim_prompt_cache, trim_prompt_cache

    def serve(self, r: Request) -> Served:
        t = time.perf_counter()
        caches, rest = self.lru.fetch_nearest_cache("model", r.prompt)
        if caches is not None and not rest:  # an exact hit leaves nothing to compute logits from
            if self._can_trim(caches):
                self._trim(caches, 1)
                rest = r.prompt[-1:]
            else:
                caches, rest = None, r.prompt
        if caches is None:
            caches = self.model.make_cache()
        cached = len(r.prompt) - len(rest)
        restore = time.perf_counter() - t
        ttft = restore + run_request(self.model, caches, cached, r)
        self.lru.insert_cache("model", r.committed, caches)
        return Served(cached, len(rest), ttft, restore)

    def held(self) -> tuple[int, int]:
        seqs = [list(tokens) for lru in self.lru._lru._lrus.values() for _, tokens in lru]
        return self.lru.nbytes, unique_tokens(seqs)


class KVTrie:
    """kvtrie's PrefixCache, through its generation loop."""

    def __init__(self, model, label: str = "kvtrie", **kwargs: Any):
        self.model = model
        self.name = label
        self.pc = PrefixCache(model.make_cache, **kwargs)

    def serve(self, r: Request) -> Served:
        forced = iter(r.reply)
        hot = self.pc.stats()["hot_restores"]
        res = generate(
            self.model,
            self.pc,
            r.prompt,
            max_tokens=len(r.reply),
            sampler=lambda logits, history: next(forced),
            capture_hints=r.hints,
        )
        return Served(res.cached_tokens, res.prefill_tokens, res.ttft_s, res.restore_s, self.pc.stats()["hot_restores"] > hot)

    def held(self) -> tuple[int, int]:
        s = self.pc.stats()
        return s["device_bytes"] + s["host_bytes"], s["tokens_stored"]


def mlx_lm_available() -> Optional[str]:
    """None if mlx-lm imports, else why not (the strategies that need it are skipped with this note)."""
    try:
        import mlx_lm.models.cache  # noqa: F401
    except ImportError as exc:
        return f"mlx-lm not installed ({exc}); install the bench extra: pip install 'kvtrie[bench]'"
    return None
