"""Fair shares (`PrefixCache(tenant_bytes=...)`): while memory is over its budget, a tenant past
its share loses its own payloads first, so one tenant's burst cannot flush another's cache;
shares are not reservations (a tenant alone may use all of memory)."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from kvtrie import PrefixCache

from fakes import FakeModel, assert_cold, check_invariants, prefill_and_commit

MODEL = FakeModel(heads=1, dim=4)
TOKEN_BYTES = 64  # 2 layers x (K + V) x 1 head x 4 dims x float32


def serve(pc: PrefixCache, tokens: list[int], namespace: str) -> int:
    with pc.begin(tokens, namespace=namespace) as s:
        assert_cold(MODEL, s.caches, tokens, s.cached)
        prefill_and_commit(MODEL, s, tokens)
        return s.cached


def sequence(tenant: int, i: int, n: int = 40) -> list[int]:
    return [1000 * tenant + i] + [tenant * 7 + i % 5 + 1] * (n - 1)


@pytest.mark.parametrize("policy", ["worth", "lru"])
@pytest.mark.parametrize("host", [0, 40 * 20 * TOKEN_BYTES])
def test_a_burst_of_one_tenant_does_not_flush_another(policy, host):
    budget = 40 * 20 * TOKEN_BYTES  # twenty 40-token sequences in each memory tier
    common = dict(device_bytes=budget, host_bytes=host, policy=policy, hot_sessions=0)
    kept = {}
    for shares in (None, (budget + host) // 2):
        pc = PrefixCache(MODEL.make_cache, tenant_bytes=shares, **common)
        alice = [sequence(1, i) for i in range(8)]  # well within half of memory
        for s in alice:
            serve(pc, s, "alice")
        for i in range(150):  # bob's burst: a working set of 1.5x memory, in rounds
            serve(pc, sequence(2, i % 30 if host == 0 else i % 60), "bob/salt:x" if i % 2 else "bob")
        check_invariants(pc)
        assert pc.stats()["held_bytes"] <= budget + host
        kept[shares] = sum(pc.lookup(s, namespace="alice") for s in alice)
        if shares is not None:
            assert kept[shares] == sum(len(s) for s in alice)  # every one of alice's sequences, whole
            held = pc.stats()["tenants"]
            assert held["alice"]["device_bytes"] + held["alice"]["host_bytes"] == 8 * 40 * TOKEN_BYTES
            assert held["bob"]["device_bytes"] + held["bob"]["host_bytes"] <= budget + host - 8 * 40 * TOKEN_BYTES
        pc.close()
    if policy == "lru":  # (the worth policy's admission already keeps alice's here; shares make it a promise)
        assert kept[None] < kept[(budget + host) // 2]  # without shares the burst flushed alice's cache


def test_a_share_is_not_a_reservation():
    budget = 40 * 20 * TOKEN_BYTES
    pc = PrefixCache(MODEL.make_cache, device_bytes=budget, host_bytes=0, tenant_bytes={"*": budget // 4}, hot_sessions=0)
    seqs = [sequence(1, i) for i in range(18)]
    for s in seqs:
        serve(pc, s, "alice")
    assert sum(pc.lookup(s, namespace="alice") for s in seqs) == 18 * 40  # alone, alice uses what nobody else needs
    pc.close()


def test_per_tenant_shares_and_the_default():
    budget = 40 * 20 * TOKEN_BYTES
    pc = PrefixCache(MODEL.make_cache, device_bytes=budget, host_bytes=0, hot_sessions=0,
                     tenant_bytes={"vip": budget * 3 // 4, "*": budget // 8})
    vip = [sequence(1, i) for i in range(14)]  # 70% of memory: within the vip share
    for s in vip:
        serve(pc, s, "vip")
    for i in range(100):
        serve(pc, sequence(2, i), "someone")
        serve(pc, sequence(3, i), "another")
    assert sum(pc.lookup(s, namespace="vip") for s in vip) == 14 * 40
    held = pc.stats()["tenants"]
    for t in ("someone", "another"):
        assert held[t]["device_bytes"] <= budget // 8 + 40 * TOKEN_BYTES
    pc.close()


@pytest.mark.parametrize("bad, error", [
    (-1, ValueError), (1.5, TypeError), (True, TypeError), ("1G", TypeError),
    ({"a": -5}, ValueError), ({3: 100}, TypeError), ({"a": None}, TypeError),
])
def test_bad_shares_are_refused_before_anything_is_built(bad, error):
    with pytest.raises(error, match="tenant_bytes"):
        PrefixCache(MODEL.make_cache, device_bytes=1 << 20, tenant_bytes=bad)


def test_shares_hold_for_disk_loaded_nodes(tmp_path):
    """Nodes rebuilt from the disk tier after a restart count for their tenant as they fault in."""
    budget = 40 * 20 * TOKEN_BYTES
    kw = dict(device_bytes=budget, host_bytes=0, disk_dir=str(tmp_path), fingerprint="fake", hot_sessions=0)
    pc = PrefixCache(MODEL.make_cache, tenant_bytes=budget // 2, **kw)
    alice = [sequence(1, i) for i in range(6)]
    for s in alice:
        serve(pc, s, "alice")
    pc.close()
    pc = PrefixCache(MODEL.make_cache, tenant_bytes=budget // 2, **kw)
    assert pc.stats()["tenants"]["alice"]["disk_bytes"] > 0
    for s in alice:
        assert serve(pc, s + [9], "alice") == len(s)
    for i in range(100):
        serve(pc, sequence(2, i), "bob")
    assert all(pc.lookup(s, namespace="alice") == len(s) for s in alice)
    pc.close()


class SharesMachine(RuleBasedStateMachine):
    """Tenants store sequences in random order under a memory budget whose shares leave room for
    what one request holds (its open path, and one node's worth of slack per tier, as payloads
    move and go whole): after each request, every other tenant that was within its share still
    restores everything it did before, and the budgets hold."""

    @initialize(host=st.sampled_from([0, 10 * 40 * TOKEN_BYTES]), policy=st.sampled_from(["worth", "lru"]))
    def setup(self, host, policy):
        self.budget = 12 * 40 * TOKEN_BYTES + host
        self.shares = {"a": self.budget // 4, "b": self.budget // 4, "c": self.budget // 4}
        self.pc = PrefixCache(MODEL.make_cache, device_bytes=12 * 40 * TOKEN_BYTES, host_bytes=host, policy=policy,
                              tenant_bytes=self.shares, hot_sessions=0)
        self.stored: dict[str, list[list[int]]] = {t: [] for t in self.shares}
        self.count = 0
        self.namespaces: dict[str, set[str]] = {}

    def memory(self, tenant: str) -> int:
        held = self.pc.stats()["tenants"].get(tenant, {})
        return held.get("device_bytes", 0) + held.get("host_bytes", 0)

    @rule(tenant=st.sampled_from("abc"), length=st.integers(5, 100), reuse=st.booleans(), salt=st.booleans())
    def request(self, tenant, length, reuse, salt):
        self.count += 1
        ns = f"{tenant}/salt:1" if salt else tenant
        base = self.stored[tenant][-1][:length // 2] if reuse and self.stored[tenant] else []
        tokens = base + [self.count % 97 + 2] * max(length - len(base), 1)
        tokens[len(base)] = 200 + self.count
        within = {t: [(s, ns_, self.pc.lookup(s, namespace=ns_)) for s, ns_ in self.stored_in(t)]
                  for t in self.shares if t != tenant and self.memory(t) <= self.shares[t]}
        serve(self.pc, tokens, ns)
        self.stored[tenant].append(tokens)
        self.namespaces.setdefault(tenant, set()).add(ns)
        for t, before in within.items():
            for s, ns_, n in before:
                assert self.pc.lookup(s, namespace=ns_) >= n, f"tenant {t} lost cache to {tenant}'s request"

    def stored_in(self, tenant: str):
        for s in self.stored[tenant][-6:]:
            for ns in self.namespaces.get(tenant, ()):
                yield s, ns

    @invariant()
    def budgets_hold(self):
        if hasattr(self, "pc"):
            check_invariants(self.pc)
            assert self.pc.stats()["held_bytes"] <= self.budget

    def teardown(self):
        if hasattr(self, "pc"):
            self.pc.close()


class TestSharesMachine(SharesMachine.TestCase):
    settings = settings(max_examples=20, stateful_step_count=25)
