"""A full or failing disk degrades the disk tier, never the requests (issue 23, item 6).

Disk full (ENOSPC, EDQUOT) or failing (EIO) under `disk_dir`: no call raises, every restore equals
a cold computation, the tier turns degraded (one warning, `disk_degraded`, `disk_write_errors`,
`disk_read_errors`), does not try every write meanwhile, and resumes once space returns; a restart
loads nothing half-written. Where the machine allows it (root, CAP_SYS_ADMIN), the disk is a real
size-limited tmpfs filled up for the test; everywhere, the same scenarios run with the errors
injected at the file layer (`kvtrie.disk`'s system calls).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from kvtrie import PrefixCache, disk

from fakes import FakeModel, assert_cold, check_invariants, draw_tokens, lcp, prefill_and_commit
from test_disk import sequences, serve
from test_ledger import check_ledger
from test_paging import check_tiers_and_budgets

# --- the faults -------------------------------------------------------------------------------


class Faults:
    """Errors injected into `kvtrie.disk`'s system calls while set: `write` (an errno) fails the
    writes of records after half of each was written, as a disk filling up would; `read` fails the
    reads (`reads_of(file name)` picks which files, all when None). Counts the writes tried."""

    def __init__(self):
        self.write: int | None = None
        self.read: int | None = None
        self.reads_of = None
        self.read_calls = ("pread", "preadv")  # which reads fail (preadv alone: a record's arrays)
        self.attempts = 0  # writes of records tried (failed or not)
        self._names: dict[int, str] = {}
        self._saved: dict[str, object] = {}

    def install(self, patch=None) -> None:
        """Patch kvtrie.disk (with `patch`, e.g. monkeypatch.setattr; else undone by `uninstall`)."""
        write_all, open_, pread, preadv = disk._write_all, disk._open, disk._pread, disk._preadv

        def failing_write(fd, data):
            self.attempts += 1
            if self.write is not None:
                os.write(fd, bytes(data)[: len(data) // 2])
                raise OSError(self.write, os.strerror(self.write))
            write_all(fd, data)

        def recording_open(path, flags, *mode):
            fd = open_(path, flags, *mode)
            self._names[fd] = os.path.basename(path)
            return fd

        def fails(fd, call: str) -> bool:
            return (self.read is not None and call in self.read_calls
                    and (self.reads_of is None or self.reads_of(self._names.get(fd, ""))))

        def failing_pread(fd, n, offset):
            if fails(fd, "pread"):
                raise OSError(self.read, os.strerror(self.read))
            return pread(fd, n, offset)

        def failing_preadv(fd, buffers, offset):
            if fails(fd, "preadv"):
                raise OSError(self.read, os.strerror(self.read))
            return preadv(fd, buffers, offset)

        patches = {"_write_all": failing_write, "_open": recording_open, "_pread": failing_pread, "_preadv": failing_preadv}
        for name, value in patches.items():
            if patch is None:
                self._saved[name] = getattr(disk, name)
                setattr(disk, name, value)
            else:
                patch(disk, name, value)

    def uninstall(self) -> None:
        for name, value in self._saved.items():
            setattr(disk, name, value)
        self._saved = {}


class Clock:
    """The disk tier's health clock, moved by hand: no retry is due until the test says so."""

    def __init__(self):
        self.t = time.monotonic()

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


def tmp_files(directory) -> list[str]:
    return [p.name for p in Path(directory).rglob("*.tmp")]


# --- the disks --------------------------------------------------------------------------------


class InjectedFullDisk:
    """A disk that is full while `fill()`ed: the writes of records fail with ENOSPC."""

    def __init__(self, directory: Path, faults: Faults):
        self.directory, self.faults = directory, faults

    def fill(self) -> None:
        self.faults.write = errno.ENOSPC

    def free(self) -> None:
        self.faults.write = None


def mount_tmpfs(path: Path, size: str) -> None:
    """Mount a size-limited tmpfs (0700) at `path`, or skip the test where that is not permitted."""
    if not sys.platform.startswith("linux") or os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root on Linux")
    path.mkdir(parents=True, exist_ok=True)
    out = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
                         capture_output=True, text=True, check=False)
    if out.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here: {out.stderr.strip()}")


