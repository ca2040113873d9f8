"""Paging: device/host tiers, byte budgets, LRU page-out and eviction, pinning, thread safety."""

from __future__ import annotations

import random
import threading

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from kvtrie import PrefixCache
from kvtrie.arrays import LINE, MLX_LINE_OFFSET, HostArray, HostPool, numpy_view, to_device, to_host

from fakes import FakeModel, assert_cold, check_invariants, draw_tokens, lcp, prefill_and_commit
from test_cache import serve

DEVICE, HOST, DISK = "device", "host", "disk"


def lru_key(node):
    return (node.last_used, -node.start, node.id)


def nodes_of(pc):
    return [node for _, node, _ in pc.walk()]


def check_tiers_and_budgets(pc, strict: bool) -> None:
    """Per-tier byte accounting is exact, arrays live in their node's tier, and budgets hold.

    With sessions open a budget may be exceeded only while nothing movable is left
    (every remaining node is pinned or waits for pinned children); with none open, strictly.
    """
    by_tier = {DEVICE: 0, HOST: 0, DISK: 0}
    for node in nodes_of(pc):
        data = node.payload
        by_tier[data.tier] += data.nbytes
        for p in data.layers or ():  # a disk node's layers are gone once its file is written
            for a in p.arrays if p is not None else ():
                assert isinstance(a, mx.array if data.tier == DEVICE else HostArray)
    stats = pc.stats()
    assert stats["device_bytes"] == by_tier[DEVICE] and stats["host_bytes"] == by_tier[HOST]
    assert stats["disk_bytes"] == by_tier[DISK]
    budget = pc.budgets
    # device, host[, disk]: payloads move down it, the last tier evicts; a tier below the device
    # with a zero budget is left out of the chain (what would move there is evicted instead)
    chain = [t for t in budget if t == DEVICE or budget[t] != 0 or stats[f"{t}_bytes"] > 0]
    nodes = nodes_of(pc)

    def movable(tier):
        return [n for n in nodes if n.payload.tier == tier and not n.pins]

    def evictable(tier):
        return [n for n in movable(tier) if n.is_leaf or (tier != DISK and n.payload.has_snapshot)] + [
            n for n in nodes if n.payload.tier == tier and n.pins and tier != DISK and pc.policy.speculative(n)
        ]

    def deferred(tier, candidates):
        """Under a policy that admits new sequences only over what is worth less, the open sessions'
        own leaves that come before every candidate in its order go first, once they close: the
        tier may be past its budget by as much as they hold, no more."""
        policy = pc.policy
        if not policy.admits or any(policy.deadline(n) < policy.now for n in candidates):
            return False
        first = min((policy.key(n) for n in candidates), default=None)
        waiting = sum(n.payload.nbytes for n in nodes if n.payload.tier == tier and n.pins and n.is_leaf
                      and (first is None or policy.key(n) < first))
        return stats[f"{tier}_bytes"] - budget[tier] <= waiting

    for i, tier in enumerate(chain):
        if budget[tier] is None or stats[f"{tier}_bytes"] <= budget[tier]:
            continue
        assert not strict, f"{tier} over its budget with no session open"
        if tier != chain[-1]:
            assert not movable(tier), f"{tier} over budget while an unpinned node could move down"
        elif not deferred(tier, evictable(tier)):  # only nodes that wait for pinned children may stay
            assert not evictable(tier) and not any(movable(t) for t in chain[:-1])


def expected_victim(pc, candidates):
    """The policy's choice among `candidates`: one presumed dead (past its deadline) first, the most
    overdue; else the first in the policy's order (for a pure transformer under the worth policy:
    the furthest expected next use; under "lru", the least recently used)."""
    policy = pc.policy
    dead = [n for n in candidates if policy.deadline(n) < policy.now]
    if dead:
        return min(dead, key=lambda n: (policy.deadline(n), n.id))
    return min(candidates, key=policy.key)


