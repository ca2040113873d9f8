"""The PrefixCache's counters since creation, in one value object shared by its parts."""

from __future__ import annotations

import attrs

from .misses import MISS_REASONS

_CACHED = {tier: f"cached_tokens_{tier}" for tier in ("device", "host", "disk")}


@attrs.define(slots=True)
class Counters:
    """What happened: requests and their hits, tier traffic, evictions, disk, snapshots."""

    requests: int = 0
    hits: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    cached_tokens_device: int = 0
    cached_tokens_host: int = 0
    cached_tokens_disk: int = 0
    page_outs: int = 0
    host_restores: int = 0
    hot_restores: int = 0
    logits_restores: int = 0  # whole prompts restored with their last logits (nothing prefilled)
    evictions: int = 0
    evicted_tokens: int = 0
    disk_writes: int = 0
    disk_restores: int = 0
    disk_errors: int = 0  # disk_write_errors + disk_read_errors
    disk_write_errors: int = (
        0  # writes (and deletes) the operating system failed (ENOSPC, EIO, ...): dropped, kept in memory
    )
    disk_read_errors: int = 0  # records that could not be read back (EIO, damaged): misses
    snapshots_made: int = 0  # recurrent snapshots stored
    snapshots_dropped: int = 0  # dropped by the policy or evicted
    snapshots_used: int = 0  # restores that resumed from a snapshot
    cleared_tokens: int = 0  # dropped by `clear`
    pins_expired: int = 0  # user pins whose ttl passed
    pins_dropped: int = 0  # user pins that gave way to a budget
    miss_reasons: dict = attrs.field(factory=lambda: dict.fromkeys(MISS_REASONS, 0))  # begins per miss reason

    def add_cached(self, tier: str, tokens: int) -> None:
        name = _CACHED[tier]
        setattr(self, name, getattr(self, name) + tokens)

    def as_dict(self) -> dict[str, int]:
        return attrs.asdict(self)  # (a copy, the miss reasons' dict too)
