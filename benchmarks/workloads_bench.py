"""Multi-conversation workloads against the alternatives: prefill, hit rate, TTFT, memory, restore cost.

    python benchmarks/workloads_bench.py [--quick] [--models tiny-llama,tiny-qwen3-next] [--users 6 --turns 4 ...]

For each model and workload a trace is built once (the model's own greedy replies), then
every strategy replays it. Figures come from one run, side by side; the BLAS MLX ran on
is recorded. Targets, per model and workload: kvtrie's prefill / the oracle's (<= 1.0, the
hybrid <= 1.05), bytes held / the unique-token minimum (tiny-llama, <= 1.02), lookup + restore /
a plain numpy copy of the restored KV (<= 1.2), continuations restored without copying (all).
`--quick`: every model, workload and strategy on shorter traces (QUICK_SIZES).
Writes benchmarks/results/workloads.json and workloads.png.
"""

from __future__ import annotations

import argparse
import sys
import time

import attrs
import mlx.core as mx
import numpy as np
from tqdm import tqdm

from kvtrie.models import load_model

from common import RESULTS, machine, save, verdict
from strategies import KVTrie, MlxLmLRU, NoCache, SingleEntry, mlx_lm_available
from workloads import WORKLOADS, Sizes, build, oracle_prefill, unique_tokens


# --quick: the same four workloads, fewer users, turns, questions and tree levels
QUICK_SIZES = {"users": 3, "turns": 3, "system_tokens": 200, "reply_tokens": 12, "groups": 2, "prompts_per_group": 3,
               "prefix_tokens": 300, "tree_context": 400, "tree_depth": 2}


def kv_bytes_per_token(model) -> int:
    """Bytes of KV one token adds across the model's attention layers (the unique-token minimum's unit)."""
    caches = model.make_cache()
    mx.eval(model(mx.array([[1, 2, 3, 4]]), cache=caches))
    total = 0
    for c in caches:
        if hasattr(c, "update_and_fetch"):
            k, v = c.state[0][..., : c.offset, :], c.state[1][..., : c.offset, :]
            total += (k.nbytes + v.nbytes) // c.offset
    return total


def strategies(model, budget: int, missing_mlx_lm: str | None) -> list:
    """The contenders, in table order. `budget` is the tight byte budget for the budgeted rows."""
    out = [NoCache(model), SingleEntry(model)]
    if missing_mlx_lm is None:
        out.append(MlxLmLRU(model))
    out.append(KVTrie(model, "kvtrie"))
    out.append(KVTrie(model, "kvtrie, device budget + host tier", device_bytes=budget, host_bytes=4 * budget))
    if missing_mlx_lm is None:
        out.append(MlxLmLRU(model, max_bytes=budget, label="mlx-lm LRUPromptCache, same budget"))
    out.append(KVTrie(model, "kvtrie, same budget (no host tier)", device_bytes=budget, host_bytes=0))
    return out


def plain_copy_s(nbytes: int, src: np.ndarray, dst: np.ndarray) -> float:
    """Time of a plain numpy copy of `nbytes` between warm buffers (the restore's yardstick)."""
    t = time.perf_counter()
    np.copyto(dst[:nbytes], src[:nbytes])
    return time.perf_counter() - t


