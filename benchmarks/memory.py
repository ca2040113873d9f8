"""Server memory under a byte budget: the RSS growth of `kvtrie serve` and mlx_lm.server through a soak.

    python benchmarks/memory.py [--quick] [--requests 500] [--budgets 256M 1G]

Why: `--prompt-cache-bytes` is a promise about memory, and the memory a user pays for is the
server process's resident set, not the cache's own counters (DESIGN.md). A KV-heavy tiny llama
(`llama-kv` in tests/serving.py: 8 layers x 8 KV heads x head_dim 128, float32 = 64 KiB of KV
per token, cheap to compute) is written to a temporary directory; both servers get the same
flags, `--prompt-cache-bytes B --prompt-cache-size 1000000` (only bytes bind), for each budget B.

Per (server, budget): start the server, send one warm-up request (not counted; the RSS after it
is the baseline), then drive the soak (tests/soak.py: chat users, agents that grow by tool
outputs and fork, one-off documents; one request at a time, each reply fed back) while a thread
samples the serving process's VmRSS every 0.1 s (the process that listens on the port: checked,
not assumed) and the kernel's VmHWM, reset at the baseline, catches what falls between samples.
Recorded: RSS growth (peak - baseline), growth / B, the trajectory per request, the hit rate
(sum cached_tokens / sum prompt_tokens), latency p50/p95, wall time, smaps_rollup at the end,
and for kvtrie `GET /kvtrie/stats` (every 25 requests and whole at the end).

In-flight working set W: the same soak with `--prompt-cache-bytes 0`, per server: what serving
costs with nothing cached (live caches of the request in flight, attention buffers, allocator
caches). Target per kvtrie run: growth <= 1.1 x B + W(kvtrie) + 64 MiB through the whole soak;
mlx-lm's growth (and its own line, with its W) is printed beside it.

Hit rates beside each: the unlimited oracle (`oracle_cached` over prompt + completion of every
earlier request) and, when benchmarks/belady.py exists, the offline optimum at the same bytes
(furthest-next-use over a trie of stored = prompt + completion minus the last id, KV bytes per
token from the config). Writes benchmarks/results/memory.json and memory.png.

Soak shape (SOAK_SHAPE below): 500 requests, about 45% chat turns (24 users active, 3-8 turns), 45% agent
steps (6 active, tool outputs of 40-120 tokens, forks, context <= 700), 10% one-off documents of 700
tokens, max_tokens 8. Six runs take ~22 minutes on 2 cores with OpenBLAS. `--quick`: the target's
two runs only (kvtrie at 0 for its W, then at 256M), 30 requests: about a minute.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from common import RESULTS, machine, save, verdict
from serving import ServerProcess, chat, free_port, make_model_dir, mlx_lm_server_cmd, oracle_cached
from soak import RssSampler, SoakWorkload, drive, listening_pid, proc_status, smaps_rollup, soak_workload

SERVERS = ("kvtrie", "mlx-lm")
MiB = 1 << 20
FACTOR = 1.1  # the target: growth <= FACTOR x B + W + SLACK
SLACK = 64 * MiB
BIG_SIZE = "1000000"  # --prompt-cache-size: only the bytes bind
LEDGER_KEYS = ("held_bytes", "held_device_bytes", "held_host_bytes", "in_use_bytes")
# The soak's shape for this benchmark (tests/soak.py's defaults are larger): prefill on the CPU
# is dominated by attention, quadratic in the prompt, so these sizes keep 6 runs of 500 requests
# near 20 minutes on 2 cores while every run still pushes several GiB of KV through the cache.
# 24 chat users and 6 agents active at once keep the reusable set above 256M (the offline optimum
# at 256M falls below the unlimited oracle) and below 1G.
SOAK_SHAPE: dict[str, Any] = {
    "chat_doc_tokens": 100, "chat_turns": (3, 8), "question_tokens": (8, 30), "agent_system_tokens": 200,
    "tool_tokens": (40, 120), "max_context": 700, "mix": (0.45, 0.45, 0.10), "active_chats": 24, "active_agents": 6,
}


# ----------------------------------------------------------------------------------------
# Sizes
# ----------------------------------------------------------------------------------------


def parse_size(text: str) -> int:
    """Bytes from `123`, `512M`, `4G`, `1.5GB` (powers of 1024, as the servers read them)."""
    s = text.strip().upper().removesuffix("B").removesuffix("I")
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    try:
        if s and s[-1] in units:
            return int(float(s[:-1]) * units[s[-1]])
        return int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size in bytes: {text!r} (e.g. 256M, 1G)") from None


def kv_bytes_per_token(config: dict) -> int:
    """KV bytes per token of a float32 llama: 2 (K and V) x layers x KV heads x head_dim x 4."""
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    return 2 * config["num_hidden_layers"] * config["num_key_value_heads"] * head_dim * 4


def mib(n: float | None) -> float | None:
    return None if n is None else n / MiB


def pct(values: Sequence[float], q: float) -> float:
    return float(np.percentile(values, q)) if len(values) else float("nan")


# ----------------------------------------------------------------------------------------
# Servers
# ----------------------------------------------------------------------------------------


def kvtrie_cmd(model_dir: Path, port: int, *extra: str) -> list[str]:
    """`kvtrie serve` as a user starts it: the console script next to this Python (it execs
    Python, so the process that serves is the one started), else `python -m kvtrie.cli serve`."""
    script = Path(sys.executable).with_name("kvtrie")
    head = [str(script)] if script.exists() else [sys.executable, "-m", "kvtrie.cli"]
    return [*head, "serve", "--model", str(model_dir), "--host", "127.0.0.1", "--port", str(port), *extra]


def server_cmd(server: str, model_dir: Path, port: int, budget: int) -> list[str]:
    flags = ["--prompt-cache-bytes", str(budget), "--prompt-cache-size", BIG_SIZE]
    if server == "mlx-lm":
        return mlx_lm_server_cmd(model_dir, port, *flags)
    return kvtrie_cmd(model_dir, port, *flags)


def get_json(url: str, timeout: float = 30.0) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def server_blas(pid: int) -> str:
    """Whether the server process mapped the preloaded OpenBLAS (as common.blas_info, for another process)."""
    try:
        maps = Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return "unknown"
    libs = {line.split()[-1] for line in maps.splitlines() if "libopenblas" in line and "numpy" not in line}
    return f"OpenBLAS ({min(libs)}, preloaded)" if libs else "the mlx wheel's bundled BLAS"


def ledger(stats: dict) -> dict[str, Any]:
    """kvtrie's memory ledger from /kvtrie/stats, where the server reports one (`held_bytes`,
    `held_device_bytes`, `held_host_bytes`, `in_use_bytes`, a `held` breakdown), at the top level
    or per model (summed); and what every version reports: tier bytes and recycled buffers."""
    models = list(stats.get("models", {}).values())
    out: dict[str, Any] = {}
    for key in (*LEDGER_KEYS, "device_bytes", "host_bytes", "recycle_bytes"):
        if isinstance(stats.get(key), (int, float)):
            out[key] = stats[key]
        elif any(isinstance(m.get(key), (int, float)) for m in models):
            out[key] = sum(m.get(key, 0) for m in models if isinstance(m.get(key), (int, float)))
    held = stats.get("held") if isinstance(stats.get("held"), dict) else None
    if held is None and any(isinstance(m.get("held"), dict) for m in models):
        held = {}
        for m in models:
            for k, v in (m.get("held") or {}).items():
                if isinstance(v, (int, float)):
                    held[k] = held.get(k, 0) + v
    if held is not None:
        out["held"] = held
    return out


# ----------------------------------------------------------------------------------------
# One run: a server, a budget, the soak
# ----------------------------------------------------------------------------------------


@dataclass
class Run:
    """What one run needs to know besides the server and the budget."""

    model_dir: Path
    workload: SoakWorkload
    max_tokens: int
    logs: Path
    stats_every: int
    bar: Any


def warm_up(url: str) -> None:
    """One short request, not counted: the model is loaded (mlx_lm.server loads it lazily) and
    the first buffers exist, so the baseline is a served, idle server."""
    chat(url, [{"role": "user", "content": "Hello! Is the server ready?"}], 4)


def trajectory(sampler: RssSampler, baseline: int, n: int) -> dict[str, list[float]]:
    """Per request i: RSS growth (MiB) read right after it, and the largest sample taken while
    it ran (between mark i-1 and mark i), so a peak inside a request is not lost."""
    marks = sorted((label, t, rss) for label, t, rss in sampler.marks if isinstance(label, int))
    samples = sampler.samples
    after, peak = [], []
    k, prev_t = 0, float("-inf")
    for _, t, rss in marks[:n]:
        top = rss
        while k < len(samples) and samples[k][0] <= t:
            if samples[k][0] > prev_t:
                top = max(top, samples[k][1])
            k += 1
        after.append((rss - baseline) / MiB)
        peak.append((top - baseline) / MiB)
        prev_t = t
    return {"after_mib": after, "peak_mib": peak}


def run_one(server: str, budget: int, run: Run) -> dict:
    """Start `server` with `--prompt-cache-bytes budget`, warm it up, drive the soak while
    sampling the RSS of the process that serves; return the measurements (an error is recorded)."""
    port = free_port()
    label = f"{server}-{budget}"
    proc = ServerProcess(server_cmd(server, run.model_dir, port, budget), port, timeout=120.0,
                         log_path=run.logs / f"{label}.log")
    out: dict[str, Any] = {"server": server, "budget_bytes": budget, "cmd": proc.cmd}
    stats_log: list[dict] = []
    sampler: RssSampler | None = None
    try:
        proc.start()
        out["startup_s"] = proc.startup_s
        warm_up(proc.url)
        pid = listening_pid(port, proc.pid)
        if pid is None:
            raise RuntimeError(f"no process of the server's tree (pid {proc.pid}) listens on port {port}")
        out.update(pid=pid, started_pid=proc.pid, pid_cmdline=cmdline(pid), server_blas=server_blas(pid))
        sampler = RssSampler(pid, period=0.1)
        time.sleep(0.5)  # let the warm-up's frees settle
        baseline = sampler.rss()
        out["baseline_bytes"] = baseline
        out["hwm_reset"] = sampler.reset_peak()
        sampler.start()

        def after_request(i: int, record: dict) -> None:
            sampler.mark(i)
            run.bar.update()
            if server == "kvtrie" and run.stats_every and (i + 1) % run.stats_every == 0:
                stats_log.append({"request": i, "rss_bytes": sampler.rss(), **ledger(get_json(proc.url + "/kvtrie/stats"))})

        t = time.perf_counter()
        records = drive(proc.url, run.model_dir, run.workload, run.max_tokens, on_request=after_request)
        out["wall_s"] = time.perf_counter() - t
        sampler.stop()
        hwm = sampler.hwm() if out["hwm_reset"] else 0
        out.update(summary(records, sampler, baseline, hwm))
        out["status_end"] = proc_status(pid)
        out["smaps_rollup_end"] = smaps_rollup(pid)
        if server == "kvtrie":
            out["stats"] = get_json(proc.url + "/kvtrie/stats")
            out["ledger_end"] = ledger(out["stats"])
            out["stats_trajectory"] = stats_log
        out["records"] = records
    except Exception as e:  # noqa: BLE001 (recorded and printed; the other runs go on)
        out["error"] = f"{type(e).__name__}: {e}"[:2000]
        out["log_tail"] = proc.log_tail(30)
    finally:
        if sampler is not None:
            sampler.stop()
        proc.stop()
    return out


def summary(records: list[dict], sampler: RssSampler, baseline: int, hwm: int) -> dict:
    """Growth, hit rate, latency of one run (records keep their ids for the oracles)."""
    peak = max(sampler.peak, hwm)
    prompt = sum(r["prompt_tokens"] for r in records)
    cached = sum(r["cached_tokens"] for r in records)
    lat = [r["latency_s"] for r in records]
    t0 = sampler.samples[0][0] if sampler.samples else 0.0
    return {
        "requests": len(records),
        "peak_bytes": peak,
        "peak_sampled_bytes": sampler.peak,
        "peak_hwm_bytes": hwm,
        "growth_bytes": peak - baseline,
        "prompt_tokens": prompt,
        "cached_tokens": cached,
        "hit_rate": cached / prompt if prompt else 0.0,
        "latency_p50_ms": 1e3 * pct(lat, 50),
        "latency_p95_ms": 1e3 * pct(lat, 95),
        "trajectory": trajectory(sampler, baseline, len(records)),
        "samples": [(round(t - t0, 2), round((r - baseline) / MiB, 1)) for t, r in sampler.samples[::5]],
    }


# ----------------------------------------------------------------------------------------
# Offline references: the unlimited oracle, the optimum at the same bytes
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TraceRequest:
    """A request as benchmarks/belady.py reads one: the prompt ids, and the ids the cache may
    store after it (prompt + completion minus the last generated id, which was never fed)."""

    prompt: list[int]
    stored: list[int]

    def __getitem__(self, key: str) -> list[int]:  # dict-style access works too
        return getattr(self, key)


def trace(records: Sequence[dict]) -> list[TraceRequest]:
    return [TraceRequest(list(r["prompt"]), list(r["prompt"]) + list(r["completion"])[:-1]) for r in records]


def oracle_hit_rate(records: Sequence[dict]) -> float:
    """Unlimited exact prefix reuse: `oracle_cached` over prompt + completion of every earlier request."""
    stored: list[list[int]] = []
    hits = total = 0
    for r in records:
        hits += oracle_cached(stored, r["prompt"])
        total += len(r["prompt"])
        stored.append(list(r["prompt"]) + list(r["completion"]))
    return hits / total if total else 0.0


def load_belady() -> tuple[Callable | None, str]:
    """benchmarks/belady.py's `belady(requests, budget_bytes, bytes_per_token)`, or None and why not."""
    try:
        import belady as module
    except ImportError as e:
        return None, f"benchmarks/belady.py is missing ({e}): no offline optimum column"
    fn = getattr(module, "belady", None)
    if not callable(fn):
        return None, "benchmarks/belady.py has no belady(): no offline optimum column"
    return fn, "offline optimum: benchmarks/belady.py, furthest next use over a trie at the same bytes"


