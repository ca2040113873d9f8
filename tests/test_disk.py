"""The disk tier: three-tier budgets, restarts (same process and a fresh one), fault injection, kills."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import initialize, rule

from kvtrie import PrefixCache, disk

from fakes import FakeModel, assert_cold, check_invariants, prefill_and_commit
from test_paging import PagingMachine, spy_on_order

_disk_module = disk  # (the machine's rules take a `disk` budget argument)
TESTS = Path(__file__).parent
SRC = TESTS.parent / "src"


def serve(pc: PrefixCache, model: FakeModel, tokens: list[int]) -> int:
    """One request following the capture plan; checks the restore against a cold run; returns cached."""
    with pc.begin(tokens) as s:
        assert_cold(model, s.caches, tokens, s.cached)
        prefill_and_commit(model, s, tokens)
        return s.cached


@pytest.fixture(params=["read", "mapped"])
def reads(request, monkeypatch):
    """How records come back: read into pooled buffers, or mapped (as records of `MAP_BYTES`
    and more are; the tiny models here write small ones, so "mapped" maps every record)."""
    if request.param == "mapped":
        monkeypatch.setattr(disk, "MAP_BYTES", 0)
    return request.param


def sequences(seed: int, n: int = 12) -> list[list[int]]:
    rng = random.Random(seed)
    shared = [rng.randrange(50) for _ in range(40)]
    return [shared[: rng.randrange(10, 41)] + [rng.randrange(50) for _ in range(rng.randrange(1, 30))] for _ in range(n)]


@pytest.mark.parametrize("kinds", ["KK", "KRK"])
def test_restart_in_the_same_process_restores_from_disk(tmp_path, kinds, reads):
    model = FakeModel(kinds=kinds, heads=1, dim=4)
    seqs = sequences(0)
    with PrefixCache(model.make_cache, disk_dir=str(tmp_path), fingerprint="fake-1", snapshot_interval=8) as pc:
        for tokens in seqs:
            serve(pc, model, tokens)
        expected = {}
        for tokens in seqs:  # what each prompt restores while everything is in memory
            with pc.begin(tokens + [7]) as s:
                expected[tuple(tokens)] = s.cached
    assert any(tmp_path.glob("*.safetensors")) and not (tmp_path / "index.json").exists()  # records only
    pc2 = PrefixCache(model.make_cache, disk_dir=str(tmp_path), fingerprint="fake-1", snapshot_interval=8)
    assert pc2.stats()["disk_bytes"] > 0 and pc2.stats()["device_bytes"] == 0
    for tokens in seqs:
        assert serve(pc2, model, tokens + [7]) == expected[tuple(tokens)]
    stats = pc2.stats()
    assert stats["disk_restores"] > 0 and stats["cached_tokens_disk"] > 0 and stats["disk_errors"] == 0
    check_invariants(pc2, (), model)
    pc2.close()


def test_records_named_with_crc32_are_still_read(tmp_path, reads):
    """Records are checksummed with XXH3-64 (16 hex digits in the name); those written with
    CRC-32 (8 digits) before restore the same, and a wrong checksum of either kind is a miss."""
    import zlib

    model = FakeModel(kinds="KRK", heads=1, dim=4)
    seqs = sequences(4)
    with PrefixCache(model.make_cache, disk_dir=str(tmp_path), fingerprint="f", snapshot_interval=8) as pc:
        for tokens in seqs:
            serve(pc, model, tokens)
    files = sorted(tmp_path.glob("*.safetensors"))
    assert files and all(len(f.stem.rsplit("-", 1)[1]) == 16 for f in files)
    wrong = files[0]
    for f in files:
        stem = f.stem.rsplit("-", 1)[0]
        crc = zlib.crc32(f.read_bytes()) ^ (f == wrong)  # one of them with a checksum that does not match
        f.rename(f.with_name(f"{stem}-{crc:08x}.safetensors"))
    pc = PrefixCache(model.make_cache, disk_dir=str(tmp_path), fingerprint="f", snapshot_interval=8)
    assert pc.stats()["disk_errors"] == 0  # (headers are read without their checksum)
    for tokens in seqs:  # serve() asserts every restore equals a cold run
        serve(pc, model, tokens + [3])
    stats = pc.stats()
    assert stats["disk_restores"] > 0 and stats["disk_errors"] >= 1
    check_invariants(pc, (), model)
    pc.close()


def test_another_fingerprint_starts_cold_and_never_restores(tmp_path, caplog):
    model = FakeModel()
    with PrefixCache(model.make_cache, disk_dir=str(tmp_path), fingerprint="model-a") as pc:
        serve(pc, model, list(range(30)))
    with caplog.at_level("WARNING", logger="kvtrie"):
        other = PrefixCache(model.make_cache, disk_dir=str(tmp_path), fingerprint="model-b")
    assert "another model" in caplog.text
    assert other.stats()["disk_bytes"] == 0 and serve(other, model, list(range(30)) + [1]) == 0
    other.close()
    with pytest.raises(TypeError, match="fingerprint"):
        PrefixCache(model.make_cache, disk_dir=str(tmp_path))


def test_caches_of_another_layout_drop_the_disk_state(tmp_path):
    with PrefixCache(FakeModel(heads=2).make_cache, disk_dir=str(tmp_path), fingerprint="same-name") as pc:
        serve(pc, FakeModel(heads=2), list(range(30)))
    narrow = FakeModel(heads=1)  # same fingerprint by mistake, different shapes
    pc = PrefixCache(narrow.make_cache, disk_dir=str(tmp_path), fingerprint="same-name")
    serve(pc, narrow, [99, 98, 97])  # the first commit reveals the other layout
    assert serve(pc, narrow, list(range(30)) + [1]) == 0
    pc.close()


def _fill_and_close(directory: Path, model: FakeModel, seqs) -> None:
    with PrefixCache(model.make_cache, disk_dir=str(directory), fingerprint="f", snapshot_interval=8) as pc:
        for tokens in seqs:
            serve(pc, model, tokens)


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "garbage"])
def test_damaged_payload_files_are_misses_never_wrong_state(tmp_path, damage, reads):
    model = FakeModel(kinds="KRK", heads=1, dim=4)
    seqs = sequences(1)
    _fill_and_close(tmp_path, model, seqs)
    files = sorted(tmp_path.glob("*.safetensors"))
    rng = random.Random(damage)
    for path in rng.sample(files, max(1, len(files) // 3)):
        data = path.read_bytes()
        if damage == "truncate":
            path.write_bytes(data[: rng.randrange(len(data))])
        elif damage == "flip":
            i = rng.randrange(len(data))
            path.write_bytes(data[:i] + bytes([data[i] ^ 0x5A]) + data[i + 1 :])
        elif damage == "delete":
            path.unlink()
        else:
            path.write_bytes(os.urandom(len(data)))
    pc = PrefixCache(model.make_cache, disk_dir=str(tmp_path), fingerprint="f", snapshot_interval=8)
    for tokens in seqs:  # serve() asserts every restore equals a cold run
        serve(pc, model, tokens + [3])
    # a deleted record looks like one that was evicted: what hung off it is an orphan, deleted
    assert pc.stats()["disk_errors"] >= 1 or damage == "delete"
    check_invariants(pc, (), model)
    pc.close()


def test_records_describe_the_trie_an_orphan_is_a_miss(tmp_path):
    """No index: the records alone rebuild the trie; a record whose parent is gone is deleted."""
    model = FakeModel(kinds="KRK", heads=1, dim=4)
    seqs = sequences(2)
    _fill_and_close(tmp_path, model, seqs)
    assert not (tmp_path / "index.json").exists()
    files = sorted(tmp_path.glob("*.safetensors"))
    pc = PrefixCache(model.make_cache, disk_dir=str(tmp_path), fingerprint="f", snapshot_interval=8)
    assert pc.stats()["tokens_stored"] == len({tuple(t[:i]) for t in seqs for i in range(1, len(t) + 1)})
    pc.close()
    assert sorted(tmp_path.glob("*.safetensors")) == files  # reopened and closed: nothing rewritten
    roots = [p for p in files if json.loads(_header(p))["record"]["parent"] is None]
    roots[0].unlink()  # its descendants are orphans now
    pc = PrefixCache(model.make_cache, disk_dir=str(tmp_path), fingerprint="f", snapshot_interval=8)
    for tokens in seqs:
        serve(pc, model, tokens + [3])  # every restore equals a cold run, or is a miss
    check_invariants(pc, (), model)
    pc.close()


def _header(path: Path) -> str:
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n])["__metadata__"]["kvtrie"]


SCRIPT = """
import sys, json
sys.path[:0] = [{src!r}, {tests!r}]
from kvtrie import PrefixCache
from fakes import FakeModel
from test_disk import serve, sequences
model = FakeModel(kinds="KRK", heads=1, dim=4)
pc = PrefixCache(model.make_cache, disk_dir=sys.argv[1], fingerprint="f", snapshot_interval=8,
                 device_bytes=int(sys.argv[2]), host_bytes=int(sys.argv[2]))
