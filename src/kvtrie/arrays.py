"""Tier-neutral array helpers: host arrays outside MLX's allocator, conversions, a buffer pool.

A payload array lives on the *device* tier as an `mx.array` or on the *host* tier as a
`HostArray` (a numpy buffer; bfloat16 travels as a uint16 view, numpy has no bfloat16).
Fresh allocations page-fault at a fraction of memcpy speed on these machines, so host
buffers come from a `HostPool` and go back to it when a payload leaves the host tier.
"""

from __future__ import annotations

import functools
import math
import threading
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional, Union, cast

import attrs
import mlx.core as mx
import numpy as np

_VIEW_AS = {mx.bfloat16: mx.uint16}
# MLX dtypes numpy holds as they are (bfloat16 is not one: it travels as uint16 and needs a view in MLX)
NUMPY_DTYPES = {
    mx.float32: np.float32,
    mx.float16: np.float16,
    mx.int8: np.int8,
    mx.int16: np.int16,
    mx.int32: np.int32,
    mx.int64: np.int64,
    mx.uint8: np.uint8,
    mx.uint16: np.uint16,
    mx.uint32: np.uint32,
    mx.uint64: np.uint64,
    mx.bool_: np.bool_,
}


@attrs.frozen(eq=False)
class HostArray:
    """An array on the host tier: `data` holds the bytes, `dtype` the MLX dtype they encode."""

    data: np.ndarray
    dtype: mx.Dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return self.data.shape

    @property
    def nbytes(self) -> int:
        return self.data.nbytes


AnyArray = Union[mx.array, HostArray]


def on_cpu() -> bool:
    """MLX computes on the CPU: an mx.array's memory can be read by numpy without a copy."""
    return mx.default_device().type == mx.DeviceType.cpu


def numpy_view(a: AnyArray) -> np.ndarray:
    """The bytes of `a` as numpy (bfloat16 as uint16).

    Zero-copy for host arrays and on the CPU backend. On CUDA, MLX moves a device
    array's buffer to managed memory to expose it, which is slow: read device arrays
    this way only to copy them off the device.
    """
    if isinstance(a, HostArray):
        return a.data
    if a.dtype not in _VIEW_AS:
        return np.asarray(a)
    as_dtype = NUMPY_DTYPES[_VIEW_AS[a.dtype]]
    if a.size:
        # the buffer protocol: no MLX view, whose evaluation is a graph run (~25 us)
        exported = memoryview(a)  # type: ignore[arg-type]  # mx.array has it; its stubs do not say so
        if exported.c_contiguous:
            return np.frombuffer(exported.cast("B"), as_dtype).reshape(a.shape)
    return np.asarray(a.view(_VIEW_AS[a.dtype]))


def from_numpy(data: np.ndarray, dtype: mx.Dtype) -> mx.array:
    """An mx.array copy of `data` holding `dtype` values.

    The copy goes through a flat view: MLX copies a 1-D buffer at memcpy speed but a
    4-D one element by element.
    """
    flat = mx.array(np.ascontiguousarray(data).reshape(-1))
    if dtype in _VIEW_AS:
        flat = flat.view(dtype)
    return flat.reshape(data.shape)


def _size_class(nbytes: int) -> int:
    """Round up to one of four sizes per power of two (at most 19% slack), 4 KiB at least."""
    if nbytes <= 4096:
        return 4096
    exp = math.floor(math.log2(nbytes))
    for quarter in (1.0, 1.189207115, 1.414213562, 1.681792831, 2.0):
        size = int(math.ceil((2**exp) * quarter / 64) * 64)
        if size >= nbytes:
            return size
    return 2 ** (exp + 1)


LINE = 64  # bytes in a cache line


def _measure_line_offset() -> int:
    if not on_cpu():
        return 0
    probe = mx.zeros((1 << 20,), mx.uint8)
    mx.eval(probe)
    return np.asarray(probe).ctypes.data % LINE


