"""The shared tier (Redis) end to end: two servers behind a round robin, restore throughput, faults.

    python benchmarks/shared.py [--quick] [--users 8 --turns 5 ...]

1. Two servers, round robin. Tiny float32 llama and qwen3_next model directories
   (`tests/serving.py`); the chat workload of benchmarks/server.py (N users x T turns sharing a
   system prompt of a few hundred tokens, each reply appended, greedy, max_tokens 16, one
   request at a time). Request (user u, turn t) goes to server (u + t) % 2, so every turn of a
   conversation lands on the other server than the turn before. Three configurations, same
   workload: (a) two `kvtrie serve` processes with `--shared-url` on one real redis-server
   (maxmemory 512mb, allkeys-lru), (b) the same two without it, (c) one server seeing all the
   traffic. `--shared-block-tokens` is 16 here (these prompts are a few hundred tokens; the
   default 256 would leave whole conversations below one block). Hit rate = sum of usage
   cached_tokens / sum of prompt_tokens; reported: (a)/(c) and (b)/(c), and the oracle's
   (exact prefix reuse over every earlier request, unlimited memory).
2. Restore throughput. A PrefixCache over 4 `kvtrie.models.KVCache(mx.bfloat16)` layers at
   Llama-3.1-8B's per-layer KV shape (8 KV heads x 128, bf16: 4 KiB per token per layer),
   live caches filled with random keys/values for `--restore-tokens` tokens, stored through a
   cache with a shared tier (block_tokens 256) and published (`close()` flushes the
   publisher). Then, per repetition, a fresh PrefixCache (its Redis connection opened by a
   short request first) times `begin(tokens + [x])`: find the blocks, GET them, check and
   decode them, insert them into the local trie, restore them into live caches (evaluated).
   Beside it, in the same run, on a warm redis-py client: one pipeline (transaction=False) of
   GETs of exactly those blocks' keys; the same plus `np.frombuffer` of every value; and the
   same plus a copy into MLX arrays. GB/s = value bytes / time, median of the repetitions.
   The restore's time inside `SharedTier.fetch` (Redis, checks, decode, concatenation) is
   timed apart from the rest of `begin` (trie insert, restore into the live caches).
   Then what a block costs on the wire against prefilling it: `--prefill-tokens` tokens through
   one layer of the `llama-3.1-8b` preset (float32 weights, this machine's CPU; MLX has no
   bf16 BLAS on CPU), scaled linearly to a 256-token block (the MLP and projections dominate
   at these lengths) and to 32 layers, against the same block's 32 layers fetched from Redis on
   loopback (the 4-layer times x 8).
3. Faults. The two shared servers of (a) (llama), a fresh workload: redis-server is killed
   (SIGKILL) after a third of the requests and restarted (empty, same port) after two
   thirds. Counted: failed HTTP requests, `shared_errors` from /kvtrie/stats, hit rate per
   phase.

Writes benchmarks/results/shared.json and shared.png.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from server import Client, build_workload, get_json, sums  # noqa: E402  (puts tests/ on sys.path too)

from common import RESULTS, machine, save, verdict  # noqa: E402
from redis_servers import RedisServer  # noqa: E402
from serving import ServerProcess, free_port, load_tokenizer, make_model_dir  # noqa: E402

MODELS = ("llama", "qwen3_next")
BLOCK_HTTP = 16  # --shared-block-tokens for the tiny chat prompts
BLOCK_RESTORE = 256  # block_tokens of the restore-throughput part
SHARE_GOAL = 0.95  # (a) hit rate / (c)'s
RESTORE_GOAL = 0.7  # restore GB/s / plain pipelined GET GB/s
SHARED_KEYS = ("shared_restores", "shared_tokens", "shared_published", "shared_dropped", "shared_errors")
CONFIGS = {"a": "2 servers + shared", "b": "2 servers, no shared", "c": "1 server"}


# ----------------------------------------------------------------------------------------
# Part 1 and 3: servers
# ----------------------------------------------------------------------------------------


def serve_cmd(model_dir: Path, port: int, args, shared_url: str | None) -> list[str]:
    cmd = [sys.executable, "-m", "kvtrie.serve", "--model", str(model_dir), "--host", "127.0.0.1", "--port", str(port),
           "--prompt-cache-bytes", str(args.cache_bytes)]
    if shared_url is not None:
        cmd += ["--shared-url", shared_url, "--shared-block-tokens", str(BLOCK_HTTP)]
    return cmd


def shared_stats(url: str) -> dict:
    """The shared-tier counters of /kvtrie/stats, summed over the server's models."""
    models = get_json(url + "/kvtrie/stats").get("models", {})
    return {k: sum(int(m.get(k, 0)) for m in models.values()) for k in SHARED_KEYS}


