"""Token sampling: penalties, temperature, top-k / top-p / min-p filtering, categorical draw.

A `Sampler` turns the logits of the last position into one token id. It is a small
attrs config object with its own `mx.random` key, so a seeded sampler reproduces its
sequence of draws without touching MLX's global RNG (other code may use that freely).

Processing order, each step optional:

1. penalties over the last `penalty_window` tokens of `history`: repetition
   (CTRL-style: a positive logit is divided by the penalty, a negative one multiplied),
   then presence / frequency (OpenAI-style: `logit -= presence * [count > 0] + frequency * count`);
2. temperature (0 means greedy: the argmax of the penalised logits, no filtering needed,
   since every filter below always keeps the best token);
3. top-k: keep the `top_k` highest logits;
4. top-p: keep the smallest set of most likely tokens whose probability reaches `top_p`;
5. min-p: drop tokens whose probability is below `min_p` times the best token's;
6. a categorical draw from what is left.

All arithmetic runs in float32 whatever the logits' dtype (float16 / bfloat16 too), and
is vectorised over the vocabulary.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence
from typing import Any, Optional, Union

import attrs
import mlx.core as mx
import numpy as np

History = Union[Sequence[int], np.ndarray, mx.array]


def _finite(instance: Any, attribute: attrs.Attribute, value: float) -> None:
    if not math.isfinite(value):
        raise ValueError(f"Sampler.{attribute.name} must be a finite number, got {value!r}")


def _temperature(instance: Any, attribute: attrs.Attribute, value: float) -> None:
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"Sampler.temperature must be >= 0 (0 = greedy), got {value!r}")


def _check_top_p(instance: Any, attribute: attrs.Attribute, value: float) -> None:
    if not (0.0 < value <= 1.0):
        raise ValueError(f"Sampler.top_p must be in (0, 1] (1.0 = off), got {value!r}")


def _check_min_p(instance: Any, attribute: attrs.Attribute, value: float) -> None:
    if not (0.0 <= value < 1.0):
        raise ValueError(f"Sampler.min_p must be in [0, 1) (0.0 = off), got {value!r}")


def _repetition_penalty(instance: Any, attribute: attrs.Attribute, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"Sampler.repetition_penalty must be a finite number > 0 (1.0 = off), got {value!r}")


def _non_negative_int(instance: Any, attribute: attrs.Attribute, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"Sampler.{attribute.name} must be an int, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"Sampler.{attribute.name} must be >= 0 (0 = off), got {value}")


def _seed(instance: Any, attribute: attrs.Attribute, value: Optional[int]) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"Sampler.seed must be an int or None, got {type(value).__name__}")
    if not (0 <= value < 2**64):
        raise ValueError(f"Sampler.seed must be in [0, 2**64), got {value}")


@attrs.define(slots=True)
class Sampler:
    """Picks the next token from a model's last-position logits; see the module docstring.

    `seed=None` draws a fresh random key (nondeterministic); an int seed makes the
    sequence of calls reproducible, and `reset()` replays it from the start.
    """

    temperature: float = attrs.field(default=1.0, converter=float, validator=_temperature)
    top_k: int = attrs.field(default=0, validator=_non_negative_int)
    top_p: float = attrs.field(default=1.0, converter=float, validator=_check_top_p)
    min_p: float = attrs.field(default=0.0, converter=float, validator=_check_min_p)
    repetition_penalty: float = attrs.field(default=1.0, converter=float, validator=_repetition_penalty)
    presence_penalty: float = attrs.field(default=0.0, converter=float, validator=_finite)
    frequency_penalty: float = attrs.field(default=0.0, converter=float, validator=_finite)
    penalty_window: int = attrs.field(default=64, validator=_non_negative_int)
    seed: Optional[int] = attrs.field(default=None, validator=_seed)
    _key: mx.array = attrs.field(init=False, repr=False, eq=False)

    def __attrs_post_init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Restart the random stream: from `seed` if set, else from a fresh random key."""
        seed = self.seed if self.seed is not None else secrets.randbits(64)
        self._key = mx.random.key(int(seed))

    @property
    def greedy(self) -> bool:
        """True when sampling is a plain argmax (temperature 0)."""
        return self.temperature == 0.0

    @property
    def _penalised(self) -> bool:
        return self.penalty_window > 0 and (
            self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
        )

    def __call__(self, logits: mx.array, history: History = ()) -> int:
        """Sample one token id from `logits` (`[V]`, `[1, V]` or `[1, 1, V]`).

        `history` is every token id so far (prompt + generated); only its last
        `penalty_window` ids feed the penalties.
        """
        x = _as_vector(logits)
        if self._penalised:
            x = self.apply_penalties(x, history)
        if self.greedy:
            return int(mx.argmax(x).item())  # type: ignore[arg-type]  # (an index: item() is an int; the stubs allow complex)
        x = x / self.temperature
        if self.top_k > 0 and self.top_k < x.shape[0]:
            x = _top_k(x, self.top_k)
        if self.top_p < 1.0:
            x = _top_p(x, self.top_p)
        if self.min_p > 0.0:
            x = _min_p(x, self.min_p)
        self._key, sub = mx.random.split(self._key)
        return int(mx.random.categorical(x, key=sub).item())  # type: ignore[arg-type]  # (as above)

    def apply_penalties(self, logits: mx.array, history: History) -> mx.array:
        """Return float32 `[V]` logits with the repetition/presence/frequency penalties applied."""
        x = _as_vector(logits)
        window = _window(history, self.penalty_window, x.shape[0])
        if window.size == 0:
            return x
        counts = mx.zeros(x.shape, mx.float32).at[mx.array(window)].add(1.0)
        seen = counts > 0
        if self.repetition_penalty != 1.0:
            rp = self.repetition_penalty
            x = mx.where(seen, mx.where(x > 0, x / rp, x * rp), x)
        if self.presence_penalty != 0.0 or self.frequency_penalty != 0.0:
            x = x - self.presence_penalty * seen.astype(mx.float32) - self.frequency_penalty * counts
        return x