def unmount(path: Path) -> None:
    subprocess.run(["umount", str(path)], capture_output=True, check=False)
    if os.path.ismount(path):
        subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


class TmpfsFullDisk:
    """A small tmpfs, really full while `fill()`ed: a filler file takes every page that is left."""

    def __init__(self, mount: Path):
        self.mount = mount
        self.directory = mount / "kv"
        self.filler = mount / "filler"

    def fill(self) -> None:
        """Fill (or top up) the filesystem to its last page."""
        with open(self.filler, "ab", buffering=0) as f:
            for chunk in (1 << 16, 1 << 12):
                try:
                    while True:
                        f.write(b"\0" * chunk)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC, exc
        assert os.statvfs(self.mount).f_bavail == 0

    def free(self) -> None:
        self.filler.unlink()


@pytest.fixture
def full_disk(request, tmp_path, monkeypatch):
    """(directory, disk, faults): a disk tier directory whose disk `fill()`s and `free()`s, on a
    real tmpfs ("tmpfs", skipped where mounting is not permitted) or by injection ("injected");
    faults are installed in both (they count the writes tried), and the health clock is a `Clock`."""
    faults = Faults()
    faults.install(monkeypatch.setattr)
    clock = Clock()
    monkeypatch.setattr(disk, "_now", clock)
    if request.param == "tmpfs":
        mount = tmp_path / "mnt"
        mount_tmpfs(mount, "2M")
        request.addfinalizer(lambda: unmount(mount))
        full = TmpfsFullDisk(mount)
    else:
        full = InjectedFullDisk(tmp_path / "kv", faults)
    full.clock = clock
    return full.directory, full, faults


def degraded_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "kvtrie" and r.levelno >= logging.WARNING]


def check_everything(pc, model) -> None:
    """The trie's invariants and payloads, the tiers, and the ledger within the budgets (once the
    writes in flight have landed: until then their memory is held in the ledger on top)."""
    for _ in range(10):  # (a write that failed brings its node back: the budgets may send it down again)
        pc._storage.disk.flush()
        with pc._lock:
            pc._storage.drain()
            if not pc._storage.disk._in_flight:
                break
    check_invariants(pc, (), model)
    check_tiers_and_budgets(pc, strict=True)
    check_ledger(pc, strict=True)


# --- (a) a full disk ------------------------------------------------------------------------------


