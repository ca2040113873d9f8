"""Paging bandwidth: page-out to host and restore-from-host, beside a plain numpy copy of the same bytes.

    python benchmarks/paging.py [--quick] [--sequences 16 --tokens 1024 --heads 8 --head-dim 128 --layers 4]

All figures come from one run, side by side, so the ratios hold on a noisy machine.
Target: restore from host >= 0.5x a plain numpy copy of the same bytes. `--quick`: 8 sequences,
best of 3 (the same measurement on half the bytes). Writes benchmarks/results/paging.json.
"""

from __future__ import annotations

import argparse
import sys
import time

import mlx.core as mx
import numpy as np

from kvtrie import PrefixCache
from kvtrie.arrays import numpy_view
from kvtrie.models.cache import KVCache

from common import best_of, machine, save, target, verdict


def fill(pc: PrefixCache, seqs: list[list[int]], shape: tuple[int, int, int]) -> None:
    """Commit each sequence with random KV (no model needed to measure copies)."""
    heads, dim, layers = shape
    for tokens in seqs:
        with pc.begin(tokens) as s:
            for c in s.caches:
                k = mx.random.normal((1, heads, len(tokens) - s.cached, dim))
                c.update_and_fetch(k, k)
            s.commit(tokens)


def run(args: argparse.Namespace) -> dict:
    shape = (args.heads, args.head_dim, args.layers)
    make_cache = lambda: [KVCache() for _ in range(args.layers)]  # noqa: E731
    rng = np.random.default_rng(0)

    def sequences(first: int) -> list[list[int]]:
        """Distinct sequences of varied length (mean `--tokens`), as real prompts are."""
        lengths = rng.integers(args.tokens // 2, args.tokens * 3 // 2, args.sequences)
        return [[first + i] + rng.integers(0, 1000, int(n) - 1).tolist() for i, n in enumerate(lengths)]

    pc = PrefixCache(make_cache)
    fill(pc, sequences(10_000), shape)
    first_total = pc.stats()["device_bytes"]

    # page-out with an empty buffer pool (fresh host allocations) ...
    t = time.perf_counter()
    pc.set_budgets(device_bytes=0)
    page_out_cold = first_total / (time.perf_counter() - t)
    # ... and in steady state: evicting returns buffers to the pool, the next page-out reuses them
    pc.set_budgets(host_bytes=0)
    pc.set_budgets(device_bytes=None, host_bytes=None)
    warm_seqs = sequences(20_000)
    fill(pc, warm_seqs, shape)
    total = pc.stats()["device_bytes"]
    t = time.perf_counter()
    pc.set_budgets(device_bytes=0)
    page_out = total / (time.perf_counter() - t)

    # restore from host: begin() stitches host payloads straight into fresh live caches
    def restore_all() -> None:
        for tokens in warm_seqs:
            with pc.begin(tokens + [1]) as s:
                assert s.cached == len(tokens)

    restore_all()
    assert pc.stats()["cached_tokens_host"] > 0
    restore_host_default = total / best_of(restore_all, args.repeat)
    # MLX's CPU allocator keeps only 32 MB of freed buffers by default: every restore then
    # page-faults fresh memory for its live caches. A server should let it keep a few
    # sessions' worth, so live-cache buffers are recycled.
    previous = mx.set_cache_limit(args.mlx_cache_mb << 20)
    restore_all()
    restore_host = total / best_of(restore_all, args.repeat)

    # the same bytes copied by plain numpy into preallocated (warm) buffers
    arrays = [numpy_view(a) for _, n, _ in pc.walk() for p in n.payload.layers if p is not None for a in p.arrays]
    targets = [np.empty_like(a) for a in arrays]

    def numpy_copy() -> None:
        for src, dst in zip(arrays, targets):
            np.copyto(dst, src)

    numpy_bw = total / best_of(numpy_copy, args.repeat)

    # restore from device, for reference
    pc.set_budgets(device_bytes=None)
    pc2 = PrefixCache(make_cache)
    fill(pc2, warm_seqs, shape)

    def restore_device() -> None:
        for tokens in warm_seqs:
            with pc2.begin(tokens + [1]) as s:
                assert s.cached == len(tokens)

    restore_device()
    restore_dev = total / best_of(restore_device, args.repeat)

    mx.set_cache_limit(previous)
    ratio = restore_host / numpy_bw
    return {
        "machine": machine(),
        "bytes": total,
        "config": vars(args),
        "GB/s": {
            "numpy copy (same bytes, warm buffers)": numpy_bw / 1e9,
            "page-out, empty pool": page_out_cold / 1e9,
            "page-out, pooled buffers": page_out / 1e9,
            "restore from host, MLX default cache limit": restore_host_default / 1e9,
            f"restore from host, MLX cache limit {args.mlx_cache_mb} MB": restore_host / 1e9,
            f"restore from device, MLX cache limit {args.mlx_cache_mb} MB": restore_dev / 1e9,
        },
        "target": {
            "restore from host / numpy copy": ratio,
            "measured with": f"mx.set_cache_limit({args.mlx_cache_mb} MB)",
            "goal": ">= 0.5",
            "verdict": verdict(ratio >= 0.5),
        },
        "targets": [target(f"restore from host / numpy copy of the same bytes (mx.set_cache_limit({args.mlx_cache_mb} MB))",
                           ratio, ">= 0.5", ratio >= 0.5)],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="8 sequences, best of 3 (seconds)")
    p.add_argument("--sequences", type=int, default=None, help="default 16; 8 with --quick")
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--repeat", type=int, default=None, help="best of (default 5; 3 with --quick)")
    p.add_argument("--mlx-cache-mb", type=int, default=1024, help="mx.set_cache_limit for the restore runs")
    args = p.parse_args(argv)
    args.sequences = args.sequences or (8 if args.quick else 16)
    args.repeat = args.repeat or (3 if args.quick else 5)
    result = run(args)
    m = result["machine"]
    print(f"paging bandwidth on {m['device']}, mlx {m['mlx']}, BLAS: {m['blas']}")
    print(f"{result['bytes'] / 2**20:.0f} MiB of KV in {args.sequences} sequences of {args.tokens // 2}-{args.tokens * 3 // 2} tokens")
    for name, gbs in result["GB/s"].items():
        print(f"  {name:<40} {gbs:6.2f} GB/s")
    t = result["target"]
    note = f" (--quick: {args.sequences} sequences, best of {args.repeat})" if args.quick else ""
    print(f"\ntargets{note}:")
    print(f"  {t['verdict']:<11} restore from host / numpy copy: {t['restore from host / numpy copy']:.2f} (goal {t['goal']})")
    print(f"saved {save('paging', result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
