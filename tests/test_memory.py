"""The server's flag bounds the server: a real `kvtrie serve` on a KV-heavy model, driven over HTTP
by a soak of chats, agents and one-off documents, keeps its resident memory within the budget
plus what serving itself takes (the same soak at a budget of 0), and its ledger within the budget."""

from __future__ import annotations

import json
import sys
import urllib.request

import pytest

from kvtrie import heap

from serving import ServerProcess, chat, free_port, make_model_dir
from soak import RssSampler, drive, listening_pid, soak_workload

MiB = 1 << 20
BUDGET = 96 * MiB
SLACK = 64 * MiB  # the benchmark's target: growth <= 1.1 x B + W + 64 MiB


@pytest.fixture(scope="module")
def kv_heavy(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("kv-heavy"), "llama-kv-tiny")


def soak(model_dir, budget: int, tmp_path) -> tuple[int, dict]:
    """RSS growth (peak - after a warm-up) of kvtrie serve at `budget` through the soak, and its stats."""
    port = free_port()
    cmd = [sys.executable, "-m", "kvtrie.serve", "--model", str(model_dir), "--host", "127.0.0.1", "--port", str(port),
           "--prompt-cache-bytes", str(budget), "--max-tokens", "4"]
    workload = soak_workload(model_dir, requests=60, seed=1, doc_tokens=400, chat_doc_tokens=0, max_context=900,
                             active_chats=8, active_agents=3, tool_tokens=(60, 160), agent_system_tokens=200)
    with ServerProcess(cmd, port, timeout=120, log_path=tmp_path / f"serve-{budget}.log") as srv:
        chat(srv.url, [{"role": "user", "content": "Hello"}], 2)
        sampler = RssSampler(listening_pid(port, srv.pid) or srv.pid, period=0.05)
        baseline = sampler.rss()
        sampler.reset_peak()
        with sampler:
            records = drive(srv.url, model_dir, workload, max_tokens=4)
        stats = json.loads(urllib.request.urlopen(srv.url + "/kvtrie/stats", timeout=30).read())
        peak = max(sampler.peak, sampler.hwm())
    stats["hit_rate_soak"] = sum(r["cached_tokens"] for r in records) / sum(r["prompt_tokens"] for r in records)
    return peak - baseline, stats


def test_server_rss_stays_within_the_budget_and_the_working_set(kv_heavy, tmp_path):
    working_set, _ = soak(kv_heavy, 0, tmp_path)
    growth, stats = soak(kv_heavy, BUDGET, tmp_path)
    assert stats["held_bytes"] <= BUDGET  # the ledger: everything kvtrie holds
    model = next(iter(stats["models"].values()))
    assert model["held_device_bytes"] <= stats["budgets"]["device_bytes"]
    assert model["held_host_bytes"] <= stats["budgets"]["host_bytes"]
    assert model["device_bytes"] + model["host_bytes"] > BUDGET // 2  # the budget was in use
    assert stats["hit_rate_soak"] > 0.2
    assert stats["huge_pages"] == (heap.huge_pages_env({}) is not None)  # restarted on huge pages where it can
    print(f"growth {growth / MiB:.0f} MiB, working set {working_set / MiB:.0f} MiB, held {stats['held_bytes'] / MiB:.0f} MiB")
    assert growth <= 1.1 * BUDGET + working_set + SLACK, (growth / MiB, working_set / MiB)
