"""The shared tier on a real Redis (one server, and a 3-master Redis Cluster): processes reuse
each other's prefixes; faults (down, slow, flushed, restarted, damaged values) never fail a
request nor restore a wrong state; tenants never see each other's blocks."""

from __future__ import annotations

import json
import urllib.request
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

pytest.importorskip("redis")
from redis_servers import RedisCluster, RedisServer, find_redis_server  # noqa: E402

from kvtrie import PrefixCache  # noqa: E402

from fakes import FakeModel, assert_cold, check_invariants, prefill_and_commit  # noqa: E402

pytestmark = pytest.mark.skipif(find_redis_server() is None, reason="redis-server is not installed (make test installs it)")

TESTS = Path(__file__).parent
SRC = TESTS.parent / "src"
BLOCK = 16


def shared_cache(model: FakeModel, url: str, **kw) -> PrefixCache:
    kw.setdefault("fingerprint", "fake")
    return PrefixCache(model.make_cache, shared_url=url, shared_block_tokens=BLOCK, shared_timeout=0.3, **kw)


def serve(pc: PrefixCache, model: FakeModel, tokens: list[int], **begin) -> int:
    """One request: its restore must equal a cold run; returns how much it restored."""
    with pc.begin(tokens, **begin) as s:
        assert_cold(model, s.caches, tokens, s.cached)
        prefill_and_commit(model, s, tokens)
        return s.cached


def published(pc: PrefixCache) -> None:
    pc._shared.flush()


@pytest.fixture(scope="module")
def redis_server():
    with RedisServer() as r:
        yield r


@pytest.fixture
def redis_url(redis_server):
    redis_server.flushall()
    return redis_server.url


@pytest.mark.parametrize("kinds", ["KK", "KRK"])
def test_a_second_cache_restores_what_the_first_published(redis_url, kinds):
    model = FakeModel(kinds=kinds, heads=1, dim=4)
    a, b = shared_cache(model, redis_url), shared_cache(model, redis_url)
    prompt = list(range(100))
    serve(a, model, prompt)
    published(a)
    assert a.stats()["shared_published"] > 0
    # b has nothing locally: the whole blocks (and, for the hybrid, the state at the end) come from Redis
    got = serve(b, model, prompt + [7, 8])
    assert got == (100 if kinds == "KRK" else 96)  # a hybrid restores at the snapshot, KV by whole blocks
    stats = b.stats()
    assert stats["shared_restores"] == 1 and stats["shared_tokens"] == got and stats["shared_errors"] == 0
    # what came from Redis joined b's local tiers: the next request needs no Redis
    assert serve(b, model, prompt + [7, 9]) >= got and b.stats()["shared_restores"] == 1
    check_invariants(b, (), model)
    a.close()
    b.close()


def test_a_local_match_is_extended_from_the_shared_tier_not_replaced(redis_url):
    model = FakeModel(heads=1, dim=4)
    a, b = shared_cache(model, redis_url), shared_cache(model, redis_url)
    serve(a, model, list(range(200)))
    published(a)
    assert serve(b, model, list(range(40)) + [999]) == 32  # two whole blocks from Redis
    before = b.stats()["shared_tokens"]  # b holds the first 41 tokens itself now
    assert serve(b, model, list(range(150)) + [5]) == 144  # its 40 + Redis up to the last whole block
    assert b.stats()["shared_tokens"] - before == 144 - 40


def test_tenants_and_models_never_see_each_others_blocks(redis_url):
    model = FakeModel(heads=1, dim=4)
    a = shared_cache(model, redis_url, namespace="tenant-a")
    serve(a, model, list(range(100)))
    published(a)
    other_tenant = shared_cache(model, redis_url, namespace="tenant-b")
    other_model = shared_cache(model, redis_url, namespace="tenant-a", fingerprint="another-model")
    assert serve(other_tenant, model, list(range(100)) + [1]) == 0
    assert serve(other_model, model, list(range(100)) + [1]) == 0
    same = shared_cache(model, redis_url, namespace="tenant-a")
    assert serve(same, model, list(range(100)) + [1]) == 96
    for pc in (a, other_tenant, other_model, same):
        pc.close()