out = [serve(pc, model, t + [3]) for t in sequences(int(sys.argv[3]), int(sys.argv[4]))]
print(json.dumps(out), flush=True)
if sys.argv[5] == "close":
    pc.close()
"""


def _script(tmp_path: Path) -> Path:
    path = tmp_path / "child.py"
    path.write_text(SCRIPT.format(src=str(SRC), tests=str(TESTS)))
    return path


def test_a_fresh_process_starts_warm(tmp_path):
    model = FakeModel(kinds="KRK", heads=1, dim=4)
    disk = tmp_path / "disk"
    seqs = sequences(3)
    with PrefixCache(model.make_cache, disk_dir=str(disk), fingerprint="f", snapshot_interval=8) as pc:
        for tokens in seqs:
            serve(pc, model, tokens)
        expected = []
        for tokens in seqs:
            with pc.begin(tokens + [3]) as s:
                expected.append(s.cached)
    run = subprocess.run(
        [sys.executable, str(_script(tmp_path)), str(disk), str(1 << 30), "3", "12", "close"],
        capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 0, run.stderr
    # the child checks each restore against a cold run (serve asserts it) and reports its lengths
    assert json.loads(run.stdout.strip().splitlines()[-1]) == expected


def test_a_process_killed_while_writing_leaves_nothing_read_as_valid(tmp_path):
    model = FakeModel(kinds="KRK", heads=1, dim=4)
    disk = tmp_path / "disk"
    _fill_and_close(disk, model, sequences(4))
    script = _script(tmp_path)
    for attempt in range(3):  # tiny budgets: the child writes to disk all the time; kill it mid-way
        child = subprocess.Popen([sys.executable, str(script), str(disk), "0", str(10 + attempt), "400", "keep"],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        time.sleep(1.5 + attempt)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    pc = PrefixCache(model.make_cache, disk_dir=str(disk), fingerprint="f", snapshot_interval=8)
    assert not list(disk.glob("*.tmp"))
    for tokens in sequences(4) + sequences(10, 40):
        serve(pc, model, tokens + [3])  # each restore equals a cold run, or is a miss
    check_invariants(pc, (), model)
    pc.close()


KILLED = """
import sys, json, time
sys.path[:0] = [{src!r}, {tests!r}]
from kvtrie import PrefixCache
from fakes import FakeModel
from test_disk import serve, sequences
model = FakeModel(kinds=sys.argv[2], heads=1, dim=4)
pc = PrefixCache(model.make_cache, disk_dir=sys.argv[1], fingerprint="f", snapshot_interval=8,
                 device_bytes=int(sys.argv[3]), persist_seconds=0.2)