@pytest.mark.parametrize("kinds", ["KK", "KRK"])
@pytest.mark.parametrize("full_disk", ["tmpfs", "injected"], indirect=True)
def test_a_full_disk_degrades_the_tier_and_writes_resume_when_space_returns(full_disk, kinds, caplog):
    directory, full, faults = full_disk
    clock = full.clock
    model = FakeModel(kinds=kinds, heads=1, dim=4)
    settings_ = dict(disk_dir=str(directory), fingerprint="f", snapshot_interval=8, device_bytes=800, host_bytes=800,
                     persist_seconds=None)
    caplog.set_level(logging.INFO, logger="kvtrie")
    pc = PrefixCache(model.make_cache, **settings_)
    before, during, after = sequences(30, 8), sequences(31, 24), sequences(32, 8)
    for tokens in before:
        serve(pc, model, tokens)
    pc.persist(wait=True)
    stats = pc.stats()
    assert stats["disk_writes"] > 0 and stats["disk_degraded"] == 0 and stats["disk_write_errors"] == 0

    full.fill()  # the memory budgets are small: nodes page out to disk on every request
    for i, tokens in enumerate(during):  # serve() asserts each restore equals a cold run
        serve(pc, model, tokens)
        serve(pc, model, before[i % len(before)] + [i % 5])
        if i == 0:
            pc.persist(wait=True)
            assert pc.stats()["disk_degraded"] == 1
            tried = faults.attempts
        check_everything(pc, model)
    pc.persist(wait=True)
    assert faults.attempts == tried, "while degraded and before a retry is due, no write is tried"
    stats = pc.stats()
    assert stats["disk_degraded"] == 1 and stats["disk_write_errors"] >= 1
    assert stats["disk_errors"] == stats["disk_write_errors"] + stats["disk_read_errors"]
    assert stats["evictions"] > 0  # what could not be written went as evictions, within the budgets
    warnings = degraded_warnings(caplog)
    assert len(warnings) == 1, warnings
    assert str(directory) in warnings[0] and "No space left on device" in warnings[0]
    assert not tmp_files(directory), "a failed write leaves no temporary file"

    # a retry is due while the disk is still full: one write tries, fails, and the rest wait again
    serve(pc, model, [1, 2, 3, 4, 5])
    pc._storage.disk.flush()  # (deletes done: the top-up below is the last word on free space)
    full.fill()
    assert pc._storage.disk._unsaved
    clock.advance(5)
    pc.persist(wait=True)
    assert faults.attempts == tried + 1 and pc.stats()["disk_degraded"] == 1
    check_everything(pc, model)

    full.free()
    clock.advance(60)  # past any backoff
    writes = pc.stats()["disk_writes"]
    for tokens in after:
        serve(pc, model, tokens)
    pc.persist(wait=True)
    stats = pc.stats()
    assert stats["disk_degraded"] == 0 and stats["disk_writes"] > writes
    assert any("writes resumed" in r.getMessage() and r.levelno == logging.INFO for r in caplog.records)
    assert len(degraded_warnings(caplog)) == 1
    expected = {}
    for tokens in after:
        with pc.begin(tokens + [3]) as s:
            expected[tuple(tokens)] = s.cached
    check_everything(pc, model)

    # a restart as after kill -9: only records (whole ones) survive, and they restore correctly
    pc.persist(wait=True)
    pc._stop_persisting.set()
    pc._storage.disk.close()
    assert not tmp_files(directory)
    pc2 = PrefixCache(model.make_cache, **settings_)
    assert pc2.stats()["disk_read_errors"] == 0 and pc2.stats()["disk_bytes"] > 0
    got = {tuple(t): serve(pc2, model, t + [3]) for t in after}
    assert all(got[t] >= expected[t] for t in got) and sum(got.values()) > 0, [(len(t), got[t], expected[t]) for t in got]
    assert pc2.stats()["cached_tokens_disk"] > 0
    for tokens in before + during:
        serve(pc2, model, tokens + [3])  # what restores equals a cold run
    check_everything(pc2, model)
    pc2.close()


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS])
def test_failed_writes_settle_the_ledger_and_keep_the_nodes_in_memory(tmp_path, monkeypatch, code):
    """A record that fails to write: its copies' charge in the ledger is settled, its node stays in
    memory as if never written (saved again once writes resume); a node that was leaving memory for
    the disk comes back, and goes as an ordinary eviction where the budget needs it."""
    faults = Faults()
    faults.install(monkeypatch.setattr)
    clock = Clock()
    monkeypatch.setattr(disk, "_now", clock)
    model = FakeModel(kinds="KK", heads=1, dim=4)
    pc = PrefixCache(model.make_cache, disk_dir=str(tmp_path), fingerprint="f", persist_seconds=None)
    faults.write = code
    seqs = sequences(40, 6)
    for tokens in seqs:
        serve(pc, model, tokens)
    pc.persist(wait=True)
    stats = pc.stats()
    assert stats["disk_degraded"] == 1 and stats["disk_write_errors"] == 1 and stats["disk_writes"] == 0
    assert stats["held"]["in_flight"] == 0 and not pc._storage.disk._in_flight
    assert stats["disk_bytes"] == 0 and all(n.payload.tier != "disk" for _, n, _ in pc.walk())
    check_everything(pc, model)
    # writes back from memory while degraded: nothing to write them with, so they are evicted
    pc.set_budgets(host_bytes=0, device_bytes=0)
    assert pc.stats()["nodes"] == 0 and pc.stats()["evictions"] > 0
    assert faults.attempts == 1  # (no retry due yet: nothing else was tried)
    for tokens in seqs:
        serve(pc, model, tokens + [1])  # nothing restores: a miss, computed
    pc.set_budgets(host_bytes=None, device_bytes=None)
    for tokens in seqs:
        serve(pc, model, tokens)
    faults.write = None
    clock.advance(60)
    assert pc.persist(wait=True) > 0
    stats = pc.stats()
    assert stats["disk_degraded"] == 0 and stats["disk_writes"] > 0
    assert all(pc._storage.disk.persisted(n) for _, n, _ in pc.walk())
    check_everything(pc, model)
    pc.close()


