"""Which mlx-lm `kvtrie serve` runs on: it subclasses mlx_lm.server's internals (its
`BatchGenerator`, `ResponseGenerator`, `APIHandler` and cache hooks), so it is tested against
one range of releases, the range pyproject.toml pins, and refuses to start on another with a
message naming the range. `KVTRIE_ALLOW_UNTESTED_MLX_LM=1` starts it anyway. Never imports mlx.
"""

from __future__ import annotations

import os
import re
from importlib import metadata
from typing import Optional

MLX_LM_TESTED = ("0.32.2", "0.33")  # at least the first, below the second: pyproject.toml's `mlx-lm>=0.32.2,<0.33`
OVERRIDE = "KVTRIE_ALLOW_UNTESTED_MLX_LM"


class UntestedDependencyError(RuntimeError):
    """An installed mlx-lm outside the range `kvtrie serve` is tested with."""


def version_tuple(text: str) -> tuple[int, ...]:
    """`0.32.2` -> (0, 32, 2); pre-release and local parts (`0.33.0rc1`, `+cpu`) are dropped."""
    parts = []
    for piece in text.split("+", 1)[0].split("."):
        digits = re.match(r"\d+", piece)
        if digits is None:
            break
        parts.append(int(digits.group()))
        if digits.end() < len(piece):
            break
    return tuple(parts)


def tested(version: str) -> bool:
    low, high = (version_tuple(v) for v in MLX_LM_TESTED)
    return low <= version_tuple(version) < high


def check_mlx_lm(installed: Optional[str] = None) -> str:
    """The installed mlx-lm version; raises UntestedDependencyError outside the tested range
    (unless KVTRIE_ALLOW_UNTESTED_MLX_LM=1)."""
    if installed is None:
        try:
            installed = metadata.version("mlx-lm")
        except metadata.PackageNotFoundError:
            raise UntestedDependencyError("kvtrie serve needs mlx-lm: pip install 'kvtrie[serve]'") from None
    if not tested(installed) and os.environ.get(OVERRIDE) != "1":
        low, high = MLX_LM_TESTED
        raise UntestedDependencyError(
            f"kvtrie serve is tested with mlx-lm >= {low}, < {high} and mlx-lm {installed} is installed: "
            f"pip install 'mlx-lm>={low},<{high}' (or set {OVERRIDE}=1 to start it anyway; it subclasses "
            f"mlx_lm.server's internals, which change between releases)"
        )
    return installed
