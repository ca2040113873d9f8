"""Llama-style decoder: GQA attention with RoPE, RMSNorm, SwiGLU MLP.

Parameter names (`mlx.utils.tree_flatten(model.parameters())`) and shapes are exactly
those of a Hugging Face `LlamaForCausalLM` checkpoint, so weights load and save as-is.
"""

from __future__ import annotations

from typing import Any, Optional

import attrs
import mlx.core as mx
import mlx.nn as nn

from .base import create_attention_mask
from .cache import KVCache

MODEL_TYPE = "llama"
ARCHITECTURE = "LlamaForCausalLM"


def rope_scale(rope_scaling: Optional[dict[str, Any]]) -> float:
    """Position scale for `nn.RoPE`: 1 without scaling, 1/factor for linear scaling."""
    if not rope_scaling:
        return 1.0
    kind = rope_scaling.get("rope_type", rope_scaling.get("type"))
    if kind in (None, "default"):
        return 1.0
    if kind == "linear":
        return 1.0 / float(rope_scaling["factor"])
    raise ValueError(
        f"rope_scaling type {kind!r} is not supported by kvtrie's reference models "
        "(only 'default' and 'linear'); use mlx-lm for this checkpoint"
    )


@attrs.frozen
class ModelArgs:
    """The subset of a Hugging Face Llama `config.json` this model needs."""

    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    vocab_size: int
    num_key_value_heads: int = attrs.field()
    head_dim: int = attrs.field()
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict[str, Any]] = None
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 2048
    attention_bias: bool = False
    mlp_bias: bool = False

    @num_key_value_heads.default
    def _default_kv_heads(self) -> int:
        return self.num_attention_heads

    @head_dim.default
    def _default_head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def __attrs_post_init__(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        rope_scale(self.rope_scaling)

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> ModelArgs:
        """Build from a `config.json` dict; unknown keys and null values are ignored."""
        names = {f.name for f in attrs.fields(cls)}
        kwargs = {k: v for k, v in config.items() if k in names and v is not None}
        missing = [f.name for f in attrs.fields(cls) if f.default is attrs.NOTHING and f.name not in kwargs]
        if missing:
            raise ValueError(f"{MODEL_TYPE} config is missing required keys {missing}")
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """The fields as `config.json` keys."""
        return attrs.asdict(self)


class Attention(nn.Module):
    """Grouped-query self-attention with rotary position embeddings."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads = args.num_attention_heads
        self.n_kv_heads = args.num_key_value_heads
        self.head_dim = args.head_dim
        self.scale = args.head_dim**-0.5
        dim, bias = args.hidden_size, args.attention_bias
        self.q_proj = nn.Linear(dim, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(dim, self.n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(dim, self.n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, dim, bias=bias)
        self.rope = nn.RoPE(self.head_dim, traditional=False, base=args.rope_theta, scale=rope_scale(args.rope_scaling))

    def __call__(self, x: mx.array, mask: Any = None, cache: Optional[KVCache] = None) -> mx.array:
        B, L, _ = x.shape
        q = self.q_proj(x).reshape(B, L, self.n_heads, -1).transpose(0, 2, 1, 3)
        k = self.k_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        offset = 0 if cache is None else cache.offset
        q = self.rope(q, offset=offset)
        k = self.rope(k, offset=offset)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, dim: int, hidden_dim: int, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=bias)
        self.up_proj = nn.Linear(dim, hidden_dim, bias=bias)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=bias)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then h + mlp(norm(h))."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.self_attn = Attention(args)
        self.mlp = MLP(args.hidden_size, args.intermediate_size, args.mlp_bias)
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, x: mx.array, mask: Any = None, cache: Optional[KVCache] = None) -> mx.array:
        h = x + self.self_attn(self.input_layernorm(x), mask, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class LlamaModel(nn.Module):
    """Embeddings, decoder layers and the final norm (HF's `model.*` prefix)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [DecoderLayer(args) for _ in range(args.num_hidden_layers)]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, inputs: mx.array, cache: Optional[list] = None) -> mx.array:
        h = self.embed_tokens(inputs)
        if cache is None:
            cache = [None] * len(self.layers)
        mask = create_attention_mask(h, cache[0])
        for layer, c in zip(self.layers, cache):
            h = layer(h, mask, c)
        return self.norm(h)


def check_call(inputs: mx.array, cache: Optional[list], n_layers: int) -> None:
    """Reject inputs that are not `[B, L]` integer token ids and caches of the wrong length."""
    if not isinstance(inputs, mx.array) or inputs.ndim != 2 or inputs.shape[1] == 0:
        raise ValueError(
            f"inputs must be a non-empty [batch, length] mx.array of token ids, got "
            f"{getattr(inputs, 'shape', type(inputs).__name__)}"
        )
    if not mx.issubdtype(inputs.dtype, mx.integer):
        raise TypeError(f"inputs must be integer token ids, got dtype {inputs.dtype}")
    if cache is not None and len(cache) != n_layers:
        raise ValueError(
            f"cache has {len(cache)} entries but the model has {n_layers} layers; build it with model.make_cache()"
        )


class Model(nn.Module):
    """Llama causal LM: `model(inputs [B, L], cache) -> logits [B, L, vocab]`."""

    model_type = MODEL_TYPE
    architecture = ARCHITECTURE

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = LlamaModel(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def __call__(self, inputs: mx.array, cache: Optional[list] = None) -> mx.array:
        check_call(inputs, cache, len(self.layers))
        h = self.model(inputs, cache)
        if self.args.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(h)
        return self.lm_head(h)

    @property
    def layers(self) -> list:
        return self.model.layers

    def make_cache(self) -> list[KVCache]:
        """One empty live KV cache per layer."""
        return [KVCache() for _ in range(self.args.num_hidden_layers)]  # (not self.layers: nn.Module lookups are slow)

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Drop checkpoint tensors the model does not own (rotary tables, a tied lm_head)."""
        weights = {k: v for k, v in weights.items() if "rotary_emb.inv_freq" not in k}
        if self.args.tie_word_embeddings:
            weights.pop("lm_head.weight", None)
        return weights
