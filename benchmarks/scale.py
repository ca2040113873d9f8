"""Structural operations as the trie grows: match, insert, split, eviction and touch stay flat.

    python benchmarks/scale.py [--nodes 1000,10000,100000 --repeat 2000 --seed 0]

Each size is built the same way, scaled: one document of `nodes` tokens stored as a
path that other requests branched off at `nodes / 1000` points, plus conversations that
copy a random prefix of an earlier one (or continue it) and add a 10-20 token tail, until
the trie holds `nodes` nodes (about 1M tokens at 100k nodes). Payloads are tiny stand-ins:
copying real KV payloads is measured by benchmarks/paging.py, not here.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from collections.abc import Callable

import attrs
import numpy as np

from kvtrie.paging import Pager
from kvtrie.trie import Node, Trie, as_token_array

from common import machine, save, verdict

VOCAB = 100_000
TAIL = (10, 21)  # new tokens per request, [low, high)
CONTINUE = 0.4  # share of requests that extend a whole earlier sequence (next turn of a chat)


@attrs.define(slots=True)
class Payload:
    """Stand-in for a node's payloads: only what the trie and the Pager look at."""

    tokens: int
    nbytes: int
    tier: str = "host"
    has_snapshot: bool = False

    @classmethod
    def of(cls, tokens: int) -> "Payload":
        return cls(tokens, tokens * 4096)


def split_payload(p: Payload, k: int) -> tuple[Payload, Payload]:
    """Split bytes in proportion to tokens, as a KV payload would."""
    upper = p.nbytes * k // p.tokens
    return Payload(k, upper), Payload(p.tokens - k, p.nbytes - upper)


def merge_payload(upper: Payload, lower: Payload) -> Payload:
    return Payload(upper.tokens + lower.tokens, upper.nbytes + lower.nbytes)


def insert(trie: Trie, seq: np.ndarray) -> tuple[Node, Node | None]:
    """What a commit does to the structure: match, split mid-edge, hang the new tail.

    Returns the new leaf and the upper node the split made (None when there was no split).
    """
    m = trie.match(seq)
    upper = trie.split(m.last, m.length) if m.ends_mid_edge else None
    parent = upper or m.last or trie.root
    return trie.add_child(parent, seq[m.length :], Payload.of(len(seq) - m.length)), upper


def uninsert(trie: Trie, leaf: Node, upper: Node | None) -> None:
    """Undo `insert` so that repeated timings see the same trie."""
    trie.remove_leaf(leaf)
    if upper is not None:
        trie.merge(upper)


@attrs.define
class World:
    trie: Trie
    document: np.ndarray
    sequences: list[np.ndarray]  # every conversation inserted, to draw prompts from
    build_s: float


def tail(rng: np.random.Generator, n: int | None = None) -> np.ndarray:
    n = int(rng.integers(*TAIL)) if n is None else n
    return rng.integers(0, VOCAB, n, dtype=np.int32)


