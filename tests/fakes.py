"""A deterministic fake model: the K/V at position i is a function of tokens[:i+1].

Channel 0 of every key holds a rolling hash of the prefix (exact in float32), and the
model reads the previous hash back from its cache, so a wrongly restored cache also
corrupts everything computed after it.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from kvtrie.models.cache import KVCache

MOD = 65521


def prefix_hashes(tokens, h0: int = 0) -> np.ndarray:
    out = np.empty(len(tokens), dtype=np.int64)
    h = h0
    for i, t in enumerate(tokens):
        h = (h * 31 + int(t) + 1) % MOD
        out[i] = h
    return out


class FakeModel:
    """Fills `layers` KV caches with `[1, heads, L, dim]` keys/values derived from prefix hashes."""

    def __init__(self, layers: int = 2, heads: int = 2, dim: int = 4, dtype=mx.float32):
        self.num_layers, self.heads, self.dim, self.dtype = layers, heads, dim, dtype

    def make_cache(self) -> list:
        return [KVCache() for _ in range(self.num_layers)]

    def kv_from_hashes(self, hashes: np.ndarray, layer: int) -> tuple[np.ndarray, np.ndarray]:
        h = hashes.astype(np.float64)[None, None, :, None]
        head = np.arange(self.heads, dtype=np.float64)[None, :, None, None]
        d = np.arange(self.dim, dtype=np.float64)[None, None, None, :]
        keys = np.mod(h * (d + 1) + 7 * layer + 13 * head, 1009.0) / 1009.0
        keys[..., 0] = h[..., 0] + layer  # exact: < 2**24
        values = -keys * 0.5 + layer
        return keys.astype(np.float32), values.astype(np.float32)

    def cold_kv(self, tokens, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """The KV a cold run over `tokens` leaves in `layer`."""
        return self.kv_from_hashes(prefix_hashes(tokens), layer)

    def __call__(self, tokens, cache: list) -> None:
        """Run over `tokens`, appending to `cache` (whose offset says where they start)."""
        c0 = cache[0]
        h0 = 0
        if c0.offset:
            keys, _ = c0.state[0], c0.state[1]
            h0 = int(np.array(keys[0, 0, c0.offset - 1, 0]))
        hashes = prefix_hashes(tokens, h0)
        for layer, c in enumerate(cache):
            k, v = self.kv_from_hashes(hashes, layer)
            c.update_and_fetch(mx.array(k, dtype=self.dtype), mx.array(v, dtype=self.dtype))


def live_arrays(cache) -> tuple[np.ndarray, np.ndarray]:
    keys, values = cache.state[0], cache.state[1]
    off = cache.offset
    return np.array(keys[..., :off, :].astype(mx.float32)), np.array(values[..., :off, :].astype(mx.float32))


def assert_cold(model: FakeModel, caches: list, tokens, n: int) -> None:
    """The first `n` positions of `caches` equal, element for element, a cold run over tokens[:n]."""
    for layer, c in enumerate(caches):
        assert c.offset == n
        if n == 0:
            continue
        k, v = live_arrays(c)
        ck, cv = model.cold_kv(tokens[:n], layer)
        np.testing.assert_array_equal(k, ck)
        np.testing.assert_array_equal(v, cv)


def check_invariants(pc, open_sessions=(), model: FakeModel | None = None) -> None:
    """DESIGN.md invariants 1, 2, 4 and 6 over the whole trie (and payload == cold KV if model given)."""
    total = 0
    pinned_by = {}
    for s in open_sessions:
        node = s._leaf
        while node is not None and node.parent is not None:
            pinned_by[id(node)] = pinned_by.get(id(node), 0) + 1
            node = node.parent
    for _ns, node, _depth in pc.walk():
        parent = node.parent
        assert node.start == parent.end, "child must start at its parent's end"
        assert parent.children[int(node.tokens[0])] is node, "children are keyed by first token"
        for layer, p in enumerate(node.payload.layers):
            assert p.length == node.end - node.start, "KV payload must span exactly its edge"
            if model is not None:
                path_tokens = np.concatenate([n.tokens for n in node.path()])
                ck, cv = model.cold_kv(path_tokens, layer)
                np.testing.assert_array_equal(np.array(p.keys), ck[..., node.start :, :])
                np.testing.assert_array_equal(np.array(p.values), cv[..., node.start :, :])
        total += node.payload.nbytes
        assert node.pins == pinned_by.get(id(node), 0), "pins must count the open sessions using the node"
    assert pc.stats()["device_bytes"] == total, "byte accounting must be exact"
