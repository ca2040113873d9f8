"""Tenants (`kvtrie serve --api-keys`): every /v1/* and /kvtrie/* request needs a key, each
tenant's cache is its own namespace on every tier (memory, disk, the shared Redis tier), and a
request's `cache_salt` separates caches further. Real servers, driven by the OpenAI and
Anthropic SDKs the way agents' clients call them."""

from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.request

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvtrie.tenants import (
    DEFAULT_TENANT,
    KeysFileError,
    Tenants,
    check_salt,
    namespace_for,
    presented_key,
    tenant_of,
)

KEY_A, KEY_B, KEY_ADMIN = "key-a-0123456789abcdef", "key-b-0123456789abcdef", "key-admin-0123456789abcd"
KEYS = f"# tenants of the test server\n{KEY_A} alice\n{KEY_B} bob\n\n{KEY_ADMIN} ops admin\n"
ALICE_ONLY = "Alice's private notes on the rare books room, its keys and its hours. " * 3
ALICE_TOO = "Alice's other notes, on the map room and its drawers. " * 3
SYSTEM = "You are the librarian of a large library and you answer questions about its shelves. " * 3


# --- the keys file and namespaces (no server) -----------------------------------------------


def test_a_keys_file_names_tenants_and_admins():
    tenants = Tenants.parse(KEYS)
    assert tenants.names == {"alice", "bob", "ops"}
    assert tenants.authenticate({"Authorization": f"Bearer {KEY_A}"}).name == "alice"
    assert tenants.authenticate({"x-api-key": KEY_B}).name == "bob"
    assert tenants.authenticate({"x-api-key": KEY_ADMIN}).admin
    assert not tenants.authenticate({"x-api-key": KEY_A}).admin
    for headers in ({}, {"Authorization": "Bearer "}, {"Authorization": f"Basic {KEY_A}"}, {"x-api-key": KEY_A + "x"}):
        assert tenants.authenticate(headers) is None


@pytest.mark.parametrize("text, says", [
    ("", "no keys"),
    ("short alice\n", "at least 16"),
    (f"{KEY_A} alice extra\n", "KEY TENANT"),
    (f"{KEY_A}\n", "KEY TENANT"),
    (f"{KEY_A} default\n", "'default'"),
    (f"{KEY_A} al/ice\n", "tenant name"),
    (f"{KEY_A} alice\n{KEY_A} bob\n", "already given"),
])
def test_a_bad_keys_file_is_refused_saying_which_line(text, says):
    with pytest.raises(KeysFileError, match=says):
        Tenants.parse(text)


@given(st.dictionaries(st.text("abcdefghijklmnopqrstuvwxyz0123456789-_", min_size=16, max_size=40),
                       st.from_regex(r"[a-z][a-z0-9_.-]{0,20}", fullmatch=True).filter(lambda n: n != DEFAULT_TENANT),
                       min_size=1, max_size=6),
       st.text(min_size=1, max_size=40))
def test_each_key_authenticates_its_own_tenant_and_nothing_else_does(keys, other):
    tenants = Tenants.parse("".join(f"{k} {t}\n" for k, t in keys.items()))
    for key, tenant in keys.items():
        assert tenants.authenticate({"Authorization": f"Bearer {key}"}).name == tenant
        assert tenants.authenticate({"x-api-key": key}).name == tenant
    if other.strip() not in keys:
        assert tenants.authenticate({"x-api-key": other}) is None


@given(st.one_of(st.none(), st.sampled_from(["alice", "bob"])), st.one_of(st.none(), st.text(min_size=1, max_size=50)))
def test_namespaces_separate_tenants_and_salts(tenant, salt):
    ns = namespace_for(tenant, salt)
    assert tenant_of(ns) == (tenant or DEFAULT_TENANT)
    assert (ns == (tenant or DEFAULT_TENANT)) == (salt is None)
    assert namespace_for(tenant, salt) == ns and namespace_for(tenant, (salt or "") + "!") != ns