def test_a_failing_delete_is_counted_never_raised(tmp_path, monkeypatch):
    """Before: a delete that failed on the writer thread raised AttributeError out of the next
    `begin` (the drain took the file name for a write job)."""
    model = FakeModel(kinds="KK", heads=1, dim=4)
    pc = PrefixCache(model.make_cache, device_bytes=0, host_bytes=0, disk_dir=str(tmp_path), disk_bytes=2000,
                     fingerprint="f", persist_seconds=None)

    def failing_delete(self, file):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(disk.DiskStore, "delete", failing_delete)
    for i, tokens in enumerate(sequences(41, 30)):  # the disk budget evicts records all the time
        serve(pc, model, tokens + [i])
    pc.persist(wait=True)
    stats = pc.stats()
    assert stats["evictions"] > 0 and stats["disk_write_errors"] > 0 and stats["disk_degraded"] == 1
    check_everything(pc, model)
    pc.close()


# --- (b) failing reads -------------------------------------------------------------------------------


def record_of(directory: Path, start: int, tokens: list[int]) -> str:
    """The name of the KV record that holds `tokens` from `start` on."""
    for path in directory.glob("*.safetensors"):
        data = path.read_bytes()
        n = int.from_bytes(data[:8], "little")
        record = json.loads(json.loads(data[8 : 8 + n])["__metadata__"]["kvtrie"])["record"]
        if record["kv"] and record["start"] == start and record["tokens"] == tokens:
            return path.name
    raise AssertionError(f"no record holds {len(tokens)} tokens from {start}")


@pytest.fixture(params=["read", "mapped"])
def reads(request, monkeypatch):
    """Records read into pooled buffers, or mapped (every record: MAP_BYTES 0)."""
    if request.param == "mapped":
        monkeypatch.setattr(disk, "MAP_BYTES", 0)
    return request.param


LONG = [(7 * i) % 50 for i in range(60)]
BRANCH = LONG[:20] + [1, 2, 3]


def two_branches(directory: Path, model: FakeModel) -> None:
    """Records [0, 20), [20, 60) and [20, 23): two sequences written at close."""
    with PrefixCache(model.make_cache, disk_dir=str(directory), fingerprint="f", persist_seconds=None) as pc:
        serve(pc, model, LONG)
        serve(pc, model, BRANCH)
    assert len(list(directory.glob("*.safetensors"))) == 3


def test_eio_on_a_fault_in_is_a_miss_for_that_part(tmp_path, monkeypatch, caplog, reads):
    """The record of [20, 60) fails to read (EIO): the restore stops at 20 (what it holds equals a
    cold run), that record is forgotten, counted, one warning; the request computes the rest, which
    restores from memory after; the other branch still restores from disk."""
    faults = Faults()
    faults.install(monkeypatch.setattr)
    clock = Clock()
    monkeypatch.setattr(disk, "_now", clock)
    model = FakeModel(kinds="KK", heads=1, dim=4)
    two_branches(tmp_path, model)
    broken = record_of(tmp_path, 20, LONG[20:])
    pc = PrefixCache(model.make_cache, disk_dir=str(tmp_path), fingerprint="f", persist_seconds=None)
    assert pc.stats()["disk_bytes"] > 0 and pc.stats()["host_bytes"] == 0
    faults.read, faults.reads_of = errno.EIO, lambda name: name == broken
    caplog.set_level(logging.INFO, logger="kvtrie")
    assert serve(pc, model, LONG + [9]) == 20  # (serve asserts the 20 equal a cold run)
    stats = pc.stats()
    assert stats["disk_read_errors"] == 1 and stats["disk_errors"] == 1 and stats["disk_degraded"] == 1
    warnings = degraded_warnings(caplog)
    assert len(warnings) == 1 and str(tmp_path) in warnings[0] and "Input/output error" in warnings[0], warnings
    assert serve(pc, model, LONG + [8]) == 60  # computed by the request before: from memory
    assert serve(pc, model, BRANCH + [4]) == 23  # the other branch's record reads
    assert pc.stats()["cached_tokens_disk"] >= 3 and pc.stats()["disk_read_errors"] == 1
    check_everything(pc, model)
    clock.advance(60)
    pc.persist(wait=True)  # (writes work: the degraded state ends with the next write)
    assert pc.stats()["disk_degraded"] == 0
    pc.close()


