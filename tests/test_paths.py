"""Every request path of `kvtrie serve` acts on kvtrie's plan: a real server on a loopback port.

mlx-lm serves a request with a `seed`, every request under `--kv-bits` and every request with a draft
model on its single path; kvtrie's `serve_single` makes that path stop its prefill where the batched
path does (segment ends, `prompt[:-1]`, where the prompt leaves the trie) and store there. Chat users
on tiny llama and qwen3_next models hit as much seeded as batched and get a cold server's replies;
a draft model's caches are prefilled and stored with the main model's; `--kv-bits` caches are
stored dequantized; a `cache_control` breakpoint is where a hybrid model's state is stored, on the
batched and the single path (driven with the `anthropic` client).
"""

from __future__ import annotations

import json
import sys
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("mlx_lm")

from serving import (  # noqa: E402
    CORPUS,
    ServerProcess,
    cached_tokens,
    chat,
    completion_ids,
    free_port,
    make_model_dir,
    prompt_tokens,
    reply_text,
)

from kvtrie import serve_single  # noqa: E402

SYSTEM = "You are a helpful assistant who answers questions about animals, briefly. " * 3
QUESTIONS = ["which animals live in the forest?", "and which ones live in the sea?", "what do foxes eat?"]
TOLERANCE = 0.02  # seeded hit rate within 2% of the batched one


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {
        "llama": make_model_dir(root / "llama", "llama"),
        "qwen3_next": make_model_dir(root / "qwen3_next", "qwen3_next", tools=True),
        "draft": make_model_dir(root / "draft", "llama", seed=1),  # the same tokenizer, other weights
    }


def kvtrie_serve(model_dir: Path, log_dir: Path, *flags: str, name: str) -> ServerProcess:
    # the paths' own plans compared: next-turn jobs (background, timing-dependent) left out
    port = free_port()
    cmd = [sys.executable, "-m", "kvtrie.serve", "--model", str(model_dir), "--host", "127.0.0.1",
           "--port", str(port), "--max-tokens", "8", "--prompt-cache-bytes", "64M", "--no-next-turn", *flags]
    return ServerProcess(cmd, port, log_path=log_dir / f"{name}.log")


def stats(url: str) -> dict:
    with urllib.request.urlopen(url + "/kvtrie/stats", timeout=30) as r:
        return json.loads(r.read())


def converse(url: str, users: int, turns: int, **kw) -> list[tuple[str, int, int, list[int]]]:
    """Round-robin chat turns on a shared system prompt: (messages, prompt tokens, cached, reply ids) per request."""
    histories = {u: [{"role": "system", "content": SYSTEM}] for u in range(users)}
    out = []
    for turn in range(turns):
        for u in range(users):
            msgs = histories[u] + [{"role": "user", "content": f"I am user {u}. Question {turn}: {QUESTIONS[turn % 3]}"}]
            r = chat(url, msgs, max_tokens=8, logprobs=True, **kw)
            out.append((json.dumps(msgs), prompt_tokens(r), cached_tokens(r), completion_ids(r)))
            histories[u] = msgs + [{"role": "assistant", "content": reply_text(r)}]
    return out


def hit_rate(log: list) -> float:
    return sum(c for _, _, c, _ in log) / sum(p for _, p, _, _ in log)


def replay_cold(model_dir: Path, log_dir: Path, log: list, *flags: str, **kw) -> None:
    """Every request of `log` again on a server that keeps nothing: the same greedy replies."""
    with kvtrie_serve(model_dir, log_dir, *flags, "--prompt-cache-bytes", "0", name="cold") as cold:
        for msgs, _, _, ids in log:
            r = chat(cold.url, json.loads(msgs), max_tokens=8, logprobs=True, **kw)
            assert cached_tokens(r) == 0 and completion_ids(r) == ids


_BATCHED: dict[str, list] = {}


def batched_run(model_dirs, tmp_path, arch: str) -> list:
    if arch not in _BATCHED:
        with kvtrie_serve(model_dirs[arch], tmp_path, name="batched") as srv:
            _BATCHED[arch] = converse(srv.url, 4, 3)
    return _BATCHED[arch]


@pytest.mark.parametrize("arch,path", [("llama", "seed"), ("qwen3_next", "seed"), ("llama", "draft")])
def test_the_single_path_hits_what_the_batched_path_does_with_a_cold_servers_replies(model_dirs, tmp_path, arch, path):
    """4 chat users x 3 turns, batched, then seeded (or with a draft model: mlx-lm's single path):
    the same replies, hit rates within 2% (a hybrid model: its states where the prompts leave the
    trie); and each reply is the one a cold server gives."""
    batched = batched_run(model_dirs, tmp_path, arch)
    flags = ("--draft-model", str(model_dirs["draft"])) if path == "draft" else ()
    kw = {"seed": 0} if path == "seed" else {}
    with kvtrie_serve(model_dirs[arch], tmp_path, *flags, name=path) as srv:
        single = converse(srv.url, 4, 3, **kw)
        (model_stats,) = stats(srv.url)["models"].values()
        log_text = srv.log_text()
    assert "Traceback" not in log_text
    assert [ids for *_, ids in single] == [ids for *_, ids in batched]
    assert hit_rate(batched) > 0.5
    assert abs(hit_rate(single) - hit_rate(batched)) <= TOLERANCE * hit_rate(batched), (hit_rate(single), hit_rate(batched))
    if arch == "qwen3_next":
        assert model_stats["snapshots"] > 0
    replay_cold(model_dirs[arch], tmp_path, single, *flags, **kw)


