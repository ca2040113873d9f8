"""Hostile input never hurts `kvtrie serve` (kvtrie.guard): a real server on a loopback port, a
barrage of hostile request bodies over raw HTTP, and slow clients.

Every hostile body (malformed JSON, invalid UTF-8, a wrong type or an absurd number at every
field mlx_lm.server reads, unknown roles and content parts, deep nesting, a body past
`--max-request-bytes`, a prompt past `--max-prompt-tokens`, a bad Content-Length) gets a 4xx in
its endpoint's error shape; the generation thread stays up (`/health` 200 after each), and the
cache is as it was (`/kvtrie/stats`), so a good request gets the same greedy reply after the
barrage as before. A client that stalls while sending is dropped after `--request-timeout`,
and others are served meanwhile.

The unit tests drive `kvtrie.guard` alone, and mlx_lm.server's own handler and generation-thread
code on what the guard admits: nothing it lets through is refused or crashes there.
"""

from __future__ import annotations

import http.client
import io
import json
import socket
import sys
import threading
import time
from email.message import Message
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

pytest.importorskip("mlx_lm")

from serving import CHAT_TEMPLATE, ServerProcess, chat, free_port, load_tokenizer, make_model_dir, reply_text  # noqa: E402

from kvtrie import guard  # noqa: E402

MAX_BYTES = 64 << 10  # the server's --max-request-bytes
MAX_PROMPT = 512  # its --max-prompt-tokens
TIMEOUT = 2.0  # its --request-timeout
VOCAB = 384  # the tiny model's (tests/serving.py)
CONTEXT = 4096  # its max_position_embeddings
# the tiny model's template, refusing a conversation that opens with an assistant turn (as many templates
# refuse a role order): that error is raised on the generation thread and must come back as a 400
TEMPLATE = ("{%- if messages[0]['role'] == 'assistant' %}"
            "{{- raise_exception('Conversations must start with a user or system message') }}{%- endif %}"
            + CHAT_TEMPLATE)
GOOD = [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "What is a cache?"}]
LONG_TEXT = "the quick brown fox jumps over the lazy dog " * 140  # > MAX_PROMPT tokens, < MAX_BYTES bytes

CHAT, CHAT2, TEXT, MESSAGES, PREFILL = (
    "/v1/chat/completions", "/chat/completions", "/v1/completions", "/v1/messages", "/kvtrie/prefill")


def barrage_examples() -> int:
    """The barrage's size: a multiple of the hypothesis profile's (tests/conftest.py: ci 50, dev 30)."""
    return 6 * settings().max_examples


# --- the server ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("models") / "llama", "llama")


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("logs") / "server.log"
    cmd = [sys.executable, "-m", "kvtrie.serve", "--model", str(model_dir), "--host", "127.0.0.1", "--port", str(port),
           "--max-tokens", "8", "--prompt-cache-bytes", "64M", "--no-next-turn", "--chat-template", TEMPLATE,
           "--max-request-bytes", "64K", "--max-prompt-tokens", str(MAX_PROMPT), "--request-timeout", str(TIMEOUT)]
    with ServerProcess(cmd, port, log_path=log) as srv:
        yield srv


def send(srv, path: str, raw: bytes, *, length: str | None = "auto", timeout: float = 60.0) -> tuple[int, dict, bytes]:
    """One raw POST: `length` "auto" (the body's size), None (no Content-Length) or the header's
    text; (status, headers, body)."""
    conn = http.client.HTTPConnection(srv.host, srv.port, timeout=timeout)
    try:
        conn.putrequest("POST", path, skip_accept_encoding=True)
        conn.putheader("Content-Type", "application/json")
        if length is not None:
            conn.putheader("Content-Length", str(len(raw)) if length == "auto" else length)
        conn.endheaders()
        if raw:
            conn.send(raw)
        r = conn.getresponse()
        return r.status, dict(r.getheaders()), r.read()
    finally:
        conn.close()


