"""The ledger: every byte kvtrie holds is counted, and the budgets bound all of it.

Payloads per tier, hot sessions' live caches, recycled arrays, the free host pool and copies in
flight are all held bytes; after every public call the device and host budgets bound what is
held there (only the paths of open sessions may stay past them, until they close). MLX's own
count of its memory agrees with the ledger.
"""

from __future__ import annotations

import gc

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from kvtrie import PrefixCache
from kvtrie.heap import trim_heap
from kvtrie.ledger import HOLDERS, Ledger

from fakes import FakeModel, assert_cold, check_invariants, prefill_and_commit

DEVICE, HOST = "device", "host"
KIB = 1024


def pinned_bytes(pc, tier: str) -> int:
    return sum(n.payload.nbytes for _, n, _ in pc.walk() if n.pins and n.payload.tier == tier)


def check_ledger(pc, strict: bool) -> None:
    """The ledger's sums are exact and the held bytes are within the budgets (past them only by
    the open sessions' pinned paths)."""
    stats = pc.stats()
    held = stats["held_by_tier"]
    assert set(held[DEVICE]) == set(HOLDERS)
    assert held[DEVICE]["payload"] == stats["device_bytes"] and held[HOST]["payload"] == stats["host_bytes"]
    assert held[DEVICE]["recycled"] == pc._recycler.kept_bytes == stats["recycle_bytes"]
    assert held[HOST]["pool"] == pc._storage.pool.free_bytes
    hot = sum(a.nbytes for _, _, caches, _ in pc._hot for a in pc._buffers(caches))
    assert held[DEVICE]["hot"] == hot
    assert stats["held_device_bytes"] == sum(held[DEVICE].values())
    assert stats["held_host_bytes"] == sum(held[HOST].values())
    assert stats["held_bytes"] == stats["held_device_bytes"] + stats["held_host_bytes"]
    for tier in (DEVICE, HOST):
        budget = pc.budgets[tier]
        if budget is None:
            continue
        over = stats[f"held_{tier}_bytes"] - budget
        if strict:
            assert over <= 0, f"{tier}: {stats[f'held_{tier}_bytes']} B held, budget {budget}: {held[tier]}"
        else:
            assert over <= pinned_bytes(pc, tier), f"{tier} past its budget by more than the open sessions' paths"


budgets = st.sampled_from([None, 0, 300 * KIB, 1024 * KIB, 3072 * KIB])


def draw_request(data, stored: list[list[int]]) -> list[int]:
    """A request of up to ~500 tokens (2 KiB of KV each here): a stored sequence cut anywhere plus a
    new tail, or a fresh one (tokens from a drawn seed: long sequences without long draws)."""
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    how = data.draw(st.sampled_from(["fresh", "branch", "continue"]), label="how") if stored else "fresh"
    if how == "branch":
        base = data.draw(st.sampled_from(stored), label="base")
        head = base[: data.draw(st.integers(0, len(base)), label="cut")]
    else:  # (continuing the last sequence takes a hot session's caches)
        head = stored[-1] if how == "continue" else []
    tail = rng.integers(0, 4, data.draw(st.integers(1, 300), label="new tokens")).tolist()
    return head + tail


class LedgerMachine(RuleBasedStateMachine):
    """Requests large enough to recycle (128 KiB live arrays), hot sessions, paging, budgets that
    change, and callers that keep a closed session's caches for a while."""

    @initialize(
        device=budgets,
        host=budgets,
        hot=st.integers(0, 2),
        recycle=st.sampled_from([None, 0, 512 * KIB]),
    )
    def setup(self, device, host, hot, recycle):
        self.model = FakeModel(layers=2, heads=2, dim=64)  # 512 B per position per array
        self.pc = PrefixCache(
            self.model.make_cache, device_bytes=device, host_bytes=host, hot_sessions=hot, recycle_bytes=recycle
        )
        self.stored: list[list[int]] = []
        self.open: list = []
        self.kept: list = []  # caches a caller still holds after closing

    @rule(data=st.data(), keep_open=st.booleans(), hold=st.booleans())
    def request(self, data, keep_open, hold):
        tokens = draw_request(data, self.stored)
        s = self.pc.begin(tokens)
        assert_cold(self.model, s.caches, tokens, s.cached)
        prefill_and_commit(self.model, s, tokens)
        self.stored.append(tokens)
        if keep_open and len(self.open) < 2:
            self.open.append(s)
            return
        caches = s.caches
        s.close()
        if hold:
            self.kept.append(caches)

    @precondition(lambda self: self.open)
    @rule()
    def close_oldest(self):
        self.open.pop(0).close()

    @precondition(lambda self: self.kept)
    @rule()
    def caller_lets_go(self):
        self.kept.pop(0)

    @rule(device=budgets, host=budgets)
    def new_budgets(self, device, host):
        self.pc.set_budgets(device_bytes=device, host_bytes=host)

    @invariant()
    def within_budgets(self):
        if hasattr(self, "pc"):
            check_ledger(self.pc, strict=not self.open)
            check_invariants(self.pc, self.open, self.model)

    def teardown(self):
        for s in getattr(self, "open", []):
            s.close()
        if hasattr(self, "pc"):
            check_ledger(self.pc, strict=True)


TestLedgerMachine = LedgerMachine.TestCase
TestLedgerMachine.settings = settings(max_examples=40, stateful_step_count=10, deadline=None)


