"""Live per-layer caches that follow mlx-lm's cache protocol.

A model calls `cache.update_and_fetch(keys, values)` once per forward pass per layer;
`cache.offset` is the number of positions already stored. kvtrie's payload modules
only use this duck-typed protocol, so mlx-lm's own caches work the same way.
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx

from .base import attention_mask


class KVCache:
    """Keys/values of one attention layer, `[B, H, T, D]`, grown in steps of `step` positions.

    Growing in steps (not one concatenation per token) keeps decode cheap; `state`
    gives exactly the first `offset` positions. With `dtype` the keys/values are stored in
    that dtype and handed back in the model's (e.g. bfloat16 storage for a float32 model).
    """

    step = 256

    def __init__(self, dtype: Optional[mx.Dtype] = None) -> None:
        self.keys: Optional[mx.array] = None
        self.values: Optional[mx.array] = None
        self.offset = 0
        self.dtype = dtype

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Append `keys`/`values` (`[B, H, L, D]`) and return all positions so far."""
        if self.dtype is not None and keys.dtype != self.dtype:
            out = self._store(keys.astype(self.dtype), values.astype(self.dtype))
            return out[0].astype(keys.dtype), out[1].astype(values.dtype)
        return self._store(keys, values)

    def __deepcopy__(self, memo: dict) -> KVCache:
        """A copy with its own buffers (mlx-lm's prompt caches deep-copy what they hand out)."""
        new = type(self)(self.dtype)
        new.keys = None if self.keys is None else mx.array(self.keys)
        new.values = None if self.values is None else mx.array(self.values)
        new.offset = self.offset
        return new

    def _store(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        prev = self.offset
        n = keys.shape[2]
        if self.keys is None or self.values is None or prev + n > self.keys.shape[2]:
            B, H, _, dk = keys.shape
            dv = values.shape[3]
            grow = ((n + self.step - 1) // self.step) * self.step
            new_k = mx.zeros((B, H, grow, dk), keys.dtype)
            new_v = mx.zeros((B, H, grow, dv), values.dtype)
            if self.keys is None or self.values is None:  # (both or neither)
                self.keys, self.values = new_k, new_v
            else:
                self.keys = mx.concatenate([self.keys[..., :prev, :], new_k], axis=2)
                self.values = mx.concatenate([self.values[..., :prev, :], new_v], axis=2)
        self.offset = prev + n
        self.keys[..., prev : self.offset, :] = keys
        self.values[..., prev : self.offset, :] = values
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]

    @property
    def state(self) -> tuple[Optional[mx.array], Optional[mx.array]]:
        """The stored keys and values, exactly `offset` positions long (None, None before the first token)."""
        if self.keys is None or self.values is None:  # (both or neither)
            return None, None
        if self.offset == self.keys.shape[2]:
            return self.keys, self.values
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]

    @state.setter
    def state(self, v) -> None:
        keys, values = v[0], v[1]
        self.keys, self.values = keys, values
        if len(v) > 2:  # mlx-lm >= 0.32 passes (keys, values, offset)
            self.offset = int(v[2])
        else:
            self.offset = 0 if keys is None else keys.shape[2]

    @property
    def meta_state(self) -> str:
        return ""

    @meta_state.setter
    def meta_state(self, v) -> None:
        pass

    def size(self) -> int:
        return self.offset

    def empty(self) -> bool:
        return self.keys is None

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        """Forget the last `n` positions (at most `offset`); returns how many were dropped."""
        n = min(self.offset, n)
        self.offset -= n
        return n

    def make_mask(self, n: int, window_size: Optional[int] = None, return_array: bool = False):
        return attention_mask(n, self.offset, window_size, return_array)

    @property
    def nbytes(self) -> int:
        """Bytes of the buffers this cache holds (including unused capacity)."""
        if self.keys is None or self.values is None:  # (both or neither)
            return 0
        return self.keys.nbytes + self.values.nbytes


class RecurrentCache:
    """State of one recurrent layer (e.g. `[conv_tail, delta_state]`), indexed like mlx-lm's ArraysCache.

    The state cannot be sliced or rewound; `offset` counts the positions it has absorbed
    and the model advances it with `advance(n)` after each forward pass.
    """

    def __init__(self, size: int = 2) -> None:
        self.cache: list[Optional[mx.array]] = [None] * size
        self.offset = 0

    def __getitem__(self, idx: int) -> Optional[mx.array]:
        return self.cache[idx]

    def __setitem__(self, idx: int, value: Optional[mx.array]) -> None:
        self.cache[idx] = value

    def advance(self, n: int) -> None:
        """Record that the state now covers `n` more positions."""
        self.offset += n

    @property
    def state(self) -> list[Optional[mx.array]]:
        return list(self.cache)

    @state.setter
    def state(self, v) -> None:
        self.cache = list(v)

    @property
    def meta_state(self) -> str:
        return str(self.offset)

    @meta_state.setter
    def meta_state(self, v) -> None:
        self.offset = int(v)

    def empty(self) -> bool:
        return self.cache[0] is None

    def is_trimmable(self) -> bool:
        return False

    def make_mask(self, n: int, **kwargs):
        return None

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.cache if c is not None)