def test_eio_everywhere_restores_nothing_and_raises_nothing(tmp_path, monkeypatch, reads):
    model = FakeModel(kinds="KRK", heads=1, dim=4)
    seqs = sequences(42)
    with PrefixCache(model.make_cache, disk_dir=str(tmp_path), fingerprint="f", snapshot_interval=8) as pc:
        for tokens in seqs:
            serve(pc, model, tokens)
    faults = Faults()
    faults.install(monkeypatch.setattr)
    pc = PrefixCache(model.make_cache, disk_dir=str(tmp_path), fingerprint="f", snapshot_interval=8, persist_seconds=None)
    faults.read = errno.EIO
    for tokens in seqs:
        serve(pc, model, tokens + [3])  # from disk: misses; from what earlier requests computed: hits
    stats = pc.stats()
    assert stats["disk_read_errors"] >= 1 and stats["disk_restores"] == 0 and stats["cached_tokens_disk"] == 0
    check_everything(pc, model)
    pc.close()


def test_a_record_whose_pages_did_not_all_come_in_is_read_not_mapped(tmp_path, monkeypatch):
    """A mapped record's page the disk failed to read would kill the process (SIGBUS) when touched:
    such a record (`_resident` False) is read with preadv instead, where EIO is a miss."""
    monkeypatch.setattr(disk, "MAP_BYTES", 0)
    model = FakeModel(kinds="KK", heads=1, dim=4)
    two_branches(tmp_path, model)
    monkeypatch.setattr(disk, "_resident", lambda mapping, size: False)
    pc = PrefixCache(model.make_cache, disk_dir=str(tmp_path), fingerprint="f", persist_seconds=None)
    assert serve(pc, model, BRANCH + [4]) == 23
    read = [n for _, n, _ in pc.walk() if n.payload.tier == "host"]
    assert read and all(a.data.flags.writeable for n in read for p in n.payload.layers for a in p.arrays)  # not mapped
    faults = Faults()
    faults.install(monkeypatch.setattr)
    broken = record_of(tmp_path, 20, LONG[20:])
    faults.read, faults.reads_of, faults.read_calls = errno.EIO, lambda name: name == broken, ("preadv",)
    assert serve(pc, model, LONG + [1]) == 20
    assert pc.stats()["disk_read_errors"] == 1
    check_everything(pc, model)
    pc.close()


def test_start_up_skips_records_the_disk_cannot_read_and_keeps_them(tmp_path, monkeypatch, caplog):
    """Before: a record whose header failed to read (EIO) at start was deleted, and a directory
    that could not be listed raised out of PrefixCache(). Now: skipped (with what hangs off it),
    counted, one warning, left for a later start, which loads them."""
    model = FakeModel(kinds="KRK", heads=1, dim=4)
    seqs = sequences(43)
    with PrefixCache(model.make_cache, disk_dir=str(tmp_path), fingerprint="f", snapshot_interval=8) as pc:
        for tokens in seqs:
            serve(pc, model, tokens)
    files = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    faults = Faults()
    faults.install(monkeypatch.setattr)
    faults.read = errno.EIO
    caplog.set_level(logging.INFO, logger="kvtrie")
    pc = PrefixCache(model.make_cache, disk_dir=str(tmp_path), fingerprint="f", snapshot_interval=8, persist_seconds=None)
    stats = pc.stats()
    assert stats["disk_bytes"] == 0 and stats["disk_read_errors"] == len(files) and stats["disk_degraded"] == 1
    assert len(degraded_warnings(caplog)) == 1
    faults.read = None
    for tokens in seqs:
        serve(pc, model, tokens + [3])
    pc.close()
    assert set(files) <= {p.name for p in tmp_path.glob("*.safetensors")}  # nothing deleted
    pc = PrefixCache(model.make_cache, disk_dir=str(tmp_path), fingerprint="f", snapshot_interval=8, persist_seconds=None)
    assert pc.stats()["disk_read_errors"] == 0 and pc.stats()["disk_bytes"] > 0
    assert sum(serve(pc, model, tokens + [4]) for tokens in seqs) > 0
    pc.close()

    def unlistable(self):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(disk.DiskStore, "files", unlistable)
    pc = PrefixCache(model.make_cache, disk_dir=str(tmp_path), fingerprint="f", persist_seconds=None)
    assert pc.stats()["disk_degraded"] == 1 and pc.stats()["disk_bytes"] == 0
    assert serve(pc, model, seqs[0]) == 0
    pc.close()