def build(nodes: int, rng: np.random.Generator) -> World:
    """A trie of about `nodes` nodes and 10 tokens per node, shaped like a server's (see module doc)."""
    t = time.perf_counter()
    trie = Trie(split_payload, merge_payload)
    document = tail(rng, nodes)
    trie.add_child(trie.root, document, Payload.of(len(document)))
    for p in rng.integers(1, len(document), max(1, nodes // 1000)):
        insert(trie, np.concatenate([document[:p], tail(rng)]))
    # system prompts / few-shot headers that conversations start from
    sequences = [tail(rng, int(rng.integers(200, 400))) for _ in range(max(2, nodes // 1000))]
    for s in sequences:
        insert(trie, s)
    while trie.num_nodes < nodes:
        src = sequences[rng.integers(len(sequences))]
        cut = len(src) if rng.random() < CONTINUE else int(rng.integers(0, len(src) + 1))
        seq = np.concatenate([src[:cut], tail(rng)])
        insert(trie, seq)
        sequences.append(seq)
    return World(trie, document, sequences, time.perf_counter() - t)


def prompt(world: World, rng: np.random.Generator, new: int | None = None) -> np.ndarray:
    """50-300 tokens that follow a stored sequence and then diverge (mid-edge or at a node end)."""
    length = int(rng.integers(50, 301))
    src = world.sequences[rng.integers(len(world.sequences))]
    keep = int(rng.integers(1, min(len(src), length)))
    return np.concatenate([src[:keep], tail(rng, new if new is not None else length - keep)])


def timed(step: Callable[[int], object], repeat: int, undo: Callable[[object], None] | None = None) -> np.ndarray:
    """Microseconds of `step(i)` for i in range(repeat); `undo(result)` runs outside the clock."""
    out = np.empty(repeat)
    clock = time.perf_counter_ns
    for i in range(repeat):
        t = clock()
        r = step(i)
        out[i] = (clock() - t) / 1e3
        if undo is not None:
            undo(r)
    return out


def measure(world: World, rng: np.random.Generator, repeat: int) -> dict[str, np.ndarray]:
    """Per-operation latencies (µs) on `world`; the trie is back to its size after each op."""
    trie = world.trie
    nodes = [n for n, _ in trie.walk()]
    times: dict[str, np.ndarray] = {}

    prompts = [prompt(world, rng) for _ in range(repeat)]
    times["match"] = timed(lambda i: trie.match(prompts[i]), repeat)

    commits = [prompt(world, rng, new=20) for _ in range(repeat)]
    times["insert"] = timed(lambda i: insert(trie, commits[i]), repeat, lambda r: uninsert(trie, *r))

    long_edges = [n for n in nodes if len(n.tokens) > 1]
    picks = [long_edges[j] for j in rng.integers(len(long_edges), size=repeat)]
    cuts = [n.start + int(rng.integers(1, len(n.tokens))) for n in picks]
    times["split"] = timed(lambda i: trie.split(picks[i], cuts[i]), repeat, trie.merge)

    # LRU machinery: every node on the host tier, leaves evictable, keyed by construction order
    pager = Pager()
    for i, n in enumerate(nodes):
        n.last_used = i
        pager.index(n, n.is_leaf)
    clock = iter(range(len(nodes), 1 << 62))

    def reindex(node: Node) -> None:
        pager.unindex(node)
        if node.parent is not None:
            pager.index(node, node.is_leaf)

    leaves = [n for n in nodes if n.is_leaf]
    paths = [leaves[j].path()[-10:] for j in rng.integers(len(leaves), size=repeat)]

    def touch(i: int) -> None:
        now = next(clock)
        for node in paths[i]:
            node.last_used = now
            reindex(node)

    times["touch (path)"] = timed(touch, repeat)
    times["touch (path)"] /= 1  # whole path; its mean length is reported beside it
    world_path_len = float(np.mean([len(p) for p in paths]))

    def evict(_: int) -> tuple[Node, Node]:
        node = pager.next_eviction()
        pager.unindex(node)
        parent = node.parent
        trie.remove_leaf(node)
        reindex(parent)
        return node, parent

    def readd(r: tuple[Node, Node]) -> None:
        """Steady state: a new request brings the same tokens back as the most recent leaf."""
        node, parent = r
        leaf = trie.add_child(parent, node.tokens, node.payload)
        leaf.last_used = next(clock)
        reindex(parent)
        reindex(leaf)

    times["eviction"] = timed(evict, repeat, readd)
    times["_touch_path_len"] = np.array([world_path_len])
    return times


def document_match(world: World, rng: np.random.Generator, repeat: int) -> dict:
    """The whole document (+ a few new tokens) as one prompt, and the list -> array conversion."""
    query = np.concatenate([world.document, tail(rng, 5)])
    m = world.trie.match(query)
    assert m.length == len(world.document), (m.length, len(world.document))
    as_list = query.tolist()
    match_us = timed(lambda i: world.trie.match(query), repeat)
    convert_us = timed(lambda i: as_token_array(as_list), max(3, repeat // 5))
    check_us = timed(lambda i: as_token_array(query), repeat)
    return {
        "prompt tokens": len(query),
        "path nodes": len(m.path),
        "match median us": float(np.median(match_us)),
        "match p95 us": float(np.percentile(match_us, 95)),
        "as_token_array(list) median us": float(np.median(convert_us)),
        "as_token_array(int32 array) median us": float(np.median(check_us)),
    }


def run(args: argparse.Namespace) -> dict:
    sizes = sorted(int(s) for s in args.nodes.split(","))
    result: dict = {"machine": machine(), "config": vars(args), "sizes": {}, "latency_us": {}}
    for size in sizes:
        rng = np.random.default_rng(args.seed)
        gc.collect()
        gc.disable()  # a full collection over ~1M objects mid-build would only add noise
        world = build(size, rng)
        gc.enable()
        gc.freeze()  # the built trie is long-lived: keep it out of later collections, as a server would settle
        trie = world.trie
        depths = [d for _, d in trie.walk()]
        times = measure(world, rng, args.repeat)
        path_len = float(times.pop("_touch_path_len")[0])
        result["sizes"][size] = {
            "nodes": trie.num_nodes,
            "tokens": trie.num_tokens,
            "max depth": max(depths),
            "mean depth": float(np.mean(depths)),
            "touch path nodes (mean)": path_len,
            "build s": world.build_s,
        }
        for op, us in times.items():
            result["latency_us"].setdefault(op, {})[size] = {
                "median": float(np.median(us)),
                "p95": float(np.percentile(us, 95)),
            }
        if size == sizes[-1]:
            result["document"] = document_match(world, rng, max(20, args.repeat // 20))
        gc.unfreeze()
        del world, trie
    small, large = sizes[0], sizes[-1]
    doc = result["document"]
    result["targets"] = {
        f"matching a {doc['prompt tokens']:,}-token prompt against a {result['sizes'][large]['tokens']:,}-token trie < 2 ms": {
            "value ms": doc["match median us"] / 1e3,
            "verdict": verdict(doc["match median us"] < 2000),
        }
    }
    for op, by_size in result["latency_us"].items():
        ratio = by_size[large]["median"] / by_size[small]["median"]
        result["targets"][f"{op}: median latency at {large:,} nodes within 2x of {small:,} nodes"] = {
            "ratio": ratio,
            "verdict": verdict(ratio <= 2.0),
        }
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", default="1000,10000,100000", help="comma-separated trie sizes in nodes")
    p.add_argument("--repeat", type=int, default=2000, help="timed repetitions per operation and size")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    result = run(args)
    m = result["machine"]
    print(f"trie scale on {m['platform']}, {m['cpus']} CPUs (pure Python + numpy; payload copies not included, see paging.py)")
    sizes = list(result["sizes"])
    for s, info in result["sizes"].items():
        print(
            f"  {s:>7,} nodes: {info['nodes']:,} nodes, {info['tokens']:,} tokens, depth mean {info['mean depth']:.1f} "
            f"max {info['max depth']}, touch path {info['touch path nodes (mean)']:.1f} nodes, built in {info['build s']:.1f} s"
        )
    header = "".join(f"{f'{s:,} nodes':>20}" for s in sizes)
    print(f"\n{'µs, median / p95':<16}{header}{'ratio':>8}")
    for op, by_size in result["latency_us"].items():
        cells = "".join(f"{by_size[s]['median']:>10.1f} /{by_size[s]['p95']:>7.1f}" + " " * 1 for s in sizes)
        print(f"{op:<16}{cells}{by_size[sizes[-1]]['median'] / by_size[sizes[0]]['median']:>8.2f}")
    d = result["document"]
    print(
        f"\nmatch of the {d['prompt tokens']:,}-token document ({d['path nodes']} nodes on its path): "
        f"median {d['match median us'] / 1e3:.3f} ms, p95 {d['match p95 us'] / 1e3:.3f} ms"
    )
    print(f"  as_token_array of a Python list of {d['prompt tokens']:,} ints: {d['as_token_array(list) median us'] / 1e3:.2f} ms")
    print(f"  as_token_array of the int32 array (validation only): {d['as_token_array(int32 array) median us'] / 1e3:.3f} ms")
    print()
    for name, t in result["targets"].items():
        value = f"{t['value ms']:.3f} ms" if "value ms" in t else f"ratio {t['ratio']:.2f}"
        print(f"{name}: {value}: {t['verdict']}")
    print(f"saved {save('scale', result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
