"""PrefixCache: stateful property tests, scenario tests and bad-input tests."""

from __future__ import annotations

import gc
import os

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from kvtrie import CacheMismatchError, PrefixCache, SessionError
from kvtrie.models.cache import KVCache

from fakes import FakeModel, assert_cold, check_invariants, draw_tokens, lcp, live_arrays


def serve(pc: PrefixCache, model: FakeModel, tokens, **kw) -> int:
    """One request: begin, check the restore, prefill the rest, commit, close; returns cached."""
    with pc.begin(tokens, **kw) as s:
        assert_cold(model, s.caches, tokens, s.cached)
        model(tokens[s.cached :], s.caches)
        s.commit(tokens)
        return s.cached


class PrefixCacheMachine(RuleBasedStateMachine):
    """Random begin/commit/close over sequences built to share prefixes and diverge mid-edge."""

    @initialize()
    def setup(self):
        self.model = FakeModel(layers=2, heads=2, dim=4)
        self.pc = PrefixCache(self.model.make_cache)
        self.stored: dict[str, list[list[int]]] = {"default": [], "other": []}
        self.open: list = []

    def _tokens(self, data, ns):
        return draw_tokens(data, self.stored[ns], vocab=5, tail=12, fresh=24)

    def _expected_cached(self, tokens, ns):
        best = max((lcp(tokens, s) for s in self.stored[ns]), default=0)
        return min(best, len(tokens) - 1)

    @rule(data=st.data(), ns=st.sampled_from(["default", "other"]), keep_open=st.booleans())
    def request(self, data, ns, keep_open):
        tokens = self._tokens(data, ns)
        s = self.pc.begin(tokens, namespace=ns)
        assert s.cached == self._expected_cached(tokens, ns)
        assert_cold(self.model, s.caches, tokens, s.cached)
        self.model(tokens[s.cached :], s.caches)
        added = s.commit(tokens)
        assert added <= len(tokens) - min(s.cached, len(tokens))
        self.stored[ns].append(tokens)
        if keep_open and len(self.open) < 4:
            self.open.append(s)
        else:
            s.close()

    @rule(data=st.data(), ns=st.sampled_from(["default", "other"]))
    def begin_and_abandon(self, data, ns):
        """A session that restores and closes without committing stores nothing."""
        tokens = self._tokens(data, ns)
        before = self.pc.stats()
        with self.pc.begin(tokens, namespace=ns) as s:
            assert_cold(self.model, s.caches, tokens, s.cached)
        after = self.pc.stats()
        assert after["tokens_stored"] == before["tokens_stored"]
        assert after["device_bytes"] == before["device_bytes"]

    @precondition(lambda self: self.open)
    @rule(i=st.integers(0, 3))
    def close_one(self, i):
        self.open.pop(i % len(self.open)).close()

    @invariant()
    def invariants_hold(self):
        if not hasattr(self, "pc"):
            return
        check_invariants(self.pc, self.open, self.model)
        for ns, seqs in self.stored.items():
            prefixes = {tuple(s[:i]) for s in seqs for i in range(1, len(s) + 1)}
            # every distinct stored prefix is one stored token: KV is never duplicated
            stored_here = sum(len(n.tokens) for nsn, n, _ in self.pc.walk() if nsn == ns)
            assert stored_here == len(prefixes)

    def teardown(self):
        for s in getattr(self, "open", []):
            s.close()


TestPrefixCacheMachine = PrefixCacheMachine.TestCase
TestPrefixCacheMachine.settings = settings(max_examples=200, stateful_step_count=12)


def test_shared_prefix_stored_once_and_each_suffix_restores():
    """2,000 shared tokens + 10 different 200-token suffixes hold 4,000 tokens of KV, not 22,000."""
    model = FakeModel(layers=2, heads=2, dim=4)
    pc = PrefixCache(model.make_cache)
    rng = np.random.default_rng(0)
    prefix = rng.integers(0, 1000, 2000).tolist()
    suffixes = [[1000 + i] + rng.integers(0, 1000, 199).tolist() for i in range(10)]
    for suffix in suffixes:
        serve(pc, model, prefix + suffix)
    stats = pc.stats()
    per_token = 2 * 2 * (2 * 4) * 4  # layers * (K and V) * heads*dim * float32
    assert stats["tokens_stored"] == 4000
    assert stats["device_bytes"] == 4000 * per_token
    for suffix in suffixes:
        tokens = prefix + suffix
        with pc.begin(tokens) as s:
            assert s.cached == 2199
            assert_cold(model, s.caches, tokens, 2199)
    check_invariants(pc, (), model)


