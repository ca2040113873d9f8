"""A radix trie over token ids whose nodes carry opaque per-node payloads.

Each node owns an edge: the tokens `[start, end)` of every sequence that passes
through it. Children are keyed by their first token. The trie knows nothing about
what a payload is; splitting and merging payloads is delegated to two callables, so
this module stays pure Python + numpy (it never imports mlx).
"""

from __future__ import annotations

import array
import itertools
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Optional, Union

import attrs
import numpy as np


def common_prefix(a: Any, b: Any) -> int:
    """Length of the longest common prefix of two token sequences (lists or arrays)."""
    n = min(len(a), len(b))
    diff = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(diff[0]) if len(diff) else n


TOKEN_DTYPE = np.int32

Tokens = Union[Sequence[int], np.ndarray]  # token ids: ints, or a 1-D integer array (see `as_token_array`)

SplitFn = Callable[[Any, int], tuple[Any, Any]]
MergeFn = Callable[[Any, Any], Any]


class Node:
    """One edge of the trie: `tokens` spanning positions `[start, end)`, plus a payload."""

    __slots__ = ("children", "id", "last_used", "parent", "payload", "pins", "start", "tokens")

    def __init__(self, node_id: int, tokens: np.ndarray, start: int, parent: Optional[Node], payload: Any):
        self.id = node_id
        self.tokens = tokens
        self.start = start
        self.parent = parent
        self.children: dict[int, Node] = {}
        self.payload = payload
        self.pins = 0
        self.last_used = 0

    @property
    def end(self) -> int:
        return self.start + len(self.tokens)

    @property
    def up(self) -> Node:
        """The parent of a node other than the root (asking the root is an error)."""
        if self.parent is None:
            raise ValueError("the root has no parent")
        return self.parent

    @property
    def is_root(self) -> bool:
        return self.parent is None

    @property
    def is_leaf(self) -> bool:
        return not self.children

    def path(self) -> list[Node]:
        """Nodes from the root's first child down to this node (empty for the root)."""
        out = []
        node: Optional[Node] = self
        while node is not None and node.parent is not None:
            out.append(node)
            node = node.parent
        out.reverse()
        return out

    def __repr__(self) -> str:
        return f"Node(id={self.id}, [{self.start}, {self.end}), children={len(self.children)}, pins={self.pins})"


@attrs.frozen
class Match:
    """Result of a longest-prefix match.

    `path` holds every node whose edge the query entered, root excluded; `length` is
    the number of query tokens matched. The last node may be matched only partly
    (`length < path[-1].end`), i.e. the match may end mid-edge.
    """

    path: tuple[Node, ...]
    length: int

    @property
    def last(self) -> Optional[Node]:
        return self.path[-1] if self.path else None

    @property
    def ends_mid_edge(self) -> bool:
        return bool(self.path) and self.length < self.path[-1].end


def _identity_split(payload: Any, k: int) -> tuple[Any, Any]:
    return payload, payload


def _identity_merge(upper: Any, lower: Any) -> Any:
    return lower


# shared by every trie: a node's id is unique in the process (the orders, pins and records key
# nodes by it, across namespaces)
_NODE_IDS = itertools.count()
_TOKEN_MAX = int(np.iinfo(TOKEN_DTYPE).max)
_TOKEN_CODE = next(code for code in "ilh" if array.array(code).itemsize == np.dtype(TOKEN_DTYPE).itemsize)


def as_token_array(tokens: Any) -> np.ndarray:
    """Validate `tokens` (a non-empty 1-D sequence of non-negative ints) and return an int32 array."""
    if type(tokens) is list and tokens:  # the common case: a list of plain ints
        try:  # (array.array refuses non-integers and values past int32, in C; bools pass as 0/1)
            arr = np.frombuffer(array.array(_TOKEN_CODE, tokens), TOKEN_DTYPE)
        except (TypeError, OverflowError):
            arr = None  # the checks below say why
        lo = int(arr.min()) if arr is not None else -1
        if arr is not None and (lo > 1 or (lo >= 0 and bool not in set(map(type, tokens)))):
            return arr
    if isinstance(tokens, (str, bytes)):
        raise TypeError(f"tokens must be a sequence of integer token ids, got {type(tokens).__name__}")
    if isinstance(tokens, np.ndarray):
        arr = tokens
    else:
        try:
            seq = tokens if isinstance(tokens, list) else list(tokens)
        except TypeError:
            raise TypeError(f"tokens must be a sequence of integer token ids, got {type(tokens).__name__}") from None
        for kind in set(map(type, seq)):  # one pass in C; usually just {int}
            if issubclass(kind, (bool, np.bool_)) or not issubclass(kind, (int, np.integer)):
                bad = next(t for t in seq if type(t) is kind)
                raise TypeError(f"token ids must be integers, got {bad!r} of type {kind.__name__}")
        try:
            arr = np.asarray(seq, dtype=np.int64) if seq else np.zeros(0, dtype=np.int64)
        except OverflowError:
            raise ValueError("token ids must fit in int32") from None
    if arr.ndim != 1:
        raise ValueError(f"tokens must be one-dimensional, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError("tokens must not be empty: pass at least one token id")
    if not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"token ids must be integers, got an array of dtype {arr.dtype}")
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0:
        raise ValueError(f"token ids must be non-negative, got {lo}")
    if hi > _TOKEN_MAX:
        raise ValueError(f"token ids must fit in int32, got {hi}")
    return np.ascontiguousarray(arr, dtype=TOKEN_DTYPE)