seqs = sequences(5)
for t in seqs:
    serve(pc, model, t)
expected = []
for t in seqs:
    with pc.begin(t + [3]) as s:
        expected.append(s.cached)
time.sleep(1.5)  # several persist rounds
print(json.dumps(expected), flush=True)
time.sleep(600)  # killed here, never closed
"""


@pytest.mark.parametrize("kinds,device", [("KK", 1 << 30), ("KRK", 1 << 30), ("KRK", 2000)])
def test_a_process_killed_with_kill_9_restarts_warm(tmp_path, kinds, device):
    """Records are written within `persist_seconds` of a commit, with no index: a process that
    never closes (kill -9) restarts warm with everything it stored before."""
    disk = tmp_path / "disk"
    script = tmp_path / "killed.py"
    script.write_text(KILLED.format(src=str(SRC), tests=str(TESTS)))
    child = subprocess.Popen([sys.executable, str(script), str(disk), kinds, str(device)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = child.stdout.readline()
        assert line, child.stderr.read()
        expected = json.loads(line)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    model = FakeModel(kinds=kinds, heads=1, dim=4)
    pc = PrefixCache(model.make_cache, disk_dir=str(disk), fingerprint="f", snapshot_interval=8)
    got = [serve(pc, model, t + [3]) for t in sequences(5)]  # each restore equals a cold run
    # at least what the killed process restored (a snapshot it dropped after writing may be back)
    assert all(g >= e for g, e in zip(got, expected)) and sum(expected) > 0, (got, expected)
    check_invariants(pc, (), model)
    pc.close()


budgets = st.sampled_from([None, 0, 300, 1500, 6000])


class ThreeTierMachine(PagingMachine):
    """The paging machine's requests with random device, host and disk budgets, plus restarts."""

    @initialize(kinds=st.sampled_from(["KK", "KR"]), device=budgets, host=budgets, disk=budgets, mapped=st.booleans())
    def setup(self, kinds, device, host, disk, mapped):  # replaces PagingMachine.setup (same name)
        self.map_bytes = _disk_module.MAP_BYTES
        _disk_module.MAP_BYTES = 0 if mapped else self.map_bytes  # every record mapped, or none (small ones)
        self.dir = tempfile.mkdtemp(prefix="kvtrie-disk-")
        self.model = FakeModel(kinds=kinds, heads=1, dim=4)
        self.pc = PrefixCache(self.model.make_cache, device_bytes=device, host_bytes=host, disk_dir=self.dir,
                              disk_bytes=disk, fingerprint="m", snapshot_interval=5)
        spy_on_order(self.pc)
        self.stored: list[list[int]] = []
        self.open: list = []

    @rule()
    def restart(self):
        """Close (everything goes to disk) and reopen on the same directory."""
        for s in self.open:
            s.close()
        self.open = []
        budgets = self.pc.budgets
        self.pc.close()
        self.pc = PrefixCache(self.model.make_cache, device_bytes=budgets["device"], host_bytes=budgets["host"],
                              disk_dir=self.dir, disk_bytes=budgets["disk"], fingerprint="m", snapshot_interval=5)
        spy_on_order(self.pc)

    @rule()
    def crash(self):
        """Records written, then the process ends without closing (as kill -9 would): the next
        PrefixCache on the directory rebuilds the trie from the records alone."""
        for s in self.open:
            s.close()
        self.open = []
        budgets = self.pc.budgets
        self.pc.persist(wait=True)
        self.pc._stop_persisting.set()  # the threads of a killed process stop writing too
        self.pc._storage.disk.close()
        self.pc = PrefixCache(self.model.make_cache, device_bytes=budgets["device"], host_bytes=budgets["host"],
                              disk_dir=self.dir, disk_bytes=budgets["disk"], fingerprint="m", snapshot_interval=5)
        spy_on_order(self.pc)

    def teardown(self):
        if hasattr(self, "pc"):
            for s in self.open:
                s.close()
            self.pc.close()
            shutil.rmtree(self.dir, ignore_errors=True)
            _disk_module.MAP_BYTES = self.map_bytes