def test_exact_repeat_holds_back_one_token_and_extension_hits():
    model = FakeModel()
    pc = PrefixCache(model.make_cache)
    tokens = list(range(50))
    assert serve(pc, model, tokens) == 0
    assert serve(pc, model, tokens) == 49
    assert serve(pc, model, tokens + [7, 8]) == 50
    assert serve(pc, model, [0]) == 0  # a one-token prompt never restores anything
    assert pc.stats()["tokens_stored"] == 52


def test_namespaces_never_share():
    model = FakeModel()
    pc = PrefixCache(model.make_cache, namespace="model-a")
    tokens = list(range(20))
    serve(pc, model, tokens)
    assert serve(pc, model, tokens, namespace="tenant-b") == 0
    assert serve(pc, model, tokens, namespace="tenant-b") == 19
    assert serve(pc, model, tokens) == 19
    assert pc.stats()["tokens_stored"] == 40
    with pytest.raises(TypeError, match="namespace"):
        pc.begin(tokens, namespace=3)


def test_continuation_after_decode_extends_the_cached_path():
    """Tokens committed after generation (prompt + reply) restore on the next turn."""
    model = FakeModel()
    pc = PrefixCache(model.make_cache)
    prompt = list(range(30))
    with pc.begin(prompt) as s:
        model(prompt, s.caches)
        reply = [100, 101, 102]
        for t in reply:  # decode one token at a time
            model([t], s.caches)
        s.commit(prompt + reply)
    turn2 = prompt + reply + [5, 6, 7]
    assert serve(pc, model, turn2) == 33


# MLX's buffer pool may hand a new array a recycled block slightly larger than asked
# for (at most two pages more); that slack is allocator rounding, not a kept buffer.
POOL_SLACK_PER_ARRAY = 2 * os.sysconf("SC_PAGE_SIZE")


def _held_after_cleanup(baseline: int) -> int:
    gc.collect()
    mx.clear_cache()
    return mx.get_active_memory() - baseline


def test_payloads_are_compact_in_memory():
    """Invariant 3: with live caches gone, MLX holds the payload bytes, not the live buffers."""
    model = FakeModel(layers=2, heads=4, dim=64)  # 1 KiB per position per array
    # no live caches kept after close, neither as hot sessions nor as buffers to recycle
    pc = PrefixCache(model.make_cache, hot_sessions=0, recycle_bytes=0)
    rng = np.random.default_rng(1)
    seqs = [rng.integers(0, 4, int(n)).tolist() for n in rng.integers(5, 300, 12)]
    baseline = _held_after_cleanup(0)
    for tokens in seqs:
        serve(pc, model, tokens)
    held = _held_after_cleanup(baseline)
    stored = pc.stats()["device_bytes"]
    arrays = sum(2 * len(n.payload.layers) for _, n, _ in pc.walk())
    assert stored > 0
    assert stored <= held <= stored + arrays * POOL_SLACK_PER_ARRAY
    # live buffers grow in 256-position steps: keeping them would cost far more than the slack
    assert held < 1.2 * stored


def test_capture_does_not_keep_the_source_buffer():
    from kvtrie.snapshot import capture_tokens, evaluate

    baseline = _held_after_cleanup(0)
    cache = KVCache()
    big = mx.ones((1, 4, 20000, 64))
    cache.update_and_fetch(big, big)
    del big
    payload = capture_tokens((cache.keys, cache.values), 100, 110)
    evaluate([payload])
    del cache
    held = _held_after_cleanup(baseline)
    assert payload.nbytes <= held <= payload.nbytes + 2 * POOL_SLACK_PER_ARRAY


# --- invariant 8: bad input raises and changes nothing --------------------------------


@pytest.fixture
def filled():
    model = FakeModel()
    pc = PrefixCache(model.make_cache)
    for tokens in ([1, 2, 3, 4, 5, 6], [1, 2, 3, 9, 9], [4, 4, 4]):
        serve(pc, model, tokens)
    return model, pc


def snapshot_of(pc):
    structural = ("nodes", "tokens_stored", "snapshots", "device_bytes", "host_bytes", "evictions", "page_outs")
    return pc.dump(), {k: pc.stats()[k] for k in structural}


@pytest.mark.parametrize(
    "tokens, error",
    [
        ([], ValueError),
        ([1.0, 2.0], TypeError),
        ([1, -2], ValueError),
        ([1, True], TypeError),
        ("abc", TypeError),
        (np.array([[1, 2]]), ValueError),
        (np.array([1.5]), TypeError),
        ([2**40], ValueError),
        (None, TypeError),
    ],
)
def test_begin_rejects_bad_tokens(filled, tokens, error):
    _, pc = filled
    before = snapshot_of(pc)
    with pytest.raises(error):
        pc.begin(tokens)
    assert snapshot_of(pc) == before