def test_mlx_active_memory_is_what_the_ledger_holds():
    """After sessions close and MLX's buffer cache is cleared, MLX's active memory is within 10% of
    the ledger's device bytes: nothing kvtrie keeps on the device is left out of its count."""
    gc.collect()
    mx.clear_cache()
    base = mx.get_active_memory()
    model = FakeModel(layers=2, heads=4, dim=64)
    pc = PrefixCache(model.make_cache, hot_sessions=2)
    rng = np.random.default_rng(0)
    stored = []
    for i in range(40):
        if stored and rng.random() < 0.6:  # continue or branch off an earlier sequence
            base_seq = stored[int(rng.integers(len(stored)))]
            tokens = base_seq[: int(rng.integers(1, len(base_seq) + 1))] + rng.integers(0, 50, int(rng.integers(1, 200))).tolist()
        else:
            tokens = rng.integers(0, 50, int(rng.integers(50, 700))).tolist()
        with pc.begin(tokens) as s:
            prefill_and_commit(model, s, tokens)
        stored.append(tokens)
    gc.collect()
    mx.clear_cache()
    stats = pc.stats()
    assert stats["held"]["hot"] > 0 and stats["held"]["recycled"] > 0  # both in play
    active = mx.get_active_memory() - base
    assert abs(active - stats["held_device_bytes"]) <= 0.1 * stats["held_device_bytes"], (active, stats["held_by_tier"])


def test_pressure_takes_the_cheapest_first():
    """Over the device budget, recycled arrays and hot sessions go before any payload moves."""
    model = FakeModel(layers=2, heads=2, dim=64)
    pc = PrefixCache(model.make_cache, hot_sessions=1)
    for first in (1, 2):
        tokens = [first] + list(range(300))
        with pc.begin(tokens) as s:
            prefill_and_commit(model, s, tokens)
    stats = pc.stats()
    assert stats["held"]["hot"] > 0 and stats["held"]["recycled"] > 0
    payload = stats["device_bytes"]
    pc.set_budgets(device_bytes=payload + stats["held"]["hot"])  # room for the payloads and one hot session
    stats = pc.stats()
    assert stats["held"]["recycled"] == 0 and stats["held"]["hot"] > 0 and stats["device_bytes"] == payload
    pc.set_budgets(device_bytes=payload)  # the hot session goes next, still no payload moves
    stats = pc.stats()
    assert stats["held"]["hot"] == 0 and stats["device_bytes"] == payload and stats["page_outs"] == 0
    pc.set_budgets(device_bytes=payload - 1)  # now a payload has to move
    assert pc.stats()["page_outs"] >= 1


def test_pool_keeps_free_buffers_only_within_the_host_budget():
    model = FakeModel(layers=2, heads=2, dim=64)
    pc = PrefixCache(model.make_cache, device_bytes=0, host_bytes=None)
    for first in range(4):
        tokens = [first] + list(range(200))
        with pc.begin(tokens) as s:
            prefill_and_commit(model, s, tokens)
    host = pc.stats()["host_bytes"]
    pc.set_budgets(host_bytes=host // 2)  # evicts half: their buffers may not stay as free pool
    stats = pc.stats()
    assert stats["held_host_bytes"] <= host // 2
    assert stats["held"]["pool"] <= host // 2 - stats["host_bytes"]


def test_disk_copies_in_flight_are_held_until_written(tmp_path):
    model = FakeModel(layers=2, heads=2, dim=64)
    pc = PrefixCache(model.make_cache, disk_dir=str(tmp_path), fingerprint="ledger-test", persist_seconds=None)
    tokens = list(range(300))
    with pc.begin(tokens) as s:
        prefill_and_commit(model, s, tokens)
    pc.persist(wait=True)
    assert pc.stats()["held"]["in_flight"] == 0
    pc._storage.disk.store._jobs.put  # the writer is idle; queue one more record and read the ledger at once
    more = tokens + list(range(300, 500))
    with pc.begin(more) as s:
        prefill_and_commit(model, s, more)
    with pc._lock:
        queued = pc._storage.disk.persist()
        in_flight = pc._ledger.pushed("in_flight", HOST)
    assert queued == 1 and in_flight > 0  # copies for the writer, counted until drained
    pc.persist(wait=True)
    assert pc.stats()["held"]["in_flight"] == 0
    pc.close()


def test_ledger_checks_holder_names_and_trims_the_heap():
    ledger = Ledger({DEVICE: 100, HOST: None, "disk": None})
    with pytest.raises(ValueError):
        ledger.register("payload", DEVICE, lambda: 0)
    with pytest.raises(ValueError):
        ledger.register("whatever", DEVICE, lambda: 0)
    kept = [60]

    def release(excess: int) -> int:
        freed = min(kept[0], excess)
        kept[0] -= freed
        return freed

    ledger.register("recycled", DEVICE, lambda: kept[0], release)
    ledger.payload[DEVICE] = 70
    assert ledger.held(DEVICE) == 130 and ledger.over(DEVICE) == 30 and ledger.room(DEVICE, "recycled") == 30
    assert ledger.reclaim(DEVICE) == 30 and kept[0] == 30 and ledger.over(DEVICE) == 0
    assert ledger.room(HOST, "pool") is None
    trim_heap()  # glibc's malloc_trim where there is one; harmless elsewhere
