"""Cache control in the library: pins, clears and miss reasons (PrefixCache.pin / unpin / clear /
lookup, Session.miss_reason), as a stateful property test under budgets and as scenarios."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from kvtrie import PinError, PrefixCache

from fakes import FakeModel, assert_cold, draw_tokens, lcp, prefill_and_commit

MEMORY = ("device", "host")


class Clock:
    """A settable clock for pin ttls."""

    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def make_cache(model: FakeModel, **kw) -> tuple[PrefixCache, Clock]:
    pc = PrefixCache(model.make_cache, **kw)
    clock = Clock()
    pc._pins.clock = clock
    return pc, clock


def serve(pc: PrefixCache, model: FakeModel, tokens, **kw):
    """One request; returns (cached, miss_reason)."""
    with pc.begin(tokens, **kw) as s:
        assert_cold(model, s.caches, tokens, s.cached)
        prefill_and_commit(model, s, tokens)
        return s.cached, s.miss_reason


def shape(pc: PrefixCache):
    """Everything a failed call must leave as it was: the tree, tiers, pins and the counters."""
    stats = pc.stats()
    return pc.dump(), {k: v for k, v in stats.items() if k not in ("heap_trims",)}


def pinned_nodes(pc: PrefixCache) -> dict:
    return pc._pins.nodes()


def pinned_by_tier(pc: PrefixCache) -> dict[str, int]:
    out: dict[str, int] = {}
    for node in pinned_nodes(pc).values():
        out[node.payload.tier] = out.get(node.payload.tier, 0) + node.payload.nbytes
    return out


class PinMachine(RuleBasedStateMachine):
    """Requests, pins, unpins, expiries, clears and budget changes interleaved under budgets."""

    @initialize(
        kinds=st.sampled_from(["KK", "KR"]),
        policy=st.sampled_from(["worth", "lru"]),
        device=st.sampled_from([2048, 6144, None]),
        host=st.sampled_from([0, 4096, 12288]),
    )
    def setup(self, kinds, policy, device, host):
        self.model = FakeModel(kinds=kinds, heads=2, dim=4)
        self.pc, self.clock = make_cache(self.model, policy=policy, device_bytes=device, host_bytes=host)
        self.stored: dict[str, list[list[int]]] = {"default": [], "other": []}
        self.pins: dict[tuple[str, tuple], dict] = {}  # (ns, asked tokens) -> {"tokens", "expires", "order"}
        self.order = 0
        self.expired = 0
        self.dropped = 0

    def _tokens(self, data, ns, label=""):
        return draw_tokens(data, self.stored[ns], vocab=4, tail=10, fresh=20, label=label)

    @rule(data=st.data(), ns=st.sampled_from(["default", "other"]))
    def request(self, data, ns):
        tokens = self._tokens(data, ns)
        with self.pc.begin(tokens, namespace=ns) as s:
            assert_cold(self.model, s.caches, tokens, s.cached)  # warm == cold
            for (pns, _), pin in self.pins.items():
                p = pin["tokens"]
                if pns == ns and len(p) < len(tokens) and tokens[: len(p)] == p:
                    assert s.cached >= len(p), "a pinned prefix always restores"
            if s.cached >= len(tokens) - 1:
                assert s.miss_reason is None
            prefill_and_commit(self.model, s, tokens)
        self.stored[ns].append(tokens)

    @precondition(lambda self: self.stored["default"] or self.stored["other"])
    @rule(data=st.data(), ttl=st.sampled_from([None, 5.0, 20.0]))
    def pin(self, data, ttl):
        ns = data.draw(st.sampled_from([n for n, seqs in self.stored.items() if seqs]), label="pin namespace")
        base = data.draw(st.sampled_from(self.stored[ns]), label="pin base")
        cut = data.draw(st.integers(1, len(base)), label="pin cut")
        tokens = base[:cut] + data.draw(st.lists(st.integers(0, 4), max_size=3), label="pin tail")
        before = shape(self.pc)
        restorable = self.pc.lookup(tokens, namespace=ns)
        try:
            n = self.pc.pin(tokens, namespace=ns, ttl=ttl)
        except PinError:
            assert shape(self.pc) == before, "a refused pin changes nothing"
            event("pin refused")
            return
        event("pinned" if n else "nothing to pin")
        assert n == restorable
        key = (ns, tuple(tokens))
        if n:
            expires = None if ttl is None else self.clock.t + ttl
            self.pins[key] = {"tokens": tokens[:n], "expires": expires, "order": self.order}
            self.order += 1
        else:
            self.pins.pop(key, None)

    @rule(data=st.data(), ns=st.sampled_from(["default", "other"]))
    def pin_an_open_sessions_sequence(self, data, ns):
        """A session's path may pass a budget while it is open: pinning it then may be refused."""
        tokens = self._tokens(data, ns)
        n = 0
        with self.pc.begin(tokens, namespace=ns) as s:
            prefill_and_commit(self.model, s, tokens)
            before = shape(self.pc)
            try:
                n = self.pc.pin(tokens, namespace=ns)
            except PinError:
                assert shape(self.pc) == before, "a refused pin changes nothing"
                event("pin refused")
        self.stored[ns].append(tokens)
        if n:
            self.pins[(ns, tuple(tokens))] = {"tokens": tokens[:n], "expires": None, "order": self.order}
            self.order += 1

    @precondition(lambda self: self.pins)
    @rule(data=st.data())
    def unpin(self, data):
        (ns, asked) = data.draw(st.sampled_from(sorted(self.pins)))
        pin = self.pins.pop((ns, asked))
        assert self.pc.unpin(list(asked), namespace=ns) == len(pin["tokens"])
        assert self.pc.unpin(list(asked), namespace=ns) == 0

    @rule(dt=st.sampled_from([1.0, 10.0]))
    def time_passes(self, dt):
        self.clock.t += dt
        due = [k for k, p in self.pins.items() if p["expires"] is not None and p["expires"] <= self.clock.t]
        for k in due:
            del self.pins[k]
            event("a pin expired")
        self.expired += len(due)
        assert self.pc.stats()["pins_expired"] == self.expired

    @rule(device=st.sampled_from([1024, 4096, 8192, None]), host=st.sampled_from([0, 4096, 12288]))
    def set_budgets(self, device, host):
        order = sorted(self.pins, key=lambda k: (self.pins[k]["expires"] is None, self.pins[k]["expires"] or 0.0,
                                                 self.pins[k]["order"]))
        self.pc.set_budgets(device_bytes=device, host_bytes=host)
        stats = self.pc.stats()
        gone = stats["pins_dropped"] - self.dropped
        self.dropped = stats["pins_dropped"]
        if gone:
            event("pins gave way")
        for k in order[:gone]:  # the soonest to expire gave way first
            del self.pins[k]
        assert stats["pins"] == len(self.pins)

    @precondition(lambda self: self.stored["default"] or self.stored["other"])
    @rule(data=st.data(), ns=st.sampled_from(["default", "other"]))
    def clear_prefix(self, data, ns):
        prefix = self._tokens(data, ns, "clear ")
        before = {n: [self.pc.lookup(t, namespace=n) for t in seqs] for n, seqs in self.stored.items()}
        if self.pc.clear(namespace=ns, prefix=prefix):
            event("cleared a prefix")
        for k in [k for k, p in self.pins.items() if k[0] == ns and p["tokens"][: len(prefix)] == prefix]:
            del self.pins[k]  # (pins of what was cleared end with it)
        for n, seqs in self.stored.items():
            for t, r in zip(seqs, before[n]):
                after = self.pc.lookup(t, namespace=n)
                if n != ns:
                    assert after == r, "other namespaces are left alone"
                elif t[: len(prefix)] == prefix:
                    assert after < len(prefix), "nothing under a cleared prefix restores"
                elif r > lcp(t, prefix):  # what is stored of t branches off the prefix: left alone
                    assert after == r
                else:
                    assert after <= r

    @rule(ns=st.sampled_from(["default", "other", None]))
    def clear_namespace(self, ns):
        before = {n: [self.pc.lookup(t, namespace=n) for t in seqs] for n, seqs in self.stored.items()}
        self.pc.clear(namespace=ns)
        for n, seqs in self.stored.items():
            for t, r in zip(seqs, before[n]):
                assert self.pc.lookup(t, namespace=n) == (0 if ns is None or n == ns else r)
        self.pins = {k: p for k, p in self.pins.items() if ns is not None and k[0] != ns}

    @invariant()
    def structure_bytes_budgets_and_pins(self):
        if not hasattr(self, "pc"):
            return
        pc = self.pc
        stats = pc.stats()
        total = 0
        pins_on: dict[int, int] = {}
        for (ns, _), pin in self.pins.items():
            p = pin["tokens"]
            assert pc.lookup(p, namespace=ns) == len(p), "a pinned prefix stays restorable"
            match = pc._storage.trie(ns).match(np.array(p, dtype=np.int32))
            assert match.length == len(p) and match.path[-1].end == len(p), "a pin ends at a node's end"
            for node in match.path:
                pins_on[node.id] = pins_on.get(node.id, 0) + 1
        for _, node, _ in pc.walk():
            assert node.start == node.parent.end
            assert node.pins == pins_on.get(node.id, 0), "path pins count the user pins over it (no session is open)"
            if node.pins:
                assert node.payload.tier in MEMORY, "a pinned payload stays in memory"
            for layer, p in enumerate(node.payload.layers or ()):
                if layer not in pc.recurrent_layers:
                    assert p.length == node.end - node.start
            total += node.payload.nbytes
        assert stats["device_bytes"] + stats["host_bytes"] + stats["disk_bytes"] == total
        assert stats["pins"] == len(self.pins)
        budgets = pc.budgets
        held = pinned_by_tier(pc)
        assert stats["pinned_bytes"] == sum(held.values())
        for tier in MEMORY:
            if budgets[tier] is not None:
                assert held.get(tier, 0) <= budgets[tier], "pinned bytes stay within the budgets"
                assert stats[f"held_{tier}_bytes"] <= budgets[tier], "budgets hold after every call"
        assert sum(stats["miss_reasons"].values()) <= stats["requests"]


