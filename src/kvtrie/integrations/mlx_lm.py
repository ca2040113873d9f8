"""kvtrie for mlx-lm: any mlx-lm model's caches, its `generate_step`, a prefill without generating,
a drop-in `LRUPromptCache`, prompt-cache files.

Install with `pip install 'kvtrie[mlx-lm]'`. mlx-lm is imported lazily, so importing
this module never fails; the functions that need it say so if it is missing.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Optional, cast

import attrs
import mlx.core as mx
import numpy as np

from ..cache import PrefixCache
from ..errors import PinError
from ..layers import WINDOW, leaves
from ..pins import check_ttl
from ..trie import as_token_array


def _mlx_lm_cache():
    try:
        from mlx_lm.models import cache
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        raise ImportError("kvtrie.integrations.mlx_lm needs mlx-lm: pip install 'kvtrie[mlx-lm]'") from exc
    return cache


def make_prefix_cache(model: Any, **kwargs: Any) -> PrefixCache:
    """A PrefixCache for an mlx-lm model, whose layers get the caches `make_prompt_cache` gives them."""
    cache_mod = _mlx_lm_cache()
    return PrefixCache(lambda: cache_mod.make_prompt_cache(model), **kwargs)


def cache_offset(caches: Sequence[Any]) -> Optional[int]:
    """Positions held by a list of live caches (from the layers that count them), or None when
    no layer counts positions (mamba, rwkv: their `ArraysCache`s have no `offset`)."""
    offsets = {int(c.offset) for c in leaves(caches) if hasattr(c, "offset") and not _unused(c)}
    if len(offsets) > 1:
        raise ValueError(f"the layer caches disagree on their offset: {sorted(offsets)}")
    return offsets.pop() if offsets else None


def _unused(cache: Any) -> bool:
    """A KV cache the model never writes (some layers of nemotron-nas): it stays at offset 0."""
    return getattr(cache, "keys", 0) is None and getattr(cache, "offset", None) == 0


def generate_step(
    prompt: Sequence[int],
    model: Any,
    prefix_cache: PrefixCache,
    *,
    namespace: Optional[str] = None,
    capture_hints: Sequence[int] = (),
    **kwargs: Any,
) -> Iterator[tuple[int, mx.array]]:
    """`mlx_lm.generate.generate_step` on top of the trie: same keyword arguments, same yields.

    The stored prefix is restored, only the rest is prefilled, and when the generator ends
    (exhausted or closed) the prompt plus the generated tokens whose state is in the cache
    are committed. `generate_step` runs one step ahead of what it yields, but every token
    it has yielded has been fed to the model by then, so the cache holds exactly the
    prompt and every yielded token (which is also how positions are counted for models
    whose caches count none).
    """
    from mlx_lm.generate import generate_step as mlx_generate_step

    if "prompt_cache" in kwargs:
        raise TypeError("generate_step gets its prompt_cache from the PrefixCache; do not pass one")
    arr = as_token_array(prompt)
    with prefix_cache.begin(arr, namespace=namespace, capture_hints=capture_hints) as session:
        caches = session.caches
        assert caches is not None  # (an open session holds its caches)
        done = session.cached
        step = int(kwargs.get("prefill_step_size", 2048))
        for point in session.capture_at:  # hybrid models: snapshot recurrent state on the way
            for lo in range(done, point, step):
                model(mx.array(arr[lo : min(lo + step, point)], dtype=mx.int32)[None], cache=caches)
                mx.eval([c.state for c in leaves(caches)])
            session.capture(point)
            done = point
        generated: list[int] = []
        try:
            for token, logprobs in mlx_generate_step(
                mx.array(arr[done:], dtype=mx.int32), model, prompt_cache=caches, **kwargs
            ):
                generated.append(int(token))
                yield token, logprobs  # type: ignore[misc]  # (mlx-lm yields int tokens; its annotation says mx.array)
        finally:
            tokens = np.concatenate([arr, np.array(generated, dtype=arr.dtype)])
            held = cache_offset(caches)
            held = len(tokens) if held is None else held
            if generated and session.cached <= held <= len(tokens):
                session.commit(tokens[:held])


@attrs.frozen
class Prefilled:
    """What `prefill` did: `added` tokens computed and stored (the rest of the prompt was stored
    already), `pinned` tokens pinned (0 without `pin=True`, or when the budgets refused the pin:
    `pin_error` says why)."""

    added: int
    pinned: int = 0
    pin_error: Optional[str] = None


def prefill(
    prompt: Sequence[int],
    model: Any,
    prefix_cache: PrefixCache,
    *,
    namespace: Optional[str] = None,
    capture_hints: Sequence[int] = (),
    prefill_step_size: int = 2048,
    pin: bool = False,
    ttl: Optional[float] = None,
) -> Prefilled:
    """Compute and store the state of `prompt` without generating: restore what is stored, run
    the model over the rest in chunks of `prefill_step_size` (taking the recurrent snapshots the
    session plans on the way), commit; with `pin=True` pin it (`PrefixCache.pin`, `ttl`) before
    its session lets go of it, so the eviction policy never sees it unpinned."""
    if isinstance(prefill_step_size, bool) or not isinstance(prefill_step_size, int) or prefill_step_size < 1:
        raise ValueError(f"prefill_step_size must be a positive int, got {prefill_step_size!r}")
    arr = as_token_array(prompt)
    if pin:
        check_ttl(ttl)  # (before any work)
    with prefix_cache.begin(arr, namespace=namespace, capture_hints=capture_hints) as session:
        caches = session.caches
        assert caches is not None  # (an open session holds its caches)
        done = session.cached
        for point in (*session.capture_at, len(arr)):
            for lo in range(done, point, prefill_step_size):
                model(mx.array(arr[lo : min(lo + prefill_step_size, point)], dtype=mx.int32)[None], cache=caches)
                mx.eval([c.state for c in leaves(caches)])
            if point < len(arr):
                session.capture(point)
            done = point
        added = session.commit(arr)
        if not pin:
            return Prefilled(added)
        try:
            return Prefilled(added, prefix_cache.pin(arr, namespace=namespace, ttl=ttl))
        except PinError as exc:
            return Prefilled(added, 0, str(exc))


class TriePromptCache:
    """A drop-in for `mlx_lm.models.cache.LRUPromptCache`, backed by a prefix trie per model.

    Same methods and return shapes (`fetch_nearest_cache`, `insert_cache`, `trim_to`,
    `len()`, `nbytes`, `stats_by_type`), but sequences that share a prefix store it once,
    any prefix of a stored sequence restores (not only whole entries), and an exact hit
    still leaves one token to compute. `max_size` bounds stored sequences (leaves of
    the trie), `max_bytes` the bytes held; `prefix_cache_kwargs` go to each PrefixCache
    (e.g. a host tier: `host_bytes=...`). `make_cache(model_key)`, when given, makes a
    model's fresh caches, so that even the first request for a model gets caches that
    record what a sliding window scrolls past (without it, kvtrie learns the cache layout
    from the first insert, and that first sequence keeps only its last window).
    """

    def __init__(
        self,
        max_size: int = 10,
        max_bytes: int = 1 << 63,
        *,
        make_cache: Optional[Callable[[Any], list]] = None,
        **prefix_cache_kwargs: Any,
    ):
        if max_size < 0 or max_bytes < 0:
            raise ValueError("max_size and max_bytes must be non-negative")
        if make_cache is not None and not callable(make_cache):
            raise TypeError(f"make_cache must be callable (model key -> caches), got {type(make_cache).__name__}")
        self.max_size = max_size
        self.max_bytes = max_bytes
        self._kwargs = {"device_bytes": max_bytes, "host_bytes": 0, **prefix_cache_kwargs}
        self._make_cache = make_cache
        self._tries: dict[Any, PrefixCache] = {}

    def _trie(self, model: Any, like: Optional[list] = None) -> Optional[PrefixCache]:
        """The model's PrefixCache, made from `make_cache` or from caches shaped `like` the given ones."""
        pc = self._tries.get(model)
        make = self._make_cache
        if pc is None and make is not None:
            pc = self._tries[model] = PrefixCache(lambda: make(model), **self._kwargs)
        elif pc is None and like is not None:
            templates = [_empty_like(c) for c in like]
            pc = self._tries[model] = PrefixCache(lambda: [_empty_like(c) for c in templates], **self._kwargs)
        return pc

    def __len__(self) -> int:
        return sum(pc.num_sequences for pc in self._tries.values())

    @property
    def nbytes(self) -> int:
        return sum(pc.stats()["device_bytes"] + pc.stats()["host_bytes"] for pc in self._tries.values())

    def fetch_nearest_cache(self, model: Any, tokens: Sequence[int]) -> tuple[Optional[list], list[int]]:
        """Live caches holding the longest stored prefix of `tokens`, and the tokens left to compute.

        On a miss mlx-lm's answer is `(None, tokens)`; for models with sliding-window layers
        kvtrie hands out empty caches instead, which record every position the window
        scrolls past, so the whole sequence can be stored when it comes back.
        """
        pc = self._trie(model)
        tokens = list(tokens)
        if pc is None or not tokens:
            return None, tokens
        with pc.begin(tokens) as session:
            if not session.cached and WINDOW not in pc.layer_kinds:
                return None, tokens
            return session.caches, tokens[session.cached :]

    def insert_cache(
        self, model: Any, tokens: Sequence[int], prompt_cache: list, *, cache_type: str = "assistant"
    ) -> None:
        """Store the state `prompt_cache` holds for `tokens` (cut to the positions the cache holds)."""
        pc = self._trie(model, like=prompt_cache)
        assert pc is not None  # (made `like` the given caches if need be)
        held = cache_offset(prompt_cache)
        tokens = list(tokens)[: len(tokens) if held is None else held]
        if tokens:
            pc.store(tokens, prompt_cache)
        self.trim_to(n_sequences=self.max_size)

    def trim_to(self, *, n_sequences: Optional[int] = None, n_bytes: Optional[int] = None) -> None:
        """Evict least recently used sequences until at most `n_sequences` and `n_bytes` remain."""
        for pc in self._tries.values():
            share = None if n_bytes is None else n_bytes // max(len(self._tries), 1)
            pc.shrink(max_sequences=n_sequences, max_bytes=share)

    def stats_by_type(self) -> dict[str, dict[str, int]]:
        """mlx-lm's shape; a trie does not keep entries by type, so all count as "assistant"."""
        empty = {"n_sequences": 0, "n_bytes": 0}
        return {
            "assistant": {"n_sequences": len(self), "n_bytes": self.nbytes},
            "user": dict(empty),
            "system": dict(empty),
        }


