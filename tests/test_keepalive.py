"""Cache breakpoints kept for their TTL (kvtrie.keepalive) on a real PrefixCache under a budget."""

from __future__ import annotations

import pytest

from kvtrie import PrefixCache
from kvtrie.keepalive import KeepAlive

from fakes import FakeModel

TOKEN_BYTES = 2 * 2 * 4 * 4 * 2  # keys + values, 2 heads x 4 dims, float32, 2 layers


def store(pc: PrefixCache, model: FakeModel, ka: KeepAlive, tokens: list[int]) -> None:
    caches = model.make_cache()
    model(tokens, caches)
    pc.store(tokens, caches, then=lambda: ka.stored(pc, tokens))


def seq(label: int, n: int = 20) -> list[int]:
    return [label] + [(label * 7 + i) % 50 + 100 for i in range(n - 1)]


@pytest.fixture
def setup():
    model = FakeModel(heads=2, dim=4)
    pc = PrefixCache(model.make_cache, device_bytes=int(2.4 * 20 * TOKEN_BYTES), host_bytes=0)
    return model, pc, KeepAlive()


@pytest.mark.parametrize("noted", [True, False])
def test_a_breakpoint_prefix_outlives_traffic_that_evicts_everything_else(noted):
    model = FakeModel(heads=2, dim=4)
    pc, ka = PrefixCache(model.make_cache, device_bytes=int(2.4 * 20 * TOKEN_BYTES), host_bytes=0, policy="lru"), KeepAlive()
    a = seq(1)
    if noted:
        ka.note(a + [7, 8], [20], ["5m"])  # the breakpoint ends the stored part of a longer prompt
    store(pc, model, ka, a)
    assert ka.stats()["breakpoints_kept"] == pc.stats()["pins"] == int(noted)
    for label in range(2, 8):
        store(pc, model, ka, seq(label))
    assert (pc.lookup(a) == 20) == noted  # kept with its breakpoint, least recently used without
    assert sum(pc.lookup(seq(label)) == 20 for label in range(2, 8)) == (1 if noted else 2)
    assert pc.stats()["held_device_bytes"] <= int(2.4 * 20 * TOKEN_BYTES)


def test_newer_breakpoints_push_out_the_soonest_expiring_and_one_too_big_changes_nothing(setup):
    model, pc, ka = setup
    a, e, f = seq(1), seq(2), seq(3)
    ka.note(a, [20], ["5m"])
    ka.note(e, [20], ["1h"])
    ka.note(f, [20], ["5m"])
    for s in (a, e, f):
        store(pc, model, ka, s)
    st = ka.stats()
    assert st["breakpoints_kept"] == 3 and st["breakpoints_given_way"] == 1 and st["breakpoints_held"] == 2
    assert pc.lookup(e) == 20 and pc.lookup(f) == 20  # the 1h one and the newest stay; `a` gave way
    big = seq(4, 60)  # 60 tokens: more than the whole budget
    ka.note(big, [60], ["5m"])
    store(pc, model, ka, big)
    st = ka.stats()
    assert st["breakpoints_unkept"] == 1 and st["breakpoints_held"] == 2  # the others were given back
    assert pc.lookup(e) == 20 and pc.lookup(f) == 20
    assert pc.stats()["held_device_bytes"] <= int(2.4 * 20 * TOKEN_BYTES)


def test_breakpoints_wait_for_their_prefix_and_other_prompts_are_left_alone(setup):
    model, pc, ka = setup
    prompt = seq(5, 30)
    ka.note(prompt, [10, 30], ["5m", "1h"])
    store(pc, model, ka, prompt[:10])  # a segment end: only the first breakpoint is covered
    assert ka.stats()["breakpoints_kept"] == 1
    store(pc, model, ka, seq(6))  # another prompt: nothing noted for it
    assert ka.stats()["breakpoints_kept"] == 1
    store(pc, model, ka, prompt)
    assert ka.stats()["breakpoints_kept"] == 2 and pc.lookup(prompt) == 30
    with pytest.raises(KeyError):
        ka.note(prompt, [5], ["2h"])
