"""Why a request restored less than it could have: the miss reasons and what tells them apart.

A `begin` that restored less than the trie matched, or nothing, or that lost tokens it had
before, gets one reason (`Session.miss_reason`, counted in `PrefixCache.stats()["miss_reasons"]`):

- `no_snapshot`: a hybrid model's trie matched further, but no recurrent snapshot sits at a
  usable point past the restored one.
- `window_hole`: sliding-window layers lack positions a deeper restore needs.
- `evicted`: the tokens right past the restored point were stored once (the `History` of
  committed blocks remembers them, and the last commits' sequences do, token by token) and
  are gone: evicted, cleared or unreadable on disk.
- `other_namespace`: another namespace holds at least a block more of these tokens (one trie
  match per other namespace).
- `not_cached`: an earlier request (a recent `begin`) saw at least a block more of these
  tokens, but nothing stored them (it never committed, or has not yet).
- `new_prefix`: nothing was restored and none of the above: the tokens are new.

A request that restored everything stored and whose rest is simply new has no reason (None).
The checks run only for a request that restored less than all but its last token, each at
most one pass over its tokens. Pure Python + numpy: never imports mlx.
"""

from __future__ import annotations

from collections import deque

import numpy as np

NEW_PREFIX = "new_prefix"
EVICTED = "evicted"
NO_SNAPSHOT = "no_snapshot"
WINDOW_HOLE = "window_hole"
OTHER_NAMESPACE = "other_namespace"
NOT_CACHED = "not_cached"
MISS_REASONS = (NEW_PREFIX, EVICTED, NO_SNAPSHOT, WINDOW_HOLE, OTHER_NAMESPACE, NOT_CACHED)

BLOCK = 32  # tokens per remembered block: how finely `evicted` is told (and what counts as "more")


class Recent:
    """The token sequences of the last `size` requests (or commits), by reference: did one of
    them hold these tokens?"""

    def __init__(self, size: int = 16):
        self._seqs: deque[tuple[str, np.ndarray]] = deque(maxlen=size)

    def add(self, namespace: str, tokens: np.ndarray) -> None:
        self._seqs.append((namespace, tokens))

    def saw(self, namespace: str, tokens: np.ndarray, upto: int) -> bool:
        """One of them, of `namespace`, began with `tokens[:upto]` (a one-token check first)."""
        if upto <= 0:
            return False
        last = tokens[upto - 1]
        return any(
            ns == namespace and len(t) >= upto and t[upto - 1] == last and np.array_equal(t[:upto], tokens[:upto])
            for ns, t in self._seqs
        )


def wanted(cached: int, n: int) -> int:
    """How far past `cached` another source must hold a prompt of `n` tokens to count: a block
    more, or up to the last token."""
    return min(cached + BLOCK, n - 1)
