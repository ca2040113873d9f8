"""Cache control over HTTP: a real `kvtrie serve` on a loopback port, prefilled, pinned and cleared
through `/kvtrie/prefill`, `/kvtrie/pin` and `/kvtrie/cache`, with the miss reasons of its requests
in the log, `/kvtrie/stats` and `/metrics`."""

from __future__ import annotations

import json
import random
import threading
import urllib.error
import urllib.request

import pytest

pytest.importorskip("mlx_lm")
pytest.importorskip("prometheus_client")

from serving import cached_tokens, chat, chat_tokens, completion_ids, make_model_dir  # noqa: E402
from test_serve import SYSTEM, get_json, kvtrie_serve  # noqa: E402


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {arch: make_model_dir(root / arch, arch) for arch in ("llama", "qwen3_next")}


def call(url: str, method: str, path: str, body=None, raw: bytes | None = None) -> tuple[int, dict]:
    """One request; (status, parsed JSON body)."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(url + path, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        text = e.read()
        try:
            return e.code, json.loads(text)
        except json.JSONDecodeError:
            return e.code, {"text": text.decode(errors="replace")}


def ok(url: str, method: str, path: str, body=None) -> dict:
    status, out = call(url, method, path, body)
    assert status == 200, out
    return out


def sequences(seed: int, n: int, length: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(10, 250) for _ in range(length)] for _ in range(n)]


def pressure(url: str, seed: int, n: int = 10, length: int = 150) -> None:
    """Sequences that come back once each (so the policy learns how soon things come back):
    past the budget, what is not used for longer than that goes."""
    for s in sequences(seed, n, length):
        ok(url, "POST", "/kvtrie/prefill", {"tokens": s})
        ok(url, "POST", "/kvtrie/prefill", {"tokens": s + [5]})


def test_prefill_pin_and_clear_over_http(model_dirs, tmp_path):
    """A prefilled system prompt is what the next chat restores; a pinned prefix survives pressure
    that evicts an unpinned one; DELETEs unpin and clear."""
    d = model_dirs["llama"]
    system = [{"role": "system", "content": SYSTEM}]
    with kvtrie_serve(d, tmp_path, "--prompt-cache-bytes", "400000") as srv:
        url = srv.url
        out = ok(url, "POST", "/kvtrie/prefill", {"messages": system, "add_generation_prompt": False, "pin": True})
        rendered = chat_tokens(d, system)  # (with the generation prompt: the chat endpoint's rendering)
        prefix = rendered[: out["tokens_stored"]]
        assert out["cached_before"] == 0 and out["pinned"] is True
        assert 0 < out["tokens_stored"] < len(rendered)
        msgs = system + [{"role": "user", "content": "Which animals live in the forest?"}]
        prompt = chat_tokens(d, msgs)
        assert prompt[: len(prefix)] == prefix
        assert cached_tokens(chat(url, msgs, max_tokens=4)) == len(prefix)  # the prefill is what it restored
        # messages rendered as /v1/chat/completions renders them: the same tokens
        out = ok(url, "POST", "/kvtrie/prefill", {"messages": msgs})
        assert out["tokens_stored"] == len(prompt) and out["cached_before"] >= len(prompt) - 1

        # pressure: the pinned prefix stays, an unpinned one (used twice, then idle) goes
        unpinned = sequences(1, 1, 150)[0]
        ok(url, "POST", "/kvtrie/prefill", {"tokens": unpinned})
        ok(url, "POST", "/kvtrie/prefill", {"tokens": unpinned + [5]})
        pressure(url, seed=2)
        stats = get_json(url, "/kvtrie/stats")
        (model,) = stats["models"].values()
        assert model["evictions"] > 0 and model["pins"] == 1 and model["pinned_bytes"] > 0
        assert ok(url, "POST", "/kvtrie/prefill", {"tokens": prefix + [7]})["cached_before"] == len(prefix)
        assert ok(url, "POST", "/kvtrie/prefill", {"tokens": unpinned + [5, 6]})["cached_before"] < len(unpinned)

        # pin / unpin what is stored, by tokens
        assert ok(url, "POST", "/kvtrie/pin", {"tokens": unpinned, "ttl": 60})["tokens_pinned"] == len(unpinned)
        assert ok(url, "DELETE", "/kvtrie/pin", {"tokens": unpinned})["tokens_unpinned"] == len(unpinned)
        assert ok(url, "DELETE", "/kvtrie/pin", {"messages": system, "add_generation_prompt": False}) == {
            "tokens_unpinned": len(prefix)}
        firsts = {prompt[0], unpinned[0], *(q[0] for q in sequences(2, 10, 150))}
        never = next(t for t in range(10, 250) if t not in firsts)
        assert ok(url, "POST", "/kvtrie/pin", {"tokens": [never, 2, 3]})["tokens_pinned"] == 0  # nothing stored

        # clear one prefix, then everything
        dropped = ok(url, "DELETE", "/kvtrie/cache", {"tokens": unpinned})["tokens_dropped"]
        assert dropped >= len(unpinned)
        assert ok(url, "POST", "/kvtrie/prefill", {"tokens": unpinned + [5, 6]})["cached_before"] == 0
        assert ok(url, "DELETE", "/kvtrie/cache", {"namespace": "nobody"})["tokens_dropped"] == 0
        assert ok(url, "DELETE", "/kvtrie/cache")["tokens_dropped"] > 0
        (model,) = get_json(url, "/kvtrie/stats")["models"].values()
        assert model["tokens_stored"] == 0 and model["pins"] == 0
        assert cached_tokens(chat(url, msgs, max_tokens=4)) == 0


def test_bad_requests_get_json_errors(model_dirs, tmp_path):
    d = model_dirs["llama"]
    with kvtrie_serve(d, tmp_path) as srv:
        url = srv.url
        cases = [
            ("POST", "/kvtrie/prefill", {}, 400),
            ("POST", "/kvtrie/prefill", {"tokens": "abc"}, 400),
            ("POST", "/kvtrie/prefill", {"tokens": [1, -2]}, 400),
            ("POST", "/kvtrie/prefill", {"tokens": []}, 400),
            ("POST", "/kvtrie/prefill", {"tokens": [1], "prompt": "x"}, 400),
            ("POST", "/kvtrie/prefill", {"tokens": [1, 2], "ttl": -1, "pin": True}, 400),
            ("POST", "/kvtrie/prefill", {"tokens": [1, 2], "pin": "yes"}, 400),
            ("POST", "/kvtrie/prefill", {"messages": [{"content": "no role"}]}, 400),
            ("POST", "/kvtrie/prefill", {"messages": [{"role": "user", "content": [{"type": "image"}]}]}, 400),
            ("POST", "/kvtrie/pin", {"prompt": 3}, 400),
            ("DELETE", "/kvtrie/cache", {"namespace": 1}, 400),
            ("POST", "/kvtrie/unknown", {}, 404),
            ("DELETE", "/v1/chat/completions", None, 404),
            ("POST", "/kvtrie/stats", {}, 405),
            ("DELETE", "/kvtrie/prefill", None, 405),
        ]
        for method, path, body, status in cases:
            got, out = call(url, method, path, body)
            assert got == status, (method, path, body, out)
            assert set(out["error"]) == {"message", "type"} and out["error"]["message"], out
        got, out = call(url, "POST", "/kvtrie/prefill", raw=b"{not json")
        assert got == 400 and "invalid JSON" in out["error"]["message"]
        got, out = call(url, "POST", "/kvtrie/prefill", raw=b"[1, 2]")
        assert got == 400 and "JSON object" in out["error"]["message"]
        (model,) = get_json(url, "/kvtrie/stats")["models"].values() or [{"tokens_stored": 0}]
        assert model["tokens_stored"] == 0  # nothing was stored by a refused request


def test_miss_reasons_in_the_log_stats_and_metrics(model_dirs, tmp_path):
    """A scripted sequence: a new prefix, then the same conversation evicted under a small budget."""
    d = model_dirs["llama"]
    msgs = [{"role": "system", "content": "You answer in one word. " * 12},
            {"role": "user", "content": "Name a bird that cannot fly."}]
    with kvtrie_serve(d, tmp_path, "--prompt-cache-bytes", "400000") as srv:
        url = srv.url
        r = chat(url, msgs, max_tokens=4, logprobs=True)
        assert cached_tokens(r) == 0
        follow = msgs + [{"role": "assistant", "content": r["choices"][0]["message"]["content"]},
                         {"role": "user", "content": "And one that swims?"}]
        assert cached_tokens(chat(url, follow, max_tokens=4)) > 0  # reused: the policy learns when it comes back
        pressure(url, seed=3)
        assert cached_tokens(chat(url, follow, max_tokens=4)) < len(chat_tokens(d, msgs))
        stats = get_json(url, "/kvtrie/stats")
        metrics = urllib.request.urlopen(url + "/metrics", timeout=30).read().decode()
        log = srv.log_text()
    reasons = stats["miss_reasons"]
    assert reasons["new_prefix"] == 1 and reasons["evicted"] == 1, reasons
    assert sum(reasons.values()) == 2
    lines = [ln for ln in log.splitlines() if "request:" in ln]
    assert len(lines) == 3
    assert lines[0].endswith("miss: new_prefix") and "miss:" not in lines[1] and lines[2].endswith("miss: evicted")

    from prometheus_client.parser import text_string_to_metric_families

    families = {f.name: f for f in text_string_to_metric_families(metrics)}
    samples = {s.labels["reason"]: s.value for s in families["kvtrie_misses"].samples if s.name == "kvtrie_misses_total"}
    assert samples["evicted"] == 1 and samples["new_prefix"] == 1 and samples["not_cached"] == 0


def test_a_prefilled_system_prompt_restores_on_a_hybrid_model(model_dirs, tmp_path):
    """qwen3_next: the prefill stores the recurrent state at the prefix's end, so a chat on it
    restores all of it."""
    d = model_dirs["qwen3_next"]
    system = [{"role": "system", "content": SYSTEM}]
    with kvtrie_serve(d, tmp_path, "--prompt-cache-bytes", "64M") as srv:
        out = ok(srv.url, "POST", "/kvtrie/prefill", {"messages": system, "add_generation_prompt": False, "pin": True})
        assert out["pinned"] is True
        msgs = system + [{"role": "user", "content": "Which animals live in the sea?"}]
        assert cached_tokens(chat(srv.url, msgs, max_tokens=4)) == out["tokens_stored"]


def test_prefills_run_safely_beside_concurrent_chats(model_dirs, tmp_path):
    """Prefills (on the generation thread, between batch steps) while chats run in a batch: every
    greedy reply equals the reply the same server gave with nothing else running."""
    d = model_dirs["llama"]
    chats = [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"User {u} asks about owls."}]
             for u in range(3)]
    errors: list = []
    with kvtrie_serve(d, tmp_path, "--prompt-cache-bytes", "64M") as srv:
        url = srv.url
        alone = [completion_ids(chat(url, m, max_tokens=8, logprobs=True)) for m in chats]
        ok(url, "DELETE", "/kvtrie/cache")
        replies: dict[int, list] = {}

        def client(i: int) -> None:
            try:
                replies[i] = completion_ids(chat(url, chats[i], max_tokens=8, logprobs=True))
            except Exception as exc:  # reported below
                errors.append(exc)

        def prefiller() -> None:
            try:
                for s in sequences(4, 6, 120):
                    ok(url, "POST", "/kvtrie/prefill", {"tokens": s, "pin": True, "ttl": 30})
            except Exception as exc:
                errors.append(exc)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(3)] + [threading.Thread(target=prefiller)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not errors, errors
        (model,) = get_json(url, "/kvtrie/stats")["models"].values()
    assert [replies[i] for i in range(3)] == alone
    assert model["pins"] == 6
