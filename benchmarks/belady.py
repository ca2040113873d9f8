"""Offline references for a prefix-trie eviction policy, computed from a trace alone.

`belady` is furthest-next-use (Belady's MIN) over a radix trie, leaves first: the yardstick an
online policy is judged by. `lru_trie` is leaf-first LRU over the same trie, as a sanity
reference (what plain recency gets). Both simulate the trie of stored sequences only (no KV),
counting bytes as stored tokens x `bytes_per_token`.

Per request, in trace order:
1. hit = the longest stored prefix of the prompt, at most `len(prompt) - 1` (kvtrie always
   leaves one token to compute);
2. `stored` is inserted (an edge splits where it leaves the trie);
3. while stored tokens x bytes_per_token > budget, a leaf goes (the just-stored one may go too).
   When a leaf goes its parent may become a leaf, and a candidate.

Rules of the simulated trie:
- A node left with one child stays a node (it does not merge with the child), so the
  references keep the finest granularity they ever had. (kvtrie merges; `lru_trie(merge=True)`
  does too, to show what merging costs.)
- Request j *restores* position p of a node's root path when
  min(LCP(prompt_j, that path), len(prompt_j) - 1) > p.
- Belady, `granularity="token"` (default): a leaf's next use is its deepest token's; the leaf
  whose next use lies furthest ahead (never: infinitely far) loses its tail back to the deepest
  position some sooner request restores (the node splits, the lower part goes), and no more than
  the budget needs. This is MIN over unit-size token positions; since a deeper position is never
  restored before a shallower one, it never leaves a hole in a path, so it is the optimum of
  this model (checked against exhaustive search on small traces) and no online policy beats it.
- Belady, `granularity="node"`: whole leaves only, a leaf used when any of its tokens is
  restored. Not optimal with leaves of different sizes: it may drop a leaf that a later request
  restores whole to keep one that a sooner request restores one token of, and lose to LRU.
- Ties: two leaves never share a finite next use (one request restores along one path), so
  ties are among never-used leaves: the deeper one (larger end) goes first, then the longer
  edge, then the newer node; which of these goes first never changes a later hit.
- LRU evicts the leaf least recently used, where a node is used when its path is restored from
  or stored (every node on the stored sequence's path); ties: the deeper one first.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from typing import Any, Optional, Protocol

import numpy as np

from kvtrie.trie import Node, Trie, as_token_array

NEVER = 1 << 62  # the next use of a node no later request uses


class _Req(Protocol):
    prompt: list[int]
    stored: list[int]


class Future:
    """u(j, k) = min(LCP(prompt_j, stored_k), len(prompt_j) - 1) for every j > k, per k on demand.

    A node first stored by request k lies on stored_k's path, so request j uses it exactly
    when u(j, k) > node.start. Rows are computed once per owner k with numpy, comparing growing
    chunks so that the work follows the common prefixes, not the prompts' lengths.
    """

    def __init__(self, prompts: Sequence[np.ndarray], stored: Sequence[np.ndarray]):
        n = len(prompts)
        lens = np.array([len(p) for p in prompts], dtype=np.int64)
        width = int(lens.max()) if n else 0
        self._prompts = np.full((n, width), -1, dtype=np.int32)  # -1 pads: never equal to a token
        for j, p in enumerate(prompts):
            self._prompts[j, : len(p)] = p
        self._caps = lens - 1
        self._stored = stored
        self._rows: dict[int, np.ndarray] = {}

    def row(self, k: int) -> np.ndarray:
        """u(j, k) for j = k+1 .. n-1 (index j - k - 1)."""
        row = self._rows.get(k)
        if row is None:
            lcp = _lcp_rows(self._stored[k], self._prompts[k + 1 :])
            row = self._rows[k] = np.minimum(lcp, self._caps[k + 1 :])
        return row

    def next_use(self, owner: int, start: int, now: int) -> int:
        """The first request after `now` that restores a token past `start` of owner's path (NEVER: none)."""
        after = self.row(owner)[now - owner :]
        hits = np.flatnonzero(after > start)
        return now + 1 + int(hits[0]) if len(hits) else NEVER


    def deepest_before(self, owner: int, now: int, until: int) -> int:
        """The deepest restore into owner's path by requests now+1 .. until-1 (0: none)."""
        part = self.row(owner)[now - owner : until - owner - 1]
        return int(part.max()) if len(part) else 0