def belady_hit_rate(fn: Callable, records: Sequence[dict], budget: int, bytes_per_token: int) -> float | None:
    """The optimum's hit rate at `budget` bytes (None if its result has none)."""
    result = fn(trace(records), budget, bytes_per_token)
    if isinstance(result, dict):
        if "hit_rate" in result:
            return float(result["hit_rate"])
        if "cached_tokens" in result:
            total = sum(len(r["prompt"]) for r in records)
            return result["cached_tokens"] / total if total else 0.0
        return None
    return float(result) if isinstance(result, (int, float)) else None


# ----------------------------------------------------------------------------------------
# The benchmark
# ----------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict:
    """W runs (budget 0) for both servers, then every budget for both servers."""
    results: dict[str, Any] = {"machine": machine(), "args": {k: v for k, v in vars(args).items()}, "runs": []}
    belady_fn, belady_note = load_belady()
    results["belady"] = belady_note
    plan = [(s, 0) for s in args.servers] + [(s, b) for b in args.budgets for s in args.servers]
    with tempfile.TemporaryDirectory(prefix="kvtrie-memory-bench-") as tmp:
        tmp = Path(tmp)
        logs = Path(args.logs) if args.logs else tmp / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        model_dir = make_model_dir(tmp / "llama-kv", "llama-kv", seed=args.seed)
        config = json.loads((model_dir / "config.json").read_text())
        per_token = kv_bytes_per_token(config)
        workload = soak_workload(model_dir, requests=args.requests, seed=args.seed, doc_tokens=args.doc_tokens,
                                 **SOAK_SHAPE)
        results.update(kv_bytes_per_token=per_token, workload={**workload.params, "kinds": workload.kinds()})
        bar = tqdm(total=len(plan) * len(workload), desc="memory", file=sys.stderr, leave=False)
        job = Run(model_dir, workload, args.max_tokens, logs, args.stats_every, bar)
        for server, budget in plan:
            bar.set_postfix_str(f"{server} at {budget // MiB} MiB")
            results["runs"].append(run_one(server, budget, job))
        bar.close()
        add_references(results["runs"], belady_fn, per_token)
    for r in results["runs"]:
        r.pop("records", None)  # the ids are large; the light per-request records stay
    results["working_set"] = {s: w for s in SERVERS if (w := working_set(results, s)) is not None}
    results["targets"] = targets(results)
    return results


