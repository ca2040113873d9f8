"""Restore and page-out at real KV sizes, each beside a plain copy (or read) of the same bytes.

    python benchmarks/restore.py [--quick] [--layers 4 --tokens 1024 4096 8192 32768 ...]

Llama-3.1-8B's cache layout (8 KV heads x 128, bfloat16: 4 KiB per token per layer, 128 KiB
over its 32 layers), `--layers` deep; per-layer figures, scaled to 32 layers in the text.
For each size, three PrefixCaches (`hot_sessions=0`, fresh token sequences each), the
sequence stored once through `PrefixCache.store`:

- device: restore = `begin(tokens + [x])` plus `mx.eval` of every live cache's keys/values;
- host:   page-out (`set_budgets(device_bytes=0)`, back with `_storage.move`, repeated) and
          restore from host;
- disk:   restore from disk in a new PrefixCache on the directory, the files in the OS page
          cache (read once before timing), beside a plain read of the same files.

Each timing is the median of `--repeat` runs, interleaved with its reference (a numpy copy
of the same bytes into warm, pre-touched buffers), so the ratios hold on a noisy machine.
`mx.set_cache_limit(--mlx-cache-mb)` as a server would set it: freed live caches are
recycled by the next restore. Then: where a restore's time goes (lookup, zero-filled
allocation, the copies), the fixed cost of a short restore on the tiny model, and the TTFT
of "restore 8k + prefill 16" against a cold prefill on a few layers of the real width.
Writes benchmarks/results/restore.json and restore.png (with matplotlib).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlx.core as mx
import numpy as np
from common import RESULTS, machine, save, verdict
from tqdm import tqdm

from kvtrie import PrefixCache
from kvtrie.arrays import numpy_view
from kvtrie.models import load_model
from kvtrie.models.cache import KVCache
from kvtrie.models.presets import PRESETS, build_preset
from kvtrie.trie import as_token_array

PRESET = PRESETS["llama-3.1-8b"]
HEADS, DIM = PRESET.config["num_key_value_heads"], PRESET.config["head_dim"]
REAL_LAYERS = PRESET.real_layers
TOKEN_LAYER_BYTES = 2 * HEADS * DIM * 2  # keys + values, bfloat16
GOAL_COPY, GOAL_READ, GOAL_OVERHEAD_US = 0.85, 0.8, 50.0
TARGET_FROM = 4096  # the bandwidth targets apply from this many tokens on


def median_s(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def filled(make_cache, n: int, seed: int, shape: tuple[int, int] = (HEADS, DIM), dtype=mx.bfloat16) -> list:
    """Live caches holding `n` positions of random keys/values, written through `update_and_fetch`."""
    key = mx.random.key(seed)
    caches = make_cache()
    for c in caches:
        key, k1, k2 = mx.random.split(key, 3)
        c.update_and_fetch(mx.random.normal((1, shape[0], n, shape[1]), dtype=dtype, key=k1),
                           mx.random.normal((1, shape[0], n, shape[1]), dtype=dtype, key=k2))
        mx.eval(c.keys, c.values)
    return caches


def sequence(first: int, n: int, seed: int) -> list[int]:
    """A fresh token sequence (its first token sets it apart from every other one)."""
    return [first] + np.random.default_rng(seed).integers(0, 100_000, n - 1).tolist()


def live(caches: list) -> list[mx.array]:
    return [a for c in caches for a in (c.keys, c.values)]


def restore_s(pc: PrefixCache, tokens: list[int], x: int) -> float:
    """One timed restore: `begin` plus the evaluation of every live array (the session closes off the clock)."""
    t = time.perf_counter()
    s = pc.begin(tokens + [x])
    mx.eval(live(s.caches))
    dt = time.perf_counter() - t
    assert s.cached == len(tokens), (s.cached, len(tokens))
    s.close()
    return dt


def payload_views(pc: PrefixCache) -> list[np.ndarray]:
    """numpy views of every stored payload array, in whatever tier it is."""
    return [numpy_view(a) for _, n, _ in pc.walk() if n.payload.layers for p in n.payload.layers if p is not None for a in p.arrays]


def warm_like(srcs: list[np.ndarray]) -> list[np.ndarray]:
    dsts = [np.empty_like(a) for a in srcs]
    for d in dsts:
        d.fill(1)  # touched: no page faults on the clock
    return dsts


def copy_s(srcs: list[np.ndarray], dsts: list[np.ndarray]) -> float:
    t = time.perf_counter()
    for s, d in zip(srcs, dsts):
        np.copyto(d, s)
    return time.perf_counter() - t


def side_by_side(a, b, repeat: int) -> tuple[float, float]:
    """Medians of `a()` and `b()` (each returns its own seconds), interleaved run by run."""
    ta, tb = [], []
    for r in range(repeat):
        ta.append(a(r))
        tb.append(b(r))
    return statistics.median(ta), statistics.median(tb)


# --- the three tiers ---------------------------------------------------------------------------


def tier_device(args, make_cache, n: int) -> dict:
    tokens = sequence(1, n, seed=n)
    pc = PrefixCache(make_cache, hot_sessions=0)
    pc.store(tokens, filled(make_cache, n, seed=n))
    srcs = payload_views(pc)
    dsts = warm_like(srcs)
    restore_s(pc, tokens, 1)  # warm-up: MLX's buffer cache holds one restore's live caches from here on
    r, c = side_by_side(lambda i: restore_s(pc, tokens, 2 + i), lambda i: copy_s(srcs, dsts), args.repeat)
    pc.close()
    return {"restore_s": r, "reference_s": c, "reference": "numpy copy"}


def tier_host(args, make_cache, n: int) -> tuple[dict, dict]:
    tokens = sequence(2, n, seed=n + 1)
    pc = PrefixCache(make_cache, hot_sessions=0)
    pc.store(tokens, filled(make_cache, n, seed=n + 1))
    storage = pc._storage
    total = pc.stats()["device_bytes"]
    dsts = warm_like(payload_views(pc))

    def back_to_device() -> None:
        pc.set_budgets(device_bytes=None)
        with pc._lock:
            for _, node, _ in storage.walk():
                if node.payload.tier == "host":
                    storage.move(node, "device")

    def page_out() -> float:
        t = time.perf_counter()
        pc.set_budgets(device_bytes=0)
        dt = time.perf_counter() - t
        assert pc.stats()["host_bytes"] == total and pc.stats()["device_bytes"] == 0
        return dt

    first = page_out()  # into fresh host buffers (the pool is empty)
    po, po_ref = [], []
    for _ in range(args.repeat):  # then as in steady state: buffers come back to the pool and are reused
        back_to_device()
        po_ref.append(copy_s(payload_views(pc), dsts))  # the device payloads, the page-out's source
        po.append(page_out())
    srcs = payload_views(pc)
    restore_s(pc, tokens, 1)
    r, c = side_by_side(lambda i: restore_s(pc, tokens, 2 + i), lambda i: copy_s(srcs, dsts), args.repeat)
    assert pc.stats()["host_restores"] >= args.repeat
    pc.close()
    restore = {"restore_s": r, "reference_s": c, "reference": "numpy copy"}
    paging = {"page_out_s": statistics.median(po), "page_out_first_s": first, "reference_s": statistics.median(po_ref),
              "reference": "numpy copy", "pool_max_free_bytes": storage.pool.max_free_bytes}
    return restore, paging


def tier_disk(args, make_cache, n: int, tmp: Path) -> dict:
    tokens = sequence(3, n, seed=n + 2)
    directory = tmp / f"disk-{n}"
    opts = {"disk_dir": str(directory), "fingerprint": "restore-bench", "hot_sessions": 0, "persist_seconds": None}
    with PrefixCache(make_cache, **opts) as pc:
        pc.store(tokens, filled(make_cache, n, seed=n + 2))
        srcs = payload_views(pc)
        dsts = warm_like(srcs)
        copy_ref = statistics.median(copy_s(srcs, dsts) for _ in range(args.repeat))
    files = sorted(directory.glob("*.safetensors"))
    file_bytes = sum(f.stat().st_size for f in files)

    def plain_read(_: int) -> float:
        t = time.perf_counter()
        for f in files:
            f.read_bytes()
        return time.perf_counter() - t

    def from_disk(i: int) -> float:
        pc = PrefixCache(make_cache, **opts)  # a restart: every node on the disk tier
        dt = restore_s(pc, tokens, 2 + i)
        assert pc.stats()["disk_restores"] >= 1 and pc.stats()["disk_errors"] == 0
        pc.close()
        return dt

    plain_read(0)  # into the OS page cache
    from_disk(0)
    r, c = side_by_side(from_disk, plain_read, args.repeat)
    assert sorted(directory.glob("*.safetensors")) == files  # nothing rewritten
    return {"restore_s": r, "reference_s": c, "reference": "plain read", "file_bytes": file_bytes, "numpy_copy_s": copy_ref}


# --- where the time goes -------------------------------------------------------------------------


def phases(args, make_cache, n: int) -> dict:
    """One device and one host restore of `n` tokens taken apart (see `phase`)."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        return {tier: phase(args, make_cache, n, tier, pool) for tier in ("device", "host")}