@pytest.mark.parametrize("bad, error", [(3, TypeError), ("", ValueError), ("x" * 1025, ValueError), ([], TypeError)])
def test_a_bad_cache_salt_is_refused(bad, error):
    with pytest.raises(error, match="cache_salt"):
        check_salt(bad)


def test_presented_key_reads_both_headers():
    assert presented_key({"Authorization": "bearer  abc "}) == "abc"
    assert presented_key({"x-api-key": "xyz"}) == "xyz"
    assert presented_key({}) is None


# --- a real server ---------------------------------------------------------------------------

mlx_lm = pytest.importorskip("mlx_lm")
openai = pytest.importorskip("openai")
anthropic = pytest.importorskip("anthropic")
from redis_servers import RedisServer, find_redis_server  # noqa: E402
from serving import ServerProcess, free_port, make_model_dir  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("tenants")
    keys = root / "keys"
    keys.write_text(KEYS)
    keys.chmod(0o600)
    return {"root": root, "keys": keys, "model": make_model_dir(root / "llama", "llama")}


def start(setup, *flags: str, name: str) -> ServerProcess:
    port = free_port()
    cmd = [sys.executable, "-m", "kvtrie.serve", "--model", str(setup["model"]), "--host", "127.0.0.1",
           "--port", str(port), "--max-tokens", "4", "--prompt-cache-bytes", "64M", "--no-next-turn", *flags]
    return ServerProcess(cmd, port, log_path=setup["root"] / f"{name}.log")


def oai(server, key: str):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=120)


def ask(server, key: str, question: str, system: str = SYSTEM, **extra) -> int:
    """One greedy chat turn through the OpenAI SDK: the tokens the server restored."""
    r = oai(server, key).chat.completions.create(
        model="default_model", max_tokens=4, temperature=0,
        messages=[{"role": "system", "content": system}, {"role": "user", "content": question}],
        extra_body=extra or None)
    return r.usage.prompt_tokens_details.cached_tokens


def ask_anthropic(server, key: str, question: str, system: str = SYSTEM) -> int:
    client = anthropic.Anthropic(base_url=server.url, api_key=key, max_retries=0, timeout=120)
    m = client.messages.create(model="m", max_tokens=4, system=system, messages=[{"role": "user", "content": question}])
    return m.usage.cache_read_input_tokens


