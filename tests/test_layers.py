"""Layer rules: sliding windows with holes, concatenating caches, caches that count no positions,
registered cache types, and the window geometry itself."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("mlx_lm")

from mlx_lm.models.cache import ConcatenateKVCache, RotatingKVCache, make_prompt_cache  # noqa: E402

from kvtrie import CacheMismatchError, PrefixCache  # noqa: E402
from kvtrie.layers import KV, STATE, WINDOW, register_cache_type, rule_for  # noqa: E402
from kvtrie.window import ChunkWindow, RotatingWindow, restorable, restorable_max  # noqa: E402

import mlx_lm_families  # noqa: E402
from test_mlx_lm import tiny  # noqa: E402
from tolerance import ATOL  # noqa: E402


def logits_after(model, caches, tokens):
    return np.array(model(mx.array(tokens)[None], cache=caches)[0, -1])


def test_a_window_stored_from_a_foreign_cache_restores_only_where_it_is_whole():
    """A cache kvtrie did not hand out keeps only its last window: the positions before are
    holes, and a restore never lands where the window would reach into one."""
    model = tiny("llama")
    make = lambda: [RotatingKVCache(max_size=16) for _ in model.layers]  # noqa: E731
    pc = PrefixCache(make)
    tokens = list(range(1, 61))
    foreign = make()
    mx.eval(model(mx.array(tokens[:40])[None], cache=foreign))
    for t in tokens[40:]:  # decode: the window scrolls, the buffer keeps 16 positions
        mx.eval(model(mx.array([[t]]), cache=foreign))
    pc.store(tokens, foreign)
    holes = [(n.start, n.end) for _, n, _ in pc.walk() if n.payload.layers[0] is None]
    assert holes == [(0, 44)]  # what scrolled out; [44, 60) is held
    for cut, expected in ((30, 0), (50, 0), (59, 59)):
        full = tokens[:cut] + [99]
        with pc.begin(full) as s:
            assert s.cached == expected
            warm = logits_after(model, s.caches, full[s.cached :])
        np.testing.assert_allclose(warm, logits_after(model, make(), full), atol=ATOL)
    # a session's own caches record everything: the next request fills nothing in, but all it adds is whole
    longer = tokens + list(range(100, 140))
    with pc.begin(longer) as s:
        assert s.cached == 60
        mx.eval(model(mx.array(longer[60:])[None], cache=s.caches))
        s.commit(longer)
    with pc.begin(longer[:80] + [7]) as s:
        assert s.cached == 80
        warm = logits_after(model, s.caches, [7])
    np.testing.assert_allclose(warm, logits_after(model, make(), longer[:80] + [7]), atol=ATOL)


def test_concatenating_caches_restore_exactly_their_length():
    model = tiny("llama")
    make = lambda: [ConcatenateKVCache() for _ in model.layers]  # noqa: E731
    pc = PrefixCache(make)
    tokens = list(range(1, 50))
    with pc.begin(tokens) as s:
        mx.eval(model(mx.array(tokens)[None], cache=s.caches))
        s.commit(tokens)
    with pc.begin(tokens[:20] + [5, 6]) as s:
        assert s.cached == 20 and s.caches[0].keys.shape[2] == 20  # no room: it concatenates
        warm = logits_after(model, s.caches, [5, 6])
    np.testing.assert_allclose(warm, logits_after(model, make(), tokens[:20] + [5, 6]), atol=ATOL)


def test_caches_that_count_no_positions_are_told_where_they_are():
    model = mlx_lm_families.build("mamba")
    pc = PrefixCache(lambda: make_prompt_cache(model))
    assert set(pc.layer_kinds) == {STATE}
    tokens = list(range(1, 30))
    with pc.begin(tokens, capture_hints=[10]) as s:
        mx.eval(model(mx.array(tokens[:10])[None], cache=s.caches))
        with pytest.raises(ValueError, match="offset"):
            s.capture()  # nothing counts positions: the caller must say
        with pytest.raises(TypeError):
            s.capture("10")
        assert s.capture(10) == 10
        mx.eval(model(mx.array(tokens[10:])[None], cache=s.caches))
        s.commit(tokens)  # positions are the caller's count: len(tokens)
    with pc.begin(tokens[:10] + [3, 4]) as s:
        assert s.cached == 10
        warm = logits_after(model, s.caches, [3, 4])
    np.testing.assert_allclose(warm, logits_after(model, make_prompt_cache(model), tokens[:10] + [3, 4]), atol=ATOL)


def test_capture_at_the_wrong_offset_is_refused():
    model = tiny("qwen3_next")
    pc = PrefixCache(lambda: make_prompt_cache(model))
    tokens = list(range(1, 20))
    with pc.begin(tokens) as s:
        mx.eval(model(mx.array(tokens[:5])[None], cache=s.caches))
        with pytest.raises(CacheMismatchError):
            s.capture(6)


def test_unknown_types_can_be_registered_as_whole_states():
    class Odd:
        def __init__(self):
            self.offset = 0
            self.memory = None

    with pytest.raises(TypeError, match="register_cache_type"):
        rule_for(Odd())
    with pytest.raises(ValueError):
        register_cache_type(Odd, kind="kv")
    register_cache_type(Odd)
    assert rule_for(Odd()).kind == STATE
    assert rule_for(RotatingKVCache(max_size=4)).kind == WINDOW and rule_for(ConcatenateKVCache()).kind == KV


@settings(max_examples=60)
@given(keep=st.integers(0, 4), size=st.integers(5, 20), limit=st.integers(0, 80),
       holes=st.lists(st.tuples(st.integers(0, 80), st.integers(1, 20)), max_size=3))
def test_restorable_max_is_the_largest_position_whose_window_avoids_every_hole(keep, size, limit, holes):
    holes = sorted((a, a + n) for a, n in holes)
    for geometry in (RotatingWindow(keep, size), ChunkWindow(size)):
        best = max(p for p in range(limit + 1) if restorable(geometry, p, holes))
        assert restorable_max(geometry, limit, holes) == best


def test_the_rotating_layout_is_what_the_next_update_expects():
    w = RotatingWindow(keep=2, max_size=8)
    assert w.needed(5) == [(0, 5)] and w.layout(5) == [(0, 5)]
    assert w.needed(20) == [(0, 2), (15, 20)]
    assert w.layout(20) == [(0, 2), None, (15, 20)]  # sink, the slot the next token overwrites, tail
    assert ChunkWindow(8).needed(20) == [(16, 20)] and ChunkWindow(8).needed(16) == []
