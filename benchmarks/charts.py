"""The README's pictures, drawn from the benchmarks' result files (small PNGs under docs/img/).

    python benchmarks/charts.py [--results benchmarks/results] [--out docs/img]

- eviction.png (from policy.json, `benchmarks/policy.py`): hit rate per trace at a quarter of
  its unique KV, mlx-lm's LRUPromptCache beside kvtrie and the offline optimum (Belady).
- memory.png (from memory.json, `benchmarks/memory.py`): the serving process's RSS growth
  through a 500-request soak, kvtrie serve beside mlx_lm.server at the same budget.

A result file that is missing is skipped (its chart keeps the committed one).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
OUT = Path(__file__).parent.parent / "docs" / "img"
MiB = 1 << 20


def eviction(results: Path, out: Path) -> Path | None:
    src = results / "policy.json"
    if not src.exists():
        return None
    import matplotlib.pyplot as plt

    data = json.loads(src.read_text())
    names, rows = [], []
    for trace, t in data["traces"].items():
        row = next((r for r in t["rows"] if r.get("label") == "25%"), None)
        if row is not None:
            names.append(trace)
            rows.append(row)
    fig, ax = plt.subplots(figsize=(8, 3.2))
    width = 0.27
    for i, (key, label, color) in enumerate((("mlx-lm", "mlx-lm LRUPromptCache", "#9aa5b1"),
                                             ("kvtrie", "kvtrie", "#e07b00"),
                                             ("Belady", "offline optimum", "#3b6ea8"))):
        xs = [j + (i - 1) * width for j in range(len(rows))]
        ax.bar(xs, [r[key] for r in rows], width, label=label, color=color)
    ax.set_xticks(range(len(rows)), names, fontsize=8)
    ax.set_ylabel("hit rate", fontsize=8)
    ax.set_title("Eviction at 25% of each trace's unique KV (benchmarks/policy.py)", fontsize=9)
    ax.legend(fontsize=7, ncols=3, loc="upper left")
    ax.set_ylim(0, 1.05)
    ax.tick_params(labelsize=7)
    fig.tight_layout()
    path = out / "eviction.png"
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def memory(results: Path, out: Path) -> Path | None:
    src = results / "memory.json"
    if not src.exists():
        return None
    import matplotlib.pyplot as plt

    data = json.loads(src.read_text())
    fig, ax = plt.subplots(figsize=(8, 3.4))
    budgets = sorted({r["budget_bytes"] for r in data["runs"] if r["budget_bytes"]})
    colors = {b: f"C{i + 1}" for i, b in enumerate(budgets)}
    for r in data["runs"]:
        b = r["budget_bytes"]
        if not b or "trajectory" not in r:
            continue
        ax.plot(r["trajectory"]["peak_mib"], "-" if r["server"] == "kvtrie" else ":", color=colors[b], lw=1,
                label=f"{'kvtrie serve' if r['server'] == 'kvtrie' else 'mlx_lm.server'}, B = {b // MiB} MiB")
    for b in budgets:
        ax.axhline(b / MiB, color=colors[b], ls="--", lw=0.6, alpha=0.6)
    ax.set_xlabel("request", fontsize=8)
    ax.set_ylabel("RSS growth, MiB", fontsize=8)
    ax.set_title("Server memory through a soak at --prompt-cache-bytes B (benchmarks/memory.py; dashed: B)", fontsize=9)
    ax.legend(fontsize=7, loc="center right")
    ax.tick_params(labelsize=7)
    fig.tight_layout()
    path = out / "memory.png"
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", default=str(RESULTS))
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for draw in (eviction, memory):
        path = draw(Path(args.results), out)
        print(f"{draw.__name__}: {path or 'no result file, skipped'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