def _session_after_prefill(model, pc, tokens):
    s = pc.begin(tokens)
    model(tokens[s.cached :], s.caches)
    return s


def test_commit_with_wrong_offset_stores_nothing(filled):
    model, pc = filled
    tokens = [1, 2, 3, 4, 7, 7, 7]
    s = _session_after_prefill(model, pc, tokens)
    before = snapshot_of(pc)
    with pytest.raises(CacheMismatchError, match="offset"):
        s.commit(tokens + [8])
    with pytest.raises(ValueError, match="begin with"):
        s.commit([9] * len(tokens))
    assert snapshot_of(pc) == before
    s.commit(tokens)  # a failed commit leaves the session usable
    s.close()


def test_commit_rejects_caches_of_another_model(filled):
    model, pc = filled
    tokens = [1, 2, 3, 8]
    for other in (FakeModel(layers=3), FakeModel(heads=1), FakeModel(dim=2), FakeModel(dtype=mx.float16)):
        before = snapshot_of(pc)
        s = _session_after_prefill(model, pc, tokens)
        caches = other.make_cache()
        other(tokens, caches)
        with pytest.raises(CacheMismatchError):
            s.commit(tokens, caches)
        with pytest.raises(TypeError):
            s.commit(tokens, caches=caches[0])
        s.close()
        assert snapshot_of(pc) == before


def test_commit_twice_and_use_after_close(filled):
    model, pc = filled
    tokens = [1, 2, 3, 4, 5, 6, 7]
    s = _session_after_prefill(model, pc, tokens)
    s.commit(tokens)
    before = snapshot_of(pc)
    with pytest.raises(SessionError, match="already committed"):
        s.commit(tokens)
    assert snapshot_of(pc) == before
    s.close()
    s.close()  # closing twice is harmless
    before = snapshot_of(pc)
    with pytest.raises(SessionError, match="closed"):
        s.commit(tokens)
    with pytest.raises(SessionError):
        with s:
            pass
    assert snapshot_of(pc) == before


def test_bad_constructor_arguments():
    with pytest.raises(TypeError):
        PrefixCache(None)
    with pytest.raises(ValueError):
        PrefixCache(lambda: [])
    with pytest.raises(TypeError, match="namespace"):
        PrefixCache(FakeModel().make_cache, namespace=None)


def test_open_sessions_pin_their_path_and_split_keeps_pins_consistent():
    model = FakeModel()
    pc = PrefixCache(model.make_cache)
    a = list(range(10))
    serve(pc, model, a)
    s = pc.begin(a + [50])  # pins [0, 10)
    check_invariants(pc, [s])
    serve(pc, model, a[:4] + [99])  # splits the pinned node at 4
    check_invariants(pc, [s])
    assert all(n.pins == 1 for _, n, _ in pc.walk() if n.start < 10 and n.tokens[0] != 99)
    s.close()
    check_invariants(pc, [])


def test_dump_shows_structure():
    model = FakeModel()
    pc = PrefixCache(model.make_cache)
    serve(pc, model, [1, 2, 3, 4])
    serve(pc, model, [1, 2, 5])
    text = pc.dump()
    assert "[0, 2) 2 tokens" in text and "[2, 4) 2 tokens" in text and "[2, 3) 1 tokens" in text
    assert "device" in text and "pinned=0" in text


def test_live_kv_cache_protocol():
    c = KVCache()
    k = mx.arange(2 * 3 * 4, dtype=mx.float32).reshape(1, 2, 3, 4)
    keys, values = c.update_and_fetch(k, -k)
    assert c.offset == 3 and keys.shape == (1, 2, 3, 4)
    cap = c.keys.shape[2]
    for _ in range(300):  # grows in steps, not one concatenation per token
        c.update_and_fetch(k[:, :, :1], -k[:, :, :1])
    assert c.offset == 303 and c.keys.shape[2] % KVCache.step == 0 and c.keys.shape[2] >= 303
    assert cap == KVCache.step
    got_k, got_v = live_arrays(c)
    assert got_k.shape[2] == 303
    np.testing.assert_array_equal(got_k[:, :, :3], np.array(k))
    np.testing.assert_array_equal(got_v[:, :, 3:], -np.repeat(np.array(k[:, :, :1]), 300, axis=2))
    assert c.nbytes == c.keys.nbytes + c.values.nbytes


