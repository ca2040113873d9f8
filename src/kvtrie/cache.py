"""PrefixCache: the facade that ties the trie, the layer payloads and the sessions together.

A request calls `begin(tokens)`, runs the model over `tokens[session.cached:]` on
`session.caches`, then `session.commit(tokens)`; only the tokens the trie did not hold
yet are stored, as new nodes or edge splits. Every public method takes one lock, so a
PrefixCache may be shared by several threads; the model itself runs outside the lock.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Optional

import attrs
import mlx.core as mx
import numpy as np

from .errors import CacheMismatchError, SessionError
from .snapshot import KVPayload, KVSignature, capture_kv, evaluate, kv_signature, merge_kv, split_kv, stitch_kv
from .trie import Match, Node, Trie, as_token_array

logger = logging.getLogger("kvtrie")

DEVICE = "device"


@attrs.define(slots=True, eq=False)
class NodeData:
    """Everything a node stores: one payload per model layer, and the tier it lives in."""

    layers: tuple[KVPayload, ...]
    tier: str = DEVICE

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.layers)


def _split_data(data: NodeData, k: int) -> tuple[NodeData, NodeData]:
    pairs = [split_kv(p, k) for p in data.layers]
    evaluate(p for pair in pairs for p in pair)
    return NodeData(tuple(a for a, _ in pairs), data.tier), NodeData(tuple(b for _, b in pairs), data.tier)


def _merge_data(upper: NodeData, lower: NodeData) -> NodeData:
    merged = tuple(merge_kv(a, b) for a, b in zip(upper.layers, lower.layers))
    evaluate(merged)
    return NodeData(merged, lower.tier)


class Session:
    """One request's view of the cache: restored live caches, pinned path, one commit.

    `cached` tokens were restored into `caches` (at most `len(tokens) - 1`, so the
    caller always has logits to compute). Use as a context manager: the path stays
    pinned (never evicted) until the session closes.
    """

    def __init__(self, owner: "PrefixCache", namespace: str, tokens: np.ndarray, cached: int, caches: list, leaf: Optional[Node]):
        self._owner = owner
        self.namespace = namespace
        self.tokens = tokens
        self.cached = cached
        self.caches: Optional[list] = caches
        self._leaf = leaf
        self._committed = False
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def committed(self) -> bool:
        return self._committed

    def commit(self, tokens: Sequence[int], caches: Optional[list] = None) -> int:
        """Store the state of `tokens` held by `caches` (default: this session's); returns tokens added.

        The caches' offsets must equal `len(tokens)` and `tokens` must begin with the
        restored prefix. On any error nothing is stored.
        """
        if self._closed:
            raise SessionError("commit on a closed session: begin a new session for this request")
        if self._committed:
            raise SessionError("this session has already committed; begin a new session to store more")
        return self._owner._commit(self, tokens, self.caches if caches is None else caches)

    def close(self) -> None:
        """Unpin the session's path and release its live caches; closing twice is harmless."""
        if not self._closed:
            self._owner._close(self)

    def __enter__(self) -> "Session":
        if self._closed:
            raise SessionError("this session is closed: begin a new one")
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("committed" if self._committed else "open")
        return f"Session({len(self.tokens)} tokens, cached={self.cached}, {state})"


class PrefixCache:
    """Prefix-trie KV cache: every stored token's KV exists once, any stored prefix restores.

    `make_cache` is the model's `make_cache` (a callable returning one fresh live cache
    per layer, mlx-lm's protocol). `namespace` is the default namespace (model id,
    tenant salt); different namespaces never share nodes.
    """

    def __init__(self, make_cache: Callable[[], list], *, namespace: str = "default"):
        if not callable(make_cache):
            raise TypeError(f"make_cache must be callable (a model's make_cache), got {type(make_cache).__name__}")
        probe = make_cache()
        if not isinstance(probe, (list, tuple)) or not probe:
            raise ValueError("make_cache() must return a non-empty list with one live cache per layer")
        for i, c in enumerate(probe):
            if not hasattr(c, "update_and_fetch"):
                raise TypeError(
                    f"layer {i}: {type(c).__name__} is not a KV cache (no update_and_fetch); "
                    "recurrent layers are not supported by this PrefixCache"
                )
        self._make_cache = make_cache
        self._layer_types = tuple(type(c) for c in probe)
        self._namespace = self._check_namespace(namespace)
        self._signature: Optional[tuple[KVSignature, ...]] = None
        self._tries: dict[str, Trie] = {}
        self._lock = threading.RLock()
        self._clock = itertools.count(1)
        self._device_bytes = 0
        self._requests = 0
        self._prompt_tokens = 0
        self._cached_tokens = 0
        self._hits = 0

    @property
    def num_layers(self) -> int:
        return len(self._layer_types)

    # --- the request API -----------------------------------------------------------

    def begin(self, tokens: Sequence[int], *, namespace: Optional[str] = None) -> Session:
        """Restore the longest stored prefix of `tokens` (holding back at least one token)."""
        arr = as_token_array(tokens)
        ns = self._namespace if namespace is None else self._check_namespace(namespace)
        caches = self._make_cache()
        with self._lock:
            trie = self._tries.get(ns)
            match = trie.match(arr) if trie is not None else Match((), 0)
            cached = min(match.length, len(arr) - 1)
            used = [n for n in match.path if n.start < cached]
            if used:
                for i, cache in enumerate(caches):
                    stitch_kv(cache, [n.payload.layers[i] for n in used], cached)
                mx.eval(*[a for c in caches for a in (c.keys, c.values)])
            leaf = used[-1] if used else None
            self._pin(leaf, +1)
            self._touch(used)
            self._requests += 1
            self._prompt_tokens += len(arr)
            self._cached_tokens += cached
            self._hits += bool(cached)
        logger.debug("begin ns=%s: %d tokens, matched %d, restored %d from %d nodes", ns, len(arr), match.length, cached, len(used))
        return Session(self, ns, arr, cached, caches, leaf)

    def _commit(self, session: Session, tokens: Sequence[int], caches: Any) -> int:
        arr = as_token_array(tokens)
        n = len(arr)
        if n < session.cached or not np.array_equal(arr[: session.cached], session.tokens[: session.cached]):
            raise ValueError(
                f"committed tokens must begin with the {session.cached} tokens this session restored; "
                "commit the prompt (plus generated tokens) that was passed to begin()"
            )
        signature = self._check_caches(caches, n)
        with self._lock:
            if self._signature is None:
                self._signature = signature
            elif signature != self._signature:
                raise CacheMismatchError(
                    f"caches do not match this PrefixCache's model: expected {self._signature}, got {signature}"
                )
            trie = self._tries.get(session.namespace)
            if trie is None:
                trie = self._tries[session.namespace] = Trie(_split_data, _merge_data)
            match = trie.match(arr)
            added = n - match.length
            if added:
                layers = tuple(capture_kv(c, match.length, n) for c in caches)
                evaluate(layers)
                parent = trie.split(match.last, match.length) if match.ends_mid_edge else (match.last or trie.root)
                data = NodeData(layers)
                leaf = trie.add_child(parent, arr[match.length :], data)
                self._device_bytes += data.nbytes
            else:
                leaf = match.last
            self._pin(session._leaf, -1)
            self._pin(leaf, +1)
            session._leaf = leaf
            self._touch(leaf.path())
            session._committed = True
        logger.debug("commit ns=%s: %d tokens, %d new", session.namespace, n, added)
        return added

    def _close(self, session: Session) -> None:
        with self._lock:
            self._pin(session._leaf, -1)
            session._leaf = None
            session._closed = True
            session.caches = None

    # --- validation ----------------------------------------------------------------

    @staticmethod
    def _check_namespace(namespace: Any) -> str:
        if not isinstance(namespace, str):
            raise TypeError(f"namespace must be a str (model id, tenant salt), got {type(namespace).__name__}")
        return namespace

    def _check_caches(self, caches: Any, offset: int) -> tuple[KVSignature, ...]:
        if not isinstance(caches, (list, tuple)):
            raise TypeError(f"caches must be the list of live layer caches, got {type(caches).__name__}")
        if len(caches) != self.num_layers:
            raise CacheMismatchError(
                f"got caches for {len(caches)} layers, this PrefixCache's model has {self.num_layers}; "
                "pass the caches of the model whose make_cache built this PrefixCache"
            )
        signature = []
        for i, (c, expected) in enumerate(zip(caches, self._layer_types)):
            if type(c) is not expected:
                raise CacheMismatchError(f"layer {i}: expected a {expected.__name__}, got {type(c).__name__}")
            if int(c.offset) != offset:
                raise CacheMismatchError(
                    f"layer {i}: cache offset is {c.offset} but {offset} tokens were committed; "
                    "run the model over every token before committing"
                )
            sig = kv_signature(c)
            if sig.batch != 1:
                raise CacheMismatchError(f"layer {i}: batch size {sig.batch}; a session holds one sequence (batch 1)")
            signature.append(sig)
        return tuple(signature)

    # --- bookkeeping ---------------------------------------------------------------

    @staticmethod
    def _pin(leaf: Optional[Node], delta: int) -> None:
        node = leaf
        while node is not None and node.parent is not None:
            node.pins += delta
            node = node.parent

    def _touch(self, nodes: Sequence[Node]) -> None:
        now = next(self._clock)
        for node in nodes:
            node.last_used = now

    # --- inspection ----------------------------------------------------------------

    def walk(self) -> Iterator[tuple[str, Node, int]]:
        """Every node as `(namespace, node, depth)`, parents before children."""
        with self._lock:
            items = [(ns, node, depth) for ns in sorted(self._tries) for node, depth in self._tries[ns].walk()]
        return iter(items)

    def stats(self) -> dict[str, int]:
        """Counters since creation and the current size of the cache."""
        with self._lock:
            return {
                "requests": self._requests,
                "hits": self._hits,
                "prompt_tokens": self._prompt_tokens,
                "cached_tokens": self._cached_tokens,
                "nodes": sum(t.num_nodes for t in self._tries.values()),
                "tokens_stored": sum(t.num_tokens for t in self._tries.values()),
                "device_bytes": self._device_bytes,
            }

    def dump(self) -> str:
        """Readable tree: one line per node, `[start, end) tokens bytes tier pinned`."""
        lines: list[str] = []
        current = None
        for ns, node, depth in self.walk():
            if ns != current:
                lines.append(f"namespace {ns!r}")
                current = ns
            head = " ".join(str(t) for t in node.tokens[:8]) + (" ..." if len(node.tokens) > 8 else "")
            lines.append(
                f"{'  ' * depth}[{node.start}, {node.end}) {len(node.tokens)} tokens "
                f"{node.payload.nbytes} B {node.payload.tier} pinned={node.pins} <{head}>"
            )
        return "\n".join(lines)
