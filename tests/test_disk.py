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

from kvtrie import PrefixCache

from fakes import FakeModel, assert_cold, check_invariants, prefill_and_commit
from test_paging import PagingMachine, spy_on_order

TESTS = Path(__file__).parent
SRC = TESTS.parent / "src"


def serve(pc: PrefixCache, model: FakeModel, tokens: list[int]) -> int:
    """One request following the capture plan; checks the restore against a cold run; returns cached."""
    with pc.begin(tokens) as s:
        assert_cold(model, s.caches, tokens, s.cached)
        prefill_and_commit(model, s, tokens)
        return s.cached


def sequences(seed: int, n: int = 12) -> list[list[int]]:
    rng = random.Random(seed)
    shared = [rng.randrange(50) for _ in range(40)]
    return [shared[: rng.randrange(10, 41)] + [rng.randrange(50) for _ in range(rng.randrange(1, 30))] for _ in range(n)]


@pytest.mark.parametrize("kinds", ["KK", "KRK"])
def test_restart_in_the_same_process_restores_from_disk(tmp_path, kinds):
    model = FakeModel(kinds=kinds, heads=1, dim=4)
    seqs = sequences(0)
    with PrefixCache(model.make_cache, disk_dir=str(tmp_path), fingerprint="fake-1", snapshot_interval=8) as pc:
        for tokens in seqs:
            serve(pc, model, tokens)
        expected = {}
        for tokens in seqs:  # what each prompt restores while everything is in memory
            with pc.begin(tokens + [7]) as s:
                expected[tuple(tokens)] = s.cached
    assert (tmp_path / "index.json").exists() and any(tmp_path.glob("*.safetensors"))
    pc2 = PrefixCache(model.make_cache, disk_dir=str(tmp_path), fingerprint="fake-1", snapshot_interval=8)
    assert pc2.stats()["disk_bytes"] > 0 and pc2.stats()["device_bytes"] == 0
    for tokens in seqs:
        assert serve(pc2, model, tokens + [7]) == expected[tuple(tokens)]
    stats = pc2.stats()
    assert stats["disk_restores"] > 0 and stats["cached_tokens_disk"] > 0 and stats["disk_errors"] == 0
    check_invariants(pc2, (), model)
    pc2.close()


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


def _fill_and_close(directory: Path, model: FakeModel, seqs) -> dict:
    with PrefixCache(model.make_cache, disk_dir=str(directory), fingerprint="f", snapshot_interval=8) as pc:
        for tokens in seqs:
            serve(pc, model, tokens)
    return json.loads((directory / "index.json").read_text())


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "garbage"])
def test_damaged_payload_files_are_misses_never_wrong_state(tmp_path, damage):
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
    assert pc.stats()["disk_errors"] >= 1
    check_invariants(pc, (), model)
    pc.close()


@pytest.mark.parametrize("damage", ["delete", "truncate", "garbage"])
def test_a_damaged_index_starts_cold(tmp_path, damage):
    model = FakeModel()
    _fill_and_close(tmp_path, model, sequences(2))
    index = tmp_path / "index.json"
    if damage == "delete":
        index.unlink()
    elif damage == "truncate":
        index.write_bytes(index.read_bytes()[:50])
    else:
        index.write_bytes(b"\x00not json")
    pc = PrefixCache(model.make_cache, disk_dir=str(tmp_path), fingerprint="f")
    assert pc.stats()["nodes"] == 0 and not list(tmp_path.glob("*.safetensors"))
    for tokens in sequences(2):
        serve(pc, model, tokens)
    pc.close()


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


budgets = st.sampled_from([None, 0, 300, 1500, 6000])


class ThreeTierMachine(PagingMachine):
    """The paging machine's requests with random device, host and disk budgets, plus restarts."""

    @initialize(kinds=st.sampled_from(["KK", "KR"]), device=budgets, host=budgets, disk=budgets)
    def setup(self, kinds, device, host, disk):  # replaces PagingMachine.setup (same name)
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

    def teardown(self):
        if hasattr(self, "pc"):
            for s in self.open:
                s.close()
            self.pc.close()
            shutil.rmtree(self.dir, ignore_errors=True)


TestThreeTierMachine = ThreeTierMachine.TestCase
TestThreeTierMachine.settings = settings(max_examples=60, stateful_step_count=10)


def test_disk_budget_evicts_least_recently_used_files(tmp_path):
    model = FakeModel(layers=1, heads=1, dim=4)
    per_token = 2 * 4 * 4
    pc = PrefixCache(model.make_cache, device_bytes=0, host_bytes=0, disk_dir=str(tmp_path), disk_bytes=25 * per_token,
                     fingerprint="f", hot_sessions=0)
    for first in range(4):  # four 10-token sequences; room for two
        serve(pc, model, [100 + first] + list(range(9)))
    pc._storage.disk.flush()
    stats = pc.stats()
    assert stats["disk_bytes"] <= 25 * per_token and stats["evictions"] == 2
    assert serve(pc, model, [100] + list(range(9)) + [1]) == 0  # the oldest went
    assert serve(pc, model, [103] + list(range(9)) + [1]) == 10
    pc.close()
    assert len(list(tmp_path.glob("*.safetensors"))) == len(json.loads((tmp_path / "index.json").read_text())["namespaces"]["default"])


def test_prompt_ends_keep_their_logits_and_reasons_across_a_restart(tmp_path):
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