TestThreeTierMachine = ThreeTierMachine.TestCase
TestThreeTierMachine.settings = settings(max_examples=60, stateful_step_count=10)


def test_disk_budget_evicts_files_in_the_policys_order(tmp_path):
    model = FakeModel(layers=1, heads=1, dim=4)
    per_token = 2 * 4 * 4
    pc = PrefixCache(model.make_cache, device_bytes=0, host_bytes=0, disk_dir=str(tmp_path), disk_bytes=25 * per_token,
                     fingerprint="f", hot_sessions=0)
    for first in range(4):  # four 10-token sequences; room for two
        serve(pc, model, [100 + first] + list(range(9)))
    pc._storage.disk.flush()
    stats = pc.stats()
    assert stats["disk_bytes"] <= 25 * per_token and stats["evictions"] == 2
    # nothing was used again: a new sequence does not push out one stored before it (worth the same)
    assert serve(pc, model, [103] + list(range(9)) + [1]) == 0
    assert serve(pc, model, [100] + list(range(9)) + [1]) == 10
    pc.close()
    files = set(tmp_path.glob("*.safetensors"))  # evicted records are gone: a reopen deletes nothing
    reopened = PrefixCache(model.make_cache, device_bytes=0, host_bytes=0, disk_dir=str(tmp_path),
                           disk_bytes=25 * per_token, fingerprint="f", hot_sessions=0)
    assert set(tmp_path.glob("*.safetensors")) == files and 0 < reopened.stats()["disk_bytes"] <= 25 * per_token
    reopened.close()


