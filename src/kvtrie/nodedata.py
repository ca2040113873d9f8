"""What a node stores: `NodeData` (its payloads, tier and policy state) and the value objects
both the storage and the disk tier handle: the record references of an edge (`Segment`) and
logits wrapped as a payload (`Logits`).
"""

from __future__ import annotations

from typing import Any, Optional, Union

import attrs
import numpy as np

from .arrays import AnyArray, HostArray, HostPool, copy_all, numpy_view
from .disk import DiskRef
from .layers import STATE
from .ledger import DEVICE, HOST
from .recurrent import RecurrentPayload
from .snapshot import KVPayload

LayerPayload = Optional[Union[KVPayload, RecurrentPayload]]


@attrs.define(slots=True, eq=False)
class NodeData:
    """Everything a node stores: one payload per layer, the tier it lives in, and policy state.

    Per-token layers (`KV`, `WINDOW`) hold the edge's positions (a `WINDOW` layer may hold
    `None`: positions nobody recorded); a `STATE` layer holds its state at the node's end, or
    `None` where no snapshot was taken. `logits` are the model's last logits at the end (kept
    with a prompt end's snapshot). `reasons` (why the snapshot was taken) and `base` (its
    priority's starting point) belong to the policy.
    """

    layers: Optional[tuple[LayerPayload, ...]]
    kinds: tuple[str, ...]
    tier: str = DEVICE
    disk: Optional[DiskRef] = None  # on the disk tier: what it holds (layers None once its records are written)
    logits: Optional[AnyArray] = None
    reasons: int = 0
    base: float = 0.0
    interval: float = 0.0  # clock ticks between its uses, as measured (0: never used again yet)
    expect: float = 0.0  # the interval the policy expected at its last use (its order's key)
    segments: tuple[Segment, ...] = ()  # the records holding the edge's positions, in order
    state_file: Optional[str] = None  # the record holding the snapshot (and logits) at the end
    tenant: str = "default"  # whose namespace holds it (`tenants.tenant_of`): byte shares are per tenant

    @property
    def on_disk(self) -> DiskRef:
        """What the records of a node whose payloads are only on disk (`layers` None) hold."""
        assert self.disk is not None, "a node with no payloads in memory has its records' reference"
        return self.disk

    @property
    def in_memory(self) -> tuple[LayerPayload, ...]:
        """The payloads of a node that holds them in memory (device or host tier)."""
        assert self.layers is not None, "the node's payloads are only on disk"
        return self.layers

    @property
    def nbytes(self) -> int:
        if self.layers is None:
            return self.on_disk.nbytes
        return sum(p.nbytes for p in self.layers if p is not None) + (
            self.logits.nbytes if self.logits is not None else 0
        )

    @property
    def snapshot_nbytes(self) -> int:
        """Bytes of the recurrent snapshot and its logits (the rest is per-token KV)."""
        if self.layers is None:
            return self.on_disk.snapshot_nbytes
        states = sum(p.nbytes for p, k in zip(self.layers, self.kinds) if k == STATE and p is not None)
        return states + (self.logits.nbytes if self.logits is not None else 0)

    @property
    def has_state(self) -> bool:
        """Every whole-state layer has a snapshot at this node's end (true when there is none)."""
        if self.layers is None:
            return self.on_disk.has_state
        return all(p is not None for p, k in zip(self.layers, self.kinds) if k == STATE)

    @property
    def has_snapshot(self) -> bool:
        """Some whole-state layer holds a snapshot here (one that could be dropped under pressure)."""
        if self.layers is None:
            return self.on_disk.has_snapshot
        return any(p is not None for p, k in zip(self.layers, self.kinds) if k == STATE)

    def payloads(self) -> list[Any]:
        return [p for p in (self.layers or ()) if p is not None]

    def with_arrays(self, fn, tier: str) -> NodeData:
        """A copy whose payload and logits arrays went through `fn` (a tier move)."""
        layers = tuple(None if p is None else p.map(fn) for p in self.in_memory)
        logits = None if self.logits is None else fn(self.logits)
        return attrs.evolve(self, layers=layers, logits=logits, tier=tier, disk=None)

    def with_host_arrays(self, pool: HostPool) -> NodeData:
        """A copy on the host tier: every array copied into a pooled buffer, all copies at once."""
        pairs: list[tuple[np.ndarray, np.ndarray]] = []

        def plan(a: AnyArray) -> HostArray:
            if isinstance(a, HostArray):
                return a
            src = numpy_view(a)
            buf = pool.take(src.shape, src.dtype)
            pairs.append((buf, src))
            return HostArray(buf, a.dtype)

        moved = self.with_arrays(plan, HOST)
        copy_all(pairs)
        return moved


@attrs.frozen
class Segment:
    """Positions of a node's edge held by a record: `length` of them from the record's `offset`-th."""

    stem: str
    offset: int
    length: int


def split_segments(segments: tuple[Segment, ...], k: int) -> tuple[tuple[Segment, ...], tuple[Segment, ...]]:
    """The records' references of an edge's first `k` positions and of the rest."""
    top: list[Segment] = []
    bottom: list[Segment] = []
    left = k
    for seg in segments:
        if left >= seg.length:
            top.append(seg)
        elif left <= 0:
            bottom.append(seg)
        else:
            top.append(Segment(seg.stem, seg.offset, left))
            bottom.append(Segment(seg.stem, seg.offset + left, seg.length - left))
        left -= seg.length
    return tuple(top), tuple(bottom)


@attrs.frozen(eq=False)
class Logits:
    """Logits wrapped as a payload, so tier moves and releases treat them like the rest."""

    array: AnyArray

    @property
    def arrays(self) -> tuple[AnyArray, ...]:
        return (self.array,)


def everything(data: NodeData) -> list[Any]:
    """A node's payloads and its logits, for moves and releases."""
    return data.payloads() + ([Logits(data.logits)] if data.logits is not None else [])
