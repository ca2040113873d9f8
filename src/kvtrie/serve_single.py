"""`kvtrie serve`'s single-request path acting on kvtrie's plan.

mlx-lm's server serves a request with a `seed`, every request under `--kv-bits` and every request
with a draft model through `_serve_single`: one `stream_generate` over what the cache did not
restore and one store at the end, so a hybrid model's recurrent state is stored nowhere the next
request can restore from. `SinglePath` wraps the module global `mlx_lm.server.stream_generate`
(what `_serve_single` calls) and the generator's `_tokenize`: knowing the request's prompt and
message segments, it prefills up to each point where the batched path stores the cache (segment
ends, `prompt[:-1]`, and kvtrie's `split_points`: where the prompt leaves the trie, and its
`cache_control` breakpoints), stores there, and hands the rest to mlx-lm's `stream_generate`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Optional, cast

import attrs
import mlx.core as mx

from .layers import leaves

logger = logging.getLogger("kvtrie.serve")


@attrs.frozen
class Tokenized:
    """A request's prompt as the generator tokenized it, and where its message segments end."""

    prompt: tuple[int, ...]
    segment_ends: tuple[int, ...]  # the server's segment ends inside the prompt (not its end)


def segment_ends(segments: Sequence[Sequence[int]]) -> tuple[int, ...]:
    """Offsets where each segment but the last ends (the points mlx-lm's batched path stores at)."""
    ends, pos = [], 0
    for segment in list(segments)[:-1]:
        pos += len(segment)
        ends.append(pos)
    return tuple(ends)


def prefill_cuts(total: int, done: int, points: Sequence[int]) -> tuple[int, ...]:
    """Where the prefill of a `total`-token prompt, `done` of them restored, stops to store its cache:
    `points` and `total - 1` (as the batched path stores `prompt[:-1]`), those within `(done, total)`."""
    return tuple(sorted({int(c) for c in (*points, total - 1) if done < c < total}))


def dequantized(caches: Sequence[Any]) -> list:
    """`caches` with each QuantizedKVCache (what `--kv-bits` makes of a KVCache past `--quantized-kv-start`)
    replaced by a KVCache holding its dequantized keys and values: the layout kvtrie stores."""
    out = list(caches)
    for i, c in enumerate(out):
        if type(c).__name__ == "QuantizedKVCache" and c.keys is not None:
            from mlx_lm.models.cache import KVCache

            n, kv = int(c.offset), KVCache()
            kv.keys, kv.values = (  # (each a (packed, scales, biases) triple)
                mx.dequantize(w, scales, biases, group_size=c.group_size, bits=c.bits)[..., :n, :]
                for w, scales, biases in (c.keys, c.values)
            )
            kv.offset = n
            out[i] = kv
    return out


def settle_offsets(caches: Sequence[Any]) -> None:
    """Trim caches that hold more positions than the others to the fewest (speculative decoding
    leaves the draft model's caches a token apart from the main model's)."""
    every = leaves(caches)
    live = [c for c in every if hasattr(c, "offset") and getattr(c, "keys", 0) is not None]
    offsets = {int(c.offset) for c in live}
    if len(offsets) > 1 and all(hasattr(c, "trim") and c.is_trimmable() for c in every):
        low = min(offsets)
        for c in live:
            if c.offset > low:
                c.trim(int(c.offset) - low)