def test_damaged_values_are_misses_from_there_never_state(redis_server, redis_url):
    model = FakeModel(kinds="KRK", heads=1, dim=4)
    a = shared_cache(model, redis_url)
    prompt = list(range(160))
    serve(a, model, prompt[:70])  # a snapshot at 70
    serve(a, model, prompt)
    published(a)
    client = redis_server.client()
    keys = sorted(client.keys("kvtrie:*"))
    values = {k: client.get(k) for k in keys if not k.startswith(b"kvtrie:i:")}
    for i, (key, value) in enumerate(sorted(values.items())):
        if i % 2:  # damage every other value: flipped bytes, truncation, garbage
            damaged = [value[:-9] + bytes([value[-9] ^ 0xFF]) + value[-8:], value[: len(value) // 2], b"garbage"][i % 3]
            client.set(key, damaged)
    b = shared_cache(model, redis_url)
    for tokens in (prompt[:70] + [1], prompt + [1], prompt[:40] + [2]):
        serve(b, model, tokens)  # each restore equals a cold run, or is a miss
    assert b.stats()["shared_errors"] >= 1
    check_invariants(b, (), model)
    a.close()
    b.close()


@pytest.mark.parametrize("fault", ["down", "slow", "hung", "flushed", "restarted"])
def test_faults_never_fail_a_request(fault):
    with RedisServer() as r:
        model = FakeModel(heads=1, dim=4)
        a = shared_cache(model, r.url)
        serve(a, model, list(range(100)))
        published(a)
        b = shared_cache(model, r.url)
        if fault == "down":
            r.stop()
        elif fault == "slow":
            r.pause(2.0)
        elif fault == "hung":
            r.pause(2.0, how="sigstop")
        elif fault == "flushed":
            r.flushall()
        else:
            r.stop()
            r.start()  # empty (no persistence), same port
        t0 = time.monotonic()
        assert serve(b, model, list(range(100)) + [1]) == 0  # local tiers only, no error to the caller
        assert time.monotonic() - t0 < 1.5  # a short timeout, no retries
        serve(b, model, list(range(300, 340)))  # publishing during the fault is dropped or fails quietly
        published(b)
        if fault in ("down", "slow", "hung"):
            assert b.stats()["shared_errors"] >= 1
        if fault == "down":
            r.start()
        time.sleep(2.2 if fault in ("slow", "hung") else 0.6)  # the fault ends; the backoff runs out
        serve(a, model, list(range(500, 600)))  # a's blocks from before the fault are gone: new ones
        published(a)
        c = shared_cache(model, r.url)
        assert serve(c, model, list(range(500, 600)) + [1]) == 96  # reconnected: shared again
        for pc in (a, b, c):
            pc.close()


def test_a_redis_cluster_given_by_any_node_shards_the_blocks():
    with RedisCluster() as cluster:
        model = FakeModel(kinds="KRK", heads=1, dim=4)
        a = shared_cache(model, cluster.urls[0])
        prompt = list(range(300))
        serve(a, model, prompt)
        published(a)
        assert a.stats()["shared_published"] > 10 and a.stats()["shared_errors"] == 0
        nodes = [RedisServerClient(u) for u in cluster.urls]
        assert sum(1 for n in nodes if n.dbsize() > 0) == 3  # keys on every master
        b = shared_cache(model, cluster.urls[2])
        assert serve(b, model, prompt + [1]) == 300
        a.close()
        b.close()


def RedisServerClient(url: str):
    import redis

    return redis.Redis.from_url(url)


CHILD = """
import sys, json
sys.path[:0] = [{src!r}]
import mlx.core as mx
from kvtrie import PrefixCache
from kvtrie.models import generate, load_model, model_fingerprint
model, _ = load_model("tiny-" + sys.argv[2])
pc = PrefixCache(model.make_cache, fingerprint=model_fingerprint(model), shared_url=sys.argv[1], shared_block_tokens=32)
prompt = list(range(1, 200))
out = generate(model, pc, prompt + json.loads(sys.argv[3]), max_tokens=8)
pc._shared.flush()
print(json.dumps({{"cached": out.cached_tokens, "tokens": out.tokens, "stats": pc.stats()}}))
pc.close()
"""


@pytest.mark.parametrize("arch", ["llama", "qwen3-next"])
def test_process_b_restores_what_process_a_computed(redis_url, tmp_path, arch):
    """Two fresh interpreters: B restores A's prompt from Redis and its greedy tokens equal a cold run's."""
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(src=str(SRC)))

    def run(extra: list[int]) -> dict:
        out = subprocess.run([sys.executable, str(script), redis_url, arch, json.dumps(extra)],
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout.strip().splitlines()[-1])

    first = run([5])
    assert first["cached"] == 0 and first["stats"]["shared_published"] > 0
    # the next turn of A's conversation, in another process: A's prompt and reply come from Redis
    extra = [5] + first["tokens"] + [6]
    second = run(extra)
    assert second["cached"] >= (200 if arch == "qwen3-next" else 192) and second["stats"]["shared_restores"] == 1
    from kvtrie.models import generate, load_model

    cold = generate(load_model(f"tiny-{arch}")[0], None, list(range(1, 200)) + extra, max_tokens=8)
    assert second["tokens"] == cold.tokens


class SharedMachine(RuleBasedStateMachine):
    """Three caches of one model share a Redis; random requests on any of them, random damage
    and flushes. Every restore equals a cold run; nothing raises; budgets and invariants hold."""

    @initialize(kinds=st.sampled_from(["KK", "KRK"]))
    def setup(self, kinds):
        self.redis = _MACHINE_REDIS
        self.redis.flushall()
        self.model = FakeModel(kinds=kinds, heads=1, dim=4)
        self.caches = [shared_cache(self.model, self.redis.url, device_bytes=4000) for _ in range(3)]
        self.stored: list[list[int]] = []

    @rule(which=st.integers(0, 2), data=st.data())
    def request(self, which, data):
        base = data.draw(st.sampled_from(self.stored)) if self.stored and data.draw(st.booleans()) else []
        cut = data.draw(st.integers(0, len(base)))
        tokens = base[:cut] + data.draw(st.lists(st.integers(0, 3), min_size=1, max_size=40))
        serve(self.caches[which], self.model, tokens)
        self.caches[which]._shared.flush()
        self.stored.append(tokens)

    @rule(data=st.data())
    def damage(self, data):
        client = self.redis.client()
        keys = [k for k in client.keys("kvtrie:*") if not k.startswith(b"kvtrie:i:")]
        if keys:
            key = data.draw(st.sampled_from(sorted(keys)))
            client.set(key, data.draw(st.sampled_from([b"", b"KVT1", b"KVT1\x00\x00\x00\x00junk"])))

    @rule()
    def flush(self):
        self.redis.flushall()

    @invariant()
    def invariants(self):
        for pc in getattr(self, "caches", ()):
            check_invariants(pc, (), self.model)

    def teardown(self):
        for pc in getattr(self, "caches", ()):
            pc.close()


_MACHINE_REDIS = None


@pytest.fixture(scope="module", autouse=False)
def machine_redis(redis_server):
    global _MACHINE_REDIS
    _MACHINE_REDIS = redis_server
    yield


@pytest.mark.usefixtures("machine_redis")
class TestSharedMachine(SharedMachine.TestCase):
    settings = settings(max_examples=25, stateful_step_count=10)


def test_two_kvtrie_servers_share_prefixes_through_redis(redis_url, tmp_path):
    """Two `kvtrie serve` processes on one Redis: a conversation started on A continues on B
    (round-robin routing) with its history restored from the shared tier."""
    pytest.importorskip("mlx_lm")
    from serving import ServerProcess, cached_tokens, chat, free_port, make_model_dir, reply_text

    model_dir = make_model_dir(tmp_path / "model", "llama")

    def server(name: str) -> ServerProcess:
        port = free_port()
        cmd = [sys.executable, "-m", "kvtrie.serve", "--model", str(model_dir), "--host", "127.0.0.1", "--port", str(port),
               "--max-tokens", "8", "--shared-url", redis_url, "--shared-block-tokens", "16"]
        return ServerProcess(cmd, port, log_path=tmp_path / f"{name}.log")

    msgs = [{"role": "system", "content": "You are a helpful assistant who knows about birds. " * 4},
            {"role": "user", "content": "Which birds live near the sea?"}]
    with server("a") as a, server("b") as b:
        r = chat(a.url, msgs)
        assert cached_tokens(r) == 0
        time.sleep(0.5)  # published in the background
        msgs += [{"role": "assistant", "content": reply_text(r)}, {"role": "user", "content": "And in forests?"}]
        r2 = chat(b.url, msgs)
        assert cached_tokens(r2) >= 64  # whole blocks of A's history, from Redis
        with urllib.request.urlopen(b.url + "/kvtrie/stats", timeout=30) as resp:
            (stats,) = json.loads(resp.read())["models"].values()
        assert stats["shared_restores"] >= 1 and stats["shared_errors"] == 0


def test_a_password_in_the_url():
    with RedisServer(password="s3cret/:@") as r:
        model = FakeModel(heads=1, dim=4)
        a, b = shared_cache(model, r.url), shared_cache(model, r.url)
        serve(a, model, list(range(100)))
        published(a)
        assert serve(b, model, list(range(100)) + [1]) == 96
        wrong = shared_cache(model, r.url.replace("s3cret", "wrong"))
        assert serve(wrong, model, list(range(100)) + [2]) == 0 and wrong.stats()["shared_errors"] >= 1
        for pc in (a, b, wrong):
            pc.close()


def test_snapshots_of_other_prompts_under_one_block_are_found_by_their_own_key(redis_url):
    """Many conversations end inside the same block: a reader picks its own prompt's state,
    never another's (and a state that is not there is a miss, not a fault)."""
    model = FakeModel(kinds="KRK", heads=1, dim=4)
    a = shared_cache(model, redis_url)
    base = list(range(20))
    for tail in ([1] * 10, [2] * 12, [3] * 5):
        serve(a, model, base + tail)
    published(a)
    b = shared_cache(model, redis_url)
    assert serve(b, model, base + [1] * 10 + [5]) == 30
    assert serve(b, model, base + [4] * 10 + [5]) <= 20  # nobody stored this one's state
    assert b.stats()["shared_errors"] == 0
    a.close()
    b.close()


def test_a_flushed_redis_is_refilled_by_the_next_commits(redis_server, redis_url):
    model = FakeModel(heads=1, dim=4)
    a = shared_cache(model, redis_url)
    a._shared.resend_after = 0.0  # (default 60 s: what a process sent is checked again after that)
    serve(a, model, list(range(100)))
    published(a)
    redis_server.flushall()
    serve(a, model, list(range(100)) + [7])  # a continuation: its blocks are checked and sent again
    published(a)
    b = shared_cache(model, redis_url)
    assert serve(b, model, list(range(100)) + [8]) == 96
    a.close()
    b.close()
