"""The disk tier: self-describing payload records that survive any end, integrity checks, a writer.

Each record is one safetensors file named `<key>-<checksum>.safetensors`. The key is a hash of
the model's fingerprint, the namespace and every token up to the record's end (the same
content always gets the same key, so it is written once); the name's checksum covers the
file's bytes, so a truncated, flipped or half-written file is detected when read and never
restored. A record's header says what it holds and where it hangs: the key of the record
before it on its path (`parent`), its first position (`start`) and its tokens, plus the
cache layout and fingerprint. So the directory alone describes the trie: a process killed at
any moment (kill -9 included) restarts from whatever records were complete, with no index.
A record is either a run of tokens (every per-token layer, and the whole states at its end
when it has them) or a state only (`tokens` empty: the whole states at `start`).

Files are written to a temporary name and renamed, so a process killed while writing
leaves only `*.tmp` files, which the next start removes. Writes run on a background thread
behind a bounded queue; reads are synchronous. A large record is read by mapping it (its
arrays are read-only views of the page cache): a mapping survives the file's deletion or
replacement by rename, which is all kvtrie ever does to a record, but a file cut short in
place while mapped kills the process (SIGBUS), so nothing else may rewrite files here.

A full or failing disk never fails a request: a write that fails (ENOSPC, EDQUOT, EIO, ...)
removes its temporary file and is reported to the cache, which keeps the payload in memory or
evicts it; the directory's `DiskHealth` turns degraded (one warning), the writer skips writes
until a retry a few seconds later (backing off to `DiskHealth.longest`) and the first write
that succeeds resumes the tier (one info line). A read that fails is a miss (`DiskReadError`);
a record is mapped only when every page of it came in (a page the disk fails to read would
raise SIGBUS when touched). What stays out of reach: a mapped record's page that the kernel
drops later and then cannot read back.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import logging
import math
import mmap
import os
import queue
import struct
import threading
import time
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Optional

import attrs
import mlx.core as mx
import numpy as np
import xxhash

from .arrays import LINE, MLX_LINE_OFFSET, HostArray, HostPool
from .errors import UnsafeDirectoryError
from .recurrent import RecurrentPayload
from .snapshot import KVPayload

logger = logging.getLogger("kvtrie")

LEGACY_INDEX = "index.json"  # format 2 kept the structure in an index a clean close wrote
FORMAT = 3


class PayloadCorrupt(Exception):
    """A payload file is missing, truncated or does not match its checksum: a miss, never state."""


class DiskReadError(PayloadCorrupt):
    """Reading a record failed in the operating system (EIO, ...): a miss, and a sign that the disk fails."""


class WriteSkipped(Exception):
    """A write the writer did not try: the directory is degraded and its next retry is not due."""


def _io_error(file: str, exc: OSError) -> PayloadCorrupt:
    """A read's OSError as a miss: a record gone (deleted meanwhile) is plain; anything else is the disk's."""
    if exc.errno == errno.ENOENT:
        return PayloadCorrupt(f"{file}: {exc}")
    return DiskReadError(f"{file}: {exc}")


# The system calls records are written and read with, as module functions (tests inject errors here).
def _write_all(fd: int, data: Any) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


_pread = os.pread
_preadv = os.preadv
_open = os.open
_now = time.monotonic  # (the disk tier's health clock)


class DiskHealth:
    """Whether a disk tier's directory takes writes now.

    A failure (`failed`) makes it degraded: one warning names the directory and the error, and
    `writable()` is False until a retry is due (`first` seconds later, doubling with each failure
    while degraded, up to `longest`); the first write that succeeds after it (`succeeded`) ends
    the episode with one info line. A disk that fills again soon after (`settle` seconds) goes on
    with the backoff it had and says so at info level: a disk hovering at full (its own records
    fill it) warns once, not at every turn. Thread-safe: the writer and request threads report.
    """

    first = 1.0
    longest = 10.0
    settle = 300.0

    def __init__(self, directory: Path):
        self.directory = directory
        self._lock = threading.Lock()
        self.degraded = False
        self.error: Optional[str] = None  # the last failure's
        self._backoff = 0.0
        self._retry_at = 0.0
        self._resumed_at: Optional[float] = None

    def failed(self, exc: object, doing: str) -> None:
        with self._lock:
            now = _now()
            self.error = f"{doing}: {exc}"
            if self.degraded:
                self._backoff = min(self._backoff * 2, self.longest)
                logger.debug(
                    "disk tier %s: %s failed again (%s); next retry in %.1f s",
                    self.directory,
                    doing,
                    exc,
                    self._backoff,
                )
            else:
                self.degraded = True
                recent = self._resumed_at is not None and now - self._resumed_at < self.settle
                self._backoff = min(self._backoff * 2, self.longest) if recent else self.first
                logger.log(
                    logging.INFO if recent else logging.WARNING,
                    "disk tier %s: %s failed (%s): the disk tier is degraded to memory only (requests are served, "
                    "nothing is written) until a retry succeeds (every %g-%g s)%s",
                    self.directory,
                    doing,
                    exc,
                    self.first,
                    self.longest,
                    " (again)" if recent else "",
                )
            self._retry_at = now + self._backoff

    def succeeded(self) -> None:
        if not self.degraded:
            return
        with self._lock:
            if self.degraded:
                self.degraded = False
                self._resumed_at = _now()
                logger.info("disk tier %s: writes resumed (after: %s)", self.directory, self.error)

    def writable(self) -> bool:
        """Not degraded, or a retry is due (the next write is the probe)."""
        return not self.degraded or _now() >= self._retry_at

    def retry_now(self) -> None:
        """Let the next write try (at close: one last chance to keep what is in memory)."""
        self._retry_at = 0.0


@attrs.frozen
class DiskRef:
    """What a node's payload on the disk tier holds (known without reading its records)."""

    nbytes: int
    snapshot_nbytes: int
    has_state: bool
    has_snapshot: bool


