"""Disk tier: restore-from-disk bandwidth beside a plain read of the same bytes, and TTFT after a restart.

    python benchmarks/disk.py [--quick] [--sequences 8 --tokens 1024 ...]

One run, side by side. The files are read back from the page cache unless the OS has
dropped them, as a plain read of the same files in the same run would be.
Targets: restore from disk (read + check + copy) >= 0.8x a plain read of the same files
(benchmarks/restore.py's disk goal); per tiny model, the first turn after a restart warm from
disk has a shorter TTFT than a cold prefill of the same prompt. `--quick`: best of 2 (the full run
takes ~20 s: fewer files would change the plain read it is compared with).
Writes benchmarks/results/disk.json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from kvtrie import PrefixCache
from kvtrie.models import generate, load_model, model_fingerprint
from kvtrie.models.cache import KVCache

from common import best_of, machine, save, target
from paging import fill


GOAL_READ = 0.8  # restore from disk / plain read (benchmarks/restore.py's disk goal)


def targets(bw: dict, ttft: list[dict]) -> list[dict]:
    out = [target("restore from disk (read + check + copy) / plain read of the same files", bw["restore / plain read"],
                  f">= {GOAL_READ}", bw["restore / plain read"] >= GOAL_READ)]
    for t in ttft:
        x = t["cold_ttft_ms"] / t["warm_from_disk_ttft_ms"]
        out.append(target(f"{t['model']}, first turn after a restart ({t['prompt_tokens']}-token prompt): cold TTFT / "
                          f"warm-from-disk TTFT ({t['cold_ttft_ms']:.1f} vs {t['warm_from_disk_ttft_ms']:.1f} ms)", x, "> 1", x > 1))
    return out


def restore_bandwidth(args: argparse.Namespace, directory: Path) -> dict:
    """Restore every sequence from disk (read, verify, copy into live caches) vs reading the same files."""
    shape = (args.heads, args.head_dim, args.layers)
    make_cache = lambda: [KVCache() for _ in range(args.layers)]  # noqa: E731
    rng = np.random.default_rng(0)
    seqs = [[i] + rng.integers(0, 1000, args.tokens - 1).tolist() for i in range(args.sequences)]
    with PrefixCache(make_cache, disk_dir=str(directory), fingerprint="bench") as pc:
        fill(pc, seqs, shape)
        total = pc.stats()["device_bytes"]
    files = sorted(directory.glob("*.safetensors"))
    on_disk = sum(f.stat().st_size for f in files)

    def plain_read() -> None:
        for f in files:
            f.read_bytes()

    read_s = best_of(plain_read, args.repeat)
    previous = mx.set_cache_limit(args.mlx_cache_mb << 20)  # as benchmarks/paging.py: recycle live-cache buffers
    times = []
    for _ in range(args.repeat):  # each round: a fresh process-like start, every sequence from disk
        pc = PrefixCache(make_cache, disk_dir=str(directory), fingerprint="bench", hot_sessions=0)
        t = time.perf_counter()
        for tokens in seqs:
            with pc.begin(tokens + [1]) as s:
                assert s.cached == len(tokens)
        times.append(time.perf_counter() - t)
        st = pc.stats()  # disk_restores counts trie nodes faulted in: a sequence may span several
        assert st["cached_tokens_disk"] == sum(map(len, seqs)) and st["disk_restores"] >= len(seqs), st
        assert st["disk_errors"] == 0, st
        pc.close()
    mx.set_cache_limit(previous)
    restore_s = min(times)
    return {
        "payload_bytes": total,
        "file_bytes": on_disk,
        "plain read GB/s": on_disk / read_s / 1e9,
        "restore from disk GB/s": total / restore_s / 1e9,
        "restore / plain read": read_s / restore_s,
    }


def ttft_after_restart(model_name: str, directory: Path, tokens: int) -> dict:
    """First turn of a returning conversation after a restart: warm from disk vs cold."""
    model, _ = load_model(model_name)
    fp = model_fingerprint(model)
    prompt = np.random.default_rng(1).integers(0, 256, tokens).tolist()
    with PrefixCache(model.make_cache, disk_dir=str(directory), fingerprint=fp) as pc:
        generate(model, pc, prompt, max_tokens=1)
    cold = min(generate(model, None, prompt, max_tokens=1).ttft_s for _ in range(3))
    warm = []
    for i in range(3):
        with PrefixCache(model.make_cache, disk_dir=str(directory), fingerprint=fp) as pc:
            # a new last token each time (the same one would restore the whole prompt with its logits)
            res = generate(model, pc, prompt + [1 + i], max_tokens=1)
            assert res.cached_tokens == len(prompt) and pc.stats()["cached_tokens_disk"] == len(prompt)
            warm.append(res.ttft_s)
    return {"model": model_name, "prompt_tokens": tokens, "cold_ttft_ms": 1e3 * cold, "warm_from_disk_ttft_ms": 1e3 * min(warm)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="best of 2 (seconds)")
    p.add_argument("--sequences", type=int, default=8, help="files of --tokens each")
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--repeat", type=int, default=None, help="best of (default 3; 2 with --quick)")
    p.add_argument("--ttft-tokens", type=int, default=2000)
    p.add_argument("--mlx-cache-mb", type=int, default=1024, help="mx.set_cache_limit for the restore runs")
    args = p.parse_args(argv)
    args.repeat = args.repeat or (2 if args.quick else 3)
    with tempfile.TemporaryDirectory(prefix="kvtrie-bench-") as tmp:
        bw = restore_bandwidth(args, Path(tmp) / "bw")
        ttft = [ttft_after_restart(m, Path(tmp) / m, args.ttft_tokens) for m in ("tiny-llama", "tiny-qwen3-next")]
    m = machine()
    print(f"disk tier on {m['device']}, mlx {m['mlx']}, BLAS: {m['blas']}")
    print(f"{bw['payload_bytes'] / 2**20:.0f} MiB of KV in {args.sequences} files of {args.tokens} tokens")
    print(f"  plain read of the same files          {bw['plain read GB/s']:6.2f} GB/s")
    print(f"  restore from disk (read+check+copy)   {bw['restore from disk GB/s']:6.2f} GB/s  ({bw['restore / plain read']:.2f}x the plain read; "
          f"mx.set_cache_limit({args.mlx_cache_mb} MB))")
    for t in ttft:
        print(f"  {t['model']}: first turn after a restart, {t['prompt_tokens']}-token prompt: "
              f"TTFT {t['warm_from_disk_ttft_ms']:.1f} ms warm from disk vs {t['cold_ttft_ms']:.1f} ms cold "
              f"({t['cold_ttft_ms'] / t['warm_from_disk_ttft_ms']:.1f}x)")
    goals = targets(bw, ttft)
    print(f"\ntargets{f' (--quick: best of {args.repeat})' if args.quick else ''}:")
    for t in goals:
        print(f"  {t['verdict']:<11} {t['target']}: {t['measured']:.2f} (goal {t['goal']})")
    print(f"saved {save('disk', {'machine': m, 'config': vars(args), 'bandwidth': bw, 'ttft': ttft, 'targets': goals})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