def replay(strategy, trace, per_token: int, copy_bufs) -> dict:
    """Serve the whole trace; the metrics of one (model, workload, strategy) cell."""
    mx.synchronize()
    mx.reset_peak_memory()
    served = []
    t0 = time.perf_counter()
    for r in trace:
        served.append(strategy.serve(r))
    wall = time.perf_counter() - t0
    held, covered = strategy.held()
    ttft = np.array([s.ttft_s for s in served]) * 1e3
    restores = [s for s in served if s.cached]
    copied = [s for s in restores if not s.hot]
    copy_s = sum(plain_copy_s(s.cached * per_token, *copy_bufs) for s in copied)
    # continuing the conversation the previous request served (same history, extended)
    continuations = [
        s for prev, r, s in zip(trace, trace[1:], served[1:]) if r.prompt[: len(prev.committed)] == prev.committed
    ]
    return {
        "prefill": sum(s.prefilled for s in served),
        "prompt_tokens": sum(len(r.prompt) for r in trace),
        "cached": sum(s.cached for s in served),
        "ttft_p50_ms": float(np.percentile(ttft, 50)),
        "ttft_p95_ms": float(np.percentile(ttft, 95)),
        "wall_s": wall,
        "peak_mlx_mb": mx.get_peak_memory() / 2**20,
        "held_bytes": held,
        "held_tokens": covered,
        "bytes_per_cached_token": held / covered if covered else 0.0,
        "restore_us_per_request": 1e6 * float(np.mean([s.restore_s for s in restores])) if restores else 0.0,
        "restore_vs_copy": (sum(s.restore_s for s in copied) / copy_s) if copy_s else None,
        "continuations": len(continuations),
        "continuations_hot": sum(s.hot for s in continuations),
        "continuation_restore_us": 1e6 * float(np.mean([s.restore_s for s in continuations])) if continuations else 0.0,
    }


def run(args: argparse.Namespace) -> dict:
    sizes = Sizes(**{f.name: getattr(args, f.name) for f in attrs.fields(Sizes)})
    missing = mlx_lm_available()
    copy_bufs = (np.random.default_rng(0).integers(0, 255, 64 << 20, dtype=np.uint8), np.empty(64 << 20, np.uint8))
    results: dict = {"machine": machine(), "quick": args.quick, "sizes": attrs.asdict(sizes), "notes": [], "models": {}}
    if missing:
        results["notes"].append(missing)
    jobs = [(m, w) for m in args.models.split(",") for w in WORKLOADS]
    bar = tqdm(total=len(jobs), desc="workloads", file=sys.stderr, leave=False)
    for model_name in args.models.split(","):
        model, tokenizer = load_model(model_name)
        per_token = kv_bytes_per_token(model)
        model_res = results["models"][model_name] = {"kv_bytes_per_token": per_token, "workloads": {}}
        for wname in WORKLOADS:
            bar.set_postfix_str(f"{model_name}: {wname}")
            trace = build(wname, model, tokenizer, sizes, seed=args.seed)
            oracle = oracle_prefill(trace)
            unique = unique_tokens([r.committed for r in trace])
            budget = unique * per_token // 4
            cells = {}
            for strategy in strategies(model, budget, missing):
                cell = replay(strategy, trace, per_token, copy_bufs)
                cell["prefill_vs_oracle"] = cell["prefill"] / oracle
                cell["held_vs_minimum"] = cell["bytes_per_cached_token"] / per_token if cell["held_tokens"] else None
                cells[strategy.name] = cell
            model_res["workloads"][wname] = {
                "requests": len(trace),
                "oracle_prefill": oracle,
                "unique_tokens": unique,
                "budget_bytes": budget,
                "strategies": cells,
            }
            bar.update()
    bar.close()
    results["targets"] = targets(results)
    return results


def targets(results: dict) -> list[dict]:
    """Each target as a measured ratio with its verdict, never hidden."""
    out = []
    for model_name, m in results["models"].items():
        for wname, w in m["workloads"].items():
            kv = w["strategies"]["kvtrie"]
            goal = 1.0 if model_name == "tiny-llama" else 1.05
            out.append(_target(f"{model_name} {wname}: kvtrie prefill / oracle", kv["prefill_vs_oracle"], f"<= {goal}", kv["prefill_vs_oracle"] <= goal + 1e-12))
            if model_name == "tiny-llama":
                out.append(_target(f"tiny-llama {wname}: kvtrie bytes held / unique-token minimum", kv["held_vs_minimum"], "<= 1.02", kv["held_vs_minimum"] <= 1.02))
            if kv["restore_vs_copy"] is not None:
                out.append(_target(f"{model_name} {wname}: kvtrie lookup + restore / plain numpy copy of the restored KV", kv["restore_vs_copy"], "<= 1.2", kv["restore_vs_copy"] <= 1.2))
            if kv["continuations"]:
                frac = kv["continuations_hot"] / kv["continuations"]
                out.append(_target(
                    f"{model_name} {wname}: continuations restored without copying ({kv['continuations_hot']}/{kv['continuations']}, {kv['continuation_restore_us']:.0f} us each)",
                    frac, "= 1", frac == 1.0))
    return out


