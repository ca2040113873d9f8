"""How close two float32 computations of the same logits must be."""

import mlx.core as mx

_CPU = mx.default_device().type == mx.DeviceType.cpu

# float32 results agree to 1e-5 on the CPU; a GPU's parallel reductions sum in another
# order (seen: up to 1.9e-5 apart on an H100 with TF32 off), so allow a little more there.
ATOL = 1e-5 if _CPU else 5e-5

# A gated delta-net carries its state through every token, and any two float32 orders of
# its arithmetic (one step per token, or chunks of the chunked rule, cut anywhere) differ at
# the noise floor: against a correctly rounded rule, logits of the tiny Qwen3-Next model are
# off by 1.5e-5 (20 tokens) to 5.8e-5 (1,000 tokens) whichever order runs, and a random
# hypothesis draw has put warm and cold 1.24e-4 apart (one logit of 261, magnitude 1.16), another
# 3.0e-4 with nothing restored at all (a 2-token prompt whose warm prefill was cut at the snapshot
# plan's points, the cold one not: 20 of 261 logits past 2e-4). A wrong state is off by 1e-1 and more.
RECURRENT_ATOL = 5e-4


def atol_for(model) -> float:
    """The tolerance for logits of `model` (recurrent layers accumulate more rounding)."""
    return RECURRENT_ATOL if any(type(c).__name__ in ("RecurrentCache", "ArraysCache") for c in model.make_cache()) else ATOL
