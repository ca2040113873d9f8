"""The next turn ready before it arrives: a real `kvtrie serve` with a chat template that renders
replies differently in history (an empty think block in the generation prompt only, reasoning
stripped from earlier assistant turns) computes each conversation's next turn in the background,
so follow-ups restore up to their new message; replies equal a cold server's; requests are not
held up by the background work, and a request of the same conversation cancels it."""

from __future__ import annotations

import json
import os
import re
import time
import urllib.request

import pytest

pytest.importorskip("mlx_lm")
pytest.importorskip("prometheus_client")

from serving import (  # noqa: E402
    cached_tokens,
    chat,
    chat_tokens,
    completion_ids,
    make_model_dir,
    reply_text,
)
from test_serve import SYSTEM, get_json, kvtrie_serve  # noqa: E402

from kvtrie.next_turn import next_turn_prefix  # noqa: E402
from kvtrie.trie import common_prefix  # noqa: E402

# ChatML as Qwen3 renders it without thinking: the generation prompt opens an empty think block,
# and assistant turns before the last user message are rendered without anything up to "</think>"
THINK_TEMPLATE = (
    "{%- set ns = namespace(last_user=-1) %}"
    "{%- for m in messages %}{%- if m['role'] == 'user' %}{%- set ns.last_user = loop.index0 %}{%- endif %}{%- endfor %}"
    "{%- for message in messages %}"
    "{%- set content = message['content'] %}"
    "{%- if message['role'] == 'assistant' and loop.index0 < ns.last_user and '</think>' in content %}"
    "{%- set content = content.split('</think>')[-1] %}"
    "{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + content + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
)

QUESTIONS = ["Which animals live in the forest?", "And which of them sleep in winter?", "Name one that eats fish."]


def think_model_dir(root, arch):
    d = make_model_dir(root / arch, arch)
    config_path = d / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = THINK_TEMPLATE
    config_path.write_text(json.dumps(config, indent=2))
    return d


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {arch: think_model_dir(root, arch) for arch in ("llama", "qwen3_next")}


def call(url: str, method: str, path: str) -> dict:
    req = urllib.request.Request(url + path, method=method)
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def wait_idle(url: str, timeout: float = 60.0) -> dict:
    """The stats once no next-turn job is waiting or running."""
    deadline = time.monotonic() + timeout
    while True:
        stats = get_json(url, "/kvtrie/stats")
        if stats["next_turn_pending"] == 0:
            return stats
        assert time.monotonic() < deadline, stats
        time.sleep(0.05)


def wait_for(url: str, check, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        stats = get_json(url, "/kvtrie/stats")
        if check(stats):
            return stats
        assert time.monotonic() < deadline, stats
        time.sleep(0.01)


def new_message_start(model_dir, history: list) -> int:
    """Where a next user message's text starts in the rendered prompt (two different ones diverge there)."""
    a = chat_tokens(model_dir, history + [{"role": "user", "content": "A"}])
    b = chat_tokens(model_dir, history + [{"role": "user", "content": "Z"}])
    return common_prefix(a, b)


def test_prefix_strips_reasoning_where_the_template_does():
    """The prefix is what the next request renders: with a probe user message after the reply, so a
    template that strips reasoning only before the last user message strips it (a render of the
    conversation alone keeps it)."""
    from jinja2 import Template

    def render(messages, add_generation_prompt):
        text = Template(THINK_TEMPLATE).render(messages=messages, add_generation_prompt=add_generation_prompt)
        return [ord(c) for c in text]

    history = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]
    reply = {"role": "assistant", "content": "<think>long reasoning</think>The answer."}
    prefix = next_turn_prefix(render, history, reply)
    text = "".join(map(chr, prefix))
    assert text == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\nThe answer.<|im_end|>\n<|im_start|>user\n"
    assert "reasoning" in "".join(map(chr, render([*history, reply], False)))  # (the naive render keeps it)
    nxt = render([*history, reply, {"role": "user", "content": "More?"}], True)
    assert nxt[: len(prefix)] == prefix
    # after tool calls the probe is a tool result; a template that refuses the probes: the plain render
    calls = {"role": "assistant", "content": "", "tool_calls": [{"id": "c0", "type": "function",
                                                                   "function": {"name": "f", "arguments": {}}}]}
    assert "".join(map(chr, next_turn_prefix(render, history, calls))).endswith("<|im_start|>tool\n")

    def strict(messages, add_generation_prompt):
        if messages[-1]["role"] != "assistant":
            raise ValueError("no")
        return render(messages, add_generation_prompt)

    assert next_turn_prefix(strict, history, reply) == render([*history, reply], False)


