"""Which payload rule a live layer cache follows, and how each rule reads and writes live caches.

Three kinds of layers, known by the cache's type so that a cache whose meaning kvtrie does
not know is refused with a clear error instead of being sliced wrongly:
- `KV`: keys/values grow one slice per position (full attention, also quantized and
  concatenating caches); any prefix is a slice.
- `WINDOW`: per-token keys/values too, but the live cache only keeps a window (sliding
  window, chunked attention); a restore rebuilds the window from the stored positions.
- `STATE`: a whole state at node ends only (recurrent layers, caches whose state is not
  one slice per token).
`CacheList` (several caches in one layer) is expanded: each of its caches is a layer of
its own here. mlx-lm's classes are recognised by name, so this module never imports mlx-lm.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional, Union

import attrs
import mlx.core as mx

from .arrays import to_device
from .recurrent import RecurrentPayload, capture_state, state_dtypes
from .window import ChunkWindow, Geometry, RotatingWindow

KV = "kv"
WINDOW = "window"
STATE = "state"


@attrs.frozen
class KVRule:
    """Plain attention caches: `keys`/`values` `[B, H, T, D]` buffers, `offset` positions used.

    `grows` caches (KVCache) get zeroed room up to their next `step` boundary on restore,
    so the following prefill does not regrow the buffer; the others (ConcatenateKVCache)
    must hold exactly `offset` positions.
    """

    grows: bool = True
    kind: str = KV

    def live(self, cache: Any) -> Optional[tuple[mx.array, ...]]:
        """The live buffers (they may run past the offset), or None before the first token."""
        if cache.keys is None:
            return None
        return (cache.keys, cache.values)

    def offset(self, cache: Any) -> int:
        return int(cache.offset)

    def capacity(self, cache: Any, length: int) -> int:
        step = int(getattr(cache, "step", 256)) if self.grows else 0
        return length + step - length % step if step else length

    def load(self, cache: Any, arrays: Sequence[mx.array], length: int) -> None:
        cache.keys, cache.values = arrays
        cache.offset = length

    def signature(self, cache: Any) -> tuple:
        arrays = self.live(cache)
        if arrays is None:
            raise ValueError(f"{type(cache).__name__} holds no keys/values yet (offset {cache.offset})")
        keys, values = arrays[0], arrays[-1]
        if keys.ndim != 4 or values.ndim != 4:
            raise ValueError(f"KV cache arrays must be [B, H, T, D], got keys {keys.shape} and values {values.shape}")
        return (self.kind, type(cache).__name__, tuple((a.shape[0], a.shape[1], *a.shape[3:], a.dtype) for a in arrays))


@attrs.frozen
class QuantizedRule(KVRule):
    """mlx-lm's QuantizedKVCache: keys and values are (packed, scales, biases) triples; payloads stay packed."""

    def live(self, cache: Any) -> Optional[tuple[mx.array, ...]]:
        if cache.keys is None:
            return None
        return (*cache.keys, *cache.values)

    def load(self, cache: Any, arrays: Sequence[mx.array], length: int) -> None:
        half = len(arrays) // 2
        cache.keys, cache.values = tuple(arrays[:half]), tuple(arrays[half:])
        cache.offset = length

    def signature(self, cache: Any) -> tuple:
        return (*super().signature(cache), cache.group_size, cache.bits)


@attrs.frozen
class WindowRule(KVRule):
    """Per-token keys/values of which the live cache keeps only a window (a `WINDOW` layer)."""

    kind: str = WINDOW

    def geometry(self, cache: Any) -> Geometry:
        """Which positions the window holds at each length."""
        raise NotImplementedError

    def segments(self, cache: Any) -> list[tuple[int, tuple[mx.array, ...]]]:
        """The positions the live buffer still holds: `(first position, arrays)` runs in order."""
        raise NotImplementedError

    def load_window(self, cache: Any, arrays: Optional[Sequence[mx.array]], p: int) -> None:
        """Set the live window to `arrays` (None: empty) at position `p`."""
        raise NotImplementedError


@attrs.frozen
class RotatingRule(WindowRule):
    """mlx-lm's RotatingKVCache: `keep` sink positions plus a window of `max_size` (a `WINDOW` layer)."""

    def geometry(self, cache: Any) -> Geometry:
        return RotatingWindow(int(cache.keep), int(cache.max_size))

    def segments(self, cache: Any) -> list[tuple[int, tuple[mx.array, ...]]]:
        """The positions the live buffer still holds: `(first position, arrays)` runs in order."""
        arrays = self.live(cache)
        if arrays is None:
            return []
        offset, keep, idx = int(cache.offset), int(cache.keep), int(cache._idx)
        size = arrays[0].shape[2]

        def temporal(a: mx.array) -> mx.array:  # mlx-lm's _temporal_order
            if idx == size:
                return a
            if idx < offset:
                return mx.concatenate([a[:, :, :keep], a[:, :, idx:], a[:, :, keep:idx]], axis=2)
            return a[:, :, :idx]

        ordered = tuple(temporal(a) for a in arrays)
        held = ordered[0].shape[2]
        if held >= offset:
            return [(0, tuple(a[:, :, :offset] for a in ordered))]
        runs = []
        if keep:
            runs.append((0, tuple(a[:, :, :keep] for a in ordered)))
        runs.append((offset - (held - keep), tuple(a[:, :, keep:] for a in ordered)))
        return runs

    def capacity(self, cache: Any, length: int) -> int:
        return length

    def load_window(self, cache: Any, arrays: Optional[Sequence[mx.array]], p: int) -> None:
        cache.keys, cache.values = arrays if arrays else (None, None)
        cache.offset = p
        cache._idx = arrays[0].shape[2] if arrays else 0

    def signature(self, cache: Any) -> tuple:
        return (*super().signature(cache), int(cache.keep), int(cache.max_size))


