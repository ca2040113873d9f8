"""The generation loop: restore from the PrefixCache, prefill the rest in chunks, decode, commit.

The committed tokens are exactly those whose state is in the live caches: the prompt
and every generated token except the last one, which was sampled but never fed back.
For hybrid models the prefill is also cut where the session asks for recurrent
snapshots (`session.capture_at`), and `commit` snapshots the state at the end.
The next turn's prompt (prompt + reply + new text) therefore restores all but that
one token, which it prefills together with the new text.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Optional

import attrs
import mlx.core as mx
import numpy as np

from ..cache import PrefixCache
from ..trie import as_token_array

SamplerFn = Callable[[mx.array, Sequence[int]], int]


def greedy(logits: mx.array, history: Sequence[int] = ()) -> int:
    """Argmax sampling, the default."""
    return int(mx.argmax(logits.reshape(-1)).item())  # type: ignore[arg-type]  # (an index: item() is an int; the stubs allow complex)


@attrs.frozen
class GenerationResult:
    """What one request did: its tokens, how much the cache saved, and how fast it ran.

    `restore_s` is the lookup + restore part of `ttft_s` (the time spent in `begin`).
    """

    tokens: list[int]
    prompt_tokens: int
    cached_tokens: int
    prefill_tokens: int
    committed_tokens: int
    finish_reason: str
    ttft_s: float
    decode_s: float
    restore_s: float = 0.0
    logits: Optional[list[np.ndarray]] = None

    @property
    def decode_tokens_per_s(self) -> float:
        """Decode speed over the tokens after the first (the first is part of TTFT)."""
        n = len(self.tokens) - 1
        return n / self.decode_s if n > 0 and self.decode_s > 0 else 0.0


def _check_args(max_tokens: int, prefill_step_size: int) -> None:
    for name, value in (("max_tokens", max_tokens), ("prefill_step_size", prefill_step_size)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")


class Generation:
    """A streaming generation: iterate to receive tokens as they are sampled; `result` after the end."""

    def __init__(
        self,
        model: Any,
        prefix_cache: Optional[PrefixCache],
        prompt_tokens: Sequence[int],
        *,
        max_tokens: int = 256,
        sampler: Optional[SamplerFn] = None,
        stop_tokens: Sequence[int] = (),
        prefill_step_size: int = 512,
        namespace: Optional[str] = None,
        capture_hints: Sequence[int] = (),
        return_logits: bool = False,
    ):
        _check_args(max_tokens, prefill_step_size)
        self._hints = tuple(capture_hints)
        self._prompt = as_token_array(prompt_tokens)
        self._model = model
        self._pc = prefix_cache
        self._max_tokens = max_tokens
        self._sampler = sampler or greedy
        self._stop = {int(t) for t in stop_tokens}
        self._step = prefill_step_size
        self._namespace = namespace
        self._return_logits = return_logits
        self._started = False
        self.result: Optional[GenerationResult] = None

    def __iter__(self) -> Iterator[int]:
        if self._started:
            raise RuntimeError("a Generation can be iterated once; start a new one")
        self._started = True
        return self._run()

    def _forward(self, tokens: np.ndarray, caches: list) -> mx.array:
        logits = self._model(mx.array(tokens, dtype=mx.int32)[None], cache=caches)
        return logits[0, -1]

    def _prefill(self, rest: np.ndarray, caches: list, session: Any) -> mx.array:
        """Run the uncached tail in chunks, cut also at the session's capture offsets.

        The capture at the prompt's end (if planned) gets the last logits, so the same
        prompt can later be restored whole, with nothing left to prefill.
        """
        start = session.cached if session is not None else 0
        captures = {p - start for p in session.capture_at} if session is not None else set()
        cuts = sorted(set(range(self._step, len(rest), self._step)) | captures | {len(rest)})
        logits: Optional[mx.array] = None
        done = 0
        for cut in cuts:
            logits = self._forward(rest[done:cut], caches)
            mx.eval(logits)
            done = cut
            if cut in captures:
                session.capture(start + cut, logits=logits if cut == len(rest) else None)
        assert logits is not None  # (`cuts` holds len(rest) at least)
        return logits

    def _run(self) -> Iterator[int]:
        prompt = self._prompt
        t0 = time.perf_counter()
        session = None
        if self._pc is not None:
            session = self._pc.begin(prompt, namespace=self._namespace, capture_hints=self._hints, reuse_logits=True)
        restore_s = time.perf_counter() - t0
        try:
            cached = session.cached if session is not None else 0
            caches = session.caches if session is not None else self._model.make_cache()
            assert caches is not None  # (an open session holds its caches)
            rest = prompt[cached:]
            if session is not None and session.logits is not None:  # the whole prompt, with its logits
                logits = session.logits
            else:
                logits = self._prefill(rest, caches, session)
            history = prompt.tolist()
            kept: list[np.ndarray] = []
            generated: list[int] = []
            finish = "length"
            ttft = decode_start = 0.0
            while True:
                if self._return_logits:
                    kept.append(np.array(logits.astype(mx.float32)))
                token = int(self._sampler(logits, history))
                if not generated:
                    ttft = time.perf_counter() - t0
                    decode_start = time.perf_counter()
                generated.append(token)
                history.append(token)
                try:
                    yield token
                except GeneratorExit:  # the consumer stopped early: keep what was computed
                    finish = "cancelled"
                    break
                if token in self._stop:
                    finish = "stop"
                    break
                if len(generated) >= self._max_tokens:
                    break
                logits = self._forward(np.array([token], dtype=np.int32), caches)
                mx.eval(logits)
            decode_s = time.perf_counter() - decode_start if generated else 0.0
            committed = np.concatenate([prompt, np.array(generated[:-1], dtype=prompt.dtype)])
            if session is not None:
                session.commit(committed)
        finally:
            if session is not None:
                session.close()
        self.result = GenerationResult(
            tokens=generated,
            prompt_tokens=len(prompt),
            cached_tokens=cached,
            prefill_tokens=len(rest),
            committed_tokens=len(committed),
            finish_reason=finish,
            ttft_s=ttft,
            decode_s=decode_s,
            restore_s=restore_s,
            logits=kept if self._return_logits else None,
        )


def stream_generate(
    model: Any, prefix_cache: Optional[PrefixCache], prompt_tokens: Sequence[int], **kwargs: Any
) -> Generation:
    """Like `generate`, but returns an iterable of tokens; its `.result` is set once it is exhausted."""
    return Generation(model, prefix_cache, prompt_tokens, **kwargs)


def generate(
    model: Any,
    prefix_cache: Optional[PrefixCache],
    prompt_tokens: Sequence[int],
    *,
    max_tokens: int = 256,
    sampler: Optional[SamplerFn] = None,
    stop_tokens: Sequence[int] = (),
    prefill_step_size: int = 512,
    namespace: Optional[str] = None,
    capture_hints: Sequence[int] = (),
    return_logits: bool = False,
) -> GenerationResult:
    """Generate up to `max_tokens` after `prompt_tokens`, reusing and extending `prefix_cache`.

    `prefix_cache=None` runs cold. `sampler(logits, history) -> token` defaults to greedy;
    generation stops after a token in `stop_tokens` (which is kept in the reply).
    `capture_hints` (e.g. `Conversation.boundaries`) are offsets where later requests may
    diverge; hybrid models snapshot their recurrent state there.
    """
    gen = Generation(
        model,
        prefix_cache,
        prompt_tokens,
        max_tokens=max_tokens,
        sampler=sampler,
        stop_tokens=stop_tokens,
        prefill_step_size=prefill_step_size,
        namespace=namespace,
        capture_hints=capture_hints,
        return_logits=return_logits,
    )
    for _ in gen:
        pass
    assert gen.result is not None  # (set once the generation ends)
    return gen.result
