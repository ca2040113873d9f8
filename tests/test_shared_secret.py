"""The authenticated shared tier (`shared_secret`): values carry a keyed MAC and keys derive
from the secret, so only caches with the same secret share blocks; a forged value or one
written with another secret (or none) is a miss, counted, never state."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("redis")
from redis_servers import RedisServer, find_redis_server  # noqa: E402

from kvtrie import PrefixCache  # noqa: E402
from kvtrie import serve as kserve  # noqa: E402
from kvtrie.shared import MAC_SIZE, MAGIC, MAGIC_MAC, SharedTier  # noqa: E402

from fakes import FakeModel, assert_cold, check_invariants, prefill_and_commit  # noqa: E402

redis_needed = pytest.mark.skipif(find_redis_server() is None, reason="redis-server is not installed (make test installs it)")

BLOCK = 16
PROMPT = list(range(100))


def shared_cache(model: FakeModel, url: str, **kw) -> PrefixCache:
    kw.setdefault("fingerprint", "fake")
    return PrefixCache(model.make_cache, shared_url=url, shared_block_tokens=BLOCK, shared_timeout=0.3, **kw)


def serve(pc: PrefixCache, model: FakeModel, tokens: list[int]) -> int:
    with pc.begin(tokens) as s:
        assert_cold(model, s.caches, tokens, s.cached)
        prefill_and_commit(model, s, tokens)
        return s.cached


def first_block_key(pc: PrefixCache, tokens: list[int]) -> str:
    """The key of the first whole block of `tokens` as `pc` publishes it (the module's own chain)."""
    tier = pc._shared
    return tier.block_key(tier.chain(pc._namespace, np.asarray(tokens, dtype=np.int32), 1)[1])


@pytest.fixture(scope="module")
def redis_server():
    if find_redis_server() is None:
        pytest.skip("redis-server is not installed (make test installs it)")
    with RedisServer() as r:
        yield r


@pytest.fixture
def redis_url(redis_server):
    redis_server.flushall()
    return redis_server.url


@redis_needed
@pytest.mark.parametrize("kinds", ["KK", "KRK"])
def test_the_same_secret_shares(redis_server, redis_url, kinds):
    model = FakeModel(kinds=kinds, heads=1, dim=4)
    a = shared_cache(model, redis_url, shared_secret=b"s3cret")
    b = shared_cache(model, redis_url, shared_secret="s3cret")  # str: its UTF-8 bytes
    serve(a, model, PROMPT)
    a._shared.flush()
    values = [redis_server.client().get(k) for k in redis_server.client().keys("kvtrie:b:*")]
    assert values and all(v[:4] == MAGIC_MAC for v in values)
    got = serve(b, model, PROMPT + [7])  # equal to a cold run (serve checks)
    assert got == (100 if kinds == "KRK" else 96)
    stats = b.stats()
    assert stats["shared_restores"] == 1 and stats["shared_rejected"] == 0 and stats["shared_errors"] == 0
    check_invariants(b, (), model)
    a.close()
    b.close()


@redis_needed
@pytest.mark.parametrize("first, second", [(b"one", b"two"), (None, b"two"), (b"one", None)])
def test_other_secrets_or_none_share_nothing(redis_url, first, second):
    model = FakeModel(kinds="KRK", heads=1, dim=4)
    a = shared_cache(model, redis_url, shared_secret=first)
    b = shared_cache(model, redis_url, shared_secret=second)
    serve(a, model, PROMPT)
    a._shared.flush()
    assert a.stats()["shared_published"] > 0
    assert first_block_key(a, PROMPT) != first_block_key(b, PROMPT)
    assert serve(b, model, PROMPT + [7]) == 0
    assert b.stats()["shared_restores"] == 0 and b.stats()["shared_tokens"] == 0
    a.close()
    b.close()


@redis_needed
@pytest.mark.parametrize("forgery", ["bad_mac", "flipped_body", "unsigned", "other_secret"])
def test_a_value_that_fails_its_mac_is_a_miss_counted(redis_server, redis_url, forgery):
    model = FakeModel(heads=1, dim=4)
    client = redis_server.client()
    a = shared_cache(model, redis_url, shared_secret=b"s3cret")
    serve(a, model, PROMPT)
    a._shared.flush()
    key = first_block_key(a, PROMPT)
    good = client.get(key)
    assert good[:4] == MAGIC_MAC
    body = good[4 + MAC_SIZE :]
    if forgery == "bad_mac":  # the right key, the right body, a made-up MAC
        value = MAGIC_MAC + bytes(MAC_SIZE) + body
    elif forgery == "flipped_body":  # one byte of the body changed, the MAC kept
        value = good[:-9] + bytes([good[-9] ^ 0xFF]) + good[-8:]
    else:  # the same tokens published without a secret or with another, put under this key
        w = shared_cache(model, redis_url, shared_secret=None if forgery == "unsigned" else b"other")
        serve(w, model, PROMPT)
        w._shared.flush()
        value = client.get(first_block_key(w, PROMPT))
        w.close()
        assert value[:4] == (MAGIC if forgery == "unsigned" else MAGIC_MAC)
    client.set(key, value)
    b = shared_cache(model, redis_url, shared_secret=b"s3cret")
    assert serve(b, model, PROMPT + [7]) == 0  # the first block is rejected: nothing after it either
    stats = b.stats()
    assert stats["shared_rejected"] >= 1 and stats["shared_restores"] == 0 and stats["shared_tokens"] == 0
    check_invariants(b, (), model)
    # the genuine value back: b restores it
    client.set(key, good)
    c = shared_cache(model, redis_url, shared_secret=b"s3cret")
    assert serve(c, model, PROMPT + [8]) == 96 and c.stats()["shared_rejected"] == 0
    for pc in (a, b, c):
        pc.close()


def test_a_bad_secret_is_refused_before_anything_is_built(monkeypatch):
    model = FakeModel(heads=1, dim=4)
    built = []
    monkeypatch.setattr(SharedTier, "__init__", lambda self, *a, **k: built.append(1))
    made = []

    def make_cache():
        made.append(1)
        return model.make_cache()

    for bad, error in ((123, TypeError), (["x"], TypeError), (b"", ValueError), ("", ValueError)):
        with pytest.raises(error):
            PrefixCache(make_cache, fingerprint="fake", shared_url="redis://127.0.0.1:1/0", shared_secret=bad)
    with pytest.raises(ValueError):
        PrefixCache(make_cache, fingerprint="fake", shared_secret=b"no url")
    assert not built and not made


def test_without_a_secret_the_format_and_keys_are_as_before():
    tier = SharedTier("redis://127.0.0.1:1/0", fingerprint="f", layout=["L:kv"], kinds=("kv",), block_tokens=4, client=object())
    keyed = SharedTier("redis://127.0.0.1:1/0", fingerprint="f", layout=["L:kv"], kinds=("kv",), block_tokens=4,
                       client=object(), secret=b"x")
    tokens = np.arange(8, dtype=np.int32)
    import hashlib

    from kvtrie.disk import FORMAT

    root = hashlib.blake2b(f"kvtrie|{FORMAT}|f|['L:kv']|ns|4".encode(), digest_size=16).digest()
    assert tier.chain("ns", tokens, 2)[0] == root
    assert keyed.chain("ns", tokens, 2)[0] != root
    assert tier._header == 8 and keyed._header == 4 + MAC_SIZE
    tier.close()
    keyed.close()


def test_the_secret_file(tmp_path):
    f = tmp_path / "secret"
    f.write_bytes(b"hunter2\n")
    assert kserve.read_secret(str(f), "redis://x") == b"hunter2"
    f.write_bytes(b"hunter2")
    assert kserve.read_secret(str(f), "redis://x") == b"hunter2"
    assert kserve.read_secret(None, "redis://x") is None
    f.write_bytes(b"")
    with pytest.raises(SystemExit, match="empty"):
        kserve.read_secret(str(f), "redis://x")
    f.write_bytes(b"\n")
    with pytest.raises(SystemExit, match="empty"):
        kserve.read_secret(str(f), "redis://x")
    with pytest.raises(SystemExit, match="cannot read"):
        kserve.read_secret(str(tmp_path / "missing"), "redis://x")
    with pytest.raises(SystemExit, match="--shared-url"):
        kserve.read_secret(str(f), None)
    options = kserve.ServeOptions(cache_bytes=1 << 20, host_bytes=0, shared_url="redis://x", shared_secret=b"hunter2")
    assert "hunter2" not in repr(options)
