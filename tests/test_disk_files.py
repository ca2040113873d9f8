"""The disk tier's files are the process owner's alone: directory 0700, records 0600, and a
directory other users can write to is refused (library and `kvtrie serve`)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

from kvtrie import PrefixCache, UnsafeDirectoryError

from fakes import FakeModel, prefill_and_commit


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_directory_0700_and_records_0600_whatever_the_umask(tmp_path):
    model = FakeModel()
    disk = tmp_path / "a" / "tier"
    old = os.umask(0o000)  # the most permissive umask: modes must not depend on it
    try:
        with PrefixCache(model.make_cache, disk_dir=str(disk), fingerprint="f") as pc:
            tokens = list(range(40))
            with pc.begin(tokens) as s:
                prefill_and_commit(model, s, tokens)
            assert pc.persist(wait=True) > 0
    finally:
        os.umask(old)
    assert mode(disk) == 0o700
    records = [p for p in disk.iterdir() if p.is_file()]
    assert records and all(mode(p) == 0o600 for p in records), [(p.name, oct(mode(p))) for p in records]


@pytest.mark.parametrize("bits", [0o777, 0o770, 0o757])
def test_a_directory_others_can_write_is_refused_and_left_as_it_was(tmp_path, bits):
    disk = tmp_path / "shared"
    disk.mkdir()
    os.chmod(disk, bits)
    with pytest.raises(UnsafeDirectoryError, match="writable by other users"):
        PrefixCache(FakeModel().make_cache, disk_dir=str(disk), fingerprint="f")
    assert mode(disk) == bits and list(disk.iterdir()) == []
    os.chmod(disk, 0o755)  # readable by others, writable only by its owner: accepted
    PrefixCache(FakeModel().make_cache, disk_dir=str(disk), fingerprint="f").close()


def test_kvtrie_serve_refuses_such_a_directory_at_start(tmp_path):
    disk = tmp_path / "open"
    disk.mkdir()
    os.chmod(disk, 0o777)
    out = subprocess.run([sys.executable, "-m", "kvtrie.serve", "--model", str(tmp_path / "no-model"),
                          "--disk-dir", str(disk), "--port", "1"], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "KVTRIE_HUGE_PAGES": "0"})
    assert out.returncode != 0 and "writable by other users" in out.stderr, out.stderr[-2000:]