def converse(url: str, replies: list | None, *, fed_back_think: bool = False) -> list[dict]:
    """Three turns; the history carries `replies` (else the server's own). Returns the responses."""
    history = [{"role": "system", "content": SYSTEM}]
    out = []
    for i, question in enumerate(QUESTIONS):
        history.append({"role": "user", "content": question})
        r = chat(url, history, max_tokens=24, logprobs=True)
        out.append(r)
        text = reply_text(r) if replies is None else replies[i]
        if fed_back_think and i % 2 == 0:  # (a client that sends its reasoning back: the template strips it)
            text = "<think>I should list a few animals.</think>" + text
        history.append({"role": "assistant", "content": text})
        if i + 1 < len(QUESTIONS):
            wait_idle(url)
    return out


@pytest.mark.parametrize("arch", ["llama", "qwen3_next"])
def test_follow_ups_restore_up_to_their_new_message(model_dirs, tmp_path, arch):
    d = model_dirs[arch]
    with kvtrie_serve(d, tmp_path, "--prefill-step-size", "32", name="on") as on:
        warm = converse(on.url, None, fed_back_think=True)
        stats_on = wait_idle(on.url)
        with urllib.request.urlopen(on.url + "/metrics", timeout=30) as r:
            metrics = r.read().decode()
    replies = [reply_text(r) for r in warm]
    with kvtrie_serve(d, tmp_path, "--prefill-step-size", "32", "--no-next-turn", name="off") as off:
        without = converse(off.url, replies, fed_back_think=True)
        stats_off = get_json(off.url, "/kvtrie/stats")
        # cold: the cache cleared before each request
        history = [{"role": "system", "content": SYSTEM}]
        cold = []
        for i, question in enumerate(QUESTIONS):
            history.append({"role": "user", "content": question})
            call(off.url, "DELETE", "/kvtrie/cache")
            cold.append(chat(off.url, history, max_tokens=24, logprobs=True))
            history.append({"role": "assistant", "content": replies[i]})
            assert cached_tokens(cold[-1]) == 0

    history = [{"role": "system", "content": SYSTEM}]
    for i, question in enumerate(QUESTIONS):
        if i:
            start = new_message_start(d, history)
            prompt = chat_tokens(d, history + [{"role": "user", "content": question}])
            assert cached_tokens(warm[i]) >= start, (i, cached_tokens(warm[i]), start, len(prompt))
            assert cached_tokens(without[i]) < start - 8  # (without: the trie is left inside the reply)
        history += [{"role": "user", "content": question}, {"role": "assistant", "content": replies[i]}]
        assert completion_ids(warm[i]) == completion_ids(cold[i]) == completion_ids(without[i])
    assert stats_on["next_turn_jobs"] == 3 and stats_on["next_turn_tokens"] > 0
    assert stats_on["next_turn_cancelled"] == 0
    assert stats_off["next_turn_jobs"] == 0 and stats_off["next_turn_tokens"] == 0
    assert stats_on["hit_rate"] > stats_off["hit_rate"]
    assert "kvtrie_next_turn_jobs_total 3.0" in metrics and "kvtrie_next_turn_pending 0.0" in metrics


def timed_chat(url: str, messages: list, **kw) -> tuple[dict, float]:
    tic = time.perf_counter()
    r = chat(url, messages, **kw)
    return r, time.perf_counter() - tic


