"""Eviction policy benchmark: kvtrie against mlx-lm's LRUPromptCache and the offline references.

    python benchmarks/policy.py [--quick] [--traces round-robin chat ...] [--budgets 0.25 0.5]

Every token-level trace (`traces.py`) is replayed, at budgets that are fractions of its unique
KV bytes (and, for round-robin, ~3.5 documents' worth: the over-subscribed cycle), on
- mlx-lm's `LRUPromptCache` (`max_bytes=budget`), driven as `strategies.MlxLmLRU` drives it;
- kvtrie's `PrefixCache` (`device_bytes=budget, host_bytes=0`), through its public API only,
  so it measures whatever policy `src/` holds;
- furthest-next-use (Belady) and leaf-first LRU over a simulated trie (`belady.py`). "Belady"
  is the token-granular one (it may cut a leaf's tail: the optimum of the model, what the
  verdicts use); "(node)" evicts whole leaves only.
No model runs: the live caches are extended with zero keys/values, which is all a cache's
policy sees. The hit rate is restored prompt tokens / prompt tokens. Writes
benchmarks/results/policy.json and policy.png.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from typing import Any, Optional

import attrs
import mlx.core as mx

from kvtrie import PrefixCache
from kvtrie.models.cache import KVCache

from belady import belady, lru_trie
from common import RESULTS, machine, save, target, verdict
from traces import TRACES, Request, build, oracle_cached, prompt_tokens, round_robin_doc_tokens, unique_tokens

OVERSUBSCRIBED_DOCS = 3.5  # round-robin's over-subscribed budget, in documents' worth of KV
TARGET_MLX_LM = 1.0  # kvtrie >= mlx-lm, every trace and budget
TARGET_BELADY = 0.8  # kvtrie >= 0.8 x Belady at the fractional budgets
TARGET_BELADY_OVER = 0.5  # kvtrie >= 0.5 x Belady, round-robin over-subscribed
EPS = 1e-12
STRATEGIES = ("mlx-lm", "kvtrie", "trie-LRU", "Belady", "oracle")
ACCOUNTING = (
    "bytes: mlx-lm's KVCache.nbytes counts its buffers' capacity (grown in steps of 256 positions, "
    "each stored sequence whole, shared prefixes once per sequence); kvtrie counts exactly the stored "
    "positions, each shared prefix once; the references count stored tokens x bytes per token."
)


@attrs.frozen
class Layout:
    """The synthetic attention layers every contender stores KV for (small, so a run is quick)."""

    layers: int = 2
    kv_heads: int = 2
    head_dim: int = 32
    dtype: mx.Dtype = mx.float32

    @property
    def bytes_per_token(self) -> int:
        """Keys and values of one position over all layers, measured on a one-position array."""
        probe = mx.zeros((1, self.kv_heads, 1, self.head_dim), self.dtype)
        return 2 * self.layers * probe.nbytes

    def zeros(self, n: int) -> mx.array:
        return mx.zeros((1, self.kv_heads, n, self.head_dim), self.dtype)


def extend(caches: list, n: int, layout: Layout) -> None:
    """Append `n` positions of zero keys/values to every layer and evaluate (a forward pass would)."""
    if n <= 0:
        return
    z = layout.zeros(n)
    for c in caches:
        c.update_and_fetch(z, z)
    mx.eval([a for c in caches for a in (c.keys, c.values)])


def _result(cached: list[int], requests: Sequence[Request], seconds: float, **extra: Any) -> dict[str, Any]:
    total = prompt_tokens(requests)
    hits = sum(cached)
    return {"cached_tokens": hits, "prompt_tokens": total, "hit_rate": hits / total if total else 0.0,
            "seconds": seconds, **extra}


def replay_kvtrie(
    requests: Sequence[Request], budget_bytes: Optional[int], layout: Layout = Layout(), hot_sessions: int = 0
) -> dict[str, Any]:
    """kvtrie's PrefixCache at `device_bytes=budget_bytes, host_bytes=0`: begin, extend, commit, close."""
    pc = PrefixCache(lambda: [KVCache() for _ in range(layout.layers)], device_bytes=budget_bytes,
                     host_bytes=0, hot_sessions=hot_sessions)
    cached = []
    t = time.perf_counter()
    for r in requests:
        s = pc.begin(r.prompt)
        cached.append(s.cached)
        extend(s.caches, len(r.stored) - s.cached, layout)
        s.commit(r.stored)
        s.close()
    seconds = time.perf_counter() - t
    stats = pc.stats()
    pc.close()
    return _result(cached, requests, seconds, evictions=stats["evictions"], evicted_tokens=stats["evicted_tokens"],
                   hot_restores=stats.get("hot_restores", 0), kvtrie_cached_tokens=stats["cached_tokens"])


