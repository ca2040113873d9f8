"""A deterministic fake model: the K/V at position i is a function of tokens[:i+1].

Channel 0 of every key holds a rolling hash of the prefix (exact in float32), and the
model reads the previous hash back from its cache, so a wrongly restored cache also
corrupts everything computed after it.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from kvtrie.arrays import to_device
from kvtrie.models.cache import KVCache, RecurrentCache

MOD = 65521


def prefix_hashes(tokens, h0: int = 0) -> np.ndarray:
    out = np.empty(len(tokens), dtype=np.int64)
    h = h0
    for i, t in enumerate(tokens):
        h = (h * 31 + int(t) + 1) % MOD
        out[i] = h
    return out


class FakeModel:
    """Fills KV layers ("K") with `[1, heads, L, dim]` keys/values derived from prefix hashes, and
    recurrent layers ("R") with a state that is the hash of the whole prefix plus its last tokens.

    Before running, it reads the previous hash from every layer it can and raises if they
    disagree, so a restore that mixes states of different prefixes cannot go unnoticed.
    """

    TAIL = 3

    def __init__(
        self, layers: int = 2, heads: int = 2, dim: int = 4, dtype=mx.float32, kinds: str | None = None, state_pad: int = 0
    ):
        self.kinds = kinds or "K" * layers
        self.num_layers, self.heads, self.dim, self.dtype = len(self.kinds), heads, dim, dtype
        self.state_pad = state_pad  # extra state floats per recurrent layer: snapshots as large as real ones

    def make_cache(self) -> list:
        return [KVCache() if k == "K" else RecurrentCache(3 if self.state_pad else 2) for k in self.kinds]

    def kv_from_hashes(self, hashes: np.ndarray, layer: int) -> tuple[np.ndarray, np.ndarray]:
        h = hashes.astype(np.float64)[None, None, :, None]
        head = np.arange(self.heads, dtype=np.float64)[None, :, None, None]
        d = np.arange(self.dim, dtype=np.float64)[None, None, None, :]
        keys = np.mod(h * (d + 1) + 7 * layer + 13 * head, 1009.0) / 1009.0
        keys[..., 0] = h[..., 0] + layer  # exact: < 2**24
        values = -keys * 0.5 + layer
        return keys.astype(np.float32), values.astype(np.float32)

    def state_from(self, last_hash: int, tail: list[int], layer: int) -> list[np.ndarray]:
        padded = ([-1] * self.TAIL + list(tail))[-self.TAIL :]
        state = [np.array([[last_hash + layer]], np.float32), np.array([padded], np.float32)]
        if self.state_pad:
            state.append(np.full((1, self.state_pad), last_hash, np.float32))
        return state

    def cold_kv(self, tokens, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """The KV a cold run over `tokens` leaves in `layer`."""
        return self.kv_from_hashes(prefix_hashes(tokens), layer)

    def cold_state(self, tokens, layer: int) -> list[np.ndarray]:
        """The recurrent state a cold run over `tokens` leaves in `layer`."""
        return self.state_from(int(prefix_hashes(tokens)[-1]), [int(t) for t in tokens], layer)

    def _previous(self, cache: list) -> tuple[int, list[int]]:
        seen = set()
        tail: list[int] = []
        for layer, (kind, c) in enumerate(zip(self.kinds, cache)):
            if not c.offset:
                continue
            if kind == "K":
                seen.add(int(np.array(c.state[0][0, 0, c.offset - 1, 0].astype(mx.float32))) - layer)
            else:
                seen.add(int(np.array(c[0])[0, 0]) - layer)
                tail = [int(t) for t in np.array(c[1])[0] if t >= 0]
        offsets = {c.offset for c in cache}
        if len(seen) > 1 or len(offsets) > 1:
            raise AssertionError(f"layers disagree on the prefix: hashes {seen}, offsets {offsets}")
        return (seen.pop() if seen else 0), tail

    def __call__(self, tokens, cache: list) -> None:
        """Run over `tokens`, appending to `cache` (whose offset says where they start)."""
        if len(tokens) == 0:
            return
        h0, tail = self._previous(cache)
        hashes = prefix_hashes(tokens, h0)
        tail = tail + [int(t) for t in tokens]
        for layer, (kind, c) in enumerate(zip(self.kinds, cache)):
            if kind == "K":
                k, v = self.kv_from_hashes(hashes, layer)
                c.update_and_fetch(mx.array(k, dtype=self.dtype), mx.array(v, dtype=self.dtype))
            else:
                c.state = [mx.array(a) for a in self.state_from(int(hashes[-1]), tail, layer)]
                c.advance(len(tokens))


def prefill_and_commit(model: FakeModel, session, tokens) -> None:
    """Run the uncached rest of `tokens` following the session's capture plan, then commit."""
    done = session.cached
    for p in session.capture_at:
        model(tokens[done:p], session.caches)
        session.capture()
        done = p
    model(tokens[done:], session.caches)
    session.commit(tokens)


