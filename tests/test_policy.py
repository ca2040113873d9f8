"""The worth policy at real proportions: snapshots as large as Qwen3-Next-80B's, KV as small.

A fake hybrid model stands in for compute (its state is a hash of the prefix, padded to the
bytes of a real snapshot), so these run in a blink while the trade-off is the real one: one
snapshot weighs as much as the KV of ~3,100 tokens.
"""

from __future__ import annotations

import random

import mlx.core as mx
import numpy as np
import pytest

from kvtrie import PrefixCache
from kvtrie.policy import BRANCH, END, HINT, NEAR, PROMPT
from kvtrie.trie import Trie, as_token_array

from fakes import FakeModel, assert_cold, check_invariants

SNAPSHOT_FLOATS = 6_580_000 // 3 // 4  # three recurrent layers: a 6.3 MiB snapshot, as Qwen3-Next-80B's (4 layers)


def real_proportions() -> FakeModel:
    # one attention layer: 2 KV heads x 128 float32 = 2 KiB per token (the real 2 x 256 in bf16)
    return FakeModel(kinds="RRRK", heads=2, dim=128, state_pad=SNAPSHOT_FLOATS)


def chat(seed: int = 0, users: int = 4, turns: int = 3, system: int = 600):
    """A chat trace like mlx_lm.server sees: a shared system prompt, users' turns interleaved at
    random; each request is (prompt, reply, message ends)."""
    rng = random.Random(seed)
    sys_prompt = [rng.randrange(200) for _ in range(system)]
    history = {u: list(sys_prompt) for u in range(users)}
    ends = {u: [len(sys_prompt)] for u in range(users)}
    left = {u: turns for u in range(users)}
    trace = []
    while left:
        u = rng.choice(sorted(left))
        msg = [250, 251, 252] + [rng.randrange(200) for _ in range(rng.randrange(20, 60))] + [254]
        prompt = history[u] + msg + [250, 253, 252]
        hints = ends[u] + [len(history[u]) + len(msg)]
        reply = [rng.randrange(200) for _ in range(24)]
        trace.append((prompt, reply, hints))
        history[u] = prompt + reply + [254]
        ends[u] = hints + [len(prompt) + len(reply)]
        left[u] -= 1
        if not left[u]:
            del left[u]
    return trace


def serve(pc: PrefixCache, model: FakeModel, prompt, reply, hints) -> int:
    """One request as kvtrie's generate loop runs it; returns the prompt tokens computed."""
    with pc.begin(prompt, capture_hints=hints, reuse_logits=True) as s:
        assert_cold(model, s.caches, prompt, s.cached)
        computed = 0
        if s.logits is None:
            done = s.cached
            for p in s.capture_at:
                model(prompt[done:p], s.caches)
                s.capture(p, logits=mx.full((8,), float(p)) if p == len(prompt) else None)
                done = p
            model(prompt[done:], s.caches)
            computed = len(prompt) - s.cached
        else:
            np.testing.assert_array_equal(np.array(s.logits), np.full((8,), float(len(prompt))))
        model(reply[:-1], s.caches)
        s.commit(prompt + reply[:-1])
    return computed


def oracle(trace) -> int:
    """Prefill with exact prefix reuse and infinite memory (one token always computed)."""
    trie, total = Trie(), 0
    for prompt, reply, _ in trace:
        total += len(prompt) - min(trie.match(as_token_array(prompt)).length, len(prompt) - 1)
        _store(trie, prompt + reply[:-1])
    return total


def _store(trie: Trie, tokens) -> None:
    arr = as_token_array(tokens)
    m = trie.match(arr)
    if m.length < len(arr):
        parent = trie.split(m.last, m.length) if m.ends_mid_edge else (m.last or trie.root)
        trie.add_child(parent, arr[m.length :], None)


def needed_minimum(trace, kv_per_token: int, snapshot: int) -> int:
    """Every stored token's KV, plus one snapshot per stored sequence end and per branch point."""
    trie = Trie()
    for prompt, reply, _ in trace:
        _store(trie, prompt + reply[:-1])
    branches = sum(1 for n, _ in trie.walk() if len(n.children) >= 2)
    return trie.num_tokens * kv_per_token + (trie.num_leaves + branches) * snapshot


def held(pc: PrefixCache) -> int:
    s = pc.stats()
    return s["device_bytes"] + s["host_bytes"]


