"""Restore and page-out at real KV sizes, each beside a plain copy (or read) of the same bytes.

    python benchmarks/restore.py [--quick] [--model {llama,qwen3-next,both}] [--layers 4 --tokens 1024 4096 ...]

Two cache layouts (`--model`, default both), `--layers` deep; per-layer figures, scaled to the
real depth in the text:
- llama: Llama-3.1-8B's (8 KV heads x 128, bfloat16: 4 KiB per token per layer, 128 KiB over
  its 32 layers);
- qwen3-next: the `qwen3-next-80b` preset's live caches (3 gated delta-net layers per attention
  layer, so `--layers` rounds up to a multiple of 4): 2 KV heads x 256 bf16 in the attention
  layer, and in each delta-net layer a whole state (conv tail + 32 x 128 x 128 float32) that a
  restore loads at the restored position (the snapshot `store` leaves at the sequence's end).
  Its caches are filled with random values of the shapes and dtypes the model itself leaves.
For each size, three PrefixCaches (`hot_sessions=0`, fresh token sequences each), the
sequence stored once through `PrefixCache.store`:

- device: restore = `begin(tokens + [x])` plus `mx.eval` of every live cache's arrays (keys/values,
          recurrent states);
- host:   page-out (`set_budgets(device_bytes=0)`, back with `_storage.move`, repeated) and,
          the device budget lifted again (recycling needs room there),
          restore from host;
- disk:   restore from disk in a new PrefixCache on the directory, the files in the OS page
          cache (read once before timing), beside a plain read of the same files.

Each timing is the median of `--repeat` runs, interleaved with its reference (a numpy copy
of the same bytes, every payload array a restore writes into live caches, states included,
into warm, pre-touched buffers), so the ratios hold on a noisy machine.
`mx.set_cache_limit(--mlx-cache-mb)` as a server would set it: freed live caches are
recycled by the next restore. Then: where a restore's time goes (lookup, zero-filled
allocation, the copies; Llama layout), the fixed cost of a short restore on the tiny model, and
per model the TTFT of "restore 8k + prefill 16" against a cold prefill on a few layers of the
real width (qwen3-next: `--qwen-ttft-tokens`, a multiple of 4 layers).
Targets, from 4096 tokens on: restores from device and host and page-outs >= 0.85x the numpy copy,
restores from disk >= 0.8x the plain read; a 64-token restore on the tiny model <= 50 us beyond its
copy. `--quick`: 4096 tokens only, median of 3, 100 short restores, no TTFT and no breakdown (no
target reads them). Writes benchmarks/results/restore.json and restore.png (`--name`; with matplotlib).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np
from common import RESULTS, machine, save, target
from mlx.utils import tree_flatten, tree_unflatten
from tqdm import tqdm

from kvtrie import PrefixCache
from kvtrie.arrays import numpy_view
from kvtrie.heap import exec_with_huge_pages
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
QWEN = PRESETS["qwen3-next-80b"]
QWEN_EVERY = QWEN.config["full_attention_interval"]  # one attention layer per this many
TTFT_PRESETS = {"llama": "llama-3.1-8b", "qwen3-next": "qwen3-next-80b"}
STYLES = {"llama": "-", "qwen3-next": "--"}  # chart line style per model


@functools.cache
def preset_model(name: str, layers: int) -> tuple:
    """`build_preset(name, layers)`, once per run: the qwen3-next layout and its TTFT share one
    (random weights of a real width take seconds per GiB to draw)."""
    return build_preset(name, layers=layers)


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


def filled_like(make_cache, examples: list, n: int, seed: int) -> list:
    """Live caches holding `n` positions: in KV layers random keys/values of the `examples`' heads,
    widths and dtype (as `filled`), in the others a random whole state of the examples' shapes and
    dtypes at offset `n` (a restore's cost does not depend on the values)."""
    key = mx.random.key(seed)
    caches = make_cache()
    for c, ex in zip(caches, examples):
        if isinstance(c, KVCache):
            key, k1, k2 = mx.random.split(key, 3)
            (_, heads, _, dk), dv = ex.keys.shape, ex.values.shape[3]
            c.update_and_fetch(mx.random.normal((1, heads, n, dk), dtype=ex.keys.dtype, key=k1),
                               mx.random.normal((1, heads, n, dv), dtype=ex.values.dtype, key=k2))
        else:
            flat = [(path, a) for path, a in tree_flatten(ex.state) if isinstance(a, mx.array)]
            key, *keys = mx.random.split(key, len(flat) + 1)
            c.state = tree_unflatten([(path, mx.random.normal(a.shape, dtype=a.dtype, key=k)) for (path, a), k in zip(flat, keys)])
            c.offset = n
        mx.eval(live([c]))
    return caches


@dataclass(frozen=True)
class Layout:
    """A model's live-cache layout, `layers` deep: what its restores move, and how to fill it."""

    model: str  # the rows' "model" field
    title: str  # one line for the report
    layers: int
    real_layers: int
    make_cache: Callable[[], list]
    fill: Callable[[int, int], list]  # (tokens, seed) -> live caches holding that many positions
    token_bytes: int  # KV bytes per token over `layers`
    state_bytes: int = 0  # one whole-state snapshot over `layers` (0 for a pure transformer)

    def nbytes(self, n: int) -> int:
        """The payload bytes a restore of `n` tokens writes into live caches."""
        return n * self.token_bytes + self.state_bytes


def llama_layout(layers: int) -> Layout:
    make_cache = lambda: [KVCache(mx.bfloat16) for _ in range(layers)]
    title = f"Llama-3.1-8B KV layout: {HEADS} KV heads x {DIM}, bf16 = {TOKEN_LAYER_BYTES} B/token/layer"
    return Layout("llama", title, layers, REAL_LAYERS, make_cache, lambda n, seed: filled(make_cache, n, seed),
                  layers * TOKEN_LAYER_BYTES)


def hybrid_layers(layers: int) -> int:
    """`layers` rounded up to whole groups of Qwen3-Next's layer pattern (3 delta-net + 1 attention)."""
    return -(-layers // QWEN_EVERY) * QWEN_EVERY


def qwen_layout(layers: int) -> Layout:
    """The qwen3-next-80b preset's live caches: the shapes and dtypes of what the model itself leaves
    in them after a few tokens."""
    model, make_cache = preset_model(QWEN.name, layers)
    examples = make_cache()
    mx.eval(model(mx.array([[1, 2, 3, 4]], dtype=mx.int32), cache=examples))
    kv = [c for c in examples if isinstance(c, KVCache)]
    states = [c for c in examples if not isinstance(c, KVCache)]
    token_bytes = sum((c.keys.nbytes + c.values.nbytes) // c.keys.shape[2] for c in kv)
    state_bytes = sum(a.nbytes for a in live(states))
    state = ", ".join(f"{'x'.join(map(str, a.shape[1:]))} {a.dtype}".replace("mlx.core.", "") for a in live(states[:1]))
    _, heads, _, dim = kv[0].keys.shape
    title = (f"Qwen3-Next-80B layout (preset {QWEN.name}): {len(states)} gated delta-net layers, state {state} "
             f"= {state_bytes // len(states) / 2**20:.2f} MiB each, + {len(kv)} attention layer(s), {heads} KV heads x {dim} "
             f"{kv[0].keys.dtype} = {token_bytes // len(kv)} B/token/layer; one snapshot = the KV of "
             f"{state_bytes / token_bytes:.0f} tokens")
    title = title.replace("mlx.core.", "")
    return Layout("qwen3-next", title, layers, QWEN.real_layers, make_cache,
                  lambda n, seed: filled_like(make_cache, examples, n, seed), token_bytes, state_bytes)


def sequence(first: int, n: int, seed: int) -> list[int]:
    """A fresh token sequence (its first token sets it apart from every other one)."""
    return [first] + np.random.default_rng(seed).integers(0, 100_000, n - 1).tolist()


def live(caches: list) -> list[mx.array]:
    """Every array live caches hold: the KV layers' whole buffers, the other layers' states."""
    out = []
    for c in caches:
        if isinstance(c, KVCache):
            out += [c.keys, c.values]
        else:
            out += [a for _, a in tree_flatten(c.state) if isinstance(a, mx.array)]
    return out


def restore_s(pc: PrefixCache, tokens: list[int], x: int) -> float:
    """One timed restore: `begin` plus the evaluation of every live array (the session closes off the clock).

    The prompt is a fresh list, made off the clock, as a server's tokenizer hands one over: its
    int objects are in the CPU cache. (The same list reused after the copies flushed the cache
    costs ~80 ns a token more to read, ~0.3 ms at 4k tokens, a cost no real request pays.)"""
    prompt = np.asarray(tokens + [x]).tolist()
    t = time.perf_counter()
    s = pc.begin(prompt)
    mx.eval(live(s.caches))
    dt = time.perf_counter() - t
    assert s.cached == len(tokens), (s.cached, len(tokens))
    s.close()
    return dt


def payload_views(pc: PrefixCache) -> list[np.ndarray]:
    """numpy views of every stored payload array, in whatever tier it is."""
    return [numpy_view(a) for _, n, _ in pc.walk() if n.payload.layers for p in n.payload.layers if p is not None for a in p.arrays]


def handed_over(pc: PrefixCache, tokens: list[int], srcs: list[np.ndarray]) -> int:
    """Bytes a restore hands to the live caches as the stored payload arrays themselves (no copy)."""
    stored = {a.ctypes.data for a in srcs}
    s = pc.begin(tokens + [0])
    arrays = live(s.caches)
    mx.eval(arrays)
    out = sum(a.nbytes for a in arrays if numpy_view(a).ctypes.data in stored)
    s.close()
    return out


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


def tier_device(args, layout: Layout, n: int) -> dict:
    tokens = sequence(1, n, seed=n)
    pc = PrefixCache(layout.make_cache, hot_sessions=0)
    pc.store(tokens, layout.fill(n, n))
    srcs = payload_views(pc)
    assert sum(s.nbytes for s in srcs) == layout.nbytes(n), (sum(s.nbytes for s in srcs), layout.nbytes(n))
    dsts = warm_like(srcs)
    restore_s(pc, tokens, 1)  # warm-up: MLX's buffer cache holds one restore's live caches from here on
    r, c = side_by_side(lambda i: restore_s(pc, tokens, 2 + i), lambda i: copy_s(srcs, dsts), args.repeat)
    shared = handed_over(pc, tokens, srcs)
    pc.close()
    return {"restore_s": r, "reference_s": c, "reference": "numpy copy", "handed_over_bytes": shared}


def tier_host(args, layout: Layout, n: int) -> tuple[dict, dict]:
    tokens = sequence(2, n, seed=n + 1)
    pc = PrefixCache(layout.make_cache, hot_sessions=0)
    pc.store(tokens, layout.fill(n, n + 1))
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
    # the payloads stay on host; the device budget is lifted as in `tier_device`, so the live caches
    # a restore closes are recycled by the next one (a device budget of 0 leaves them no room)
    pc.set_budgets(device_bytes=None)
    restore_s(pc, tokens, 1)
    r, c = side_by_side(lambda i: restore_s(pc, tokens, 2 + i), lambda i: copy_s(srcs, dsts), args.repeat)
    assert pc.stats()["host_restores"] >= args.repeat and pc.stats()["device_bytes"] == 0
    pc.close()
    restore = {"restore_s": r, "reference_s": c, "reference": "numpy copy"}
    paging = {"page_out_s": statistics.median(po), "page_out_first_s": first, "reference_s": statistics.median(po_ref),
              "reference": "numpy copy", "pool_max_free_bytes": storage.pool.max_free_bytes}
    return restore, paging


def tier_disk(args, layout: Layout, n: int, tmp: Path) -> dict:
    make_cache = layout.make_cache
    tokens = sequence(3, n, seed=n + 2)
    directory = tmp / f"disk-{layout.model}-{n}"
    opts = {"disk_dir": str(directory), "fingerprint": "restore-bench", "hot_sessions": 0, "persist_seconds": None}
    with PrefixCache(make_cache, **opts) as pc:
        pc.store(tokens, layout.fill(n, n + 2))
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
    # a steady-state restore writes into recycled buffers: no zero fill (reported beside it)
    res["other_s"] = res["restore_s"] - res["lookup_s"] - res["copy_into_warm_mlx_s"]
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


def ttft(args, bar, preset: str, layers: int, n: int) -> dict:
    """First token of a request whose first `n` tokens are stored: restore + prefill of 16, vs a cold
    prefill of all of them, on `layers` layers of `preset` (scaled to its real depth in the text).
    The stored caches hold random values of the shapes and dtypes the model leaves in them."""
    model, make_cache = preset_model(preset, layers)
    new, step = 16, 512
    rng = np.random.default_rng(9)
    prompt = rng.integers(0, 261, n).tolist()

    def first_token(tokens: list[int], caches: list) -> int:
        logits = None
        for i in range(0, len(tokens), step):
            logits = model(mx.array(tokens[i : i + step], dtype=mx.int32)[None], cache=caches)
            mx.eval(logits)
        return int(mx.argmax(logits[0, -1]).item())

    examples = make_cache()
    first_token(prompt[:8], examples)  # warm-up; the caches' shapes and dtypes for `filled_like`
    cold = []
    for _ in range(args.cold_repeat):
        t = time.perf_counter()
        first_token(prompt + rng.integers(0, 261, new).tolist(), make_cache())
        cold.append(time.perf_counter() - t)
        bar.update(1)
    out = {"preset": preset, "tokens": n, "new_tokens": new, "layers": layers, "real_layers": PRESETS[preset].real_layers,
           "cold_s": statistics.median(cold)}
    pc = PrefixCache(make_cache, hot_sessions=0)
    pc.store(prompt, filled_like(make_cache, examples, n, seed=9))  # random KV/states: the same compute as real ones
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


def chart(results: dict, name: str = "restore") -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = results["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    for model, style in STYLES.items():
        for tier, marker, color in (("device", "o", "C0"), ("host", "s", "C1"), ("disk", "^", "C2"), ("page-out", "v", "C3")):
            sel = [r for r in rows if r["tier"] == tier and r["model"] == model]
            if sel:
                for ax, key in zip(axes, ("gb_s", "ratio")):
                    ax.plot([r["tokens"] for r in sel], [r[key] for r in sel], marker + style, color=color, label=f"{model} {tier}")
        copies = [r for r in rows if r["tier"] == "device" and r["model"] == model]
        if copies:
            axes[0].plot([r["tokens"] for r in copies], [r["reference_gb_s"] for r in copies], "k" + style, lw=0.8,
                         label=f"{model} numpy copy")
    axes[0].set_ylabel("GB/s (median)")
    axes[0].set_title("restore / page-out (llama: solid, qwen3-next: dashed)")
    axes[1].axhline(GOAL_COPY, color="red", lw=0.8, ls="--")
    axes[1].axhline(GOAL_READ, color="orange", lw=0.8, ls="--")
    axes[1].set_ylabel("x its reference (copy; disk: plain read)")
    axes[1].set_title("ratio to the same bytes copied / read")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens")
        ax.legend(fontsize=8)
    fig.tight_layout()
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.png"
    fig.savefig(path, dpi=110)
    return path


def tier_rows(args, layout: Layout, bar, tmp: Path) -> list[dict]:
    """Restore from device, host and disk and page-out of `layout` at every `--tokens` size."""
    rows = []
    scale = layout.real_layers / layout.layers
    for n in args.tokens:
        nbytes = layout.nbytes(n)
        bar.set_postfix_str(f"{layout.model} {n} tokens: device")
        dev = tier_device(args, layout, n)
        bar.update(1)
        bar.set_postfix_str(f"{layout.model} {n} tokens: host")
        host, paging = tier_host(args, layout, n)
        bar.update(1)
        bar.set_postfix_str(f"{layout.model} {n} tokens: disk")
        disk = tier_disk(args, layout, n, tmp)
        bar.update(1)
        for tier, m, t_key in (("device", dev, "restore_s"), ("host", host, "restore_s"), ("disk", disk, "restore_s"),
                               ("page-out", paging, "page_out_s")):
            ref_bytes = m.get("file_bytes", nbytes)
            rows.append({
                "model": layout.model, "tier": tier, "tokens": n, "bytes": nbytes, "state_bytes": layout.state_bytes,
                "layers": layout.layers, "real_layers": layout.real_layers, "ms": 1e3 * m[t_key],
                "ms_real_layers": 1e3 * m[t_key] * scale,
                "gb_s": nbytes / m[t_key] / 1e9, "reference": m["reference"],
                "reference_gb_s": ref_bytes / m["reference_s"] / 1e9,
                "ratio": (nbytes / m[t_key]) / (ref_bytes / m["reference_s"]),
                **({"first_gb_s": nbytes / m["page_out_first_s"] / 1e9} if tier == "page-out" else {}),
                **({"numpy_copy_gb_s": nbytes / m["numpy_copy_s"] / 1e9} if tier == "disk" else {}),
                **({"handed_over_bytes": m["handed_over_bytes"]} if tier == "device" else {}),
            })
            r = rows[-1]  # as it comes: a long run that dies later keeps what it measured
            print(f"  {r['model']} {tier} {n} tokens: {r['gb_s']:.2f} GB/s, {r['ratio']:.2f}x the {r['reference']}", flush=True)
    return rows


def run(args, bar) -> dict:
    previous = mx.set_cache_limit(args.mlx_cache_mb << 20)
    llama = llama_layout(args.layers)
    rows, titles, extra = [], {}, {}
    with tempfile.TemporaryDirectory(prefix="kvtrie-restore-bench-") as tmp:
        for model in models(args):
            layout = llama if model == "llama" else qwen_layout(hybrid_layers(args.layers))
            titles[layout.model] = {"title": layout.title, "layers": layout.layers, "real_layers": layout.real_layers,
                                    "token_bytes": layout.token_bytes, "state_bytes": layout.state_bytes}
            rows += tier_rows(args, layout, bar, Path(tmp))
        if "llama" in models(args) and args.phases:
            biggest = args.phases_tokens or max(args.tokens)
            bar.set_postfix_str(f"phases at {biggest} tokens")
            extra["phases"] = phases(args, llama.make_cache, biggest)
            bar.update(1)
    bar.set_postfix_str("fixed overhead")
    extra["fixed_overhead"] = fixed_overhead(args, llama.make_cache)
    bar.update(1)
    extra["ttft"] = {}
    for model in models(args) if args.ttft else ():
        bar.set_postfix_str(f"TTFT {model}")
        if model == "llama":
            extra["ttft"][model] = ttft(args, bar, TTFT_PRESETS[model], args.ttft_layers, args.ttft_tokens)
        else:
            extra["ttft"][model] = ttft(args, bar, TTFT_PRESETS[model], hybrid_layers(args.ttft_layers), args.qwen_ttft_tokens)
    mx.set_cache_limit(previous)
    return {"machine": machine(), "config": vars(args), "layouts": titles, "rows": rows, **extra}


def models(args) -> list[str]:
    return ["llama", "qwen3-next"] if args.model == "both" else [args.model]


def targets(res: dict) -> list[dict]:
    out = []
    for r in res["rows"]:
        if r["tokens"] < TARGET_FROM:
            continue
        goal = GOAL_READ if r["tier"] == "disk" else GOAL_COPY
        what = "page-out" if r["tier"] == "page-out" else f"restore from {r['tier']}"
        out.append(target(f"{r['model']}, {r['layers']} layers, {r['tokens']} tokens: {what} / {r['reference']} (GB/s)",
                          r["ratio"], f">= {goal}", r["ratio"] >= goal))
    fo = res["fixed_overhead"]
    for tier in ("device", "host"):
        us = fo[tier]["overhead_us"]
        out.append(target(f"fixed overhead, {fo['tokens']}-token restore from {tier} (tiny-llama): us beyond the copy",
                          us, f"<= {GOAL_OVERHEAD_US:.0f}", us <= GOAL_OVERHEAD_US))
    return out


def report(res: dict) -> None:
    a = res["config"]
    m = res["machine"]
    print(f"restore / page-out on {m['device']}, mlx {m['mlx']}, BLAS: {m['blas']}, {m['cpus']} CPUs, "
          f"malloc on huge pages: {'yes' if m.get('huge_pages') else 'no'}")
    for model, lay in res["layouts"].items():
        print(f"\n{lay['title']}; {lay['layers']} layers measured (x{lay['real_layers'] / lay['layers']:.0f} for the real "
              f"{lay['real_layers']}); mx.set_cache_limit({a['mlx_cache_mb']} MB); median of {a['repeat']}, each beside its "
              f"reference in the same run" + ("; MiB and the references include the states" if lay["state_bytes"] else ""))
        real = f"ms@{lay['real_layers']}L"
        print(f"\n  {'tier':<8} {'tokens':>6} {'MiB':>6} {'ms':>8} {real:>8} {'GB/s':>6}   {'reference':<11} {'GB/s':>6} {'ratio':>6}")
        for r in (r for r in res["rows"] if r["model"] == model):
            note = ""
            if "first_gb_s" in r:
                note = f"  (first, empty pool: {r['first_gb_s']:.2f} GB/s)"
            if "numpy_copy_gb_s" in r:
                note = f"  (numpy copy: {r['numpy_copy_gb_s']:.2f} GB/s)"
            if r.get("handed_over_bytes"):
                note = f"  ({r['handed_over_bytes'] / 2**20:.1f} MiB of stored arrays handed over, not copied)"
            print(f"  {r['tier']:<8} {r['tokens']:>6} {r['bytes'] / 2**20:>6.0f} {r['ms']:>8.2f} {r['ms_real_layers']:>8.1f} "
                  f"{r['gb_s']:>6.2f}   {r['reference']:<11} {r['reference_gb_s']:>6.2f} {r['ratio']:>6.2f}{note}")
    for tier, p in res.get("phases", {}).items():
        ms = {k: 1e3 * v for k, v in p.items() if k.endswith("_s")}
        print(f"\n  where a {tier} restore's time goes, Llama layout ({p['bytes'] / 2**20:.0f} MiB): total {ms['restore_s']:.1f} ms = "
              f"lookup {ms['lookup_s']:.2f} + copies into warm (recycled) MLX arrays {ms['copy_into_warm_mlx_s']:.1f} + other "
              f"{ms['other_s']:.1f} ms; without a buffer to recycle: mx.zeros+eval {ms['zeros_eval_s']:.1f} + copies into "
              f"the fresh arrays {ms['copy_into_fresh_mlx_s']:.1f} ms")
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
    for t in res["ttft"].values():
        real = t["real_layers"]
        scale = real / t["layers"]
        print(f"\n  TTFT, {t['tokens']} stored + {t['new_tokens']} new tokens, {t['preset']} preset at {t['layers']} layers "
              f"(x{scale:.0f} for {real}): cold prefill {t['cold_s']:.2f} s ({t['cold_s'] * scale:.0f} s at {real})")
        for tier in ("device", "host"):
            w = t[f"warm_{tier}_s"]
            print(f"    restore from {tier} + prefill {t['new_tokens']}: {1e3 * w:.0f} ms ({w * scale:.2f} s at {real} layers), "
                  f"{t['cold_s'] / w:.0f}x faster than cold")
    if a.get("quick"):
        deep = "; the full run adds 32k tokens (4 GiB a copy at 32 layers)" if a["layers"] >= 32 else ""
        print(f"\n--quick: {', '.join(map(str, a['tokens']))} tokens only (the bandwidth targets apply from {TARGET_FROM}), "
              f"median of {a['repeat']}, no TTFT and no breakdown of a restore's time{deep}")
    print("\ntargets:")
    for t in res["targets"]:
        print(f"  {t['verdict']:<11} {t['target']}: {t['measured']:.2f} (goal {t['goal']})")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="4k tokens only (where the targets start), median of 3, 100 short restores, no TTFT or breakdown")
    p.add_argument("--model", choices=("llama", "qwen3-next", "both"), default="both",
                   help="cache layouts to measure: Llama-3.1-8B's, the qwen3-next-80b preset's (hybrid), or both")
    p.add_argument("--tokens", type=int, nargs="+", default=None, help="default 1024 4096 8192 32768; 4096 with --quick")
    p.add_argument("--layers", type=int, default=4, help="layers measured (qwen3-next: rounded up to a multiple of 4)")
    p.add_argument("--repeat", type=int, default=None, help="default 5; 3 with --quick")
    p.add_argument("--mlx-cache-mb", type=int, default=2048, help="mx.set_cache_limit, as a server would set it")
    p.add_argument("--short-tokens", type=int, default=64, help="prefix length for the fixed-overhead measurement")
    p.add_argument("--short-repeat", type=int, default=None, help="default 300; 100 with --quick")
    p.add_argument("--ttft-tokens", type=int, default=8192)
    p.add_argument("--ttft-layers", type=int, default=2, help="(qwen3-next: rounded up to a multiple of 4)")
    p.add_argument("--qwen-ttft-tokens", type=int, default=8192,
                   help="stored tokens for the qwen3-next TTFT (its cold prefill: ~8 s per 1k tokens at 4 layers on 2 cores)")
    p.add_argument("--cold-repeat", type=int, default=1, help="cold prefills (minutes each at 8k)")
    p.add_argument("--phases-tokens", type=int, default=None,
                   help="tokens of the where-the-time-goes breakdown (default: the largest --tokens; it holds "
                        "several copies of the sequence at once)")
    p.add_argument("--name", default="restore", help="results file stem under benchmarks/results (json and png)")
    args = p.parse_args(argv)
    q = args.quick
    args.tokens = args.tokens or ([TARGET_FROM] if q else [1024, 4096, 8192, 32768])
    args.repeat = args.repeat or (3 if q else 5)
    args.short_repeat = args.short_repeat or (100 if q else 300)
    # no target reads the TTFT figures (drawing a real-width model's weights takes most of their time)
    # or the breakdown of a restore's time (a minute at 32 layers): --quick leaves them out
    args.ttft = args.phases = not q
    n_models = len(models(args))
    total = n_models * (3 * len(args.tokens) + (args.cold_repeat + 2) * args.ttft) + ("llama" in models(args)) * args.phases + 1
    with tqdm(total=total, desc="restore", file=sys.stderr, leave=False) as bar:
        res = run(args, bar)
    res["targets"] = targets(res)
    report(res)
    png = chart(res, args.name)
    print(f"saved {save(args.name, res)}" + (f" and {png}" if png else " (no matplotlib: no chart)"))
    return 0


if __name__ == "__main__":
    exec_with_huge_pages()  # as kvtrie serve does at start (kvtrie.heap): fresh live arrays fault in 2 MiB pages
    sys.exit(main())
