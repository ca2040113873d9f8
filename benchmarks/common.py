"""Shared benchmark helpers: which BLAS MLX runs on, timing, result files."""

from __future__ import annotations

import json
import os
import pathlib
import platform
import time
from collections.abc import Callable

import mlx.core as mx

from kvtrie.heap import huge_pages

# benchmarks/run.py --quick points this elsewhere (KVTRIE_BENCH_RESULTS), so quick runs leave the
# full runs' results alone
RESULTS = pathlib.Path(os.environ.get("KVTRIE_BENCH_RESULTS") or pathlib.Path(__file__).parent / "results")


def blas_info() -> str:
    """The BLAS MLX's matmuls run on in this process (a preloaded OpenBLAS, else the wheel's own)."""
    try:
        maps = pathlib.Path("/proc/self/maps").read_text()
    except OSError:
        maps = ""
    for line in maps.splitlines():
        lib = line.split()[-1] if line.split() else ""
        if "libopenblas" in lib and "numpy" not in lib and "scipy" not in lib:
            return f"OpenBLAS ({lib}, preloaded)"
    if platform.system() == "Darwin":
        return "Accelerate (macOS)"
    return "the mlx wheel's bundled reference BLAS (no OpenBLAS preloaded)"


def machine() -> dict:
    return {
        "device": str(mx.default_device()),
        "mlx": mx.__version__,
        "blas": blas_info(),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "huge_pages": huge_pages(),  # malloc on transparent huge pages (kvtrie.heap)
    }


def best_of(fn: Callable[[], object], repeat: int = 5) -> float:
    """The fastest of `repeat` runs, in seconds (noise on shared machines only adds time)."""
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def verdict(ok: bool) -> str:
    return "meets" if ok else "falls short"


def target(name: str, measured: float | None, goal: str, ok: bool) -> dict:
    """One headline target as every results JSON lists it under "targets" (benchmarks/run.py reads them)."""
    return {"target": name, "measured": measured, "goal": goal, "verdict": verdict(ok)}


def save(name: str, data: dict, directory: pathlib.Path = RESULTS) -> pathlib.Path:
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.json"
    path.write_text(json.dumps(data, indent=2, default=str))
    return path
