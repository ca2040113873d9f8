"""`kvtrie serve`: a real server on a loopback port, driven over HTTP like users' chat clients.

Each test builds a tiny model directory (random weights, a BPE tokenizer trained with
`tokenizers`, a ChatML template), starts `kvtrie serve` as a subprocess and talks to it
through `/v1/chat/completions` (greedy), `/kvtrie/stats` and `/metrics`.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("mlx_lm")
pytest.importorskip("prometheus_client")

from serving import (  # noqa: E402
    ServerProcess,
    cached_tokens,
    chat,
    chat_tokens,
    completion_ids,
    free_port,
    make_model_dir,
    oracle_cached,
    prompt_tokens,
    reply_text,
)

SYSTEM = "You are a helpful assistant who answers questions about animals, briefly. " * 3


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {arch: make_model_dir(root / arch, arch) for arch in ("llama", "qwen3_next")}


def kvtrie_serve(model_dir: Path, tmp_path: Path, *flags: str, name: str = "server") -> ServerProcess:
    port = free_port()
    cmd = [sys.executable, "-m", "kvtrie.serve", "--model", str(model_dir), "--host", "127.0.0.1",
           "--port", str(port), "--max-tokens", "8", *flags]
    return ServerProcess(cmd, port, log_path=tmp_path / f"{name}.log")


def get_json(url: str, path: str) -> dict:
    with urllib.request.urlopen(url + path, timeout=30) as r:
        return json.loads(r.read())


def converse(url: str, model_dir: Path, users: list[int], turns: int, stored: list, log: list) -> dict:
    """Round-robin chat turns; records (cached, oracle, reply ids) per request in `log`."""
    histories = {u: [{"role": "system", "content": SYSTEM}] for u in users}
    for turn in range(turns):
        for u in users:
            msgs = histories[u]
            msgs.append({"role": "user", "content": f"I am user {u}. Question {turn}: which animals live in the forest?"})
            r = chat(url, msgs, max_tokens=8, logprobs=True)
            prompt = chat_tokens(model_dir, msgs)
            assert prompt_tokens(r) == len(prompt)
            log.append((u, turn, cached_tokens(r), oracle_cached(stored, prompt), completion_ids(r)))
            stored.append(prompt + completion_ids(r))
            msgs.append({"role": "assistant", "content": reply_text(r)})
    return histories


def test_help_shows_mlx_lm_flags_and_kvtrie_flags():
    cli = Path(sys.executable).parent / "kvtrie"
    for cmd in ([str(cli), "serve", "--help"], [sys.executable, "-m", "kvtrie.serve", "--help"]):
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        for flag in ("--model", "--port", "--max-tokens", "--prompt-cache-bytes", "--prompt-cache-size",
                     "--disk-dir", "--disk-bytes", "--persist-seconds", "--host-bytes", "--recycle-bytes",
                     "--mlx-cache-bytes"):
            assert flag in out.stdout
        text = " ".join(out.stdout.split())
        assert "no longer throttles" in text
        assert "Not in B: the model's weights, and the requests being served" in text  # what B bounds, and what not


def test_bad_sizes_are_refused_with_a_clear_message():
    out = subprocess.run([sys.executable, "-m", "kvtrie.serve", "--prompt-cache-bytes", "lots"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "not a size in bytes" in out.stderr


def test_recycle_bytes_reach_the_options_and_are_checked():
    import argparse

    from kvtrie.serve import ServeOptions, options_from

    args = argparse.Namespace(prompt_cache_bytes=1 << 20, host_bytes=None, disk_dir=None, disk_bytes=None,
                              prompt_cache_size=None, persist_seconds=2.0, shared_url=None, shared_block_tokens=256,
                              recycle_bytes=512 << 20, mlx_cache_bytes=None)
    options = options_from(args)
    assert options.recycle_bytes == 512 << 20
    assert options.mlx_cache_limit == (1 << 20) // 8  # MLX's buffer cache: an eighth of B, within it
    assert options_from(argparse.Namespace(**{**vars(args), "mlx_cache_bytes": 4 << 20})).mlx_cache_limit == options.device_bytes
    with pytest.raises(ValueError, match="--recycle-bytes"):
        ServeOptions(cache_bytes=1 << 20, host_bytes=0, recycle_bytes=-1)
    with pytest.raises(ValueError, match="--mlx-cache-bytes"):
        ServeOptions(cache_bytes=1 << 20, host_bytes=0, mlx_cache_bytes=-1)


@pytest.mark.parametrize("arch", ["llama", "qwen3_next"])
def test_chat_clients_hit_what_an_exact_prefix_cache_would(model_dirs, tmp_path, arch):
    """Sequential chats on a shared system prompt: a transformer hits exactly the oracle; a
    hybrid model, which restores only where a state was stored, close to it and never more."""
    d = model_dirs[arch]
    stored, log = [], []
    # (what the server generated and stored; the next turn computed in the background restores more:
    # tests/test_next_turn.py)
    with kvtrie_serve(d, tmp_path, "--prompt-cache-bytes", "64M", "--no-next-turn") as srv:
        converse(srv.url, d, [0, 1, 2], 3, stored, log)
        stats = get_json(srv.url, "/kvtrie/stats")
        metrics = urllib.request.urlopen(srv.url + "/metrics", timeout=30).read().decode()
        log_text = srv.log_text()
    cached = [c for _, _, c, _, _ in log]
    oracle = [o for _, _, _, o, _ in log]
    if arch == "llama":
        assert cached == oracle
    else:
        assert all(c <= o for c, o in zip(cached, oracle)) and sum(cached) >= 0.9 * sum(oracle), (cached, oracle)
        # where a request left the trie, the state there was stored: later ones restore from it
        (model_stats,) = stats["models"].values()
        assert model_stats["snapshots"] > 0 and model_stats["snapshot_bytes"] > 0
    assert stats["cached_tokens"] == sum(cached) and stats["requests"] == len(log)
    assert stats["hit_rate"] == pytest.approx(sum(cached) / stats["prompt_tokens"])
    assert stats["budgets"]["prompt_cache_bytes"] == 64 << 20

    from prometheus_client.parser import text_string_to_metric_families

    families = {f.name: f for f in text_string_to_metric_families(metrics)}
    assert families["kvtrie_cached_tokens"].samples[0].value == sum(cached)
    assert {s.labels["tier"] for s in families["kvtrie_budget_bytes"].samples} == {"device", "host"}
    assert "kvtrie_cache_kv_bytes" in families
    # one line per request: prompt tokens, cached, tier, restore time
    lines = [ln for ln in log_text.splitlines() if "kvtrie.serve" in ln or "request:" in ln]
    assert sum("request:" in ln and "prompt tokens" in ln and "restore" in ln for ln in lines) == len(log)


def test_concurrent_clients_get_the_replies_of_a_cold_server(model_dirs, tmp_path):
    """Four conversations at once (the server's batched path) on a warm cache: every greedy reply
    equals the reply a cold server (no reuse: each request alone) gives for the same messages."""
    d = model_dirs["qwen3_next"]
    results: dict[int, list] = {}
    errors: list = []

    def client(url: str, u: int) -> None:
        try:
            msgs = [{"role": "system", "content": SYSTEM}]
            out = []
            for turn in range(2):
                msgs.append({"role": "user", "content": f"User {u} asks question {turn} about birds."})
                r = chat(url, msgs, max_tokens=8, logprobs=True)
                out.append((json.dumps(msgs), completion_ids(r), cached_tokens(r)))
                msgs.append({"role": "assistant", "content": reply_text(r)})
            results[u] = out
        except Exception as exc:  # reported by the main thread
            errors.append(exc)

    with kvtrie_serve(d, tmp_path, "--prompt-cache-bytes", "64M", name="warm") as srv:
        threads = [threading.Thread(target=client, args=(srv.url, u)) for u in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert not errors, errors
    assert sum(c for out in results.values() for _, _, c in out) > 0  # the shared prompt was reused
    with kvtrie_serve(d, tmp_path, "--prompt-cache-bytes", "0", name="cold") as cold:
        for out in results.values():
            for msgs, ids, _ in out:
                r = chat(cold.url, json.loads(msgs), max_tokens=8, logprobs=True)
                assert cached_tokens(r) == 0 and completion_ids(r) == ids


def test_a_server_killed_with_kill_9_restarts_warm_from_its_disk_dir(model_dirs, tmp_path):
    """Conversations, a pause, kill -9; a new server on the same --disk-dir: the returning
    conversations restore from disk and their greedy replies equal a cold server's."""
    d = model_dirs["qwen3_next"]
    disk = tmp_path / "disk"
    flags = ("--prompt-cache-bytes", "64M", "--disk-dir", str(disk), "--persist-seconds", "0.5")
    stored, log = [], []
    with kvtrie_serve(d, tmp_path, *flags, name="first") as srv:
        histories = converse(srv.url, d, [0, 1], 2, stored, log)
        time.sleep(2.0)
        srv.kill(signal.SIGKILL)
    assert list(disk.rglob("*.safetensors"))
    returning = []
    with kvtrie_serve(d, tmp_path, *flags, name="second") as srv:
        for u, msgs in histories.items():
            msgs = msgs + [{"role": "user", "content": "And which ones live in the sea?"}]
            r = chat(srv.url, msgs, max_tokens=8, logprobs=True)
            prompt = chat_tokens(d, msgs)
            returning.append((msgs, cached_tokens(r), oracle_cached(stored, prompt), completion_ids(r)))
        stats = get_json(srv.url, "/kvtrie/stats")
    (model_stats,) = stats["models"].values()
    assert model_stats["disk_restores"] > 0 and model_stats["cached_tokens_disk"] > 0
    # every returning conversation restores its stored history (a hybrid: back to a state)
    assert all(c >= 0.9 * o for _, c, o, _ in returning), [(c, o) for _, c, o, _ in returning]
    with kvtrie_serve(d, tmp_path, "--prompt-cache-bytes", "0", name="cold") as cold:
        for msgs, _, _, ids in returning:
            assert completion_ids(chat(cold.url, msgs, max_tokens=8, logprobs=True)) == ids


def test_sigterm_flushes_and_damaged_records_are_misses(model_dirs, tmp_path):
    """SIGTERM stops the server cleanly after flushing; records damaged while it was down are
    misses, never state: the replies equal a cold server's."""
    d = model_dirs["llama"]
    disk = tmp_path / "disk"
    flags = ("--prompt-cache-bytes", "64M", "--disk-dir", str(disk))
    stored, log = [], []
    with kvtrie_serve(d, tmp_path, *flags, name="first") as srv:
        histories = converse(srv.url, d, [0, 1], 2, stored, log)
        assert srv.stop() == 0
        assert "cache flushed" in srv.log_text()
    files = sorted(disk.rglob("*.safetensors"))
    assert files
    for path in files:  # flip a byte in the middle of every record's arrays
        data = bytearray(path.read_bytes())
        data[len(data) - 5] ^= 0x5A
        path.write_bytes(bytes(data))
    with kvtrie_serve(d, tmp_path, *flags, name="second") as srv:
        replies = []
        for u, msgs in histories.items():
            msgs = msgs + [{"role": "user", "content": "And which ones live in the sea?"}]
            r = chat(srv.url, msgs, max_tokens=8, logprobs=True)
            if not replies:  # (the next ones may reuse what this one computed again)
                assert cached_tokens(r) == 0
            replies.append((msgs, completion_ids(r)))
        stats = get_json(srv.url, "/kvtrie/stats")
    (model_stats,) = stats["models"].values()
    assert model_stats["disk_errors"] > 0
    with kvtrie_serve(d, tmp_path, "--prompt-cache-bytes", "0", name="cold") as cold:
        for msgs, ids in replies:
            assert completion_ids(chat(cold.url, msgs, max_tokens=8, logprobs=True)) == ids