def test_a_record_hanging_off_one_superseded_in_flight_survives_a_restart(tmp_path, monkeypatch):
    """A record queued while the record before it on its path was in flight names that one as its
    parent; when the earlier node changed before its write landed (split by a new branch), the
    earlier record was deleted as superseded and the later one became an orphan: deleted at the
    next start, its tokens lost. Now a record stays while records hang off it."""
    import threading

    model = FakeModel(kinds="KK", heads=1, dim=4)
    settings_ = dict(disk_dir=str(tmp_path), fingerprint="f", persist_seconds=None)
    pc = PrefixCache(model.make_cache, **settings_)
    a = [(3 * i) % 17 for i in range(40)]
    b = a + [5] * 20
    gate = threading.Event()
    write_all = disk._write_all

    def held(fd, data):
        gate.wait(30)
        write_all(fd, data)

    monkeypatch.setattr(disk, "_write_all", held)
    serve(pc, model, a)
    pc.persist()  # [0, 40) in flight
    serve(pc, model, b)
    pc.persist()  # [40, 60) in flight, hanging off the record of [0, 40)
    serve(pc, model, a[:20] + [9, 9, 9])  # splits [0, 40) before its record lands
    gate.set()
    pc.persist(wait=True)
    pc.close()
    pc = PrefixCache(model.make_cache, **settings_)
    assert serve(pc, model, b + [1]) == len(b)
    pc.close()
    names = {p.name for p in tmp_path.glob("*.safetensors")}
    pc = PrefixCache(model.make_cache, **settings_)
    pc.clear()  # nothing left hangs off anything: every record goes
    pc.persist(wait=True)
    assert names and not list(tmp_path.glob("*.safetensors"))
    pc.close()


# --- (c) faults at random, with restarts ------------------------------------------------------------