def phase(args, make_cache, n: int, tier: str, pool: ThreadPoolExecutor) -> dict:
    """A restore from `tier` beside its parts: the trie lookup, the zero-filled allocation of the
    live arrays (`mx.zeros` + `mx.eval`), the payload copies into them (as `snapshot._copy_into`
    does them: numpy, on two threads past 8 MiB), the same copies again into the now-warm MLX
    arrays, and into warm numpy buffers."""
    tokens = sequence(4 if tier == "host" else 5, n, seed=n + 3)
    pc = PrefixCache(make_cache, hot_sessions=0)
    pc.store(tokens, filled(make_cache, n, seed=n + 3))
    if tier == "host":
        pc.set_budgets(device_bytes=0)
    storage = pc._storage
    arr = as_token_array(tokens + [7])
    srcs = payload_views(pc)
    cap = n + 256 - n % 256  # KVCache's step: the capacity a restore allocates
    shapes = [(1, HEADS, cap, DIM)] * len(srcs)
    parallel = sum(s.nbytes for s in srcs) >= 8 << 20

    def lookup() -> None:
        with pc._lock:
            trie = storage.trie("default")
            storage.resident(trie, arr, trie.match(arr), len(arr))

    def copies(dsts: list[np.ndarray]) -> None:
        jobs = [(s, d[:, :, : s.shape[2]]) for s, d in zip(srcs, dsts)]
        if parallel:
            for f in [pool.submit(np.copyto, d, s) for s, d in jobs]:
                f.result()
        else:
            for s, d in jobs:
                np.copyto(d, s)

    t_alloc, t_copy, t_copy_warm = [], [], []
    for _ in range(args.repeat + 1):  # the first round faults fresh memory in; later ones recycle it
        t = time.perf_counter()
        fresh = [mx.zeros(s, mx.bfloat16) for s in shapes]
        mx.eval(fresh)
        t_alloc.append(time.perf_counter() - t)
        views = [numpy_view(a) for a in fresh]
        t = time.perf_counter()
        copies(views)
        t_copy.append(time.perf_counter() - t)
        t = time.perf_counter()
        copies(views)
        t_copy_warm.append(time.perf_counter() - t)
        live_offset = views[0].ctypes.data % 64
        del views, fresh  # back to MLX's buffer cache, as a closed session's live caches
    np_dsts = warm_like([np.empty(s, np.uint16) for s in shapes])
    res = {
        "lookup_s": median_s(lookup, args.repeat),
        "zeros_eval_s": statistics.median(t_alloc[1:]),
        "copy_into_fresh_mlx_s": statistics.median(t_copy[1:]),
        "copy_into_warm_mlx_s": statistics.median(t_copy_warm[1:]),
        "copy_into_warm_numpy_s": median_s(lambda: copies(np_dsts), args.repeat),
        "restore_s": statistics.median(restore_s(pc, tokens, 8 + i) for i in range(args.repeat + 1)),
        "src_address_mod_64": int(srcs[0].ctypes.data % 64),
        "live_address_mod_64": int(live_offset),
        "numpy_dst_address_mod_64": int(np_dsts[0].ctypes.data % 64),
        "bytes": sum(s.nbytes for s in srcs),
    }
    res["other_s"] = res["restore_s"] - res["lookup_s"] - res["zeros_eval_s"] - res["copy_into_fresh_mlx_s"]
    pc.close()
    return res