TestPinMachine = PinMachine.TestCase
TestPinMachine.settings = settings(max_examples=150, stateful_step_count=25)


# --- scenarios -----------------------------------------------------------------------------------


def test_a_pin_keeps_a_prefix_through_pressure_that_evicts_unpinned_ones():
    model = FakeModel(layers=2)
    pc, _ = make_cache(model, policy="lru", device_bytes=40 * 128, host_bytes=0)  # room for 40 tokens
    system = list(range(100, 130))
    serve(pc, model, system + [1, 2])
    assert pc.pin(system) == 30
    assert pc.stats()["pins"] == 1 and pc.stats()["pinned_bytes"] == 30 * 128
    other = list(range(200, 230))
    serve(pc, model, other)
    for i in range(6):  # pressure: each new sequence pushes the least recently used unpinned one out
        serve(pc, model, [i] * 30)
    assert pc.lookup(system) == 30 and pc.lookup(other) == 0
    assert serve(pc, model, system + [7]) == (30, None)
    assert pc.unpin(system) == 30 and pc.stats()["pins"] == 0
    for i in range(6):
        serve(pc, model, [10 + i] * 30)
    assert pc.lookup(system) == 0  # unpinned: judged like any other


def test_a_pin_past_a_budget_is_refused_and_changes_nothing(tmp_path):
    """What a memory tier holds is within its budget, so a pin of it always fits; one that brings
    a prefix back from disk, or that holds an open session's path past a budget, may not."""
    model = FakeModel(layers=2)
    pc = PrefixCache(model.make_cache, device_bytes=40 * 128, host_bytes=0, disk_dir=str(tmp_path), fingerprint="fake")
    a, b = list(range(100, 140)), list(range(200, 240))
    serve(pc, model, a + [1])
    serve(pc, model, b + [1])
    pc.persist(wait=True)
    assert pc.pin(a) == 40  # from disk into the device tier (there is no host tier)
    before = shape(pc)
    with pytest.raises(PinError, match="past its budget"):
        pc.pin(b[:30])  # 40 + 30 tokens pinned > 40 tokens' worth of device budget
    assert shape(pc) == before
    assert pc.unpin(a) == 40
    assert pc.pin(b[:30]) == 30
    assert pc.stats()["pinned_bytes"] == 30 * 128
    with pc.begin(list(range(300, 360))) as s:  # an open session past the budget
        prefill_and_commit(model, s, list(range(300, 360)))
        with pytest.raises(PinError):
            pc.pin(list(range(300, 360)))
    pc.close()