@attrs.frozen
class ChunkRule(WindowRule):
    """mlx-lm's ChunkedKVCache (llama4): keys from `start_position` on, within chunks of `chunk_size`."""

    def geometry(self, cache: Any) -> Geometry:
        return ChunkWindow(int(cache.chunk_size))

    def segments(self, cache: Any) -> list[tuple[int, tuple[mx.array, ...]]]:
        arrays = self.live(cache)
        if arrays is None:
            return []
        start, offset = int(cache.start_position), int(cache.offset)
        return [(start, tuple(a[:, :, : offset - start] for a in arrays))]

    def load_window(self, cache: Any, arrays: Optional[Sequence[mx.array]], p: int) -> None:
        cache.keys, cache.values = arrays if arrays else (None, None)
        cache.offset = p
        cache.start_position = (p // int(cache.chunk_size)) * int(cache.chunk_size)

    def signature(self, cache: Any) -> tuple:
        return (*super().signature(cache), int(cache.chunk_size))


@attrs.frozen
class StateRule:
    """Whole state at node ends, read and written through the cache's `state` property."""

    kind: str = STATE

    def read(self, cache: Any) -> Any:
        return cache.state

    def capture(self, cache: Any) -> RecurrentPayload:
        try:
            return capture_state(self.read(cache))
        except ValueError:
            raise ValueError(f"{type(cache).__name__} holds no state yet: run the model before capturing") from None

    def restore(self, cache: Any, payload: RecurrentPayload, offset: int) -> None:
        self.write(cache, _to_device_tree(payload.states))
        if hasattr(cache, "offset") and not self._offset_in_state:
            cache.offset = offset

    _offset_in_state = False

    def write(self, cache: Any, tree: Any) -> None:
        cache.state = tree

    def offset(self, cache: Any) -> Optional[int]:
        return int(cache.offset) if hasattr(cache, "offset") else None

    def signature(self, cache: Any) -> tuple:
        return (self.kind, type(cache).__name__, state_dtypes(self.read(cache)))


@attrs.frozen
class AttributeStateRule(StateRule):
    """Whole state of a cache with no `state` setter: a copy of its instance attributes."""

    _offset_in_state = True

    def read(self, cache: Any) -> Any:
        return {k: v for k, v in vars(cache).items() if not callable(v)}

    def write(self, cache: Any, tree: Any) -> None:
        for k, v in tree.items():
            setattr(cache, k, v)


def _to_device_tree(tree: Any) -> Any:
    from mlx.utils import tree_map

    from .arrays import HostArray

    return tree_map(lambda a: to_device(a) if isinstance(a, (mx.array, HostArray)) else a, tree)


Rule = Union[KVRule, StateRule]

_RULES: dict[str, Rule] = {
    "KVCache": KVRule(),
    "ConcatenateKVCache": KVRule(grows=False),
    "QuantizedKVCache": QuantizedRule(),
    "RotatingKVCache": RotatingRule(),
    "ChunkedKVCache": ChunkRule(),
    "ArraysCache": StateRule(),
    "MambaCache": StateRule(),
    "RecurrentCache": StateRule(),
    "mlx_lm.models.deepseek_v41.LayerCache": AttributeStateRule(),
}
_CONTAINERS = {"CacheList"}


def register_cache_type(cache_type: Union[type, str], kind: str = STATE) -> None:
    """Teach kvtrie a cache type it does not know; only whole-state (`"state"`) storage can be
    registered, as it is right for any cache (a snapshot of its attributes at node ends)."""
    if kind != STATE:
        raise ValueError(f"only kind {STATE!r} can be registered (per-token rules need kvtrie code), got {kind!r}")
    name = cache_type if isinstance(cache_type, str) else f"{cache_type.__module__}.{cache_type.__qualname__}"
    _RULES[name] = AttributeStateRule()


def rule_for(cache: Any) -> Rule:
    """The rule for a live (leaf) cache; TypeError naming any type kvtrie does not know."""
    cls = type(cache)
    rule = _RULES.get(f"{cls.__module__}.{cls.__qualname__}") or _RULES.get(cls.__name__)
    if rule is None:
        known = sorted({n.rsplit(".", 1)[-1] for n in _RULES} | _CONTAINERS)
        raise TypeError(
            f"kvtrie does not know how to store a {cls.__module__}.{cls.__name__}: known caches are "
            f"{', '.join(known)}; kvtrie.layers.register_cache_type() stores other types as whole states"
        )
    return rule


def leaves(caches: Sequence[Any]) -> list[Any]:
    """The leaf caches of a model's cache list, `CacheList`s expanded in order."""
    out: list[Any] = []
    for c in caches:
        if type(c).__name__ in _CONTAINERS:
            out.extend(leaves(list(c.caches)))
        else:
            out.append(c)
    return out


def layer_kind(cache: Any) -> str:
    """`KV`, `WINDOW` or `STATE` for a live leaf cache."""
    return rule_for(cache).kind