def test_requests_go_first_and_the_conversation_cancels_its_job(model_dirs, tmp_path):
    """A job of many slow chunks: a request of another conversation waits at most one chunk and the
    job goes on after it; the conversation's own next request cancels it, keeping what was done."""
    d = model_dirs["qwen3_next"]
    delay = 0.25
    env = {**os.environ, "KVTRIE_NEXT_TURN_CHUNK_DELAY": str(delay)}
    srv = kvtrie_serve(d, tmp_path, "--prefill-step-size", "4")
    srv.env = env
    with srv:
        url = srv.url
        other = [{"role": "system", "content": "You answer in one word."}, {"role": "user", "content": "Forest?"}]
        chat(url, other, max_tokens=8)
        wait_idle(url)
        _, idle = timed_chat(url, other, max_tokens=8)  # (the same request, nothing in the background)
        wait_idle(url)
        convo = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTIONS[0]}]
        first = chat(url, convo, max_tokens=48, logprobs=True)
        wait_for(url, lambda s: s["next_turn_tokens"] >= 4)  # (a chunk is done: the job runs)
        r, waited = timed_chat(url, other, max_tokens=8)
        assert waited < idle + delay + 0.5, (waited, idle)
        stats = get_json(url, "/kvtrie/stats")
        assert stats["next_turn_cancelled"] == 0 and stats["next_turn_pending"] >= 1  # (paused, not dropped)
        done_before = wait_for(url, lambda s: s["next_turn_tokens"] > stats["next_turn_tokens"])["next_turn_tokens"]

        convo.append({"role": "assistant", "content": reply_text(first)})
        convo.append({"role": "user", "content": QUESTIONS[1]})
        r, waited = timed_chat(url, convo, max_tokens=8, logprobs=True)
        assert waited < idle + delay + 1.0, (waited, idle)
        stats = get_json(url, "/kvtrie/stats")
        assert stats["next_turn_cancelled"] == 1 and stats["next_turn_jobs"] >= 1
        (line,) = [l for l in srv.log_text().splitlines() if "next turn: cancelled" in l]
        stored, total = map(int, re.search(r"(\d+) of (\d+) tokens stored", line).groups())
        assert stored < total and stored >= done_before
        assert cached_tokens(r) == stored  # (what the job had done is what the request restored)
        assert chat_tokens(d, convo)[:total] == chat_tokens(d, convo[:3] + [{"role": "user", "content": "A"}])[:total]
    with kvtrie_serve(d, tmp_path, "--no-next-turn", name="cold") as cold_server:  # warm == cold
        cold = chat(cold_server.url, convo, max_tokens=8, logprobs=True)
    assert cached_tokens(cold) == 0 and completion_ids(cold) == completion_ids(r)


def test_a_messages_api_reply_gets_its_next_turn_too(model_dirs, tmp_path):
    """`/v1/messages` goes through the same generator: its reply's next turn is computed, and the
    follow-up (the reply sent back as a text block) restores up to its new message."""
    d = model_dirs["llama"]

    def messages(url, msgs):
        body = {"model": "m", "max_tokens": 24, "system": SYSTEM, "messages": msgs}
        req = urllib.request.Request(url + "/v1/messages", data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            return json.loads(r.read())

    with kvtrie_serve(d, tmp_path) as srv:
        msgs = [{"role": "user", "content": QUESTIONS[0]}]
        first = messages(srv.url, msgs)
        stats = wait_idle(srv.url)
        assert stats["next_turn_jobs"] == 1 and stats["next_turn_tokens"] > 0
        text = "".join(b["text"] for b in first["content"] if b["type"] == "text")
        msgs += [{"role": "assistant", "content": [{"type": "text", "text": text}]},
                 {"role": "user", "content": QUESTIONS[1]}]
        second = messages(srv.url, msgs)
    history = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTIONS[0]},
               {"role": "assistant", "content": text}]
    assert second["usage"]["cache_read_input_tokens"] >= new_message_start(d, history)