def request(server, method: str, path: str, body=None, headers=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(server.url + path, data=data, method=method,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        raw = e.read()
        return e.code, json.loads(raw) if raw.startswith(b"{") else raw


def test_requests_without_a_known_key_get_401_in_the_endpoint_shape(setup):
    with start(setup, "--api-keys", str(setup["keys"]), name="auth") as server:
        assert request(server, "GET", "/health")[0] == 200  # open
        status, body = request(server, "POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})
        assert status == 401 and body["error"]["code"] == "invalid_api_key"
        status, body = request(server, "POST", "/v1/messages", {"model": "m", "max_tokens": 4,
                                                                "messages": [{"role": "user", "content": "hi"}]},
                               headers={"x-api-key": "not-a-key-0123456789"})
        assert status == 401 and body["type"] == "error" and body["error"]["type"] == "authentication_error"
        status, body = request(server, "GET", "/kvtrie/stats")
        assert status == 401 and body["error"]["type"] == "authentication_error"
        assert request(server, "GET", "/v1/models")[0] == 401
        assert request(server, "DELETE", "/kvtrie/cache", {})[0] == 401
        with pytest.raises(openai.AuthenticationError):
            ask(server, "wrong-key-0123456789abcdef", "Where are the maps?")
        with pytest.raises(anthropic.AuthenticationError):
            ask_anthropic(server, "wrong-key-0123456789abcdef", "Where are the maps?")
        # the key is checked before any body is read: a client without one that declares 30 MB gets
        # its 401 at once, and the connection closes
        import http.client
        conn = http.client.HTTPConnection("127.0.0.1", int(server.url.rsplit(":", 1)[1]), timeout=10)
        conn.putrequest("POST", "/v1/chat/completions")
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str(30 << 20))
        conn.endheaders(b'{"messages": [')
        reply = conn.getresponse()
        assert reply.status == 401 and json.loads(reply.read())["error"]["code"] == "invalid_api_key"
        assert reply.getheader("Connection") == "close"
        conn.close()
        # nothing was served or stored on a refused request
        status, stats = request(server, "GET", "/kvtrie/stats", headers={"x-api-key": KEY_ADMIN})
        assert status == 200 and stats["requests"] == 0 and stats["tenants"] == {}
        # and the keys work with both SDKs
        assert ask(server, KEY_A, "Where are the maps?") == 0
        assert ask_anthropic(server, KEY_A, "Where are the maps?") > 0


redis_needed = pytest.mark.skipif(find_redis_server() is None, reason="redis-server is not installed (make test installs it)")


@redis_needed
def test_a_tenant_never_restores_another_tenants_prefix_on_any_tier(setup):
    """Memory, then the disk tier after a restart, then a second server reading the shared Redis:
    alice's prompt restores for alice on each, and 0 tokens for bob or for alice's salted requests."""
    disk = setup["root"] / "disk"
    secret = setup["root"] / "secret"
    secret.write_text("a shared secret of the fleet\n")
    with RedisServer() as redis:
        shared = ("--shared-url", redis.url, "--shared-block-tokens", "16", "--shared-secret-file", str(secret))
        flags = ("--api-keys", str(setup["keys"]), "--disk-dir", str(disk), "--persist-seconds", "0.2", *shared)
        question = "Which shelf holds the atlases?"
        with start(setup, *flags, name="first") as server:
            assert ask(server, KEY_A, question) == 0
            warm = ask(server, KEY_A, question)
            assert warm > 0  # memory tier
            assert ask(server, KEY_B, question) == 0  # another tenant: nothing
            other = "Another library, another librarian. " * 4
            assert ask(server, KEY_A, "Who reads the maps?", system=other) < 16  # (the template's first tokens)
            # by either API: bob restores only the template's first tokens, from his own request
            assert ask_anthropic(server, KEY_B, "Who reads the maps?", system=other) < 16
            assert ask_anthropic(server, KEY_A, "Who reads the maps?", system=other) > 32
            assert ask(server, KEY_A, question, cache_salt="private") == 0  # a salted request: nothing
            assert ask(server, KEY_A, question, cache_salt="private") == warm  # its own salt restores
            assert ask(server, KEY_A, question) == warm  # alice's unsalted cache is intact
            # a tenant sees its own figures only; the admin sees every tenant
            status, own = request(server, "GET", "/kvtrie/stats", headers={"Authorization": f"Bearer {KEY_B}"})
            assert status == 200 and own["tenant"] == "bob" and "tenants" not in own and "models" not in own
            assert own["requests"] == 2 and own["cached_tokens"] < 16
            assert own["miss_reasons"].get("other_namespace") is None  # never told that others hold it
            status, full = request(server, "GET", "/kvtrie/stats", headers={"x-api-key": KEY_ADMIN})
            assert set(full["tenants"]) == {"alice", "bob"} and full["tenants"]["alice"]["cached_tokens"] >= 3 * warm
            assert request(server, "GET", "/metrics", headers={"x-api-key": KEY_B})[0] == 403
            # control endpoints act on the caller's own namespace
            status, body = request(server, "POST", "/kvtrie/pin", {"tokens": [1, 2, 3], "namespace": "alice"},
                                   headers={"x-api-key": KEY_B})
            assert status == 403 and body["error"]["type"] == "permission_error"
            assert request(server, "DELETE", "/kvtrie/cache", {}, headers={"x-api-key": KEY_B})[0] == 200
            assert ask(server, KEY_A, question) == warm  # bob's clear left alice's cache alone
            # a conversation only alice has had, for the other tiers (bob's own requests went to disk and Redis too)
            assert ask(server, KEY_A, question, system=ALICE_ONLY) < 16
            assert ask(server, KEY_A, question, system=ALICE_TOO) < 16
            time.sleep(1.0)  # on disk (persist period) and published to Redis
        with start(setup, *flags, name="restarted") as server:  # the disk tier after a restart
            assert ask(server, KEY_B, question, system=ALICE_TOO) < 16  # (the template's first tokens: bob's own)
            assert ask(server, KEY_A, question, system=ALICE_TOO) > 64  # (from disk)
        with start(setup, "--api-keys", str(setup["keys"]), *shared, name="second") as other:  # Redis only
            assert ask(other, KEY_B, question, system=ALICE_ONLY) == 0  # (blocks of 16: not even the template's start)
            assert ask(other, KEY_A, question, system=ALICE_ONLY, cache_salt="other") == 0
            assert ask(other, KEY_A, question, system=ALICE_ONLY) >= 64  # whole blocks from the shared tier
            status, full = request(other, "GET", "/kvtrie/stats", headers={"x-api-key": KEY_ADMIN})
            (model,) = full["models"].values()
            assert model["shared_restores"] >= 1


def test_without_keys_everyone_is_one_tenant_and_a_salt_still_separates(setup):
    with start(setup, name="open") as server:
        question = "Where are the newspapers kept?"
        assert ask(server, "none", question) == 0
        warm = ask(server, "anything", question)
        assert warm > 0  # no keys: one namespace, as before
        assert ask(server, "none", question, cache_salt="s1") == 0
        assert ask(server, "none", question, cache_salt="s1") == warm
        status, body = request(server, "POST", "/v1/chat/completions",
                               {"messages": [{"role": "user", "content": "hi"}], "cache_salt": 7})
        assert status == 400 and body["error"]["param"] == "cache_salt"
        status, stats = request(server, "GET", "/kvtrie/stats")
        assert status == 200 and stats["tenants"]["default"]["requests"] == 4


def test_a_tenants_burst_leaves_the_others_cache_alone(setup):
    """`--tenant-bytes 50%`: bob fills memory several times over with new conversations; alice's
    conversation, within her share, restores whole afterwards. /metrics (admin) has per-tenant figures."""
    flags = ("--api-keys", str(setup["keys"]), "--prompt-cache-bytes", "1M", "--tenant-bytes", "50%")
    with start(setup, *flags, name="shares") as server:
        question = "Which shelf holds the atlases?"
        assert ask(server, KEY_A, question, system=ALICE_ONLY) == 0
        warm = ask(server, KEY_A, question, system=ALICE_ONLY)
        assert warm > 64
        for i in range(24):  # ~24 x 170 tokens x 512 B: three times what 1M holds
            ask(server, KEY_B, f"Question {i}?", system=f"Bob's burst number {i} of many. " * 8)
        assert ask(server, KEY_A, question, system=ALICE_ONLY) == warm
        status, full = request(server, "GET", "/kvtrie/stats", headers={"x-api-key": KEY_ADMIN})
        assert full["held_bytes"] <= 1 << 20
        bob, alice = full["tenants"]["bob"], full["tenants"]["alice"]
        assert bob["device_bytes"] + bob["host_bytes"] > 0 and bob["requests"] == 24
        assert alice["hit_rate"] > 0.5
        req = urllib.request.Request(server.url + "/metrics", headers={"x-api-key": KEY_ADMIN})
        with urllib.request.urlopen(req, timeout=30) as r:
            text = r.read().decode()
        assert 'kvtrie_tenant_requests_total{tenant="bob"} 24.0' in text
        assert 'kvtrie_tenant_bytes{tenant="alice",tier="device"}' in text
