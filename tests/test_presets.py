"""Real-dimension presets: their configs parse and carry the real models' per-layer shapes.

No weights are built here (a real-width layer is too large for the test suite); the byte
arithmetic below is what the benchmarks measure on the built models.
"""

from __future__ import annotations

import pytest

from kvtrie.models import llama, qwen3_next
from kvtrie.models.presets import PRESETS, preset_config


def test_qwen3_next_preset_snapshot_weighs_the_kv_of_thousands_of_tokens():
    args = qwen3_next.ModelArgs.from_dict(preset_config("qwen3-next-80b"))
    linear = [i for i in range(args.num_hidden_layers) if args.is_linear(i)]
    assert len(linear) == 3 and args.num_hidden_layers == 4  # the real 3:1 ratio
    state = args.linear_num_value_heads * args.linear_key_head_dim * args.linear_value_head_dim * 4  # float32
    conv = (args.linear_conv_kernel_dim - 1) * (2 * args.linear_num_key_heads * args.linear_key_head_dim
                                                + args.linear_num_value_heads * args.linear_value_head_dim) * 4
    kv_per_token = 2 * args.num_key_value_heads * args.head_dim * 2  # bfloat16 K and V, one attention layer
    assert state == 2 << 20 and kv_per_token == 2048
    assert 3000 < len(linear) * (state + conv) / kv_per_token < 3400  # ~3,200 tokens of KV per snapshot


def test_llama_preset_holds_128_kib_per_token_at_full_depth():
    args = llama.ModelArgs.from_dict(preset_config("llama-3.1-8b"))
    per_layer = 2 * args.num_key_value_heads * (args.hidden_size // args.num_attention_heads) * 2
    assert per_layer * PRESETS["llama-3.1-8b"].real_layers == 128 << 10


def test_gemma_preset_has_its_sliding_pattern():
    pytest.importorskip("mlx_lm")
    from mlx_lm.models import gemma3_text

    args = gemma3_text.ModelArgs.from_dict(preset_config("gemma-3-1b"))
    sliding = [i for i in range(args.num_hidden_layers) if (i + 1) % args.sliding_window_pattern]
    assert len(sliding) == 5 and args.sliding_window == 512


def test_bad_preset_arguments_raise():
    with pytest.raises(ValueError, match="unknown preset"):
        preset_config("gpt-5")
    with pytest.raises(ValueError):
        preset_config("llama-3.1-8b", layers=0)
    assert preset_config("llama-3.1-8b", layers=3)["num_hidden_layers"] == 3
