"""Real models' per-layer shapes, a few layers deep, with random weights: for benchmarks.

Tiny test models hide the trade-offs of a prefix cache: at Qwen3-Next-80B's widths one
recurrent snapshot weighs as much as the KV of ~3,100 tokens, on the tiny model ~50. A
preset keeps every per-layer width of the real model (heads, head dims, state sizes,
windows) and its ratio of layer kinds, with only a few layers and the bundled byte
tokenizer's 261-token vocabulary (the vocabulary only sizes the embedding and the head).

- `qwen3-next-80b`: 3 gated delta-net layers + 1 gated attention layer (its 3:1 ratio);
  the 512-expert MoE is replaced by a dense MLP of the same active width (10 experts of
  512 + a shared 512 = 5,632), which costs the same FLOPs per token without 3 GiB of
  expert weights per layer.
- `gemma-3-1b`: 5 sliding-window layers (window 512) + 1 global layer (its 5:1 pattern);
  mlx-lm's gemma3_text (needs the `mlx-lm` extra).
- `llama-3.1-8b`: plain GQA attention, 32 heads / 8 KV heads x 128.

Weights compute in float32 (MLX's CPU backend has no bfloat16 BLAS: ~40x slower); the
attention caches of kvtrie's own models store keys/values in bfloat16 as a real bf16
model holds them, so byte figures match the real model's per layer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

import attrs
import mlx.core as mx

from .cache import KVCache
from .load import init_random_weights, model_from_config


@attrs.frozen
class Preset:
    """A real model's per-layer config, its depth here and in the real model."""

    name: str
    config: dict[str, Any]
    real_layers: int
    source: str  # "kvtrie" (bundled reference model) or "mlx-lm"


PRESETS: dict[str, Preset] = {
    "qwen3-next-80b": Preset(
        "qwen3-next-80b",
        {
            "model_type": "qwen3_next",
            "hidden_size": 2048,
            "num_hidden_layers": 4,
            "full_attention_interval": 4,
            "num_attention_heads": 16,
            "num_key_value_heads": 2,
            "head_dim": 256,
            "partial_rotary_factor": 0.25,
            "linear_num_key_heads": 16,
            "linear_num_value_heads": 32,
            "linear_key_head_dim": 128,
            "linear_value_head_dim": 128,
            "linear_conv_kernel_dim": 4,
            "intermediate_size": 5632,
            "num_experts": 0,
            "rms_norm_eps": 1e-6,
            "rope_theta": 10_000_000.0,
            "vocab_size": 261,
            "tie_word_embeddings": False,
            "max_position_embeddings": 262144,
        },
        48,
        "kvtrie",
    ),
    "gemma-3-1b": Preset(
        "gemma-3-1b",
        {
            "model_type": "gemma3_text",
            "hidden_size": 1152,
            "num_hidden_layers": 6,
            "intermediate_size": 6912,
            "num_attention_heads": 4,
            "num_key_value_heads": 1,
            "head_dim": 256,
            "rms_norm_eps": 1e-6,
            "vocab_size": 261,
            "rope_theta": 1_000_000.0,
            "rope_local_base_freq": 10_000.0,
            "query_pre_attn_scalar": 256,
            "sliding_window": 512,
            "sliding_window_pattern": 6,
            "max_position_embeddings": 32768,
        },
        26,
        "mlx-lm",
    ),
    "llama-3.1-8b": Preset(
        "llama-3.1-8b",
        {
            "model_type": "llama",
            "hidden_size": 4096,
            "num_hidden_layers": 2,
            "intermediate_size": 14336,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "head_dim": 128,
            "rms_norm_eps": 1e-5,
            "rope_theta": 500_000.0,
            "vocab_size": 261,
            "tie_word_embeddings": False,
            "max_position_embeddings": 131072,
        },
        32,
        "kvtrie",
    ),
}


def preset_config(name: str, layers: Optional[int] = None) -> dict[str, Any]:
    """The HF-style config of a preset, optionally with another number of layers."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
    config = dict(PRESETS[name].config)
    if layers is not None:
        if isinstance(layers, bool) or not isinstance(layers, int) or layers < 1:
            raise ValueError(f"layers must be a positive int, got {layers!r}")
        config["num_hidden_layers"] = layers
    return config


def build_preset(
    name: str, layers: Optional[int] = None, seed: int = 0, kv_dtype: Optional[mx.Dtype] = mx.bfloat16
) -> tuple[Any, Callable[[], list]]:
    """`(model, make_cache)` for a preset: seeded random float32 weights; `make_cache` gives
    kvtrie models' attention layers `kv_dtype` storage (mlx-lm models keep their own caches)."""
    config = preset_config(name, layers)
    if PRESETS[name].source == "mlx-lm":
        import importlib

        module = importlib.import_module(f"mlx_lm.models.{config['model_type']}")
        model = module.Model(module.ModelArgs.from_dict(config))
        init_random_weights(model, seed)
        return model, model.make_cache
    model = init_random_weights(model_from_config(config), seed)

    def make_cache() -> list:
        return [KVCache(kv_dtype) if isinstance(c, KVCache) else c for c in model.make_cache()]

    return model, make_cache