def _dtype_name(dtype: mx.Dtype) -> str:
    return str(dtype).rsplit(".", 1)[-1]


def _host(a: Any) -> HostArray:
    if not isinstance(a, HostArray):
        raise TypeError(f"only host-tier payloads are written to disk, got {type(a).__name__}")
    return a


def encode(layers: Iterable[Any], logits: Any = None, record: Optional[dict] = None) -> bytes:
    """One safetensors file holding layer payloads (host arrays), logits, their structure and
    the record's header (`record`: where it hangs in the trie)."""
    import safetensors.numpy

    tensors: dict[str, np.ndarray] = {}
    structure: list[Any] = []

    def put(name: str, a: Any) -> dict:
        h = _host(a)
        tensors[name] = np.ascontiguousarray(h.data)
        return {"__tensor__": name, "dtype": _dtype_name(h.dtype)}

    for i, p in enumerate(layers):
        if p is None:
            structure.append(None)
        elif isinstance(p, KVPayload):
            structure.append({"kind": "tokens", "arrays": [put(f"{i}.{j}", a) for j, a in enumerate(p.arrays)]})
        else:
            structure.append({"kind": "state", "tree": _to_json(p.states, i, put)})
    meta = {
        "format": FORMAT,
        "layers": structure,
        "logits": None if logits is None else put("logits", logits),
        "record": record or {},
    }
    return _place_body(safetensors.numpy.save(tensors, metadata={"kvtrie": json.dumps(meta)}))


def _place_body(data: bytes) -> bytes:
    """The same safetensors file with its header padded (trailing spaces, as the format allows) so
    that its arrays start where MLX places an array within a cache line: a mapped record's arrays
    are copy sources, and a source 8 bytes behind its destination copies ~20x slower here
    (`arrays.MLX_LINE_OFFSET`)."""
    n = struct.unpack("<Q", data[:8])[0]
    pad = (MLX_LINE_OFFSET - 8 - n) % LINE  # (a multiple of 8: safetensors pads the header to 8)
    if not pad:
        return data
    return b"".join((struct.pack("<Q", n + pad), data[8 : 8 + n], b" " * pad, data[8 + n :]))


