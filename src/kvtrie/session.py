"""Session: one request's view of a PrefixCache (restored caches, capture plan, one commit)."""

from __future__ import annotations

from typing import Any, Optional, Protocol

import mlx.core as mx
import numpy as np

from .errors import SessionError
from .policy import BRANCH
from .trie import Tokens


class SessionOwner(Protocol):
    """What a session needs from the cache that made it (PrefixCache implements it)."""

    def _capture(self, session: Session, offset: Optional[int], logits: Optional[mx.array]) -> int: ...

    def _commit(self, session: Session, tokens: Tokens, caches: Any) -> int: ...

    def _close(self, session: Session) -> None: ...


class Session:
    """One request's view of the cache: restored live caches, pinned path, one commit.

    `cached` tokens were restored into `caches`: at most `len(tokens) - 1`, so the caller
    has logits to compute, unless `begin(..., reuse_logits=True)` found the whole prompt
    stored with its last logits, which are then in `logits` (nothing to prefill). For
    models with whole-state layers, `capture_at` lists the offsets at which the caller
    should call `capture()` while prefilling, so later requests that stop there restore
    fully. `miss_reason` says why a request restored less than it could have (see
    `kvtrie.misses`), None when nothing was lost. Use as a context manager: the path stays
    pinned (never evicted) until the session closes.
    """

    def __init__(
        self,
        owner: SessionOwner,
        namespace: str,
        tokens: np.ndarray,
        cached: int,
        caches: Optional[list],
        leaf: Any,
        plan: tuple[tuple[int, int], ...] = (),
        logits: Optional[mx.array] = None,
        miss_reason: Optional[str] = None,
    ):
        self._owner = owner
        self.namespace = namespace
        self.tokens = tokens
        self.cached = cached
        self.caches: Optional[list] = caches
        self.logits = logits
        self.miss_reason = miss_reason  # why less was restored than could have been (kvtrie.misses); None: nothing lost
        self.capture_at = tuple(p for p, _ in plan)
        self._reasons = dict(plan)
        self._captures: dict[int, tuple[tuple[Any, ...], Optional[mx.array]]] = {}
        self._leaf = leaf
        self._committed_tokens: Optional[np.ndarray] = None
        self._committed = False
        self._closed = False

    @property
    def branch_points(self) -> tuple[int, ...]:
        """The planned captures where this prompt leaves the stored trie: a server that stores
        state only where its prefill stops should stop there too."""
        return tuple(p for p, r in self._reasons.items() if r & BRANCH)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def committed(self) -> bool:
        return self._committed

    def _check_open(self, what: str) -> None:
        if self._closed:
            raise SessionError(f"{what} on a closed session: begin a new session for this request")
        if self._committed:
            raise SessionError(f"{what} after commit: this session has already committed; begin a new one")

    def capture(self, offset: Optional[int] = None, logits: Optional[mx.array] = None) -> int:
        """Snapshot the whole-state layers at the caches' current position; returns that position.

        Call it when the prefill reaches an offset in `capture_at`; `commit` stores the
        snapshot there. At the prompt's end pass the last position's `logits`, so a request
        with the same prompt can restore all of it. `offset` is needed only for models whose
        caches do not count positions (mamba, rwkv: no `offset` anywhere). A no-op returning
        the position for models without whole-state layers.
        """
        self._check_open("capture")
        return self._owner._capture(self, offset, logits)

    def commit(self, tokens: Tokens, caches: Optional[list] = None) -> int:
        """Store the state of `tokens` held by `caches` (default: this session's); returns tokens added.

        The caches must hold exactly `len(tokens)` positions and `tokens` must begin with
        the restored prefix. On any error nothing is stored.
        """
        self._check_open("commit")
        return self._owner._commit(self, tokens, self.caches if caches is None else caches)

    def close(self) -> None:
        """Unpin the session's path and hand its live caches back; closing twice is harmless.

        After a commit, the caches may serve the next request that continues this
        sequence without copying (see `PrefixCache(hot_sessions=...)`): do not use them
        after closing.
        """
        if not self._closed:
            self._owner._close(self)

    def __enter__(self) -> Session:
        if self._closed:
            raise SessionError("this session is closed: begin a new one")
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("committed" if self._committed else "open")
        return f"Session({len(self.tokens)} tokens, cached={self.cached}, {state})"