def test_pins_expire_lazily_and_pinning_again_renews():
    model = FakeModel(layers=2)
    pc, clock = make_cache(model)
    tokens = list(range(50, 80))
    serve(pc, model, tokens + [1])
    assert pc.pin(tokens, ttl=10) == 30
    clock.t += 8
    assert pc.pin(tokens, ttl=10) == 30  # renewed: expires at +18
    clock.t += 8
    assert pc.stats()["pins"] == 1
    clock.t += 3
    stats = pc.stats()
    assert stats["pins"] == 0 and stats["pins_expired"] == 1 and stats["pinned_bytes"] == 0
    assert all(node.pins == 0 for _, node, _ in pc.walk())
    assert pc.unpin(tokens) == 0


def test_shrinking_budgets_drop_the_soonest_expiring_pins_first():
    model = FakeModel(layers=2)
    pc, _ = make_cache(model, device_bytes=1 << 20, host_bytes=0)
    seqs = [[k] * 20 for k in range(1, 5)]
    for s in seqs:
        serve(pc, model, s + [9])
    pc.pin(seqs[0])  # no ttl: last to go
    pc.pin(seqs[1], ttl=100)
    pc.pin(seqs[2], ttl=10)  # soonest
    pc.pin(seqs[3], ttl=50)
    pc.set_budgets(device_bytes=2 * 20 * 128)  # room for two pins
    stats = pc.stats()
    assert stats["pins"] == 2 and stats["pins_dropped"] == 2
    assert [pc.lookup(s) for s in seqs][:2] == [20, 20]  # the ones without ttl and with the latest expiry
    assert stats["held_device_bytes"] <= 2 * 20 * 128