class Trie:
    """Radix trie over token ids with longest-prefix match, insert, split, merge and remove.

    `split_payload(payload, k)` must return the payloads of the first `k` edge tokens
    and of the rest; `merge_payload(upper, lower)` the payload of the joined edge.
    """

    def __init__(self, split_payload: SplitFn = _identity_split, merge_payload: MergeFn = _identity_merge):
        self._ids = _NODE_IDS
        self.root = Node(next(self._ids), np.zeros(0, dtype=TOKEN_DTYPE), 0, None, None)
        self._split_payload = split_payload
        self._merge_payload = merge_payload
        self.num_nodes = 0  # excluding the root
        self.num_tokens = 0  # tokens on all edges
        self.num_leaves = 0  # stored sequences no other extends

    # --- queries -------------------------------------------------------------------

    def match(self, tokens: np.ndarray) -> Match:
        """Longest prefix of `tokens` spelled by a root path (may end mid-edge)."""
        tokens = np.asarray(tokens, dtype=TOKEN_DTYPE)  # no copy for as_token_array's output
        path: list[Node] = []
        node = self.root
        pos, n = 0, len(tokens)
        while pos < n:
            child = node.children.get(int(tokens[pos]))
            if child is None:
                break
            edge = child.tokens
            k = min(len(edge), n - pos)
            path.append(child)
            edge_part, query = edge[:k], tokens[pos : pos + k]
            if edge_part.tobytes() != query.tobytes():  # a memcmp: cheaper than np.array_equal
                pos += int(np.argmax(edge_part != query))  # first mismatch
                break
            pos += k
            if k < len(edge):
                break
            node = child
        return Match(tuple(path), pos)

    def walk(self) -> Iterator[tuple[Node, int]]:
        """Every non-root node with its depth (1 = child of the root), parents before children."""
        stack = [(c, 1) for c in reversed(self._sorted_children(self.root))]
        while stack:
            node, depth = stack.pop()
            yield node, depth
            stack.extend((c, depth + 1) for c in reversed(self._sorted_children(node)))

    @staticmethod
    def _sorted_children(node: Node) -> list[Node]:
        return [node.children[k] for k in sorted(node.children)]

    # --- mutations -----------------------------------------------------------------

    def add_child(self, parent: Node, tokens: np.ndarray, payload: Any) -> Node:
        """Hang a new leaf with edge `tokens` under `parent`; its first token must be new there."""
        if len(tokens) == 0:
            raise ValueError("a new node needs at least one token")
        first = int(tokens[0])
        if first in parent.children:
            raise ValueError(f"parent already has a child starting with token {first}; split or extend it instead")
        node = Node(next(self._ids), np.array(tokens, dtype=TOKEN_DTYPE, copy=True), parent.end, parent, payload)
        self.num_leaves += parent.is_root or not parent.is_leaf  # else the parent stops being a leaf
        parent.children[first] = node
        self.num_nodes += 1
        self.num_tokens += len(tokens)
        return node

    def split(self, node: Node, at: int) -> Node:
        """Split `node`'s edge at absolute position `at`; returns the new upper node.

        The upper node takes the first `at - start` tokens and the lower part of the
        payload keeps `node`'s identity, children, pins and recency.
        """
        if node.is_root or not (node.start < at < node.end):
            raise ValueError(f"split position {at} must lie strictly inside [{node.start}, {node.end})")
        k = at - node.start
        upper_payload, lower_payload = self._split_payload(node.payload, k)
        parent = node.up
        upper = Node(next(self._ids), node.tokens[:k].copy(), node.start, parent, upper_payload)
        upper.pins = node.pins
        upper.last_used = node.last_used
        parent.children[int(node.tokens[0])] = upper
        node.tokens = node.tokens[k:].copy()
        node.start = at
        node.parent = upper
        node.payload = lower_payload
        upper.children[int(node.tokens[0])] = node
        self.num_nodes += 1
        return upper

    def merge(self, node: Node) -> Node:
        """Fold `node` into its only child; the child survives and now starts at `node.start`."""
        if node.is_root or len(node.children) != 1:
            raise ValueError(
                f"only a non-root node with exactly one child can merge, {node!r} has {len(node.children)}"
            )
        if node.pins:
            raise ValueError(f"{node!r} is pinned by an open session and cannot merge")
        (child,) = node.children.values()
        child.payload = self._merge_payload(node.payload, child.payload)
        child.tokens = np.concatenate([node.tokens, child.tokens])
        child.start = node.start
        child.parent = node.up
        node.up.children[int(child.tokens[0])] = child
        node.parent = None
        node.children = {}
        self.num_nodes -= 1
        return child

    def remove_leaf(self, node: Node) -> None:
        """Detach a leaf from the trie."""
        if node.is_root or node.children:
            raise ValueError(f"only a leaf can be removed, {node!r} has children")
        if node.pins:
            raise ValueError(f"{node!r} is pinned by an open session and cannot be removed")
        parent = node.up
        del parent.children[int(node.tokens[0])]
        self.num_leaves -= parent.is_root or not parent.is_leaf  # else the parent becomes a leaf
        node.parent = None
        self.num_nodes -= 1
        self.num_tokens -= len(node.tokens)