def add_stats(a: dict, b: dict) -> dict:
    return {k: a.get(k, 0) + b.get(k, 0) for k in SHARED_KEYS}


def start_servers(model_dir: Path, n: int, args, shared_url: str | None, logs: Path, label: str) -> list[ServerProcess]:
    procs: list[ServerProcess] = []
    try:
        for i in range(n):
            port = free_port()
            procs.append(ServerProcess(serve_cmd(model_dir, port, args, shared_url), port, timeout=120,
                                       log_path=logs / f"{label}-{i}.log").start())
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


def run_config(model_dir: Path, work, args, servers: int, shared_url: str | None, logs: Path, label: str, bar) -> dict:
    cell: dict = {"servers": servers, "shared": shared_url is not None}
    procs: list[ServerProcess] = []
    try:
        procs = start_servers(model_dir, servers, args, shared_url, logs, label)
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


def part_servers(args, tmp: Path, logs: Path, bar) -> dict:
    out: dict = {}
    for arch in args.models:
        model_dir = make_model_dir(tmp / arch, arch, seed=args.seed)
        work = build_workload(model_dir, args.users, args.turns, args.system_tokens, args.seed)
        res = out[arch] = {"system_prompt_tokens": len(load_tokenizer(model_dir).encode(work.system)), "configs": {}}
        with RedisServer(maxmemory="512mb") as redis_server:
            for key in ("a", "b", "c"):
                bar.set_postfix_str(f"{arch}: ({key}) {CONFIGS[key]}")
                if key == "a":
                    redis_server.flushall()
                res["configs"][key] = run_config(model_dir, work, args, 1 if key == "c" else 2,
                                                 redis_server.url if key == "a" else None, logs, f"{arch}-{key}", bar)
            res["redis_used_memory"] = int(redis_server.client().info("memory").get("used_memory", 0))
        c = res["configs"]["c"].get("hit_rate")
        for key in ("a", "b"):
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
        bar.set_postfix_str(f"restore: storing {n} tokens x {layers} layers")
        writer = PrefixCache(make_cache, fingerprint=fp, shared_url=url, shared_block_tokens=BLOCK_RESTORE)
        mx.random.seed(args.seed)
        with writer.begin(tokens) as s:
            for c in s.caches:
                k = mx.random.normal((1, heads, n, dim)).astype(mx.bfloat16)
                v = mx.random.normal((1, heads, n, dim)).astype(mx.bfloat16)
                c.update_and_fetch(k, v)
            mx.eval([c.state for c in s.caches])
            s.commit(tokens)
        chain = writer._shared.chain("default", np.asarray(tokens, dtype=np.int32), blocks)
        keys = [writer._shared.block_key(h) for h in chain[1:]]
        t = time.perf_counter()
        writer._shared.flush()  # what close() does first: wait for the publisher
        out["publish_wait_s"] = time.perf_counter() - t
        out["published"] = writer.stats().get("shared_published")
        writer.close()
        client = redis.Redis.from_url(url)
        sizes = [client.strlen(k) for k in keys]
        if not all(sizes):
            raise RuntimeError(f"{sum(1 for s in sizes if not s)} of {blocks} blocks are not in Redis")
        total = sum(sizes)
        out["value_bytes"] = total

        def get_all() -> list:
            pipe = client.pipeline(transaction=False)
            for k in keys:
                pipe.get(k)
            return pipe.execute()

        def get_frombuffer() -> list:
            return [np.frombuffer(v, dtype=np.uint8) for v in get_all()]

        def get_to_mlx() -> list:
            arrays = [mx.array(np.frombuffer(v, dtype=np.uint8)) for v in get_all()]
            mx.eval(arrays)
            return arrays

        times: dict[str, list[float]] = {"restore": [], "get": [], "get+frombuffer": [], "get+mx.array": []}
        fetch_s: list[float] = []
        cached = []
        x = 7
        for rep in range(args.reps):
            bar.set_postfix_str(f"restore: repetition {rep + 1}/{args.reps}")
            reader = PrefixCache(make_cache, fingerprint=fp, shared_url=url, shared_block_tokens=BLOCK_RESTORE)
            with reader.begin([1] * 20):  # opens the reader's Redis connection (no block that short)
                pass
            tier = reader._shared
            inner = tier.fetch

            def timed_fetch(*a, _inner=inner, **kw):
                t0 = time.perf_counter()
                try:
                    return _inner(*a, **kw)
                finally:
                    fetch_s.append(time.perf_counter() - t0)

            tier.fetch = timed_fetch
            t = time.perf_counter()
            with reader.begin(tokens + [x]) as s:
                dt = time.perf_counter() - t
                cached.append(s.cached)
            st = reader.stats()
            if st.get("shared_errors"):
                raise RuntimeError(f"restore: shared_errors {st['shared_errors']}")
            reader.close()
            times["restore"].append(dt)
            for name, fn in (("get", get_all), ("get+frombuffer", get_frombuffer), ("get+mx.array", get_to_mlx)):
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
            bar.update()
        out["cached"] = cached
        if any(c != n for c in cached):
            raise RuntimeError(f"restore: begin restored {cached}, not {n}")
        out["times_s"] = times
        out["median_s"] = {k: statistics.median(v) for k, v in times.items()}
        out["fetch_s"] = fetch_s
        out["median_fetch_s"] = statistics.median(fetch_s)
        out["gb_s"] = {k: total / v / 1e9 for k, v in out["median_s"].items()}
        out["ratio"] = out["gb_s"]["restore"] / out["gb_s"]["get"]
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
        v = res.get("a_over_c", float("nan"))
        out.append(_t(f"{arch}: hit rate, 2 servers round robin + shared tier / 1 server "
                      f"(without the shared tier: {res.get('b_over_c', float('nan')):.3f})", v, f">= {SHARE_GOAL}",
                      v >= SHARE_GOAL))
    r = results.get("restore", {})
    if "ratio" in r:
        out.append(_t(f"restore from Redis ({r['layers']} layers x {r['tokens']} tokens, bf16 8x128) GB/s / "
                      f"plain pipelined GET's ({r['gb_s']['restore']:.2f} vs {r['gb_s']['get']:.2f})",
                      r["ratio"], f">= {RESTORE_GOAL}", r["ratio"] >= RESTORE_GOAL))
    f = results.get("faults", {})
    if "failed" in f:
        out.append(_t(f"redis-server killed and restarted mid-workload: failed HTTP requests "
                      f"(shared_errors {f['stats']['shared_errors']})", f["failed"], "0", f["failed"] == 0))
    return out


