"""Hybrid and sliding-window models at real per-layer shapes: prefill against memory, per strategy.

    python benchmarks/hybrid.py [--quick]

Models: Qwen3-Next-80B's per-layer shapes (3 gated delta-net layers + 1 attention layer,
one recurrent snapshot = the bf16 KV of ~3,100 tokens) and Gemma-3-1B's (5 sliding-window
layers of 512 + 1 global layer); see `kvtrie.models.presets`. Traces: the workloads of
`workloads.py` (replies from the tiny model, forced on replay), chat with and without
message-boundary hints. Strategies, each serving every request the same way (restore,
prefill the rest, feed the reply, store prompt + reply - 1):
- mlx-lm's `LRUPromptCache`, as mlx_lm.server uses it;
- kvtrie's drop-in `TriePromptCache`, the same way;
- kvtrie before snapshots had worth (`policy="lru"`: plain LRU, a snapshot every 256
  tokens, at divergence points and at `len - 1`), as an ablation;
- kvtrie (`policy="worth"`, the default).
Unbounded, and at byte budgets of 50% and 25% of what mlx-lm's cache holds unbounded.
Reported: prefill / oracle (exact prefix reuse, infinite memory), memory held at the end
(device + host) / the needed minimum (every stored token's KV + one snapshot per stored
sequence end and branch point), its peak over the trace, snapshots made / held / used.
Figures are counts and bytes: they do not depend on the machine's speed.
`--quick` (QUICK below): every kind of target on the chat trace only: Qwen3-Next without hints
unbounded and at both budgets, with hints unbounded, Gemma-3 with hints; only the strategies the
targets compare (mlx-lm's cache where the budgets are taken from it, kvtrie, and for Gemma-3 the
drop-in); on narrow models (NARROW: hidden 256, MLP 512) that keep each preset's caches byte for
byte (the same KV heads and widths, the same recurrent states). Counts and bytes come out as in the
full run (checked: the same figures) at a fraction of the compute; only the wall times differ.
Writes benchmarks/results/hybrid.json and hybrid.png.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any, Optional

import attrs
import mlx.core as mx
import numpy as np
from tqdm import tqdm

from kvtrie import PrefixCache
from kvtrie.layers import STATE, leaves, rule_for
from kvtrie.models import load_model
from kvtrie.models.presets import PRESETS, build_preset
from kvtrie.trie import Trie, as_token_array

from common import RESULTS, machine, save, verdict
from workloads import Request, Sizes, build, oracle_prefill

STEP = 512  # prefill chunk
# --quick: the workloads each shape runs (and whether under budgets too), and the narrower model
QUICK = {"qwen3-next-80b": {"chat, no hints": True, "chat, hints": False}, "gemma-3-1b": {"chat, hints": False}}
NARROW = {"hidden_size": 256, "intermediate_size": 512}  # no cache's shape depends on these


def forward(model, tokens: list[int], caches: list) -> mx.array:
    logits = model(mx.array(tokens, dtype=mx.int32)[None], cache=caches)[0, -1]
    mx.eval(logits)
    return logits


def prefill(model, tokens: list[int], caches: list, start: int = 0, captures=(), on_capture=None) -> int:
    """Run `tokens[start:]` in chunks (cut also at `captures`); returns tokens computed."""
    n = len(tokens)
    cuts = sorted(set(range(start + STEP, n, STEP)) | {p for p in captures if start < p <= n} | {n})
    done = start
    for cut in cuts:
        logits = forward(model, tokens[done:cut], caches)
        done = cut
        if on_capture is not None and cut in captures:
            on_capture(cut, logits)
    return n - start


@attrs.define
class Outcome:
    prefill: int = 0
    held_peak: int = 0


class KVTrieStrategy:
    """kvtrie's PrefixCache: restore, prefill with the session's captures, feed the reply, commit."""

    def __init__(self, name: str, model, make_cache, hints: bool, budget: Optional[int], **kwargs: Any):
        self.name, self.model, self.hints = name, model, hints
        extra = {} if budget is None else {"device_bytes": budget, "host_bytes": 0}
        self.pc = PrefixCache(make_cache, **extra, **kwargs)

    def serve(self, r: Request) -> int:
        s = self.pc.begin(r.prompt, capture_hints=r.hints if self.hints else (), reuse_logits=True)
        with s:
            computed = 0
            if s.logits is None:
                last = len(r.prompt)
                computed = prefill(self.model, r.prompt, s.caches, s.cached, s.capture_at,
                                   lambda p, logits: s.capture(p, logits=logits if p == last else None))
            if len(r.reply) > 1:
                forward(self.model, r.reply[:-1], s.caches)
            s.commit(r.committed)
        return computed

    def held(self) -> int:
        st = self.pc.stats()
        return st["device_bytes"] + st["host_bytes"]

    def snapshots(self) -> dict:
        st = self.pc.stats()
        return {"made": st["snapshots_made"], "held": st["snapshots"], "used": st["snapshots_used"],
                "dropped": st["snapshots_dropped"], "logits_restores": st["logits_restores"]}


class ServerStrategy:
    """A prompt cache used as mlx_lm.server uses one: fetch, prefill the rest, feed the reply, insert."""

    def __init__(self, name: str, model, make_cache, cache: Any):
        self.name, self.model, self.make_cache, self.cache = name, model, make_cache, cache

    def serve(self, r: Request) -> int:
        from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

        caches, rest = self.cache.fetch_nearest_cache("model", r.prompt)
        if caches is not None and not rest:  # an exact hit leaves nothing to compute logits from
            if can_trim_prompt_cache(caches):
                trim_prompt_cache(caches, 1)
                rest = r.prompt[-1:]
            else:
                caches, rest = None, r.prompt
        if caches is None:
            caches, rest = self.make_cache(), r.prompt
        start = len(r.prompt) - len(rest)
        computed = prefill(self.model, r.prompt, caches, start)
        if len(r.reply) > 1:
            forward(self.model, r.reply[:-1], caches)
        self.cache.insert_cache("model", r.committed, caches)
        return computed

    def held(self) -> int:
        return int(self.cache.nbytes)

    def snapshots(self) -> dict:
        return {}


def narrow_preset(shape: str) -> tuple:
    """`build_preset(shape)` with NARROW widths: the preset's caches (shapes, dtypes) on a cheaper model."""
    import importlib

    from kvtrie.models.cache import KVCache
    from kvtrie.models.load import init_random_weights, model_from_config
    from kvtrie.models.presets import preset_config

    config = {**preset_config(shape), **NARROW}
    if PRESETS[shape].source == "mlx-lm":
        module = importlib.import_module(f"mlx_lm.models.{config['model_type']}")
        model = module.Model(module.ModelArgs.from_dict(config))
        init_random_weights(model, 0)
        return model, model.make_cache
    model = init_random_weights(model_from_config(config), 0)
    return model, lambda: [KVCache(mx.bfloat16) if isinstance(c, KVCache) else c for c in model.make_cache()]