# Where a fresh MLX array sits within a cache line (24 bytes with mlx 0.32); pooled host buffers
# and disk records' arrays start at the same offset. A numpy copy whose destination lies exactly
# 8 bytes past its source modulo 4096 runs ~20x slower on these machines (1.08 vs 0.05 ms for
# 2 MiB; no other distance was slow). MLX's arrays sit 8 bytes past a 16-byte boundary (its
# header; 24 bytes into a freshly mapped block), numpy's on one (16 bytes into a fresh block):
# every copy from a fresh numpy buffer into a fresh MLX array was that case. A buffer at this
# offset is never 8 bytes behind an MLX array, wherever in a line MLX put it.
# Measured once, at import, on the importing thread (MLX evaluates nothing on a thread it did not
# start a stream on, and disk and shared-tier records are encoded on worker threads).
MLX_LINE_OFFSET = _measure_line_offset()


class HostPool:
    """Free host buffers by size class, reused by later page-outs and restores.

    At most `max_free_bytes` are kept free (or, given `room`, what `room()` says at the time:
    the tier's owner lets the free buffers fill what its budget leaves); beyond that,
    returned buffers are dropped.
    """

    def __init__(self, max_free_bytes: int = 256 << 20, room: Optional[Callable[[], int]] = None):
        self.max_free_bytes = max_free_bytes
        self._room = room
        self._free: dict[int, list[np.ndarray]] = defaultdict(list)
        self._free_bytes = 0
        self._lock = threading.Lock()

    @property
    def free_bytes(self) -> int:
        return self._free_bytes

    def take(self, shape: Sequence[int], dtype: np.dtype) -> np.ndarray:
        """An uninitialised array of `shape`/`dtype` backed by a pooled (or new) buffer."""
        nbytes = math.prod(shape) * np.dtype(dtype).itemsize
        size = _size_class(nbytes)
        with self._lock:
            stack = self._free.get(size)
            buf = stack.pop() if stack else None
            if buf is not None:
                self._free_bytes -= size
        if buf is None:
            buf = np.empty(size + LINE, dtype=np.uint8)  # (room to place the array within a cache line)
        at = (MLX_LINE_OFFSET - buf.ctypes.data) % LINE
        return buf[at : at + nbytes].view(dtype).reshape(shape)

    def give(self, arr: np.ndarray) -> None:
        """Return the buffer behind an array made by `take`."""
        base = arr
        while base.base is not None and isinstance(base.base, np.ndarray):
            base = base.base
        size = base.nbytes - LINE
        if (
            base.dtype != np.uint8
            or base.ndim != 1
            or size <= 0
            or _size_class(size) != size
            or not base.flags.writeable
        ):
            return  # not one of ours (a read-only array views a file or a received value)
        limit = self._room() if self._room is not None else self.max_free_bytes
        with self._lock:
            if self._free_bytes + size <= limit:
                self._free[size].append(base)  # (the whole block: `take` places the array in it again)
                self._free_bytes += size

    def trim(self, excess: int) -> int:
        """Drop free buffers, largest first, until at least `excess` bytes are freed (or none is
        left); returns the bytes dropped."""
        freed = 0
        with self._lock:
            for size in sorted(self._free, reverse=True):
                stack = self._free[size]
                while stack and freed < excess:
                    stack.pop()
                    freed += size
                if not stack:
                    del self._free[size]
                if freed >= excess:
                    break
            self._free_bytes -= freed
        return freed


def to_host(a: AnyArray, pool: HostPool) -> HostArray:
    """Copy a device array into a pooled host buffer (host arrays pass through)."""
    if isinstance(a, HostArray):
        return a
    src = numpy_view(a)
    buf = pool.take(src.shape, src.dtype)
    np.copyto(buf, src)
    return HostArray(buf, a.dtype)