def spy_on_order(pc):
    """Assert that every move down a tier and every eviction takes the first candidate of its tier in
    the policy's order (see `expected_victim`), and, under the "lru" policy with KV only, the least
    recently used one."""
    storage = pc._storage
    move, evict = storage.move, storage.evict
    plain_lru = not pc.recurrent_layers and pc.policy.name == "lru"

    def first(candidates, what):
        keys = storage.pager._keys
        stale = [(n, k) for n in candidates if (k := keys.get(n.id)) and k[1][:-1] != pc.policy.key(n)]
        assert not stale, f"{what}: order keys out of date: {[(n, k[1], pc.policy.key(n)) for n, k in stale]}"
        late = [n for n in candidates if (k := keys.get(n.id)) and k[4] is not None and k[4][0] != pc.policy.deadline(n)]
        assert not late, f"{what}: deadlines out of date: {late}"
        best = expected_victim(pc, candidates)
        if plain_lru:
            assert best is min(candidates, key=lru_key), f"{what}: plain LRU must take the least recently used"
        return best

    def checked_move(node, tier):
        src = node.payload.tier
        if tier != DEVICE:  # moving down (promotion on restore is the request's own choice)
            candidates = [n for n in nodes_of(pc) if n.payload.tier == src and not n.pins]
            if not storage.pager.over(src):
                # not over its own budget: the last tier is over with nothing it can evict (its
                # nodes wait for children above), so a leaf comes down first, where it can go
                leaves = [n for n in candidates if n.is_leaf]
                candidates = leaves or candidates
            assert node is first(candidates, "move"), f"a move off {src} must take the first unpinned node in order"
        move(node, tier)

    def checked_evict(node):
        tier = node.payload.tier
        candidates = [  # a pinned node may lose a speculative snapshot, nothing else
            n for n in nodes_of(pc)
            if n.payload.tier == tier and (
                (not n.pins and (n.is_leaf or (tier != DISK and n.payload.has_snapshot)))
                or (n.pins and tier != DISK and pc.policy.speculative(n))
            )
        ]
        assert node is first(candidates, "evict"), f"eviction must take the first evictable node of {tier}"
        evict(node)

    storage.move, storage.evict = checked_move, checked_evict


budgets = st.sampled_from([None, 0, 1, 200, 700, 3000, 20000])


class PagingMachine(RuleBasedStateMachine):
    """Random requests under random budgets (tiny ones included), KV-only and hybrid layouts."""

    @initialize(
        kinds=st.sampled_from(["KK", "KR", "RKR"]),
        device=budgets,
        host=budgets,
        promote=st.booleans(),
    )
    def setup(self, kinds, device, host, promote):
        self.model = FakeModel(kinds=kinds, heads=1, dim=4)
        self.pc = PrefixCache(
            self.model.make_cache, device_bytes=device, host_bytes=host, promote_on_restore=promote, snapshot_interval=5
        )
        spy_on_order(self.pc)
        self.stored: list[list[int]] = []
        self.open: list = []

    @rule(data=st.data(), keep_open=st.booleans())
    def request(self, data, keep_open):
        tokens = draw_tokens(data, self.stored)
        s = self.pc.begin(tokens)
        best = max((lcp(tokens, t) for t in self.stored), default=0)
        assert s.cached <= min(best, len(tokens) - 1)
        assert_cold(self.model, s.caches, tokens, s.cached)  # whichever tier it came from
        prefill_and_commit(self.model, s, tokens)
        self.stored.append(tokens)
        if keep_open and len(self.open) < 2:
            self.open.append(s)
        else:
            s.close()

    @precondition(lambda self: self.open)
    @rule()
    def close_oldest(self):
        self.open.pop(0).close()

    @invariant()
    def invariants_hold(self):
        if not hasattr(self, "pc"):
            return
        check_invariants(self.pc, self.open, self.model)
        check_tiers_and_budgets(self.pc, strict=not self.open)

    def teardown(self):
        for s in getattr(self, "open", []):
            s.close()
        if hasattr(self, "pc"):
            check_tiers_and_budgets(self.pc, strict=True)


TestPagingMachine = PagingMachine.TestCase
TestPagingMachine.settings = settings(max_examples=120, stateful_step_count=12)