def _empty_like(cache: Any) -> Any:
    """A fresh cache of the same type and configuration (window size, quantization, sub-caches)."""
    name = type(cache).__name__
    if name == "RotatingKVCache":
        return type(cache)(max_size=cache.max_size, keep=cache.keep)
    if name == "QuantizedKVCache":
        return type(cache)(group_size=cache.group_size, bits=cache.bits)
    if name == "ChunkedKVCache":
        return type(cache)(cache.chunk_size)
    if name == "ArraysCache":
        return type(cache)(size=len(cache.cache))
    if name == "CacheList":
        return type(cache)(*[_empty_like(c) for c in cache.caches])
    if name == "LayerCache" and hasattr(cache, "window_size"):  # deepseek-v4
        return type(cache)(cache.window_size)
    if name in ("KVCache", "ConcatenateKVCache", "MambaCache", "RecurrentCache"):
        return type(cache)()
    raise TypeError(f"kvtrie cannot make an empty {type(cache).__module__}.{name}: not a cache type it knows")


def save_prompt_cache_file(
    prefix_cache: PrefixCache,
    tokens: Sequence[int],
    path: str,
    *,
    namespace: Optional[str] = None,
    metadata: Optional[dict[str, str]] = None,
) -> None:
    """Write the stored state of `tokens` as an mlx-lm prompt-cache file (`load_prompt_cache` reads it).

    The tokens go into the file's metadata (`kvtrie_tokens`), so it can enter a trie again.
    """
    cache_mod = _mlx_lm_cache()
    arr = as_token_array(tokens)
    with prefix_cache.begin(np.concatenate([arr, arr[-1:]]), namespace=namespace) as session:
        if session.cached != len(arr):
            raise ValueError(
                f"only {session.cached} of the {len(arr)} tokens can be restored from this PrefixCache; "
                "store the whole sequence first"
            )
        meta = {**(metadata or {}), "kvtrie_tokens": json.dumps(arr.tolist())}
        cache_mod.save_prompt_cache(path, session.caches, meta)


