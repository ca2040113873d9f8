"""Restores write into recycled buffers only when MLX proves nobody else holds them."""

from __future__ import annotations

import gc

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvtrie import PrefixCache
from kvtrie.arrays import numpy_view
from kvtrie.recycle import Recycler

from fakes import FakeModel, assert_cold, check_invariants


def address(a: mx.array) -> int:
    mx.eval(a)
    return numpy_view(a).ctypes.data


def addresses(caches) -> set[int]:
    return {address(a) for c in caches for a in (c.keys, c.values)}


def stored(pc: PrefixCache, model: FakeModel, tokens: list[int]) -> None:
    with pc.begin(tokens) as s:
        model(tokens[s.cached :], s.caches)
        s.commit(tokens)


@pytest.fixture
def warm():
    model = FakeModel(layers=2, heads=4, dim=64)  # 512 KiB live arrays: past stitch's small path
    pc = PrefixCache(model.make_cache, hot_sessions=0)
    base = list(range(300))
    stored(pc, model, base + [1])
    stored(pc, model, base + [2, 3])  # a path of two nodes
    yield model, pc, base
    pc.close()


def test_a_dropped_sessions_buffers_are_reused(warm):
    model, pc, base = warm
    s = pc.begin(base + [2, 3, 4])
    before = addresses(s.caches)
    s.close()
    del s
    gc.collect()
    hits = pc._recycler.hits
    with pc.begin(base + [2, 3, 5]) as t:
        assert addresses(t.caches) <= before  # the same memory, no new allocation
        assert pc._recycler.hits == hits + 4 and pc.stats()["recycle_hits"] == hits + 4
        assert_cold(model, t.caches, base + [2, 3, 5], t.cached)
        for c in t.caches:  # past the restored positions: zeros, nothing of the last session
            for a in (c.keys, c.values):
                assert a.shape[2] > t.cached and not np.asarray(a[:, :, t.cached :]).any()
        model([9, 9], t.caches)
    check_invariants(pc, (), model)


def test_caches_the_user_still_holds_are_not_taken(warm):
    model, pc, base = warm
    s = pc.begin(base + [2, 3, 4])
    kept = s.caches
    model([4], kept)
    s.commit(base + [2, 3, 4])
    s.close()
    held = addresses(kept)
    snapshot = [np.array(numpy_view(c.keys)) for c in kept]
    with pc.begin(base + [2, 3, 4, 6]) as t:
        assert not addresses(t.caches) & held
        model([6, 7, 8], t.caches)  # written in place: the held caches do not change
        mx.eval([c.keys for c in t.caches])
    for c, before in zip(kept, snapshot):
        assert np.array_equal(numpy_view(c.keys), before)
    model([5], kept)  # and the held caches go on working
    assert_cold(model, kept, base + [2, 3, 4, 5], len(base) + 4)


def test_a_buffer_shared_below_python_is_copied_not_reused(warm):
    """A slice of the old keys outlives the cache: the recycler sees no Python reference but
    MLX does, so the reclaim copies the buffer and the slice keeps its values."""
    model, pc, base = warm
    s = pc.begin(base + [2, 3, 4])
    piece = s.caches[0].keys[:, :, :8]
    mx.eval(piece)
    expected = np.array(numpy_view(piece))
    old = address(s.caches[0].keys)
    s.close()
    del s
    gc.collect()
    with pc.begin(base + [2, 3, 4]) as t:
        assert old not in addresses(t.caches)
        model([5, 6], t.caches)
        assert_cold(model, t.caches, base + [2, 3, 5, 6], len(base) + 4)
    assert np.array_equal(numpy_view(piece), expected)


@pytest.mark.parametrize("recycled", [False, True])
def test_restored_arrays_are_updated_in_place(warm, recycled):
    """The live arrays a restore hands out are MLX's to donate: the next token is written into
    them, not into a copy of the whole cache."""
    model, pc, base = warm
    pc._recycler.clear()
    if recycled:
        s = pc.begin(base + [2, 3, 4])
        s.close()
        del s
        gc.collect()
    hits = pc._recycler.hits
    with pc.begin(base + [2, 3, 4]) as t:
        assert (pc._recycler.hits > hits) == recycled
        before = [address(c.keys) for c in t.caches]
        model([4], t.caches)
        assert [address(c.keys) for c in t.caches] == before


def test_recycler_keeps_at_most_its_bytes_oldest_out_first():
    r = Recycler(max_bytes=3 * 4096, min_bytes=0)
    arrays = [mx.zeros((1024,), mx.float32) for _ in range(5)]
    mx.eval(arrays)
    r.keep(arrays[:2])
    r.keep(arrays[2:])
    assert r.kept_bytes == 3 * 4096
    del arrays
    gc.collect()
    takes = [r.take((1024,), mx.float32) for _ in range(4)]
    assert [t.recycled for t in takes] == [True, True, True, False]
    assert r.kept_bytes == 0


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([(2, 8), (4, 16), (2, 16)]), st.sampled_from([mx.float32, mx.bfloat16, mx.float16]),
                          st.booleans()), min_size=1, max_size=12))