def add_references(runs: list[dict], belady_fn: Callable | None, per_token: int) -> None:
    """The oracle's and the optimum's hit rates per run, and the light per-request records."""
    for r in runs:
        records = r.get("records")
        if not records:
            continue
        r["oracle_hit_rate"] = oracle_hit_rate(records)
        if belady_fn is not None and r["budget_bytes"] > 0:
            try:
                r["belady_hit_rate"] = belady_hit_rate(belady_fn, records, r["budget_bytes"], per_token)
            except Exception as e:  # noqa: BLE001 (another branch's module: note it, go on)
                r["belady_error"] = f"{type(e).__name__}: {e}"[:500]
        r["per_request"] = [
            {"kind": x["kind"], "prompt": x["prompt_tokens"], "cached": x["cached_tokens"],
             "completion": len(x["completion"]), "latency_ms": round(1e3 * x["latency_s"], 1)}
            for x in records
        ]


def working_set(results: dict, server: str) -> int | None:
    """W of `server`: the RSS growth of its budget-0 run (None if that run failed)."""
    for r in results["runs"]:
        if r["server"] == server and r["budget_bytes"] == 0 and "growth_bytes" in r:
            return r["growth_bytes"]
    return None


def target_bytes(budget: int, w: int) -> int:
    return int(FACTOR * budget) + w + SLACK