def test_pinned_payloads_stay_on_their_tier_while_others_page_out():
    model = FakeModel(layers=2)
    pc, _ = make_cache(model, device_bytes=40 * 128, host_bytes=1 << 20)
    system = list(range(100, 130))
    serve(pc, model, system + [1])
    pc.pin(system)
    for i in range(5):
        serve(pc, model, [i] * 30)
    tiers = {node.payload.tier for node in pinned_nodes(pc).values()}
    assert tiers == {"device"}  # restorable at once, never paged out
    assert pc.stats()["host_bytes"] > 0  # the others paged out around it
    assert serve(pc, model, system + [5])[0] == 30


def test_a_hybrid_pin_keeps_the_snapshot_at_its_end():
    model = FakeModel(kinds="KRK", state_pad=64)
    pc, _ = make_cache(model, device_bytes=1 << 20, host_bytes=0)
    prompt = list(range(10, 60))
    serve(pc, model, prompt)  # snapshots at the prompt's end (n - 1) and at n
    assert pc.pin(prompt[:-1]) == 49  # the prompt end's snapshot: a speculative one, kept by the pin
    for i in range(8):
        serve(pc, model, [i] * 40)
    pc.set_budgets(device_bytes=pc.stats()["pinned_bytes"] + 64 * 24)
    assert pc.lookup(prompt[:-1]) == 49
    cached, reason = serve(pc, model, prompt[:-1] + [3, 4])
    assert cached == 49 and reason is None


def test_a_commit_onto_a_pinned_path_makes_no_pin_give_way():
    """The PinMachine's failing example, step by step (hybrid, plain LRU, every byte pinned): the
    last request, `[1]`, splits the pinned edge `[1, 0]` and puts its end snapshot there, above
    the end of the pin of `[1, 0, 0]`. That snapshot counted as pinned and could not go, so its
    16 bytes made the oldest pin, `[0, 1, 1]`, give way with no budget shrunk, and its end
    snapshot went (`lookup` said 2). A pin keeps its path's KV and its end's snapshot; the
    snapshots above its end are the policy's to drop, like any other."""
    model = FakeModel(kinds="KR", heads=2, dim=4)
    pc, _ = make_cache(model, policy="lru", device_bytes=2048, host_bytes=0)
    steps = [("default", [0, 1, 1]), ("other", [0, 0, 0, 0]), ("default", [0, 0, 0]), ("default", [2, 0, 0, 0, 0, 0]),
             ("default", [1, 0, 0]), ("default", [0]), ("default", [3, 0, 0]), ("other", [0, 1, 0, 0, 0, 0, 0, 0]),
             ("default", [1])]
    pinned = []
    for ns, tokens in steps:  # each one the PinMachine's pin_an_open_sessions_sequence
        with pc.begin(tokens, namespace=ns) as s:
            prefill_and_commit(model, s, tokens)
            assert pc.pin(tokens, namespace=ns) == len(tokens)
        pinned.append((ns, tokens))
        for pns, p in pinned:
            assert pc.lookup(p, namespace=pns) == len(p), "a pinned prefix stays restorable"
        stats = pc.stats()
        assert stats["pins"] == len(pinned) and stats["pins_dropped"] == 0
        assert stats["held_device_bytes"] <= 2048
    assert pc.stats()["pinned_bytes"] == 2048  # every byte pinned: the budget held by dropping snapshots only