def fixed_overhead(args, make_cache) -> dict:
    """Lookup + restore of a short prefix on the tiny model (2 layers, float32 KV), minus a numpy copy
    of its bytes; and the same at the Llama layout (`--layers` of bf16 8 x 128), per layer."""
    from kvtrie.models.load import TINY_LLAMA

    model, _ = load_model("tiny-llama")
    shape = (TINY_LLAMA["num_key_value_heads"], TINY_LLAMA["head_dim"])
    out = {"tokens": args.short_tokens, "layers": TINY_LLAMA["num_hidden_layers"], "llama_layers": args.layers}
    for tier in ("device", "host"):
        out[tier] = short_restore(args, model.make_cache, shape, tier, mx.float32)  # the tiny model's dtype
        out[f"llama_{tier}"] = short_restore(args, make_cache, (HEADS, DIM), tier, mx.bfloat16)
    return out


def short_restore(args, make_cache, shape: tuple[int, int], tier: str, dtype) -> dict:
    n = args.short_tokens
    tokens = sequence(6, n, seed=6)
    pc = PrefixCache(make_cache, hot_sessions=0)
    pc.store(tokens, filled(make_cache, n, seed=6, shape=shape, dtype=dtype))
    if tier == "host":
        pc.set_budgets(device_bytes=0)
    srcs = payload_views(pc)
    dsts = warm_like(srcs)
    for i in range(20):
        restore_s(pc, tokens, 2 + i)
    r, c = side_by_side(lambda i: restore_s(pc, tokens, 2 + i), lambda i: copy_s(srcs, dsts), args.short_repeat)
    pc.close()
    return {"restore_us": 1e6 * r, "copy_us": 1e6 * c, "overhead_us": 1e6 * (r - c), "bytes": sum(s.nbytes for s in srcs)}