def targets(results: dict) -> list[dict]:
    """Per kvtrie run at a budget: growth <= 1.1 B + W(kvtrie) + 64 MiB, with mlx-lm's figure beside it."""
    out = []
    w = results["working_set"]
    by = {(r["server"], r["budget_bytes"]): r for r in results["runs"]}
    for (server, budget), r in by.items():
        if server != "kvtrie" or budget == 0:
            continue
        ml = by.get(("mlx-lm", budget), {})
        entry: dict[str, Any] = {"budget_bytes": budget, "mlx_lm_growth_bytes": ml.get("growth_bytes")}
        # the uniform fields every results JSON's targets have (benchmarks/run.py), beside this script's own
        name = f"kvtrie serve at --prompt-cache-bytes {budget_label(budget)}: RSS growth through the soak, MiB"
        if "growth_bytes" not in r or "kvtrie" not in w:
            entry.update(target=name, measured=None, goal=f"<= {FACTOR:g} B + W + {SLACK // MiB} MiB",
                         verdict="falls short", note=r.get("error") or "no W for kvtrie (its budget-0 run failed)")
        else:
            limit = target_bytes(budget, w["kvtrie"])
            first = next((i for i, g in enumerate(r["trajectory"]["peak_mib"]) if g * MiB > limit), None)
            entry.update(target=name, measured=r["growth_bytes"] / MiB,
                         goal=f"<= {limit / MiB:.0f} ({FACTOR:g} B + W {w['kvtrie'] / MiB:.0f} + {SLACK // MiB})",
                         growth_bytes=r["growth_bytes"], target_bytes=limit, ratio=r["growth_bytes"] / budget,
                         verdict=verdict(r["growth_bytes"] <= limit), first_request_over=first)
            if "mlx-lm" in w and "growth_bytes" in ml:
                entry["mlx_lm_target_bytes"] = target_bytes(budget, w["mlx-lm"])
        out.append(entry)
    return out