@pytest.mark.parametrize("policy", ["lru", "worth"])
@pytest.mark.parametrize("host", [0, 4096])
def test_a_snapshot_a_commit_puts_above_a_pins_end_goes_before_the_pin(policy, host):
    """The device budget holds exactly the pinned `[1, 0, 0]`; a request for `[1]` splits its
    path and snapshots its end there. Over the budget, a snapshot above the pin's end is dropped
    (in the device tier too, where nothing else could move down to the host tier), never the pin."""
    model = FakeModel(kinds="KR", heads=2, dim=4)
    pc, _ = make_cache(model, policy=policy, device_bytes=224, host_bytes=host)
    a = [1, 0, 0]
    serve(pc, model, a)
    assert pc.stats()["device_bytes"] == 224
    assert pc.pin(a) == 3
    serve(pc, model, [1])
    stats = pc.stats()
    assert stats["pins"] == 1 and stats["pins_dropped"] == 0
    assert pc.lookup(a) == 3
    assert stats["held_device_bytes"] <= 224 and {n.payload.tier for n in pinned_nodes(pc).values()} == {"device"}


def test_clear_everything_a_namespace_or_a_prefix():
    model = FakeModel(layers=2)
    pc, _ = make_cache(model)
    system = [7] * 10
    a, b = system + [1] * 10, system + [2] * 10
    for t in (a, b):
        serve(pc, model, t)
    serve(pc, model, a, namespace="other")
    # a prefix: its subtree and its own tail back to where b branches off; b stays whole
    assert pc.clear(prefix=a[:15]) == 10
    assert pc.lookup(a) == 10 and pc.lookup(b) == 20 and pc.lookup(a, namespace="other") == 20
    # the prefix's own stored part goes back to the root once nothing else shares it
    assert pc.clear(prefix=b) == 20 and pc.lookup(b) == 0
    assert pc.clear(prefix=[5, 5, 5]) == 0
    serve(pc, model, a)
    assert pc.clear(namespace="other") == 20 and pc.lookup(a, namespace="other") == 0 and pc.lookup(a) == 20
    assert pc.clear() == 20
    stats = pc.stats()
    assert stats["tokens_stored"] == 0 and stats["nodes"] == 0 and stats["device_bytes"] == 0
    assert stats["cleared_tokens"] == 70


def test_clear_keeps_what_open_sessions_hold_and_forgets_hot_sessions():
    model = FakeModel(layers=2)
    pc, _ = make_cache(model)
    a, b = [1] * 20, [2] * 20
    serve(pc, model, a)
    serve(pc, model, b)  # b's live caches are kept hot
    with pc.begin(a + [3]) as s:  # an open session on a
        assert pc.clear() == 20  # b went; a is in use
        assert pc.lookup(a) == 20
        prefill_and_commit(model, s, a + [3])
    assert pc.clear(prefix=a) == 21
    cached, reason = serve(pc, model, a + [3, 4])  # the hot session of a + [3] went with it
    assert cached == 0 and reason == "evicted"


