"""What requests sent recently, remembered after their payloads are gone: when each block-aligned
prefix was last seen.

An eviction policy learns how long a sequence waits between uses from the sequences that came
back. A sequence that was evicted (or never admitted) and comes back is a miss, and without a
memory of it the policy would take it for a new one, forever, if nothing ever stays long enough
to be reused: a round of users larger than the budget. `History` keeps, per namespace, a key
per block of `block` tokens (a hash of the whole prefix up to the block's end, as the shared
tier's and LMCache's token databases key blocks) and when it was last seen, for at most
`capacity` blocks, oldest forgotten first. The same memory tells a miss's reason: a request whose
next block was seen before lost it to eviction (`kvtrie.misses`). Pure Python + numpy: it never
imports mlx.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Any

import numpy as np


def _hasher(namespace: str) -> Any:
    """A running hash seeded with the namespace: fed a prefix's tokens, its digest is that prefix's key."""
    h = hashlib.blake2b(digest_size=16)
    h.update(hashlib.blake2b(namespace.encode(), digest_size=16).digest())
    return h


def block_keys(namespace: str, tokens: np.ndarray, block: int, start: int = 0) -> list[tuple[int, bytes]]:
    """`(end, key)` for each whole block of `tokens` that ends past `start`: the key hashes the
    namespace and every token up to the block's end (one running hash, so each costs one block
    of hashing, and the prefix before `start` one pass in C)."""
    keys = []
    h = _hasher(namespace)
    data = np.ascontiguousarray(tokens, dtype=np.int32)
    first = (start // block) * block
    h.update(data[:first])  # (numpy arrays are buffers: no copy)
    for end in range(first + block, len(data) + 1, block):
        h.update(data[end - block : end])
        keys.append((end, h.copy().digest()))
    return keys


def prefix_key(namespace: str, tokens: np.ndarray, end: int) -> bytes:
    """The key of `tokens[:end]` (as `block_keys` gives it for a block ending at `end`)."""
    h = _hasher(namespace)
    h.update(np.ascontiguousarray(tokens[:end], dtype=np.int32))
    return h.digest()


class History:
    """Block-aligned prefixes seen recently and when (see the module docstring)."""

    def __init__(self, block: int = 256, capacity: int = 1 << 16):
        if block < 1 or capacity < 1:
            raise ValueError(f"block and capacity must be positive, got {block} and {capacity}")
        self.block = block
        self.capacity = capacity
        self._seen: OrderedDict[bytes, int] = OrderedDict()

    def __len__(self) -> int:
        return len(self._seen)

    def recall(self, namespace: str, tokens: np.ndarray, now: int) -> list[tuple[int, int]]:
        """`(end, last seen)` for each block of `tokens` seen before, from the first on (the run
        stops at the first block never seen); all of `tokens`' blocks are seen at `now` from here on."""
        found = []
        run = True
        for end, key in block_keys(namespace, tokens, self.block):
            last = self._seen.pop(key, None)
            if run and last is not None:
                found.append((end, last))
            else:
                run = False
            self._seen[key] = now
        self._forget_oldest()
        return found

    def record(self, namespace: str, tokens: np.ndarray, start: int = 0, now: int = 0) -> None:
        """Remember the blocks of `tokens` that end past `start` as seen at `now` (the ones before
        were remembered when they were new)."""
        for _, key in block_keys(namespace, tokens, self.block, start):
            self._seen.pop(key, None)
            self._seen[key] = now
        self._forget_oldest()

    def seen(self, namespace: str, tokens: np.ndarray, position: int) -> bool:
        """Whether the whole block of `tokens` that holds `position` was seen (as part of a prefix
        `tokens` begins with); False where that block is not whole in `tokens`."""
        end = (position // self.block + 1) * self.block
        return end <= len(tokens) and prefix_key(namespace, tokens, end) in self._seen

    def _forget_oldest(self) -> None:
        while len(self._seen) > self.capacity:
            self._seen.popitem(last=False)
