"""The same HTTP chat workload on mlx_lm.server (its LRUPromptCache), on `kvtrie serve` and on vllm-mlx.

    python benchmarks/server.py [--quick] [--users 12 --turns 4 ...] [--vllm-mlx PATH]

Tiny float32 llama and qwen3_next model directories (Hugging Face layout, BPE tokenizer,
ChatML template; `tests/serving.py`) are written to a temporary directory. Workload (seeded):
N users x T turns sharing a system prompt of a few hundred tokens, sent round-robin (turn 1
of every user, then turn 2, ...), each reply appended as the assistant message, greedy,
`max_tokens` 16, one request at a time (so hit rates compare); then a concurrent phase (every
user's next turn at once, streaming: time to the first chunk that carries output). Both
servers get the same flags: `--prompt-cache-bytes B --prompt-cache-size 1000000` at each budget B (only bytes
bind), nothing at "defaults" (mlx-lm: 10 entries, no byte bound; kvtrie: a quarter of the
machine's memory).

vllm-mlx (a third server, from its own venv: `--vllm-mlx PATH` or $VLLM_MLX_PYTHON, PATH its
venv, that venv's python or its `vllm-mlx` script; skipped with a note without either) runs
`vllm-mlx serve DIR --continuous-batching --enable-prefix-cache` (its memory-aware prefix
cache lives in the continuous-batching scheduler), `--cache-memory-mb` = the budget rounded to
whole MiB (its flag takes an int), nothing at defaults (20% of available RAM), with a fresh
HOME per run (it saves its prefix cache under ~/.cache/vllm-mlx at shutdown and loads it at
start). Its usage has no cached_tokens and its replies no logprobs: its cached tokens come
from its log (`[schedule] ... prompt_tokens=P tokens_to_prefill=Q`: P - Q); where its reply
equals mlx-lm's up to what it does to the text (str.strip(), special tokens left out) the
client appends mlx-lm's text, so it gets mlx-lm's requests byte for byte, and mlx-lm's oracle.
Its rows run after mlx-lm's in each budget, and the comparison (kvtrie / vllm-mlx: hit rate,
TTFT p50, latency p50, peak RSS, wall) is taken at the defaults row (1.2x min with --quick).

Oracle: exact prefix reuse with unlimited memory (`oracle_cached` over prompt + completion
ids of every earlier request). Needed minimum: KV bytes per token (attention layers, from the
config) x unique tokens of those stored sequences, plus for qwen3_next one recurrent snapshot
(gated delta-net states + conv states) per sequence end and branch point; taken from the first
run of each model (kvtrie with a disk tier, which also runs the restart test: SIGTERM and
restart on the same `--disk-dir`, one more turn per user; then `kill -9` after 5 s idle,
restart, one more turn per user). Budgets: 0.6x, 1.2x, 3x the minimum and the defaults
(`--quick`: 4 users x 3 turns, 1.2x and the defaults, where the targets are).

Reported per (model, budget, server): hit rate (sum of usage cached_tokens over sum of
prompt_tokens) against the oracle's, the server process's peak resident memory (VmHWM, its
children's added), latency p50/p95 of whole non-streaming requests (16 tokens; `logprobs` for
the ids), wall time; the concurrent phase's TTFT p50/p95; whether the greedy replies equal
mlx-lm's. Writes benchmarks/results/server.json and server.png.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import random
import re
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from common import RESULTS, machine, save, verdict
from serving import (
    CORPUS,
    ServerProcess,
    cached_tokens,
    chat,
    chat_tokens,
    completion_ids,
    free_port,
    load_tokenizer,
    make_model_dir,
    mlx_lm_server_cmd,
    oracle_cached,
    prompt_tokens,
    reply_text,
)

MODELS = ("llama", "qwen3_next")
SERVERS = ("mlx-lm", "kvtrie")  # the pair the targets compare
VLLM = "vllm-mlx"  # the third server, where its venv is given (--vllm-mlx / VLLM_MLX_PYTHON)
BIG_SIZE = "1000000"  # --prompt-cache-size at a byte budget: only the bytes bind
GOALS = {"llama": 0.98, "qwen3_next": 0.97}  # kvtrie hit rate / oracle's at 1.2x the minimum
RESTORE_GOAL = 0.95  # kill -9 restart: returning conversations' prefixes restored
SENTENCES = [s.strip() for s in re.split(r"(?<=[.!?])\s+", CORPUS.replace("\n", " ")) if len(s.strip()) > 3]


# ----------------------------------------------------------------------------------------
# Workload
# ----------------------------------------------------------------------------------------


@dataclass
class Workload:
    system: str
    messages: list[list[str]]  # per user, its user messages (turns + 2: concurrent / restarts)


def build_workload(model_dir: Path, users: int, turns: int, system_tokens: int, seed: int) -> Workload:
    rng = random.Random(seed)
    tok = load_tokenizer(model_dir)
    parts: list[str] = []
    while len(tok.encode(" ".join(parts))) < system_tokens:
        parts.append(rng.choice(SENTENCES))
    messages = [
        [f"User {u}, turn {t}: " + " ".join(rng.choice(SENTENCES) for _ in range(rng.randint(1, 3))) for t in range(turns + 2)]
        for u in range(users)
    ]
    return Workload(" ".join(parts), messages)


class ScheduleLog:
    """Cached tokens per request from vllm-mlx's log, which its usage does not carry.

    vllm-mlx (0.6) answers ``usage`` with prompt/completion/total tokens only (no
    ``prompt_tokens_details``). Its scheduler logs, at INFO, one line per request when the
    request enters the batch, after every fallback that drops a fetched cache:
    ``[schedule] request=ID uid=N prompt_tokens=P tokens_to_prefill=Q[, C cached] ...``;
    reused = P - Q (an exact hit feeds the last prompt token again: P - 1).
    """

    LINE = re.compile(r"\[schedule\] request=\S+ uid=\S+ prompt_tokens=(\d+) tokens_to_prefill=(\d+)")

    def __init__(self, path: Path):
        self.path = Path(path)
        self.offset = 0

    def read(self) -> list[tuple[int, int]]:
        """(prompt tokens, reused tokens) of the requests scheduled since the last read."""
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        end = data.rfind(b"\n") + 1  # whole lines only
        self.offset += end
        return [(int(p), int(p) - int(q)) for p, q in self.LINE.findall(data[:end].decode(errors="replace"))]


def _carries_token(chunk: dict) -> bool:
    """A stream chunk with generated output (not vllm-mlx's role-only first chunk, sent before prefill)."""
    choices = chunk.get("choices") or []
    if not choices:
        return False
    c = choices[0]
    d = c.get("delta") or {}
    return (d.get("content") is not None or bool(d.get("tool_calls")) or bool(d.get("reasoning"))
            or bool(d.get("reasoning_content")) or c.get("finish_reason") is not None)


def same_reply(a: str, b: str) -> bool:
    """Replies equal up to what vllm-mlx does to the text: special tokens left out, str.strip() (which also takes
    the control characters \\x1c-\\x1f a tiny random model emits)."""
    def norm(t: str) -> str:
        for tok in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"):
            t = t.replace(tok, "")
        return t.strip()
    return norm(a) == norm(b)


@dataclass
class Client:
    """Every user's conversation, and what a perfect prefix cache would have stored."""

    url: str
    model_dir: Path
    work: Workload
    max_tokens: int
    schedule_log: ScheduleLog | None = None  # vllm-mlx: cached tokens from its log, not its usage
    # (user, turn) -> mlx-lm's reply: where this server's reply is the same up to same_reply, mlx-lm's text joins the
    # history, so the next requests are mlx-lm's requests byte for byte
    reference: dict | None = None
    stored: list[list[int]] = field(default_factory=list)  # prompt + completion ids of every request
    history: list[list[dict]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.history = [[{"role": "system", "content": self.work.system}] for _ in self.work.messages]

    def _ids(self, resp: dict) -> tuple[list[int], bool]:
        """Completion ids from logprobs; else (vllm-mlx returns none) the reply re-tokenized, plus eos on "stop"."""
        try:
            return completion_ids(resp), False
        except ValueError:
            tok = load_tokenizer(self.model_dir)
            ids = list(tok.encode(reply_text(resp), add_special_tokens=False))
            if resp["choices"][0].get("finish_reason") == "stop":
                ids.append(tok.eos_token_id)
            return ids, True

    def ask(self, user: int, turn: int) -> dict:
        """One sequential request (non-streaming, ids via logprobs); the reply joins the history."""
        msgs = self.history[user] + [{"role": "user", "content": self.work.messages[user][turn]}]
        prompt = chat_tokens(self.model_dir, msgs)
        oracle = oracle_cached(self.stored, prompt)
        t = time.perf_counter()
        resp = chat(self.url, msgs, self.max_tokens, logprobs=True)
        latency = time.perf_counter() - t
        ids, from_text = self._ids(resp)
        if prompt_tokens(resp) != len(prompt):
            raise RuntimeError(f"server counted {prompt_tokens(resp)} prompt tokens, the client {len(prompt)}")
        cached = cached_tokens(resp)
        extra: dict = {}
        if self.schedule_log is not None:
            lines = self.schedule_log.read()
            match = [c for p, c in lines if p == len(prompt)]
            cached = match[-1] if match else 0
            if len(lines) != 1 or not match:
                extra["log_mismatch"] = lines
        if from_text:
            extra["ids_from_text"] = True
            extra["completion_tokens"] = resp["usage"].get("completion_tokens")
        self.stored.append(prompt + ids)
        reply = reply_text(resp)
        ref = (self.reference or {}).get((user, turn))
        if ref is not None and ref != reply and same_reply(ref, reply):
            extra["history_reply"] = "mlx-lm's"
            reply_hist = ref
        else:
            reply_hist = reply
        self.history[user] = msgs + [{"role": "assistant", "content": reply_hist}]
        return {"user": user, "turn": turn, "prompt": len(prompt), "cached": cached, "oracle": oracle,
                "latency_s": latency, "completion": len(ids), "reply": reply,
                "done_at": time.monotonic(), **extra}

    def ask_streaming(self, user: int, turn: int) -> dict:
        """A streaming request (time to the first chunk with output); the history is left as it was."""
        msgs = self.history[user] + [{"role": "user", "content": self.work.messages[user][turn]}]
        prompt = chat_tokens(self.model_dir, msgs)
        oracle = oracle_cached(self.stored, prompt)
        body = {"model": "default_model", "messages": msgs, "max_tokens": self.max_tokens, "temperature": 0.0,
                "stream": True, "stream_options": {"include_usage": True}}
        req = urllib.request.Request(self.url + "/v1/chat/completions", data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
        t = time.perf_counter()
        first_line, ttft, usage = None, None, {}
        with urllib.request.urlopen(req, timeout=300) as r:
            for raw in r:
                line = raw.decode().strip()
                if not line.startswith("data:"):
                    continue
                now = time.perf_counter() - t
                if first_line is None:
                    first_line = now
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if ttft is None and _carries_token(chunk):
                    ttft = now
                usage = chunk.get("usage") or usage
        latency = time.perf_counter() - t
        return {"user": user, "turn": turn, "prompt": len(prompt), "cached": cached_tokens({"usage": usage}),
                "oracle": oracle, "ttft_s": ttft, "first_line_s": first_line, "latency_s": latency}


def sums(records: list[dict]) -> dict:
    p = sum(r["prompt"] for r in records)
    c = sum(r["cached"] for r in records)
    o = sum(r["oracle"] for r in records)
    return {"requests": len(records), "prompt_tokens": p, "cached_tokens": c, "oracle_cached": o,
            "hit_rate": c / p if p else 0.0, "oracle_hit_rate": o / p if p else 0.0, "vs_oracle": c / o if o else float("nan")}


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


# ----------------------------------------------------------------------------------------
# Memory the workload needs
# ----------------------------------------------------------------------------------------


def kv_shape(config: dict) -> tuple[int, int]:
    """(KV bytes per token over the attention layers, bytes of one recurrent snapshot), float32."""
    f32 = 4
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    per_layer = 2 * config["num_key_value_heads"] * head_dim * f32
    layers = config["num_hidden_layers"]
    if config["model_type"] != "qwen3_next":
        return layers * per_layer, 0
    attention = sum(1 for i in range(layers) if (i + 1) % config["full_attention_interval"] == 0)
    linear = layers - attention
    k_dim = config["linear_num_key_heads"] * config["linear_key_head_dim"]
    v_dim = config["linear_num_value_heads"] * config["linear_value_head_dim"]
    conv = (config["linear_conv_kernel_dim"] - 1) * (2 * k_dim + v_dim) * f32
    delta = config["linear_num_value_heads"] * config["linear_value_head_dim"] * config["linear_key_head_dim"] * f32
    return attention * per_layer, linear * (conv + delta)


def minimum(stored: list[list[int]], per_token: int, snapshot: int) -> dict:
    """Unique tokens of the stored sequences (a token trie), their KV, and a snapshot per end / branch point."""
    root: dict = {}
    nodes = 0
    for seq in stored:
        node = root
        for t in seq:
            child = node.get(t)
            if child is None:
                child = node[t] = {}
                nodes += 1
            node = child
    leaves = branches = 0
    stack = [root]
    while stack:
        node = stack.pop()
        if not node:
            leaves += 1
        elif len(node) >= 2 and node is not root:
            branches += 1
        stack.extend(node.values())
    points = leaves + branches if snapshot else 0
    return {"unique_tokens": nodes, "leaves": leaves, "branch_points": branches,
            "bytes": nodes * per_token + points * snapshot}


# ----------------------------------------------------------------------------------------
# Servers
# ----------------------------------------------------------------------------------------


def resolve_vllm_mlx(spec: str | None) -> tuple[list[str], str] | None:
    """vllm-mlx's command prefix (before "serve") and its venv's python, from a venv directory, its python or its
    `vllm-mlx` script; None where not given or not there."""
    if not spec:
        return None
    path = Path(spec).expanduser()
    if path.is_dir():
        script, python = path / "bin" / "vllm-mlx", path / "bin" / "python"
    elif path.name.startswith("python"):
        script, python = path.parent / "vllm-mlx", path
    else:
        script, python = path, path.parent / "python"
    if script.is_file():
        return [str(script)], str(python)
    if python.is_file():
        return [str(python), "-c", "import sys; from vllm_mlx.cli import main; sys.argv[0] = 'vllm-mlx'; sys.exit(main())"], str(python)
    return None


def vllm_mlx_versions(python: str) -> dict:
    import subprocess

    code = ("import importlib.metadata as m, json; print(json.dumps({p: m.version(p) for p in "
            "('vllm-mlx', 'mlx', 'mlx-lm', 'transformers')}))")
    try:
        out = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=120, check=True)
        return json.loads(out.stdout)
    except Exception as e:  # a note, not a failure
        return {"error": f"{type(e).__name__}: {e}"[:300]}


def server_cmd(server: str, model_dir: Path, port: int, flags: list[str], vllm: list[str] | None = None) -> list[str]:
    if server == "mlx-lm":
        return mlx_lm_server_cmd(model_dir, port, *flags)
    if server == VLLM:
        # continuous batching: the mode with vllm-mlx's prefix cache (memory-aware, on by default), as mlx_lm.server's
        # BatchGenerator path; the name the client sends as "model"
        return [*vllm, "serve", str(model_dir), "--host", "127.0.0.1", "--port", str(port),
                "--served-model-name", "default_model", "--continuous-batching", "--enable-prefix-cache", *flags]
    return [sys.executable, "-m", "kvtrie.serve", "--model", str(model_dir), "--host", "127.0.0.1", "--port", str(port), *flags]


def vllm_cache_mb(budget: int) -> int:
    """vllm-mlx's --cache-memory-mb takes whole MiB: the nearest, at least 1."""
    return max(1, round(budget / 2**20))


def budget_flags(budget: int | None, server: str = "kvtrie") -> list[str]:
    if budget is None:
        return []
    if server == VLLM:
        return ["--cache-memory-mb", str(vllm_cache_mb(budget))]
    return ["--prompt-cache-bytes", str(budget), "--prompt-cache-size", BIG_SIZE]


def _descendants(pid: int) -> list[int]:
    out, stack = [], [pid]
    while stack:
        p = stack.pop()
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                kids = [int(k) for k in (task / "children").read_text().split()]
            except OSError:
                continue
            out.extend(kids)
            stack.extend(kids)
    return out


def current_rss(pid: int) -> int:
    """VmRSS of the process and its children now, in bytes."""
    total = 0
    for p in [pid, *_descendants(pid)]:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def peak_rss(pid: int) -> int:
    """VmHWM of the process and of any children it started, in bytes (0 where /proc does not say)."""
    total = 0
    for p in [pid, *_descendants(pid)]:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def server_blas(pid: int) -> str:
    """Whether the server process mapped an OpenBLAS from outside site-packages (the preloaded one; numpy's,
    scipy's and torch's bundled copies do not count)."""
    try:
        maps = Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return "unknown"
    libs = {line.split()[-1] for line in maps.splitlines() if "libopenblas" in line and "-packages" not in line}
    return f"OpenBLAS ({min(libs)}, preloaded)" if libs else "the mlx wheel's bundled BLAS"


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


def held_bytes(stats: dict) -> int:
    return sum(m.get("device_bytes", 0) + m.get("host_bytes", 0) for m in stats.get("models", {}).values())


def recycled(stats: dict) -> dict:
    """How many live arrays the server's restores took from closed sessions (hits) or zero-filled (misses)."""
    models = stats.get("models", {}).values()
    return {k: sum(m.get(f"recycle_{k}", 0) for m in models) for k in ("hits", "misses")}


# ----------------------------------------------------------------------------------------
# Runs
# ----------------------------------------------------------------------------------------


def workload(client: Client, turns: int, bar) -> list[dict]:
    records = []
    for t in range(turns):
        for u in range(len(client.work.messages)):
            records.append(client.ask(u, t))
            bar.update()
    return records


def concurrent_phase(client: Client, turn: int) -> dict:
    users = range(len(client.work.messages))
    t = time.perf_counter()
    with cf.ThreadPoolExecutor(len(users)) as pool:
        records = list(pool.map(lambda u: client.ask_streaming(u, turn), users))
    wall = time.perf_counter() - t
    out: dict = {}
    if client.schedule_log is not None:  # vllm-mlx: the log's lines, matched to the requests by prompt length
        time.sleep(0.2)
        lines = client.schedule_log.read()
        pool_ = list(lines)
        for r in records:
            hit = next((i for i, (p, _) in enumerate(pool_) if p == r["prompt"]), None)
            r["cached"] = pool_.pop(hit)[1] if hit is not None else 0
        if pool_ or len(lines) != len(records):
            out["log_mismatch"] = {"lines": lines, "unmatched": pool_}
    ttfts = [r["ttft_s"] for r in records if r["ttft_s"] is not None]
    first = [r["first_line_s"] for r in records if r["first_line_s"] is not None]
    return {**sums(records), **out, "wall_s": wall, "ttft_p50_ms": 1e3 * pct(ttfts, 50), "ttft_p95_ms": 1e3 * pct(ttfts, 95),
            "first_line_p50_ms": 1e3 * pct(first, 50), "latency_p50_ms": 1e3 * pct([r["latency_s"] for r in records], 50)}


def summary(records: list[dict], wall: float) -> dict:
    lat = [r["latency_s"] for r in records]
    return {**sums(records), "latency_p50_ms": 1e3 * pct(lat, 50), "latency_p95_ms": 1e3 * pct(lat, 95), "wall_s": wall}


def run_cell(server: str, model_dir: Path, work: Workload, args, budget: int | None, logs: Path, bar,
             concurrent: bool, tmp: Path | None = None, reference: dict | None = None) -> dict:
    """One server at one budget: the sequential workload, then (optionally) the concurrent phase."""
    port = free_port()
    label = f"{model_dir.name}-{server}-{budget or 'defaults'}"
    flags = budget_flags(budget, server)
    log = logs / f"{label}.log"
    kw: dict = {}
    cell: dict = {"flags": flags, "budget_bytes": budget}
    if server == VLLM:
        # vllm-mlx saves its prefix cache to ~/.cache/vllm-mlx/prefix_cache/<model path> at shutdown and loads it at
        # start, always: a fresh HOME per run keeps one cell's cache out of the next
        home = Path(tempfile.mkdtemp(prefix=f"home-{label}-", dir=tmp))
        kw = {"env": {**os.environ, "HOME": str(home)}, "timeout": 300.0}
        if budget is not None:
            cell["budget_bytes"] = vllm_cache_mb(budget) * 2**20  # whole MiB
            cell["requested_budget_bytes"] = budget
        cell["cached_source"] = "server log ([schedule] lines): vllm-mlx's usage has no cached_tokens"
    proc = ServerProcess(server_cmd(server, model_dir, port, flags, args.vllm_cmd), port, log_path=log, **kw)
    try:
        with proc:
            cell["startup_s"] = proc.startup_s
            cell["rss_at_start"] = current_rss(proc.pid)  # at the first /health 200, before any request
            client = Client(proc.url, model_dir, work, args.max_tokens,
                            schedule_log=ScheduleLog(log) if server == VLLM else None,
                            reference=reference if server == VLLM else None)
            if client.schedule_log is not None:
                client.schedule_log.read()  # past the start-up lines
            t = time.perf_counter()
            records = workload(client, args.turns, bar)
            cell.update(summary(records, time.perf_counter() - t))
            cell["records"] = records
            cell["stored"] = client.stored
            if server == "kvtrie":
                stats = get_json(proc.url + "/kvtrie/stats")
                cell["held_bytes"] = held_bytes(stats)
                cell["server_hit_rate"] = stats.get("hit_rate")
                cell["recycled"] = recycled(stats)  # (sequential phase only)
            if server == VLLM:
                try:
                    cache = get_json(proc.url + "/v1/cache/stats").get("engine_cache") or {}
                    cell["vllm_cache_stats"] = cache  # (sequential phase only)
                    cell["held_bytes"] = int(cache.get("current_memory_mb", 0) * 2**20)
                except Exception as e:
                    cell["vllm_cache_stats"] = {"error": str(e)[:300]}
                cell["log_mismatches"] = sum(1 for r in records if "log_mismatch" in r)
            if concurrent:
                cell["concurrent"] = concurrent_phase(client, args.turns)
                bar.update(len(work.messages))
            cell["peak_rss"] = peak_rss(proc.pid)
            cell["server_blas"] = server_blas(proc.pid)
    except Exception as e:  # noqa: BLE001 (a server error is a result: record it, go on)
        cell["error"] = f"{type(e).__name__}: {e}"[:2000]
        cell["log_tail"] = proc.log_tail(20)
    return cell


def restart_round(cmd: list[str], port: int, log: Path, client: Client, turn: int, how: str) -> tuple[ServerProcess, dict]:
    """Start the server again (same port, same disk dir) and send every user's next turn."""
    proc = ServerProcess(cmd, port, log_path=log)
    t0 = time.monotonic()
    proc.start()
    out: dict = {"how": how, "startup_s": proc.startup_s}
    try:
        records = [client.ask(u, turn) for u in range(len(client.work.messages))]
        hits = [i for i, r in enumerate(records) if r["cached"] > 0]
        out["first_hit_s"] = records[hits[0]]["done_at"] - t0 if hits else None
        out["first_hit_request"] = hits[0] if hits else None
        out["first_request"] = {"cached": records[0]["cached"], "oracle": records[0]["oracle"], "prompt": records[0]["prompt"]}
        out.update(sums(records))
        out["restored"] = out["vs_oracle"]
        out["per_user_restored"] = [r["cached"] / r["oracle"] if r["oracle"] else float("nan") for r in records]
        stats = get_json(proc.url + "/kvtrie/stats")
        out["disk_stats"] = {k: v for m in stats.get("models", {}).values() for k, v in m.items() if "disk" in k}
        out["records"] = records
    except BaseException:
        proc.stop()
        raise
    return proc, out


def n_files(directory: Path) -> int:
    return sum(1 for f in directory.rglob("*") if f.is_file())


def run_restart(model_dir: Path, work: Workload, args, disk_dir: Path, logs: Path, bar) -> dict:
    """kvtrie with a disk tier: the workload, SIGTERM + restart + a turn each, kill -9 + restart + a turn each."""
    port = free_port()
    cmd = server_cmd("kvtrie", model_dir, port, ["--disk-dir", str(disk_dir)])
    log = logs / f"{model_dir.name}-kvtrie-disk"
    procs = [ServerProcess(cmd, port, log_path=f"{log}.log")]
    cell: dict = {"flags": ["--disk-dir", "DIR"], "budget_bytes": None}
    try:
        proc = procs[0].start()
        cell["startup_s"] = proc.startup_s
        client = Client(proc.url, model_dir, work, args.max_tokens)
        t = time.perf_counter()
        records = workload(client, args.turns, bar)
        cell.update(summary(records, time.perf_counter() - t))
        cell["records"] = records
        cell["stored"] = [list(s) for s in client.stored]
        cell["held_bytes"] = held_bytes(get_json(proc.url + "/kvtrie/stats"))
        cell["peak_rss"] = peak_rss(proc.pid)
        cell["server_blas"] = server_blas(proc.pid)
        t = time.monotonic()
        cell["sigterm_exit"] = proc.stop()
        cell["sigterm_stop_s"] = time.monotonic() - t
        cell["disk_files_after_sigterm"] = n_files(disk_dir)
        rounds = []
        proc, r = restart_round(cmd, port, Path(f"{log}-after-sigterm.log"), client, args.turns, "SIGTERM")
        procs.append(proc)
        rounds.append(r)
        bar.update(len(work.messages))
        time.sleep(5.0)  # idle: the disk tier's write-back has time to land
        cell["disk_files_before_kill"] = n_files(disk_dir)
        cell["kill_exit"] = proc.kill()
        proc, r = restart_round(cmd, port, Path(f"{log}-after-kill.log"), client, args.turns + 1, "kill -9")
        procs.append(proc)
        rounds.append(r)
        bar.update(len(work.messages))
        cell["restarts"] = rounds
    except Exception as e:  # noqa: BLE001 (recorded, as in run_cell)
        cell["error"] = f"{type(e).__name__}: {e}"[:2000]
        cell["log_tail"] = procs[-1].log_tail(20)
    finally:
        for proc in procs:
            proc.stop()
    return cell


def run(args: argparse.Namespace) -> dict:
    results: dict = {"machine": machine(), "args": {k: v for k, v in vars(args).items() if k != "vllm_cmd"}, "models": {}}
    servers = SERVERS + ((VLLM,) if args.vllm_cmd else ())
    results["servers"] = list(servers)
    if args.vllm_cmd:
        results["vllm_mlx"] = {"command": args.vllm_cmd[:1], "python": args.vllm_python,
                               "versions": vllm_mlx_versions(args.vllm_python),
                               "flags": ["--continuous-batching", "--enable-prefix-cache", "--served-model-name default_model",
                                         "--cache-memory-mb N at a budget (whole MiB); none at defaults (20% of available RAM)"]}
    else:
        results["vllm_mlx"] = {"skipped": args.vllm_note}
    scales = [1.2] if args.quick else [0.6, 1.2, 3.0]  # the targets' budget is 1.2x; the others are for the table
    defaults = True  # the defaults row has targets of its own (hit rate and peak RSS against mlx-lm's)
    users = args.users
    per_cell = users * args.turns + (users if args.concurrent else 0)
    cells = len(scales) * len(servers) + (len(servers) if defaults else 0)
    total = len(MODELS) * (users * (args.turns + 2) + cells * per_cell)
    bar = tqdm(total=total, desc="server", file=sys.stderr, leave=False)
    with tempfile.TemporaryDirectory(prefix="kvtrie-server-bench-") as tmp:
        tmp = Path(tmp)
        logs = Path(args.logs) if args.logs else tmp / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        for arch in MODELS:
            model_dir = make_model_dir(tmp / arch, arch, seed=args.seed)
            config = json.loads((model_dir / "config.json").read_text())
            per_token, snapshot = kv_shape(config)
            work = build_workload(model_dir, args.users, args.turns, args.system_tokens, args.seed)
            res = results["models"][arch] = {
                "kv_bytes_per_token": per_token, "snapshot_bytes": snapshot,
                "system_prompt_tokens": len(load_tokenizer(model_dir).encode(work.system)), "cells": {}}
            bar.set_postfix_str(f"{arch}: kvtrie + disk tier, restarts")
            disk = res["restart"] = run_restart(model_dir, work, args, tmp / f"{arch}-disk", logs, bar)
            stored, source = disk.pop("stored", None), "kvtrie --disk-dir run"
            first: dict = {}  # the defaults row, run first: it sizes the budgets when the disk run failed
            if defaults or stored is None:
                for server in ("kvtrie", "mlx-lm") + ((VLLM,) if defaults and args.vllm_cmd else ()):
                    bar.set_postfix_str(f"{arch}: defaults, {server}")
                    first[server] = run_cell(server, model_dir, work, args, None, logs, bar, args.concurrent, tmp,
                                             replies(first.get("mlx-lm")))
                    if stored is None and server in SERVERS and "stored" in first[server]:
                        stored, source = first[server]["stored"], f"{server} defaults run"
                    if not defaults and stored is not None:
                        break
            if stored is None:
                raise RuntimeError(f"{arch}: every first run failed, no minimum to size budgets from: "
                                   f"{disk.get('error')}\n{disk.get('log_tail')}")
            need = res["needed_minimum"] = {**minimum(stored, per_token, snapshot), "from": source}
            for s in scales:
                label, budget = f"{s:g}x min", int(s * need["bytes"])
                row = res["cells"][label] = {}
                for server in servers:
                    bar.set_postfix_str(f"{arch}: {label}, {server}")
                    row[server] = run_cell(server, model_dir, work, args, budget, logs, bar, args.concurrent, tmp,
                                           replies(row.get("mlx-lm")))
            if first:
                res["cells"]["defaults"] = {s: first[s] for s in servers if s in first}
            for row in res["cells"].values():
                for server, cell in row.items():
                    stored_ = cell.pop("stored", None)
                    if stored_ is not None and server != VLLM:  # differs from the minimum's run only if the replies did
                        cell["own_minimum_bytes"] = minimum(stored_, per_token, snapshot)["bytes"]
                row_agreement(row)
    bar.close()
    results["targets"] = targets(results)
    results["vs_vllm_mlx"] = comparison(results)
    return results


def replies(cell: dict | None) -> dict | None:
    """(user, turn) -> reply of a finished cell's sequential phase."""
    if not cell or "records" not in cell:
        return None
    return {(r["user"], r["turn"]): r["reply"] for r in cell["records"]}


def row_agreement(row: dict) -> None:
    """Greedy replies (temperature 0, same weights) against mlx-lm's, request by request, sequential phase.

    vllm-mlx returns no token ids, so its oracle was first taken from its replies re-tokenized, which overstates it
    (an invalid UTF-8 byte comes back as U+FFFD, 3 bytes, more tokens than were generated). Where every earlier reply
    equals mlx-lm's, its requests are mlx-lm's, and so is the oracle: mlx-lm's is used (the concurrent phase's too
    when all its replies were equal)."""
    ref_cell = row.get("mlx-lm", {})
    ref_recs = ref_cell.get("records", [])
    ref = {(r["user"], r["turn"]): r for r in ref_recs}
    if not ref:
        return
    for server, cell in row.items():
        if server == "mlx-lm" or "records" not in cell:
            continue
        recs = cell["records"]  # in request order (round robin), as mlx-lm's
        exact = [(r["user"], r["turn"]) in ref and ref[(r["user"], r["turn"])]["reply"] == r["reply"] for r in recs]
        same = [(r["user"], r["turn"]) in ref and same_reply(ref[(r["user"], r["turn"])]["reply"], r["reply"]) for r in recs]
        diff = next(((r["user"], r["turn"]) for r, ok in zip(recs, same) if not ok), None)
        cell["replies_vs_mlx_lm"] = {"equal": sum(exact), "equal_but_strip": sum(same), "of": len(same), "first_differs": diff}
        if not any("ids_from_text" in r for r in recs):
            continue
        n_same = 0
        for r, ok in zip(recs, same):
            m = ref.get((r["user"], r["turn"]))
            if m is not None and m["prompt"] == r["prompt"]:
                r["oracle"], r["oracle_from"] = m["oracle"], "mlx-lm (same requests)"
                n_same += 1
            if not ok:  # the histories part here: later prompts are this server's own
                break
        cell.update({k: v for k, v in sums(recs).items() if k in ("oracle_cached", "oracle_hit_rate", "vs_oracle")})
        cell["oracle_from"] = ("mlx-lm's run (same requests)" if n_same == len(recs) else
                               f"mlx-lm's run for {n_same} of {len(recs)} requests (same requests), the rest from "
                               f"re-tokenized replies")
        cc, rc = cell.get("concurrent"), ref_cell.get("concurrent")
        if cc and rc and all(same) and cc["prompt_tokens"] == rc["prompt_tokens"]:
            cc["oracle_cached"], cc["oracle_hit_rate"] = rc["oracle_cached"], rc["oracle_hit_rate"]
            cc["vs_oracle"] = cc["cached_tokens"] / cc["oracle_cached"] if cc["oracle_cached"] else float("nan")
            cc["oracle_from"] = "mlx-lm's run (same requests)"


# ----------------------------------------------------------------------------------------
# Targets, tables, chart
# ----------------------------------------------------------------------------------------


def _t(name: str, value: float, goal: str, ok: bool) -> dict:
    return {"target": name, "measured": value, "goal": goal, "verdict": verdict(ok)}


def targets(results: dict) -> list[dict]:
    out = []
    for arch, res in results["models"].items():
        cell = res["cells"].get("1.2x min")
        if cell:
            kv, ml = cell["kvtrie"], cell["mlx-lm"]
            v = kv.get("vs_oracle", float("nan"))
            out.append(_t(f"{arch}, 1.2x the needed minimum ({cell['kvtrie']['budget_bytes']} B): kvtrie hit rate / oracle's "
                          f"(mlx-lm's at the same bytes: {ml.get('vs_oracle', float('nan')):.3f})",
                          v, f">= {GOALS[arch]}", v >= GOALS[arch]))
        cell = res["cells"].get("defaults")
        if cell and all(k in cell for k in SERVERS):
            kv, ml = cell["kvtrie"], cell["mlx-lm"]
            ok = "hit_rate" in kv and "hit_rate" in ml
            hk, hm = kv.get("hit_rate", float("nan")), ml.get("hit_rate", float("nan"))
            out.append(_t(f"{arch}, server defaults: kvtrie hit rate / mlx-lm's ({hk:.3f} vs {hm:.3f})",
                          hk / hm if hm else float("inf"), ">= 1", ok and hk >= hm))
            rk, rm = kv.get("peak_rss", 0), ml.get("peak_rss", 0)
            out.append(_t(f"{arch}, server defaults: kvtrie peak RSS / mlx-lm's ({rk / 2**20:.1f} vs {rm / 2**20:.1f} MiB)",
                          rk / rm if rm else float("nan"), "<= 1", bool(rk and rm and rk <= rm)))
        rounds = {r["how"]: r for r in res["restart"].get("restarts", [])}
        r = rounds.get("kill -9")
        v = r["restored"] if r else float("nan")
        out.append(_t(f"{arch}, kill -9 + restart: returning conversations' cached tokens / oracle's", v,
                      f">= {RESTORE_GOAL}", bool(r) and v >= RESTORE_GOAL))
    return out


def _ratio(a: float | None, b: float | None) -> float:
    if a is None or b is None or np.isnan(a) or np.isnan(b):
        return float("nan")
    return a / b if b else (float("inf") if a else float("nan"))


def comparison(results: dict) -> dict:
    """kvtrie / vllm-mlx (and mlx-lm's figures beside them) per model, at the defaults row (1.2x min without it)."""
    out: dict = {}
    for arch, res in results["models"].items():
        label = "defaults" if "defaults" in res["cells"] else "1.2x min"
        row = res["cells"].get(label, {})
        if VLLM not in row:
            continue
        entry: dict = {"budget": label}
        for server in (*SERVERS, VLLM):
            c = row.get(server, {})
            if "hit_rate" not in c:
                entry[server] = {"cannot_serve": c.get("error", "no result"), "log_tail": c.get("log_tail")}
                continue
            entry[server] = {"hit_rate": c["hit_rate"], "vs_oracle": c["vs_oracle"],
                             "ttft_p50_ms": c.get("concurrent", {}).get("ttft_p50_ms"),
                             "latency_p50_ms": c["latency_p50_ms"], "latency_p95_ms": c["latency_p95_ms"],
                             "peak_rss": c.get("peak_rss"), "rss_at_start": c.get("rss_at_start"), "wall_s": c["wall_s"],
                             "replies_vs_mlx_lm": c.get("replies_vs_mlx_lm")}
        kv, vm = entry["kvtrie"], entry[VLLM]
        if "hit_rate" in kv and "hit_rate" in vm:
            entry["kvtrie_over_vllm_mlx"] = {k: _ratio(kv[k], vm[k]) for k in
                                             ("hit_rate", "ttft_p50_ms", "latency_p50_ms", "peak_rss", "wall_s")}
        out[arch] = entry
    return out


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None or (isinstance(v, float) and np.isnan(v)) else format(v, spec)


def print_tables(results: dict) -> None:
    m, a = results["machine"], results["args"]
    print(f"server on {m['device']}, mlx {m['mlx']}, BLAS: {m['blas']}; {m['cpus']} CPUs")
    print(f"{a['users']} users x {a['turns']} turns, max_tokens {a['max_tokens']}, sequential; "
          f"latency = whole non-streaming request; TTFT (first chunk with output) in the concurrent phase only")
    vm = results.get("vllm_mlx", {})
    if "skipped" in vm:
        print(f"vllm-mlx: skipped ({vm['skipped']})")
    else:
        print(f"vllm-mlx {vm['versions'].get('vllm-mlx', '?')} (its venv: mlx {vm['versions'].get('mlx', '?')}, mlx-lm "
              f"{vm['versions'].get('mlx-lm', '?')}): serve --continuous-batching (prefix cache on, memory-aware), "
              f"--cache-memory-mb = the budget in whole MiB, nothing at defaults (20% of available RAM); its hit% from "
              f"its log (usage has no cached_tokens), its oracle mlx-lm's where its requests were the same "
              f"(no logprobs: no ids), "
              f"held MiB = its own estimate")
    for arch, res in results["models"].items():
        need = res["needed_minimum"]
        blas = sorted({c.get("server_blas") for row in res["cells"].values() for c in row.values() if c.get("server_blas")})
        print(f"\n{arch}: KV {res['kv_bytes_per_token']} B/token, snapshot {res['snapshot_bytes']} B, system prompt "
              f"{res['system_prompt_tokens']} tokens; needed minimum {need['bytes'] / 2**20:.2f} MiB ({need['unique_tokens']} "
              f"unique tokens, {need['leaves']} ends, {need['branch_points']} branch points); servers' BLAS: {', '.join(blas) or '-'}")
        print(f"{'budget':<10} {'server':<16} {'MiB':>6} {'hit%':>5} {'oracle%':>7} {'xoracle':>7} {'held MiB':>8} "
              f"{'RSS MiB':>7} {'lat p50':>7} {'p95 ms':>7} {'wall s':>6} {'conc ttft p50':>13} {'p95 ms':>7} {'conc xor':>8}")
        rows = [("defaults", "kvtrie+disk", res["restart"])] + [
            (label, s, c) for label, row in res["cells"].items() for s, c in row.items()]
        for label, server, c in rows:
            b = c.get("budget_bytes")
            if "error" in c and "hit_rate" not in c:
                what = "cannot serve:" if server == VLLM else "ERROR"
                print(f"{label:<10} {server:<16} {what} {c['error'][:150]}")
                continue
            cc = c.get("concurrent", {})
            print(f"{label:<10} {server:<16} {_fmt(b and b / 2**20, '6.2f'):>6} {100 * c['hit_rate']:>5.1f} "
                  f"{100 * c['oracle_hit_rate']:>7.1f} {c['vs_oracle']:>7.3f} {_fmt(c.get('held_bytes', 0) / 2**20 if 'held_bytes' in c else None, '8.2f'):>8} "
                  f"{c.get('peak_rss', 0) / 2**20:>7.1f} {c['latency_p50_ms']:>7.1f} {c['latency_p95_ms']:>7.1f} {c['wall_s']:>6.1f} "
                  f"{_fmt(cc.get('ttft_p50_ms'), '13.1f'):>13} {_fmt(cc.get('ttft_p95_ms'), '7.1f'):>7} {_fmt(cc.get('vs_oracle'), '8.3f'):>8}")
            if "error" in c:
                print(f"{'':<10} {'':<16} ERROR {c['error'][:150]}")
        reuse = [f"{label} {c['recycled']['hits']}/{sum(c['recycled'].values())}" for label, server, c in rows if "recycled" in c]
        if reuse:
            print(f"  kvtrie's restores into recycled buffers (arrays reclaimed / all new live arrays past 256 KiB "
                  f"restores), sequential phase: {', '.join(reuse)}")
        agree = []
        for label, server, c in rows:
            rv = c.get("replies_vs_mlx_lm")
            if rv:
                stripped = f", {rv['equal_but_strip']}/{rv['of']} up to strip/special tokens" if rv["equal_but_strip"] != rv["equal"] else ""
                first = f" (first differs: user {rv['first_differs'][0]} turn {rv['first_differs'][1]})" if rv["first_differs"] else ""
                agree.append(f"{label} {server} {rv['equal']}/{rv['of']}{stripped}{first}")
        if agree:
            print(f"  greedy replies equal to mlx-lm's (sequential phase, same user and turn): {'; '.join(agree)}")
        rs = res["restart"]
        if "restarts" in rs:
            print(f"  restart on the same --disk-dir (SIGTERM exit {rs['sigterm_exit']}, stop {rs['sigterm_stop_s']:.1f} s, "
                  f"{rs['disk_files_after_sigterm']} files; before kill -9: {rs['disk_files_before_kill']} files)")
            print(f"  {'after':<8} {'to /health s':>12} {'first hit s':>11} {'(request #)':>11} {'1st cached/oracle':>17} {'restored':>8}")
            for r in rs["restarts"]:
                f = r["first_request"]
                print(f"  {r['how']:<8} {r['startup_s']:>12.2f} {_fmt(r['first_hit_s'], '11.2f'):>11} "
                      f"{_fmt(r['first_hit_request'], 'd'):>11} {f['cached']:>8}/{f['oracle']:<8} {r['restored']:>8.3f}")
        elif "error" in rs:
            print(f"  restart: ERROR {rs['error'][:300]}")
    print_comparison(results)
    print("\ntargets:")
    for t in results["targets"]:
        print(f"  {t['verdict']:<11} {t['target']}: {t['measured']:.3f} (goal {t['goal']})")


def print_comparison(results: dict) -> None:
    comp = results.get("vs_vllm_mlx") or {}
    if not comp:
        return
    print("\nkvtrie serve, mlx_lm.server and vllm-mlx side by side (one run; TTFT: concurrent phase; latency: sequential)")
    print(f"{'model':<11} {'budget':<9} {'server':<8} {'hit%':>5} {'ttft p50':>8} {'lat p50':>7} {'RSS MiB':>7} {'at start':>8} {'wall s':>6}  replies = mlx-lm's")
    for arch, e in comp.items():
        for server in (*SERVERS, VLLM):
            c = e[server]
            if "cannot_serve" in c:
                print(f"{arch:<11} {e['budget']:<9} {server:<8} cannot serve: {c['cannot_serve'][:200]}")
                continue
            rep = c.get("replies_vs_mlx_lm")
            print(f"{arch:<11} {e['budget']:<9} {server:<8} {100 * c['hit_rate']:>5.1f} {_fmt(c['ttft_p50_ms'], '8.1f'):>8} "
                  f"{c['latency_p50_ms']:>7.1f} {(c['peak_rss'] or 0) / 2**20:>7.1f} {(c['rss_at_start'] or 0) / 2**20:>8.1f} {c['wall_s']:>6.1f}  "
                  f"{'-' if not rep else str(rep['equal']) + '/' + str(rep['of'])}"
                  f"{'' if not rep or rep['equal_but_strip'] == rep['equal'] else ' (' + str(rep['equal_but_strip']) + ' up to strip)'}")
        r = e.get("kvtrie_over_vllm_mlx")
        if r:
            print(f"{arch:<11} {e['budget']:<9} {'kvtrie / vllm-mlx':<17} hit rate {_fmt(r['hit_rate'], '.2f')}x, TTFT p50 "
                  f"{_fmt(r['ttft_p50_ms'], '.2f')}x, latency p50 {_fmt(r['latency_p50_ms'], '.2f')}x, peak RSS "
                  f"{_fmt(r['peak_rss'], '.2f')}x, wall {_fmt(r['wall_s'], '.2f')}x")


def chart(results: dict, out: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    models = results["models"]
    fig, axes = plt.subplots(1, len(models) + 1, figsize=(6 * (len(models) + 1), 4.5))
    for ax, (arch, res) in zip(axes, models.items()):
        labels = list(res["cells"])
        x = np.arange(len(labels))
        servers = [s for s in (*SERVERS, VLLM) if any(s in row for row in res["cells"].values())]
        w = 0.8 / len(servers)
        for i, server in enumerate(servers):
            vals = [res["cells"][lab].get(server, {}).get("vs_oracle", 0.0) for lab in labels]
            ax.bar(x + i * w, vals, w, label=server)
        ax.axhline(GOALS[arch], color="red", lw=0.8, ls="--")
        ax.set_xticks(x + w * (len(servers) - 1) / 2, labels)
        ax.set_ylim(0, 1.1)
        ax.set_title(f"{arch}: hit rate / oracle's, by --prompt-cache-bytes")
        ax.legend(fontsize=8)
    ax = axes[-1]
    names = [(arch, lab, s) for arch, res in models.items() for lab in res["cells"] for s in res["cells"][lab]]
    rss = [models[a]["cells"][lab][s].get("peak_rss", 0) / 2**20 for a, lab, s in names]
    ax.barh(np.arange(len(names)), rss, color=[{"mlx-lm": "C0", "kvtrie": "C1"}.get(s, "C2") for *_, s in names])
    ax.set_yticks(np.arange(len(names)), [f"{a} {lab} {s}" for a, lab, s in names], fontsize=7)
    ax.set_xlabel("server peak RSS (VmHWM), MiB")
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    path = out / "server.png"
    fig.savefig(path, dpi=110)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="4 users x 3 turns, the 1.2x budget and the defaults only (every target, a few minutes)")
    p.add_argument("--users", type=int, default=None, help="conversations (default 12; 4 with --quick)")
    p.add_argument("--turns", type=int, default=None, help="turns each (default 4; 3 with --quick)")
    p.add_argument("--system-tokens", type=int, default=300, help="length of the shared system prompt")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--no-concurrent", dest="concurrent", action="store_false", help="skip the concurrent phase")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--results", default=str(RESULTS), help="where server.json and server.png go")
    p.add_argument("--logs", default=None, help="keep the servers' logs here (default: a temporary directory)")
    p.add_argument("--vllm-mlx", default=os.environ.get("VLLM_MLX_PYTHON"), metavar="PATH",
                   help="vllm-mlx as a third server: its venv, that venv's python or its `vllm-mlx` script "
                        "(default: $VLLM_MLX_PYTHON; without either its rows are skipped)")
    args = p.parse_args(argv)
    resolved = resolve_vllm_mlx(args.vllm_mlx)
    args.vllm_cmd, args.vllm_python = resolved if resolved else (None, None)
    args.vllm_note = None if resolved else (
        f"{args.vllm_mlx}: no vllm-mlx script or python there" if args.vllm_mlx
        else "no --vllm-mlx PATH nor VLLM_MLX_PYTHON given")
    if not resolved:
        print(f"note: vllm-mlx rows skipped: {args.vllm_note}", file=sys.stderr)
    args.users = args.users or (4 if args.quick else 12)
    args.turns = args.turns or (3 if args.quick else 4)
    t = time.perf_counter()
    results = run(args)
    results["wall_s"] = time.perf_counter() - t
    out = Path(args.results)
    png = chart(results, out)
    print_tables(results)
    path = save("server", results, out)
    print(f"\nsaved {path}" + (f" and {png}" if png else "") + f" ({results['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
