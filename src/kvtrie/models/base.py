"""Shared pieces of the reference models: attention masks and config handling."""

from __future__ import annotations

from typing import Any, Optional

import mlx.core as mx


def causal_mask(n: int, offset: int = 0, window_size: Optional[int] = None) -> mx.array:
    """Boolean `[n, offset + n]` mask: query i (at position offset+i) sees keys <= its position."""
    rinds = mx.arange(offset + n)
    linds = mx.arange(offset, offset + n)[:, None]
    mask = linds >= rinds[None]
    if window_size is not None:
        mask = mask & (linds < rinds[None] + window_size)
    return mask


def attention_mask(n: int, offset: int = 0, window_size: Optional[int] = None, return_array: bool = False) -> Any:
    """mlx-lm's mask convention: None for one token, "causal" for a plain prefill, else an array."""
    if n == 1:
        return None
    if return_array or (window_size is not None and n > window_size):
        return causal_mask(n, offset, window_size)
    return "causal"


def create_attention_mask(h: mx.array, cache: Any = None, window_size: Optional[int] = None):
    """Mask for hidden states `h` (`[B, L, D]`) given the layer's cache, as mlx-lm builds it."""
    n = h.shape[1]
    if cache is not None and hasattr(cache, "make_mask"):
        return cache.make_mask(n, window_size=window_size)
    return attention_mask(n, 0, window_size)
