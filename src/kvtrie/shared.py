"""A tier shared by processes and machines: content-addressed blocks in Redis.

Payloads are published as fixed-size token blocks (`block_tokens` positions of every
per-token layer) keyed by a hash chain over the tokens: block k's key hashes block k-1's key
and its own tokens, and the chain starts from the model's fingerprint, its cache layout and
the namespace, so other models and tenants never see each other's blocks. A process finds the
longest shared prefix of a prompt with two pipelined round trips (which blocks exist, then
their values) and no shared trie. A recurrent snapshot is keyed by the prefix it ends and
carries the KV of the positions after the last whole block (its tail); each block key's
snapshot offsets are listed in a set, so a reader knows where to look.

Every value is `b"KVT1"`, a CRC-32 of the rest, and a safetensors file whose metadata holds
the format version, the fingerprint, the layout, the cache signature and what the value
covers (the tensors' dtypes and shapes are in its own header). A value that fails any check
is a miss from there on, never state.

With a secret (`secret=`, `PrefixCache(shared_secret=...)`) the tier is authenticated: every
value is `b"KVT2"`, a 32-byte HMAC-SHA-256 over the magic and the body, and the same
safetensors body; the MAC key and a key salt both derive from the secret (BLAKE2b, each with
its own label), and the salt goes into the hash chain's root, so processes with another secret
or none use other keys and share nothing. A value that fails its MAC (forged, damaged, written
with another secret or none) is a miss, counted in `rejected` (and `errors`), never state.
Values are not encrypted: whoever reads the Redis reads them.

Publishing runs on a background thread behind a bounded queue (a full queue drops the job,
counted); it sends only keys Redis lacks, and what it sent is checked again after a minute,
so each block crosses the wire once and a flushed or restarted Redis is refilled. Reads are
synchronous with a short timeout. Any Redis failure (down, slow, flushed, restarted, damaged
values) makes requests go on from the local tiers: it is counted in `errors` and the tier
backs off (0.5 s doubling to 5 s) before trying again. Eviction is Redis's own
(`maxmemory` with `allkeys-lru`).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import queue
import struct
import threading
import time
import zlib
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional

import attrs
import numpy as np

from .arrays import HostArray, numpy_view
from .disk import FORMAT, decode, encode
from .layers import STATE
from .ledger import HOST, IN_FLIGHT, Ledger
from .recurrent import RecurrentPayload
from .snapshot import TOKEN_AXIS, KVPayload

logger = logging.getLogger("kvtrie")

MAGIC = b"KVT1"  # + CRC-32 (4 bytes) + body: no secret
MAGIC_MAC = b"KVT2"  # + HMAC-SHA-256 (32 bytes) over magic + body, + body: with a secret
MAC_SIZE = 32


def secret_bytes(secret: Any) -> bytes:
    """A shared secret as bytes (str as UTF-8): TypeError for another type, ValueError if empty."""
    if isinstance(secret, str):
        secret = secret.encode()
    elif isinstance(secret, (bytearray, memoryview)):
        secret = bytes(secret)
    elif not isinstance(secret, bytes):
        raise TypeError(f"shared_secret must be bytes or str, got {type(secret).__name__}")
    if not secret:
        raise ValueError("shared_secret must not be empty")
    return secret


def derive(secret: bytes) -> tuple[bytes, bytes]:
    """(the MAC key, 64 bytes; the key salt, 16 bytes) of a secret, each from its own label."""
    mac_key = hashlib.blake2b(b"kvtrie|shared|mac|" + secret, digest_size=64).digest()
    salt = hashlib.blake2b(b"kvtrie|shared|keys|" + secret, digest_size=16).digest()
    return mac_key, salt


def mac(mac_key: bytes, body: Any) -> bytes:
    """The MAC of a value's magic + body: HMAC-SHA-256, which OpenSSL runs on the CPU's SHA
    instructions (measured here 2.2x keyed BLAKE2b's speed: the check is most of a restore's cost)."""
    h = hmac.new(mac_key, MAGIC_MAC, "sha256")
    h.update(body)
    return h.digest()


class SharedError(Exception):
    """The shared tier could not answer, or answered something unusable: a miss, never state."""


def connect(url: str, timeout: float) -> Any:
    """A redis-py client for `url` (redis://, rediss://, a password in the URL): a cluster client
    when the node at `url` runs in cluster mode (any node of a Redis Cluster will do; a cluster
    has only db 0). Calls fail at once instead of retrying (redis-py >= 6 retries timeouts and
    connection errors ten times by default): the tier's own backoff decides when to try again."""
    from urllib.parse import urlsplit

    import redis
    from redis.backoff import NoBackoff
    from redis.cluster import RedisCluster
    from redis.retry import Retry

    # large reads: blocks are megabytes (the default 64 KiB reads cost a system call each)
    options = dict(
        socket_timeout=timeout, socket_connect_timeout=timeout, retry=Retry(NoBackoff(), 0), socket_read_size=1 << 20
    )
    parts = urlsplit(url)
    probe = redis.Redis.from_url(parts._replace(path="").geturl(), **options)
    try:
        enabled = int(probe.info("cluster").get("cluster_enabled", 0))
    finally:
        probe.close()
    if not enabled:
        return redis.Redis.from_url(url, **options)
    if parts.path.strip("/") not in ("", "0"):
        raise ValueError(f"a Redis Cluster has only db 0: {url}")
    return RedisCluster.from_url(parts._replace(path="").geturl(), **options)


@attrs.frozen
class SharedHit:
    """What the shared tier holds beyond the local match, up to `end`: runs of per-token
    payloads `(lo, hi, layers)` laid end to end from the local match (host arrays over the
    values' bytes, one entry per layer, None for whole-state layers), and the whole states at
    `end` when the model needs them (else None)."""

    end: int
    runs: tuple[tuple[int, int, tuple[Any, ...]], ...]
    states: Optional[tuple[Any, ...]]


@attrs.define
class _Job:
    namespace: str
    keys: list[tuple[str, Optional[str], str]]  # (value key, index key or None, its entry "offset:key")
    builds: list[Any]  # per key: (kind, start, length, per-layer piece lists, states)
    nbytes: int = 0  # what the job keeps alive until it is sent (in the ledger as in flight)


class SharedTier:
    """Publish and fetch blocks of one model's payloads (one per PrefixCache)."""

    def __init__(
        self,
        url: str,
        *,
        fingerprint: str,
        layout: Sequence[str],
        kinds: Sequence[str],
        block_tokens: int = 256,
        timeout: float = 0.25,
        queue_size: int = 64,
        client: Any = None,
        ledger: Optional[Ledger] = None,
        secret: Optional[bytes] = None,
    ):
        if not isinstance(url, str) or not url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"shared_url must be a redis://, rediss:// or unix:// URL, got {url!r}")
        if isinstance(block_tokens, bool) or not isinstance(block_tokens, int) or block_tokens <= 0:
            raise ValueError(f"shared_block_tokens must be a positive int, got {block_tokens!r}")
        self._mac_key: Optional[bytes] = None
        self._salt = b""
        if secret is not None:
            self._mac_key, self._salt = derive(secret_bytes(secret))
        self._header = 4 + (MAC_SIZE if self._mac_key is not None else 4)
        self.url = url
        self._ledger = ledger
        self.fingerprint = fingerprint
        self.layout = list(layout)
        self.kinds = tuple(kinds)
        self.block = block_tokens
        self.timeout = timeout
        self.signature: Optional[str] = None  # the caches' signature, once the cache knows it
        self.errors = 0
        self.published = 0
        self.dropped = 0
        self.rejected = 0  # values that failed their MAC (with a secret) or checksum
        self.restores = 0
        self.tokens = 0
        self._client = client
        self._client_lock = threading.Lock()
        self._down_until = 0.0
        self._backoff = 0.5
        self._sent: OrderedDict[str, float] = OrderedDict()  # keys this process published, and when (bounded)
        self.resend_after = 60.0  # then a key is checked again (a flushed or restarted Redis is refilled)
        self._jobs: queue.Queue[Optional[_Job]] = queue.Queue(maxsize=queue_size)
        self._thread = threading.Thread(target=self._publish_loop, name="kvtrie-shared-publisher", daemon=True)
        self._thread.start()

    # --- keys --------------------------------------------------------------------------------

    def _root(self, namespace: str) -> bytes:
        h = hashlib.blake2b(digest_size=16)
        if self._salt:  # with a secret: keys nobody without it (or with another) computes
            h.update(b"kvtrie|salt|" + self._salt + b"|")
        h.update(f"kvtrie|{FORMAT}|{self.fingerprint}|{self.layout}|{namespace}|{self.block}".encode())
        return h.digest()

    def chain(self, namespace: str, tokens: np.ndarray, blocks: int) -> list[bytes]:
        """h_0 (the salt) .. h_blocks: h_k covers the first k whole blocks of `tokens`."""
        out = [self._root(namespace)]
        for k in range(blocks):
            h = hashlib.blake2b(out[-1], digest_size=16)
            h.update(np.ascontiguousarray(tokens[k * self.block : (k + 1) * self.block], dtype=np.int32).tobytes())
            out.append(h.digest())
        return out

    @staticmethod
    def block_key(h: bytes) -> str:
        return f"kvtrie:b:{h.hex()}"

    @staticmethod
    def index_key(h: bytes) -> str:
        return f"kvtrie:i:{h.hex()}"

    @staticmethod
    def state_key(h: bytes, tail: np.ndarray) -> str:
        s = hashlib.blake2b(h + b"|s|", digest_size=16)
        s.update(np.ascontiguousarray(tail, dtype=np.int32).tobytes())
        return f"kvtrie:s:{s.hexdigest()}"

    # --- the connection ------------------------------------------------------------------------

    def _redis(self) -> Optional[Any]:
        """The client, or None while backing off after a failure."""
        if time.monotonic() < self._down_until:
            return None
        with self._client_lock:
            if self._client is None:
                try:
                    self._client = connect(self.url, self.timeout)
                except Exception as exc:
                    self._failed(exc)
                    return None
            return self._client

    def _failed(self, exc: BaseException) -> None:
        self.errors += 1
        self._down_until = time.monotonic() + self._backoff
        logger.warning(
            "shared tier %s: %s (%s); local tiers only for %.1f s", self.url, type(exc).__name__, exc, self._backoff
        )
        self._backoff = min(self._backoff * 2, 5.0)

    def _ok(self) -> None:
        self._backoff = 0.5

    # --- reading -------------------------------------------------------------------------------

    def fetch(
        self, namespace: str, tokens: np.ndarray, have: int, floor: int, limit: int, hybrid: bool
    ) -> Optional[SharedHit]:
        """What the shared tier adds beyond the local state: a restore that reaches past `floor`
        (what the local tiers restore) and at most `limit` positions, given that the local trie
        holds per-token payloads for `[0, have)`. None on a miss or any failure."""
        if limit <= floor:
            return None
        client = self._redis()
        if client is None:
            return None
        b = self.block
        whole = limit // b  # whole blocks that end at or before `limit`
        first = have // b  # the first block the local trie does not hold whole
        if whole <= first and not hybrid:
            return None
        chain = self.chain(namespace, tokens, whole)
        lowest = floor // b  # snapshots past `floor` are listed under these block keys
        if not hybrid:  # one round trip: the blocks themselves, up to the first missing one
            try:
                pipe = client.pipeline(transaction=False)
                for k in range(first, whole):
                    pipe.get(self.block_key(chain[k + 1]))
                values = pipe.execute()
                self._ok()
            except Exception as exc:
                self._failed(exc)
                return None
            run = next((i for i, v in enumerate(values) if v is None), len(values))
            target = (first + run) * b
            if target <= floor or target <= have:
                return None
            try:
                return self._assemble(first, have, target, list(range(first, first + run)), values[:run], False)
            except SharedError as exc:
                self.errors += 1
                logger.warning("shared tier %s: %s: a miss from there", self.url, exc)
                return None
        try:
            pipe = client.pipeline(transaction=False)
            for k in range(first, whole):
                pipe.exists(self.block_key(chain[k + 1]))
            if hybrid:
                for k in range(lowest, whole + 1):
                    pipe.smembers(self.index_key(chain[k]))
            answers = pipe.execute()
            present = answers[: max(whole - first, 0)]
            run = next((i for i, x in enumerate(present) if not x), len(present))
            top = first + run  # whole blocks [first, top) are there
            target, state_key = top * b, None
            if hybrid:
                target = -1
                listed = answers[max(whole - first, 0) :]
                for k in range(whole, lowest - 1, -1):  # the deepest snapshot of this prompt that can be used
                    entries = {_text(x) for x in listed[k - lowest]}
                    for o in sorted({int(e.split(":", 1)[0]) for e in entries if ":" in e}, reverse=True):
                        p = k * b + o
                        if not (floor < p <= limit and 0 < o <= b and (p <= have or k <= top)):
                            continue
                        key = self.state_key(chain[k], tokens[k * b : p])
                        if f"{o}:{key}" in entries:  # (others under this block are other prompts' states)
                            target, state_key = p, key
                            break
                    if state_key is not None:
                        break
                if state_key is None:
                    return None
            if target <= floor:
                return None
            need = list(range(first, target // b)) if target > have else []
            pipe = client.pipeline(transaction=False)
            for k in need:
                pipe.get(self.block_key(chain[k + 1]))
            if state_key is not None:
                pipe.get(state_key)
            values = pipe.execute()
            self._ok()
        except Exception as exc:
            self._failed(exc)
            return None
        if any(v is None for v in values):  # evicted meanwhile: a miss, not a fault
            return None
        try:
            return self._assemble(first, have, target, need, values, state_key is not None)
        except SharedError as exc:
            self.errors += 1
            logger.warning("shared tier %s: %s: a miss from there", self.url, exc)
            return None

    def _assemble(
        self, first: int, have: int, target: int, need: list[int], values: list, with_state: bool
    ) -> Optional[SharedHit]:
        """Check and decode the values; one run per block over the values' own bytes (the
        restore makes the only copy), the partial first block and the tail copied compact."""
        b = self.block
        runs: list[tuple[int, int, tuple[Any, ...]]] = []
        good = _check_all(values, self._check)  # on two threads (zlib and hashlib release the GIL)
        if good < len(values):
            self.errors += 1
            self.rejected += 1
            logger.warning(
                "shared tier %s: a value fails its %s: a miss from there",
                self.url,
                "MAC" if self._mac_key is not None else "checksum",
            )
            if with_state or good == 0 or (good * b + first * b) <= have:
                return None
            need, values, target = need[:good], values[:good], (first + good) * b
        for k, value in zip(need, values):
            layers, _, _ = self._decode(value, "block", k * b, b, checked=True)
            lo = max(k * b, have)
            if lo > k * b:
                layers = _cut(layers, self.kinds, lo - k * b)
            runs.append((lo, (k + 1) * b, layers))
        states = None
        if with_state:
            tail_start = (target // b) * b
            layers, _, _ = self._decode(values[len(need)], "state", tail_start, target - tail_start, checked=True)
            states = tuple(p for p, kind in zip(layers, self.kinds) if kind == STATE)
            if any(s is None for s in states):
                raise SharedError("a snapshot without its states")
            lo = max(tail_start, have)
            if target > lo:
                tail = tuple(None if kind == STATE else p for p, kind in zip(layers, self.kinds))
                runs.append((lo, target, _cut(tail, self.kinds, lo - tail_start)))
        for _lo, _hi, layers in runs:
            for i, (p, kind) in enumerate(zip(layers, self.kinds)):
                if kind != STATE and p is None:
                    raise SharedError(f"layer {i} has positions nobody published")
        self.restores += 1
        return SharedHit(target, tuple(runs), states)

    def _decode(
        self, value: bytes, kind: str, start: int, length: int, checked: bool = False
    ) -> tuple[tuple, Any, dict]:
        if not (_framed(value, self._magic, self._header) if checked else self._check(value)):
            self.rejected += 1
            raise SharedError(f"a {kind} value is not a kvtrie value or fails its checksum or MAC")
        body = memoryview(value)[self._header :]
        try:
            layers, logits, record = decode(body)
        except Exception as exc:
            raise SharedError(f"a {kind} value does not decode ({exc})") from exc
        expect = {
            "fingerprint": self.fingerprint,
            "layout": self.layout,
            "kind": kind,
            "start": start,
            "length": length,
        }
        for name, want in expect.items():
            if record.get(name) != want:
                raise SharedError(f"a {kind} value's {name} is {record.get(name)!r}, not {want!r}")
        if self.signature is not None and record.get("signature") != self.signature:
            raise SharedError(f"a {kind} value was made with other caches")
        if len(layers) != len(self.kinds):
            raise SharedError(f"a {kind} value has {len(layers)} layers, not {len(self.kinds)}")
        for p, k in zip(layers, self.kinds):
            if k != STATE and p is not None and any(a.shape[TOKEN_AXIS] != length for a in p.arrays):
                raise SharedError(f"a {kind} value's arrays do not hold {length} positions")
        return layers, logits, record

    # --- publishing ------------------------------------------------------------------------------

    def publish(self, namespace: str, tokens: np.ndarray, path: Sequence[Any], snapshot_ends: Sequence[int]) -> None:
        """Queue the blocks of `tokens` (a stored sequence; `path` its trie nodes, payloads in
        memory) that this process has not published, and its snapshots at `snapshot_ends`.
        Never blocks: a full queue drops the job."""
        if self._redis() is None and time.monotonic() < self._down_until:
            return
        b = self.block
        n = len(tokens)
        chain = self.chain(namespace, tokens, n // b)
        keys: list[tuple[str, Optional[str], str]] = []
        builds: list[Any] = []
        now = time.monotonic()
        fresh = lambda key: now - self._sent.get(key, -1e18) < self.resend_after  # noqa: E731
        for k in range(n // b):
            key = self.block_key(chain[k + 1])
            if fresh(key):
                continue
            pieces = _pieces(path, self.kinds, k * b, (k + 1) * b)
            if pieces is None:
                continue
            keys.append((key, None, ""))
            builds.append(("block", k * b, b, pieces, None))
        for p in snapshot_ends:
            k = p // b
            if k > n // b or p > n:
                continue
            node = next((x for x in path if x.end == p), None)
            if node is None or node.payload.layers is None or not node.payload.has_state:
                continue
            key = self.state_key(chain[k] if k < len(chain) else chain[-1], tokens[k * b : p])
            if fresh(key):
                continue
            pieces = _pieces(path, self.kinds, k * b, p) if p > k * b else [None] * len(self.kinds)
            if pieces is None:
                continue
            states = tuple(_for_thread_state(s) for s, kind in zip(node.payload.layers, self.kinds) if kind == STATE)
            keys.append((key, self.index_key(chain[k]), f"{p - k * b}:{key}"))
            builds.append(("state", k * b, p - k * b, pieces, states))
        if not keys:
            return
        job = _Job(namespace, keys, builds, _held_bytes(builds))
        try:
            self._jobs.put_nowait(job)
        except queue.Full:
            self.dropped += 1
            return
        if self._ledger is not None:
            self._ledger.add(IN_FLIGHT, HOST, job.nbytes)
        for key, _, _ in keys:
            self._sent[key] = now
            self._sent.move_to_end(key)
        while len(self._sent) > 200_000:
            self._sent.popitem(last=False)

    def _value(self, kind: str, start: int, length: int, pieces: list, states: Optional[tuple]) -> bytes:
        layers: list[Optional[KVPayload | RecurrentPayload]] = []
        state_iter = iter(states or ())
        for i, kind_i in enumerate(self.kinds):
            if kind_i == STATE:
                layers.append(_host_state(next(state_iter)) if states is not None else None)
            elif pieces[i] is None:
                layers.append(None)
            else:
                nodes = pieces[i]  # per node: [(array, lo, hi) per payload array]
                arrays = []
                for j in range(len(nodes[0])):
                    cut = [
                        _np(a)[(slice(None),) * TOKEN_AXIS + (slice(lo, hi),)] for a, lo, hi in (e[j] for e in nodes)
                    ]
                    arrays.append(
                        HostArray(np.ascontiguousarray(np.concatenate(cut, axis=TOKEN_AXIS)), nodes[0][j][0].dtype)
                    )
                layers.append(KVPayload(tuple(arrays)))
        record = {
            "fingerprint": self.fingerprint,
            "layout": self.layout,
            "signature": self.signature,
            "kind": kind,
            "start": start,
            "length": length,
        }
        body = encode(layers, None, record)
        if self._mac_key is not None:
            return MAGIC_MAC + mac(self._mac_key, body) + body
        return MAGIC + struct.pack(">I", zlib.crc32(body)) + body

    @property
    def _magic(self) -> bytes:
        return MAGIC_MAC if self._mac_key is not None else MAGIC

    def _check(self, value: Any) -> bool:
        """Whether a value is this tier's kind (its magic) and passes its MAC or checksum."""
        if self._mac_key is None:
            return _crc_ok(value)
        if not _framed(value, MAGIC_MAC, self._header):
            return False
        return hmac.compare_digest(
            mac(self._mac_key, memoryview(value)[self._header :]), bytes(value[4 : self._header])
        )

    def _publish_loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                client = self._redis()
                if client is None:
                    self.dropped += 1
                    continue
                pipe = client.pipeline(transaction=False)
                for key, _, _ in job.keys:
                    pipe.exists(key)
                there = pipe.execute()
                pipe = client.pipeline(transaction=False)
                sent = 0
                for (key, index, entry), build, exists in zip(job.keys, job.builds, there):
                    if not exists:  # (another process, or this one before a restart, sent it)
                        pipe.set(key, self._value(*build))
                        sent += 1
                    if index is not None:
                        pipe.sadd(index, entry)
                pipe.execute()
                self.published += sent
                self._ok()
            except Exception as exc:
                for key, _, _ in job.keys:  # not there: may be sent again
                    self._sent.pop(key, None)
                self._failed(exc)
            finally:
                if self._ledger is not None:
                    self._ledger.add(IN_FLIGHT, HOST, -job.nbytes)
                self._jobs.task_done()

    def flush(self) -> None:
        """Wait until every queued job has been sent (or failed)."""
        self._jobs.join()

    def close(self) -> None:
        self.flush()
        self._jobs.put(None)
        self._thread.join(timeout=10)
        with self._client_lock:
            if self._client is not None:
                try:
                    self._client.close()
                except Exception:
                    pass

    def stats(self) -> dict[str, int]:
        return {
            "shared_restores": self.restores,
            "shared_tokens": self.tokens,
            "shared_published": self.published,
            "shared_dropped": self.dropped,
            "shared_errors": self.errors,
            "shared_rejected": self.rejected,
        }


_CHECKERS = ThreadPoolExecutor(max_workers=2, thread_name_prefix="kvtrie-shared-check")


def _crc_ok(value: Any) -> bool:
    if not isinstance(value, (bytes, bytearray)) or len(value) < 8 or value[:4] != MAGIC:
        return False
    (crc,) = struct.unpack(">I", value[4:8])
    return zlib.crc32(memoryview(value)[8:]) == crc


def _check_all(values: Sequence[Any], check: Any = _crc_ok) -> int:
    """How many leading values pass `check` (large ones checked in parallel)."""
    big = sum(len(v) for v in values if isinstance(v, (bytes, bytearray))) >= 8 << 20
    results = list(_CHECKERS.map(check, values)) if big and len(values) > 1 else [check(v) for v in values]
    return next((i for i, ok in enumerate(results) if not ok), len(results))


def _framed(value: Any, magic: bytes, header: int) -> bool:
    return isinstance(value, (bytes, bytearray)) and len(value) >= header and value[:4] == magic


def _text(x: Any) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


def _cut(layers: tuple[Any, ...], kinds: Sequence[str], skip: int) -> tuple[Any, ...]:
    """Per-token payloads without their first `skip` positions, as compact copies (a view
    would keep the whole value alive)."""
    index = (slice(None),) * TOKEN_AXIS + (slice(skip, None),)
    return tuple(
        p
        if kind == STATE or p is None
        else KVPayload(tuple(HostArray(np.array(a.data[index]), a.dtype) for a in p.arrays))
        for p, kind in zip(layers, kinds)
    )


def _held_bytes(builds: list[Any]) -> int:
    """Bytes of the positions and states a publish job reads (the arrays it keeps alive, at most)."""
    total = 0
    for _, _, _, pieces, states in builds:
        for layer in pieces or ():
            for node in layer or ():
                for a, lo, hi in node:
                    total += a.nbytes * (hi - lo) // max(a.shape[TOKEN_AXIS], 1)
        for p in states or ():
            total += p.nbytes
    return total


def _np(a: Any) -> np.ndarray:
    return a.data if isinstance(a, HostArray) else numpy_view(a)


def _for_thread(a: Any, lo: int, hi: int) -> tuple[Any, int, int]:
    """Positions `[lo, hi)` of `a` as the publisher thread may read them later: a device array
    as it is (immutable), a host array's slice copied (pooled buffers are reused)."""
    if isinstance(a, HostArray):
        index = (slice(None),) * TOKEN_AXIS + (slice(lo, hi),)
        return HostArray(np.array(a.data[index]), a.dtype), 0, hi - lo
    return a, lo, hi


def _for_thread_state(p: RecurrentPayload) -> RecurrentPayload:
    return p.map(lambda a: HostArray(np.array(a.data), a.dtype) if isinstance(a, HostArray) else a)


def _host_state(p: RecurrentPayload) -> RecurrentPayload:
    return p.map(lambda a: a if isinstance(a, HostArray) else HostArray(np.asarray(numpy_view(a)), a.dtype))


def _pieces(path: Sequence[Any], kinds: Sequence[str], lo: int, hi: int) -> Optional[list]:
    """Per layer, the pieces that make up positions `[lo, hi)` along `path`: for a per-token
    layer a list over the nodes it crosses of `[(array, first, last) per payload array]`
    (None for a whole-state layer). None if a position is missing in some layer (a window
    hole, a node on disk)."""
    out: list[Any] = []
    for i, kind in enumerate(kinds):
        if kind == STATE:
            out.append(None)
            continue
        layer = []
        covered = 0
        for node in path:
            if node.end <= lo or node.start >= hi:
                continue
            layers = node.payload.layers
            if layers is None or layers[i] is None:
                return None
            a, b = max(lo, node.start) - node.start, min(hi, node.end) - node.start
            layer.append([_for_thread(x, a, b) for x in layers[i].arrays])
            covered += b - a
        if covered != hi - lo:
            return None
        out.append(layer)
    return out