def test_kv_bits_caches_are_stored_dequantized_and_restore_to_a_cold_servers_replies(tmp_path_factory, tmp_path):
    """`--kv-bits 8 --quantized-kv-start 0` (every request on the single path, quantized from the first
    chunk): the prefill's stops and the end are stored as KV caches kvtrie holds, later turns restore
    them, and replies equal a cold `--kv-bits` server's."""
    model_dir = make_model_dir(tmp_path_factory.mktemp("kv") / "llama-kv-tiny", "llama-kv-tiny")  # head_dim 128: quantizable
    flags = ("--kv-bits", "8", "--quantized-kv-start", "0")
    with kvtrie_serve(model_dir, tmp_path, *flags, name="kv-bits") as srv:
        log = converse(srv.url, 2, 2)
        log_text = srv.log_text()
    assert "Traceback" not in log_text and "failed" not in log_text
    later = log[1:]
    assert all(c > 0 for _, _, c, _ in later)
    # a second turn restores at least its first turn's whole prompt: what generation quantized was stored too
    assert log[2][2] >= log[0][1] and log[3][2] >= log[1][1]
    replay_cold(model_dir, tmp_path, log, *flags)


# --- cache_control breakpoints are capture points ------------------------------------------

DOCUMENT = " ".join(CORPUS.split("\n")) * 2  # a few hundred tokens


@pytest.mark.parametrize("path", ["batched", "single"])
def test_a_breakpoint_after_a_document_is_where_a_hybrid_models_state_is_stored(model_dirs, tmp_path, path):
    """qwen3_next through the `anthropic` client: a request marks the end of a long document with
    `cache_control`; the next one, same document and another question, reads at least up to the
    breakpoint (without a state there it would read nothing: the prompts part inside the message)."""
    anthropic = pytest.importorskip("anthropic")
    flags = ("--kv-bits", "8") if path == "single" else ()  # (--kv-bits: mlx-lm's single path; too short to quantize)
    with kvtrie_serve(model_dirs["qwen3_next"], tmp_path, *flags, name=f"breakpoint-{path}") as srv:
        client = anthropic.Anthropic(base_url=srv.url, api_key="none", max_retries=0, timeout=120)

        def ask(question: str):
            return client.messages.create(model="m", max_tokens=4, messages=[{"role": "user", "content": [
                {"type": "text", "text": DOCUMENT, "cache_control": {"type": "ephemeral"}},
                {"type": "text", "text": question}]}])

        first = ask("Who lives in the little house?")
        breakpoint = first.usage.cache_read_input_tokens + first.usage.cache_creation_input_tokens
        second = ask("What does the man fetch every morning?")
        s = stats(srv.url)
    assert first.usage.cache_read_input_tokens == 0 and breakpoint > 200
    assert second.usage.cache_read_input_tokens >= breakpoint
    assert s["breakpoint_requests"] == 2 and s["cached_tokens"] == second.usage.cache_read_input_tokens


# --- the pieces ----------------------------------------------------------------------------


def test_the_prefill_stops_where_the_batched_path_stores():
    assert serve_single.segment_ends([[1, 2, 3], [4, 5], [6]]) == (3, 5)
    assert serve_single.segment_ends([[1, 2, 3]]) == ()
    # segment ends and split points past what was restored, and prompt[:-1] (not the prompt's end)
    assert serve_single.prefill_cuts(10, 0, (3, 7, 3)) == (3, 7, 9)
    assert serve_single.prefill_cuts(10, 4, (3, 7, 10, 12)) == (7, 9)
    assert serve_single.prefill_cuts(10, 9, (3,)) == ()  # one token left: nothing to stop at


def test_install_wraps_once_and_uninstall_puts_mlx_lms_back():
    import types

    def stream_generate(*args, **kwargs):
        yield from ()

    def tokenize(tokenizer, request, args):
        return [1, 2, 3], [[1, 2], [3]], ["system", "user"], "normal", None

    server = types.SimpleNamespace(stream_generate=stream_generate)
    generator = types.SimpleNamespace(model_provider=None, _tokenize=tokenize)
    first = serve_single.install(server, generator, cache=None)
    second = serve_single.install(server, generator, cache=None)
    assert server.stream_generate._kvtrie_original is stream_generate and second.original is stream_generate
    assert generator._tokenize._kvtrie_tokenize is tokenize
    assert generator._tokenize(None, None, None)[0] == [1, 2, 3]
    assert second._local.tokenized == serve_single.Tokenized((1, 2, 3), (2,)) and first is not second
    serve_single.uninstall(server)
    assert server.stream_generate is stream_generate


def test_quantized_caches_are_stored_dequantized_and_a_draft_lag_is_trimmed():
    import mlx.core as mx
    from mlx_lm.models.cache import ArraysCache, KVCache

    kv = KVCache()
    kv.update_and_fetch(mx.random.normal((1, 2, 5, 64)), mx.random.normal((1, 2, 5, 64)))
    (plain,) = serve_single.dequantized([kv])
    assert plain is kv
    (back,) = serve_single.dequantized([kv.to_quantized(group_size=64, bits=8)])
    assert type(back).__name__ == "KVCache" and back.offset == 5 and back.keys.shape == (1, 2, 5, 64)
    assert mx.allclose(back.keys, kv.keys[..., :5, :], atol=0.05).item()

    ahead = KVCache()
    ahead.update_and_fetch(mx.zeros((1, 2, 6, 8)), mx.zeros((1, 2, 6, 8)))
    serve_single.settle_offsets([kv, ahead])
    assert (kv.offset, ahead.offset) == (5, 5)
    ahead.update_and_fetch(mx.zeros((1, 2, 1, 8)), mx.zeros((1, 2, 1, 8)))
    serve_single.settle_offsets([kv, ahead, ArraysCache(size=2)])  # a state cannot be trimmed: left alone
    assert (kv.offset, ahead.offset) == (5, 6)
