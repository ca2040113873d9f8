"""The Anthropic Messages API on `kvtrie serve`.

Unit tests of `kvtrie.anthropic` (validation, translation, breakpoint positions, usage, the
content assembler over mlx-lm's text state machine and tool parser), then a real `kvtrie serve`
on a loopback port (a tiny llama whose chat template renders tools, Hermes style) driven with the
official `anthropic` and `openai` clients: well-formed messages and streams, usage that sums to
count_tokens, cache reads that match the server's stats, one cache for both APIs, a tool_use
round trip, and 400s in Anthropic's shape for bad bodies that leave the cache as it was.
"""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvtrie import anthropic as api

mlx_lm = pytest.importorskip("mlx_lm")
anthropic = pytest.importorskip("anthropic")
openai = pytest.importorskip("openai")

from serving import ServerProcess, chat, completion_ids, free_port, load_tokenizer, make_model_dir  # noqa: E402

# --- unit: validation ----------------------------------------------------------------------

BASE = {"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}


def body(**changes):
    out = json.loads(json.dumps(BASE))
    out.update(changes)
    return out


BAD_BODIES = [
    ([], "JSON object"),
    ("text", "JSON object"),
    (body(model=None), "model"),
    ({k: v for k, v in BASE.items() if k != "max_tokens"}, "max_tokens"),
    (body(max_tokens=0), "max_tokens"),
    (body(max_tokens="8"), "max_tokens"),
    (body(max_tokens=True), "max_tokens"),
    (body(messages=[]), "messages"),
    (body(messages="hi"), "messages"),
    (body(messages=[{"role": "system", "content": "x"}]), "top-level \"system\""),
    (body(messages=[{"role": "robot", "content": "x"}]), "role"),
    (body(messages=[{"role": "user", "content": 3}]), "content"),
    (body(messages=[{"role": "user", "content": []}]), "content"),
    (body(messages=[{"role": "user", "content": [{"type": "image", "source": {}}]}]), "image"),
    (body(messages=[{"role": "user", "content": [{"type": "text"}]}]), "text"),
    (body(messages=[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]), "last message"),
    (body(messages=[{"role": "user", "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {}}]}]), "assistant"),
    (body(messages=[{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "nope", "content": "x"}]}]),
     "answers no tool_use"),
    (body(messages=[{"role": "user", "content": [{"type": "text", "text": "x", "cache_control": {"type": "persistent"}}]}]),
     "cache_control.type"),
    (body(messages=[{"role": "user", "content": [{"type": "text", "text": "x", "cache_control": {"type": "ephemeral", "ttl": "2h"}}]}]),
     "ttl"),
    (body(cache_control={"type": "ephemeral", "ttl": 5}), "ttl"),
    (body(cache_control="ephemeral"), "cache_control"),
    (body(system=[{"type": "text", "text": "a", "cache_control": []}]), "cache_control"),
    (body(system=5), "system"),
    (body(system=[{"type": "image"}]), "system.0.type"),
    (body(tools=[{"name": "bad name", "input_schema": {}}]), "tools.0.name"),
    (body(tools=[{"name": "f"}]), "input_schema"),
    (body(tools=[{"name": "f", "input_schema": {}}, {"name": "f", "input_schema": {}}]), "unique"),
    (body(tools=[{"type": "web_search_20250305", "name": "web_search"}]), "server tools"),
    (body(tools=[{"name": "f", "input_schema": {}, "cache_control": {"type": "x"}}]), "cache_control"),
    (body(tool_choice={"type": "sometimes"}), "tool_choice.type"),
    (body(tool_choice={"type": "tool", "name": "g"}, tools=[{"name": "f", "input_schema": {}}]), "tool_choice.name"),
    (body(tool_choice={"type": "any"}), "needs tools"),
    (body(stop_sequences="END"), "stop_sequences"),
    (body(stop_sequences=[""]), "stop_sequences"),
    (body(temperature=1.5), "temperature"),
    (body(temperature="hot"), "temperature"),
    (body(top_p=-0.1), "top_p"),
    (body(top_k=-1), "top_k"),
    (body(stream="yes"), "stream"),
    (body(metadata={"user_id": 7}), "user_id"),
    (body(messages=[{"role": "user", "content": [{"type": "text", "text": str(i), "cache_control": {"type": "ephemeral"}}
                                                  for i in range(5)]}]), "maximum of 4"),
]


@pytest.mark.parametrize("bad,says", BAD_BODIES, ids=[str(i) for i in range(len(BAD_BODIES))])
def test_bad_bodies_are_refused_with_what_was_wrong(bad, says):
    with pytest.raises(api.RequestError) as info:
        api.parse_request(bad)
    assert info.value.status == 400 and info.value.kind == "invalid_request_error"
    assert says in str(info.value)


def test_count_tokens_needs_no_max_tokens_and_everything_else_is_read():
    req = api.parse_request({k: v for k, v in BASE.items() if k != "max_tokens"}, count_only=True)
    assert req.max_tokens is None
    req = api.parse_request(body(
        system=[{"type": "text", "text": "S1"}, {"type": "text", "text": "S2", "cache_control": {"type": "ephemeral", "ttl": "1h"}}],
        temperature=0, top_p=0.9, top_k=5, stop_sequences=["END"], stream=True, metadata={"user_id": "u-1"},
        cache_control={"type": "ephemeral"}, tool_choice={"type": "none"}, thinking={"type": "disabled"},
    ))
    assert (req.temperature, req.top_p, req.top_k, req.stop_sequences, req.stream, req.user_id) == (0.0, 0.9, 5, ("END",), True, "u-1")
    assert req.breakpoints == (api.Breakpoint("system", "1h", 1), api.Breakpoint("request", "5m"))
    assert api.error_body("invalid_request_error", "x") == {"type": "error", "error": {"type": "invalid_request_error", "message": "x"}}


TOOL = {"name": "get_weather", "description": "The weather in a city",
        "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}

ROUND_TRIP = [
    {"role": "user", "content": "What is the weather in Paris?"},
    {"role": "assistant", "content": [
        {"type": "thinking", "thinking": "the user wants weather", "signature": "sig"},
        {"type": "text", "text": "Let me look."},
        {"type": "tool_use", "id": "toolu_01", "name": "get_weather", "input": {"city": "Paris"}},
    ]},
    {"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "toolu_01", "content": [{"type": "text", "text": "Sunny, 21 C"}]},
        {"type": "text", "text": "Thanks! And tomorrow?"},
    ]},
]

ROUND_TRIP_OPENAI = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "What is the weather in Paris?"},
    {"role": "assistant", "content": "Let me look.", "tool_calls": [
        {"id": "toolu_01", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
    {"role": "tool", "tool_call_id": "toolu_01", "content": "Sunny, 21 C", "name": "get_weather"},
    {"role": "user", "content": "Thanks! And tomorrow?"},
]


def test_a_tool_use_round_trip_translates_to_the_openai_conversation():
    req = api.parse_request(body(system="You answer briefly.", tools=[TOOL], messages=ROUND_TRIP))
    view = api.chat_view(req)
    assert view.messages == ROUND_TRIP_OPENAI
    assert view.tools == [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                                           "parameters": TOOL["input_schema"]}}]
    errored = api.parse_request(body(messages=ROUND_TRIP[:2] + [{"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "toolu_01", "content": "boom", "is_error": True}]}]))
    assert api.chat_messages(errored)[-1] == {"role": "tool", "tool_call_id": "toolu_01", "content": "Error: boom",
                                              "name": "get_weather"}


# --- unit: breakpoints and usage -----------------------------------------------------------


def chatml(messages, tools, add_generation_prompt):
    """A ChatML-like template over characters (one character = one token), tools in the system turn."""
    out, rest = "", list(messages)
    if tools or (rest and rest[0]["role"] == "system"):
        system = rest.pop(0)["content"] if rest and rest[0]["role"] == "system" else ""
        out += "<s>" + system + "".join(f"[{t['function']['name']}]" for t in tools or []) + "</s>"
    for m in rest:
        calls = "".join(f"<call {c['function']['name']}>" for c in m.get("tool_calls", []))
        out += f"<{m['role']}>{m['content']}{calls}</>"
    return [ord(c) for c in out + ("<assistant>" if add_generation_prompt else "")]


def text_of(tokens):
    return "".join(map(chr, tokens))


def test_breakpoints_are_where_the_marked_blocks_end_in_the_rendered_prompt():
    cc = {"type": "ephemeral"}
    req = api.parse_request(body(
        system=[{"type": "text", "text": "SYS", "cache_control": {"type": "ephemeral", "ttl": "1h"}}],
        tools=[{**TOOL, "name": "a", "cache_control": cc}, {**TOOL, "name": "b", "cache_control": cc}],
        messages=[{"role": "user", "content": [{"type": "text", "text": "one", "cache_control": cc}, {"type": "text", "text": "two"}]}],
    ))
    view = api.chat_view(req)
    prompt = chatml(view.messages, view.tools, True)
    assert text_of(prompt) == "<s>SYS[a][b]</s><user>one\ntwo</><assistant>"
    ends = [text_of(prompt[:p]) for p, _ in api.breakpoint_positions(req, prompt, chatml)]
    # tools end where the next tool (or the end of the tool list) begins; the system prompt ends with
    # its turn, which this template renders with the tools in it; a block before another one ends at once
    assert ends == ["<s>SYS[a]", "<s>SYS[a][b]", "<s>SYS[a][b]</s>", "<s>SYS[a][b]</s><user>one"]
    positions = dict(api.breakpoint_positions(req, prompt, chatml))
    assert positions[len("<s>SYS[a][b]</s>")] == "1h" and positions[len("<s>SYS[a]")] == "5m"
    auto = attrs_evolve(req, cache_control=api.CacheControl("1h"))
    assert api.breakpoint_positions(auto, prompt, chatml)[-1] == (len(prompt), "1h")


def attrs_evolve(obj, **changes):
    import attrs

    return attrs.evolve(obj, **changes)


def test_a_message_breakpoint_covers_its_turn_and_a_template_that_fails_costs_the_marker_only():
    cc = {"type": "ephemeral"}
    req = api.parse_request(body(messages=[
        {"role": "user", "content": [{"type": "text", "text": "q1", "cache_control": cc}]},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "q2"},
    ]))
    view = api.chat_view(req)
    prompt = chatml(view.messages, view.tools, True)
    ((position, ttl),) = api.breakpoint_positions(req, prompt, chatml)
    assert text_of(prompt[:position]) == "<user>q1</>" and ttl == "5m"

    def fussy(messages, tools, add_generation_prompt):  # a template that wants a user turn last
        if messages[-1]["role"] != "user":
            raise ValueError("the last message must be the user's")
        return chatml(messages, tools, add_generation_prompt)

    cut_at_assistant = api.parse_request(body(messages=[
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": [{"type": "text", "text": "a1", "cache_control": cc}]},
        {"role": "user", "content": "q2"},
    ]))
    view = api.chat_view(cut_at_assistant)
    prompt = chatml(view.messages, view.tools, True)
    ((position, _),) = api.breakpoint_positions(cut_at_assistant, prompt, fussy)
    assert text_of(prompt[:position]) == "<user>q1</><assistant>a1</><user>"  # (an empty user turn was added)

    def refuses(messages, tools, add_generation_prompt):
        if not add_generation_prompt:
            raise ValueError("this template renders only whole conversations")
        return chatml(messages, tools, add_generation_prompt)

    assert api.breakpoint_positions(req, prompt, refuses) == ()


@given(
    prompt=st.integers(0, 500),
    cached_share=st.floats(0, 1),
    marks=st.lists(st.tuples(st.integers(0, 600), st.sampled_from(api.TTLS)), max_size=5),
    output=st.integers(0, 50),
)
def test_usage_is_disjoint_and_sums_to_the_prompt(prompt, cached_share, marks, output):
    cached = int(prompt * cached_share)
    u = api.usage_for(prompt, cached, marks, output)
    assert min(u.input_tokens, u.cache_creation_input_tokens, u.cache_read_input_tokens) >= 0
    assert u.input_tokens + u.cache_creation_input_tokens + u.cache_read_input_tokens == prompt
    assert u.cache_read_input_tokens == cached and u.output_tokens == output
    last = min(max((p for p, _ in marks), default=0), prompt)
    assert u.cache_creation_input_tokens == max(0, last - cached)
    assert u.ephemeral_5m_input_tokens + u.ephemeral_1h_input_tokens == u.cache_creation_input_tokens
    d = u.to_dict()
    assert d["cache_creation"]["ephemeral_1h_input_tokens"] == u.ephemeral_1h_input_tokens


def test_usage_refuses_a_cached_count_outside_the_prompt():
    with pytest.raises(ValueError, match="within the prompt"):
        api.usage_for(10, 11, [], 0)


# --- unit: the content assembler ------------------------------------------------------------

EOS = 2


def assembler(stop_words=None):
    from mlx_lm.generate import make_text_state_machine
    from mlx_lm.tool_parsers import json_tools

    class Tok:  # what make_text_state_machine reads of a tokenizer
        has_thinking = False
        has_tool_calling = True
        tool_call_start, tool_call_end = json_tools.tool_call_start, json_tools.tool_call_end
        structural_markers = ()
        response_transitions: dict = {}

    sm = make_text_state_machine(Tok(), list(stop_words or {}))
    return api.MessageAssembler(sm, "normal", tool_parser=json_tools.parse_tool_call, tools=None,
                                eos_ids=[EOS], stop_words=stop_words)


def run(asm, pieces, finish="stop", last_token=EOS):
    events = []
    for i, piece in enumerate(pieces):
        events += asm.feed(piece, 100 + i)
    events += asm.feed("", last_token, finish)
    return events + asm.close()


def check_block_events(events):
    """Blocks open, take deltas and close in order, one at a time, indices counting up."""
    index, open_ = -1, False
    for e in events:
        if e["type"] == "content_block_start":
            assert not open_ and e["index"] == index + 1
            index, open_ = e["index"], True
        elif e["type"] == "content_block_delta":
            assert open_ and e["index"] == index
        elif e["type"] == "content_block_stop":
            assert open_ and e["index"] == index
            open_ = False
    assert not open_
    return index + 1


def test_text_and_a_tool_call_become_a_text_and_a_tool_use_block():
    asm = assembler()
    call = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
    events = run(asm, ["Let me ", "look.", "<tool_", "call>" + call[:20], call[20:], "</tool_call>"])
    assert [b["type"] for b in asm.content] == ["text", "tool_use"]
    assert asm.content[0]["text"] == "Let me look."
    use = asm.content[1]
    assert use["id"].startswith("toolu_") and use["name"] == "get_weather" and use["input"] == {"city": "Paris"}
    assert asm.stop_reason == "tool_use" and asm.stop_sequence is None
    assert check_block_events(events) == 2
    deltas = [e["delta"] for e in events if e["type"] == "content_block_delta" and e["index"] == 1]
    assert deltas == [{"type": "input_json_delta", "partial_json": json.dumps({"city": "Paris"})}]


@given(cuts=st.lists(st.integers(0, 80), max_size=6))
@settings(max_examples=40, deadline=None)
def test_the_content_does_not_depend_on_how_the_text_arrives(cuts):
    text = 'Sure.<tool_call>{"name": "f", "arguments": {"x": [1, 2]}}</tool_call> Done'
    bounds = sorted({min(c, len(text)) for c in cuts} | {0, len(text)})
    asm = assembler()
    events = run(asm, [text[a:b] for a, b in zip(bounds, bounds[1:])])
    assert [(b["type"], b.get("text"), b.get("input")) for b in asm.content] == [
        ("text", "Sure.", None), ("tool_use", None, {"x": [1, 2]}), ("text", " Done", None)]
    assert check_block_events(events) == 3
    streamed = "".join(e["delta"].get("text", "") for e in events if e["type"] == "content_block_delta")
    assert streamed == "Sure. Done"


def test_stop_reasons_max_tokens_stop_sequence_end_turn_and_a_broken_call():
    asm = assembler()
    run(asm, ["Hello"], finish="length", last_token=7)
    assert asm.stop_reason == "max_tokens" and asm.content == [{"type": "text", "text": "Hello"}]
    asm = assembler(stop_words={"END": (5, 6)})
    for t in (4, 5):
        asm.feed("x" if t == 4 else "EN", t)
    asm.feed("D", 6, "stop")
    asm.close()
    assert (asm.stop_reason, asm.stop_sequence) == ("stop_sequence", "END")
    asm = assembler()
    run(asm, ["Hi"])
    assert (asm.stop_reason, asm.stop_sequence, asm.output_tokens) == ("end_turn", None, 2)
    asm = assembler()
    run(asm, ["<tool_call>{not json"], finish="length", last_token=9)
    assert asm.content == [] and asm.stop_reason == "max_tokens"  # a cut-off call is dropped, as on the OpenAI path


def test_events_are_server_sent_events():
    assert api.sse(api.PING) == b'event: ping\ndata: {"type": "ping"}\n\n'
    u = api.usage_for(10, 4, [(6, "5m")], 0)
    start = api.message_start("msg_1", "m", u)
    assert start["message"]["content"] == [] and start["message"]["usage"]["cache_read_input_tokens"] == 4


# --- a real server ---------------------------------------------------------------------------

SYSTEM = ("You are a careful assistant for a small library. You answer questions about books, "
          "opening hours and the reading room, briefly and politely. ") * 3


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("anthropic")
    model_dir = make_model_dir(root / "llama-tools", "llama", tools=True)
    port = free_port()
    cmd = [sys.executable, "-m", "kvtrie.serve", "--model", str(model_dir), "--host", "127.0.0.1", "--port", str(port),
           "--max-tokens", "8", "--prompt-cache-bytes", "64M",
           "--no-next-turn"]  # the cache holds exactly what requests stored (next turns: tests/test_next_turn.py)
    with ServerProcess(cmd, port, log_path=root / "server.log") as srv:
        srv.model_dir = model_dir
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return anthropic.Anthropic(base_url=server.url, api_key="none", max_retries=0, timeout=120)


def stats(server) -> dict:
    with urllib.request.urlopen(server.url + "/kvtrie/stats", timeout=30) as r:
        return json.loads(r.read())


def post(server, path: str, data: bytes, headers=None):
    req = urllib.request.Request(server.url + path, data=data, method="POST",
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def usage_sum(u) -> int:
    return u.input_tokens + u.cache_creation_input_tokens + u.cache_read_input_tokens


def count(client, **kw) -> int:
    """count_tokens of a create() call's arguments (less those count_tokens does not take)."""
    for key in ("max_tokens", "metadata", "stop_sequences", "extra_body"):
        kw.pop(key, None)
    return client.messages.count_tokens(**kw).input_tokens


def test_a_message_is_well_formed_and_its_usage_sums_to_count_tokens(client, server):
    kw = dict(model="claude-sonnet-4-5", max_tokens=6,
              system=[{"type": "text", "text": "Shelf A " + SYSTEM, "cache_control": {"type": "ephemeral"}}],
              messages=[{"role": "user", "content": "When does the reading room open?"}], metadata={"user_id": "reader-7"})
    msg = client.messages.create(**kw)  # (greedy: the server's --temp is 0; this SDK sends no temperature)
    assert msg.id.startswith("msg_") and msg.type == "message" and msg.role == "assistant"
    assert msg.model == "claude-sonnet-4-5"
    assert msg.stop_reason in ("end_turn", "max_tokens") and msg.stop_sequence is None
    assert all(b.type == "text" for b in msg.content)
    assert 1 <= msg.usage.output_tokens <= 6
    n = count(client, **kw)
    assert usage_sum(msg.usage) == n
    # the system block's breakpoint: the system turn was computed and written (a fresh prefix)
    tok = load_tokenizer(server.model_dir)
    system_turn = len(tok.apply_chat_template([{"role": "system", "content": kw["system"][0]["text"]}], tokenize=True))
    read = msg.usage.cache_read_input_tokens
    assert read < system_turn  # (a few template tokens may be shared with earlier prompts)
    assert msg.usage.cache_creation_input_tokens == system_turn - read
    assert msg.usage.input_tokens == n - system_turn
    s = stats(server)
    assert s["breakpoint_requests"] >= 1 and s["breakpoints"] >= 1


def test_a_stream_has_anthropics_events_in_order(client, server):
    kw = dict(model="m", max_tokens=6, system="Shelf B " + SYSTEM,
              messages=[{"role": "user", "content": "Do you lend audio books?"}], cache_control={"type": "ephemeral"})
    with client.messages.stream(**kw) as stream:
        events = list(stream)
        final = stream.get_final_message()
    types = [e.type for e in events if e.type in ("message_start", "content_block_start", "content_block_delta",
                                                   "content_block_stop", "message_delta", "message_stop")]
    assert types[0] == "message_start" and types[-2:] == ["message_delta", "message_stop"]
    raw = [e.model_dump() for e in events if e.type.startswith("content_block")]
    check_block_events(raw)
    assert final.content and final.content[0].type == "text"
    assert final.content[0].text == "".join(e.delta.text for e in events if e.type == "content_block_delta")
    assert final.stop_reason in ("end_turn", "max_tokens") and 1 <= final.usage.output_tokens <= 6
    n = count(client, **kw)
    assert usage_sum(final.usage) == n
    # automatic caching: the whole prompt counts as created (what was not read from the cache)
    assert final.usage.input_tokens == 0 and final.usage.cache_creation_input_tokens == n - final.usage.cache_read_input_tokens
    # on the wire: event: NAME / data: JSON, blank line
    status, headers, data = post(server, "/v1/messages", json.dumps({**kw, "stream": True}).encode())
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    frames = [f for f in data.decode().split("\n\n") if f and not f.startswith(":")]
    for frame in frames:
        name, payload = frame.split("\n")
        assert name.startswith("event: ") and payload.startswith("data: ")
        assert json.loads(payload[6:])["type"] == name[7:]
    assert [f.split("\n")[0] for f in frames][-2:] == ["event: message_delta", "event: message_stop"]


def test_a_shared_prefix_is_read_from_the_cache_as_the_stats_count_it(client, server):
    system = "Shelf C " + SYSTEM
    client.messages.create(model="m", max_tokens=4, system=system,
                           messages=[{"role": "user", "content": "Is the library open on Sunday?"}])
    before = stats(server)
    second = client.messages.create(model="m", max_tokens=4, system=system,
                                    messages=[{"role": "user", "content": "Can I renew a book by phone?"}])
    after = stats(server)
    read = second.usage.cache_read_input_tokens
    assert read > 0 and read == after["cached_tokens"] - before["cached_tokens"]
    assert after["requests"] - before["requests"] == 1
    assert second.usage.cache_creation_input_tokens == 0  # no breakpoints: nothing counts as created
    assert usage_sum(second.usage) == after["prompt_tokens"] - before["prompt_tokens"]


def test_both_apis_render_the_same_tokens_and_read_each_others_cache(client, server):
    oai = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)
    for first, name in (("openai", "Shelf D "), ("anthropic", "Shelf E ")):
        system, question = name + SYSTEM, "Where are the maps kept?"
        kw = dict(model="m", system=system, messages=[{"role": "user", "content": question}])
        n = count(client, **kw)

        def via_openai():
            r = oai.chat.completions.create(model="default_model", max_tokens=4, temperature=0, messages=[
                {"role": "system", "content": system}, {"role": "user", "content": question}])
            assert r.usage.prompt_tokens == n
            return r.usage.prompt_tokens_details.cached_tokens

        def via_anthropic():
            m = client.messages.create(max_tokens=4, **kw)
            assert usage_sum(m.usage) == n
            return m.usage.cache_read_input_tokens

        calls = (via_openai, via_anthropic) if first == "openai" else (via_anthropic, via_openai)
        assert calls[0]() < n // 4  # (the template's first tokens are shared with earlier prompts)
        assert calls[1]() == n - 1  # the whole prompt but the token kvtrie always leaves to compute


def test_a_tool_use_round_trip_renders_and_is_served(client, server):
    kw = dict(model="m", system="You answer briefly.", tools=[TOOL], tool_choice={"type": "auto"}, messages=ROUND_TRIP)
    n = count(client, **kw)
    tok = load_tokenizer(server.model_dir)
    tools = api.chat_tools(api.parse_request(body(tools=[TOOL])).tools)
    expected = tok.apply_chat_template(json.loads(json.dumps(ROUND_TRIP_OPENAI)), add_generation_prompt=True,
                                       tools=tools, tokenize=True)
    assert n == len(expected)
    text = tok.decode(expected)
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>' in text
    assert "<tool_response>\nSunny, 21 C\n</tool_response>" in text and '"name": "get_weather"' in text
    msg = client.messages.create(max_tokens=4, extra_body={"temperature": 0, "top_p": 1.0, "top_k": 0}, **kw)
    assert usage_sum(msg.usage) == n and msg.stop_reason in ("end_turn", "max_tokens", "tool_use")
    # the same conversation through the OpenAI API reads what this one stored
    oai = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)
    as_sent = json.loads(json.dumps(ROUND_TRIP_OPENAI))  # OpenAI clients send arguments as a JSON string
    as_sent[2]["tool_calls"][0]["function"]["arguments"] = json.dumps({"city": "Paris"})
    r = oai.chat.completions.create(model="default_model", max_tokens=2, temperature=0, messages=as_sent, tools=tools)
    assert r.usage.prompt_tokens == n and r.usage.prompt_tokens_details.cached_tokens == n - 1
    # tool_choice none: accepted (the tools stay in the prompt)
    none = client.messages.create(max_tokens=2, **{**kw, "tool_choice": {"type": "none"}})
    assert usage_sum(none.usage) == n


def test_stop_sequences_stop_and_are_reported(client, server):
    messages = [{"role": "user", "content": "Name three poets, please."}]
    ids = completion_ids(chat(server.url, messages, max_tokens=8, logprobs=True))  # the greedy reply's ids
    tok = load_tokenizer(server.model_dir)
    # a stop sequence the generation meets: a generated token, first seen at i, whose text encodes to it
    i = next((i for i, t in enumerate(ids) if 0 < i and t not in ids[:i] and t not in tok.eos_token_ids
              and tok.decode([t]).strip() and tok.encode(tok.decode([t]), add_special_tokens=False) == [t]), None)
    if i is None:
        pytest.skip("the greedy reply has no token whose text encodes to it alone")
    word = tok.decode([ids[i]])
    stopped = client.messages.create(model="m", max_tokens=8, stop_sequences=[word], messages=messages)
    assert stopped.stop_reason == "stop_sequence" and stopped.stop_sequence == word
    assert stopped.usage.output_tokens == i + 1
    assert word not in "".join(b.text for b in stopped.content)


def test_bad_bodies_answer_400_in_anthropics_shape_and_leave_the_cache_alone(client, server):
    before = stats(server)
    for bad, says in BAD_BODIES[:12]:
        status, headers, data = post(server, "/v1/messages", json.dumps(bad).encode())
        err = json.loads(data)
        assert status == 400 and err["type"] == "error" and err["error"]["type"] == "invalid_request_error", data
        assert says in err["error"]["message"]
    for raw in (b"{not json", b"\xff\xfe", b""):
        status, _, data = post(server, "/v1/messages", raw)
        assert status == 400 and json.loads(data)["error"]["type"] == "invalid_request_error"
    status, _, data = post(server, "/v1/messages/count_tokens", json.dumps({"model": "m", "messages": []}).encode())
    assert status == 400 and "messages" in json.loads(data)["error"]["message"]
    with pytest.raises(anthropic.BadRequestError) as info:
        client.messages.create(model="m", max_tokens=4, messages=[{"role": "user", "content": [{"type": "document"}]}])
    assert info.value.status_code == 400 and "document" in info.value.message
    after = stats(server)
    assert (after["requests"], after["prompt_tokens"], after["breakpoints"]) == \
        (before["requests"], before["prompt_tokens"], before["breakpoints"])
    assert [m["tokens_stored"] for m in after["models"].values()] == [m["tokens_stored"] for m in before["models"].values()]


WORDS = st.sampled_from(["book", "the", "reading", "room", "open", "Sunday", "maps", "poem", "sea", "sky", "42", "?"])
TEXT = st.lists(WORDS, min_size=1, max_size=6).map(" ".join)
CC = st.none() | st.just({"type": "ephemeral"}) | st.just({"type": "ephemeral", "ttl": "1h"})


def text_block(text, cc):
    return {"type": "text", "text": text, **({"cache_control": cc} if cc else {})}


@st.composite
def messages_requests(draw):
    """Valid Messages bodies: a system prompt or not, turns with strings or blocks, maybe a tool round trip."""
    out = {"model": "m", "max_tokens": draw(st.integers(1, 3)), "temperature": 0}
    if draw(st.booleans()):
        out["system"] = draw(TEXT | st.lists(st.builds(text_block, TEXT, CC), min_size=1, max_size=2))
    turns = []
    for _ in range(draw(st.integers(0, 2))):
        turns.append({"role": "user", "content": draw(TEXT)})
        turns.append({"role": "assistant", "content": draw(TEXT | st.lists(st.builds(text_block, TEXT, CC), min_size=1, max_size=2))})
    if draw(st.booleans()):
        out["tools"] = [TOOL]
        turns += [{"role": "user", "content": draw(TEXT)},
                  {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_x", "name": "get_weather",
                                                     "input": {"city": draw(TEXT)}}]},
                  {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_x", "content": draw(TEXT),
                                                **({"cache_control": draw(CC)} if draw(st.booleans()) else {})}]}]
    turns.append({"role": "user", "content": draw(TEXT | st.lists(st.builds(text_block, TEXT, CC), min_size=1, max_size=3))})
    out["messages"] = turns
    if draw(st.booleans()):
        out["cache_control"] = {"type": "ephemeral"}
    marks = json.dumps(out).count('"cache_control"')
    if marks > api.MAX_BREAKPOINTS:
        out.pop("cache_control", None)
        out["messages"] = [{**m, "content": [{k: v for k, v in b.items() if k != "cache_control"} for b in m["content"]]}
                           if isinstance(m["content"], list) else m for m in turns]
    return out