class SinglePath:
    """`stream_generate` for `_serve_single` that first prefills up to each storing point of the
    request's prompt and stores the cache there (`cache.insert_cache`), then generates from the
    last one with mlx-lm's `stream_generate` (`original`)."""

    def __init__(self, cache: Any, provider: Any, original: Callable[..., Iterator[Any]]):
        self.cache = cache
        self.provider = provider
        self.original = original
        self._local = threading.local()

    def tokenize(self, tokenize: Callable[..., tuple]) -> Callable[..., tuple]:
        """`ResponseGenerator._tokenize` that also records, for this thread, what it returned."""

        def wrapped(tokenizer: Any, request: Any, args: Any) -> tuple:
            out = tokenize(tokenizer, request, args)
            prompt, segments, vision = out[0], out[1], out[4]
            # a request with images is keyed by its images too: its prompt alone is no key to store under
            self._local.tokenized = None if vision is not None else Tokenized(tuple(prompt), segment_ends(segments))
            return out

        cast(Any, wrapped)._kvtrie_tokenize = tokenize  # (a mark on the function: mypy knows no such attribute)
        return wrapped

    def __call__(self, model: Any, tokenizer: Any, prompt: Any, *args: Any, **kwargs: Any) -> Iterator[Any]:
        tokenized, self._local.tokenized = getattr(self._local, "tokenized", None), None
        plan = None if args else self._plan(tokenized, model, prompt, kwargs)
        if plan is None:
            yield from self.original(model, tokenizer, prompt, *args, **kwargs)
            return
        full, done, cuts = plan
        callback = kwargs.get("prompt_progress_callback") or (lambda *_: None)
        start = done
        for cut in cuts:
            done = self._prefill(model, kwargs, full, done, cut, lambda n: callback(n - start, len(full) - start))
            self._store(full[:cut], kwargs["prompt_cache"])
        kwargs["prompt_progress_callback"] = lambda n, total: callback(n + done - start, total + done - start)
        yield from self.original(model, tokenizer, list(full[done:]), **kwargs)

    def _plan(self, tokenized: Optional[Tokenized], model: Any, prompt: Any, kwargs: dict) -> Optional[tuple]:
        """`(full prompt, restored, cuts)`, or None where this call is not a tokenized request's prefill."""
        caches = kwargs.get("prompt_cache")
        if tokenized is None or caches is None or kwargs.get("input_embeddings") is not None:
            return None
        if not isinstance(prompt, (list, tuple)):
            return None
        full = tokenized.prompt
        done = len(full) - len(prompt)
        if done < 0 or list(full[done:]) != list(prompt):
            return None
        if kwargs.get("draft_model") is not None and len(caches) <= len(model.layers):
            return None
        held = {int(c.offset) for c in leaves(caches) if hasattr(c, "offset") and getattr(c, "keys", 0) is not None}
        if held and held != {done}:
            return None
        try:
            points = (*tokenized.segment_ends, *self.cache.split_points(full))
        except Exception:  # the plan is an optimisation: without it the request goes on as mlx-lm's
            logger.exception("single path: the cache's split points could not be read")
            points = tokenized.segment_ends
        cuts = prefill_cuts(len(full), done, points)
        return (full, done, cuts) if cuts else None

    def _prefill(
        self, model: Any, kwargs: dict, full: Sequence[int], done: int, cut: int, progress: Callable[[int], None]
    ) -> int:
        """Run the model (and a draft model) over `full[done:cut]` in `prefill_step_size` chunks."""
        from mlx_lm.generate import DEFAULT_QUANTIZED_KV_START, maybe_quantize_kv_cache

        caches = kwargs["prompt_cache"]
        draft = kwargs.get("draft_model")
        n_main = len(model.layers) if draft is not None else len(caches)
        step = max(int(kwargs.get("prefill_step_size") or 2048), 1)
        quantize = dict(
            kv_bits=kwargs.get("kv_bits"),
            kv_group_size=kwargs.get("kv_group_size", 64),
            quantized_kv_start=kwargs.get("quantized_kv_start", DEFAULT_QUANTIZED_KV_START),
        )
        with mx.stream(kwargs.get("stream") or mx.default_stream(mx.default_device())):
            for lo in range(done, cut, step):
                x = mx.array(list(full[lo : min(lo + step, cut)]), dtype=mx.int32)[None]
                model(x, cache=caches[:n_main])
                if draft is not None:
                    draft(x, cache=caches[n_main:])
                maybe_quantize_kv_cache(
                    caches, **quantize
                )  # as generate_step does (in place: `caches` is the request's)
                mx.eval([c.state for c in caches])
                progress(min(lo + step, cut))
        return cut

    def _store(self, tokens: Sequence[int], caches: list) -> None:
        try:
            self.cache.insert_cache(self.provider.model_key, list(tokens), caches)
        except Exception:  # never fail a request over a cache store
            logger.exception("single path: storing the cache at %d tokens failed", len(tokens))


def install(server: Any, generator: Any, cache: Any) -> SinglePath:
    """Wrap `server.stream_generate` (unwrapping an earlier kvtrie wrapper first) and
    `generator._tokenize`; `uninstall` puts mlx-lm's back."""
    original = getattr(server.stream_generate, "_kvtrie_original", server.stream_generate)
    path = SinglePath(cache, generator.model_provider, original)

    def stream_generate(*args: Any, **kwargs: Any) -> Iterator[Any]:
        return path(*args, **kwargs)

    cast(Any, stream_generate)._kvtrie_original = original  # (as above)
    server.stream_generate = stream_generate
    tokenize = generator._tokenize
    generator._tokenize = path.tokenize(getattr(tokenize, "_kvtrie_tokenize", tokenize))
    return path


def uninstall(server: Any) -> None:
    """Put mlx-lm's `stream_generate` back where kvtrie's wraps it."""
    server.stream_generate = getattr(server.stream_generate, "_kvtrie_original", server.stream_generate)