def measure(model, make_cache) -> tuple[int, int]:
    """(per-token KV bytes over the per-token layers, bytes of one recurrent snapshot)."""
    caches = make_cache()
    mx.eval(model(mx.array([[1, 2, 3, 4]]), cache=caches))
    per_token = snapshot = 0
    for c in leaves(caches):
        rule = rule_for(c)
        if rule.kind == STATE:
            snapshot += rule.capture(c).nbytes
        else:
            per_token += sum(a.nbytes // a.shape[2] for a in rule.live(c))
    return per_token, snapshot


def minimum(trace: list[Request], per_token: int, snapshot: int) -> tuple[int, dict]:
    """What exact reuse needs: every stored token's KV + a snapshot per sequence end and branch point."""
    trie = Trie()
    for r in trace:
        arr = as_token_array(r.committed)
        m = trie.match(arr)
        if m.length < len(arr):
            parent = trie.split(m.last, m.length) if m.ends_mid_edge else (m.last or trie.root)
            trie.add_child(parent, arr[m.length :], None)
    branches = sum(1 for n, _ in trie.walk() if len(n.children) >= 2)
    points = trie.num_leaves + branches if snapshot else 0
    return trie.num_tokens * per_token + points * snapshot, {"tokens": trie.num_tokens, "leaves": trie.num_leaves, "branches": branches}


def replay(strategy, trace: list[Request]) -> dict:
    t = time.perf_counter()
    out = Outcome()
    for r in trace:
        out.prefill += strategy.serve(r)
        out.held_peak = max(out.held_peak, strategy.held())
    return {"prefill": out.prefill, "held": strategy.held(), "held_peak": out.held_peak,
            "snapshots": strategy.snapshots(), "wall_s": time.perf_counter() - t}


def strategies(shape: str, model, make_cache, hints: bool, budget: Optional[int], every: bool = True,
               quick: Optional[bool] = None) -> list:
    """The contenders; `quick` (not None: True where budgets follow) keeps only what the targets compare."""
    from mlx_lm.models.cache import LRUPromptCache

    from kvtrie.integrations.mlx_lm import TriePromptCache

    big = 1 << 62
    if quick is not None:
        out = []
        if quick or budget is not None:  # its unbounded bytes size the budgets
            out.append(ServerStrategy("mlx-lm LRUPromptCache", model, make_cache, LRUPromptCache(max_size=1 << 20, max_bytes=budget or big)))
        if PRESETS[shape].config["model_type"] != "qwen3_next":
            out.append(ServerStrategy("kvtrie drop-in (TriePromptCache)", model, make_cache,
                                      TriePromptCache(1 << 20, budget or big, make_cache=lambda key: make_cache())))
        return out + [KVTrieStrategy("kvtrie", model, make_cache, hints, budget)]
    out = [ServerStrategy("mlx-lm LRUPromptCache", model, make_cache, LRUPromptCache(max_size=1 << 20, max_bytes=budget or big))]
    if every:
        out.append(ServerStrategy("kvtrie drop-in (TriePromptCache)", model, make_cache,
                                  TriePromptCache(1 << 20, budget or big, make_cache=lambda key: make_cache())))
        if PRESETS[shape].config["model_type"] == "qwen3_next":
            out.append(KVTrieStrategy("kvtrie before (LRU + interval)", model, make_cache, hints, budget, policy="lru"))
    out.append(KVTrieStrategy("kvtrie", model, make_cache, hints, budget))
    return out


def run(args: argparse.Namespace) -> dict:
    sizes = Sizes(users=4, turns=3, system_tokens=600, reply_tokens=24, groups=3, prompts_per_group=4,
                  prefix_tokens=600, tree_context=800, tree_depth=3, tree_branching=2)
    tiny, tokenizer = load_model("tiny-llama")
    traces = {
        "chat, no hints": ("multi-turn chat", False),
        "chat, hints": ("multi-turn chat", True),
        "regenerate / edit": ("regenerate / edit", True),
        "agent tree": ("agent tree", True),
        "shared-prefix groups": ("shared-prefix groups", True),
    }
    shapes = {"qwen3-next-80b": list(traces), "gemma-3-1b": ["chat, hints", "regenerate / edit", "agent tree", "shared-prefix groups"]}
    if args.quick:
        shapes = {shape: list(names) for shape, names in QUICK.items()}
    built = {w: build(w, tiny, tokenizer, sizes, seed=args.seed) for w in {traces[n][0] for names in shapes.values() for n in names}}
    results: dict = {"machine": machine(), "quick": args.quick, "sizes": attrs.asdict(sizes), "shapes": {}}
    jobs = sum(len(w) for w in shapes.values())
    bar = tqdm(total=jobs, desc="hybrid", file=sys.stderr, leave=False)
    for shape, names in shapes.items():
        model, make_cache = narrow_preset(shape) if args.quick else build_preset(shape)
        per_token, snapshot = measure(model, make_cache)
        res = results["shapes"][shape] = {"kv_bytes_per_token": per_token, "snapshot_bytes": snapshot,
                                          "snapshot_in_tokens": snapshot / per_token if snapshot else 0,
                                          "real_layers": PRESETS[shape].real_layers, "workloads": {}}
        for name in names:
            bar.set_postfix_str(f"{shape}: {name}")
            wname, hints = traces[name]
            trace = built[wname]
            oracle = oracle_prefill(trace)
            need, parts = minimum(trace, per_token, snapshot)
            cells: dict = {}
            budgets: list[tuple[str, Optional[int]]] = [("unbounded", None)]
            hybrid = snapshot > 0
            for label, budget in budgets:
                # under a budget every strategy runs for the chat without hints; elsewhere (unless
                # --full) the two the target compares: mlx-lm's cache and kvtrie
                every = budget is None or args.full or name == "chat, no hints"
                quick = QUICK[shape][name] if args.quick else None
                cells[label] = {s.name: replay(s, trace) for s in strategies(shape, model, make_cache, hints, budget, every, quick)}
                if label == "unbounded" and hybrid and (quick or not args.quick):
                    held = cells[label]["mlx-lm LRUPromptCache"]["held"]
                    budgets += [("50% of mlx-lm's", held // 2), ("25% of mlx-lm's", held // 4)]
            for cell in cells.values():
                for c in cell.values():
                    c["prefill_vs_oracle"] = c["prefill"] / oracle
                    c["held_vs_minimum"] = c["held"] / need
                    c["peak_vs_minimum"] = c["held_peak"] / need
            res["workloads"][name] = {"requests": len(trace), "oracle_prefill": oracle, "needed_minimum": need,
                                      "minimum_parts": parts, "budgets": {label: b for label, b in budgets}, "cells": cells}
            bar.update()
    bar.close()
    results["targets"] = targets(results)
    return results


def targets(results: dict) -> list[dict]:
    out = []
    q = results["shapes"].get("qwen3-next-80b", {}).get("workloads", {})
    for name, goal in (("chat, no hints", 1.10), ("chat, hints", 1.03)):
        if name in q:
            kv = q[name]["cells"]["unbounded"]["kvtrie"]
            out.append(_t(f"Qwen3-Next shape, {name}, unbounded: kvtrie prefill / oracle", kv["prefill_vs_oracle"], f"<= {goal}", kv["prefill_vs_oracle"] <= goal))
            out.append(_t(f"Qwen3-Next shape, {name}, unbounded: kvtrie memory / needed minimum", kv["held_vs_minimum"], "<= 1.5", kv["held_vs_minimum"] <= 1.5))
    for name, w in q.items():
        for label, cell in w["cells"].items():
            if label == "unbounded":
                continue
            ours, theirs = cell["kvtrie"]["prefill"], cell["mlx-lm LRUPromptCache"]["prefill"]
            out.append(_t(f"Qwen3-Next shape, {name}, {label} bytes: kvtrie prefill / mlx-lm's", ours / theirs, "<= 0.5", ours <= theirs / 2))
    g = results["shapes"].get("gemma-3-1b", {}).get("workloads", {})
    for name, w in g.items():
        for strategy in ("kvtrie", "kvtrie drop-in (TriePromptCache)"):
            c = w["cells"]["unbounded"][strategy]
            out.append(_t(f"Gemma-3 shape, {name}, {strategy}: prefill / oracle", c["prefill_vs_oracle"], "= 1", c["prefill"] == w["oracle_prefill"]))
            out.append(_t(f"Gemma-3 shape, {name}, {strategy}: memory / unique-token KV", c["held_vs_minimum"], "<= 1.1", c["held_vs_minimum"] <= 1.1))
    return out


def _t(name: str, value: float, goal: str, ok: bool) -> dict:
    return {"target": name, "measured": value, "goal": goal, "verdict": verdict(ok)}


def print_tables(results: dict) -> None:
    m = results["machine"]
    print(f"hybrid on {m['device']}, mlx {m['mlx']}, BLAS: {m['blas']}")
    for shape, res in results["shapes"].items():
        print(f"\n{shape} ({PRESETS[shape].config['num_hidden_layers']} of its {res['real_layers']} layers): "
              f"KV {res['kv_bytes_per_token']} B/token, snapshot {res['snapshot_bytes'] / 2**20:.2f} MiB "
              f"(= KV of {res['snapshot_in_tokens']:.0f} tokens)")
        for name, w in res["workloads"].items():
            print(f"\n  {name}: {w['requests']} requests, oracle prefill {w['oracle_prefill']}, needed minimum "
                  f"{w['needed_minimum'] / 2**20:.1f} MiB ({w['minimum_parts']})")
            print(f"  {'budget':<16} {'strategy':<34} {'prefill':>7} {'xoracle':>7} {'held MiB':>8} {'xmin':>5} {'peak xmin':>9} {'snapshots made/held/used':>24} {'wall s':>6}")
            for label, cell in w["cells"].items():
                for sname, c in cell.items():
                    sn = c["snapshots"]
                    snaps = f"{sn['made']}/{sn['held']}/{sn['used']}" if sn else "-"
                    print(f"  {label:<16} {sname:<34} {c['prefill']:>7} {c['prefill_vs_oracle']:>7.3f} {c['held'] / 2**20:>8.1f} "
                          f"{c['held_vs_minimum']:>5.2f} {c['peak_vs_minimum']:>9.2f} {snaps:>24} {c['wall_s']:>6.1f}")
    if results.get("quick"):
        print(f"\n--quick: the chat traces only, the strategies the targets compare, on models of NARROW widths "
              f"{NARROW} with each preset's caches (the same bytes per token and per snapshot, the same counts)")
    print("\ntargets:")
    for t in results["targets"]:
        print(f"  {t['verdict']:<11} {t['target']}: {t['measured']:.3f} (goal {t['goal']})")


def chart(results: dict) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    shape = "qwen3-next-80b"
    if shape not in results["shapes"]:
        return
    workloads = results["shapes"][shape]["workloads"]
    names = list(dict.fromkeys(s for w in workloads.values() for s in w["cells"]["unbounded"]))
    labels = list(dict.fromkeys(lab for w in workloads.values() for lab in w["cells"]))
    fig, axes = plt.subplots(1, 2, figsize=(14, 4.8))
    width = 0.8 / len(names)
    x = np.arange(len(workloads))
    for i, sname in enumerate(names):
        pre = [w["cells"]["unbounded"].get(sname, {}).get("prefill_vs_oracle", 0) for w in workloads.values()]
        mem = [w["cells"]["unbounded"].get(sname, {}).get("held_vs_minimum", 0) for w in workloads.values()]
        axes[0].bar(x + i * width, pre, width, label=sname)
        axes[1].bar(x + i * width, mem, width, label=sname)
    for ax, title in ((axes[0], "prefill / oracle (unbounded)"), (axes[1], "memory held / needed minimum (unbounded)")):
        ax.set_xticks(x + 0.4 - width / 2, list(workloads), fontsize=8)
        ax.set_yscale("log")
        ax.axhline(1.0, color="black", lw=0.8)
        ax.set_title(f"Qwen3-Next-80B shapes: {title}")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    RESULTS.mkdir(parents=True, exist_ok=True)
    fig.savefig(RESULTS / "hybrid.png", dpi=110)
    if len(labels) > 1:
        fig, ax = plt.subplots(figsize=(10, 4))
        width = 0.8 / (len(labels) - 1)
        for i, lab in enumerate(labels[1:]):
            ratios = [w["cells"][lab]["kvtrie"]["prefill"] / w["cells"][lab]["mlx-lm LRUPromptCache"]["prefill"]
                      if lab in w["cells"] else 0 for w in workloads.values()]
            ax.bar(x + i * width, ratios, width, label=lab)
        ax.axhline(0.5, color="red", lw=0.8, ls="--")
        ax.set_xticks(x + 0.4 - width / 2, list(workloads), fontsize=8)
        ax.set_title("kvtrie prefill / mlx-lm LRUPromptCache prefill at the same bytes (target <= 0.5)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(RESULTS / "hybrid_budgets.png", dpi=110)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="every target on a shorter chat trace (see QUICK)")
    p.add_argument("--full", action="store_true", help="every strategy at every budget (about 50 minutes here)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    mx.set_cache_limit(1 << 30)
    results = run(args)
    chart(results)
    print_tables(results)
    print(f"\nsaved {save('hybrid', results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