def replay_mlx_lm(requests: Sequence[Request], budget_bytes: Optional[int], layout: Layout = Layout()) -> dict[str, Any]:
    """mlx-lm's LRUPromptCache at `max_bytes=budget_bytes`, used as mlx_lm.server uses it (an exact
    hit gives back its last position, which is computed again); cached = len(prompt) - len(rest)."""
    from mlx_lm.models.cache import KVCache as MlxLmKVCache
    from mlx_lm.models.cache import LRUPromptCache, can_trim_prompt_cache, trim_prompt_cache

    lru = LRUPromptCache(max_size=1 << 20, max_bytes=(1 << 63) if budget_bytes is None else budget_bytes)
    cached = []
    t = time.perf_counter()
    for r in requests:
        caches, rest = lru.fetch_nearest_cache("model", r.prompt)
        if caches is not None and not rest:  # an exact hit leaves nothing to compute logits from
            if can_trim_prompt_cache(caches):
                trim_prompt_cache(caches, 1)
                rest = r.prompt[-1:]
            else:
                caches, rest = None, r.prompt
        if caches is None:
            caches = [MlxLmKVCache() for _ in range(layout.layers)]
        n = len(r.prompt) - len(rest)
        cached.append(n)
        extend(caches, len(r.stored) - n, layout)
        lru.insert_cache("model", list(r.stored), caches)
    return _result(cached, requests, time.perf_counter() - t, held_bytes=lru.nbytes, held_sequences=len(lru))


def budgets_for(name: str, unique: int, bpt: int, fractions: Sequence[float], scale: float) -> list[dict[str, Any]]:
    """The budgets a trace runs at: fractions of its unique KV bytes, plus round-robin's over-subscribed one."""
    out = [{"label": f"{f:.0%}", "kind": "fraction", "fraction": f, "bytes": int(f * unique * bpt)} for f in fractions]
    if name == "round-robin":
        tokens = OVERSUBSCRIBED_DOCS * round_robin_doc_tokens(scale)
        out.append({"label": f"{OVERSUBSCRIBED_DOCS:g} docs", "kind": "oversubscribed",
                    "fraction": tokens / unique, "bytes": int(tokens * bpt)})
    return out


def judge(row: dict[str, Any]) -> tuple[bool, list[str]]:
    """The row's targets: kvtrie >= mlx-lm always; >= 0.8 x Belady at fractional budgets, 0.5 x over-subscribed."""
    kv, mlx_lm, best = row["kvtrie"], row["mlx-lm"], row["Belady"]
    misses = []
    if mlx_lm is not None and kv + EPS < TARGET_MLX_LM * mlx_lm:
        misses.append("kvtrie < mlx-lm")
    factor = TARGET_BELADY_OVER if row["kind"] == "oversubscribed" else TARGET_BELADY
    if kv + EPS < factor * best:
        misses.append(f"kvtrie < {factor:g} x Belady")
    return not misses, misses


def row_targets(name: str, row: dict[str, Any]) -> list[dict]:
    """The row's targets (as `judge` has them), each with its measured ratio."""
    kv, mlx_lm, best = row["kvtrie"], row["mlx-lm"], row["Belady"]
    out = []
    if mlx_lm is not None:
        out.append(target(f"{name}, {row['label']}: kvtrie hit rate / mlx-lm's ({kv:.3f} vs {mlx_lm:.3f})",
                          row["kvtrie/mlx-lm"], f">= {TARGET_MLX_LM:g}", kv + EPS >= TARGET_MLX_LM * mlx_lm))
    factor = TARGET_BELADY_OVER if row["kind"] == "oversubscribed" else TARGET_BELADY
    out.append(target(f"{name}, {row['label']}: kvtrie hit rate / Belady's ({kv:.3f} vs {best:.3f})",
                      row["kvtrie/Belady"], f">= {factor:g}", kv + EPS >= factor * best))
    return out


