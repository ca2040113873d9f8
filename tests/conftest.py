"""Test configuration: hypothesis profiles (CI is deterministic, no deadlines)."""

import os

# On CUDA, MLX runs float32 matmuls as TF32 by default (about 1e-2 off); the warm-equals-cold
# tests compare float32 logits, so ask for full float32. No effect on the CPU backend.
os.environ.setdefault("MLX_ENABLE_TF32", "0")

from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "ci",
    max_examples=50,
    deadline=None,
    derandomize=True,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "dev",
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))