class DiskFaultMachine(RuleBasedStateMachine):
    """Requests, persists and restarts while writes fail (ENOSPC, EDQUOT, EIO) and reads fail (EIO)
    on and off, and time passes for the retries: no call raises, every restore equals a cold run,
    the ledger stays within the budgets, nothing half-written is left or loaded."""

    @initialize(
        kinds=st.sampled_from(["KK", "KRK"]),
        device=st.sampled_from([None, 0, 400, 2000]),
        host=st.sampled_from([None, 0, 400, 2000]),
        disk_budget=st.sampled_from([None, 3000]),
        mapped=st.booleans(),
        seed=st.integers(0, 1000),
    )
    def setup(self, kinds, device, host, disk_budget, mapped, seed):
        self.saved = {"MAP_BYTES": disk.MAP_BYTES, "_now": disk._now}
        disk.MAP_BYTES = 0 if mapped else disk.MAP_BYTES
        self.clock = Clock()
        disk._now = self.clock
        self.faults = Faults()
        self.faults.install()
        self.dir = tempfile.mkdtemp(prefix="kvtrie-faults-")
        self.model = FakeModel(kinds=kinds, heads=1, dim=4)
        self.settings = dict(device_bytes=device, host_bytes=host, disk_dir=self.dir, disk_bytes=disk_budget,
                             fingerprint="m", snapshot_interval=5, persist_seconds=None)
        self.pc = PrefixCache(self.model.make_cache, **self.settings)
        self.stored: list[list[int]] = []
        for tokens in sequences(seed, 4):  # (something on disk from the start)
            self.serve(tokens)
        self.pc.persist(wait=True)

    def serve(self, tokens: list[int]) -> None:
        with self.pc.begin(tokens) as s:
            assert s.cached <= min(max((lcp(tokens, t) for t in self.stored), default=0), len(tokens) - 1)
            assert_cold(self.model, s.caches, tokens, s.cached)
            prefill_and_commit(self.model, s, tokens)
        self.stored.append(tokens)

    @rule(data=st.data())
    def request(self, data):
        self.serve(draw_tokens(data, self.stored))

    @rule(data=st.data())
    def come_back(self, data):
        """A stored sequence and one more token: it restores whatever is left of it."""
        self.serve(data.draw(st.sampled_from(self.stored)) + [data.draw(st.integers(0, 3))])

    @rule(wait=st.booleans())
    def persist(self, wait):
        self.pc.persist(wait=wait)

    @rule(code=st.sampled_from([errno.ENOSPC, errno.EDQUOT, errno.EIO]))
    def writes_fail(self, code):
        self.faults.write = code

    @rule()
    def writes_work(self):
        self.faults.write = None

    @rule(reads=st.booleans())
    def reads_fail(self, reads):
        self.faults.read = errno.EIO if reads else None

    @rule(seconds=st.sampled_from([0.5, 3.0, 30.0]))
    def time_passes(self, seconds):
        self.clock.advance(seconds)

    @rule(crash=st.booleans())
    def restart(self, crash):
        """Close (what fits goes to disk, if writes work) or end as kill -9 would after a persist;
        reopen on the same directory, faults as they are."""
        if crash:
            self.pc.persist(wait=True)
            self.pc._stop_persisting.set()
            self.pc._storage.disk.close()
        else:
            self.pc.close()
        assert not tmp_files(self.dir)
        self.pc = PrefixCache(self.model.make_cache, **self.settings)

    @invariant()
    def holds(self):
        if hasattr(self, "pc"):
            stats = self.pc.stats()
            assert stats["disk_degraded"] in (0, 1)
            assert stats["disk_errors"] == stats["disk_write_errors"] + stats["disk_read_errors"]
            for what in ("disk_degraded", "disk_write_errors", "disk_read_errors", "disk_restores", "disk_writes"):
                if stats[what]:
                    event(what)
            if self.faults.read is None and self.faults.write is None:
                check_everything(self.pc, self.model)
            else:  # (with faults on, landing the writes in flight may read from disk: checked without)
                check_invariants(self.pc, (), self.model)
            self.pc._storage.disk.flush()  # (a write in progress has its temporary file)
            assert not tmp_files(self.dir)

    def teardown(self):
        if hasattr(self, "pc"):
            self.faults.write = self.faults.read = None
            self.clock.advance(60)
            self.pc.close()
            pc = PrefixCache(self.model.make_cache, **self.settings)  # whatever is on disk loads and restores right
            assert pc.stats()["disk_read_errors"] == 0
            for tokens in self.stored[-5:]:
                serve(pc, self.model, tokens + [1])
            check_everything(pc, self.model)
            pc.close()
            shutil.rmtree(self.dir, ignore_errors=True)
        if hasattr(self, "faults"):
            self.faults.uninstall()
        for name, value in getattr(self, "saved", {}).items():
            setattr(disk, name, value)


TestDiskFaultMachine = DiskFaultMachine.TestCase
TestDiskFaultMachine.settings = settings(max_examples=min(settings().max_examples, 30), stateful_step_count=20,
                                         deadline=None)


# --- (d) kvtrie serve on a full disk -------------------------------------------------------------------


def wait_for(check, timeout: float = 30.0, what: str = ""):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {timeout} s for {what}")
        time.sleep(0.1)


def test_kvtrie_serve_on_a_full_disk_serves_every_request_and_resumes(tmp_path):
    """`kvtrie serve --disk-dir` on a small tmpfs that fills up while conversations go on: every
    request is answered, cached_tokens equal what an exact prefix cache reuses, /kvtrie/stats and
    /metrics show the tier degraded (one warning in the log), and once space returns the records
    are written again (degraded 0, "writes resumed")."""
    pytest.importorskip("mlx_lm")
    pytest.importorskip("prometheus_client")
    mount = tmp_path / "mnt"
    mount_tmpfs(mount, "4M")
    try:
        _serve_on_a_full_disk(tmp_path, TmpfsFullDisk(mount))
    finally:
        unmount(mount)