def load_prompt_cache_file(
    prefix_cache: PrefixCache, path: str, tokens: Optional[Sequence[int]] = None, *, namespace: Optional[str] = None
) -> list[int]:
    """Store an mlx-lm prompt-cache file in the trie; returns its tokens.

    Files written by `save_prompt_cache_file` carry their tokens; for others pass `tokens`.
    """
    cache_mod = _mlx_lm_cache()
    caches, meta = cache_mod.load_prompt_cache(path, return_metadata=True)
    if tokens is None:
        if "kvtrie_tokens" not in meta:
            raise ValueError(f"{path} does not record its tokens; pass the tokens its cache was computed for")
        tokens = json.loads(meta["kvtrie_tokens"])
    tokens = list(tokens)
    held = cache_offset(caches)
    if held is not None and held != len(tokens):
        raise ValueError(f"{path} holds {held} positions but {len(tokens)} tokens were given")
    prefix_cache.store(tokens, caches, namespace=namespace)
    return tokens


def use_in_server(**prefix_cache_kwargs: Any) -> None:
    """Make `mlx_lm.server` build a `TriePromptCache` where it builds its `LRUPromptCache`.

    Call it before `mlx_lm.server.main()` / `run()`; `prefix_cache_kwargs` go to each
    PrefixCache (e.g. `host_bytes=8 << 30` for a host tier).
    """
    import mlx_lm.server as server

    def make(max_size: int = 10, max_bytes: int = 1 << 63) -> TriePromptCache:
        return TriePromptCache(max_size, max_bytes, **prefix_cache_kwargs)

    cast(Any, server).LRUPromptCache = make  # (replacing mlx-lm's class with a factory: mypy allows no such assignment)