@given(request=messages_requests())
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
def test_any_valid_request_has_usage_that_sums_to_count_tokens(client, server, request):
    status, _, data = post(server, "/v1/messages/count_tokens", json.dumps(request).encode())
    assert status == 200, data
    n = json.loads(data)["input_tokens"]
    status, _, data = post(server, "/v1/messages", json.dumps(request).encode())
    assert status == 200, data
    msg = json.loads(data)
    u = msg["usage"]
    assert u["input_tokens"] + u["cache_creation_input_tokens"] + u["cache_read_input_tokens"] == n
    assert min(u["input_tokens"], u["cache_creation_input_tokens"], u["cache_read_input_tokens"]) >= 0
    assert 1 <= u["output_tokens"] <= request["max_tokens"]
    assert msg["stop_reason"] in ("end_turn", "max_tokens", "tool_use")
    if "cache_control" in request:
        assert u["input_tokens"] == 0


def mutations():
    """Bodies that break one rule of a valid one."""
    valid = {"model": "m", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
    broken_values = st.sampled_from([None, 0, -1, 1.5, "", "x", [], {}, [1], {"a": 1}, True])
    field = st.sampled_from(["model", "max_tokens", "messages", "system", "tools", "tool_choice", "stop_sequences",
                             "temperature", "top_p", "top_k", "stream", "metadata", "cache_control"])
    top = st.builds(lambda f, v: {**valid, f: v}, field, broken_values)
    block = st.fixed_dictionaries({"type": st.sampled_from(["text", "image", "tool_use", "tool_result", "video", 3])},
                                  optional={"text": broken_values, "cache_control": broken_values})
    in_message = st.builds(lambda b: {**valid, "messages": [{"role": "user", "content": [b]}]}, block)
    role = st.builds(lambda r: {**valid, "messages": [{"role": r, "content": "hi"}]},
                     st.sampled_from(["system", "assistant", "tool", "", None, 1]))
    return top | in_message | role


def invalid(candidate, count_only: bool = False) -> bool:
    try:
        api.parse_request(candidate, count_only=count_only)
    except api.RequestError:
        return True
    return False


@given(bad=mutations().filter(invalid))
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
def test_invalid_bodies_always_answer_400_in_anthropics_shape(server, bad):
    for path, count_only in (("/v1/messages", False), ("/v1/messages/count_tokens", True)):
        status, _, data = post(server, path, json.dumps(bad).encode())
        reply = json.loads(data)
        if not invalid(bad, count_only):  # a count_tokens body needs no max_tokens
            assert status == 200 and reply["input_tokens"] > 0
            continue
        assert status == 400, data
        assert reply["type"] == "error" and reply["error"]["type"] == "invalid_request_error" and reply["error"]["message"]


def test_a_stream_whose_cache_count_comes_late_starts_with_the_first_token():
    """On mlx-lm's single-request path (a seed, --kv-bits, a draft model) the restored count is set
    after the request starts: message_start waits for the first token and carries it."""
    import io
    from types import SimpleNamespace

    from mlx_lm.generate import TextStateMachine

    from kvtrie import serve_messages

    ctx = SimpleNamespace(prompt=list(range(10)), prompt_cache_count=-1, text_sm=TextStateMachine(), initial_state="normal",
                          tool_parser=None, has_tool_calling=False, stop=lambda: None)

    def responses(progress):
        progress(5, 10)  # during the prefill: a comment, not an event, before message_start
        ctx.prompt_cache_count = 6
        yield SimpleNamespace(text="Hi", token=50, finish_reason=None)
        progress(10, 10)
        yield SimpleNamespace(text="", token=EOS, finish_reason="stop")

    tokenizer = SimpleNamespace(eos_token_ids={EOS}, has_tool_calling=False, encode=lambda text, **kw: [ord(c) for c in text])
    generator = SimpleNamespace(
        model_provider=SimpleNamespace(tokenizer=tokenizer),
        cli_args=SimpleNamespace(temp=0.0, top_p=1.0, top_k=0, min_p=0.0, num_draft_tokens=3),
        generate=lambda completion, args, progress_callback: (ctx, responses(progress_callback)),
    )
    out = io.BytesIO()
    handler = SimpleNamespace(response_generator=generator, wfile=out, _set_stream_headers=lambda status: None,
                              send_header=lambda *a: None, end_headers=lambda: None)
    request = api.parse_request(body(stream=True, messages=[{"role": "user", "content": "hello"}]))
    serve_messages._generate(handler, request, ctx.prompt, [(8, "5m")])
    frames = out.getvalue().decode().split("\n\n")
    assert frames[0] == ": prefill 5/10"
    events = [json.loads(f.split("\ndata: ")[1]) for f in frames if f.startswith("event: ")]
    assert [e["type"] for e in events] == ["message_start", "content_block_start", "content_block_delta", "ping",
                                           "content_block_stop", "message_delta", "message_stop"]
    usage = events[0]["message"]["usage"]
    assert (usage["cache_read_input_tokens"], usage["cache_creation_input_tokens"], usage["input_tokens"]) == (6, 2, 2)
    assert events[-2]["usage"]["output_tokens"] == 2 and events[-2]["delta"]["stop_reason"] == "end_turn"


def test_the_prompt_cache_notes_breakpoints_per_prompt_and_counts_them():
    from types import SimpleNamespace

    from kvtrie.serve import ServeOptions, ServerPromptCache

    cache = ServerPromptCache(ServeOptions(cache_bytes=1 << 20, host_bytes=0), SimpleNamespace(model_key=None, model=None))
    prompt = list(range(20))
    cache.note_breakpoints(prompt, [7, 20], ["1h", "5m"])
    cache.note_breakpoints(list(range(5)), [], [])  # no breakpoints: nothing noted
    assert cache.breakpoints_for(prompt) == ((7, 20), ("1h", "5m")) and cache.breakpoints_for([1]) == ((), ())
    for positions, ttls in (([21], ["5m"]), ([-1], ["5m"]), ([3], ["1d"]), ([3, 4], ["5m"])):
        with pytest.raises(ValueError):
            cache.note_breakpoints(prompt, positions, ttls)
    stats = cache.stats()
    assert (stats["breakpoint_requests"], stats["breakpoints"]) == (1, 2)


def test_no_model_is_a_404_in_anthropics_shape():
    from types import SimpleNamespace

    from kvtrie.serve_messages import chat_renderer

    provider = SimpleNamespace(cli_args=SimpleNamespace(model=None, chat_template_args={}), tokenizer=None)
    with pytest.raises(api.RequestError) as info:
        chat_renderer(SimpleNamespace(model_provider=provider, generation_available=lambda: True))
    assert info.value.status == 404 and info.value.kind == "not_found_error"