def test_everything_paged_out_restores_bit_identically_in_bfloat16():
    model = FakeModel(layers=1, heads=2, dim=8, dtype=mx.bfloat16)  # one layer: bf16 rounds the hash
    hot = PrefixCache(model.make_cache)
    cold = PrefixCache(model.make_cache, device_bytes=0)
    rng = np.random.default_rng(3)
    seqs = [rng.integers(0, 5, int(n)).tolist() for n in rng.integers(3, 60, 10)]
    for tokens in seqs:
        for pc in (hot, cold):
            with pc.begin(tokens) as s:
                model(tokens[s.cached :], s.caches)
                s.commit(tokens)
    assert cold.stats()["device_bytes"] == 0 and cold.stats()["host_bytes"] == hot.stats()["device_bytes"]
    for tokens in seqs:
        with hot.begin(tokens) as a, cold.begin(tokens) as b:
            assert a.cached == b.cached == len(tokens) - 1
            for x, y in zip(a.caches, b.caches):
                assert x.keys.dtype == y.keys.dtype == mx.bfloat16
                assert mx.array_equal(x.state[0], y.state[0]) and mx.array_equal(x.state[1], y.state[1])
    assert cold.stats()["cached_tokens_host"] > 0 and cold.stats()["host_restores"] > 0


def test_pinned_path_stays_put_and_the_budget_returns_when_it_closes():
    model = FakeModel(layers=2, heads=2, dim=4)
    pc = PrefixCache(model.make_cache, device_bytes=0, host_bytes=0)
    tokens = list(range(40))
    with pc.begin(tokens) as s:
        model(tokens, s.caches)
        s.commit(tokens)
        # the session's own path exceeds both budgets: it stays on device while pinned
        assert pc.stats()["device_bytes"] > 0 and pc.stats()["evictions"] == 0
        with pc.begin(tokens + [99]) as s2:
            assert s2.cached == 40
    stats = pc.stats()
    assert stats["device_bytes"] == 0 and stats["host_bytes"] == 0 and stats["evictions"] >= 1
    assert stats["nodes"] == 0


def test_eviction_goes_leaf_first_and_merges_a_lone_child():
    model = FakeModel(layers=1, heads=1, dim=4)
    per_token = 2 * 4 * 4
    pc = PrefixCache(model.make_cache, device_bytes=0, host_bytes=None)
    shared = list(range(10))
    serve(pc, model, shared + [50, 51])
    serve(pc, model, shared + [60, 61])
    assert pc.stats()["nodes"] == 3 and pc.stats()["host_bytes"] == 14 * per_token
    pc.set_budgets(host_bytes=12 * per_token)  # room for one branch only
    stats = pc.stats()
    assert stats["evictions"] == 1 and stats["evicted_tokens"] == 2
    # neither branch was used again, so the newer one is worth no more than the older: it went (a
    # new sequence is admitted only over what is worth less); the shared prefix merged into the other
    assert stats["nodes"] == 1 and stats["tokens_stored"] == 12
    assert serve(pc, model, shared + [50, 51, 7]) == 12
    assert serve(pc, model, shared + [60, 61, 7]) == 10


def test_plain_lru_policy_evicts_the_least_recently_used_branch():
    model = FakeModel(layers=1, heads=1, dim=4)
    per_token = 2 * 4 * 4
    pc = PrefixCache(model.make_cache, device_bytes=0, host_bytes=None, policy="lru")
    shared = list(range(10))
    serve(pc, model, shared + [50, 51])
    serve(pc, model, shared + [60, 61])
    pc.set_budgets(host_bytes=12 * per_token)
    assert pc.stats()["evicted_tokens"] == 2
    assert serve(pc, model, shared + [60, 61, 7]) == 12
    assert serve(pc, model, shared + [50, 51, 7]) == 10


def test_interior_node_drops_its_snapshot_before_its_kv():
    model = FakeModel(kinds="KR", heads=1, dim=4)
    pc = PrefixCache(model.make_cache, device_bytes=0, snapshot_interval=None, policy="lru")
    shared = list(range(8))
    for tail in ([20, 21], [30, 31], [40, 41]):
        tokens = shared + tail
        with pc.begin(tokens, capture_hints=[8]) as s:
            model(tokens[s.cached : 8], s.caches) if s.cached < 8 else None
            if s.cached < 8:
                s.capture()
            model(tokens[max(s.cached, 8) :], s.caches)
            s.commit(tokens)
    interior = [n for n in nodes_of(pc) if n.end == 8][0]
    assert interior.payload.has_snapshot and len(interior.children) == 3
    leaves_before = sum(1 for n in nodes_of(pc) if n.is_leaf)
    interior.last_used = -1  # make it the least recently used evictable node
    pc._storage.reindex(interior)
    pc.set_budgets(host_bytes=pc.stats()["host_bytes"] - 1)
    assert not interior.payload.has_snapshot and interior.payload.layers[0] is not None
    assert sum(1 for n in nodes_of(pc) if n.is_leaf) == leaves_before and pc.stats()["evictions"] == 0
    check_invariants(pc, (), model)