def test_continuing_the_last_session_takes_its_caches_without_a_copy():
    model = FakeModel()
    pc = PrefixCache(model.make_cache)
    turn1 = list(range(30))
    with pc.begin(turn1) as s:
        model(turn1, s.caches)
        s.commit(turn1)
        live = s.caches
    held = sum(c.keys.nbytes + c.values.nbytes for c in live)
    assert pc.stats()["held"]["hot"] == held  # kept hot: in the ledger, on the device tier
    turn2 = turn1 + [7, 8, 9]
    with pc.begin(turn2) as s:
        assert s.caches is live and s.cached == 30 and pc.stats()["hot_restores"] == 1
        assert pc.stats()["held"]["hot"] == 0 and pc.stats()["in_use_bytes"] == held  # the open session's now
        assert_cold(model, s.caches, turn2, 30)
        model(turn2[30:], s.caches)
        s.commit(turn2)
    with pc.begin(turn2 + [1], namespace="other") as s:  # another namespace never takes it
        assert s.cached == 0
    with pc.begin(list(range(5)) + [1]) as s:  # not a continuation: no hot caches
        assert s.cached == 5 and pc.stats()["hot_restores"] == 1


def test_hot_sessions_are_held_within_the_device_budget():
    """A hot session's caches are bytes kvtrie holds: at a device budget of 0 none is kept."""
    model = FakeModel()
    pc = PrefixCache(model.make_cache, device_bytes=0, host_bytes=0)
    turn1 = list(range(30))
    with pc.begin(turn1) as s:
        model(turn1, s.caches)
        s.commit(turn1)
        stats = pc.stats()  # the session's own path stays pinned while it is open
        assert stats["in_use_bytes"] > 0 and stats["held_bytes"] == stats["device_bytes"] > 0
    stats = pc.stats()
    assert stats["held_bytes"] == 0 and stats["held"]["hot"] == 0 and stats["in_use_bytes"] == 0
    with pc.begin(turn1 + [7, 8, 9]) as s:
        assert s.cached == 0 and pc.stats()["hot_restores"] == 0


def test_caches_passed_to_commit_are_never_kept_hot():
    model = FakeModel()
    pc = PrefixCache(model.make_cache)
    tokens = list(range(10))
    with pc.begin(tokens) as s:
        mine = model.make_cache()
        model(tokens, mine)
        s.commit(tokens, mine)
    with pc.begin(tokens + [1]) as s:
        assert s.cached == 10 and s.caches is not mine and pc.stats()["hot_restores"] == 0
    pc0 = PrefixCache(model.make_cache, hot_sessions=0)
    serve(pc0, model, tokens)
    with pc0.begin(tokens + [1]) as s:
        assert s.cached == 10 and pc0.stats()["hot_restores"] == 0
    with pytest.raises(ValueError):
        PrefixCache(model.make_cache, hot_sessions=-1)


@pytest.mark.parametrize("tier", ["device", "host"])
def test_restored_caches_own_their_buffers(tier):
    """A restore writes the payloads into fresh buffers (on the CPU, through numpy views that
    are gone once `begin` returns): live arrays share no memory with any stored payload, and
    writing into one session's live caches changes neither the trie nor another session's."""
    import mlx.core as mx

    from kvtrie.arrays import numpy_view

    model = FakeModel(layers=2, heads=2, dim=8)
    pc = PrefixCache(model.make_cache, device_bytes=0 if tier == "host" else None)
    base = list(range(40))
    serve(pc, model, base + [1, 2])
    serve(pc, model, base + [3, 4, 5])  # two nodes on the path: a restore stitches pieces
    payloads = [numpy_view(a) for _, n, _ in pc.walk() for p in n.payload.layers if p is not None for a in p.arrays]
    assert payloads and all(n.payload.tier == tier for _, n, _ in pc.walk())
    first, second = pc.begin(base + [3, 9]), pc.begin(base + [3, 9])
    for cache in first.caches + second.caches:
        for live in (cache.keys, cache.values):
            mx.eval(live)
            view = numpy_view(live)
            assert not any(np.shares_memory(view, p) for p in payloads)
    assert not np.shares_memory(numpy_view(first.caches[0].keys), numpy_view(second.caches[0].keys))
    model([7] * 5, first.caches)  # writes into the first session's live buffers in place
    mx.eval([c.keys for c in first.caches])
    assert_cold(model, second.caches, base + [3, 9], second.cached)
    first.close()
    second.close()
    with pc.begin(base + [3, 9]) as third:
        assert_cold(model, third.caches, base + [3, 9], third.cached)
    check_invariants(pc, (), model)