def _to_json(tree: Any, layer: int, put, path: str = "") -> Any:
    if isinstance(tree, dict):
        return {"__dict__": {k: _to_json(v, layer, put, f"{path}.{k}" if path else str(k)) for k, v in tree.items()}}
    if isinstance(tree, (list, tuple)):
        return [_to_json(x, layer, put, f"{path}.{i}" if path else str(i)) for i, x in enumerate(tree)]
    if isinstance(tree, (HostArray, mx.array)):
        return put(f"{layer}.s.{path}", tree)
    if tree is None or isinstance(tree, (int, float, str, bool)):
        return tree
    raise TypeError(f"cannot write a {type(tree).__name__} in a cache state to disk")


def _from_json(tree: Any, tensors: dict[str, np.ndarray]) -> Any:
    if isinstance(tree, list):
        return [_from_json(x, tensors) for x in tree]
    if isinstance(tree, dict) and "__tensor__" in tree:
        return HostArray(tensors[tree["__tensor__"]], getattr(mx, tree["dtype"]))
    if isinstance(tree, dict) and "__dict__" in tree:
        return {k: _from_json(v, tensors) for k, v in tree["__dict__"].items()}
    return tree


_NUMPY_DTYPES = {
    "F32": np.float32,
    "F16": np.float16,
    "U16": np.uint16,
    "U32": np.uint32,
    "U8": np.uint8,
    "I32": np.int32,
    "I64": np.int64,
    "F64": np.float64,
    "BOOL": np.bool_,
    "I8": np.int8,
    "I16": np.int16,
    "U64": np.uint64,
}


def _meta(header_bytes: bytes) -> tuple[dict, dict]:
    header = json.loads(header_bytes)
    meta = json.loads(header.pop("__metadata__")["kvtrie"])
    if meta.get("format") != FORMAT:
        raise PayloadCorrupt(f"unknown payload format {meta.get('format')}")
    return header, meta


def decode(data: bytes | memoryview) -> tuple[tuple[Any, ...], Any, dict]:
    """The layer payloads (host arrays), logits and record header of a file made by `encode`.

    The arrays are read-only views of `data` (safetensors' own loader would copy them):
    a restore only reads them.
    """
    n = int.from_bytes(data[:8], "little")
    header, meta = _meta(bytes(data[8 : 8 + n]))
    body = memoryview(data)[8 + n :]
    tensors = {}
    for name, info in header.items():
        start, end = info["data_offsets"]
        tensors[name] = np.frombuffer(body[start:end], dtype=_NUMPY_DTYPES[info["dtype"]]).reshape(info["shape"])
    return _decode_tensors(meta, tensors)


def _decode_tensors(meta: dict, tensors: dict[str, np.ndarray]) -> tuple[tuple[Any, ...], Any, dict]:
    layers: list[Any] = []
    for entry in meta["layers"]:
        if entry is None:
            layers.append(None)
        elif entry["kind"] == "tokens":
            layers.append(KVPayload(tuple(_from_json(a, tensors) for a in entry["arrays"])))
        else:
            layers.append(RecurrentPayload(_from_json(entry["tree"], tensors)))
    logits = None if meta.get("logits") is None else _from_json(meta["logits"], tensors)
    return tuple(layers), logits, meta.get("record", {})


_IOV_MAX = 1024  # buffers per preadv call (Linux's limit)
# records from this size on are mapped, not read: their arrays are views of the page cache (one
# mapping each, so many small records would not run into the kernel's limit on mappings)
MAP_BYTES = 4 << 20
_POPULATE = getattr(mmap, "MAP_POPULATE", 0)  # (Linux: map every page in one call, not one fault at a time)
_mincore: Any = None


