"""What requests sent recently, remembered after their payloads are gone: when each block-aligned
prefix was last seen.

An eviction policy learns how long a sequence waits between uses from the sequences that came
back. A sequence that was evicted (or never admitted) and comes back is a miss, and without a
memory of it the policy would take it for a new one, forever, if nothing ever stays long enough
to be reused: a round of users larger than the budget. `History` keeps, per namespace, a key
per block of `block` tokens (a hash chained over the prefix, as the shared tier's and LMCache's
token databases do) and when it was last seen, for at most `capacity` blocks, oldest forgotten
first. Pure Python + numpy: it never imports mlx.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import numpy as np


def block_keys(namespace: str, tokens: np.ndarray, block: int) -> list[bytes]:
    """One key per whole block of `tokens`: the hash of the namespace and every token up to the
    block's end (chained, so each costs one block of hashing)."""
    keys = []
    h = hashlib.blake2b(namespace.encode(), digest_size=16).digest()
    data = np.ascontiguousarray(tokens, dtype=np.int32)
    for end in range(block, len(data) + 1, block):
        h = hashlib.blake2b(h + data[end - block : end].tobytes(), digest_size=16).digest()
        keys.append(h)
    return keys


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
        for i, key in enumerate(block_keys(namespace, tokens, self.block)):
            last = self._seen.pop(key, None)
            if run and last is not None:
                found.append(((i + 1) * self.block, last))
            else:
                run = False
            self._seen[key] = now
        while len(self._seen) > self.capacity:
            self._seen.popitem(last=False)
        return found
