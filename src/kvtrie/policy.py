"""Which recurrent snapshots to take and keep, and in which order payloads page out and go.

At real model sizes a recurrent snapshot costs the KV of thousands of tokens (Qwen3-Next-80B:
~74 MiB, the bf16 KV of ~3,100 tokens), so snapshots must pay for themselves. Ideas from
Marconi (MLSys 2025): admit states only where reuse is likely, and evict by the prefill saved
per byte as well as by recency.

`WorthPolicy` (the default):
- *plan*: a request snapshots where it diverges from the trie (a branch point), at the
  caller's hints (message ends), at its prompt end (with the last logits, so a regenerate
  restores the whole prompt), and, over a long stretch of new territory, guesses at future
  branch points: every `interval` tokens and, denser, 16, 22, 32, 45, 64, 90, 128, 181 tokens before
  the prompt's end (where the last message starts). Its commit adds the sequence end.
- *worth* of a payload: the prefill it saves (tokens back to the previous snapshot on its
  path, or its edge for KV) per byte, times how likely it is to be restored again: sequence
  ends (leaves) and branch points are proven (1.0), hints too; prompt ends and former
  sequence ends are likely (0.5); periodic guesses less so (0.25).
- *order*: GreedyDual-Size (Cao & Irani, 1997): a payload's priority is the inflation value
  `L` at its last use plus its worth, and `L` rises to the priority of each payload that
  moves down or goes. Among payloads of equal worth that is exactly LRU; a payload that saves
  more per byte outlives less useful ones used a little later.
- *retention* without memory pressure: a snapshot that is not proven stays while it earns
  its keep (likelihood x tokens saved x KV bytes per token >= a tenth of its bytes: always at
  tiny sizes; at real ones a hint or prompt end that saves hundreds of tokens, e.g. a shared
  document's end). The others are young: held to an allowance of `speculative_ratio` x the
  bytes of the other snapshots (at least `young_floor` snapshots), least valuable first. A
  newly proven branch point supersedes what it makes redundant just above it. A byte
  budget replaces the allowance: speculative snapshots then stay until the budget needs
  their bytes.

`LRUPolicy` is kvtrie before snapshots had worth (an ablation, and for users who want plain
LRU): snapshots at the divergence point, `len - 1`, hints and every `interval` tokens, kept
until evicted in least-recently-used order.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from collections.abc import Set as AbstractSet
from typing import Any, Optional

import attrs
from sortedcontainers import SortedList

# why a snapshot was taken (flags; a node may have several)
END = 1  # a sequence end (commit)
BRANCH = 2  # where a request diverged from a stored path
HINT = 4  # a caller's capture hint (e.g. a message end)
PROMPT = 8  # a prompt's end (with its last logits when the caller gives them)
PERIODIC = 16  # every `interval` tokens of new territory

NEAR = 8  # a divergence this close below a restorable snapshot is not worth one of its own
CHUNK = 256  # positions per stored run (the shared tier's block size)
DEAD_AFTER = 1.5  # a payload not used again within this many of its expected intervals is presumed dead
REASON_NAMES = {END: "end", BRANCH: "branch", HINT: "hint", PROMPT: "prompt", PERIODIC: "periodic"}
_LIKELIHOOD = {BRANCH: 1.0, HINT: 1.0, END: 0.5, PROMPT: 0.5, PERIODIC: 0.25}


@attrs.frozen
class PlanRequest:
    """What a `begin` knows when it plans captures."""

    path: tuple[Any, ...]  # matched nodes, root excluded
    matched: int  # tokens matched in the trie
    cached: int  # tokens restored
    n: int  # prompt length
    hints: tuple[int, ...]
    logits: bool  # the caller captures the prompt end with its last logits
    at_leaf_end: bool  # the match ends exactly at a stored sequence's end (a continuation)


def _structural(node: Any) -> bool:
    return node.is_leaf or len(node.children) >= 2


def is_guess(node: Any) -> bool:
    """The node's snapshot is only a periodic guess (not proven by the trie's shape either)."""
    return node.payload.reasons == PERIODIC and not _structural(node)


def is_proven(node: Any) -> bool:
    """A sequence end, a branch point, or a snapshot standing in for one."""
    return _structural(node) or bool(node.payload.reasons & BRANCH)


def previous_snapshot(node: Any, skip: Callable[[Any], bool] = lambda n: False) -> int:
    """The end of the nearest ancestor that holds a full state (0: the root), passing over the
    snapshots `skip` says may soon go."""
    parent = node.parent
    while parent is not None and parent.parent is not None:
        if parent.payload.has_state and not skip(parent):
            return parent.end
        parent = parent.parent
    return 0


class WorthPolicy:
    """Snapshots by expected worth per byte; GreedyDual-Size order for page-out and eviction."""

    name = "worth"

    def __init__(
        self,
        interval: Optional[int] = 256,
        max_periodic: int = 32,
        speculative_ratio: float = 0.4,
        young_floor: int = 2,
    ):
        self.interval = interval
        self.max_periodic = max_periodic
        self.speculative_ratio = speculative_ratio
        self.young_floor = young_floor
        self.keep_fraction = 0.1
        self.hybrid = False  # set by the cache: some layer keeps a whole state
        self.kv_bytes_per_token = 0.0  # learned from the first stored KV payload
        self.snapshot_bytes = 0  # the largest snapshot seen (the floor's unit)
        self.bounded = False  # a byte budget is set: it, not the allowance, bounds speculation
        self.inflation = 0.0
        self.now = 0  # the storage's clock at its last use of a node
        self._intervals = SortedList()  # (measured reuse interval, node id) of the stored nodes used again
        self._interval_of: dict[int, float] = {}
        self._young = SortedList()  # order keys of the young speculative snapshots, least valuable first
        self._young_entries: dict[int, tuple[Any, tuple, int]] = {}  # id -> (node, key, snapshot bytes)
        self.young_bytes = 0

    # --- planning ---------------------------------------------------------------------------

    def plan(self, r: PlanRequest) -> tuple[tuple[int, int], ...]:
        """Offsets in `(cached, n]` to snapshot during this prefill, each with its reasons."""
        if not self.hybrid:
            return ()
        last = r.n if r.logits else r.n - 1
        points: dict[int, int] = {}

        def add(p: int, reason: int) -> None:
            if r.cached < p <= last:
                points[p] = points.get(p, 0) | reason

        if r.matched < r.n and not r.at_leaf_end and r.matched - r.cached >= NEAR:
            add(r.matched, BRANCH)  # (a snapshot just above serves as well, for a few tokens' prefill)
        for h in r.hints:
            add(h, HINT)
        add(last, PROMPT)
        start = max(r.cached, r.matched)
        if self.interval is not None and r.n - start >= self.interval:  # a long stretch of new territory
            # guesses only where no real boundary (a hint, the divergence point, the prompt end)
            # lies within `interval` below: every `interval` tokens, and denser near the prompt's
            # end, where a last message starts, unless a hint already marks it
            real = [p for p in points if start < p < last]
            first = (start // self.interval + 1) * self.interval
            guesses = set(range(first, r.n, self.interval))
            if not any(r.n - self.interval <= p for p in real):
                step = 16.0
                while r.n - int(step) > start and step < self.interval:
                    guesses.add(r.n - int(step))
                    step *= 2**0.5
            guesses = {g for g in guesses if not any(g < p < g + self.interval for p in real)}
            for p in sorted(guesses, reverse=True)[: self.max_periodic]:
                add(p, PERIODIC)
        return tuple(sorted(points.items()))

    # --- worth and order --------------------------------------------------------------------

    is_guess = staticmethod(is_guess)
    is_proven = staticmethod(is_proven)

    def likelihood(self, node: Any) -> float:
        """How likely the snapshot at `node`'s end is to be restored again (1.0: proven)."""
        if _structural(node):
            return 1.0
        reasons = node.payload.reasons
        return max((w for flag, w in _LIKELIHOOD.items() if reasons & flag), default=0.25)

    def saved(self, node: Any) -> int:
        """Tokens of prefill this node's payload saves: back to the previous snapshot for a
        node holding one in a hybrid model, else its edge."""
        if self.hybrid and node.payload.has_state:
            # a snapshot's worth is not diminished by weaker ones above it, which may soon go:
            # a proven one looks past every unproven one, a hint or prompt end past guesses
            if is_proven(node):
                skip = lambda n: not is_proven(n)  # noqa: E731
            elif is_guess(node):
                skip = lambda n: False  # noqa: E731
            else:
                skip = is_guess
            return node.end - previous_snapshot(node, skip)
        return node.end - node.start

    def worth(self, node: Any) -> float:
        """Prefill saved per byte, weighted by likelihood (a node's whole payload)."""
        nbytes = node.payload.nbytes
        if nbytes <= 0:
            return float("inf")
        weight = self.likelihood(node) if self.hybrid and node.payload.has_state else 1.0
        return weight * self.saved(node) / nbytes

    def key(self, node: Any) -> tuple:
        """Sort key of the page-out and eviction orders: the smallest moves or goes first.

        Hybrid models: speculative snapshots (likely to be restored, not proven: prompt ends,
        former sequence ends, guesses) come before everything else; within each class,
        GreedyDual-Size. Per-token payloads only (every byte saves the same prefill): the
        furthest expected next use goes first (last use + the interval expected then; see
        `reused`), among equals the least recently used; past `deadline` a payload goes before
        all of these. Where sequences come back at regular intervals (a round of users larger
        than the budget) this keeps a fixed subset instead of losing each just before its turn.
        """
        if not self.hybrid:
            return (-(node.last_used + node.payload.expect), -node.last_used, -node.start, node.id)
        return (not self.speculative(node), node.payload.base + self.worth(node), node.last_used, -node.start, node.id)

    @property
    def chunk_tokens(self) -> int:
        """New sequences are stored as runs of at most this many positions (0: one node per run),
        so that eviction, leaf first, takes a sequence's least useful part, its tail, a chunk at a
        time: the prefix stays restorable (per-token payloads only)."""
        return 0 if self.hybrid else CHUNK

    @property
    def admits(self) -> bool:
        """New sequences are admitted only where they are worth more than what they would push
        out: an open session's own new leaf takes its place in the order (it blocks), so a
        commit never evicts what is worth more, and the leaf itself goes when its session
        closes (per-token payloads only; hybrid models keep GreedyDual's order as it was)."""
        return not self.hybrid

    def deadline(self, node: Any) -> float:
        """When a payload unused since its last use is presumed dead (goes first): `DEAD_AFTER`
        of its expected intervals later. Never for hybrid models (their order is `key`'s alone)."""
        if self.hybrid:
            return math.inf
        return node.last_used + DEAD_AFTER * node.payload.expect

    @property
    def typical(self) -> float:
        """The median reuse interval of the stored nodes that were used again: how long a payload
        never used again yet is expected to wait (infinite before any reuse)."""
        n = len(self._intervals)
        return self._intervals[n // 2][0] if n else math.inf

    def reused(self, node: Any, now: int) -> None:
        """`node` is restored from at `now`: its reuse interval is measured (a running mean of the gaps)."""
        self.recalled(node, now - node.last_used)

    def recalled(self, node: Any, gap: float) -> None:
        """`node`'s positions were used `gap` ticks before this use (restored from it, or, stored
        anew, remembered by the history after their payloads went)."""
        data = node.payload
        data.interval = gap if not data.interval else (data.interval + gap) / 2
        self.gone(node)
        self._intervals.add((data.interval, node.id))
        self._interval_of[node.id] = data.interval

    def gone(self, node: Any) -> None:
        """`node` left the trie (evicted, merged away): its interval no longer counts."""
        interval = self._interval_of.pop(node.id, None)
        if interval is not None:
            self._intervals.remove((interval, node.id))

    def speculative(self, node: Any) -> bool:
        """The node's snapshot may be restored, but nothing proved it will (a prompt end, a former
        sequence end, a guess, a hint within a short stretch; not a sequence end or a branch
        point, nor a snapshot standing in for one): under memory pressure these go first."""
        data = node.payload
        if not self.hybrid or not data.has_snapshot or _structural(node) or data.reasons & BRANCH:
            return False
        # a hint at the end of a long shared stretch (a system prompt, a document) is as good as proven
        return not (data.reasons & HINT and self.interval is not None and self.saved(node) >= self.interval)

    def touched(self, node: Any) -> None:
        """A node was restored or written: its priority restarts from the current inflation, and
        it is expected back after its measured interval (or the typical one, never reused yet)."""
        data = node.payload
        data.base = self.inflation
        data.expect = data.interval or self.typical

    def removed(self, node: Any) -> None:
        """A node moved down a tier or lost a payload: inflation rises to its priority."""
        self.inflation = max(self.inflation, self.key(node)[1])

    # --- retention --------------------------------------------------------------------------

    def pays(self, node: Any) -> bool:
        """A snapshot earns its keep: the prefill it is expected to save is worth at least
        `keep_fraction` of what its bytes would save as KV (always so at tiny sizes; at real
        ones, a hint or prompt end that saves hundreds of tokens)."""
        expected = self.likelihood(node) * self.saved(node) * self.kv_bytes_per_token
        return expected >= self.keep_fraction * node.payload.snapshot_nbytes

    def settle(
        self,
        path: Sequence[Any],
        created: set[int],
        snapshot_bytes: Callable[[], int],
        drop: Callable[[Any], None],
        proven: AbstractSet[int] = frozenset(),
    ) -> None:
        """After a commit along `path` (which took the snapshots of the nodes in `created`, and
        proved the branch points in `proven`): drop the speculative snapshots that no longer
        earn their bytes, through `drop(node)`.

        - A branch point this commit proved supersedes the periodic guesses above it (back
          to the nearest snapshot that is not a guess), all but the deepest, which still
          serves requests that diverge just above the branch.
        - Snapshots that are not proven and do not pay for themselves are young; they are
          held to the allowance (`speculative_ratio` x the other snapshots' bytes, at least
          `young_floor` snapshots), least valuable first, unless a byte budget bounds memory
          instead. This commit's prompt end and periodic guesses are spared until the next
          commit (the guesses do not count against the allowance until then): the request
          after this one is the likeliest to regenerate the answer or branch off this new path.
        """
        if not self.hybrid:
            return
        for node in path:
            data = node.payload
            if data.has_state:
                self.snapshot_bytes = max(self.snapshot_bytes, data.snapshot_nbytes)
                if node.id in proven:
                    for guess in self._superseded(node):
                        drop(guess)
        for node in path:
            if not node.payload.has_state or _structural(node) or self.pays(node):
                self.forget(node)
            else:
                self._add_young(node)
        if self.bounded:
            return
        # this commit's prompt end and guesses are spared; the guesses do not even count yet
        probation = {node.id for node in path if node.id in created and not node.payload.reasons & ~(PROMPT | PERIODIC)}
        waiting = sum(e[2] for i in probation if (e := self._young_entries.get(i)) and e[0].payload.reasons == PERIODIC)
        while True:
            held = self.young_bytes - waiting
            allowance = max(
                self.young_floor * self.snapshot_bytes, self.speculative_ratio * (snapshot_bytes() - self.young_bytes)
            )
            victim = next((self._young_entries[k[-1]][0] for k in self._young if k[-1] not in probation), None)
            if held <= allowance or victim is None:
                return
            self.removed(victim)  # GreedyDual: what stays young ages against what comes next
            drop(victim)  # forgets it; the snapshots below it are re-keyed (they now save more)

    def stand_in(self, path: Sequence[Any], resumed: int) -> Optional[Any]:
        """The snapshot a request resumed from, fewer than `NEAR` tokens above the branch point
        its commit made (which took no snapshot of its own), now serves as that branch point:
        returns its node, whose worth changed, or None."""
        if not self.hybrid:
            return None
        used = next((node for node in path if node.end == resumed and node.payload.has_state), None)
        branch = next((node for node in path if node.end > resumed and len(node.children) >= 2), None)
        if used is None or branch is None or branch.end - resumed >= NEAR or branch.payload.has_state:
            return None
        used.payload.reasons |= BRANCH
        return used

    def _superseded(self, branch: Any) -> list[Any]:
        """The periodic guesses a newly proven branch point makes redundant: those above it back
        to the nearest real boundary, but the deepest (it still serves requests that diverge
        just above the branch)."""
        guesses = []
        node = branch.parent
        while node is not None and node.parent is not None:
            if node.payload.has_state:
                if not is_guess(node):
                    break
                guesses.append(node)
            node = node.parent
        return guesses[1:]

    def _add_young(self, node: Any) -> None:
        self.forget(node)
        # least valuable first; among equals, the shallower goes first (dropping it makes the one
        # below it worth more, dropping the deeper one makes nothing worth more)
        key = (node.payload.base + self.worth(node), node.last_used, node.start, node.id)
        nbytes = node.payload.snapshot_nbytes
        self._young.add(key)
        self._young_entries[node.id] = (node, key, nbytes)
        self.young_bytes += nbytes

    def rekey(self, node: Any) -> None:
        """`node` changed (used, moved, its neighbours' snapshots): refresh its place among the young."""
        entry = self._young_entries.get(node.id)
        if entry is not None:
            self.forget(node)
            self._add_young(node)

    def forget(self, node: Any) -> None:
        """`node`'s snapshot is no longer young speculation (dropped, evicted, proven or passed)."""
        entry = self._young_entries.pop(node.id, None)
        if entry is not None:
            _, key, nbytes = entry
            self._young.remove(key)
            self.young_bytes -= nbytes

    def describe(self) -> dict[str, Any]:
        return {
            "policy": self.name,
            "snapshot_interval": self.interval,
            "speculative_ratio": self.speculative_ratio,
            "young_snapshots": len(self._young),
            "young_bytes": self.young_bytes,
        }


class LRUPolicy(WorthPolicy):
    """Plain least-recently-used order; snapshots at divergence, `len - 1`, hints and every interval, never thinned."""

    name = "lru"

    def plan(self, r: PlanRequest) -> tuple[tuple[int, int], ...]:
        if not self.hybrid:
            return ()
        points = {r.matched: BRANCH, r.n - 1: PROMPT, **{h: HINT for h in r.hints}}
        if self.interval is not None:
            room = self.max_periodic - sum(1 for node in r.path if node.end <= r.cached and node.payload.has_state)
            first = (r.cached // self.interval + 1) * self.interval
            points.update({p: PERIODIC for p in itertools.islice(range(first, r.n, self.interval), max(room, 0))})
        return tuple(sorted((p, why) for p, why in points.items() if r.cached < p < r.n))

    def key(self, node: Any) -> tuple:
        return (True, 0.0, node.last_used, -node.start, node.id)

    def deadline(self, node: Any) -> float:
        return math.inf

    admits = False
    chunk_tokens = 0

    def reused(self, node: Any, now: int) -> None:
        pass

    def recalled(self, node: Any, gap: float) -> None:
        pass

    def gone(self, node: Any) -> None:
        pass

    def speculative(self, node: Any) -> bool:
        return False

    def touched(self, node: Any) -> None:
        pass

    def removed(self, node: Any) -> None:
        pass

    def settle(self, path, created, snapshot_bytes, drop, proven=frozenset()) -> None:
        pass

    def rekey(self, node: Any) -> None:
        pass


POLICIES = {"worth": WorthPolicy, "lru": LRUPolicy}