COPIERS = ThreadPoolExecutor(max_workers=2, thread_name_prefix="kvtrie-copy")
PARALLEL_BYTES = 8 << 20  # below this, threads cost more than they save
SPLIT_BYTES = 4 << 20  # arrays past this are copied by two threads, each taking half


def copy_all(pairs: Sequence[tuple[np.ndarray, np.ndarray]]) -> None:
    """`np.copyto(dst, src)` for each pair; with enough to copy, on two threads (`TwoHands`)."""
    hands = TwoHands(sum(src.nbytes for _, src in pairs) >= PARALLEL_BYTES)
    for dst, src in pairs:
        hands.copy(functools.partial(copy_rows, src, dst), dst.shape[1] if dst.ndim >= 2 else 1, dst.nbytes)
    hands.wait()


def copy_rows(src: np.ndarray, dst: np.ndarray, h0: int, h1: int) -> None:
    """Rows `[h0, h1)` along axis 1 of `src` into `dst` (all of it for a 1-D array)."""
    if dst.ndim >= 2:
        np.copyto(dst[:, h0:h1], src[:, h0:h1])
    else:
        np.copyto(dst, src)


class TwoHands:
    """Copies shared by the calling thread and a worker, balanced by bytes as they come: an
    array past `SPLIT_BYTES` is split along axis 1 (a KV array's heads), half each; a smaller
    one goes whole to whichever hand has copied less (numpy copies release the GIL). With
    `parallel` false (too little to copy for a thread to pay), every copy runs here."""

    def __init__(self, parallel: bool = True) -> None:
        self._parallel = parallel
        self._jobs: list = []
        self._here = 0
        self._there = 0

    def copy(self, fn: Callable[[int, int], None], rows: int, nbytes: int) -> None:
        """Run `fn(h0, h1)` over rows `[0, rows)`, here, on the worker or split between them."""
        if not self._parallel:
            fn(0, rows)
        elif rows >= 2 and nbytes >= SPLIT_BYTES:
            self._jobs.append(COPIERS.submit(fn, rows // 2, rows))
            fn(0, rows // 2)
            self._here += nbytes // 2
            self._there += nbytes - nbytes // 2
        elif self._there < self._here:
            self._jobs.append(COPIERS.submit(fn, 0, rows))
            self._there += nbytes
        else:
            fn(0, rows)
            self._here += nbytes

    def wait(self) -> None:
        for job in self._jobs:
            job.result()
        self._jobs.clear()


def to_device(a: AnyArray) -> mx.array:
    """An mx.array with the values of `a` (device arrays pass through)."""
    return from_numpy(a.data, a.dtype) if isinstance(a, HostArray) else a


def slice_axis(a: AnyArray, axis: int, start: int, stop: int) -> AnyArray:
    """A compact copy of `a[..., start:stop, ...]` along `axis`, in the tier `a` lives in (lazy on device)."""
    index = (slice(None),) * axis + (slice(start, stop),)
    if isinstance(a, HostArray):
        return HostArray(np.array(a.data[index], copy=True), a.dtype)  # never a view of a pooled buffer
    return mx.contiguous(a[index])


def concat_axis(parts: Sequence[AnyArray], axis: int) -> AnyArray:
    """Concatenate along `axis`; the result is on the host only if every part is."""
    hosts = [p for p in parts if isinstance(p, HostArray)]
    if len(hosts) == len(parts):
        return HostArray(np.concatenate([p.data for p in hosts], axis=axis), hosts[0].dtype)
    return mx.concatenate([to_device(p) for p in parts], axis=axis)


def tree_items(tree: Any) -> list[tuple[str, Any]]:
    """`mlx.utils.tree_flatten(tree)`: its `(dotted name, leaf)` pairs. (Without a `destination`
    it returns a list; its annotation also allows a dict, which a caller would have to rule out.)"""
    from mlx.utils import tree_flatten

    return cast(list[tuple[str, Any]], tree_flatten(tree))