def draw_tokens(data, stored, *, vocab: int = 3, tail: int = 10, fresh: int = 20, label: str = "") -> list[int]:
    """A request built to share prefixes: a stored sequence cut anywhere (often mid-edge) plus a
    new tail, or a fresh sequence; never empty."""
    from hypothesis import strategies as st

    if stored and data.draw(st.booleans(), label=f"{label}extend stored"):
        base = data.draw(st.sampled_from(stored), label=f"{label}base")
        cut = data.draw(st.integers(0, len(base)), label=f"{label}cut")
        tokens = base[:cut] + data.draw(st.lists(st.integers(0, vocab), max_size=tail), label=f"{label}tail")
    else:
        tokens = data.draw(st.lists(st.integers(0, vocab), max_size=fresh), label=f"{label}fresh")
    return tokens or [data.draw(st.integers(0, vocab), label=f"{label}one token")]


def lcp(a, b) -> int:
    """Length of the longest common prefix of two token sequences."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def as_numpy(a) -> np.ndarray:
    """A payload array from either tier as float32 numpy."""
    return np.array(to_device(a).astype(mx.float32))


def live_arrays(cache) -> tuple[np.ndarray, np.ndarray]:
    keys, values = cache.state[0], cache.state[1]
    off = cache.offset
    return np.array(keys[..., :off, :].astype(mx.float32)), np.array(values[..., :off, :].astype(mx.float32))


def assert_cold(model: FakeModel, caches: list, tokens, n: int) -> None:
    """The first `n` positions of `caches` equal, element for element, a cold run over tokens[:n]."""
    for layer, (kind, c) in enumerate(zip(model.kinds, caches)):
        assert c.offset == n
        if n == 0:
            continue
        if kind == "K":
            k, v = live_arrays(c)
            ck, cv = model.cold_kv(tokens[:n], layer)
            np.testing.assert_array_equal(k, ck)
            np.testing.assert_array_equal(v, cv)
        else:
            for got, want in zip(c.state, model.cold_state(tokens[:n], layer)):
                np.testing.assert_array_equal(np.array(got), want)


def check_invariants(pc, open_sessions=(), model: FakeModel | None = None) -> None:
    """DESIGN.md invariants 1, 2, 4 and 6 over the whole trie (and payload == cold state if model given)."""
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
        path_tokens = np.concatenate([n.tokens for n in node.path()])
        for layer, p in enumerate(node.payload.layers or ()):  # a disk node's payload is in its file
            if layer in pc.recurrent_layers:
                if p is not None and model is not None:
                    for got, want in zip(p.states, model.cold_state(path_tokens, layer)):
                        np.testing.assert_array_equal(as_numpy(got), want)
                continue
            assert p.length == node.end - node.start, "KV payload must span exactly its edge"
            if model is not None:
                ck, cv = model.cold_kv(path_tokens, layer)
                np.testing.assert_array_equal(as_numpy(p.keys), ck[..., node.start :, :])
                np.testing.assert_array_equal(as_numpy(p.values), cv[..., node.start :, :])
        total += node.payload.nbytes
        assert node.pins == pinned_by.get(id(node), 0), "pins must count the open sessions using the node"
    stats = pc.stats()
    assert stats["device_bytes"] + stats["host_bytes"] + stats["disk_bytes"] == total, "byte accounting must be exact"
    nodes = [node for _, node, _ in pc.walk()]
    assert stats["nodes"] == len(nodes)
    assert pc.num_sequences == sum(1 for n in nodes if n.is_leaf)
    assert stats["snapshots"] == sum(1 for n in nodes if pc.recurrent_layers and n.payload.has_state)
