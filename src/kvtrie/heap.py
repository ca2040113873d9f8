"""The process's C heap: giving freed memory back to the OS, huge pages, resident memory.

MLX's CPU allocator and numpy take their memory from the C library's malloc. glibc keeps freed
blocks for reuse (RSS never shrinks unless the heap is trimmed) and backs fresh ones with 4 KiB
pages faulted in one at a time: a fresh 512 MiB array zero-filled at ~1.3-1.9 GiB/s here, against
~8 GiB/s with transparent huge pages (a 2 MiB page per fault). These are process settings;
`kvtrie serve` applies them at start, a library user can too. Nothing here imports mlx.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from collections.abc import Mapping
from typing import Optional

M_MMAP_THRESHOLD = -3
HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"  # glibc >= 2.35: madvise(MADV_HUGEPAGE) every heap and mapped block
THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"

_LIBC = None


def _libc():
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _ = _LIBC.malloc_trim  # glibc only: AttributeError elsewhere
        except (OSError, AttributeError):
            _LIBC = False
    return _LIBC


def trim_heap() -> bool:
    """Return the C heap's free pages to the operating system (glibc's `malloc_trim`; a no-op
    elsewhere). glibc keeps freed blocks below its mmap threshold (which rises to 32 MiB as
    large blocks are freed) for reuse: without this the process's RSS never shrinks."""
    libc = _libc()
    if not libc:
        return False
    libc.malloc_trim(0)
    return True


def return_large_frees(threshold: int = 1 << 20) -> bool:
    """Make glibc map every block of `threshold` bytes or more on its own, and unmap it when it
    is freed (a fixed mmap threshold also stops glibc from raising it as blocks are freed):
    large buffers then go back to the operating system the moment they are freed. A process
    setting (kvtrie serve calls it at start); False where the C library is not glibc."""
    libc = _libc()
    if not libc:
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, int(threshold)))


def rss_bytes(pid: str | int = "self") -> int:
    """Resident memory of a process (Linux `/proc`; 0 where it cannot be read)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def thp_mode() -> Optional[str]:
    """The kernel's transparent-huge-page mode (`always`, `madvise` or `never`), None off Linux."""
    try:
        with open(THP_MODE) as f:
            text = f.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1 : end] if 0 <= start < end else None


def _glibc_version() -> Optional[tuple[int, int]]:
    text = os.confstr("CS_GNU_LIBC_VERSION") if hasattr(os, "confstr") else None  # (None: no value there)
    name, version = text.split() if text else ("", "")
    if name != "glibc":
        return None
    major, minor = version.split(".")[:2]
    return int(major), int(minor)


def huge_pages(env: Mapping[str, str] = os.environ) -> bool:
    """Whether this process's malloc asks for transparent huge pages (set at exec time through
    `GLIBC_TUNABLES`, and the kernel allows them)."""
    return HUGE_PAGES_TUNABLE in env.get("GLIBC_TUNABLES", "").split(":") and thp_mode() in ("always", "madvise")


def huge_pages_env(env: Mapping[str, str] = os.environ) -> Optional[dict[str, str]]:
    """The environment to exec this program again with so that malloc uses transparent huge
    pages, or None where that is already so or cannot be (not glibc >= 2.35, THP off, or
    `KVTRIE_HUGE_PAGES=0`)."""
    try:
        glibc = _glibc_version()
    except (ValueError, OSError):
        glibc = None
    if (
        glibc is None
        or glibc < (2, 35)
        or thp_mode() not in ("always", "madvise")
        or env.get("KVTRIE_HUGE_PAGES", "1") == "0"
        or huge_pages(env)
    ):
        return None
    tunables = [t for t in env.get("GLIBC_TUNABLES", "").split(":") if t and not t.startswith("glibc.malloc.hugetlb=")]
    return {**env, "GLIBC_TUNABLES": ":".join([*tunables, HUGE_PAGES_TUNABLE])}


def exec_with_huge_pages() -> None:
    """Replace this process with itself under `huge_pages_env` (same interpreter, same
    arguments); returns only where nothing needs doing. Call it first thing in a program's
    entry point: the C library reads its tunables once, at exec."""
    env = huge_pages_env()
    argv = getattr(sys, "orig_argv", None)
    if env is None or not argv:
        return
    env["KVTRIE_HUGE_PAGES"] = "0"  # never twice, whatever the C library made of the tunable
    os.execve(sys.executable, [sys.executable, *argv[1:]], env)