# ----------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------


def _f(v: Any, spec: str) -> str:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return "-"
    return format(v, spec)


def budget_label(b: int) -> str:
    if b == 0:
        return "0 (W)"
    return f"{b / (1 << 30):g}G" if b % (1 << 30) == 0 else f"{b / MiB:g}M"


def print_tables(results: dict) -> None:
    m, a, wl = results["machine"], results["args"], results["workload"]
    print(f"memory on {m['device']}, mlx {m['mlx']}, BLAS: {m['blas']}; {m['cpus']} CPUs")
    blas = sorted({r["server_blas"] for r in results["runs"] if "server_blas" in r})
    print(f"servers' BLAS: {', '.join(blas) or '-'}; model llama-kv, {results['kv_bytes_per_token'] // 1024} KiB of KV per token")
    print(f"soak: {wl['requests']} requests {wl['kinds']}, documents {wl['doc_tokens']} tokens, agent context <= "
          f"{wl['max_context']}, max_tokens {a['max_tokens']}, seed {wl['seed']}; one request at a time")
    w = results["working_set"]
    print("in-flight working set W (RSS growth at --prompt-cache-bytes 0): "
          + ", ".join(f"{s} {_f(mib(w.get(s)), '.0f')} MiB" for s in SERVERS))
    print(f"target per kvtrie run: growth <= {FACTOR} x B + W(kvtrie) + {SLACK // MiB} MiB, through the whole soak")
    print(f"hit rates: oracle = unlimited exact prefix reuse; optimum = {results['belady']}")
    print()
    head = (f"{'budget':<7} {'server':<7} {'growth MiB':>10} {'/B':>5} {'target':>7} {'verdict':<11} {'baseline':>8} "
            f"{'held MiB':>8} {'hit%':>5} {'optim%':>6} {'oracle%':>7} {'p50 ms':>7} {'p95 ms':>7} {'wall s':>6}")
    print(head)
    for r in results["runs"]:
        b = r["budget_bytes"]
        if "growth_bytes" not in r:
            print(f"{budget_label(b):<7} {r['server']:<7} ERROR {r.get('error', '')[:200]}")
            continue
        wl_ = w.get(r["server"])
        limit = target_bytes(b, wl_) if b and wl_ is not None else None
        led = r.get("ledger_end", {})
        held = led.get("held_bytes", (led.get("device_bytes", 0) + led.get("host_bytes", 0)) if led else None)
        print(f"{budget_label(b):<7} {r['server']:<7} {mib(r['growth_bytes']):>10.0f} "
              f"{_f(r['growth_bytes'] / b if b else None, '5.2f'):>5} {_f(mib(limit), '7.0f'):>7} "
              f"{(verdict(r['growth_bytes'] <= limit) if limit is not None else '-'):<11} {mib(r['baseline_bytes']):>8.0f} "
              f"{_f(mib(held), '8.0f'):>8} {100 * r['hit_rate']:>5.1f} {_f(100 * r['belady_hit_rate'] if r.get('belady_hit_rate') is not None else None, '6.1f'):>6} "
              f"{100 * r.get('oracle_hit_rate', float('nan')):>7.1f} {r['latency_p50_ms']:>7.0f} {r['latency_p95_ms']:>7.0f} {r['wall_s']:>6.0f}")
    print("  (growth = peak RSS - RSS after the warm-up request; target and verdict use each server's own W; "
          "held = kvtrie's ledger, else device + host tier bytes, at the end)")
    for r in results["runs"]:
        if "belady_error" in r:
            print(f"  optimum at {budget_label(r['budget_bytes'])} ({r['server']}) failed: {r['belady_error'][:200]}")
    print("\ntargets:")
    for t in results["targets"]:
        ml = t.get("mlx_lm_growth_bytes")
        mlx = f"; mlx-lm grew {mib(ml):.0f} MiB ({ml / t['budget_bytes']:.2f}x B)" if ml is not None else ""
        if "growth_bytes" in t:
            over = f", first over it at request {t['first_request_over']}" if t.get("first_request_over") is not None else ""
            print(f"  {t['verdict']:<11} kvtrie at {budget_label(t['budget_bytes'])}: growth {mib(t['growth_bytes']):.0f} MiB "
                  f"({t['ratio']:.2f}x B) <= target {mib(t['target_bytes']):.0f} MiB{over}{mlx}")
        else:
            print(f"  {t['verdict']:<11} kvtrie at {budget_label(t['budget_bytes'])}: {t.get('note', '')[:200]}{mlx}")