@pytest.mark.parametrize("hints, goal", [(False, 1.10), (True, 1.03)])
def test_chat_at_real_proportions_prefills_near_the_oracle_in_little_more_than_the_minimum(hints, goal):
    model = real_proportions()
    trace = [(p, r, h if hints else []) for p, r, h in chat()]
    minimum = needed_minimum(trace, 2048, 3 * SNAPSHOT_FLOATS * 4 + 3 * 16)
    worth = PrefixCache(model.make_cache)
    computed = sum(serve(worth, model, *req) for req in trace)
    assert computed <= goal * oracle(trace)
    assert held(worth) <= 1.5 * minimum
    stats = worth.stats()
    assert stats["snapshots_dropped"] > 0 and stats["snapshots_used"] > 0
    assert stats["kv_bytes"] + stats["snapshot_bytes"] == held(worth)
    check_invariants(worth, (), model)
    # the ablation (plain LRU, a snapshot every 256 tokens, at divergences and at len - 1) keeps them all
    lru = PrefixCache(model.make_cache, policy="lru")
    for req in trace:
        serve(lru, model, *req)
    assert held(lru) > 3 * minimum


@pytest.mark.parametrize("hints", [False, True])
def test_sequence_ends_and_branch_points_stay_restorable(hints):
    """Without memory pressure the needed minimum is always there: every stored sequence's end has
    its snapshot, and every branch point has one at most `NEAR` tokens above it (a snapshot
    just above serves, and the branch point then takes none of its own)."""
    model = real_proportions()
    pc = PrefixCache(model.make_cache)
    for prompt, reply, h in chat(seed=3, users=5, turns=2):
        serve(pc, model, prompt, reply, h if hints else [])
    for _, node, _ in pc.walk():
        if node.is_leaf:
            assert node.payload.has_state, f"{node} is a sequence end"
        if len(node.children) >= 2:
            above = next((a.end for a in reversed(node.path()) if a.payload.has_state), 0)
            assert node.end - above < NEAR, f"{node} is a branch point with no snapshot near it"
            if not node.payload.has_state:
                stand_in = next(a for a in node.path() if a.end == above)
                assert stand_in.payload.reasons & BRANCH
        if node.payload.has_state:  # every snapshot says why it was taken
            assert node.payload.reasons


def test_an_immediate_regenerate_restores_the_whole_prompt_with_its_logits():
    model = real_proportions()
    pc = PrefixCache(model.make_cache)
    prompt, reply, hints = chat()[0]
    serve(pc, model, prompt, reply, hints)
    with pc.begin(prompt, reuse_logits=True) as s:
        assert s.cached == len(prompt) and s.logits is not None and s.capture_at == ()
        assert_cold(model, s.caches, prompt, len(prompt))
    with pc.begin(prompt) as s:  # without reuse_logits a prompt always keeps a token to compute
        assert s.cached < len(prompt)
    # the prompt end's snapshot is taken once, at the end, not at len - 1
    ends = {n.end: n.payload.reasons for _, n, _ in pc.walk() if n.payload.has_state}
    assert ends.get(len(prompt), 0) & PROMPT and len(prompt) - 1 not in ends


def test_a_byte_budget_keeps_the_shared_branch_point_over_old_conversations():
    """Under pressure the order is worth per byte and recency (GreedyDual): the system prompt's
    branch point, which every new conversation restores, outlives the stale conversation ends."""
    model = real_proportions()
    snapshot = 3 * SNAPSHOT_FLOATS * 4 + 3 * 16
    pc = PrefixCache(model.make_cache, device_bytes=5 * snapshot, host_bytes=0)
    trace = chat(seed=1, users=6, turns=1)
    for req in trace:
        serve(pc, model, *req)
    assert held(pc) <= 5 * snapshot
    shared = [n for _, n, _ in pc.walk() if n.payload.has_state and n.payload.reasons & BRANCH]
    assert shared and shared[0].end >= 590
    prompt = trace[0][0][:603] + [7, 7, 7]  # a new user: restores the shared prefix
    with pc.begin(prompt) as s:
        assert s.cached == shared[0].end
    check_invariants(pc, (), model)


def test_reasons_are_recorded_and_shown():
    model = FakeModel(kinds="KR")
    pc = PrefixCache(model.make_cache)
    tokens = list(range(20))
    with pc.begin(tokens, capture_hints=[10], reuse_logits=True) as s:
        assert s.capture_at == (10, 20)
        model(tokens[:10], s.caches)
        s.capture()
        model(tokens[10:], s.caches)
        s.capture(logits=mx.zeros((3,)))
        model([1], s.caches)  # the reply's first token went in too
        s.commit(tokens + [1])
    reasons = {n.end: n.payload.reasons for _, n, _ in pc.walk() if n.payload.has_state}
    assert reasons[10] == HINT and reasons[20] == PROMPT and reasons[21] == END
    assert "state(hint)" in pc.dump() and "state(prompt) logits" in pc.dump()


def test_bad_policy_arguments_raise():
    model = FakeModel(kinds="KR")
    with pytest.raises(ValueError, match="policy"):
        PrefixCache(model.make_cache, policy="fifo")
    with pytest.raises(ValueError, match="speculative_ratio"):
        PrefixCache(model.make_cache, speculative_ratio=-1)