def run_trace(name: str, requests: list[Request], fractions: Sequence[float], scale: float, layout: Layout,
              with_mlx_lm: bool) -> dict[str, Any]:
    """Every contender on one trace at each of its budgets: hit rates, ratios, verdicts, times."""
    bpt = layout.bytes_per_token
    unique = unique_tokens(requests)
    total = prompt_tokens(requests)
    oracle = oracle_cached(requests) / total
    rows = []
    for b in budgets_for(name, unique, bpt, fractions, scale):
        budget = b["bytes"]
        kv = replay_kvtrie(requests, budget, layout, hot_sessions=0)
        kv_hot = replay_kvtrie(requests, budget, layout, hot_sessions=1)
        mlx = replay_mlx_lm(requests, budget, layout) if with_mlx_lm else None
        t = time.perf_counter()
        best = belady(requests, budget, bpt)
        t_best = time.perf_counter() - t
        by_node = belady(requests, budget, bpt, granularity="node")
        t = time.perf_counter()
        lru = lru_trie(requests, budget, bpt)
        t_lru = time.perf_counter() - t
        lru_merged = lru_trie(requests, budget, bpt, merge=True)
        row = {
            **b,
            "mlx-lm": None if mlx is None else mlx["hit_rate"],
            "kvtrie": kv["hit_rate"],
            "kvtrie hot_sessions=1": kv_hot["hit_rate"],
            "trie-LRU": lru["hit_rate"],
            "trie-LRU merged": lru_merged["hit_rate"],
            "Belady": best["hit_rate"],
            "Belady (node)": by_node["hit_rate"],
            "oracle": oracle,
            "kvtrie/mlx-lm": None if not mlx or not mlx["hit_rate"] else kv["hit_rate"] / mlx["hit_rate"],
            "kvtrie/Belady": kv["hit_rate"] / best["hit_rate"] if best["hit_rate"] else None,
            "seconds": {"mlx-lm": None if mlx is None else mlx["seconds"], "kvtrie": kv["seconds"],
                        "kvtrie hot_sessions=1": kv_hot["seconds"], "Belady": t_best, "trie-LRU": t_lru},
            "kvtrie_evicted_tokens": kv["evicted_tokens"],
            "belady_evicted_tokens": best["evicted_tokens"],
            "mlx_lm_held_bytes": None if mlx is None else mlx["held_bytes"],
        }
        ok, misses = judge(row)
        row["verdict"] = verdict(ok)
        row["misses"] = misses
        row["verdict (node Belady)"] = verdict(judge({**row, "Belady": row["Belady (node)"]})[0])
        rows.append(row)
    return {"requests": len(requests), "prompt_tokens": total, "unique_tokens": unique,
            "unique_bytes": unique * bpt, "oracle": oracle, "rows": rows}