def chart(results: dict, out: Path) -> Path | None:
    """RSS growth (MiB) over request index per server x budget; dashed: each budget and its target."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(11, 6))
    budgets = sorted({r["budget_bytes"] for r in results["runs"]})
    colors = {b: f"C{i}" for i, b in enumerate(budgets)}
    w = results["working_set"].get("kvtrie")
    for r in results["runs"]:
        if "trajectory" not in r:
            continue
        b = r["budget_bytes"]
        style = "-" if r["server"] == "kvtrie" else ":"
        ax.plot(r["trajectory"]["peak_mib"], style, color=colors[b], lw=1.2 if b else 0.9,
                label=f"{r['server']} at {budget_label(b)}")
    for b in budgets:
        if b == 0:
            continue
        ax.axhline(b / MiB, color=colors[b], ls="--", lw=0.7, alpha=0.6)
        ax.text(0, b / MiB, f" budget {budget_label(b)}", color=colors[b], fontsize=7, va="bottom")
        if w is not None:
            ax.axhline(target_bytes(b, w) / MiB, color=colors[b], ls="--", lw=1.2)
            ax.text(0, target_bytes(b, w) / MiB, f" target {budget_label(b)}", color=colors[b], fontsize=7, va="bottom")
    ax.set_xlabel("request index")
    ax.set_ylabel("server RSS growth over the warm-up baseline, MiB (largest sample per request)")
    ax.set_title(f"RSS growth through the soak (kvtrie solid, mlx-lm dotted); target 1.1 x B + W + 64 MiB, "
                 f"W(kvtrie) = {_f(mib(w), '.0f')} MiB", fontsize=9)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    path = out / "memory.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="30 requests, the 256M budget, kvtrie only (the target's runs)")
    p.add_argument("--requests", type=int, default=None, help="requests in the soak (default 500; 30 with --quick)")
    p.add_argument("--servers", nargs="+", choices=SERVERS, default=None,
                   help="default both; kvtrie with --quick (mlx-lm's runs are printed beside, not judged)")
    p.add_argument("--budgets", nargs="+", type=parse_size, default=None,
                   help="--prompt-cache-bytes values (default 256M 1G; 256M with --quick)")
    p.add_argument("--doc-tokens", type=int, default=700, help="tokens of a one-off document")
    p.add_argument("--max-tokens", type=int, default=8, help="tokens generated per request")
    p.add_argument("--stats-every", type=int, default=25, help="GET /kvtrie/stats every N requests (0: only at the end)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--results", default=str(RESULTS), help="where memory.json and memory.png go")
    p.add_argument("--logs", default=None, help="keep the servers' logs here (default: a temporary directory)")
    args = p.parse_args(argv)
    args.requests = args.requests or (30 if args.quick else 500)
    args.servers = args.servers or (["kvtrie"] if args.quick else list(SERVERS))
    args.budgets = args.budgets or [parse_size("256M")] + ([] if args.quick else [parse_size("1G")])
    if any(b <= 0 for b in args.budgets):
        p.error("budgets must be > 0 (the W runs at 0 are made anyway)")
    t = time.perf_counter()
    results = run(args)
    results["wall_s"] = time.perf_counter() - t
    out = Path(args.results)
    png = chart(results, out)
    print_tables(results)
    path = save("memory", results, out)
    print(f"\nsaved {path}" + (f" and {png}" if png else "") + f" ({results['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
