"""Session: one request's view of the PrefixCache (restored caches, capture plan, one commit)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Optional

import numpy as np

from .errors import SessionError
from .recurrent import RecurrentPayload
from .trie import Node

if TYPE_CHECKING:
    from .cache import PrefixCache


class Session:
    """One request's view of the cache: restored live caches, pinned path, one commit.

    `cached` tokens were restored into `caches` (at most `len(tokens) - 1`, so the
    caller always has logits to compute). For models with recurrent layers,
    `capture_at` lists the offsets at which the caller should call `capture()` while
    prefilling (the divergence point, `len(tokens) - 1`, every `snapshot_interval`), so
    later requests that stop there restore fully. Use as a context manager: the path
    stays pinned (never evicted) until the session closes.
    """

    def __init__(
        self,
        owner: "PrefixCache",
        namespace: str,
        tokens: np.ndarray,
        cached: int,
        caches: list,
        leaf: Optional[Node],
        capture_at: tuple[int, ...] = (),
    ):
        self._owner = owner
        self.namespace = namespace
        self.tokens = tokens
        self.cached = cached
        self.caches: Optional[list] = caches
        self.capture_at = capture_at
        self._captures: dict[int, tuple[RecurrentPayload, ...]] = {}
        self._leaf = leaf
        self._committed_tokens: Optional[np.ndarray] = None
        self._committed = False
        self._closed = False

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

    def capture(self) -> int:
        """Snapshot the recurrent layers' state at the caches' current offset; returns that offset.

        Call it when the prefill reaches an offset in `capture_at`; `commit` stores the
        snapshot at that position. A no-op returning the offset for pure transformers.
        """
        self._check_open("capture")
        return self._owner._capture(self)

    def commit(self, tokens: Sequence[int], caches: Optional[list] = None) -> int:
        """Store the state of `tokens` held by `caches` (default: this session's); returns tokens added.

        The caches' offsets must equal `len(tokens)` and `tokens` must begin with the
        restored prefix. On any error nothing is stored.
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

    def __enter__(self) -> "Session":
        if self._closed:
            raise SessionError("this session is closed: begin a new one")
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("committed" if self._committed else "open")
        return f"Session({len(self.tokens)} tokens, cached={self.cached}, {state})"