def test_clear_deletes_the_disk_records_of_what_it_drops(tmp_path):
    model = FakeModel(layers=2)
    kw = dict(disk_dir=str(tmp_path), fingerprint="fake", persist_seconds=None)
    pc = PrefixCache(model.make_cache, **kw)
    a, b = [1] * 20, [2] * 20
    serve(pc, model, a)
    serve(pc, model, b)
    pc.persist(wait=True)
    files = set(tmp_path.rglob("*.safetensors"))
    assert len(files) == 2
    assert pc.clear(prefix=a) == 20
    pc.persist(wait=True)
    assert len(set(tmp_path.rglob("*.safetensors"))) == 1
    pc.close()
    with PrefixCache(model.make_cache, **kw) as again:
        assert again.lookup(a) == 0 and again.lookup(b) == 20


def test_pin_reads_a_prefix_back_from_disk(tmp_path):
    model = FakeModel(layers=2)
    pc = PrefixCache(model.make_cache, device_bytes=0, host_bytes=0, disk_dir=str(tmp_path), fingerprint="fake")
    a = list(range(30, 60))
    serve(pc, model, a + [1])
    pc.persist(wait=True)
    assert {n.payload.tier for _, n, _ in pc.walk()} == {"disk"}
    with pytest.raises(PinError):  # no memory tier has room for it
        pc.pin(a)
    pc.set_budgets(host_bytes=1 << 20)
    assert pc.pin(a) == 30
    assert {n.payload.tier for n in pinned_nodes(pc).values()} == {"host"}
    assert serve(pc, model, a + [2])[0] == 30
    pc.close()


def test_bad_input_raises_and_changes_nothing():
    model = FakeModel(layers=2)
    pc, _ = make_cache(model)
    serve(pc, model, [1] * 10)
    before = shape(pc)
    for call, exc in (
        (lambda: pc.pin([]), ValueError),
        (lambda: pc.pin([1, -1]), ValueError),
        (lambda: pc.pin("abc"), TypeError),
        (lambda: pc.pin([1], ttl=0), ValueError),
        (lambda: pc.pin([1], ttl=float("inf")), ValueError),
        (lambda: pc.pin([1], ttl="1"), TypeError),
        (lambda: pc.pin([1], ttl=True), TypeError),
        (lambda: pc.pin([1], namespace=3), TypeError),
        (lambda: pc.unpin([1.5]), TypeError),
        (lambda: pc.clear(prefix=[]), ValueError),
        (lambda: pc.clear(prefix="x"), TypeError),
        (lambda: pc.clear(namespace=b"x"), TypeError),
        (lambda: pc.lookup([]), ValueError),
    ):
        with pytest.raises(exc):
            call()
        assert shape(pc) == before


# --- miss reasons --------------------------------------------------------------------------------


def test_miss_reasons_new_prefix_full_and_partial_hits():
    model = FakeModel(layers=2)
    pc, _ = make_cache(model)
    a = list(range(100, 160))
    assert serve(pc, model, a) == (0, "new_prefix")
    assert serve(pc, model, a) == (59, None)  # all but the last token: a full hit
    assert serve(pc, model, a + [1, 2, 3]) == (60, None)  # all stored, the rest is new: nothing lost
    assert serve(pc, model, [5]) == (0, None)  # one token: nothing to restore
    assert pc.stats()["miss_reasons"] == {"new_prefix": 1, "evicted": 0, "no_snapshot": 0, "window_hole": 0,
                                          "other_namespace": 0, "not_cached": 0}


def test_miss_reason_evicted_whole_or_a_tail():
    model = FakeModel(layers=2)
    pc, _ = make_cache(model, policy="lru", device_bytes=50 * 128, host_bytes=0)
    a = list(range(100, 140))
    serve(pc, model, a)
    serve(pc, model, [1] * 40)  # pushes a out
    assert serve(pc, model, a + [1]) == (0, "evicted")
    # a tail: a's first 10 tokens stay (shared with b), the rest goes, finer than a block
    b = a[:10] + [2] * 30
    serve(pc, model, b)
    serve(pc, model, [3] * 5)
    assert pc.lookup(a) == 10
    assert serve(pc, model, a + [4]) == (10, "evicted")
    assert pc.stats()["miss_reasons"]["evicted"] == 2