def _resident(mapping: mmap.mmap, size: int) -> bool:
    """Whether every page of a mapping made with MAP_POPULATE is in memory. A page the disk failed
    to read stays out, and touching it would kill the process (SIGBUS) where a read raises EIO:
    such a record is read instead. (Without MAP_POPULATE, or without mincore, not checked.)"""
    global _mincore
    if not _POPULATE or size == 0:
        return True
    if _mincore is None:
        try:
            _mincore = ctypes.CDLL(None, use_errno=True).mincore
            _mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)
            _mincore.restype = ctypes.c_int
        except (OSError, AttributeError):
            _mincore = False
    if not _mincore:
        return True
    view = np.frombuffer(mapping, np.uint8)
    try:
        pages = np.zeros(-(-size // mmap.PAGESIZE), np.uint8)
        if _mincore(view.ctypes.data, size, pages.ctypes.data) != 0:
            return False
        return bool((pages & 1).all())
    finally:
        del view


class _Checksum:
    """A record's checksum, from the number of hex digits in its name: 16 for XXH3-64 (written
    since it is ~3x faster than CRC-32 here, 11 vs 3 GB/s), 8 for CRC-32 (records written before)."""

    def __init__(self, digits: int):
        if digits not in (8, 16):
            raise ValueError(f"a checksum of {digits} hex digits")
        self._xxh = xxhash.xxh3_64() if digits == 16 else None
        self._crc = 0

    def update(self, data: Any) -> None:
        if self._xxh is not None:
            self._xxh.update(data)
        else:
            self._crc = zlib.crc32(data, self._crc)

    @property
    def value(self) -> int:
        return self._xxh.intdigest() if self._xxh is not None else self._crc


def _give_back(arrays: list[np.ndarray], pool: Optional[HostPool]) -> None:
    if pool is not None:
        for a in arrays:
            pool.give(a)


@attrs.frozen(eq=False)
class WriteJob:
    """A record to write; the writer names the file `<stem>-<checksum>` (the name carries its checksum)."""

    node_id: int
    stem: str
    layers: tuple[Any, ...]
    logits: Any = None
    record: dict = attrs.Factory(dict)
    data: Any = None  # the node's payload object when the job was made (changed since: superseded)
    state_only: bool = False
    copies: bool = False  # the arrays are copies made for the writer (given back to the pool after)


DIR_MODE = 0o700  # a new disk-tier directory: its owner's alone
RECORD_MODE = 0o600


def private_directory(directory: str | os.PathLike) -> Path:
    """`directory`, created 0700 where it is missing; one that other users can write to is refused
    (`UnsafeDirectoryError`): they could plant well-formed records that kvtrie would restore as state."""
    path = Path(directory)
    if not path.exists():
        path.mkdir(parents=True, mode=DIR_MODE)
        os.chmod(path, DIR_MODE)  # (mkdir's mode passes through the umask)
    st = path.stat()
    if not path.is_dir():
        raise UnsafeDirectoryError(f"disk tier: {path} is not a directory")
    if st.st_mode & 0o022:
        raise UnsafeDirectoryError(
            f"disk tier: {path} is writable by other users (mode {st.st_mode & 0o777:o}); records planted there "
            f"would be restored as state. Use a directory only you can write to (chmod go-w {path}, or a new one)"
        )
    return path


class DiskStore:
    """A directory of payload files and an index, with a background writer."""

    def __init__(self, directory: str | os.PathLike, queue_size: int = 16):
        self.health = DiskHealth(Path(directory))
        try:
            self.dir = private_directory(directory)
            self._made = True
        except OSError as exc:  # a full or failing disk: made by the first write that works
            self.dir = Path(directory)
            self._made = False
            self.health.failed(exc, "creating the directory")
        self._jobs: queue.Queue[Optional[WriteJob | str]] = queue.Queue(maxsize=queue_size)
        # finished jobs: (write job or file deleted, file written or None, error or None)
        self.done: queue.SimpleQueue[tuple[WriteJob | str, Optional[str], Optional[BaseException]]] = (
            queue.SimpleQueue()
        )
        self._thread = threading.Thread(target=self._write_loop, name="kvtrie-disk-writer", daemon=True)
        self._thread.start()
        try:
            for tmp in self.dir.glob("*.tmp"):  # left by a process killed mid-write
                tmp.unlink(missing_ok=True)
            (self.dir / LEGACY_INDEX).unlink(missing_ok=True)
        except OSError as exc:  # (a failing disk: nothing here is needed to serve)
            self.health.failed(exc, "removing temporary files")

    # --- files ---------------------------------------------------------------------------

    def path(self, file: str) -> Path:
        return self.dir / file

    def _atomic_write(self, target: Path, data: bytes) -> None:
        """Write `data` to a temporary file, sync it and rename it to `target`: a record exists whole
        or not at all. On any failure (a full disk) the temporary file is removed and the error raised."""
        if not self._made:
            private_directory(self.dir)
            self._made = True
        tmp = target.with_name(target.name + ".tmp")
        # records are the process's alone: 0600 whatever the umask (prompts can be read back from them)
        fd = _open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, RECORD_MODE)
        try:
            try:
                _write_all(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)  # (a full disk gets its space back)
            raise

    def write(self, stem: str, layers: tuple[Any, ...], logits: Any = None, record: Optional[dict] = None) -> str:
        """Write a record; returns its file name, which carries the checksum."""
        data = encode(layers, logits, record)
        name = f"{stem}-{xxhash.xxh3_64_intdigest(data):016x}.safetensors"
        self._atomic_write(self.path(name), data)
        return name

    @staticmethod
    def stem(file: str) -> str:
        return file.rsplit("-", 1)[0]

    def header(self, file: str) -> dict:
        """A record's header, read without its arrays; PayloadCorrupt if unreadable."""
        try:
            fd = _open(self.path(file), os.O_RDONLY)
            try:
                n = int.from_bytes(_pread(fd, 8, 0), "little")
                if not 0 < n < 1 << 26:
                    raise ValueError(f"header length {n}")
                _, meta = _meta(_pread(fd, n, 8))
            finally:
                os.close(fd)
            return meta.get("record") or {}
        except PayloadCorrupt:
            raise
        except OSError as exc:
            raise _io_error(file, exc) from exc
        except Exception as exc:
            raise PayloadCorrupt(f"{file}: {exc}") from exc

    def read(self, file: str, pool: Optional[HostPool] = None) -> tuple[tuple[Any, ...], Any, dict]:
        """The payloads, logits and header of `file`, verified against the checksum in its name;
        PayloadCorrupt otherwise.

        A record of `MAP_BYTES` or more is mapped into memory read-only: its arrays are views of
        the OS page cache, so reading it copies nothing and fills no fresh memory (a fresh buffer
        page-faults at ~1.3 GB/s on these machines, a tenth of a copy); the restore that follows
        copies once, into the live caches. Smaller records are read with one `preadv` into
        buffers from `pool` (which are warm) and checksummed there. A read the operating system
        fails (EIO) raises `DiskReadError` (a PayloadCorrupt); a mapping is used only when every
        page came in (`_resident`), so a failing disk raises here rather than killing the process
        when a page is touched.
        """
        try:
            digits = file.rsplit("-", 1)[1].split(".")[0]
            expected, checksum = int(digits, 16), _Checksum(len(digits))
        except (ValueError, IndexError) as exc:
            raise PayloadCorrupt(f"{file}: {exc}") from exc
        try:
            fd = _open(self.path(file), os.O_RDONLY)
        except OSError as exc:
            raise _io_error(file, exc) from exc
        arrays: list[np.ndarray] = []
        try:
            size = os.fstat(fd).st_size
            head = _pread(fd, 8, 0)
            n = int.from_bytes(head, "little")
            if len(head) < 8 or not 0 < n <= size - 8:
                raise PayloadCorrupt(f"{file}: header length {n} in a file of {size} bytes")
            header_bytes = _pread(fd, n, 8)
            header, meta = _meta(header_bytes)
            names, at = [], 0
            for name, info in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
                start, end = info["data_offsets"]
                dtype, shape = np.dtype(_NUMPY_DTYPES[info["dtype"]]), tuple(info["shape"])
                if start != at or end - start != math.prod(shape) * dtype.itemsize:
                    raise PayloadCorrupt(f"{file}: tensor {name} does not follow the one before")
                names.append((name, dtype, shape))
                at = end
            if 8 + n + at != size:
                raise PayloadCorrupt(f"{file}: {size} bytes, the header describes {8 + n + at}")
            mapping = None
            if size >= MAP_BYTES:
                mapping = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | _POPULATE, prot=mmap.PROT_READ)
                if not _resident(mapping, size):  # (a page the disk could not read: read it, and see why)
                    mapping.close()
                    mapping = None
            if mapping is not None:
                checksum.update(mapping)  # (the whole file: head, header and body)
                body = 8 + n
                for name, dtype, shape in names:
                    count = math.prod(shape)
                    offset = body + int(header[name]["data_offsets"][0])
                    arrays.append(
                        np.frombuffer(mapping, dtype, count, offset).reshape(shape) if count else np.empty(shape, dtype)
                    )
            else:
                checksum.update(head)
                checksum.update(header_bytes)
                arrays = [
                    pool.take(shape, dtype) if pool is not None else np.empty(shape, dtype) for _, dtype, shape in names
                ]
                # (an ndarray has the buffer protocol; numpy's stubs say so only for Python >= 3.12)
                views = [memoryview(a.reshape(-1).view(np.uint8)) for a in arrays if a.nbytes]  # type: ignore[arg-type]
                got = 0
                for k in range(0, len(views), _IOV_MAX):
                    got += _preadv(fd, views[k : k + _IOV_MAX], 8 + n + got)
                if got != at:
                    raise PayloadCorrupt(f"{file}: read {got} of {at} bytes")
                for v in views:
                    checksum.update(v)
            if checksum.value != expected:
                raise PayloadCorrupt(f"{file}: checksum mismatch ({size} bytes)")
            return _decode_tensors(meta, {name: a for (name, _, _), a in zip(names, arrays)})
        except PayloadCorrupt:
            _give_back(arrays, pool)
            raise
        except OSError as exc:  # the disk failed the read
            _give_back(arrays, pool)
            raise _io_error(file, exc) from exc
        except Exception as exc:  # a file that is not ours, or cut short while read
            _give_back(arrays, pool)
            raise PayloadCorrupt(f"{file}: {exc}") from exc
        finally:
            os.close(fd)

    def delete(self, file: str) -> None:
        self.path(file).unlink(missing_ok=True)

    def delete_quietly(self, file: str) -> bool:
        """Delete now; a failure is reported to the health (the file stays) and False returned."""
        try:
            self.delete(file)
            return True
        except OSError as exc:
            self.health.failed(exc, "deleting a record")
            return False

    def delete_later(self, file: str) -> None:
        """Delete on the writer thread (even while degraded: it gives space back): unlinking a large
        file takes milliseconds off the request path."""
        self._jobs.put(file)

    def files(self) -> set[str]:
        return {p.name for p in self.dir.glob("*.safetensors")}

    # --- write-back --------------------------------------------------------------------------

    def submit(self, job: WriteJob) -> None:
        """Queue a write; blocks while the queue is full (backpressure on a slow disk)."""
        self._jobs.put(job)

    def _write_loop(self) -> None:
        """Every job ends up in `done` with its outcome (a delete only when it failed); the thread
        never dies of a job. While degraded, writes are skipped until a retry is due."""
        health = self.health
        while True:
            job = self._jobs.get()
            if job is None:
                self._jobs.task_done()
                return
            try:
                # (the outcome is in `done` before the health changes: whoever sees the change finds it there)
                if isinstance(job, str):
                    try:
                        self.delete(job)
                    except OSError as exc:
                        self.done.put((job, None, exc))
                        health.failed(exc, "deleting a record")
                    continue
                if not health.writable():
                    self.done.put((job, None, WriteSkipped(health.error)))
                    continue
                try:
                    name = self.write(job.stem, job.layers, job.logits, job.record)
                except OSError as exc:  # ENOSPC, EDQUOT, EIO, EROFS...: the tier degrades
                    self.done.put((job, None, exc))
                    health.failed(exc, "writing a record")
                    continue
                self.done.put((job, name, None))
                health.succeeded()
            except BaseException as exc:  # reported to the cache, which keeps the node unwritten
                self.done.put((job, None, exc))
            finally:
                self._jobs.task_done()

    def flush(self) -> None:
        """Wait until every queued write has finished."""
        self._jobs.join()

    def stop(self) -> None:
        self.flush()
        self._jobs.put(None)
        self._thread.join()

    def clear(self) -> None:
        for name in self.files():
            self.delete_quietly(name)