def ttft(args, bar) -> dict:
    """First token of a request whose first `n` tokens are stored: restore + prefill of 16, vs a cold
    prefill of all of them, at `--ttft-layers` layers of the real width (scaled to 32 in the text)."""
    model, make_cache = build_preset("llama-3.1-8b", layers=args.ttft_layers)
    n, new, step = args.ttft_tokens, 16, 512
    rng = np.random.default_rng(9)
    prompt = rng.integers(0, 261, n).tolist()

    def first_token(tokens: list[int], caches: list) -> int:
        logits = None
        for i in range(0, len(tokens), step):
            logits = model(mx.array(tokens[i : i + step], dtype=mx.int32)[None], cache=caches)
            mx.eval(logits)
        return int(mx.argmax(logits[0, -1]).item())

    first_token(prompt[:8], make_cache())  # warm-up
    cold = []
    for _ in range(args.cold_repeat):
        t = time.perf_counter()
        first_token(prompt + rng.integers(0, 261, new).tolist(), make_cache())
        cold.append(time.perf_counter() - t)
        bar.update(1)
    out = {"tokens": n, "new_tokens": new, "layers": args.ttft_layers, "cold_s": statistics.median(cold)}
    pc = PrefixCache(make_cache, hot_sessions=0)
    pc.store(prompt, filled(make_cache, n, seed=9))  # random KV: the same compute as the real one
    for tier in ("device", "host"):
        if tier == "host":
            pc.set_budgets(device_bytes=0)
        warm = []
        for _ in range(args.repeat + 1):
            tail = rng.integers(0, 261, new).tolist()
            t = time.perf_counter()
            s = pc.begin(prompt + tail)
            first_token(tail, s.caches)
            warm.append(time.perf_counter() - t)
            assert s.cached == n
            s.close()
        out[f"warm_{tier}_s"] = statistics.median(warm[1:])
        bar.update(1)
    pc.close()
    return out


# --- report --------------------------------------------------------------------------------------


