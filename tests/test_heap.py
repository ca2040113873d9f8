"""kvtrie.heap: the process settings that make freed memory go back and fresh memory fault in fast."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from kvtrie import heap

GLIBC = heap._glibc_version()
THP = heap.thp_mode()
CAN = GLIBC is not None and GLIBC >= (2, 35) and THP in ("always", "madvise")


def test_huge_pages_env_adds_the_tunable_once_and_keeps_the_others():
    env = {"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=0"}
    out = heap.huge_pages_env(env)
    if not CAN:
        assert out is None
        return
    assert out["PATH"] == "/bin"
    assert out["GLIBC_TUNABLES"].split(":") == ["glibc.malloc.arena_max=2", heap.HUGE_PAGES_TUNABLE]
    assert heap.huge_pages(out) and not heap.huge_pages(env)
    assert heap.huge_pages_env(out) is None  # already so: nothing to do
    assert heap.huge_pages_env({**env, "KVTRIE_HUGE_PAGES": "0"}) is None  # turned off
    assert env["GLIBC_TUNABLES"].endswith("hugetlb=0")  # the caller's mapping is left as it was


@pytest.mark.skipif(not CAN, reason="needs glibc >= 2.35 and transparent huge pages in madvise or always mode")
def test_exec_with_huge_pages_restarts_the_program_with_its_arguments():
    code = ("import os, sys; from kvtrie import heap; heap.exec_with_huge_pages(); "
            "print(heap.huge_pages(), os.environ['KVTRIE_HUGE_PAGES'], sys.argv[1:])")
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "KVTRIE_HUGE_PAGES")}
    out = subprocess.run([sys.executable, "-c", code, "a", "b c"], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True 0 ['a', 'b c']"
    off = subprocess.run([sys.executable, "-c", code.replace("os.environ['KVTRIE_HUGE_PAGES']", "1")],
                         env={**env, "KVTRIE_HUGE_PAGES": "0"}, capture_output=True, text=True, check=True)
    assert off.stdout.strip() == "False 1 []"


def test_rss_and_trim():
    assert heap.rss_bytes() > 10 << 20  # this interpreter with numpy and mlx loaded
    assert heap.rss_bytes(2**22 + 12345) == 0  # no such process
    assert heap.trim_heap() == (GLIBC is not None)