def test_miss_reasons_other_namespace_and_not_cached():
    model = FakeModel(layers=2)
    pc, _ = make_cache(model)
    a = list(range(100, 160))
    serve(pc, model, a, namespace="tenant-a")
    assert serve(pc, model, a, namespace="tenant-b")[1] == "other_namespace"
    b = list(range(300, 360))
    with pc.begin(b) as s:  # restored, never committed (an aborted request)
        assert s.miss_reason == "new_prefix"
    with pc.begin(b + [1]) as s:
        assert s.cached == 0 and s.miss_reason == "not_cached"
    c = [9] * 3 + list(range(400, 450))
    with pc.begin(c) as s:  # a few shared tokens are not "seen before"
        assert s.miss_reason == "new_prefix"
    reasons = pc.stats()["miss_reasons"]
    assert reasons["other_namespace"] == 1 and reasons["not_cached"] == 1


def test_miss_reason_no_snapshot_for_a_hybrid_model():
    model = FakeModel(kinds="KR")
    pc, _ = make_cache(model)
    a = list(range(100, 160))
    serve(pc, model, a)  # snapshots at 59 and 60 only
    cached, reason = serve(pc, model, a[:30] + [1, 2, 3])
    assert cached == 0 and reason == "no_snapshot"
    assert serve(pc, model, a[:30] + [1, 2, 3, 4]) == (33, None)  # the branch point is stored now


def test_miss_reason_window_hole():
    pytest.importorskip("mlx_lm")
    from mlx_lm.models.cache import RotatingKVCache

    from test_mlx_lm import tiny

    model = tiny("llama")
    make = lambda: [RotatingKVCache(max_size=16) for _ in model.layers]  # noqa: E731
    pc = PrefixCache(make)
    tokens = list(range(1, 61))
    foreign = make()  # not from kvtrie: keeps only its last window, the positions before are holes
    mx.eval(model(mx.array(tokens[:40])[None], cache=foreign))
    for t in tokens[40:]:
        mx.eval(model(mx.array([[t]]), cache=foreign))
    pc.store(tokens, foreign)
    with pc.begin(tokens[:50] + [99]) as s:
        assert s.cached == 0 and s.miss_reason == "window_hole"


# --- prefill without generating (mlx-lm) ----------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "qwen3_next"])
def test_prefill_stores_a_prefix_that_restores_warm_equal_to_cold(arch):
    pytest.importorskip("mlx_lm")
    from mlx_lm.models.cache import make_prompt_cache

    from kvtrie.integrations.mlx_lm import make_prefix_cache, prefill
    from test_mlx_lm import tiny
    from tolerance import ATOL, RECURRENT_ATOL

    model = tiny(arch)
    pc = make_prefix_cache(model, device_bytes=1 << 24)
    system = list(range(3, 83))
    done = prefill(system, model, pc, prefill_step_size=32, pin=True, ttl=60)
    assert done.added == 80 and done.pinned == 80 and done.pin_error is None
    assert prefill(system, model, pc).added == 0
    assert pc.lookup(system) == 80
    question = system + [5, 6, 7]
    with pc.begin(question) as s:
        assert s.cached == 80 and s.miss_reason is None
        warm = np.array(model(mx.array(question[80:])[None], cache=s.caches)[0, -1])
    cold = np.array(model(mx.array(question)[None], cache=make_prompt_cache(model))[0, -1])
    np.testing.assert_allclose(warm, cold, atol=ATOL if arch == "llama" else RECURRENT_ATOL)
    with pytest.raises(ValueError):
        prefill(system, model, pc, pin=True, ttl=-1)


def test_namespaces_share_one_budget_with_distinct_node_ids():
    """Node ids are unique across tries: the orders, pins and records key nodes by id, and two
    namespaces' nodes once collided there (one namespace's eviction lost track of the other's)."""
    model = FakeModel(layers=2)
    pc, _ = make_cache(model, policy="lru", device_bytes=30 * 128, host_bytes=0)
    for i in range(6):
        for ns in ("a", "b"):
            serve(pc, model, [i, 1, 2, 3, 4, 5, 6, 7, 8, 9], namespace=ns)
            assert pc.stats()["held_device_bytes"] <= 30 * 128
    ids = [node.id for _, node, _ in pc.walk()]
    assert len(ids) == len(set(ids))
    assert pc.pin([5, 1, 2, 3], namespace="a") == 4 and pc.pin([5, 1, 2, 3], namespace="b") == 4
    assert pc.stats()["pinned_bytes"] == 8 * 128
