"""Structural operations as the trie grows: match, insert, split, eviction and touch stay flat.

    python benchmarks/scale.py [--quick] [--nodes 1000,10000,100000 --repeat 2000 --seed 0]

Each size is built the same way, scaled: one document of `nodes` tokens stored as a
path that other requests branched off at `nodes / 1000` points, plus conversations under
`nodes / 1000` system prompts, each request copying a random prefix of an earlier one
and adding a 10-20 token tail, until the trie holds `nodes` nodes (about 1.2M tokens
at 100k nodes). Payloads are tiny stand-ins: copying real KV payloads is measured by
benchmarks/paging.py, not here.
Sizes are timed in interleaved blocks so that load changes on a shared machine hit all alike.
Targets: matching a prompt of the whole document (~100k tokens) against the largest trie < 2 ms,
and each operation's median latency at the largest size within 2x of the smallest's.
`--quick` is the full run (it takes seconds; fewer repetitions only made the ratios noisier).
Writes benchmarks/results/scale.json.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import sys
import time
from collections.abc import Callable
from typing import Any, Optional

import attrs
import numpy as np

from kvtrie.paging import Pager
from kvtrie.trie import Node, Trie, as_token_array

from common import machine, save, target

VOCAB = 100_000
TAIL = (10, 21)  # new tokens per request, [low, high)
TURNS = 30  # mean requests per conversation
CONTINUE = 0.45  # share of requests that extend the latest one (the next turn); the rest branch off
BLOCKS = 10  # each operation is timed in this many blocks per size, sizes taking turns


@attrs.frozen
class Op:
    """A timed operation: `step(i)` on the clock; `before(i)` and `undo(step's result)` off it."""

    step: Callable[[int], Any]
    undo: Optional[Callable[[Any], None]] = None
    before: Optional[Callable[[int], Any]] = None


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


def insert(trie: Trie, seq: np.ndarray) -> tuple[Node, Optional[Node]]:
    """What a commit does to the structure: match, split mid-edge, hang the new tail.

    Returns the new leaf and the upper node the split made (None when there was no split).
    """
    m = trie.match(seq)
    upper = trie.split(m.last, m.length) if m.ends_mid_edge else None
    parent = upper or m.last or trie.root
    return trie.add_child(parent, seq[m.length :], Payload.of(len(seq) - m.length)), upper


def uninsert(trie: Trie, leaf: Node, upper: Optional[Node]) -> None:
    """Undo `insert`, so that every repetition sees the same trie."""
    trie.remove_leaf(leaf)
    if upper is not None:
        trie.merge(upper)


def tokens(rng: np.random.Generator, n: Optional[int] = None) -> np.ndarray:
    """`n` random token ids (a 10-20 token request tail by default)."""
    n = int(rng.integers(*TAIL)) if n is None else n
    return rng.integers(0, VOCAB, n, dtype=np.int32)


@attrs.define
class World:
    trie: Trie
    document: np.ndarray
    sequences: list[np.ndarray]  # every conversation request inserted, to draw prompts from
    build_s: float


def build(nodes: int, rng: np.random.Generator) -> World:
    """A trie of `nodes` nodes shaped like a server's (see the module doc).

    Conversations are independent of each other, as on a server: a larger trie holds more
    of them, not deeper ones. Within one, a request extends the latest one (the next turn)
    or copies a random earlier request cut inside that request's own new tokens (a
    regenerated or edited message), and adds a 10-20 token tail.
    """
    t = time.perf_counter()
    trie = Trie(split_payload, merge_payload)
    document = tokens(rng, nodes)
    trie.add_child(trie.root, document, Payload.of(len(document)))
    for p in rng.integers(1, len(document), max(1, nodes // 1000)):
        insert(trie, np.concatenate([document[:p], tokens(rng)]))
    headers = [tokens(rng, int(rng.integers(20, 100))) for _ in range(max(2, nodes // 1000))]  # system prompts
    sequences: list[np.ndarray] = []
    while trie.num_nodes < nodes:
        header = headers[rng.integers(len(headers))]
        conversation, own = [header], [len(header)]  # own: where each request's new tokens start
        for _ in range(rng.geometric(1 / TURNS)):
            if rng.random() < CONTINUE:
                cut = len(src := conversation[-1])
            else:
                j = int(rng.integers(len(conversation)))
                src = conversation[j]
                cut = int(rng.integers(own[j], len(src) + 1))
            seq = np.concatenate([src[:cut], tokens(rng)])
            insert(trie, seq)
            conversation.append(seq)
            own.append(cut)
            if trie.num_nodes >= nodes:
                break
        sequences += conversation[1:]
    return World(trie, document, sequences, time.perf_counter() - t)


def prompt(world: World, rng: np.random.Generator) -> np.ndarray:
    """A stored request cut at a random point (mid-edge or at a node end), then 20 new tokens."""
    src = world.sequences[rng.integers(len(world.sequences))]
    return np.concatenate([src[: int(rng.integers(1, len(src) + 1))], tokens(rng, 20)])


def operations(world: World, rng: np.random.Generator, repeat: int) -> tuple[dict[str, Op], dict]:
    """The timed operations on `world`, their inputs drawn up front.

    Each undo puts the trie back as it was, so the size stays put however often a step runs.
    Eviction comes last: it replaces node objects that the earlier operations' inputs refer to.
    """
    trie = world.trie
    nodes = [n for n, _ in trie.walk()]
    ops: dict[str, Op] = {}

    prompts = [prompt(world, rng) for _ in range(repeat)]
    ops["match"] = Op(lambda i: trie.match(prompts[i]))

    commits = [prompt(world, rng) for _ in range(repeat)]
    ops["insert"] = Op(lambda i: insert(trie, commits[i]), lambda r: uninsert(trie, *r))

    long_edges = [n for n in nodes if len(n.tokens) > 1]
    picks = [long_edges[j] for j in rng.integers(len(long_edges), size=repeat)]
    cuts = [n.start + int(rng.integers(1, len(n.tokens))) for n in picks]
    ops["split"] = Op(lambda i: trie.split(picks[i], cuts[i]), trie.merge)

    # LRU machinery: every node on the host tier, leaves evictable, keyed by construction order
    pager = Pager()
    for i, n in enumerate(nodes):
        n.last_used = i
        pager.index(n, n.is_leaf)
    clock = itertools.count(len(nodes))

    def reindex(node: Node) -> None:
        pager.unindex(node)
        if node.parent is not None:
            pager.index(node, node.is_leaf)

    leaves = [n for n in nodes if n.is_leaf]
    paths = [leaves[j].path() for j in rng.integers(len(leaves), size=repeat)]

    def touch(i: int) -> None:
        """A request used this path: it becomes the most recent."""
        now = next(clock)
        for node in paths[i]:
            node.last_used = now
            reindex(node)

    # cold: as at a session's close, after the model's forward passes have flushed the CPU caches;
    # warm: as in begin(), right after the path was matched and restored
    ops["touch (cold)"] = Op(touch)
    ops["touch (warm)"] = Op(touch, before=touch)

    def evict(_: int) -> tuple[Node, Node]:
        node = pager.next_eviction()
        pager.unindex(node)
        parent = node.parent
        trie.remove_leaf(node)
        reindex(parent)  # it may have become an evictable leaf
        return node, parent

    def readd(r: tuple[Node, Node]) -> None:
        """Steady state: a later request brings the same tokens back, now the most recent leaf."""
        node, parent = r
        leaf = trie.add_child(parent, node.tokens, node.payload)
        leaf.last_used = next(clock)
        reindex(parent)
        reindex(leaf)

    ops["eviction"] = Op(evict, readd)
    info = {
        "prompt tokens (mean)": float(np.mean([len(q) for q in prompts])),
        "match path nodes (mean)": float(np.mean([len(trie.match(q).path) for q in prompts])),
        "evictable leaves": len(leaves),
        "touch path nodes (mean)": float(np.mean([len(p) for p in paths])),
    }
    return ops, info


def timed(op: Op, indices: range) -> list[float]:
    """Microseconds of `op.step(i)` for each i."""
    out = []
    clock = time.perf_counter_ns
    for i in indices:
        if op.before is not None:
            op.before(i)
        t = clock()
        r = op.step(i)
        out.append((clock() - t) / 1e3)
        if op.undo is not None:
            op.undo(r)
    return out


def document_match(world: World, rng: np.random.Generator, repeat: int) -> dict:
    """The whole document (+ a few new tokens) as one prompt, and turning it from a list into an array."""
    query = np.concatenate([world.document, tokens(rng, 5)])
    m = world.trie.match(query)
    assert m.length == len(world.document), (m.length, len(world.document))
    as_list = query.tolist()
    match_us = timed(Op(lambda i: world.trie.match(query)), range(repeat))
    convert_us = timed(Op(lambda i: as_token_array(as_list)), range(max(5, repeat // 4)))
    check_us = timed(Op(lambda i: as_token_array(query)), range(repeat))
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
    small, large = sizes[0], sizes[-1]
    result: dict = {"machine": machine(), "config": vars(args), "sizes": {}, "latency_us": {}}
    worlds, ops = {}, {}
    for size in sizes:
        rng = np.random.default_rng(args.seed)
        gc.disable()  # full collections over a million young objects would only slow the build
        worlds[size] = world = build(size, rng)
        gc.enable()
        ops[size], info = operations(world, rng, args.repeat)
        depths = [d for _, d in world.trie.walk()]
        result["sizes"][size] = {
            "nodes": world.trie.num_nodes,
            "tokens": world.trie.num_tokens,
            "mean depth": float(np.mean(depths)),
            "max depth": max(depths),
            "build s": world.build_s,
            **info,
        }
    gc.freeze()  # the tries are long-lived, as in a server: keep them out of the collections under the clock
    block = -(-args.repeat // BLOCKS)
    for name in ops[small]:
        samples: dict[int, list[float]] = {s: [] for s in sizes}
        for b in range(0, args.repeat, block):
            for size in sizes:
                samples[size] += timed(ops[size][name], range(b, min(b + block, args.repeat)))
        result["latency_us"][name] = {
            s: {"median": float(np.median(us)), "p95": float(np.percentile(us, 95))} for s, us in samples.items()
        }
    doc = result["document"] = document_match(worlds[large], np.random.default_rng(args.seed), max(20, args.repeat // 20))
    gc.unfreeze()

    ms = doc["match median us"] / 1e3
    result["targets"] = [target(f"matching a {doc['prompt tokens']:,}-token prompt against a "
                                f"{result['sizes'][large]['tokens']:,}-token trie, median ms", ms, "< 2", ms < 2)]
    for op, by_size in result["latency_us"].items():
        ratio = by_size[large]["median"] / by_size[small]["median"]
        result["targets"].append(target(f"{op}: median latency at {large:,} nodes / at {small:,} nodes", ratio, "<= 2", ratio <= 2.0))
    return result


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", default="1000,10000,100000", help="comma-separated trie sizes, in nodes")
    p.add_argument("--quick", action="store_true", help="the full run (it takes seconds); for make bench's uniformity")
    p.add_argument("--repeat", type=int, default=2000, help="timed repetitions per operation and size")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    result = run(args)
    m = result["machine"]
    print(f"trie scale on {m['platform']}, {m['cpus']} CPUs: pure Python + numpy, stand-in payloads")
    print("(payload copies are not part of these figures: benchmarks/paging.py measures them)")
    sizes = list(result["sizes"])
    for s, info in result["sizes"].items():
        print(
            f"  {info['nodes']:>7,} nodes, {info['tokens']:>9,} tokens, built in {info['build s']:4.1f} s: depth mean "
            f"{info['mean depth']:.1f} max {info['max depth']}, {info['evictable leaves']:,} leaves; prompts of "
            f"{info['prompt tokens (mean)']:.0f} tokens match {info['match path nodes (mean)']:.1f} nodes"
        )
    print(f"\n{'µs, median / p95':<16}" + "".join(f"{f'{s:,} nodes':>18}" for s in sizes) + f"{'ratio':>8}")
    for op, by_size in result["latency_us"].items():
        cells = "".join(f"{by_size[s]['median']:>10.1f} /{by_size[s]['p95']:>6.1f}" for s in sizes)
        print(f"{op:<16}{cells}{by_size[sizes[-1]]['median'] / by_size[sizes[0]]['median']:>8.2f}")
    print(
        f"(touch: re-index a path of {result['sizes'][sizes[-1]]['touch path nodes (mean)']:.1f} nodes, cold or just used; "
        "eviction: next_eviction + unindex + remove_leaf + re-index of the parent)"
    )
    d = result["document"]
    print(
        f"\nmatch of the {d['prompt tokens']:,}-token document ({d['path nodes']} nodes on its path): "
        f"median {d['match median us'] / 1e3:.3f} ms, p95 {d['match p95 us'] / 1e3:.3f} ms"
    )
    print(f"  as_token_array of it as a Python list of ints: {d['as_token_array(list) median us'] / 1e3:.2f} ms")
    print(f"  as_token_array of it as an int32 array (validation only): {d['as_token_array(int32 array) median us'] / 1e3:.3f} ms")
    print("\ntargets:")
    for t in result["targets"]:
        print(f"  {t['verdict']:<11} {t['target']}: {t['measured']:.3f} (goal {t['goal']})")
    print(f"saved {save('scale', result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