def _f(v, spec: str) -> str:
    return "-" if v is None or (isinstance(v, float) and np.isnan(v)) else format(v, spec)


def print_tables(results: dict) -> None:
    m, a = results["machine"], results["args"]
    print(f"shared tier on {m['device']}, mlx {m['mlx']}, BLAS: {m['blas']}; {m['cpus']} CPUs; redis-server on loopback")
    if results.get("servers"):
        print(f"\n1. two servers, round robin ((u + t) % 2): {a['users']} users x {a['turns']} turns, max_tokens "
              f"{a['max_tokens']}, sequential; --shared-block-tokens {BLOCK_HTTP}, --prompt-cache-bytes {a['cache_bytes']}")
        print(f"{'model':<11} {'config':<22} {'hit%':>5} {'oracle%':>7} {'x(c)':>6} {'restores':>8} {'shared tok':>10} "
              f"{'published':>9} {'errors':>6} {'failed':>6} {'lat p50':>7} {'wall s':>6}")
        for arch, res in results["servers"].items():
            c_hit = res["configs"]["c"].get("hit_rate")
            for key, cell in res["configs"].items():
                label = f"({key}) {CONFIGS[key]}"
                if "hit_rate" not in cell:
                    print(f"{arch:<11} {label:<22} ERROR {cell.get('error', '')[:150]}")
                    continue
                s = cell["stats"]
                print(f"{arch:<11} {label:<22} {100 * cell['hit_rate']:>5.1f} {100 * cell['oracle_hit_rate']:>7.1f} "
                      f"{_f(cell['hit_rate'] / c_hit if c_hit else None, '6.3f'):>6} {s['shared_restores']:>8} "
                      f"{s['shared_tokens']:>10} {s['shared_published']:>9} {s['shared_errors']:>6} {cell['failed']:>6} "
                      f"{cell['latency_p50_ms']:>7.1f} {cell['wall_s']:>6.1f}")
    r = results.get("restore")
    if r:
        print(f"\n2. restore from Redis: {r.get('layers')} layers x {r.get('tokens')} tokens, bf16, 8 KV heads x 128 "
              f"(Llama-3.1-8B per layer), blocks of {BLOCK_RESTORE}; median of {r.get('reps')}")
        if "error" in r:
            print(f"  ERROR {r['error'][:300]}")
        else:
            print(f"  {r['blocks']} blocks, {r['value_bytes'] / 2**20:.1f} MiB of values ({r['kv_bytes'] / 2**20:.1f} MiB KV)")
            print(f"  {'path':<46} {'median ms':>9} {'GB/s':>6} {'x GET':>6}")
            names = {"restore": "PrefixCache.begin (fetch, check, trie, restore)", "get": "pipelined GET (redis-py)",
                     "get+frombuffer": "GET + np.frombuffer", "get+mx.array": "GET + np.frombuffer + mx.array"}
            for k, name in names.items():
                print(f"  {name:<46} {1e3 * r['median_s'][k]:>9.1f} {r['gb_s'][k]:>6.2f} "
                      f"{r['gb_s'][k] / r['gb_s']['get']:>6.2f}")
            f_ms, b_ms = 1e3 * r["median_fetch_s"], 1e3 * r["median_s"]["restore"]
            print(f"  of begin: SharedTier.fetch (GET pipeline, checksums, decode) {f_ms:.1f} ms, "
                  f"the rest (trie insert, restore into live caches, eval) {b_ms - f_ms:.1f} ms")
            p = r["prefill"]
            print(f"  one block ({p['tokens']} tokens) x {p['real_layers']} layers ({p['block_real_bytes'] / 2**20:.0f} MiB KV): "
                  f"prefill {p['block_real_s']:.0f} s ({p['measured_tokens']} tokens x 1 layer took "
                  f"{p['measured_one_layer_s']:.2f} s; x {p['tokens'] // p['measured_tokens']} x {p['real_layers']}; float32 "
                  f"weights, CPU) vs from Redis {1e3 * p['wire_restore_block_real_s']:.0f} ms (restore path; plain GET "
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
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.5))
    ax = axes[0]
    servers = results.get("servers", {})
    for i, (arch, res) in enumerate(servers.items()):
        vals = [res["configs"][k].get("hit_rate", 0.0) for k in CONFIGS]
        ax.bar(np.arange(3) + 0.4 * i, vals, 0.4, label=arch)
    ax.set_xticks(np.arange(3) + 0.2, [f"({k}) {v}" for k, v in CONFIGS.items()], fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_title("hit rate (cached / prompt tokens)")
    ax.legend(fontsize=8)
    ax = axes[1]
    r = results.get("restore", {})
    if "gb_s" in r:
        names = list(r["gb_s"])
        ax.bar(names, [r["gb_s"][k] for k in names], color=["C1"] + ["C0"] * (len(names) - 1))
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
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    path = out / "shared.png"
    fig.savefig(path, dpi=110)
    return path


def run(args: argparse.Namespace) -> dict:
    results: dict = {"machine": machine(), "args": vars(args)}
    total = (len(args.models) * 3 * args.users * args.turns + args.reps + args.fault_users * args.fault_turns)
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