def test_host_pool_reuses_buffers_and_round_trips():
    pool = HostPool()
    a = mx.random.normal((1, 4, 300, 16))
    h = to_host(a, pool)
    assert np.array_equal(np.array(to_device(h)), np.array(a))
    base = h.data.base
    pool.give(h.data)
    h2 = to_host(mx.random.normal((1, 4, 290, 16)), pool)  # same size class
    assert h2.data.base is base
    assert pool.free_bytes == 0


@settings(max_examples=40, deadline=None)
@given(nbytes=st.integers(1, 3 << 20), dtype=st.sampled_from([np.uint8, np.uint16, np.float32]))
def test_pooled_buffers_sit_where_mlx_places_arrays_in_a_cache_line(nbytes, dtype):
    """A host buffer starts at MLX's offset within a cache line, new or reused, so a copy between
    the tiers never has its destination 8 bytes past its source (mod 4096: ~20x slower here)."""
    pool = HostPool()
    shape = (max(nbytes // np.dtype(dtype).itemsize, 1),)
    first = pool.take(shape, dtype)
    assert first.ctypes.data % LINE == MLX_LINE_OFFSET and first.shape == shape and first.dtype == dtype
    first[...] = 7
    pool.give(first)
    assert pool.free_bytes > 0
    again = pool.take(shape, dtype)  # the same block, placed the same way
    assert again.ctypes.data == first.ctypes.data and pool.free_bytes == 0


@pytest.mark.skipif(mx.default_device().type != mx.DeviceType.cpu, reason="MLX's CPU allocator")
def test_pooled_buffers_never_lie_8_bytes_behind_an_mlx_array():
    """MLX's arrays sit 8 bytes past a 16-byte boundary (wherever in a line the allocator put them,
    mapped block or heap), the pool's at `MLX_LINE_OFFSET`: a copy between them never has its
    destination 8 bytes past its source modulo the line, the case that copies ~20x slower."""
    pool = HostPool()
    kept = []
    for n in (64 << 10, 1 << 20, 5 << 20, 3 << 20, 300 << 10):
        a = mx.zeros((n,), mx.uint8)
        mx.eval(a)
        kept.append(a)  # (held, so the next one is a new block)
        dst = numpy_view(a).ctypes.data
        src = pool.take((n,), np.uint8).ctypes.data
        assert dst % 16 == MLX_LINE_OFFSET % 16 == 8
        assert (dst - src) % LINE != 8 and (src - dst) % LINE != 8


@pytest.mark.parametrize("value, error", [(-1, ValueError), (1.5, TypeError), ("1GB", TypeError), (True, TypeError)])
def test_bad_budgets_raise(value, error):
    with pytest.raises(error):
        PrefixCache(FakeModel().make_cache, device_bytes=value)
    with pytest.raises(error):
        PrefixCache(FakeModel().make_cache, host_bytes=value)
    pc = PrefixCache(FakeModel().make_cache, device_bytes=10)
    with pytest.raises(error):
        pc.set_budgets(host_bytes=value)
    assert pc.budgets == {"device": 10, "host": None}


def test_four_threads_hammering_keep_every_invariant():
    model = FakeModel(kinds="KRK", heads=1, dim=4)
    pc = PrefixCache(model.make_cache, device_bytes=2000, host_bytes=6000, snapshot_interval=4)
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        try:
            start.wait()
            for _ in range(60):
                tokens = [rng.randrange(3) for _ in range(rng.randrange(1, 24))]
                s = pc.begin(tokens)
                assert_cold(model, s.caches, tokens, s.cached)
                if rng.random() < 0.2:
                    s.close()  # abandoned request
                    continue
                prefill_and_commit(model, s, tokens)
                s.close()
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    check_invariants(pc, (), model)
    check_tiers_and_budgets(pc, strict=True)
    assert pc.stats()["requests"] == 240 and pc.stats()["page_outs"] > 0 and pc.stats()["evictions"] > 0


def test_example_with_a_quarter_on_device_restores_as_much_as_unlimited(capsys):
    from test_example import load_example

    example = load_example()
    args = ["--conversations", "4", "--turns", "3", "--max-tokens", "8"]
    assert example.main(args) == 0
    unlimited = capsys.readouterr().out
    total = float(_grab(r"([\d.]+) MB on device", unlimited))
    assert example.main(args + ["--device-mb", f"{total / 4:.4f}", "--host-mb", f"{total:.4f}"]) == 0
    budgeted = capsys.readouterr().out
    assert _grab(r"(\d+) of \d+ prompt tokens restored", budgeted) == _grab(r"(\d+) of \d+ prompt tokens restored", unlimited)
    peak = float(_grab(r"peak ([\d.]+) MB", budgeted))
    assert peak <= total / 4 + 1e-4
    assert int(_grab(r"from host (\d+)", budgeted)) > 0


def _grab(pattern, text):
    import re

    return re.search(pattern, text).group(1)


def test_host_parent_waiting_for_device_children_does_not_stall_the_host_budget():
    model = FakeModel(layers=1, heads=1, dim=4)
    pc = PrefixCache(model.make_cache, device_bytes=0)
    serve(pc, model, list(range(10)))  # paged out to host at once
    pc.set_budgets(device_bytes=None)
    serve(pc, model, list(range(10)) + [50, 51])  # a device child under a host parent
    (parent,) = [n for n in nodes_of(pc) if n.end == 10]
    assert parent.payload.tier == HOST and parent.children and all(c.payload.tier == DEVICE for c in parent.children.values())
    pc.set_budgets(host_bytes=0)
    check_tiers_and_budgets(pc, strict=True)
    assert pc.stats()["nodes"] == 0


def test_snapshot_node_whose_child_is_in_another_tier_still_gives_bytes_back():
    """An interior node with one child in another tier cannot merge; it drops its snapshot instead."""
    model = FakeModel(kinds="KR", heads=1, dim=4)
    pc = PrefixCache(model.make_cache, device_bytes=0, snapshot_interval=None, hot_sessions=0)
    base = list(range(10))
    serve(pc, model, base)  # snapshot at 10, paged out to host at once
    pc.set_budgets(device_bytes=None)
    serve(pc, model, base + [50, 51])  # a device child under the host node
    (node,) = [n for n in nodes_of(pc) if n.end == 10]
    assert node.payload.tier == HOST and node.payload.has_snapshot and len(node.children) == 1
    worker = threading.Thread(target=pc.set_budgets, kwargs={"host_bytes": 0}, daemon=True)
    worker.start()
    worker.join(timeout=20)
    assert not worker.is_alive(), "enforcing the host budget must terminate"
    check_tiers_and_budgets(pc, strict=True)
    check_invariants(pc, (), model)


@pytest.mark.parametrize("shape", [(1, 2, 5, 3), (4,), (1, 2, 0, 3)])
def test_numpy_view_of_bfloat16_is_the_same_memory(shape):
    """A bfloat16 array's numpy view (uint16, through the buffer protocol) reads and writes the
    array's own bytes: the restore writes live caches through it."""
    from kvtrie.arrays import numpy_view

    a = mx.random.normal(shape).astype(mx.bfloat16)
    mx.eval(a)
    view = numpy_view(a)
    assert view.dtype == np.uint16 and view.shape == a.shape
    assert np.array_equal(view, np.asarray(a.view(mx.uint16)))
    if view.size:
        view[...] = np.asarray(mx.ones(shape, mx.bfloat16).view(mx.uint16))
        del view
        assert mx.all(a == 1).item()
    strided = a[..., ::2] if len(shape) > 1 else a[::2]
    assert np.array_equal(numpy_view(strided), np.asarray(strided.view(mx.uint16)))