def _target(name: str, value: float, goal: str, ok: bool) -> dict:
    return {"target": name, "measured": value, "goal": goal, "verdict": verdict(ok)}


def print_tables(results: dict) -> None:
    m = results["machine"]
    print(f"workloads on {m['device']}, mlx {m['mlx']}, BLAS: {m['blas']}")
    for note in results["notes"]:
        print(f"note: {note}")
    cols = f"{'strategy':<38} {'prefill':>7} {'xoracle':>7} {'hit%':>5} {'ttft p50':>8} {'p95 ms':>7} {'wall s':>6} {'peak MB':>7} {'B/tok':>7} {'xmin':>5} {'restore us':>10}"
    for model_name, mres in results["models"].items():
        for wname, w in mres["workloads"].items():
            print(f"\n{model_name} | {wname}: {w['requests']} requests, oracle prefill {w['oracle_prefill']}, "
                  f"{w['unique_tokens']} unique tokens, budget {w['budget_bytes'] / 2**20:.2f} MB")
            print(cols)
            for name, c in w["strategies"].items():
                xmin = f"{c['held_vs_minimum']:.2f}" if c["held_vs_minimum"] else "-"
                print(
                    f"{name:<38} {c['prefill']:>7} {c['prefill_vs_oracle']:>7.3f} {100 * c['cached'] / c['prompt_tokens']:>5.1f} "
                    f"{c['ttft_p50_ms']:>8.1f} {c['ttft_p95_ms']:>7.1f} {c['wall_s']:>6.2f} {c['peak_mlx_mb']:>7.1f} "
                    f"{c['bytes_per_cached_token']:>7.0f} {xmin:>5} {c['restore_us_per_request']:>10.0f}"
                )
    print(f"\ntargets{' (--quick: shorter traces)' if results.get('quick') else ''}:")
    for t in results["targets"]:
        print(f"  {t['verdict']:<11} {t['target']}: {t['measured']:.3f} (goal {t['goal']})")


def chart(results: dict) -> None:
    """Prefill relative to the oracle, per strategy, workload and model (bench extra: matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        results["notes"].append("matplotlib missing: no chart (pip install 'kvtrie[bench]')")
        return
    models = list(results["models"])
    fig, axes = plt.subplots(len(models), 1, figsize=(11, 4 * len(models)), squeeze=False)
    for ax, model_name in zip(axes[:, 0], models):
        workloads = results["models"][model_name]["workloads"]
        names = list(next(iter(workloads.values()))["strategies"])
        width = 0.8 / len(names)
        for i, name in enumerate(names):
            vals = [w["strategies"][name]["prefill_vs_oracle"] for w in workloads.values()]
            ax.bar(np.arange(len(workloads)) + i * width, vals, width, label=name)
        ax.set_xticks(np.arange(len(workloads)) + 0.4 - width / 2, list(workloads))
        ax.set_yscale("log")
        ax.axhline(1.0, color="black", lw=0.8)
        ax.set_ylabel("prefill tokens / oracle")
        ax.set_title(f"{model_name}: tokens computed relative to perfect prefix reuse (lower is better)")
    axes[0, 0].legend(fontsize=8, ncol=2)
    fig.tight_layout()
    RESULTS.mkdir(exist_ok=True)
    fig.savefig(RESULTS / "workloads.png", dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help=f"shorter traces: {QUICK_SIZES} (a minute or two)")
    p.add_argument("--models", default="tiny-llama,tiny-qwen3-next")
    p.add_argument("--seed", type=int, default=0)
    for f in attrs.fields(Sizes):
        p.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=int, default=None, help=f"default {f.default}")
    args = p.parse_args(argv)
    for f in attrs.fields(Sizes):
        if getattr(args, f.name) is None:
            setattr(args, f.name, QUICK_SIZES.get(f.name, f.default) if args.quick else f.default)
    results = run(args)
    chart(results)
    print_tables(results)
    print(f"\nsaved {save('workloads', results)} and {RESULTS / 'workloads.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