def _as_vector(logits: mx.array) -> mx.array:
    """Logits as a float32 `[V]` vector; any leading axes must have size 1 (one sequence)."""
    if not isinstance(logits, mx.array):
        logits = mx.array(logits)
    if logits.ndim == 0 or any(d != 1 for d in logits.shape[:-1]):
        raise ValueError(
            f"Sampler expects logits of one position, shaped [V], [1, V] or [1, 1, V]; "
            f"got shape {tuple(logits.shape)} (slice out the last position of one sequence)"
        )
    if logits.shape[-1] == 0:
        raise ValueError("Sampler got an empty vocabulary axis (logits shape [..., 0])")
    if not mx.issubdtype(logits.dtype, mx.floating):
        raise TypeError(f"Sampler expects floating-point logits, got {logits.dtype}")
    return logits.reshape(-1).astype(mx.float32)


def _window(history: History, n: int, vocab: int) -> np.ndarray:
    """The last `n` ids of `history` as int64, checked to lie in `[0, vocab)`."""
    if isinstance(history, mx.array):
        history = np.array(history)
    ids = np.asarray(history).reshape(-1)
    if ids.size and not np.issubdtype(ids.dtype, np.integer):
        raise TypeError(f"history must hold integer token ids, got dtype {ids.dtype}")
    ids = ids[-n:].astype(np.int64) if n else ids[:0].astype(np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= vocab):
        raise ValueError(
            f"history holds token ids outside the vocabulary [0, {vocab}): min {ids.min()}, max {ids.max()}"
        )
    return ids


def _top_k(x: mx.array, k: int) -> mx.array:
    """Keep exactly the `k` largest logits; the rest become -inf."""
    keep = mx.argpartition(-x, k - 1)[:k]
    out = mx.full(x.shape, -mx.inf, x.dtype)
    out[keep] = x[keep]
    return out


def _top_p(x: mx.array, p: float) -> mx.array:
    """Keep the smallest set of most likely tokens whose total probability reaches `p`."""
    order = mx.argsort(-x)
    probs = mx.softmax(x[order])
    before = mx.cumsum(probs) - probs  # mass of strictly more likely tokens
    out = mx.full(x.shape, -mx.inf, x.dtype)
    out[order] = mx.where(before < p, x[order], -mx.inf)
    return out


def _min_p(x: mx.array, min_p: float) -> mx.array:
    """Drop tokens whose probability is below `min_p` times the most likely token's."""
    # p_i >= min_p * p_max  <=>  x_i >= x_max + log(min_p): no softmax needed.
    return mx.where(x >= mx.max(x) + math.log(min_p), x, -mx.inf)
