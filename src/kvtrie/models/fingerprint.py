"""A model's identity for the disk tier: architecture, configuration and a sample of its weights."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import attrs
import mlx.core as mx
import numpy as np

from ..arrays import tree_items

_SAMPLE = 4096  # bytes hashed from each end of every weight


def model_fingerprint(model: Any) -> str:
    """A hex digest that changes with the architecture, the config, any shape/dtype, or the weights.

    Hashing every weight of a large model would take seconds, so each tensor contributes its
    name, shape, dtype and its first and last 4 KiB: two checkpoints of one architecture
    differ there in practice. Pass your own identity (e.g. the checkpoint's hash) if you need
    a guarantee.
    """
    h = hashlib.sha256()
    h.update(type(model).__module__.encode() + b"." + type(model).__name__.encode())
    args = getattr(model, "args", None)
    if args is not None:
        config = attrs.asdict(args) if attrs.has(type(args)) else dict(vars(args))
        h.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, w in tree_items(model.parameters()):
        h.update(f"{name}:{tuple(w.shape)}:{w.dtype}".encode())
        flat = w.reshape(-1)
        view = flat.view(mx.uint16) if w.dtype == mx.bfloat16 else flat
        data = np.asarray(view).view(np.uint8)
        h.update(data[:_SAMPLE].tobytes())
        h.update(data[-_SAMPLE:].tobytes())
    return h.hexdigest()