def _f(x: Optional[float], digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def print_table(name: str, res: dict[str, Any], bpt: int) -> None:
    print(f"\n== {name}: {res['requests']} requests, {res['prompt_tokens']:,} prompt tokens, "
          f"{res['unique_tokens']:,} unique tokens ({_mb(res['unique_bytes'])} of KV at {bpt} B/token)")
    head = (f"{'budget':<22}{'mlx-lm':>8}{'kvtrie':>8}{'trie-LRU':>10}{'Belady':>8}{'(node)':>8}{'oracle':>8}"
            f"{'kv/mlx-lm':>11}{'kv/Belady':>11}  verdict")
    print(head)
    print("-" * len(head))
    for row in res["rows"]:
        label = f"{row['label']} ({_mb(row['bytes'])})"
        line = (f"{label:<22}{_f(row['mlx-lm']):>8}{_f(row['kvtrie']):>8}{_f(row['trie-LRU']):>10}"
                f"{_f(row['Belady']):>8}{_f(row['Belady (node)']):>8}{_f(row['oracle']):>8}{_f(row['kvtrie/mlx-lm'], 2):>11}"
                f"{_f(row['kvtrie/Belady'], 2):>11}  {row['verdict']}")
        if row["misses"]:
            line += f" ({'; '.join(row['misses'])})"
        print(line)
    for row in res["rows"]:
        if row["verdict (node Belady)"] != row["verdict"]:
            print(f"  note: at {row['label']} against whole-leaf Belady the verdict would be: {row['verdict (node Belady)']}")
        if row["kvtrie"] + EPS < row["trie-LRU"]:
            print(f"  note: at {row['label']} kvtrie < trie-LRU; trie-LRU that merges a lone child into its parent "
                  f"after an eviction, as kvtrie does, gets {row['trie-LRU merged']:.3f}")
        if abs(row["kvtrie hot_sessions=1"] - row["kvtrie"]) > EPS:
            print(f"  note: kvtrie with the default hot_sessions=1 at {row['label']}: {row['kvtrie hot_sessions=1']:.3f} "
                  f"(the last session's live caches, outside the budget, serve its continuation)")


def chart(results: dict[str, Any], path) -> Optional[str]:
    """Grouped bars: hit rate per trace/budget (groups) and strategy (bars). Returns a note if no chart."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib missing: no chart (pip install 'kvtrie[bench]')"
    groups = [(f"{name}\n{row['label']}", row) for name, res in results["traces"].items() for row in res["rows"]]
    fig, ax = plt.subplots(figsize=(max(8.0, 0.9 * len(groups) + 2), 4.5))
    width = 0.8 / len(STRATEGIES)
    for k, strategy in enumerate(STRATEGIES):
        xs = [i + (k - (len(STRATEGIES) - 1) / 2) * width for i in range(len(groups))]
        ys = [row[strategy] or 0.0 for _, row in groups]
        ax.bar(xs, ys, width, label=strategy)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([g for g, _ in groups], fontsize=7)
    ax.set_ylabel("hit rate (restored / prompt tokens)")
    ax.set_ylim(0, 1.12)
    ax.set_title(f"Eviction policy: hit rate per trace and budget ({results['bytes_per_token']} B/token)")
    ax.legend(fontsize=8, ncol=len(STRATEGIES), loc="upper center")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="half-length traces (scale 0.5): under a minute")
    p.add_argument("--traces", nargs="+", default=list(TRACES), choices=list(TRACES))
    p.add_argument("--budgets", nargs="+", type=float, default=[0.25, 0.5], help="fractions of the unique KV bytes")
    p.add_argument("--scale", type=float, default=None, help="trace lengths in tokens x this (default 1, --quick 0.5)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    scale = args.scale if args.scale is not None else (0.5 if args.quick else 1.0)
    layout = Layout()
    bpt = layout.bytes_per_token
    try:
        import mlx_lm.models.cache  # noqa: F401

        missing = None
    except ImportError as exc:
        missing = f"mlx-lm not installed ({exc}): no mlx-lm column (pip install 'kvtrie[bench]')"
    info = machine()
    print(f"BLAS: {info['blas']}  ({info['device']}, mlx {info['mlx']}, {info['cpus']} CPUs)")
    print(f"layout: {layout.layers} layers x {layout.kv_heads} KV heads x {layout.head_dim} dims, "
          f"{layout.dtype} -> {bpt} B/token; traces at scale {scale:g}, seed {args.seed}")
    print(ACCOUNTING)
    if missing:
        print(missing)
    t0 = time.perf_counter()
    results: dict[str, Any] = {
        "machine": info, "scale": scale, "seed": args.seed, "bytes_per_token": bpt,
        "layout": {"layers": layout.layers, "kv_heads": layout.kv_heads, "head_dim": layout.head_dim,
                   "dtype": str(layout.dtype)},
        "goals": {"kvtrie/mlx-lm": TARGET_MLX_LM, "kvtrie/Belady": TARGET_BELADY,
                  "kvtrie/Belady (round-robin over-subscribed)": TARGET_BELADY_OVER},
        "notes": [ACCOUNTING] + ([missing] if missing else []), "traces": {},
    }
    for name in args.traces:
        requests = build(name, args.seed, scale)
        res = run_trace(name, requests, args.budgets, scale, layout, missing is None)
        results["traces"][name] = res
        print_table(name, res, bpt)
    rows = [r for res in results["traces"].values() for r in res["rows"]]
    met = sum(r["verdict"] == "meets" for r in rows)
    results["seconds"] = time.perf_counter() - t0
    results["summary"] = {"rows": len(rows), "meets": met}
    results["targets"] = [t for name, res in results["traces"].items() for row in res["rows"] for t in row_targets(name, row)]
    print(f"\ntargets{f' (--quick: traces at scale {scale:g})' if args.quick else ''}:")
    for t in results["targets"]:
        m = "-" if t["measured"] is None else f"{t['measured']:.3f}"
        print(f"  {t['verdict']:<11} {t['target']}: {m} (goal {t['goal']})")
    print(f"\n{met}/{len(rows)} trace/budget rows meet every target "
          f"(kvtrie >= mlx-lm; >= {TARGET_BELADY:g} x Belady at fractional budgets, "
          f">= {TARGET_BELADY_OVER:g} x Belady round-robin over-subscribed); {results['seconds']:.1f} s")
    note = chart(results, RESULTS / "policy.png")
    if note:
        results["notes"].append(note)
        print(note)
    print(f"saved {save('policy', results)}" + ("" if note else f" and {RESULTS / 'policy.png'}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
