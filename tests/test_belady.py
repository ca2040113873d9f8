"""The offline references the eviction-policy benchmark judges kvtrie by (benchmarks/belady.py).

Belady (token-granular) is the optimum of its model: never below leaf-first LRU or whole-leaf
Belady, never above infinite memory, equal to an exhaustive search on tiny traces; degenerate
budgets give the obvious answers; round-robin over-subscription separates it from recency;
hand-made traces pin the exact evictions and their tie rules.
"""

from __future__ import annotations

import pathlib
import sys
from functools import lru_cache

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))

from belady import belady, lru_trie  # noqa: E402
from traces import (  # noqa: E402
    TRACES,
    Request,
    build,
    oracle_cached,
    round_robin,
    round_robin_doc_tokens,
    unique_tokens,
)


@st.composite
def small_traces(draw, max_requests: int = 10, max_new: int = 6) -> list[Request]:
    """Requests that extend or branch off earlier prompts and stored sequences (small vocabularies
    also share prefixes by chance)."""
    vocab = draw(st.sampled_from([2, 3, 50]))
    tokens = st.integers(0, vocab - 1)
    out: list[Request] = []
    for i in range(draw(st.integers(1, max_requests))):
        base: list[int] = []
        if out and draw(st.booleans()):
            src = draw(st.sampled_from(out))
            seq = src.stored if draw(st.booleans()) else src.prompt
            base = seq[: draw(st.integers(0, len(seq)))]
        prompt = base + draw(st.lists(tokens, min_size=1, max_size=max_new))
        stored = prompt + draw(st.lists(tokens, max_size=max_new - 1))
        out.append(Request(f"r{i}", prompt, stored))
    return out


def exhaustive_optimum(requests: list[Request], capacity: int) -> int:
    """Most prompt tokens restorable with `capacity` tokens stored, over every choice of what to
    keep (a prefix-closed set of positions) after each request."""

    def hit(kept: frozenset, prompt: list[int]) -> int:
        k = 0
        while k < len(prompt) and tuple(prompt[: k + 1]) in kept:
            k += 1
        return min(k, len(prompt) - 1)

    def choices(full: frozenset) -> set:
        out, seen, stack = set(), set(), [full]
        while stack:
            s = stack.pop()
            if s in seen:
                continue
            seen.add(s)
            if len(s) <= capacity:
                out.add(s)
                continue
            for x in s:
                if not any(len(y) == len(x) + 1 and y[: len(x)] == x for y in s):  # a leaf position
                    stack.append(s - {x})
        return out

    @lru_cache(maxsize=None)
    def best(i: int, kept: frozenset) -> int:
        if i == len(requests):
            return 0
        r = requests[i]
        full = kept | {tuple(r.stored[:k]) for k in range(1, len(r.stored) + 1)}
        return hit(kept, r.prompt) + max(best(i + 1, s) for s in choices(frozenset(full)))

    return best(0, frozenset())


@settings(deadline=None, max_examples=150)
@given(small_traces(), st.floats(0, 1))
def test_belady_between_lru_and_oracle(trace, fraction):
    budget = int(fraction * unique_tokens(trace))  # 1 byte per token
    best = belady(trace, budget, 1)["cached_tokens"]
    assert best >= lru_trie(trace, budget, 1)["cached_tokens"]
    assert best >= lru_trie(trace, budget, 1, merge=True)["cached_tokens"]
    assert best >= belady(trace, budget, 1, granularity="node")["cached_tokens"]
    assert best <= oracle_cached(trace)


@settings(deadline=None, max_examples=100)
@given(small_traces(max_requests=5, max_new=4), st.floats(0, 1))
def test_belady_is_the_optimum_on_tiny_traces(trace, fraction):
    unique = unique_tokens(trace)
    assume(unique <= 12)
    capacity = int(fraction * unique)
    assert belady(trace, capacity * 8, 8)["cached_tokens"] == exhaustive_optimum(trace, capacity)