def get(srv, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(srv.host, srv.port, timeout=30)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def cache_state(srv) -> dict:
    status, data = get(srv, "/kvtrie/stats")
    assert status == 200
    stats = json.loads(data)
    models = {k: (m["tokens_stored"], m["sequences"], m["nodes"]) for k, m in stats["models"].items()}
    return {k: stats[k] for k in ("requests", "prompt_tokens", "cached_tokens", "hit_rate")} | {"models": models}


def assert_error_shape(path: str, status: int, data: bytes) -> dict:
    """A 4xx whose body is the endpoint's error JSON."""
    assert 400 <= status < 500, (status, data[:300])
    body = json.loads(data)
    if path == MESSAGES:
        assert body["type"] == "error" and set(body["error"]) == {"type", "message"}, body
        assert body["error"]["type"] in ("invalid_request_error", "not_found_error", "request_too_large"), body
        assert isinstance(body["error"]["message"], str) and body["error"]["message"], body
    elif path.startswith("/kvtrie/"):
        assert set(body) == {"error"} and set(body["error"]) == {"message", "type"}, body
        assert body["error"]["message"], body
    else:
        assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
        assert body["error"]["type"] == "invalid_request_error" and body["error"]["message"], body
    return body


# --- hostile bodies --------------------------------------------------------------------------

USER = {"role": "user", "content": "hi"}
VALID = {
    CHAT: {"model": "default_model", "messages": [USER], "max_tokens": 2, "temperature": 0.0},
    TEXT: {"model": "default_model", "prompt": "hi", "max_tokens": 2, "temperature": 0.0},
    MESSAGES: {"model": "m", "max_tokens": 2, "messages": [USER]},
    PREFILL: {"tokens": [5, 6, 7]},
}
VALID[CHAT2] = VALID[CHAT]

JUNK = {type(None): st.none(), bool: st.booleans(), str: st.text(max_size=8), list: st.lists(st.integers(), max_size=3),
        dict: st.dictionaries(st.text(max_size=4), st.integers(), max_size=2), int: st.integers(-5, 5),
        float: st.floats(-10, 10)}
junk = st.one_of(*JUNK.values())


def not_(kinds, *more, null: bool = True):
    """A value of none of the JSON types `kinds` (a boolean is no int), null unless `null` is False, or one of `more`."""
    return st.one_of(*[s for t, s in JUNK.items() if t not in kinds and (null or t is not type(None))], *more)


ints = not_((int, float), st.floats(-3, 3).filter(lambda f: f != int(f)))
ints_not_null = not_((int, float), st.floats(-3, 3).filter(lambda f: f != int(f)), null=False)
big = st.integers(min_value=10 ** 20, max_value=10 ** 30)
OPENAI_FIELDS = {
    "model": st.one_of(not_((str,)), st.text(max_size=12).filter(lambda s: s != "default_model")),
    "draft_model": st.one_of(not_((str,), null=False), st.just("some/draft")),
    "adapters": not_((str,), null=False),
    "stream": not_((bool,)),
    "stream_options": st.one_of(not_((dict,), null=False),
                                st.just({"include_usage": "yes"}), st.just({"include_usage": 1})),
    "max_tokens": st.one_of(ints, st.integers(max_value=0), st.integers(CONTEXT + 1, 10 ** 30)),
    "max_completion_tokens": st.one_of(ints_not_null, st.integers(max_value=0), big),
    "temperature": st.one_of(not_((int, float)), st.floats(max_value=-1e-6), st.floats(2e6, 1e300)),
    "top_p": st.one_of(not_((int, float)), st.floats(max_value=-1e-6), st.floats(1.000001, 1e9)),
    "min_p": st.one_of(not_((int, float)), st.floats(-5, -1e-6), st.floats(1.000001, 5)),
    "top_k": st.one_of(ints, st.integers(max_value=-1), st.integers(VOCAB, 10 ** 12)),
    "xtc_probability": st.one_of(not_((float,)), st.floats(-2, -1e-6), st.floats(1.000001, 3)),
    "xtc_threshold": st.one_of(not_((float,)), st.floats(-2, -1e-6), st.floats(0.500001, 3)),
    "num_draft_tokens": st.one_of(ints, st.integers(max_value=-1), st.integers(257, 10 ** 12)),
    "repetition_penalty": st.one_of(not_((int, float)), st.floats(-1e9, -1e-6), st.floats(1.1e6, 1e300)),
    "presence_penalty": st.one_of(not_((int, float)), st.floats(1.1e6, 1e300), st.floats(-1e300, -1.1e6)),
    "frequency_penalty": st.one_of(not_((int, float)), st.floats(1.1e6, 1e300)),
    "repetition_context_size": st.one_of(ints, st.integers(max_value=-1), big),
    "presence_context_size": st.one_of(ints, st.integers(2 ** 31, 2 ** 70)),
    "frequency_context_size": st.one_of(ints, st.integers(max_value=-1)),
    "logprobs": not_((bool,)),
    "top_logprobs": st.one_of(ints, st.integers(max_value=-2), st.integers(12, 10 ** 9)),
    "seed": st.one_of(not_((int,), st.floats(-3, 3), null=False),
                      st.integers(max_value=-1), st.integers(2 ** 64, 2 ** 80)),
    "n": st.one_of(ints_not_null, st.integers(2, 100), st.integers(max_value=0)),
    "logit_bias": st.one_of(
        not_((dict,), null=False),
        st.builds(lambda k: {k: 1.0}, st.one_of(st.integers(VOCAB, 10 ** 12).map(str), st.integers(-10 ** 6, -1).map(str),
                                                st.text(max_size=4).filter(lambda s: not s.isdigit()))),
        st.builds(lambda v: {"5": v}, not_((int, float), st.floats(2e6, 1e300), st.floats(-1e300, -2e6)))),
    "stop": st.one_of(not_((str, list), null=False), st.lists(not_((str,)), min_size=1, max_size=3),
                      st.just(["x"] * 65)),
    "chat_template_kwargs": st.one_of(not_((dict,), null=False),
                                      st.sampled_from(sorted(guard.TEMPLATE_PARAMETERS)).map(lambda k: {k: False})),
}
PART = st.one_of(
    not_((dict,)),
    st.fixed_dictionaries({"type": st.one_of(not_((str,)), st.sampled_from(["video", "file", "audio", ""]))}),
    st.fixed_dictionaries({"type": st.just("text")}, optional={"text": not_((str,))}),
    st.fixed_dictionaries({"type": st.sampled_from(list(guard.IMAGE_PARTS)),  # the tiny model reads text only
                           "image_url": st.one_of(junk, st.just({"url": "http://127.0.0.1:9/x.png"}))}),
)
BAD_MESSAGE = st.one_of(
    not_((dict,)),
    st.fixed_dictionaries({"role": st.one_of(not_((str,)), st.text(max_size=10).filter(lambda r: r not in guard.ROLES)),
                           "content": st.just("hi")}),
    st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "developer"]), "content": not_((str, list))}),
    st.fixed_dictionaries({"role": st.sampled_from(guard.ROLES), "content": st.lists(PART, min_size=1, max_size=3)}),
    st.fixed_dictionaries({"role": st.just("assistant"), "content": st.none(),
                           "tool_calls": st.one_of(not_((list,), null=False),
                                                   st.lists(not_((dict,)), min_size=1, max_size=2),
                                                   st.just([{"function": {"name": "f", "arguments": "{not json"}}]),
                                                   st.just([{"function": "f"}]))}),
    st.fixed_dictionaries({"role": st.sampled_from(guard.ROLES), "content": st.just("x"), "name": not_((str,), null=False)}),
)
CHAT_FIELDS = {
    "messages": st.one_of(not_((list,)), st.just([]),
                          st.builds(lambda bad, i: [USER][:i] + [bad] + [USER], BAD_MESSAGE, st.integers(0, 1))),
    "tools": st.one_of(not_((list,), null=False), st.lists(not_((dict,)), min_size=1, max_size=2),
                       st.just([{"type": "retrieval"}]), st.just([{"type": "function", "function": {"name": 5}}]),
                       st.just([{"type": "function", "function": {"name": "f", "parameters": "x"}}])),
    "role_mapping": st.one_of(not_((dict,), null=False), st.just({"user": 5})),
}
TEXT_FIELDS = {"prompt": st.one_of(not_((str,)), st.lists(st.integers(0, 300), min_size=1, max_size=5))}
MESSAGES_FIELDS = {
    "model": not_((str,)),
    "max_tokens": st.one_of(ints, st.integers(max_value=0), st.integers(CONTEXT + 1, 10 ** 30)),
    "messages": CHAT_FIELDS["messages"].filter(lambda v: v != [USER]),
    "top_k": st.one_of(ints_not_null, st.integers(max_value=-1), st.integers(VOCAB, 10 ** 12)),
    "temperature": st.one_of(not_((int, float), null=False), st.floats(1.000001, 1e9)),
    "stream": not_((bool,), null=False),
    "stop_sequences": st.one_of(not_((list,), null=False), st.just([""]), st.lists(not_((str,)), min_size=1)),
    "system": st.one_of(not_((str, list), null=False), st.just([{"type": "image"}])),
}
PREFILL_FIELDS = {
    "tokens": st.one_of(not_((list,), null=False), st.just([]),
                        st.lists(st.integers(VOCAB, 10 ** 12), min_size=1, max_size=3),
                        st.lists(st.integers(max_value=-1), min_size=1, max_size=3),
                        st.lists(st.integers(0, VOCAB - 1), min_size=MAX_PROMPT + 1, max_size=MAX_PROMPT + 40)),
    "pin": not_((bool,), null=False),
    "ttl": st.one_of(st.floats(max_value=0), not_((int, float), null=False)),
    "namespace": not_((str,), null=False),
    "prompt": st.one_of(not_((str,), null=False), st.just(LONG_TEXT)),
    "chat_template_kwargs": OPENAI_FIELDS["chat_template_kwargs"],
}
FIELDS = {
    CHAT: {**OPENAI_FIELDS, **CHAT_FIELDS},
    CHAT2: {**OPENAI_FIELDS, **CHAT_FIELDS},
    TEXT: {**OPENAI_FIELDS, **TEXT_FIELDS},
    MESSAGES: MESSAGES_FIELDS,
    PREFILL: PREFILL_FIELDS,
}
PATHS = st.sampled_from([CHAT, CHAT2, TEXT, MESSAGES, PREFILL])