def chart(results: dict) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = results["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    for name, marker in (("device", "o"), ("host", "s"), ("disk", "^"), ("page-out", "v")):
        sel = [r for r in rows if r["tier"] == name]
        axes[0].plot([r["tokens"] for r in sel], [r["gb_s"] for r in sel], marker + "-", label=name)
        axes[1].plot([r["tokens"] for r in sel], [r["ratio"] for r in sel], marker + "-", label=name)
    copies = [r for r in rows if r["tier"] == "device"]
    axes[0].plot([r["tokens"] for r in copies], [r["reference_gb_s"] for r in copies], "k--", lw=0.8, label="numpy copy")
    axes[0].set_ylabel("GB/s (median)")
    axes[0].set_title(f"restore / page-out, Llama-3.1-8B KV layout, {results['config']['layers']} layers")
    axes[1].axhline(GOAL_COPY, color="red", lw=0.8, ls="--")
    axes[1].axhline(GOAL_READ, color="orange", lw=0.8, ls="--")
    axes[1].set_ylabel("x its reference (copy; disk: plain read)")
    axes[1].set_title("ratio to the same bytes copied / read")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens")
        ax.legend(fontsize=8)
    fig.tight_layout()
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "restore.png"
    fig.savefig(path, dpi=110)
    return path


def run(args, bar) -> dict:
    previous = mx.set_cache_limit(args.mlx_cache_mb << 20)
    make_cache = lambda: [KVCache(mx.bfloat16) for _ in range(args.layers)]
    rows, extra = [], {}
    with tempfile.TemporaryDirectory(prefix="kvtrie-restore-bench-") as tmp:
        for n in args.tokens:
            nbytes = n * args.layers * TOKEN_LAYER_BYTES
            bar.set_postfix_str(f"{n} tokens: device")
            dev = tier_device(args, make_cache, n)
            bar.update(1)
            bar.set_postfix_str(f"{n} tokens: host")
            host, paging = tier_host(args, make_cache, n)
            bar.update(1)
            bar.set_postfix_str(f"{n} tokens: disk")
            disk = tier_disk(args, make_cache, n, Path(tmp))
            bar.update(1)
            for tier, m, t_key in (("device", dev, "restore_s"), ("host", host, "restore_s"), ("disk", disk, "restore_s"),
                                   ("page-out", paging, "page_out_s")):
                ref_bytes = m.get("file_bytes", nbytes)
                rows.append({
                    "tier": tier, "tokens": n, "bytes": nbytes, "ms": 1e3 * m[t_key],
                    "ms_32_layers": 1e3 * m[t_key] * REAL_LAYERS / args.layers,
                    "gb_s": nbytes / m[t_key] / 1e9, "reference": m["reference"],
                    "reference_gb_s": ref_bytes / m["reference_s"] / 1e9,
                    "ratio": (nbytes / m[t_key]) / (ref_bytes / m["reference_s"]),
                    **({"first_gb_s": nbytes / m["page_out_first_s"] / 1e9} if tier == "page-out" else {}),
                    **({"numpy_copy_gb_s": nbytes / m["numpy_copy_s"] / 1e9} if tier == "disk" else {}),
                })
        biggest = max(args.tokens)
        bar.set_postfix_str(f"phases at {biggest} tokens")
        extra["phases"] = phases(args, make_cache, biggest)
        bar.update(1)
    bar.set_postfix_str("fixed overhead")
    extra["fixed_overhead"] = fixed_overhead(args, make_cache)
    bar.update(1)
    bar.set_postfix_str("TTFT")
    extra["ttft"] = ttft(args, bar)
    mx.set_cache_limit(previous)
    return {"machine": machine(), "config": vars(args), "rows": rows, **extra}


def targets(res: dict) -> list[tuple[str, bool]]:
    out = []
    for r in res["rows"]:
        if r["tokens"] < TARGET_FROM:
            continue
        goal = GOAL_READ if r["tier"] == "disk" else GOAL_COPY
        out.append((f"{r['tier']:<8} {r['tokens']:>6} tokens: {r['ratio']:.2f}x the {r['reference']} (goal >= {goal})", r["ratio"] >= goal))
    fo = res["fixed_overhead"]
    for tier in ("device", "host"):
        us = fo[tier]["overhead_us"]
        line = (f"fixed overhead, {fo['tokens']}-token restore from {tier} (tiny-llama): {us:.0f} us beyond the copy "
                f"(goal <= {GOAL_OVERHEAD_US:.0f} us)")
        out.append((line, us <= GOAL_OVERHEAD_US))
    return out


def report(res: dict) -> None:
    a = res["config"]
    m = res["machine"]
    print(f"restore / page-out on {m['device']}, mlx {m['mlx']}, BLAS: {m['blas']}, {m['cpus']} CPUs")
    print(f"Llama-3.1-8B KV layout: {HEADS} KV heads x {DIM}, bf16 = {TOKEN_LAYER_BYTES} B/token/layer, {a['layers']} layers "
          f"measured (x{REAL_LAYERS // a['layers']} for the real {REAL_LAYERS}); mx.set_cache_limit({a['mlx_cache_mb']} MB); "
          f"median of {a['repeat']}, each beside its reference in the same run")
    print(f"\n  {'tier':<8} {'tokens':>6} {'MiB':>6} {'ms':>8} {'ms@32L':>8} {'GB/s':>6}   {'reference':<11} {'GB/s':>6} {'ratio':>6}")
    for r in res["rows"]:
        note = ""
        if "first_gb_s" in r:
            note = f"  (first, empty pool: {r['first_gb_s']:.2f} GB/s)"
        if "numpy_copy_gb_s" in r:
            note = f"  (numpy copy: {r['numpy_copy_gb_s']:.2f} GB/s)"
        print(f"  {r['tier']:<8} {r['tokens']:>6} {r['bytes'] / 2**20:>6.0f} {r['ms']:>8.2f} {r['ms_32_layers']:>8.1f} {r['gb_s']:>6.2f}"
              f"   {r['reference']:<11} {r['reference_gb_s']:>6.2f} {r['ratio']:>6.2f}{note}")
    for tier, p in res["phases"].items():
        ms = {k: 1e3 * v for k, v in p.items() if k.endswith("_s")}
        print(f"\n  where a {tier} restore's time goes ({p['bytes'] / 2**20:.0f} MiB): total {ms['restore_s']:.1f} ms = "
              f"lookup {ms['lookup_s']:.2f} + mx.zeros+eval {ms['zeros_eval_s']:.1f} + copies into the fresh MLX arrays "
              f"{ms['copy_into_fresh_mlx_s']:.1f} + other {ms['other_s']:.1f} ms")
        print(f"    the same copies again into those (warm) MLX arrays {ms['copy_into_warm_mlx_s']:.1f} ms, into warm numpy "
              f"buffers {ms['copy_into_warm_numpy_s']:.1f} ms; address mod 64: payloads {p['src_address_mod_64']}, "
              f"MLX live arrays {p['live_address_mod_64']}, numpy buffers {p['numpy_dst_address_mod_64']}")
    fo = res["fixed_overhead"]
    print()
    for tier in ("device", "host"):
        f = fo[tier]
        print(f"  fixed cost, {fo['tokens']}-token prefix of tiny-llama ({fo['layers']} layers, {f['bytes']} B) from {tier}: "
              f"restore {f['restore_us']:.0f} us, copy {f['copy_us']:.1f} us -> {f['overhead_us']:.0f} us beyond the copy")
    for tier in ("device", "host"):
        f = fo[f"llama_{tier}"]
        per_layer = f["overhead_us"] / fo["llama_layers"]
        print(f"  the same at the Llama layout ({fo['llama_layers']} layers bf16, {f['bytes']} B) from {tier}: restore "
              f"{f['restore_us']:.0f} us, copy {f['copy_us']:.1f} us -> {per_layer:.0f} us/layer beyond the copy "
              f"({per_layer * REAL_LAYERS / 1e3:.1f} ms at {REAL_LAYERS} layers)")
    t = res["ttft"]
    scale = REAL_LAYERS / t["layers"]
    print(f"\n  TTFT, {t['tokens']} stored + {t['new_tokens']} new tokens, llama-3.1-8b preset at {t['layers']} layers "
          f"(x{scale:.0f} for {REAL_LAYERS}): cold prefill {t['cold_s']:.2f} s ({t['cold_s'] * scale:.0f} s at {REAL_LAYERS})")
    for tier in ("device", "host"):
        w = t[f"warm_{tier}_s"]
        print(f"    restore from {tier} + prefill {t['new_tokens']}: {1e3 * w:.0f} ms ({w * scale:.2f} s at {REAL_LAYERS} layers), "
              f"{t['cold_s'] / w:.0f}x faster than cold")
    print("\ntargets:")
    for line, ok in targets(res):
        print(f"  {line}: {verdict(ok)}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="1k and 4k tokens, fewer repeats, TTFT at 1k on 1 layer")
    p.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096, 8192, 32768])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--mlx-cache-mb", type=int, default=2048, help="mx.set_cache_limit, as a server would set it")
    p.add_argument("--short-tokens", type=int, default=64, help="prefix length for the fixed-overhead measurement")
    p.add_argument("--short-repeat", type=int, default=300)
    p.add_argument("--ttft-tokens", type=int, default=8192)
    p.add_argument("--ttft-layers", type=int, default=2)
    p.add_argument("--cold-repeat", type=int, default=1, help="cold prefills (minutes each at 8k)")
    args = p.parse_args(argv)
    if args.quick:
        args.tokens, args.repeat, args.short_repeat = [1024, 4096], 3, 100
        args.ttft_tokens, args.ttft_layers = 1024, 1
    total = 3 * len(args.tokens) + 2 + args.cold_repeat + 2
    with tqdm(total=total, desc="restore", file=sys.stderr, leave=False) as bar:
        res = run(args, bar)
    report(res)
    png = chart(res)
    print(f"saved {save('restore', res)}" + (f" and {png}" if png else " (no matplotlib: no chart)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
