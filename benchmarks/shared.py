"""The shared tier (Redis) end to end: two servers behind a round robin, restore throughput, faults,
tenants and forgeries.

    python benchmarks/shared.py [--quick] [--users 8 --turns 5 ...]

1. Two servers, round robin. Tiny float32 llama and qwen3_next model directories
   (`tests/serving.py`); the chat workload of benchmarks/server.py (N users x T turns sharing a
   system prompt of a few hundred tokens, each reply appended, greedy, max_tokens 16, one
   request at a time). Request (user u, turn t) goes to server (u + t) % 2, so every turn of a
   conversation lands on the other server than the turn before. Four configurations, same
   workload: (a) two `kvtrie serve` processes with `--shared-url` on one real redis-server
   (maxmemory 512mb, allkeys-lru), (a') the same with `--shared-secret-file` (the same secret
   on both: values carry a keyed MAC, keys a secret-derived salt; Redis flushed between), (b)
   the two without a shared tier, (c) one server seeing all the traffic.
   `--shared-block-tokens` is 16 here (these prompts are a few hundred tokens; the default 256
   would leave whole conversations below one block). Hit rate = sum of usage cached_tokens /
   sum of prompt_tokens; reported: (a)/(c), (a')/(c) and (b)/(c), and the oracle's (exact
   prefix reuse over every earlier request, unlimited memory).
2. Restore throughput. A PrefixCache over 4 `kvtrie.models.KVCache(mx.bfloat16)` layers at
   Llama-3.1-8B's per-layer KV shape (8 KV heads x 128, bf16: 4 KiB per token per layer),
   live caches filled with random keys/values for `--restore-tokens` tokens, stored through a
   cache with a shared tier (block_tokens 256) and published (`close()` flushes the
   publisher), once without a secret (CRC-32 values) and once with `shared_secret` (MAC'd
   values under salted keys), both in the same Redis. Then, per repetition, a fresh PrefixCache
   of each kind (its Redis connection opened by a short request first; which goes first
   alternates) times `begin(tokens + [x])`: find the blocks, GET them, check (CRC-32 or
   HMAC-SHA-256) and decode them, insert them into the local trie, restore them into live
   caches (evaluated). Beside it, in the same run, on a warm redis-py client: one pipeline
   (transaction=False) of GETs of exactly the unauthenticated blocks' keys; the same plus
   `np.frombuffer` of every value; and the same plus a copy into MLX arrays. GB/s = value
   bytes / time, median of the repetitions; both restores are compared with the same plain
   pipelined GET. The restore's time inside `SharedTier.fetch` (Redis, checks, decode,
   concatenation) is timed apart from the rest of `begin` (trie insert, restore into the
   live caches).
   Then what a block costs on the wire against prefilling it: `--prefill-tokens` tokens through
   one layer of the `llama-3.1-8b` preset (float32 weights, this machine's CPU; MLX has no
   bf16 BLAS on CPU), scaled linearly to a 256-token block (the MLP and projections dominate
   at these lengths) and to 32 layers, against the same block's 32 layers fetched from Redis on
   loopback (the 4-layer times x 8).
3. Faults. The two shared servers of (a) (llama), a fresh workload: redis-server is killed
   (SIGKILL) after a third of the requests and restarted (empty, same port) after two
   thirds. Counted: failed HTTP requests, `shared_errors` from /kvtrie/stats, hit rate per
   phase.
4. Tenants and forgeries (llama). Three servers with `--api-keys` (tenants A and B, an admin)
   and the same `--shared-secret-file` on one fresh redis-server. Tenant A runs the chat
   workload on the first two (`--tenant-users` x `--tenant-turns`, round robin as in 1), each
   conversation with a system prompt of its own (so conversations share only the chat
   template's first tokens, below one block). Then tenant B sends exactly A's requests (the
   same messages, in A's order), and A sends them again with a `cache_salt`, each
   conversation to one of three places: the server that served A's same request (A's prompt
   in its memory), the other of the two (A's other turns in its memory, everything in Redis),
   or the third server, which A never used (Redis only); B and the salt take different
   conversations to each. Each namespace's own history is tracked: what it sent (prompt +
   completion ids, by `logprobs`) and what the server computes from it for the next turn (the
   conversation re-rendered up to the next message, as `kvtrie.next_turn` does); the oracle
   over that is what the namespace may restore, and cross-namespace restored tokens = the sum
   of max(0, cached_tokens - that oracle), which must be 0 everywhere.
   Forgeries: the servers stopped, every value under the Redis keys (SCAN) is saved and
   overwritten with a forgery of one kind, for each kind in turn: (i) the genuine value with
   one byte of its body flipped, (ii) the same body MAC'd with another secret
   (`kvtrie.shared.derive`/`mac`), (iii) the same body as an unauthenticated `KVT1` value
   (valid CRC-32). For each kind a fresh server (same model, keys and secret) replays the next
   turn of each of A's conversations; counted from its /kvtrie/stats (admin key):
   `shared_rejected`, `shared_restores`, `shared_tokens`; its replies (greedy ids) are compared
   with a cold server's (`--prompt-cache-bytes 0`, no shared tier) for the same requests. Last,
   the genuine values put back and one more fresh server replaying the same: the control that
   the forged keys are the ones a server would restore from.

Writes benchmarks/results/shared.json and shared.png.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import traceback
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from server import Client, build_workload, get_json, sums  # noqa: E402  (puts tests/ on sys.path too)

from common import RESULTS, machine, save, verdict  # noqa: E402
from redis_servers import RedisServer  # noqa: E402
from serving import (  # noqa: E402
    ServerProcess,
    cached_tokens,
    chat_tokens,
    completion_ids,
    free_port,
    load_tokenizer,
    make_model_dir,
    oracle_cached,
    prompt_tokens,
    reply_text,
)

MODELS = ("llama", "qwen3_next")
BLOCK_HTTP = 16  # --shared-block-tokens for the tiny chat prompts
BLOCK_RESTORE = 256  # block_tokens of the restore-throughput part
SHARE_GOAL = 0.95  # (a) and (a') hit rate / (c)'s
RESTORE_GOAL = 0.7  # restore GB/s / plain pipelined GET GB/s (with and without a secret)
SHARED_KEYS = ("shared_restores", "shared_tokens", "shared_published", "shared_dropped", "shared_errors",
               "shared_rejected")
CONFIGS = {"a": "2 servers + shared", "a'": "2 servers + shared + secret", "b": "2 servers, no shared",
           "c": "1 server"}
SECRET = b"the fleet's shared secret, benchmarks/shared.py"
OTHER_SECRET = b"somebody else's secret"
KEY_A, KEY_B, KEY_ADMIN = "bench-key-a-0123456789abcdef", "bench-key-b-0123456789abcdef", "bench-key-admin-0123456789ab"
API_KEYS = f"{KEY_A} alice\n{KEY_B} bob\n{KEY_ADMIN} ops admin\n"
TIERS = {"same": "the server that served A's request (memory)",
         "other": "the other server (memory of A's other turns, Redis)",
         "fresh": "a fresh third server (Redis only)"}
FORGERIES = {"flipped": "one body byte flipped", "other_secret": "MAC'd with another secret",
             "unsigned": "KVT1 (no MAC, valid CRC-32)"}


# ----------------------------------------------------------------------------------------
# Part 1 and 3: servers
# ----------------------------------------------------------------------------------------


def serve_cmd(model_dir: Path, port: int, args, shared_url: str | None, extra: tuple[str, ...] = (),
              cache_bytes: int | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "kvtrie.serve", "--model", str(model_dir), "--host", "127.0.0.1", "--port", str(port),
           "--prompt-cache-bytes", str(args.cache_bytes if cache_bytes is None else cache_bytes)]
    if shared_url is not None:
        cmd += ["--shared-url", shared_url, "--shared-block-tokens", str(BLOCK_HTTP)]
    return cmd + list(extra)


def get_stats(url: str, key: str | None = None) -> dict:
    """/kvtrie/stats, with an API key where the server has `--api-keys` (an admin's sees every model)."""
    if key is None:
        return get_json(url + "/kvtrie/stats")
    req = urllib.request.Request(url + "/kvtrie/stats", headers={"x-api-key": key})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def shared_stats(url: str, key: str | None = None) -> dict:
    """The shared-tier counters of /kvtrie/stats, summed over the server's models."""
    models = get_stats(url, key).get("models", {})
    return {k: sum(int(m.get(k, 0)) for m in models.values()) for k in SHARED_KEYS}


def add_stats(a: dict, b: dict) -> dict:
    return {k: a.get(k, 0) + b.get(k, 0) for k in SHARED_KEYS}


def start_servers(model_dir: Path, n: int, args, shared_url: str | None, logs: Path, label: str,
                  extra: tuple[str, ...] = (), cache_bytes: int | None = None) -> list[ServerProcess]:
    procs: list[ServerProcess] = []
    try:
        for i in range(n):
            port = free_port()
            procs.append(ServerProcess(serve_cmd(model_dir, port, args, shared_url, extra, cache_bytes), port,
                                       timeout=120, log_path=logs / f"{label}-{i}.log").start())
    except BaseException:
        for p in procs:
            p.stop()
        raise
    return procs


def round_robin(client: Client, urls: list[str], users: int, turns: int, bar, hook=None) -> list[dict]:
    """Turn by turn, user by user; (u, t) goes to urls[(u + t) % len(urls)]. A failed request is
    recorded (`failed`) and the conversation goes on without it."""
    records = []
    i = 0
    for t in range(turns):
        for u in range(users):
            if hook is not None:
                hook(i)
            client.url = urls[(u + t) % len(urls)]
            try:
                rec = client.ask(u, t)
            except Exception as e:  # noqa: BLE001 (a failed request is a result)
                rec = {"user": u, "turn": t, "failed": f"{type(e).__name__}: {e}"[:300]}
            rec["index"] = i
            rec["server"] = (u + t) % len(urls)
            records.append(rec)
            bar.update()
            i += 1
    return records


def run_config(model_dir: Path, work, args, servers: int, shared_url: str | None, logs: Path, label: str, bar,
               extra: tuple[str, ...] = ()) -> dict:
    cell: dict = {"servers": servers, "shared": shared_url is not None, "secret": "--shared-secret-file" in extra}
    procs: list[ServerProcess] = []
    try:
        procs = start_servers(model_dir, servers, args, shared_url, logs, label, extra)
        client = Client(procs[0].url, model_dir, work, args.max_tokens)
        t = time.perf_counter()
        records = round_robin(client, [p.url for p in procs], len(work.messages), args.turns, bar)
        cell["wall_s"] = time.perf_counter() - t
        ok = [r for r in records if "failed" not in r]
        cell.update(sums(ok))
        cell["failed"] = len(records) - len(ok)
        cell["latency_p50_ms"] = 1e3 * float(np.median([r["latency_s"] for r in ok])) if ok else float("nan")
        cell["records"] = records
        stats = {k: 0 for k in SHARED_KEYS}
        for p in procs:
            stats = add_stats(stats, shared_stats(p.url))
        cell["stats"] = stats
    except Exception as e:  # noqa: BLE001 (recorded; the other configurations go on)
        cell["error"] = f"{type(e).__name__}: {e}"[:2000]
        cell["log_tail"] = procs[-1].log_tail(20) if procs else ""
    finally:
        for p in procs:
            p.stop()
    return cell


def secret_file(tmp: Path) -> Path:
    path = tmp / "shared-secret"
    if not path.exists():
        path.write_bytes(SECRET + b"\n")
        path.chmod(0o600)
    return path


def part_servers(args, tmp: Path, logs: Path, bar) -> dict:
    out: dict = {}
    secret = ("--shared-secret-file", str(secret_file(tmp)))
    for arch in args.models:
        model_dir = make_model_dir(tmp / arch, arch, seed=args.seed)
        work = build_workload(model_dir, args.users, args.turns, args.system_tokens, args.seed)
        res = out[arch] = {"system_prompt_tokens": len(load_tokenizer(model_dir).encode(work.system)), "configs": {}}
        with RedisServer(maxmemory="512mb") as redis_server:
            for key, name in CONFIGS.items():
                bar.set_postfix_str(f"{arch}: ({key}) {name}")
                shared = key in ("a", "a'")
                if shared:
                    redis_server.flushall()
                res["configs"][key] = run_config(model_dir, work, args, 1 if key == "c" else 2,
                                                 redis_server.url if shared else None, logs, f"{arch}-{key}".replace("'", "-secret"), bar,
                                                 secret if key == "a'" else ())
                if shared:
                    res[f"redis_used_memory_{key}"] = int(redis_server.client().info("memory").get("used_memory", 0))
        c = res["configs"]["c"].get("hit_rate")
        for key in ("a", "a'", "b"):
            h = res["configs"][key].get("hit_rate")
            res[f"{key}_over_c"] = h / c if h is not None and c else float("nan")
    return out


def part_faults(args, tmp: Path, logs: Path, bar) -> dict:
    arch = "llama"
    model_dir = tmp / arch if (tmp / arch).exists() else make_model_dir(tmp / arch, arch, seed=args.seed)
    work = build_workload(model_dir, args.fault_users, args.fault_turns, args.system_tokens, args.seed + 1)
    total = args.fault_users * args.fault_turns
    kill_at, restart_at = total // 3, 2 * total // 3
    cell: dict = {"arch": arch, "users": args.fault_users, "turns": args.fault_turns, "kill_at": kill_at,
                  "restart_at": restart_at}
    procs: list[ServerProcess] = []
    with RedisServer(maxmemory="512mb") as redis_server:
        try:
            procs = start_servers(model_dir, 2, args, redis_server.url, logs, f"{arch}-faults")
            client = Client(procs[0].url, model_dir, work, args.max_tokens)

            def hook(i: int) -> None:
                if i == kill_at:
                    redis_server.kill()
                    cell["killed_at_s"] = time.monotonic()
                elif i == restart_at:
                    redis_server.start()
                    cell["restarted_at_s"] = time.monotonic()

            bar.set_postfix_str(f"faults: {arch}, redis killed at request {kill_at}, restarted at {restart_at}")
            records = round_robin(client, [p.url for p in procs], args.fault_users, args.fault_turns, bar, hook)
            cell["records"] = records
            cell["failed"] = sum("failed" in r for r in records)
            cell["failures"] = [r["failed"] for r in records if "failed" in r][:5]
            stats = {k: 0 for k in SHARED_KEYS}
            for p in procs:
                stats = add_stats(stats, shared_stats(p.url))
            cell["stats"] = stats
            phases = {"before kill": (0, kill_at), "redis down": (kill_at, restart_at), "after restart": (restart_at, total)}
            cell["phases"] = {}
            for name, (lo, hi) in phases.items():
                recs = [r for r in records if lo <= r["index"] < hi and "failed" not in r]
                s = sums(recs)
                cell["phases"][name] = {"requests": hi - lo, "ok": len(recs), "hit_rate": s["hit_rate"],
                                        "oracle_hit_rate": s["oracle_hit_rate"]}
            # a second server log line per fault is expected; count the warnings
            cell["log_warnings"] = sum(p.log_text().count("shared tier") for p in procs)
        except Exception as e:  # noqa: BLE001
            cell["error"] = f"{type(e).__name__}: {e}"[:2000]
            cell["log_tail"] = procs[-1].log_tail(20) if procs else ""
        finally:
            for p in procs:
                p.stop()
    return cell


# ----------------------------------------------------------------------------------------
# Part 4: tenants and forgeries
# ----------------------------------------------------------------------------------------


def post_chat(url: str, key: str, messages: list[dict], max_tokens: int, **extra) -> dict:
    """A greedy /v1/chat/completions request with an API key (`logprobs` for the generated ids)."""
    body = {"model": "default_model", "messages": messages, "max_tokens": max_tokens, "temperature": 0.0,
            "stream": False, "logprobs": True, **extra}
    req = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(req, timeout=300) as r:
        return json.loads(r.read())


def next_turn_prefix(model_dir: Path, messages: list[dict], reply: str) -> list[int]:
    """What every next request of a conversation starts with after `reply`: the common prefix of two
    renderings with different next messages (what `kvtrie.next_turn` prefills in the background)."""
    history = messages + [{"role": "assistant", "content": reply}]
    a = chat_tokens(model_dir, history + [{"role": "user", "content": "A"}])
    z = chat_tokens(model_dir, history + [{"role": "user", "content": "Z"}])
    n = 0
    while n < min(len(a), len(z)) and a[n] == z[n]:
        n += 1
    return a[:n]


@dataclass
class Namespace:
    """One cache namespace (a tenant's key, with or without a `cache_salt`) and what its own requests
    could have stored: prompt + completion ids, and the next turn's rendering. The oracle over that
    is what the namespace may restore; anything cached beyond it came from elsewhere."""

    name: str
    key: str
    model_dir: Path
    max_tokens: int
    salt: str | None = None
    stored: list[list[int]] = field(default_factory=list)

    def ask(self, url: str, messages: list[dict]) -> tuple[dict, str]:
        """One request; (its record, the reply text)."""
        prompt = chat_tokens(self.model_dir, messages)
        own = oracle_cached(self.stored, prompt)
        extra = {"cache_salt": self.salt} if self.salt is not None else {}
        t = time.perf_counter()
        resp = post_chat(url, self.key, messages, self.max_tokens, **extra)
        latency = time.perf_counter() - t
        ids = completion_ids(resp)
        if prompt_tokens(resp) != len(prompt):
            raise RuntimeError(f"server counted {prompt_tokens(resp)} prompt tokens, the client {len(prompt)}")
        reply = reply_text(resp)
        self.stored.append(prompt + ids)
        self.stored.append(next_turn_prefix(self.model_dir, messages, reply))
        cached = cached_tokens(resp)
        return {"namespace": self.name, "prompt": len(prompt), "cached": cached, "oracle": own,
                "beyond_own": max(0, cached - own), "ids": ids, "latency_s": latency}, reply


def wait_idle(urls: list[str], key: str, limit: float = 60.0) -> None:
    """Until no next-turn job is pending and nothing more is published (two polls apart)."""
    last = None
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        stats = [get_stats(u, key) for u in urls]
        now = (sum(int(s.get("next_turn_pending", 0)) for s in stats),
               sum(int(m.get("shared_published", 0)) for s in stats for m in s.get("models", {}).values()))
        if now[0] == 0 and now == last:
            return
        last = now
        time.sleep(0.5)


def forge(value: bytes, kind: str) -> bytes:
    """A forgery of a genuine KVT2 value: its body with a byte flipped (MAC kept), MAC'd with another
    secret, or as an unauthenticated KVT1 value (a valid CRC-32)."""
    import struct
    import zlib

    from kvtrie.shared import MAC_SIZE, MAGIC, MAGIC_MAC, derive, mac

    head = 4 + MAC_SIZE
    body = value[head:]
    if kind == "flipped":
        i = head + len(body) // 2  # in the tensors' bytes
        return value[:i] + bytes([value[i] ^ 0x01]) + value[i + 1 :]
    if kind == "other_secret":
        return MAGIC_MAC + mac(derive(OTHER_SECRET)[0], body) + body
    if kind == "unsigned":
        return MAGIC + struct.pack(">I", zlib.crc32(body)) + body
    raise ValueError(kind)


def summarize(records: list[dict]) -> dict:
    out = sums(records)
    out["beyond_own"] = sum(r["beyond_own"] for r in records)
    out["first_turn_cached"] = sum(r["cached"] for r in records if r.get("turn") == 0)
    return out


def part_tenants(args, tmp: Path, logs: Path, bar) -> dict:
    arch = "llama"
    model_dir = tmp / arch if (tmp / arch).exists() else make_model_dir(tmp / arch, arch, seed=args.seed)
    users, turns = args.tenant_users, args.tenant_turns
    work = build_workload(model_dir, users, turns, args.system_tokens, args.seed + 2)
    systems = [f"Conversation {u}. {work.system}" for u in range(users)]  # nothing shared past the template's start
    keys = tmp / "api-keys"
    keys.write_text(API_KEYS)
    keys.chmod(0o600)
    flags = ("--api-keys", str(keys), "--shared-secret-file", str(secret_file(tmp)))
    cell: dict = {"arch": arch, "users": users, "turns": turns}
    with RedisServer(maxmemory="512mb") as redis_server:
        procs: list[ServerProcess] = []
        try:
            procs = start_servers(model_dir, 3, args, redis_server.url, logs, "tenants", flags)
            urls = [p.url for p in procs]  # A uses the first two; the third only ever sees B and the salt
            a = Namespace("A", KEY_A, model_dir, args.max_tokens)
            history = [[{"role": "system", "content": systems[u]}] for u in range(users)]
            sent: dict[tuple[int, int], list[dict]] = {}
            records: dict[str, list[dict]] = {"A": [], "B": [], "A+salt": []}
            bar.set_postfix_str(f"tenants: A, {users} users x {turns} turns")
            for t in range(turns):
                for u in range(users):
                    msgs = history[u] + [{"role": "user", "content": work.messages[u][t]}]
                    rec, reply = a.ask(urls[(u + t) % 2], msgs)
                    rec.update(user=u, turn=t, server=(u + t) % 2)
                    records["A"].append(rec)
                    sent[(u, t)] = msgs
                    history[u] = msgs + [{"role": "assistant", "content": reply}]
                    bar.update()
            wait_idle(urls, KEY_ADMIN)  # A's next turns computed and published: all there is to take
            others = {"B": Namespace("B", KEY_B, model_dir, args.max_tokens),
                      "A+salt": Namespace("A+salt", KEY_A, model_dir, args.max_tokens, salt="bench-salt")}
            for i, (name, ns) in enumerate(others.items()):
                bar.set_postfix_str(f"tenants: {name} sends A's requests")
                for t in range(turns):
                    for u in range(users):
                        tier = list(TIERS)[(u + i) % len(TIERS)]  # B and the salt: other conversations per tier
                        server = {"same": (u + t) % 2, "other": (u + t + 1) % 2, "fresh": 2}[tier]
                        rec, _ = ns.ask(urls[server], sent[(u, t)])
                        rec.update(user=u, turn=t, server=server, tier=tier)
                        records[name].append(rec)
                        bar.update()
            wait_idle(urls, KEY_ADMIN)
            stats = {k: 0 for k in SHARED_KEYS}
            figures: dict = {}
            for url in urls:
                full = get_stats(url, KEY_ADMIN)
                stats = add_stats(stats, {k: sum(int(m.get(k, 0)) for m in full.get("models", {}).values())
                                          for k in SHARED_KEYS})
                for tenant, f in full.get("tenants", {}).items():
                    entry = figures.setdefault(tenant, {"requests": 0, "prompt_tokens": 0, "cached_tokens": 0})
                    for k in entry:
                        entry[k] += int(f.get(k, 0))
            own_view = get_stats(urls[0], KEY_B)  # a tenant's own key: its figures only
            cell["tenant_view_keys"] = sorted(own_view)
            cell["tenant_view_shows_others"] = "tenants" in own_view or "models" in own_view
            cell["stats"] = stats
            cell["tenant_figures"] = figures
            cell["records"] = records
            cell["A"] = summarize(records["A"])
            cell["cross"] = {name: {tier: summarize([r for r in records[name] if r["tier"] == tier])
                                    for tier in TIERS} for name in others}
        except Exception as e:  # noqa: BLE001
            cell["error"] = f"{type(e).__name__}: {e}"[:2000]
            cell["traceback"] = traceback.format_exc()
            cell["log_tail"] = procs[-1].log_tail(20) if procs else ""
        finally:
            for p in procs:
                p.stop()
        if "error" not in cell:
            next_msgs = [history[u] + [{"role": "user", "content": work.messages[u][turns]}] for u in range(users)]
            try:
                cell["forgeries"] = forgeries(args, model_dir, redis_server, flags, keys, next_msgs, logs, bar)
            except Exception as e:  # noqa: BLE001
                cell["forgeries"] = {"error": f"{type(e).__name__}: {e}"[:2000], "traceback": traceback.format_exc()}
    return cell


def forgeries(args, model_dir: Path, redis_server, flags: tuple[str, ...], keys: Path, next_msgs: list[list[dict]],
              logs: Path, bar) -> dict:
    """Every value the servers published overwritten with forgeries of one kind, then a fresh server
    replays the conversations' next turns; the same with the genuine values back (the control); and
    a cold server (no cache at all) for the replies to compare with."""
    from kvtrie.shared import MAGIC_MAC

    client = redis_server.client()
    strings: dict[bytes, bytes] = {}
    sets: dict[bytes, set] = {}
    for key in client.scan_iter(match="*", count=1000):
        kind = client.type(key)
        if kind == b"string":
            strings[key] = client.get(key)
        elif kind == b"set":
            sets[key] = client.smembers(key)
    out: dict = {"values": len(strings), "value_bytes": sum(len(v) for v in strings.values()), "sets": len(sets),
                 "key_prefixes": {}}
    for key in strings:
        prefix = key.decode().rsplit(":", 1)[0]
        out["key_prefixes"][prefix] = out["key_prefixes"].get(prefix, 0) + 1
    if not strings:
        raise RuntimeError("nothing was published to Redis")
    unsigned = sum(1 for v in strings.values() if v[:4] != MAGIC_MAC)
    if unsigned:
        raise RuntimeError(f"{unsigned} of {len(strings)} values are not KVT2 (the servers have a secret)")

    def reset(values: dict[bytes, bytes]) -> None:
        client.flushall()
        pipe = client.pipeline(transaction=False)
        for k, v in values.items():
            pipe.set(k, v)
        for k, members in sets.items():
            pipe.sadd(k, *members)
        pipe.execute()

    def replay(label: str, shared: bool) -> dict:
        extra = flags if shared else flags[:2]  # the cold server: the keys only (a secret needs a shared tier)
        run: dict = {"shared": shared}
        procs = start_servers(model_dir, 1, args, redis_server.url if shared else None, logs, f"forgeries-{label}",
                              extra, None if shared else 0)
        try:
            ns = Namespace("A", KEY_A, model_dir, args.max_tokens)
            recs = []
            for u, msgs in enumerate(next_msgs):
                rec, _ = ns.ask(procs[0].url, msgs)
                rec["user"] = u
                recs.append(rec)
                bar.update()
            run["records"] = recs
            run.update(summarize(recs))
            run["stats"] = shared_stats(procs[0].url, KEY_ADMIN)
        finally:
            procs[0].stop()
        return run

    bar.set_postfix_str("forgeries: a cold server")
    out["cold"] = replay("cold", False)
    cold_ids = [r["ids"] for r in out["cold"]["records"]]
    out["runs"] = {}
    for kind in [*FORGERIES, "genuine"]:
        bar.set_postfix_str(f"forgeries: {kind}")
        reset(strings if kind == "genuine" else {k: forge(v, kind) for k, v in strings.items()})
        run = out["runs"][kind] = replay(kind, True)
        run["ids_equal_cold"] = sum(r["ids"] == c for r, c in zip(run["records"], cold_ids))
        run["requests"] = len(run["records"])
    client.close()
    return out


# ----------------------------------------------------------------------------------------
# Part 2: restore throughput
# ----------------------------------------------------------------------------------------


def part_restore(args, bar) -> dict:
    import mlx.core as mx
    import redis

    from kvtrie import PrefixCache
    from kvtrie.models import KVCache
    from kvtrie.models.presets import PRESETS, build_preset

    cfg = PRESETS["llama-3.1-8b"].config
    heads, dim, real_layers = cfg["num_key_value_heads"], cfg["head_dim"], PRESETS["llama-3.1-8b"].real_layers
    layers, n = args.restore_layers, args.restore_tokens
    n -= n % BLOCK_RESTORE
    blocks = n // BLOCK_RESTORE

    def make_cache() -> list:
        return [KVCache(mx.bfloat16) for _ in range(layers)]

    rng = np.random.default_rng(args.seed)
    tokens = [int(x) for x in rng.integers(0, 50_000, n)]
    out: dict = {"layers": layers, "kv_heads": heads, "head_dim": dim, "tokens": n, "blocks": blocks,
                 "block_tokens": BLOCK_RESTORE, "kv_bytes": n * layers * 2 * heads * dim * 2, "reps": args.reps}
    fp = "bench-shared-llama-3.1-8b-shape"
    mx.set_cache_limit(max(mx.get_cache_memory(), 1 << 30))  # as `kvtrie serve` does: restores reuse freed buffers
    with RedisServer(maxmemory="512mb") as redis_server:
        url = redis_server.url
        client = redis.Redis.from_url(url)
        variants = {"restore": None, "restore_secret": SECRET}  # the same KV, published twice
        keys: dict[str, list[str]] = {}
        out["published"], out["publish_wait_s"], out["value_bytes"] = {}, {}, {}
        for name, secret in variants.items():
            bar.set_postfix_str(f"restore: storing {n} tokens x {layers} layers ({'with' if secret else 'no'} secret)")
            writer = PrefixCache(make_cache, fingerprint=fp, shared_url=url, shared_block_tokens=BLOCK_RESTORE,
                                 shared_secret=secret)
            mx.random.seed(args.seed)
            with writer.begin(tokens) as s:
                for c in s.caches:
                    k = mx.random.normal((1, heads, n, dim)).astype(mx.bfloat16)
                    v = mx.random.normal((1, heads, n, dim)).astype(mx.bfloat16)
                    c.update_and_fetch(k, v)
                mx.eval([c.state for c in s.caches])
                s.commit(tokens)
            chain = writer._shared.chain("default", np.asarray(tokens, dtype=np.int32), blocks)
            keys[name] = [writer._shared.block_key(h) for h in chain[1:]]
            t = time.perf_counter()
            writer._shared.flush()  # what close() does first: wait for the publisher
            out["publish_wait_s"][name] = time.perf_counter() - t
            out["published"][name] = writer.stats().get("shared_published")
            writer.close()
            sizes = [client.strlen(k) for k in keys[name]]
            if not all(sizes):
                raise RuntimeError(f"{sum(1 for s in sizes if not s)} of {blocks} blocks are not in Redis ({name})")
            out["value_bytes"][name] = sum(sizes)
        if set(keys["restore"]) & set(keys["restore_secret"]):
            raise RuntimeError("the secret's keys are the unauthenticated keys")
        total = out["value_bytes"]["restore"]
        plain_keys = keys["restore"]

        def get_all() -> list:
            pipe = client.pipeline(transaction=False)
            for k in plain_keys:
                pipe.get(k)
            return pipe.execute()

        def get_frombuffer() -> list:
            return [np.frombuffer(v, dtype=np.uint8) for v in get_all()]

        def get_to_mlx() -> list:
            arrays = [mx.array(np.frombuffer(v, dtype=np.uint8)) for v in get_all()]
            mx.eval(arrays)
            return arrays

        times: dict[str, list[float]] = {name: [] for name in variants}
        times.update({"get": [], "get+frombuffer": [], "get+mx.array": []})
        fetch_s: dict[str, list[float]] = {name: [] for name in variants}
        cached: dict[str, list[int]] = {name: [] for name in variants}
        x = 7

        def restore(name: str) -> None:
            reader = PrefixCache(make_cache, fingerprint=fp, shared_url=url, shared_block_tokens=BLOCK_RESTORE,
                                 shared_secret=variants[name],
                                 shared_timeout=5.0)  # (throughput, not the timeout: a busy machine stalls reads)
            with reader.begin([1] * 20):  # opens the reader's Redis connection (no block that short)
                pass
            tier = reader._shared
            inner = tier.fetch

            def timed_fetch(*a, _inner=inner, **kw):
                t0 = time.perf_counter()
                try:
                    return _inner(*a, **kw)
                finally:
                    fetch_s[name].append(time.perf_counter() - t0)

            tier.fetch = timed_fetch
            t = time.perf_counter()
            with reader.begin(tokens + [x]) as s:
                dt = time.perf_counter() - t
                cached[name].append(s.cached)
            st = reader.stats()
            if st.get("shared_errors") or st.get("shared_rejected"):
                raise RuntimeError(f"restore ({name}): shared_errors {st['shared_errors']}, "
                                   f"shared_rejected {st.get('shared_rejected')}")
            reader.close()
            times[name].append(dt)

        for rep in range(args.reps):
            bar.set_postfix_str(f"restore: repetition {rep + 1}/{args.reps}")
            for name in (list(variants) if rep % 2 == 0 else list(variants)[::-1]):  # which goes first alternates
                restore(name)
            for name, fn in (("get", get_all), ("get+frombuffer", get_frombuffer), ("get+mx.array", get_to_mlx)):
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
            bar.update()
        out["cached"] = cached
        if any(c != n for v in cached.values() for c in v):
            raise RuntimeError(f"restore: begin restored {cached}, not {n}")
        out["times_s"] = times
        out["median_s"] = {k: statistics.median(v) for k, v in times.items()}
        out["fetch_s"] = fetch_s
        out["median_fetch_s"] = {k: statistics.median(v) for k, v in fetch_s.items()}
        nbytes = {k: out["value_bytes"].get(k, total) for k in times}  # the GETs: the unauthenticated values
        out["gb_s"] = {k: nbytes[k] / v / 1e9 for k, v in out["median_s"].items()}
        out["ratio"] = out["gb_s"]["restore"] / out["gb_s"]["get"]
        out["ratio_secret"] = out["gb_s"]["restore_secret"] / out["gb_s"]["get"]
        client.close()

    # prefill of one block at these widths, one layer of the preset, scaled to the real depth
    bar.set_postfix_str(f"restore: prefill of {args.prefill_tokens} tokens, llama-3.1-8b preset, 1 layer")
    model, make = build_preset("llama-3.1-8b", layers=1, seed=args.seed)
    ids = mx.array(np.asarray(tokens[: args.prefill_tokens]) % cfg["vocab_size"], dtype=mx.int32)[None]
    mx.eval(model(ids[:, :4], cache=make()))  # warm-up
    pre = []
    for _ in range(args.prefill_reps):
        caches = make()
        t = time.perf_counter()
        mx.eval(model(ids, cache=caches))
        pre.append(time.perf_counter() - t)
    del model
    per_block_layers = out["median_s"]["restore"] / blocks  # one block, `layers` layers
    scale = BLOCK_RESTORE / args.prefill_tokens
    out["prefill"] = {
        "tokens": BLOCK_RESTORE,
        "measured_tokens": args.prefill_tokens,
        "measured_one_layer_s": min(pre),
        "one_layer_s": min(pre) * scale,
        "real_layers": real_layers,
        "block_real_s": min(pre) * scale * real_layers,
        "wire_restore_block_real_s": per_block_layers * real_layers / layers,
        "wire_restore_secret_block_real_s": out["median_s"]["restore_secret"] / blocks * real_layers / layers,
        "wire_get_block_real_s": out["median_s"]["get"] / blocks * real_layers / layers,
        "block_real_bytes": BLOCK_RESTORE * real_layers * 2 * heads * dim * 2,
    }
    p = out["prefill"]
    p["prefill_over_restore"] = p["block_real_s"] / p["wire_restore_block_real_s"]
    return out


def profile_restore(args) -> str:
    """cProfile of one restore (the same setup as part 2, fewer tokens): where the time goes."""
    import cProfile
    import io
    import pstats

    import mlx.core as mx

    from kvtrie import PrefixCache
    from kvtrie.models import KVCache

    n = args.restore_tokens - args.restore_tokens % BLOCK_RESTORE
    layers = args.restore_layers

    def make_cache() -> list:
        return [KVCache(mx.bfloat16) for _ in range(layers)]

    tokens = list(range(1000, 1000 + n))
    with RedisServer(maxmemory="512mb") as r:
        w = PrefixCache(make_cache, fingerprint="prof", shared_url=r.url, shared_block_tokens=BLOCK_RESTORE)
        with w.begin(tokens) as s:
            for c in s.caches:
                c.update_and_fetch(*(mx.random.normal((1, 8, n, 128)).astype(mx.bfloat16) for _ in range(2)))
            s.commit(tokens)
        w.close()
        reader = PrefixCache(make_cache, fingerprint="prof", shared_url=r.url, shared_block_tokens=BLOCK_RESTORE)
        with reader.begin([1] * 20):
            pass
        prof = cProfile.Profile()
        prof.enable()
        with reader.begin(tokens + [7]) as s:
            assert s.cached == n
        prof.disable()
        reader.close()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(28)
    return buf.getvalue()


# ----------------------------------------------------------------------------------------
# Targets, tables, chart
# ----------------------------------------------------------------------------------------


def _t(name: str, value: float, goal: str, ok: bool) -> dict:
    return {"target": name, "measured": value, "goal": goal, "verdict": verdict(ok)}


def targets(results: dict) -> list[dict]:
    out = []
    for arch, res in results.get("servers", {}).items():
        for key in ("a", "a'"):
            v = res.get(f"{key}_over_c", float("nan"))
            what = "shared tier" if key == "a" else "shared tier with a secret"
            out.append(_t(f"{arch}: hit rate, ({key}) 2 servers round robin + {what} / (c) 1 server "
                          f"(without the shared tier: {res.get('b_over_c', float('nan')):.3f})", v, f">= {SHARE_GOAL}",
                          v >= SHARE_GOAL))
    r = results.get("restore", {})
    if "ratio" in r:
        for key, label in (("restore", "no secret"), ("restore_secret", "with a secret (MAC)")):
            v = r["ratio"] if key == "restore" else r["ratio_secret"]
            out.append(_t(f"restore from Redis, {label} ({r['layers']} layers x {r['tokens']} tokens, bf16 8x128) "
                          f"GB/s / plain pipelined GET's ({r['gb_s'][key]:.2f} vs {r['gb_s']['get']:.2f})",
                          v, f">= {RESTORE_GOAL}", v >= RESTORE_GOAL))
    f = results.get("faults", {})
    if "failed" in f:
        out.append(_t(f"redis-server killed and restarted mid-workload: failed HTTP requests "
                      f"(shared_errors {f['stats']['shared_errors']})", f["failed"], "0", f["failed"] == 0))
    t = results.get("tenants", {})
    for name, label in (("B", "tenant B (A's prompts)"), ("A+salt", "A with a cache_salt")):
        for tier, where in TIERS.items():
            c = t.get("cross", {}).get(name, {}).get(tier)
            if c is None:
                continue
            out.append(_t(f"cross-namespace restored tokens, {label}, {where}: cached beyond its own history "
                          f"({c['requests']} requests, {c['prompt_tokens']} prompt tokens, cached {c['cached_tokens']}, "
                          f"its own oracle {c['oracle_cached']})", c["beyond_own"], "0", c["beyond_own"] == 0))
    g = t.get("forgeries", {})
    runs = {k: v for k, v in g.get("runs", {}).items() if k in FORGERIES}
    if runs and all("stats" in v for v in runs.values()):
        restored = sum(v["stats"]["shared_restores"] + v["stats"]["shared_tokens"] + v["beyond_own"] for v in runs.values())
        genuine = g["runs"].get("genuine", {}).get("stats", {})
        out.append(_t(f"forged or foreign-secret values restored ({', '.join(runs)}; {g['values']} values each): "
                      f"shared_restores + shared_tokens + cached beyond own "
                      f"(the genuine values: {genuine.get('shared_restores', '-')} restores, "
                      f"{genuine.get('shared_tokens', '-')} tokens)", restored, "0", restored == 0))
        rejected = min(v["stats"]["shared_rejected"] for v in runs.values())
        each = ", ".join(f"{k} {v['stats']['shared_rejected']}" for k, v in runs.items())
        out.append(_t(f"forged values rejected: shared_rejected, the least of the three servers ({each})",
                      rejected, "> 0 each", rejected > 0))
        differ = sum(v["requests"] - v["ids_equal_cold"] for v in runs.values())
        out.append(_t(f"replies after forgeries that differ from a cold server's (greedy ids, "
                      f"{sum(v['requests'] for v in runs.values())} requests)", differ, "0", differ == 0))
    return out


def _f(v, spec: str) -> str:
    return "-" if v is None or (isinstance(v, float) and np.isnan(v)) else format(v, spec)


def print_tables(results: dict) -> None:
    m, a = results["machine"], results["args"]
    print(f"shared tier on {m['device']}, mlx {m['mlx']}, BLAS: {m['blas']}; {m['cpus']} CPUs; redis-server on loopback")
    if results.get("servers"):
        print(f"\n1. two servers, round robin ((u + t) % 2): {a['users']} users x {a['turns']} turns, max_tokens "
              f"{a['max_tokens']}, sequential; --shared-block-tokens {BLOCK_HTTP}, --prompt-cache-bytes {a['cache_bytes']}")
        print(f"{'model':<11} {'config':<32} {'hit%':>5} {'oracle%':>7} {'x(c)':>6} {'restores':>8} {'shared tok':>10} "
              f"{'published':>9} {'errors':>6} {'rejected':>8} {'failed':>6} {'lat p50':>7} {'wall s':>6}")
        for arch, res in results["servers"].items():
            c_hit = res["configs"]["c"].get("hit_rate")
            for key, cell in res["configs"].items():
                label = f"({key}) {CONFIGS[key]}"
                if "hit_rate" not in cell:
                    print(f"{arch:<11} {label:<32} ERROR {cell.get('error', '')[:150]}")
                    continue
                s = cell["stats"]
                print(f"{arch:<11} {label:<32} {100 * cell['hit_rate']:>5.1f} {100 * cell['oracle_hit_rate']:>7.1f} "
                      f"{_f(cell['hit_rate'] / c_hit if c_hit else None, '6.3f'):>6} {s['shared_restores']:>8} "
                      f"{s['shared_tokens']:>10} {s['shared_published']:>9} {s['shared_errors']:>6} "
                      f"{s['shared_rejected']:>8} {cell['failed']:>6} "
                      f"{cell['latency_p50_ms']:>7.1f} {cell['wall_s']:>6.1f}")
    r = results.get("restore")
    if r:
        print(f"\n2. restore from Redis: {r.get('layers')} layers x {r.get('tokens')} tokens, bf16, 8 KV heads x 128 "
              f"(Llama-3.1-8B per layer), blocks of {BLOCK_RESTORE}; median of {r.get('reps')}")
        if "error" in r:
            print(f"  ERROR {r['error'][:300]}")
        else:
            vb = r["value_bytes"]
            print(f"  {r['blocks']} blocks, {vb['restore'] / 2**20:.2f} MiB of values ({vb['restore_secret'] / 2**20:.2f} "
                  f"MiB with a secret; {r['kv_bytes'] / 2**20:.1f} MiB KV)")
            print(f"  {'path':<56} {'median ms':>9} {'GB/s':>6} {'x GET':>6}")
            names = {"restore": "PrefixCache.begin (fetch, CRC-32, trie, restore)",
                     "restore_secret": "PrefixCache.begin + secret (fetch, MAC, trie, restore)",
                     "get": "pipelined GET (redis-py)", "get+frombuffer": "GET + np.frombuffer",
                     "get+mx.array": "GET + np.frombuffer + mx.array"}
            for k, name in names.items():
                print(f"  {name:<56} {1e3 * r['median_s'][k]:>9.1f} {r['gb_s'][k]:>6.2f} "
                      f"{r['gb_s'][k] / r['gb_s']['get']:>6.2f}")
            for k, check in (("restore", "CRC-32"), ("restore_secret", "HMAC-SHA-256")):
                f_ms, b_ms = 1e3 * r["median_fetch_s"][k], 1e3 * r["median_s"][k]
                print(f"  of begin{' (secret)' if k != 'restore' else ''}: SharedTier.fetch (GET pipeline, {check}, "
                      f"decode) {f_ms:.1f} ms, the rest (trie insert, restore into live caches, eval) {b_ms - f_ms:.1f} ms")
            p = r["prefill"]
            print(f"  one block ({p['tokens']} tokens) x {p['real_layers']} layers ({p['block_real_bytes'] / 2**20:.0f} MiB KV): "
                  f"prefill {p['block_real_s']:.0f} s ({p['measured_tokens']} tokens x 1 layer took "
                  f"{p['measured_one_layer_s']:.2f} s; x {p['tokens'] // p['measured_tokens']} x {p['real_layers']}; float32 "
                  f"weights, CPU) vs from Redis {1e3 * p['wire_restore_block_real_s']:.0f} ms (restore path; with a secret "
                  f"{1e3 * p['wire_restore_secret_block_real_s']:.0f} ms; plain GET "
                  f"{1e3 * p['wire_get_block_real_s']:.0f} ms): prefill / wire = {p['prefill_over_restore']:.0f}x")
    f = results.get("faults")
    if f:
        print(f"\n3. faults: llama, 2 shared servers, {f.get('users')} users x {f.get('turns')} turns; redis-server "
              f"SIGKILLed before request {f.get('kill_at')}, restarted (empty) before request {f.get('restart_at')}")
        if "error" in f:
            print(f"  ERROR {f['error'][:300]}")
        else:
            s = f["stats"]
            print(f"  failed HTTP requests {f['failed']}; shared_errors {s['shared_errors']}, restores "
                  f"{s['shared_restores']}, published {s['shared_published']}, dropped {s['shared_dropped']}")
            for name, ph in f["phases"].items():
                print(f"  {name:<14} {ph['ok']:>3}/{ph['requests']:<3} ok, hit {100 * ph['hit_rate']:5.1f}% "
                      f"(oracle {100 * ph['oracle_hit_rate']:5.1f}%)")
    t = results.get("tenants")
    if t:
        print(f"\n4. tenants and forgeries: llama, 3 servers with --api-keys and one --shared-secret-file on one Redis; "
              f"tenant A: {t.get('users')} users x {t.get('turns')} turns on the first two, round robin, a system prompt "
              f"per conversation")
        if "error" in t:
            print(f"  ERROR {t['error'][:300]}")
        else:
            a = t["A"]
            print(f"  A: hit {100 * a['hit_rate']:.1f}% (oracle {100 * a['oracle_hit_rate']:.1f}%); then B sends A's "
                  f"requests, and A again with a cache_salt; server: " + "; ".join(f"{k}: {v}" for k, v in TIERS.items()))
            print(f"  {'namespace':<10} {'server':<6} {'requests':>8} {'prompt':>7} {'cached':>7} {'own oracle':>10} "
                  f"{'beyond own':>10} {'turn-0 cached':>13}")
            for name, tiers in t["cross"].items():
                for tier, c in tiers.items():
                    print(f"  {name:<10} {tier:<6} {c['requests']:>8} {c['prompt_tokens']:>7} {c['cached_tokens']:>7} "
                          f"{c['oracle_cached']:>10} {c['beyond_own']:>10} {c['first_turn_cached']:>13}")
            s = t["stats"]
            figs = ", ".join(f"{k} {v['requests']} requests {v['cached_tokens']} cached" for k, v in t["tenant_figures"].items())
            print(f"  both servers: shared_restores {s['shared_restores']}, shared_tokens {s['shared_tokens']}, "
                  f"published {s['shared_published']}, rejected {s['shared_rejected']}; admin's per tenant: {figs}; "
                  f"a tenant's key shows others: {t['tenant_view_shows_others']}")
            g = t.get("forgeries", {})
            if "error" in g:
                print(f"  forgeries: ERROR {g['error'][:300]}")
            elif g:
                print(f"  forgeries: {g['values']} values ({g['value_bytes'] / 2**20:.2f} MiB; {g['key_prefixes']}) "
                      f"overwritten, one kind at a time; a fresh server replays the {len(g['cold']['records'])} "
                      f"conversations' next turns")
                print(f"  {'values':<34} {'restores':>8} {'shared tok':>10} {'rejected':>8} {'errors':>6} {'cached':>6} "
                      f"{'beyond own':>10} {'ids = cold':>10}")
                for kind, run in [*g["runs"].items(), ("cold", g["cold"])]:
                    st = run["stats"]
                    label = FORGERIES.get(kind, {"genuine": "genuine (the control)",
                                                 "cold": "cold server (no cache)"}.get(kind, kind))
                    same = f"{run['ids_equal_cold']}/{run['requests']}" if "ids_equal_cold" in run else "-"
                    print(f"  {label:<34} {st['shared_restores']:>8} {st['shared_tokens']:>10} {st['shared_rejected']:>8} "
                          f"{st['shared_errors']:>6} {run['cached_tokens']:>6} {run['beyond_own']:>10} {same:>10}")
    if results.get("profile"):
        print("\nprofile of one restore (cProfile, by cumulative time):")
        print("\n".join(results["profile"].splitlines()[:40]))
    print("\ntargets:")
    for t in results["targets"]:
        print(f"  {t['verdict']:<11} {t['target']}: {t['measured']:.3f} (goal {t['goal']})")


def chart(results: dict, out: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 4, figsize=(22, 4.8))
    ax = axes[0]
    servers = results.get("servers", {})
    for i, (arch, res) in enumerate(servers.items()):
        vals = [res["configs"][k].get("hit_rate", 0.0) for k in CONFIGS]
        ax.bar(np.arange(len(CONFIGS)) + 0.4 * i, vals, 0.4, label=arch)
    ax.set_xticks(np.arange(len(CONFIGS)) + 0.2, [f"({k}) {v}".replace(" + ", "\n+ ", 1) for k, v in CONFIGS.items()],
                  fontsize=7)
    ax.set_ylim(0, 1)
    ax.set_title("hit rate (cached / prompt tokens)")
    ax.legend(fontsize=8)
    ax = axes[1]
    r = results.get("restore", {})
    if "gb_s" in r:
        names = list(r["gb_s"])
        ax.bar(names, [r["gb_s"][k] for k in names], color=["C1", "C3"] + ["C0"] * (len(names) - 2))
        ax.set_ylabel("GB/s (median)")
        ax.set_title(f"from Redis: {r['tokens']} tokens x {r['layers']} layers, bf16 8x128")
        ax.tick_params(axis="x", labelsize=7)
    ax = axes[2]
    f = results.get("faults", {})
    if "records" in f:
        recs = f["records"]
        ax.plot([x["index"] for x in recs if "failed" not in x],
                [x["cached"] / x["prompt"] for x in recs if "failed" not in x], "o-", ms=3, label="cached / prompt")
        ax.plot([x["index"] for x in recs if "failed" not in x],
                [x["oracle"] / x["prompt"] for x in recs if "failed" not in x], "--", lw=0.8, label="oracle")
        ax.axvline(f["kill_at"] - 0.5, color="red", lw=0.8)
        ax.axvline(f["restart_at"] - 0.5, color="green", lw=0.8)
        ax.set_xlabel("request (red: redis killed, green: restarted)")
        ax.set_title("faults: per-request hit rate")
        ax.legend(fontsize=8)
    ax = axes[3]
    t = results.get("tenants", {})
    if "cross" in t:
        bars = [("A", t["A"])] + [(f"{n}\n{tier}", c) for n, tiers in t["cross"].items() for tier, c in tiers.items()]
        g = t.get("forgeries", {})
        short = {"flipped": "flipped", "other_secret": "other\nsecret", "unsigned": "KVT1", "genuine": "genuine"}
        bars += [(f"values:\n{short.get(k, k)}", run) for k, run in g.get("runs", {}).items()]
        x = np.arange(len(bars))
        ax.bar(x - 0.2, [c["cached_tokens"] for _, c in bars], 0.4, label="cached tokens")
        ax.bar(x + 0.2, [c["oracle_cached"] for _, c in bars], 0.4, label="its own history's oracle")
        ax.set_xticks(x, [n for n, _ in bars], fontsize=6)
        ax.set_title("tenants, salts; forged values (a fresh server): cached vs own history", fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    path = out / "shared.png"
    fig.savefig(path, dpi=110)
    return path


def run(args: argparse.Namespace) -> dict:
    results: dict = {"machine": machine(), "args": vars(args)}
    total = (len(args.models) * len(CONFIGS) * args.users * args.turns + args.reps
             + args.fault_users * args.fault_turns + args.tenant_users * (3 * args.tenant_turns + 2 + len(FORGERIES)))
    bar = tqdm(total=total, desc="shared", file=sys.stderr, leave=False)
    with tempfile.TemporaryDirectory(prefix="kvtrie-shared-bench-") as tmp:
        tmp = Path(tmp)
        logs = Path(args.logs) if args.logs else tmp / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        results["servers"] = part_servers(args, tmp, logs, bar)
        try:
            results["restore"] = part_restore(args, bar)
        except Exception as e:  # noqa: BLE001
            results["restore"] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
        results["faults"] = part_faults(args, tmp, logs, bar)
        results["tenants"] = part_tenants(args, tmp, logs, bar)
    bar.close()
    if args.profile:
        results["profile"] = profile_restore(args)
    results["targets"] = targets(results)
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="4 users x 3 turns, llama only, 1024 tokens to restore (a smoke run)")
    p.add_argument("--users", type=int, default=None, help="conversations (default 8; 4 with --quick)")
    p.add_argument("--turns", type=int, default=None, help="turns each (default 5; 3 with --quick)")
    p.add_argument("--system-tokens", type=int, default=300, help="length of the shared system prompt")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--cache-bytes", type=int, default=256 * 2**20, help="--prompt-cache-bytes of every server")
    p.add_argument("--restore-tokens", type=int, default=None, help="tokens restored from Redis (default 4096; 1024 quick)")
    p.add_argument("--restore-layers", type=int, default=4)
    p.add_argument("--reps", type=int, default=None, help="restore repetitions (default 7; 3 with --quick)")
    p.add_argument("--prefill-tokens", type=int, default=None,
                   help="tokens of the prefill timing, scaled to a 256-token block (default 32; 16 quick)")
    p.add_argument("--prefill-reps", type=int, default=None, help="prefill timings (default 2; 1 quick)")
    p.add_argument("--fault-users", type=int, default=None, help="faults: conversations (default 6; 4 with --quick)")
    p.add_argument("--fault-turns", type=int, default=None, help="faults: turns each (default 6; 3 with --quick)")
    p.add_argument("--tenant-users", type=int, default=None, help="tenants: A's conversations (default 6; 3 with --quick)")
    p.add_argument("--tenant-turns", type=int, default=None, help="tenants: turns each (default 4; 2 with --quick)")
    p.add_argument("--profile", action="store_true", help="also cProfile one restore and print where the time goes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--results", default=str(RESULTS), help="where shared.json and shared.png go")
    p.add_argument("--logs", default=None, help="keep the servers' logs here (default: a temporary directory)")
    args = p.parse_args(argv)
    q = args.quick
    args.models = ["llama"] if q else list(MODELS)
    args.users = args.users or (4 if q else 8)
    args.turns = args.turns or (3 if q else 5)
    args.restore_tokens = args.restore_tokens or (1024 if q else 4096)
    args.reps = args.reps or (3 if q else 7)
    args.prefill_reps = args.prefill_reps or (1 if q else 2)
    args.prefill_tokens = args.prefill_tokens or (16 if q else 32)
    args.fault_users = args.fault_users or (4 if q else 6)
    args.fault_turns = args.fault_turns or (3 if q else 6)
    args.tenant_users = args.tenant_users or (3 if q else 6)
    args.tenant_turns = args.tenant_turns or (2 if q else 4)
    t = time.perf_counter()
    results = run(args)
    results["wall_s"] = time.perf_counter() - t
    out = Path(args.results)
    png = chart(results, out)
    print_tables(results)
    path = save("shared", results, out)
    print(f"\nsaved {path}" + (f" and {png}" if png else "") + f" ({results['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