def dumps(body) -> bytes:
    return json.dumps(body).encode()


def refused_by_anthropic(body: dict) -> bool:
    from kvtrie import anthropic as api

    try:
        request = api.parse_request(body)
    except api.RequestError:
        return True
    return request.max_tokens > CONTEXT or (request.top_k or 0) >= VOCAB


@st.composite
def hostile(draw) -> tuple[str, bytes, str | None]:
    """(path, raw body, Content-Length header: "auto", None or a bad one): a request that must be refused."""
    path = draw(PATHS)
    valid = VALID[path]
    kind = draw(st.sampled_from(["field", "field", "field", "field", "bytes", "cut", "utf8", "surrogate", "nan",
                                 "deep", "big", "long", "template", "top", "length"]))
    if kind == "field":  # a wrong value at one field
        field = draw(st.sampled_from(sorted(FIELDS[path])))
        body = {**valid, field: draw(FIELDS[path][field])}
        if path == PREFILL and field == "prompt":
            body.pop("tokens")
        if path == MESSAGES:  # (Anthropic's rules differ from OpenAI's: keep what they refuse)
            assume(refused_by_anthropic(body))
        return path, dumps(body), "auto"
    if kind == "bytes":  # anything at all (never a valid request)
        return path, draw(st.binary(max_size=64)), "auto"
    if kind == "cut":  # a valid body cut short
        raw = dumps(valid)
        return path, raw[: draw(st.integers(0, len(raw) - 1))], "auto"
    if kind == "utf8":  # bytes that are not UTF-8 inside a string
        bad = draw(st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\x80"]))
        raw = dumps({**valid, "user": "ab"})
        i = raw.index(b'"ab"') + 2
        return path, raw[:i] + bad + raw[i:], "auto"
    if kind == "surrogate":  # JSON's escape of half a surrogate pair
        field = draw(st.sampled_from(["model", "user", "stop", "content"]))
        raw = dumps({**valid, "messages": [{"role": "user", "content": "x"}]} if field == "content" else {**valid, field: "x"})
        return path, raw.replace(b'"x"', b'"a\\udc80b"' if draw(st.booleans()) else b'"\\ud83d"'), "auto"
    if kind == "nan":
        literal = draw(st.sampled_from([b"NaN", b"Infinity", b"-Infinity", b"1e999", b"-1e400", b"1" * 5000]))
        return path, dumps({**valid, "temperature": 0.5}).replace(b"0.5", literal), "auto"
    if kind == "deep":
        depth = draw(st.integers(guard.MAX_DEPTH, 5000))
        opener, closer = draw(st.sampled_from([(b"[", b"]"), (b'{"a":', b"}")]))
        field = draw(st.sampled_from(["messages", "tools", "x", "tokens"]))
        raw = dumps({**valid, field: "DEEP"}).replace(b'"DEEP"', opener * depth + b"0" + closer * depth)
        return path, raw, "auto"
    if kind == "big":  # past --max-request-bytes
        pad = draw(st.integers(MAX_BYTES, 4 * MAX_BYTES))
        return path, dumps({**valid, "padding": "x" * pad}), "auto"
    if kind == "long":  # a prompt past --max-prompt-tokens (the body within --max-request-bytes)
        if path == TEXT:
            return path, dumps({**valid, "prompt": LONG_TEXT}), "auto"
        if path == PREFILL:
            target = draw(st.sampled_from([{"prompt": LONG_TEXT}, {"messages": [{"role": "user", "content": LONG_TEXT}]}]))
            return path, dumps(target), "auto"
        return path, dumps({**valid, "messages": [{"role": "user", "content": LONG_TEXT}]}), "auto"
    if kind == "template":  # a conversation the chat template refuses (on the generation thread)
        messages = [{"role": "assistant", "content": "hello"}, USER]
        if path in (TEXT, MESSAGES):
            path = CHAT
        return path, dumps({**VALID[path], "messages": messages} if path != PREFILL else {"messages": messages}), "auto"
    if kind == "top":  # JSON that is not an object
        return path, dumps(draw(st.one_of(st.lists(st.integers(), max_size=3), st.text(max_size=5), st.integers(),
                                          st.none(), st.booleans()))), "auto"
    # a bad Content-Length header
    header = draw(st.sampled_from([None, "abc", "-1", "1_0", "+5", "0x10", "1e3", "", " 1 2", "99999999999999999999999",
                                   "10, 11", str(MAX_BYTES * 100)]))
    if header is None and path.startswith("/kvtrie/"):
        return path, b"", None  # (no Content-Length: no body, an empty request, which names no prefix)
    return path, dumps(valid), header


# --- the barrage -------------------------------------------------------------------------------


def test_hostile_bodies_get_4xx_in_their_endpoints_shape_and_change_nothing(server):
    url = server.url
    before_reply = reply_text(chat(url, GOOD, max_tokens=6))
    assert before_reply
    before = cache_state(server)
    seen: dict = {}

    @settings(max_examples=barrage_examples(), deadline=None, suppress_health_check=list(HealthCheck))
    @given(request=hostile())
    def barrage(request):
        path, raw, length = request
        status, _, data = send(server, path, raw, length=length)
        body = assert_error_shape(path, status, data)
        seen[status] = seen.get(status, 0) + 1
        event(f"{path} {status}")
        if status == 413:
            assert "--max-request-bytes" in json.dumps(body)
        health, _ = get(server, "/health")
        assert health == 200, "the generation thread died"

    barrage()
    assert seen.get(400) and seen.get(413), seen
    assert server.alive() and server.healthy()
    assert cache_state(server) == before  # nothing was computed, stored or counted
    assert reply_text(chat(url, GOOD, max_tokens=6)) == before_reply


@pytest.mark.parametrize("path", [CHAT, TEXT, MESSAGES, PREFILL])
def test_a_prompt_past_the_limit_is_a_400_that_names_the_count_and_the_limit(server, path):
    body = {TEXT: {**VALID[TEXT], "prompt": LONG_TEXT}, PREFILL: {"prompt": LONG_TEXT}}.get(
        path, {**VALID[path], "messages": [{"role": "user", "content": LONG_TEXT}]})
    status, _, data = send(server, path, dumps(body))
    err = assert_error_shape(path, status, data)
    message = err["error"]["message"]
    assert status == 400 and str(MAX_PROMPT) in message and "token" in message, err
    if path in (CHAT, TEXT):
        assert err["error"]["code"] == "context_length_exceeded" and err["error"]["param"] in ("messages", "prompt")
        for variant in ({"seed": 1}, {"stream": True}):  # mlx-lm's single path; a stream (refused before its headers)
            status, _, data = send(server, path, dumps({**body, **variant}))
            assert status == 400 and assert_error_shape(path, status, data)["error"]["code"] == "context_length_exceeded"
    # one token under the limit is served: the limit counts the rendered prompt
    status, _, data = send(server, TEXT, dumps({**VALID[TEXT], "prompt": "fox " * 40}))
    assert status == 200, data


def test_the_guards_bounds_are_safe_on_the_generation_thread(server):
    """Values at the edge of what the guard admits are served (batched and, with a seed, on the single path)."""
    edges = dict(temperature=guard.ABSURD, top_k=VOCAB - 1, min_p=1.0, top_p=0.0, xtc_probability=1.0, xtc_threshold=0.5,
                 repetition_penalty=guard.ABSURD, repetition_context_size=2 ** 31 - 1, presence_penalty=-guard.ABSURD,
                 presence_context_size=2 ** 31 - 1, frequency_penalty=guard.ABSURD, frequency_context_size=0,
                 logit_bias={str(VOCAB - 1): guard.ABSURD, "0": -guard.ABSURD}, logprobs=True, top_logprobs=11,
                 stop=[""] * guard.MAX_STOP_WORDS, num_draft_tokens=guard.MAX_DRAFT_TOKENS, n=1)
    for extra in ({}, {"seed": guard.UINT64_MAX}, {"seed": 0, "temperature": 1e-30}, {"stream": True}):
        for path in (CHAT, TEXT):
            status, _, data = send(server, path, dumps({**VALID[path], **edges, **extra, "max_tokens": 3}))
            assert status == 200, (path, extra, data[:300])
            assert server.healthy()


def test_a_template_error_on_the_generation_thread_is_a_400_not_a_404(server):
    messages = [{"role": "assistant", "content": "hello"}, USER]
    for path in (CHAT, CHAT2):
        status, _, data = send(server, path, dumps({**VALID[CHAT], "messages": messages}))
        err = assert_error_shape(path, status, data)
        assert status == 400 and "must start with a user" in err["error"]["message"] and err["error"]["param"] == "messages"
    assert server.healthy()


def test_an_oversized_body_is_a_413_read_by_the_client_not_a_reset(server):
    for size in (MAX_BYTES + 1, 4 << 20):
        status, headers, data = send(server, CHAT, dumps({**VALID[CHAT], "padding": "x" * size}))
        assert status == 413 and headers.get("Connection") == "close"
        assert "--max-request-bytes" in assert_error_shape(CHAT, status, data)["error"]["message"]
    # a declared size past the limit is refused without waiting for the body
    t = time.monotonic()
    status, _, data = send(server, MESSAGES, b"{}", length=str(10 ** 12))
    assert status == 413 and json.loads(data)["error"]["type"] == "request_too_large"
    assert time.monotonic() - t < TIMEOUT


def test_a_model_other_than_the_served_one_is_a_404_and_the_model_stays_loaded(server):
    for model in ("gpt-4o", "/tmp", "mlx-community/some-model"):
        status, _, data = send(server, CHAT, dumps({**VALID[CHAT], "model": model}))
        err = assert_error_shape(CHAT, status, data)
        assert status == 404 and err["error"]["code"] == "model_not_found" and err["error"]["param"] == "model"
    status, _, _ = send(server, CHAT, dumps({**VALID[CHAT], "model": "default_model"}))
    assert status == 200


def test_a_silent_client_is_dropped_after_the_timeout_and_others_are_served_meanwhile(server):
    half_headers = socket.create_connection((server.host, server.port))
    half_headers.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Le")
    half_body = socket.create_connection((server.host, server.port))
    body = dumps(VALID[CHAT])
    half_body.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      + f"Content-Length: {len(body)}\r\n\r\n".encode() + body[: len(body) // 2])
    started = time.monotonic()
    closed: dict = {}

    def wait_closed(name, sock):
        sock.settimeout(30)
        data = b""
        try:
            while chunk := sock.recv(4096):
                data += chunk
        except ConnectionResetError:
            pass
        closed[name] = (time.monotonic() - started, data)
        sock.close()

    waiters = [threading.Thread(target=wait_closed, args=item) for item in (("headers", half_headers), ("body", half_body))]
    for w in waiters:
        w.start()
    reply = chat(server.url, GOOD, max_tokens=4)  # served while both stall
    served = time.monotonic() - started
    for w in waiters:
        w.join(30)
    assert reply["choices"][0]["message"]["role"] == "assistant"
    assert served < min(elapsed for elapsed, _ in closed.values()), (served, closed)
    for name in ("headers", "body"):
        elapsed, data = closed[name]
        assert TIMEOUT * 0.75 <= elapsed <= TIMEOUT * 3, (name, elapsed)
        assert data == b"", (name, data)  # dropped quietly, nothing answered
    assert server.healthy()


# --- unit: the guard alone -------------------------------------------------------------------


def limits(**kw) -> guard.Limits:
    info = guard.ModelInfo(context_length=CONTEXT, vocab_size=VOCAB, text_only=True)
    return guard.Limits(max_request_bytes=MAX_BYTES, served=("/models/tiny", None, None), model_info=lambda: info, **kw)


def fake_handler(path: str, raw: bytes, length: str | None = "auto") -> SimpleNamespace:
    headers = Message()
    if length is not None:
        headers["Content-Length"] = str(len(raw)) if length == "auto" else length
    out = io.BytesIO()
    sent = []
    return SimpleNamespace(
        path=path, headers=headers, rfile=io.BytesIO(raw), wfile=out, command="POST", client_address=("127.0.0.1", 1),
        close_connection=False, sent=sent, send_response=lambda status: sent.append(status),
        send_header=lambda name, value: None, end_headers=lambda: None)


@given(request=hostile())
@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
def test_admission_refuses_each_hostile_body_before_the_model(request):
    path, raw, length = request
    handler = fake_handler(path, raw, length)
    admitted = guard.admit(handler, limits(max_prompt_tokens=MAX_PROMPT))
    if admitted:  # left for later: the template, the prompt's length, the control endpoints' and Anthropic's own checks
        assert path in (MESSAGES, PREFILL) or b"hello" in raw or LONG_TEXT.encode() in raw, raw[:200]
        assert handler.rfile.read() == raw and isinstance(handler.kvtrie_body, dict)
        return
    status = handler.sent[0]
    assert_error_shape(path, status, handler.wfile.getvalue())


@given(data=st.data())
@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
def test_a_wrong_value_at_any_field_is_refused_naming_the_field(data):
    path = data.draw(st.sampled_from([CHAT, TEXT]))
    field = data.draw(st.sampled_from(sorted(FIELDS[path])))
    body = {**VALID[path], field: data.draw(FIELDS[path][field], label=field)}
    with pytest.raises(guard.Rejected) as info:
        guard.check_openai(body, guard.OPENAI_ROUTES[path], limits())
    assert info.value.status in (400, 404) and info.value.param.split("[")[0].split(".")[0] == field, info.value.message
    assert field in info.value.message


def test_content_length_rules():
    body = dumps(VALID[CHAT])
    for length, status in ((None, 411), ("abc", 400), ("-1", 400), ("1_0", 400), ("+5", 400), ("٣", 400),
                           (str(MAX_BYTES + 1), 413)):
        handler = fake_handler(CHAT, body, length)
        assert not guard.admit(handler, limits()) and handler.sent == [status], length
    truncated = fake_handler(CHAT, body[:10], str(len(body)))
    assert not guard.admit(truncated, limits()) and truncated.sent == [] and truncated.close_connection
    empty = fake_handler("/kvtrie/cache", b"", None)
    assert guard.admit(empty, limits()) and empty.kvtrie_body == {}
    chunked = fake_handler(CHAT, body)
    chunked.headers["Transfer-Encoding"] = "chunked"
    assert not guard.admit(chunked, limits()) and chunked.sent == [411]
    other = fake_handler("/v1/embeddings", body, None)
    assert guard.admit(other, limits()) and not hasattr(other, "kvtrie_body")  # (not ours: mlx-lm answers 404)


def test_error_shapes_follow_the_path():
    assert guard.error_body("/v1/chat/completions", 400, "m", param="top_k") == \
        {"error": {"message": "m", "type": "invalid_request_error", "param": "top_k", "code": None}}
    assert guard.error_body("/v1/messages?beta=true", 413, "m") == \
        {"type": "error", "error": {"type": "request_too_large", "message": "m"}}
    assert guard.error_body("/v1/messages/count_tokens", 401, "m")["error"]["type"] == "authentication_error"
    assert guard.error_body("/kvtrie/prefill", 404, "m") == {"error": {"message": "m", "type": "not_found_error"}}
    assert guard.error_body("/v1/completions", 500, "m")["error"]["type"] == "server_error"
    assert guard.error_body("/v1/completions", 401, "m", code="invalid_api_key")["error"] == \
        {"message": "m", "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}


def test_the_prompt_limit_defaults_to_the_models_context(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 8192, "vocab_size": 1000}))
    provider = SimpleNamespace(cli_args=SimpleNamespace(model=str(tmp_path), adapter_path=None, draft_model=None),
                               model_key=None, model=None, processor=None)
    options = SimpleNamespace(max_request_bytes=MAX_BYTES, max_prompt_tokens=None)
    lim = guard.Limits.for_server(options, provider)
    assert (lim.max_prompt_tokens, lim.model_info().vocab_size, lim.model_info().text_only) == (8192, 1000, None)
    assert guard.Limits.for_server(SimpleNamespace(max_request_bytes=1, max_prompt_tokens=100), provider).max_prompt_tokens == 100
    with pytest.raises(guard.Rejected) as info:
        lim.check_prompt(8193, param="messages")
    assert info.value.code == "context_length_exceeded" and "8193" in info.value.message and "8192" in info.value.message
    lim.check_prompt(8192)
    with pytest.raises(guard.Rejected, match="no tokens"):
        lim.check_prompt(0)
    provider.cli_args.model = str(tmp_path / "nowhere")  # no config to read: the default
    assert guard.Limits.for_server(options, provider).max_prompt_tokens == guard.DEFAULT_PROMPT_TOKENS


def test_the_flags_reach_the_options_and_are_checked():
    from kvtrie.serve import ServeOptions, _Parser, options_from

    parser = _Parser()
    parser.add_argument("--prompt-cache-bytes", default=None)
    parser.add_argument("--prompt-cache-size", default=None)
    given_ = options_from(parser.parse_args(["--prompt-cache-bytes", "1M", "--max-request-bytes", "512K",
                                             "--max-prompt-tokens", "1000", "--request-timeout", "5"]))
    assert (given_.max_request_bytes, given_.max_prompt_tokens, given_.request_timeout) == (512 << 10, 1000, 5.0)
    defaults = options_from(parser.parse_args(["--prompt-cache-bytes", "1M"]))
    assert (defaults.max_request_bytes, defaults.max_prompt_tokens, defaults.request_timeout) == (32 << 20, None, 60.0)
    for bad in (dict(max_prompt_tokens=0), dict(max_prompt_tokens=-5), dict(max_request_bytes=0), dict(request_timeout=0)):
        with pytest.raises(ValueError, match="--"):
            ServeOptions(cache_bytes=1 << 20, host_bytes=0, **bad)


# --- unit: what the guard admits, mlx_lm.server takes without a 400 of its own or a crash ----------

INT32 = 2 ** 31 - 1
# values the guard takes (its bounds included), and a few it does not, for each field mlx-lm reads
ACCEPTED = {
    "stream": st.booleans(), "logprobs": st.booleans(),
    "stream_options": st.one_of(st.none(), st.builds(lambda b: {"include_usage": b}, st.booleans())),
    "max_tokens": st.integers(1, CONTEXT), "max_completion_tokens": st.one_of(st.none(), st.integers(1, CONTEXT)),
    "temperature": st.one_of(st.floats(0, guard.ABSURD), st.integers(0, 3), st.sampled_from([1e-300, 1e-30])),
    "top_p": st.one_of(st.floats(0, 1), st.sampled_from([0, 1])), "min_p": st.one_of(st.floats(0, 1), st.sampled_from([0, 1])),
    "top_k": st.one_of(st.integers(0, VOCAB - 1), st.just(VOCAB - 1)),
    "xtc_probability": st.floats(0.0, 1.0), "xtc_threshold": st.one_of(st.floats(0.0, 0.5), st.just(0.5)),
    "num_draft_tokens": st.integers(0, guard.MAX_DRAFT_TOKENS),
    "repetition_penalty": st.one_of(st.floats(0, guard.ABSURD), st.sampled_from([0, 1e-30, guard.ABSURD])),
    "presence_penalty": st.floats(-guard.ABSURD, guard.ABSURD), "frequency_penalty": st.floats(-guard.ABSURD, guard.ABSURD),
    "repetition_context_size": st.one_of(st.integers(0, INT32), st.just(INT32)),
    "presence_context_size": st.integers(0, INT32), "frequency_context_size": st.just(INT32),
    "top_logprobs": st.one_of(st.just(-1), st.integers(0, guard.MAX_TOP_LOGPROBS)),
    "seed": st.one_of(st.none(), st.integers(0, guard.UINT64_MAX), st.just(guard.UINT64_MAX)),
    "n": st.one_of(st.none(), st.just(1)),
    "logit_bias": st.one_of(st.none(), st.dictionaries(st.integers(0, VOCAB - 1).map(str),
                                                      st.floats(-guard.ABSURD, guard.ABSURD), max_size=3)),
    "stop": st.one_of(st.none(), st.text(max_size=4), st.lists(st.text(max_size=4), max_size=3)),
    "chat_template_kwargs": st.one_of(st.none(), st.just({"enable_thinking": False})),
    "tools": st.one_of(st.none(), st.just([]), st.just([{"type": "function", "function": {"name": "f", "parameters": {}}}])),
    "role_mapping": st.one_of(st.none(), st.just({"user": "U: "})),
    "model": st.sampled_from(["default_model", "/models/tiny", "other"]),
}
PLAUSIBLE = {key: st.integers(0, 15).flatmap(lambda i, ok=ok, key=key: OPENAI_FIELDS.get(key, junk) if i == 0 else ok)
             for key, ok in ACCEPTED.items()}  # (one value in 16 refused: about half the bodies are admitted)


@given(fields=st.fixed_dictionaries({}, optional=PLAUSIBLE),
       messages=st.one_of(st.just([USER]), st.lists(st.one_of(st.just(USER), BAD_MESSAGE), min_size=1, max_size=2)))
@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
def test_what_the_guard_admits_mlx_lm_takes_and_its_generation_code_survives(model_dir, fields, messages):
    """mlx_lm.server's own `do_POST` on each body the guard admits reaches generation (it answers no
    400 of its own), and what its generation thread does with the request outside any try (the
    sampler, the logits processors, the stop sequences, top logprobs) runs on the tiny model's
    vocabulary without raising."""
    import mlx.core as mx
    import mlx_lm.server as server
    from mlx_lm.generate import make_stop_sequences

    body = {**fields, "messages": messages}
    try:
        guard.check_openai(body, "chat", limits())
    except guard.Rejected as exc:
        assert 400 <= exc.status < 500 and exc.message
        event("refused")
        return
    event("admitted")
    tokenizer = load_tokenizer(model_dir)
    calls = []

    class Reached(Exception):
        pass

    def generate(request, args, progress_callback=None):
        calls.append((request, args))
        raise Reached

    cli = SimpleNamespace(num_draft_tokens=3, max_tokens=8, temp=0.0, top_p=1.0, top_k=0, min_p=0.0, allowed_origins=["*"])
    handler = object.__new__(server.APIHandler)
    raw = dumps(body)
    headers = Message()
    headers["Content-Length"] = str(len(raw))
    handler.__dict__.update(
        path=CHAT, headers=headers, rfile=io.BytesIO(raw), wfile=io.BytesIO(), request_version="HTTP/1.1",
        requestline="POST", command="POST", client_address=("127.0.0.1", 1), created=0, system_fingerprint="x",
        response_generator=SimpleNamespace(cli_args=cli, generate=generate))
    handler.log_message = lambda *a: None
    handler.do_POST()
    assert calls, handler.wfile.getvalue()[:300]  # mlx-lm reached generation: no 400 of its own
    _, args = calls[0]
    logits = mx.random.normal((1, VOCAB))
    sampler = server._make_sampler(args, tokenizer)
    tokens = mx.array([5, 6, 7, 5])
    for processor in server._make_logits_processors(args):
        logits = processor(tokens, logits)
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    token = sampler(logprobs)
    mx.eval(token)
    assert 0 <= token.item() < VOCAB
    server._format_top_logprobs(logprobs[0], args.top_logprobs, tokenizer)
    make_stop_sequences(tokenizer, args.stop_words)
    if args.seed is not None:
        mx.random.seed(args.seed)


def test_bad_limits_are_refused_at_start_and_the_flags_are_in_the_help():
    from kvtrie.serve import _Parser, run

    parser = _Parser()
    parser.add_argument("--prompt-cache-bytes", default=None)
    parser.add_argument("--prompt-cache-size", default=None)
    for flag, value in (("--max-prompt-tokens", "0"), ("--max-prompt-tokens", "-3"), ("--max-request-bytes", "0"),
                        ("--request-timeout", "0")):
        args = parser.parse_args(["--prompt-cache-bytes", "1M", flag, value])
        with pytest.raises(SystemExit, match=f"kvtrie serve: {flag} must be"):
            run("127.0.0.1", 0, SimpleNamespace(cli_args=args))  # (refused before anything starts)
    text = " ".join(parser.format_help().split())
    for flag in ("--max-request-bytes", "--max-prompt-tokens", "--request-timeout", "max_position_embeddings"):
        assert flag in text
