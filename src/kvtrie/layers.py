"""Which payload rule a live cache follows: per-token KV slices, or a whole state at node ends.

Known by type, so that a cache whose meaning kvtrie does not know (a sliding window, say)
is refused with a clear error instead of being sliced wrongly. mlx-lm's classes are
recognised by name, so this module does not import mlx-lm.
"""

from __future__ import annotations

from typing import Any

KV = "kv"
SNAPSHOT = "snapshot"

# keys/values grow one slice per position; any prefix is a slice
_KV_TYPES = {"KVCache"}
# state at node ends only: recurrent layers, and caches whose state is not per-token slices
_SNAPSHOT_TYPES = {"RecurrentCache", "ArraysCache", "MambaCache", "RotatingKVCache", "CacheList", "QuantizedKVCache"}


def layer_kind(cache: Any) -> str:
    """`KV` or `SNAPSHOT` for a live layer cache; TypeError naming any other type."""
    name = type(cache).__name__
    if name in _KV_TYPES:
        return KV
    if name in _SNAPSHOT_TYPES:
        return SNAPSHOT
    raise TypeError(
        f"kvtrie does not know how to store a {type(cache).__module__}.{name}: known caches are "
        f"{', '.join(sorted(_KV_TYPES | _SNAPSHOT_TYPES))}"
    )