@settings(deadline=None, max_examples=40)
@given(small_traces())
def test_unlimited_budget_is_the_oracle_and_zero_budget_hits_nothing(trace):
    oracle = oracle_cached(trace)
    enough = unique_tokens(trace) * 4  # holds everything: the eviction path runs but never evicts
    for granularity in ("token", "node"):
        assert belady(trace, None, 4, granularity=granularity)["cached_tokens"] == oracle
        result = belady(trace, enough, 4, granularity=granularity)
        assert result["cached_tokens"] == oracle and result["evictions"] == 0
        assert belady(trace, 0, 4, granularity=granularity)["cached_tokens"] == 0
        assert belady(trace, 3, 4, granularity=granularity)["cached_tokens"] == 0  # less than one token's bytes
    assert lru_trie(trace, enough, 4)["cached_tokens"] == oracle
    assert lru_trie(trace, 0, 4)["cached_tokens"] == 0


def test_round_robin_oversubscribed_belady_keeps_a_subset_lru_thrashes():
    users, scale = 8, 0.2
    trace = round_robin(seed=3, scale=scale, users=users, turns=4)
    budget = int(3.5 * round_robin_doc_tokens(scale)) * 16
    lru = lru_trie(trace, budget, 16)
    assert lru["cached_tokens"] == 0  # each user is evicted just before coming back
    for granularity in ("token", "node"):
        best = belady(trace, budget, 16, granularity=granularity)
        assert best["hit_rate"] > 0.1
        served = {r.conversation for r, c in zip(trace, best["cached_per_request"]) if c > 0}
        assert 1 <= len(served) < users  # a fixed subset keeps its KV, the others never hit


# Hand-made traces, 1 byte per token. Evictions are (request index, start, end).
A = [
    Request("a", [1, 2, 3], [1, 2, 3, 4]),
    Request("b", [5, 6], [5, 6, 7]),
    Request("a", [1, 2, 3, 4, 8], [1, 2, 3, 4, 8, 9]),  # restores a; its new tail is never used again
    Request("b", [5, 6, 7, 10], [5, 6, 7, 10]),  # restores b
]
B = [
    Request("x", [1, 2], [1, 2, 3, 4]),
    Request("y", [1, 2, 5], [1, 2, 5, 6]),  # splits x at 2
    Request("x", [1, 2, 3, 4, 7], [1, 2, 3, 4, 7, 8]),
]


@pytest.mark.parametrize(
    "trace, budget, granularity, evicted, cached",
    [
        # the just-stored tail [8, 9] goes first (never used); then both leaves are never used:
        # whole leaves: the longer one (a, [0, 4)) goes, though one token would do
        (A, 7, "node", [(2, 4, 6), (3, 0, 4)], [0, 0, 4, 3]),
        # by token: a's tail loses just the one token the budget needs
        (A, 7, "token", [(2, 4, 6), (3, 3, 4)], [0, 0, 4, 3]),
        # y's new leaf [2, 4) is never used again, x's lower half is (request 2)
        (B, 5, "node", [(1, 2, 4), (2, 4, 6)], [0, 2, 4]),
        # by token: y keeps [2, 3) (the budget needs one token back); then the deeper of the two
        # never-used leaves goes first: x's new tail [4, 6)
        (B, 5, "token", [(1, 3, 4), (2, 4, 6)], [0, 2, 4]),
    ],
)
def test_exact_evictions(trace, budget, granularity, evicted, cached):
    result = belady(trace, budget, 1, granularity=granularity)
    assert result["evicted"] == evicted
    assert result["cached_per_request"] == cached
    assert result["prompt_tokens"] == sum(len(r.prompt) for r in trace)


def test_exact_evictions_lru():
    result = lru_trie(A, 7, 1)
    # b is older than a (a was just restored and extended); then a's tail, then a
    assert result["evicted"] == [(2, 0, 3), (3, 4, 6), (3, 0, 4)]
    assert result["cached_per_request"] == [0, 0, 4, 0]


def test_traces_are_seeded_and_consistent():
    for name in TRACES:
        trace = build(name, seed=1, scale=0.2)
        assert trace == build(name, seed=1, scale=0.2)
        assert trace != build(name, seed=2, scale=0.2)
        assert all(len(r.prompt) >= 1 and r.stored[: len(r.prompt)] == r.prompt for r in trace)
        assert 0 < oracle_cached(trace) < sum(len(r.prompt) for r in trace)
    # a follow-up turn carries the previous prompt and the whole reply
    trace = round_robin(scale=0.2, users=2, turns=2)
    first, again = trace[0], trace[2]
    assert again.conversation == first.conversation
    assert again.prompt[: len(first.stored)] == first.stored and len(again.prompt) > len(first.stored) + 1