def _serve_on_a_full_disk(tmp_path: Path, full: TmpfsFullDisk) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from serving import make_model_dir
    from test_serve import converse, get_json, kvtrie_serve

    model_dir = make_model_dir(tmp_path / "llama", "llama")
    flags = ("--prompt-cache-bytes", "64M", "--disk-dir", str(full.directory), "--persist-seconds", "0.3",
             "--no-next-turn")
    stored, log = [], []

    def model_stats(srv) -> dict:
        (stats,) = get_json(srv.url, "/kvtrie/stats")["models"].values()
        return stats

    with kvtrie_serve(model_dir, tmp_path, *flags) as srv:
        converse(srv.url, model_dir, [0], 1, stored, log)
        wait_for(lambda: model_stats(srv)["disk_writes"] > 0, what="records written")
        full.fill()
        converse(srv.url, model_dir, [1, 2], 2, stored, log)  # (chat() raises on any failed request)
        wait_for(lambda: model_stats(srv)["disk_degraded"] == 1, what="the tier degraded")
        stats = model_stats(srv)
        assert stats["disk_write_errors"] > 0
        metrics = urllib.request.urlopen(srv.url + "/metrics", timeout=30).read().decode()
        families = {f.name: f for f in text_string_to_metric_families(metrics)}
        assert families["kvtrie_cache_disk_degraded"].type == "gauge"
        assert [s.value for s in families["kvtrie_cache_disk_degraded"].samples] == [1.0]
        assert families["kvtrie_cache_disk_write_errors"].samples[0].value > 0
        assert "kvtrie_cache_disk_read_errors" in families

        full.free()
        converse(srv.url, model_dir, [3], 1, stored, log)
        wait_for(lambda: model_stats(srv)["disk_degraded"] == 0, what="writes resumed")
        stats = get_json(srv.url, "/kvtrie/stats")
        log_text = srv.log_text()
    cached = [c for _, _, c, _, _ in log]
    oracle = [o for _, _, _, o, _ in log]
    assert cached == oracle and sum(cached) > 0
    assert stats["requests"] == len(log)
    degraded = [ln for ln in log_text.splitlines() if "degraded to memory only" in ln and "(again)" not in ln]
    assert len(degraded) == 1 and "No space left on device" in degraded[0], degraded
    assert "writes resumed" in log_text


def test_a_directory_the_full_disk_cannot_make_is_made_by_the_first_write_that_works(tmp_path, monkeypatch):
    """On a full ext4 even mkdir fails (ENOSPC): `PrefixCache(disk_dir=...)` (and so `kvtrie serve`'s
    first request for a model) raised. Now the tier starts degraded and makes its directory (0700)
    when writes work again."""
    clock = Clock()
    monkeypatch.setattr(disk, "_now", clock)
    private_directory = disk.private_directory
    full = [True]

    def mkdir_on_a_full_disk(path):
        if full[0] and not Path(path).exists():
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return private_directory(path)

    monkeypatch.setattr(disk, "private_directory", mkdir_on_a_full_disk)
    directory = tmp_path / "kv"
    model = FakeModel(kinds="KK", heads=1, dim=4)
    pc = PrefixCache(model.make_cache, disk_dir=str(directory), fingerprint="f", persist_seconds=None)
    assert pc.stats()["disk_degraded"] == 1 and not directory.exists()
    seqs = sequences(44, 4)
    for tokens in seqs:
        serve(pc, model, tokens)
    pc.persist(wait=True)
    assert pc.stats()["disk_writes"] == 0
    full[0] = False
    clock.advance(60)
    assert pc.persist(wait=True) > 0
    assert pc.stats()["disk_degraded"] == 0 and pc.stats()["disk_writes"] > 0
    assert (directory.stat().st_mode & 0o777) == 0o700
    pc.close()
    pc = PrefixCache(model.make_cache, disk_dir=str(directory), fingerprint="f", persist_seconds=None)
    assert all(serve(pc, model, tokens + [1]) == len(tokens) for tokens in seqs)
    pc.close()
