"""Hybrid models: recurrent snapshots at node ends, fallback to the deepest snapshot, capture plans."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from kvtrie import PrefixCache
from kvtrie.models import generate, load_model
from kvtrie.policy import NEAR

from fakes import FakeModel, assert_cold, check_invariants, draw_tokens, lcp
from test_generate import assert_warm_equals_cold, random_requests


class HybridMachine(RuleBasedStateMachine):
    """Random requests on fake hybrid layouts whose recurrent state is a hash of the prefix.

    An oracle tracks which prefixes hold a snapshot; every restore must land on the deepest
    of them within the match (never a position without one, never 0 while one exists) and
    equal the cold state exactly. The LRU policy never drops a snapshot without memory
    pressure; the worth policy may drop speculative ones (snapshots here are as large as
    `pad` floats), but never a sequence end or a branch point, and never adds one that no
    request captured.
    """

    @initialize(
        kinds=st.sampled_from(["KRR", "RKR", "RRRK", "R"]),
        interval=st.sampled_from([None, 4, 7]),
        cap=st.integers(1, 3),
        policy=st.sampled_from(["lru", "worth"]),
        pad=st.sampled_from([0, 64]),
    )
    def setup(self, kinds, interval, cap, policy, pad):
        self.model = FakeModel(kinds=kinds, heads=1, dim=2, state_pad=pad)
        self.policy = policy
        self.pc = PrefixCache(  # no hot sessions: every restore comes from the trie's snapshots
            self.model.make_cache, snapshot_interval=interval, max_snapshots_per_path=cap, policy=policy, hot_sessions=0
        )
        self.stored: list[list[int]] = []
        self.snapshots: set[tuple[int, ...]] = set()
        self.open: list = []

    def _tokens(self, data):
        return draw_tokens(data, self.stored)

    def _with_state(self) -> set[tuple[int, ...]]:
        return {
            tuple(np.concatenate([n.tokens for n in node.path()]).tolist())
            for _, node, _ in self.pc.walk()
            if node.payload.has_state
        }

    @rule(data=st.data(), keep_open=st.booleans())
    def request(self, data, keep_open):
        tokens = self._tokens(data)
        matched = max((lcp(tokens, s) for s in self.stored), default=0)
        limit = min(matched, len(tokens) - 1)
        expected = max((p for p in range(1, limit + 1) if tuple(tokens[:p]) in self.snapshots), default=0)
        s = self.pc.begin(tokens)
        assert s.cached == expected
        assert_cold(self.model, s.caches, tokens, s.cached)
        n = len(tokens)
        continuation = any(len(t) == matched and not any(len(u) > matched and u[:matched] == t for u in self.stored)
                           for t in self.stored)
        near = self.policy == "worth" and matched - s.cached < NEAR  # a snapshot just above serves
        if s.cached < matched < n and (self.policy == "lru" or not continuation) and not near:
            assert matched in s.capture_at, "the divergence point must be captured"
        if s.cached < n - 1:
            assert n - 1 in s.capture_at, "the regenerate point must be captured"
        assert all(s.cached < p < n for p in s.capture_at)
        done = s.cached
        captured = set()
        for p in s.capture_at:
            self.model(tokens[done:p], s.caches)
            done = p
            if data.draw(st.booleans(), label="follow plan"):
                assert s.capture() == p
                captured.add(p)
        self.model(tokens[done:], s.caches)
        decoded = data.draw(st.lists(st.integers(0, 3), max_size=3), label="decoded")
        for t in decoded:
            self.model([t], s.caches)
        full = tokens + decoded
        s.commit(full)
        self.stored.append(full)
        self.snapshots.update(tuple(full[:p]) for p in captured | {len(full)})
        if self.policy == "worth":  # the oracle follows what the policy dropped
            kept = self._with_state()
            assert kept <= self.snapshots, "a snapshot nobody captured"
            self.snapshots = kept
        if keep_open and len(self.open) < 3:
            self.open.append(s)
        else:
            s.close()

    @precondition(lambda self: self.open)
    @rule(i=st.integers(0, 2))
    def close_one(self, i):
        self.open.pop(i % len(self.open)).close()

    @invariant()
    def invariants_hold(self):
        if not hasattr(self, "pc"):
            return
        check_invariants(self.pc, self.open, self.model)
        assert self._with_state() == self.snapshots
        stats = self.pc.stats()
        assert stats["snapshots_made"] - stats["snapshots_dropped"] == stats["snapshots"] == len(self.snapshots)
        for _, node, _ in self.pc.walk():
            if node.is_leaf:
                assert node.payload.has_state, "a stored sequence's end keeps its snapshot"

    def teardown(self):
        for s in getattr(self, "open", []):
            s.close()


TestHybridMachine = HybridMachine.TestCase
TestHybridMachine.settings = settings(max_examples=100, stateful_step_count=10)


def test_split_node_has_no_snapshot_until_captured():
    model = FakeModel(kinds="KR")
    pc = PrefixCache(model.make_cache, snapshot_interval=None)
    a = list(range(30))
    with pc.begin(a) as s:
        model(a, s.caches)
        s.commit(a)  # no capture: only the end (30) has a snapshot
    b = a[:16] + [50, 51]
    with pc.begin(b) as s:
        assert s.cached == 0, "no snapshot at 16 yet: restart from scratch, never from a wrong state"
        assert s.capture_at == (16, 17)
        model(b[:16], s.caches)
        s.capture()
        model(b[16:], s.caches)
        s.commit(b)
    upper = [n for _, n, _ in pc.walk() if n.end == 16][0]
    assert upper.payload.has_state
    with pc.begin(a[:16] + [60, 61]) as s:
        assert s.cached == 16
        assert_cold(model, s.caches, a[:16], 16)
    with pc.begin(a[:20] + [70, 71]) as s:  # 4 tokens below a snapshot: that one serves, none is taken
        assert s.cached == 16 and s.capture_at == (21,)


def test_interval_snapshots_respect_the_cap():
    model = FakeModel(kinds="KR")
    tokens = list(range(30))
    pc = PrefixCache(model.make_cache, snapshot_interval=4, max_snapshots_per_path=2, policy="lru")
    with pc.begin(tokens) as s:
        assert s.capture_at == (4, 8, 29)
    pc = PrefixCache(model.make_cache, snapshot_interval=4, max_snapshots_per_path=2)
    with pc.begin(tokens) as s:  # the worth policy keeps the guesses nearest the prompt's end
        assert s.capture_at == (24, 28, 29)
    pc = PrefixCache(model.make_cache, snapshot_interval=64)
    with pc.begin(list(range(200))) as s:  # every 64, and 16, 22, 32, 45 before the end
        assert s.capture_at == (64, 128, 155, 168, 178, 184, 192, 199)
    with pc.begin(list(range(150)) + [1] * 30, capture_hints=[150]) as s:  # a hint marks the last message
        assert s.capture_at == (64, 150, 179)  # no guesses near it, nor at the end
    with pytest.raises(ValueError):
        PrefixCache(model.make_cache, snapshot_interval=0)
    with pytest.raises(TypeError):
        PrefixCache(model.make_cache, max_snapshots_per_path=1.5)
    with pytest.raises(ValueError):
        pc.begin(tokens, capture_hints=[-1])


# --- the real hybrid model ------------------------------------------------------------


@pytest.fixture(scope="module")
def qwen():
    return load_model("tiny-qwen3-next")


@pytest.mark.parametrize("policy", ["worth", "lru"])
@settings(max_examples=5)
@given(data=st.data())
def test_warm_equals_cold_on_tiny_qwen3_next(qwen, policy, data):
    model, _ = qwen
    pc = PrefixCache(model.make_cache, snapshot_interval=16, policy=policy)
    for prompt, warm in random_requests(model, pc, data):
        assert_warm_equals_cold(model, warm, prompt, 4)


def test_two_conversations_share_a_long_system_prompt(qwen):
    model, tokenizer = qwen
    pc = PrefixCache(model.make_cache)
    rng = np.random.default_rng(0)
    system = rng.integers(0, 256, 1000).tolist()
    first = system + tokenizer.encode("first question")
    second = system + tokenizer.encode("second one")
    third = system + tokenizer.encode("second two")
    generate(model, pc, first, max_tokens=3, capture_hints=[len(system)])
    warm = generate(model, pc, second, max_tokens=3, return_logits=True)
    assert warm.cached_tokens >= 1000
    assert_warm_equals_cold(model, warm, second, 3)
    # the third diverges from the second after "second " (1007), where nothing was captured:
    # it falls back to the deepest snapshot (1000), only 7 tokens above, which serves as the
    # branch point from now on (a 6 MiB snapshot at real sizes is not worth 7 tokens of prefill)
    warm3 = generate(model, pc, third, max_tokens=3, return_logits=True)
    assert warm3.cached_tokens == 1000 and lcp(second, third) == 1007
    assert_warm_equals_cold(model, warm3, third, 3)
    fourth = system + tokenizer.encode("second three")  # diverges where the third did
    warm = generate(model, pc, fourth, max_tokens=3, return_logits=True)
    assert warm.cached_tokens == 1000
    assert_warm_equals_cold(model, warm, fourth, 3)
    fifth = system + tokenizer.encode("sixteen tokens of a fifth")
    sixth = system + tokenizer.encode("sixteen tokens of a sixth")  # 20 tokens below 1000: worth a snapshot
    generate(model, pc, fifth, max_tokens=2)
    assert generate(model, pc, sixth, max_tokens=2).cached_tokens == 1000 and lcp(fifth, sixth) == 1020
    seventh = system + tokenizer.encode("sixteen tokens of a seventh")
    warm = generate(model, pc, seventh, max_tokens=3, return_logits=True)
    assert warm.cached_tokens == 1020
    assert_warm_equals_cold(model, warm, seventh, 3)
    # regenerating the same answer at once restores the whole prompt with its last logits:
    # nothing to prefill
    again = generate(model, pc, seventh, max_tokens=3, return_logits=True)
    assert again.cached_tokens == len(seventh) and again.prefill_tokens == 0 and again.tokens == warm.tokens
    assert_warm_equals_cold(model, again, seventh, 3)
    assert pc.stats()["logits_restores"] == 1


def test_without_hints_the_fallback_is_the_deepest_snapshot(qwen):
    model, _ = qwen
    pc = PrefixCache(model.make_cache, snapshot_interval=256)
    rng = np.random.default_rng(1)
    system = rng.integers(0, 256, 1000).tolist()
    generate(model, pc, system + [1, 2, 3], max_tokens=2)
    warm = generate(model, pc, system + [4, 5, 6], max_tokens=2, return_logits=True)
    # the deepest guess before the divergence at 1000: 16 tokens before the first prompt's end
    assert warm.cached_tokens == 1003 - 16
    assert_warm_equals_cold(model, warm, system + [4, 5, 6], 2)
    third = generate(model, pc, system + [7, 8], max_tokens=2)
    assert third.cached_tokens == 1000  # the second captured its divergence point