def test_recycler_hands_out_buffers_nobody_holds(ops):
    """Whatever mix of shapes, dtypes and held arrays: a taken array is all the caller's (writing
    it changes no array anyone holds), and its shape and dtype are the ones asked for."""
    r = Recycler(max_bytes=1 << 20, min_bytes=0)
    held = []
    for (shape, dtype, hold) in ops:
        a = mx.random.normal((1, *shape)).astype(dtype)
        mx.eval(a)
        if hold:
            held.append((a, np.array(numpy_view(a))))
        r.keep([a])
        del a
        f = r.take((1, *shape), dtype)
        mx.eval(f.live)
        assert f.live.shape == (1, *shape) and f.live.dtype == dtype
        view = numpy_view(f.live)
        view[...] = 7
        del view
        for a, values in held:
            assert np.array_equal(numpy_view(a), values)


def test_small_arrays_are_left_to_mlx():
    r = Recycler(min_bytes=64 << 10)
    small, large = mx.zeros((1024,), mx.float32), mx.zeros((16 << 10,), mx.float32)
    mx.eval(small, large)
    r.keep([small, large])
    assert r.kept_bytes == large.nbytes


def test_small_restores_leave_no_buffers_behind():
    """A restore under 256 KiB lays out in numpy and never reclaims a kept buffer, so the arrays of
    closed sessions that small (64 KiB each here) go back to MLX instead of piling up in the
    recycler; arrays of the same size in larger caches are kept and reclaimed."""
    model = FakeModel(layers=1, heads=1, dim=64)  # 256 positions x 64 float32 = 64 KiB per array
    pc = PrefixCache(model.make_cache, hot_sessions=0)
    base = list(range(100))
    stored(pc, model, base + [1])
    for i in range(20):
        with pc.begin(base + [2, i]) as s:
            assert s.cached == len(base) and s.caches[0].keys.nbytes == 64 << 10
            model([2, i], s.caches)
    gc.collect()
    assert pc._recycler.kept_bytes == 0 and pc.stats()["recycle_bytes"] == 0
    check_invariants(pc, (), model)
    pc.close()
    # arrays of the same size in caches past 256 KiB in all are kept, and the next restores take them
    model = FakeModel(layers=2, heads=1, dim=64)
    pc = PrefixCache(model.make_cache, hot_sessions=0)
    stored(pc, model, base + [1])
    for i in range(5):
        with pc.begin(base + [2, i]) as s:
            assert s.caches[0].keys.nbytes == 64 << 10
            model([2, i], s.caches)
    assert pc._recycler.hits >= 4 * 4
    pc.close()


def test_recycle_bytes_is_checked():
    model = FakeModel()
    with pytest.raises(ValueError):
        PrefixCache(model.make_cache, recycle_bytes=-1)
    with pytest.raises(TypeError):
        PrefixCache(model.make_cache, recycle_bytes="1G")
    with pytest.raises(TypeError):
        PrefixCache(model.make_cache, mlx_cache_bytes=1.5)
    PrefixCache(model.make_cache, recycle_bytes=None)  # (automatic: what the device budget leaves)


def test_small_restores_are_evaluated_and_updated_in_place():
    """Below 256 KiB a restore lays the arrays out in numpy and hands MLX a copy (no graph run)."""
    model = FakeModel(layers=2, heads=2, dim=8)
    pc = PrefixCache(model.make_cache, hot_sessions=0)
    stored(pc, model, list(range(40)))
    hits = pc._recycler.hits
    with pc.begin(list(range(40)) + [1]) as s:
        assert pc._recycler.hits == hits
        before = [address(c.keys) for c in s.caches]
        assert_cold(model, s.caches, list(range(40)), s.cached)
        model([1], s.caches)
        assert [address(c.keys) for c in s.caches] == before
        assert_cold(model, s.caches, list(range(40)) + [1], 41)


def test_no_recycling_when_turned_off():
    model = FakeModel(layers=2, heads=4, dim=64)
    pc = PrefixCache(model.make_cache, hot_sessions=0, recycle_bytes=0)
    tokens = list(range(50))
    stored(pc, model, tokens)
    for _ in range(3):
        with pc.begin(tokens + [1]) as s:
            assert_cold(model, s.caches, tokens + [1], s.cached)
    assert pc._recycler.hits == 0 and pc._recycler.kept_bytes == 0


def test_the_next_turn_reuses_the_last_turns_larger_buffers():
    """A chat turn ends with caches grown past the restore's capacity; the next turn's restore
    takes those buffers (a little more room than it asked for) instead of zero-filling new ones."""
    model = FakeModel(layers=2, heads=4, dim=64)
    pc = PrefixCache(model.make_cache, hot_sessions=0)
    base = list(range(300))
    stored(pc, model, base)
    turn = base + [5] * 200
    s = pc.begin(turn)
    model(turn[s.cached :], s.caches)
    s.commit(turn)
    model([6] * 20, s.caches)  # the reply: the live caches grow by one step, past 512 positions
    grown = {c.keys.shape[2] for c in s.caches}
    before = addresses(s.caches)
    s.close()
    del s
    gc.collect()
    (room,) = grown
    assert 512 < room <= 512 + 256
    hits = pc._recycler.hits
    with pc.begin(turn + [7]) as t:
        assert t.cached == len(turn) and {c.keys.shape[2] for c in t.caches} == {room}  # asked for 512
        assert pc._recycler.hits == hits + 4 and addresses(t.caches) <= before
        assert_cold(model, t.caches, turn, t.cached)
        model([7, 8], t.caches)
        assert_cold(model, t.caches, turn + [7, 8], t.cached + 2)
    check_invariants(pc, (), model)