def test_prompt_ends_keep_their_logits_and_reasons_across_a_restart(tmp_path, reads):
    import mlx.core as mx
    import numpy as np

    model = FakeModel(kinds="KRK", heads=1, dim=4)
    prompt = list(range(30))
    settings_ = dict(disk_dir=str(tmp_path), fingerprint="fake-logits")
    with PrefixCache(model.make_cache, **settings_) as pc:
        with pc.begin(prompt, capture_hints=[10], reuse_logits=True) as s:
            done = 0
            for p in s.capture_at:
                model(prompt[done:p], s.caches)
                s.capture(p, logits=mx.arange(5, dtype=mx.float32) if p == len(prompt) else None)
                done = p
            model([1], s.caches)
            s.commit(prompt + [1])
        before = pc.dump()
    with PrefixCache(model.make_cache, **settings_) as pc:
        with pc.begin(prompt, reuse_logits=True) as s:
            assert s.cached == len(prompt)
            np.testing.assert_array_equal(np.array(s.logits), np.arange(5, dtype=np.float32))
            assert_cold(model, s.caches, prompt, len(prompt))
        after = pc.dump()
    for reason in ("state(hint)", "state(prompt) logits", "state(end)"):
        assert reason in before and reason in after


def test_record_arrays_start_where_mlx_places_arrays(tmp_path):
    """Every record's body starts at MLX's offset within a cache line (its header padded with
    spaces, as safetensors allows), so a mapped record's arrays copy into live caches at full speed;
    the file stays a safetensors file that safetensors itself reads."""
    import struct

    import safetensors.numpy

    from kvtrie.arrays import LINE, MLX_LINE_OFFSET

    model = FakeModel(kinds="KRK", heads=2, dim=8)
    with PrefixCache(model.make_cache, disk_dir=str(tmp_path), fingerprint="f", snapshot_interval=64) as pc:
        serve(pc, model, list(range(200)))
    files = sorted(tmp_path.glob("*.safetensors"))
    assert files
    for f in files:
        data = f.read_bytes()
        n = struct.unpack("<Q", data[:8])[0]
        assert (8 + n) % LINE == MLX_LINE_OFFSET
        assert safetensors.numpy.load(data)  # still a valid file


def test_a_mapped_record_is_read_without_a_copy_and_outlives_its_file(tmp_path, monkeypatch):
    """A record of MAP_BYTES or more comes back as read-only views of the mapped file (nothing
    copied into fresh memory); the views stay valid when the file is deleted (kvtrie only ever
    deletes or renames records), and the buffer pool never takes one to write into."""
    from kvtrie.arrays import HostArray, HostPool

    model = FakeModel(kinds="KRK", heads=2, dim=8)
    tokens = list(range(200))
    with PrefixCache(model.make_cache, disk_dir=str(tmp_path), fingerprint="f", snapshot_interval=64) as pc:
        serve(pc, model, tokens)
    files = sorted(tmp_path.glob("*.safetensors"))
    small = min(f.stat().st_size for f in files)
    monkeypatch.setattr(disk, "MAP_BYTES", small)
    pc = PrefixCache(model.make_cache, disk_dir=str(tmp_path), fingerprint="f", snapshot_interval=64)
    store = pc._storage.disk.store
    pool = HostPool()
    for f in files:
        layers, _, _ = store.read(f.name, pool)
        arrays = [a for p in layers if p is not None for a in p.arrays]
        assert arrays and all(isinstance(a, HostArray) for a in arrays)
        data = f.read_bytes()
        for a in arrays:
            assert not a.data.flags.writeable  # a view of the mapping, not a buffer of ours
            assert a.data.tobytes() in data
            pool.give(a.data)
        assert pool.free_bytes == 0
    serve(pc, model, tokens + [1])  # the path comes back from disk into the host tier: mapped
    assert pc.stats()["disk_restores"] >= 1 and pc.stats()["disk_errors"] == 0
    paged_in = [n for _, n, _ in pc.walk() if n.payload.tier == "host"]
    assert paged_in and all(
        not a.data.flags.writeable for n in paged_in for p in n.payload.layers if p is not None for a in p.arrays
    )
    for f in files:
        f.unlink()  # (as eviction deletes a record while its arrays are in use)
    with pc.begin(tokens + [2]) as s:  # the host tier still holds the mapped arrays
        assert s.cached > 0
        assert_cold(model, s.caches, tokens + [2], s.cached)
    check_invariants(pc, (), model)
    pc.close()