def _lcp_rows(seq: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Longest common prefix of `seq` with each row of `rows` (rows padded with -1)."""
    out = np.zeros(len(rows), dtype=np.int64)
    limit = min(len(seq), rows.shape[1])
    active = np.arange(len(rows))
    start, step = 0, 32
    while len(active) and start < limit:
        stop = min(start + step, limit)
        eq = rows[active, start:stop] == seq[start:stop]
        full = eq.all(axis=1)
        diverged = ~full
        out[active[diverged]] = start + eq[diverged].argmin(axis=1)
        active = active[full]
        start, step = stop, step * 2
    out[active] = limit
    return out


class TrieSim:
    """A payload-free radix trie under a byte budget, evicting leaves in `priority` order.

    Subclasses give `priority(node)` (smallest goes first) and may note uses in `touch`. A
    leaf's priority is computed when it is pushed: when it is stored or used (it is on the
    request's path), when a split changes its start, and when it becomes a leaf.
    """

    merge = False  # fold a parent left with one child into it (as kvtrie does) instead of keeping it

    def __init__(self, requests: Sequence[_Req], budget_bytes: Optional[int], bytes_per_token: int):
        if bytes_per_token <= 0:
            raise ValueError(f"bytes_per_token must be positive, got {bytes_per_token!r}")
        if budget_bytes is not None and budget_bytes < 0:
            raise ValueError(f"budget_bytes must be non-negative or None, got {budget_bytes!r}")
        self.requests = requests
        self.prompts = [as_token_array(list(r.prompt)) for r in requests]
        self.stored = [as_token_array(list(r.stored)) for r in requests]
        for i, (p, s) in enumerate(zip(self.prompts, self.stored)):
            if len(s) < len(p) or not np.array_equal(s[: len(p)], p):
                raise ValueError(f"request {i}: stored must begin with the prompt")
        self.capacity = None if budget_bytes is None else budget_bytes // bytes_per_token  # tokens that fit
        self.trie = Trie()  # payload: the index of the request that stored the node's tokens
        self.now = 0
        self._heap: list[tuple] = []
        self._version: dict[int, int] = {}

    def priority(self, node: Node) -> tuple:
        raise NotImplementedError

    def touch(self, path: Sequence[Node]) -> None:
        """The nodes on the stored sequence's path were used now."""

    def push(self, node: Node) -> None:
        version = self._version.get(node.id, 0) + 1
        self._version[node.id] = version
        heapq.heappush(self._heap, (*self.priority(node), node.id, version, node))

    def _pop_leaf(self) -> Node:
        while True:
            *_, node_id, version, node = heapq.heappop(self._heap)
            if version == self._version.get(node_id) and node.parent is not None and node.is_leaf:
                return node

    def evict(self, leaf: Node, overflow: int) -> tuple[int, int]:
        """Remove `leaf` (`overflow`: tokens over the budget); returns the positions that went."""
        parent = leaf.parent
        self.trie.remove_leaf(leaf)
        if not parent.is_root and parent.is_leaf:
            self.push(parent)
        elif self.merge and not parent.is_root and len(parent.children) == 1:
            self.trie.merge(parent)  # the child survives, now starting at the parent's start
        return leaf.start, leaf.end

    def run(self) -> dict[str, Any]:
        cached_per_request = []
        evicted: list[tuple[int, int, int]] = []
        trie = self.trie
        for i, (prompt, stored) in enumerate(zip(self.prompts, self.stored)):
            self.now = i
            cached = min(trie.match(prompt).length, len(prompt) - 1)
            cached_per_request.append(cached)
            m = trie.match(stored)
            if m.length < len(stored):
                if m.ends_mid_edge:
                    lower = m.last
                    parent = trie.split(lower, m.length)
                    if lower.is_leaf:
                        self.push(lower)  # its start moved: a later first use, maybe
                else:
                    parent = m.last or trie.root
                leaf = trie.add_child(parent, stored[m.length :], i)
                path = leaf.path()
            else:
                path = list(m.path)
            self.touch(path)
            if path and path[-1].is_leaf:
                self.push(path[-1])
            while self.capacity is not None and trie.num_tokens > self.capacity:
                evicted.append((i, *self.evict(self._pop_leaf(), trie.num_tokens - self.capacity)))
        total = int(sum(len(p) for p in self.prompts))
        hits = int(sum(cached_per_request))
        return {
            "cached_tokens": hits,
            "prompt_tokens": total,
            "hit_rate": hits / total if total else 0.0,
            "requests": len(self.prompts),
            "evictions": len(evicted),
            "evicted_tokens": int(sum(e - s for _, s, e in evicted)),
            "evicted": evicted,  # (request index, start, end) of each leaf that went, in order
            "cached_per_request": cached_per_request,
        }


class BeladySim(TrieSim):
    """Furthest next use first, over the trie's leaves.

    `granularity="token"` (the default) judges a leaf by its deepest token and, when that
    token's next use is the furthest, cuts the leaf's tail back to what is used sooner (a
    split, then the lower part goes), never more than the budget needs: furthest-next-use
    over unit-size token positions, which never leaves a hole in a path (a deeper position is
    never used before a shallower one). `granularity="node"` judges and evicts whole leaves:
    a leaf is used when any of its tokens is restored.
    """

    def __init__(self, requests: Sequence[_Req], budget_bytes: Optional[int], bytes_per_token: int,
                 granularity: str = "token"):
        if granularity not in ("token", "node"):
            raise ValueError(f"granularity must be 'token' or 'node', got {granularity!r}")
        super().__init__(requests, budget_bytes, bytes_per_token)
        self.future = Future(self.prompts, self.stored)
        self.by_token = granularity == "token"

    def priority(self, node: Node) -> tuple:
        depth = node.end - 1 if self.by_token else node.start  # used: a restore goes past this position
        next_use = self.future.next_use(node.payload, depth, self.now)
        return (-next_use, -node.end, -len(node.tokens), -node.id)

    def evict(self, leaf: Node, overflow: int) -> tuple[int, int]:
        if not self.by_token:
            return super().evict(leaf, overflow)
        end = leaf.end
        # the tail whose next use is the deepest token's: past every restore that comes sooner
        sooner = self.future.deepest_before(leaf.payload, self.now, self.future.next_use(leaf.payload, end - 1, self.now))
        cut = max(leaf.start, min(sooner, end), end - overflow)
        if cut == leaf.start:
            return super().evict(leaf, overflow)
        self.trie.split(leaf, cut)  # the upper part keeps the leaf's place
        upper = leaf.parent
        self.trie.remove_leaf(leaf)
        self.push(upper)
        return cut, end


class LRUSim(TrieSim):
    """Least recently used leaf first (used: restored from or stored); ties: the deeper one first."""

    def __init__(self, requests: Sequence[_Req], budget_bytes: Optional[int], bytes_per_token: int, merge: bool = False):
        super().__init__(requests, budget_bytes, bytes_per_token)
        self.merge = merge

    def touch(self, path: Sequence[Node]) -> None:
        for node in path:
            node.last_used = self.now

    def priority(self, node: Node) -> tuple:
        return (node.last_used, -node.end, node.id)


def belady(
    requests: Sequence[_Req], budget_bytes: Optional[int], bytes_per_token: int, *, granularity: str = "token"
) -> dict[str, Any]:
    """Hit rate of furthest-next-use eviction over the trie's leaves (`budget_bytes=None`: unlimited).

    `granularity="token"` may cut a leaf's tail (see `BeladySim`), `"node"` evicts whole leaves.

    Returns `cached_tokens`, `prompt_tokens`, `hit_rate`, `evictions`, `evicted_tokens`,
    `evicted` (request index, start, end per evicted leaf) and `cached_per_request`.
    """
    if budget_bytes is None:  # nothing goes: no future needed
        return LRUSim(requests, None, bytes_per_token).run()
    return BeladySim(requests, budget_bytes, bytes_per_token, granularity).run()


def lru_trie(
    requests: Sequence[_Req], budget_bytes: Optional[int], bytes_per_token: int, *, merge: bool = False
) -> dict[str, Any]:
    """Hit rate of leaf-first LRU over the same trie (same result keys as `belady`).

    `merge=True` folds a node left with one child into that child after an eviction, as kvtrie
    does: the merged edge can then only go whole (an ablation: what merging costs LRU)."""
    return LRUSim(requests, budget_bytes, bytes_per_token, merge).run()
