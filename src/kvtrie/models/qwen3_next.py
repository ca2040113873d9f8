"""Qwen3-Next-style hybrid: gated delta-net layers plus a gated full-attention layer
every `full_attention_interval` layers, with a sparse MoE (or dense) MLP.

Parameters are stored exactly as in a Hugging Face `Qwen3NextForCausalLM` checkpoint
(names, shapes and conventions), so loading and saving never transform a tensor:
- the decoder norms, the final norm and q_norm/k_norm are *zero-centred* RMSNorms
  (scale `1 + weight`, weight initialised to 0), as in HF; the delta-net output norm
  (`linear_attn.norm`) is a plain gated RMSNorm (scale `weight`, initialised to 1);
- `linear_attn.conv1d.weight` keeps HF's depthwise Conv1d shape `[channels, 1, kernel]`.

The gated delta rule runs one step per token for a decode (`gated_delta_step`) and in
chunks of `DELTA_CHUNK` tokens for a prefill (`gated_delta_chunked`, the block-parallel
"WY" form of flash-linear-attention, in plain MLX ops). The two agree to float32
rounding, not bit for bit: a cached prefix plus a partial prefill reproduces a cold
prefill's logits to float32 accuracy rather than exactly.
"""

from __future__ import annotations

from typing import Any, Optional, Union

import attrs
import mlx.core as mx
import mlx.nn as nn

from .base import create_attention_mask
from .cache import KVCache, RecurrentCache
from .llama import MLP, check_call, rope_scale

MODEL_TYPE = "qwen3_next"
ARCHITECTURE = "Qwen3NextForCausalLM"


@attrs.frozen
class ModelArgs:
    """The subset of a Hugging Face Qwen3-Next `config.json` this model needs (HF defaults)."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    vocab_size: int
    intermediate_size: int = 5632
    num_key_value_heads: int = 2
    head_dim: int = 256
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict[str, Any]] = None
    partial_rotary_factor: float = 0.25
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    full_attention_interval: int = 4
    linear_conv_kernel_dim: int = 4
    linear_key_head_dim: int = 128
    linear_value_head_dim: int = 128
    linear_num_key_heads: int = 16
    linear_num_value_heads: int = 32
    num_experts: int = 512
    num_experts_per_tok: int = 10
    moe_intermediate_size: int = 512
    shared_expert_intermediate_size: int = 512
    norm_topk_prob: bool = True
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = attrs.field(default=(), converter=tuple)

    def __attrs_post_init__(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.linear_num_value_heads % self.linear_num_key_heads:
            raise ValueError(
                f"linear_num_value_heads ({self.linear_num_value_heads}) must be a multiple of "
                f"linear_num_key_heads ({self.linear_num_key_heads})"
            )
        if self.num_experts and not 0 < self.num_experts_per_tok <= self.num_experts:
            raise ValueError(
                f"num_experts_per_tok ({self.num_experts_per_tok}) must be in 1..num_experts ({self.num_experts})"
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

    def is_linear(self, layer: int) -> bool:
        """Whether layer `layer` is a gated delta-net layer (else full attention)."""
        return (layer + 1) % self.full_attention_interval != 0

    def is_moe(self, layer: int) -> bool:
        """Whether layer `layer` uses the sparse MoE block (else the dense MLP)."""
        return (
            self.num_experts > 0 and layer not in self.mlp_only_layers and (layer + 1) % self.decoder_sparse_step == 0
        )


class ZeroCenteredRMSNorm(nn.Module):
    """RMSNorm scaled by `1 + weight` in float32 (Qwen3-Next's convention; weight starts at 0)."""

    def __init__(self, dims: int, eps: float):
        super().__init__()
        self.weight = mx.zeros((dims,))
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        scale = 1.0 + self.weight.astype(mx.float32)
        return mx.fast.rms_norm(x.astype(mx.float32), scale, self.eps).astype(x.dtype)


class GatedRMSNorm(nn.Module):
    """RMSNorm scaled by `weight`, then multiplied by `silu(gate)` (the delta-net output norm)."""

    def __init__(self, dims: int, eps: float):
        super().__init__()
        self.weight = mx.ones((dims,))
        self.eps = eps

    def __call__(self, x: mx.array, gate: mx.array) -> mx.array:
        h = mx.fast.rms_norm(x, self.weight, self.eps)
        return (h.astype(mx.float32) * nn.silu(gate.astype(mx.float32))).astype(x.dtype)


class CausalConv1d(nn.Module):
    """Depthwise causal convolution over time; weight in HF's `[channels, 1, kernel]` shape."""

    def __init__(self, channels: int, kernel: int):
        super().__init__()
        self.weight = mx.zeros((channels, 1, kernel))

    def __call__(self, x: mx.array) -> mx.array:
        """`x`: `[B, kernel - 1 + L, C]` (the previous tail prepended) -> `[B, L, C]`."""
        kernel = self.weight.shape[-1]
        L = x.shape[1] - kernel + 1
        w = self.weight[:, 0, :].T  # [kernel, C]
        out = x[:, :L] * w[0]
        for j in range(1, kernel):
            out = out + x[:, j : j + L] * w[j]
        return out


# The block-parallel delta rule's chunk length, the tokens it handles per pass (a multiple
# of the chunk), and the shortest input it runs (below, the step rule is faster): measured
# at Qwen3-Next's widths on the CPU backend, see `gated_delta_chunked`.
DELTA_CHUNK = 64
DELTA_SPAN = 256
DELTA_CHUNKED_MIN_LEN = 2


def gated_delta_step(
    q: mx.array, k: mx.array, v: mx.array, g: mx.array, beta: mx.array, state: mx.array
) -> tuple[mx.array, mx.array]:
    """Run the gated delta rule one step per token, in float32 (the recurrent definition).

    q, k: `[B, L, H, Dk]` (l2-normalised; q carries the `Dk**-0.5` scale), v: `[B, L, H, Dv]`,
    g (log decay) and beta: `[B, L, H]`, state: `[B, H, Dk, Dv]`. Per step:
    `S = exp(g) S;  S += k (beta (v - S^T k))^T;  o = S^T q`. Returns (o `[B, L, H, Dv]`, S).
    """
    outs = []
    for t in range(q.shape[1]):
        state = state * mx.exp(g[:, t])[..., None, None]
        kt = k[:, t, :, None, :]  # [B, H, 1, Dk]
        delta = (v[:, t] - (kt @ state)[..., 0, :]) * beta[:, t, :, None]  # [B, H, Dv]
        state = state + kt.swapaxes(-1, -2) * delta[..., None, :]
        outs.append((q[:, t, :, None, :] @ state)[..., 0, :])
    return mx.stack(outs, axis=1), state


def _to_chunks(x: mx.array, size: int) -> mx.array:
    """`[B, L, H, ...]` -> contiguous `[B, H, n, size, ...]`, zero-padding L up to `n * size`.

    Zero padding is inert in the delta rule: a padded token has k = v = q = beta = 0 (no
    update, no output) and g = 0 (decay 1), so the carried state is unchanged by it. The
    copy to contiguous memory matters: MLX's CPU ops on a strided view run several times
    slower than on a plain array.
    """
    B, L, H = x.shape[:3]
    n = -(-L // size)
    x = mx.contiguous(mx.moveaxis(x, 2, 1))  # [B, H, L, ...]
    if n * size > L:
        x = mx.pad(x, [(0, 0), (0, 0), (0, n * size - L)] + [(0, 0)] * (x.ndim - 3))
    return x.reshape(B, H, n, size, *x.shape[3:])


def _decay_matrix(g: mx.array) -> mx.array:
    """`[..., C]` log decays -> `[..., C, C]` with `[t, s] = exp(g[s+1] + ... + g[t])` for s <= t,
    else 0: how much of what token s wrote survives to token t.

    Built as running products of the per-token factors `exp(g) <= 1` (the multiplications
    the step rule itself performs), never as `exp(G_t) / exp(G_s)` or `exp(G_t - G_s)`
    from cumulative sums: no factor exceeds 1, so nothing overflows, and every entry is
    accurate to float32 rounding however long the chunk's total decay. It also needs only
    C exps per chunk instead of C * C (exp is slow on the CPU backend).
    """
    C = g.shape[-1]
    later = mx.arange(C)[:, None] > mx.arange(C)[None, :]  # [r, s]: r > s
    factors = mx.where(later, mx.exp(g)[..., :, None], 1.0)  # [..., r, s]
    return mx.tril(mx.cumprod(factors, axis=-2))


def _unit_lower_inverse(m: mx.array) -> mx.array:
    """Inverse of the unit lower-triangular `m` `[..., C, C]` (C a power of two).

    Block doubling, `[[A, 0], [X, D]]^-1 = [[A^-1, 0], [-D^-1 X A^-1, D^-1]]`, from the 1x1
    diagonal blocks (all 1) up: log2(C) rounds of batched matmuls, as stable as forward
    substitution (no series in powers of `m - I`, which would cancel catastrophically).
    """
    *batch, C, _ = m.shape
    inv = mx.ones((*batch, C, 1, 1), dtype=m.dtype)  # inverses of the diagonal b-blocks
    b = 1
    while b < C:
        n = C // (2 * b)
        pairs = mx.diagonal(m.reshape(*batch, n, 2 * b, n, 2 * b), axis1=-4, axis2=-2)
        lower = mx.moveaxis(pairs, -1, -3)[..., b:, :b]  # [..., n, b, b]: the X of each pair
        inv = inv.reshape(*batch, n, 2, b, b)
        a_inv, d_inv = inv[..., 0, :, :], inv[..., 1, :, :]
        x_inv = -(d_inv @ lower @ a_inv)
        top = mx.concatenate([a_inv, mx.zeros_like(a_inv)], axis=-1)
        inv = mx.concatenate([top, mx.concatenate([x_inv, d_inv], axis=-1)], axis=-2)
        b *= 2
    return inv.reshape(*batch, C, C)


def _delta_span(
    q: mx.array, k: mx.array, v: mx.array, g: mx.array, beta: mx.array, state: mx.array, size: int
) -> tuple[mx.array, mx.array]:
    """`gated_delta_chunked` over one span of tokens, in chunks of `size` (a power of two).

    Within a chunk of C tokens starting from state S, with `G_t` the chunk's cumulative log
    decay and `D[t, s] = exp(G_t - G_s)` (s <= t), the per-token corrections
    `u_t = beta_t (v_t - k_t^T exp(g_t) S_{t-1})` solve the unit lower-triangular system
    `(I + A) U = beta V - beta exp(G) K S` with `A[t, s] = beta_t D[t, s] k_t.k_s` (s < t);
    then `O = exp(G) Q S + (Q K^T * D) U` and `S' = exp(G_C) S + (D[C, :] K)^T U`. Everything
    but the S-dependent matmuls is computed for all the span's chunks at once; only those
    run chunk by chunk.
    """
    B, L, H, _ = k.shape
    q, k, v, beta = (_to_chunks(x, size) for x in (q, k, v, beta))
    g = _to_chunks(g, size)  # [B, H, n, C]

    decay = _decay_matrix(g)  # D, [B, H, n, C, C]
    start = mx.cumprod(mx.exp(g), axis=-1)[..., None]  # exp(G_t), [..., C, 1]
    tail = decay[..., -1, :, None]  # exp(G_C - G_s), [..., C, 1]
    keep = start[..., -1:, :]  # exp(G_C), [..., 1, 1]
    beta = beta[..., None]

    a = mx.tril(beta * decay * (k @ k.swapaxes(-1, -2)), k=-1)
    solve = _unit_lower_inverse(mx.eye(size) + a)  # (I + A)^-1
    w_v = solve @ (beta * v)  # U = w_v - w_k S
    w_k = solve @ (beta * start * k)
    readout = mx.concatenate([w_k, start * q], axis=-2)  # both multiply S: one matmul
    local = (q @ k.swapaxes(-1, -2)) * decay
    k_tail = (tail * k).swapaxes(-1, -2)  # [..., Dk, C]

    outs = []
    for c in range(g.shape[2]):
        from_state = readout[:, :, c] @ state
        u = w_v[:, :, c] - from_state[..., :size, :]
        outs.append(from_state[..., size:, :] + local[:, :, c] @ u)
        state = keep[:, :, c] * state + k_tail[:, :, c] @ u
    o = mx.moveaxis(mx.stack(outs, axis=2), 1, 3)  # [B, n, C, H, Dv]
    return o.reshape(B, -1, H, o.shape[-1])[:, :L], state


def gated_delta_chunked(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    g: mx.array,
    beta: mx.array,
    state: mx.array,
    chunk: int = DELTA_CHUNK,
    span: int = DELTA_SPAN,
) -> tuple[mx.array, mx.array]:
    """The gated delta rule of `gated_delta_step` (same arguments and results), block-parallel
    in chunks of `chunk` tokens (a power of two; the next power of two >= L when L is smaller).

    Works through the input `span` tokens at a time (a multiple of `chunk`), carrying the
    state: the intermediates (several times the size of q) then stay small whatever L,
    which on the CPU backend also keeps them in MLX's buffer cache.
    """
    L = q.shape[1]
    size = min(chunk, 1 << (L - 1).bit_length())
    outs = []
    for s in range(0, L, span):
        at = slice(s, s + span)
        o, state = _delta_span(q[:, at], k[:, at], v[:, at], g[:, at], beta[:, at], state, size)
        outs.append(o)
    return mx.concatenate(outs, axis=1) if len(outs) > 1 else outs[0], state


def gated_delta_rule(
    q: mx.array, k: mx.array, v: mx.array, g: mx.array, beta: mx.array, state: mx.array
) -> tuple[mx.array, mx.array]:
    """The gated delta rule (see `gated_delta_step` for arguments and results) by the faster
    route for the input's length: one step per token for a decode, chunked from
    `DELTA_CHUNKED_MIN_LEN` tokens on. The two agree to float32 rounding."""
    if q.shape[1] < DELTA_CHUNKED_MIN_LEN:
        return gated_delta_step(q, k, v, g, beta, state)
    return gated_delta_chunked(q, k, v, g, beta, state)


class GatedDeltaNet(nn.Module):
    """Linear-attention mixer: projections, causal conv, gated delta rule, gated norm."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.nk, self.nv = args.linear_num_key_heads, args.linear_num_value_heads
        self.dk, self.dv = args.linear_key_head_dim, args.linear_value_head_dim
        self.key_dim, self.value_dim = self.nk * self.dk, self.nv * self.dv
        self.conv_dim = 2 * self.key_dim + self.value_dim
        self.kernel = args.linear_conv_kernel_dim
        self.in_proj_qkvz = nn.Linear(args.hidden_size, 2 * self.key_dim + 2 * self.value_dim, bias=False)
        self.in_proj_ba = nn.Linear(args.hidden_size, 2 * self.nv, bias=False)
        self.conv1d = CausalConv1d(self.conv_dim, self.kernel)
        self.dt_bias = mx.ones((self.nv,))
        self.A_log = mx.zeros((self.nv,))
        self.norm = GatedRMSNorm(self.dv, args.rms_norm_eps)
        self.out_proj = nn.Linear(self.value_dim, args.hidden_size, bias=False)

    def _split(self, qkvz: mx.array, ba: mx.array) -> tuple[mx.array, ...]:
        """Undo HF's per-key-head grouping: each key head holds [q, k, its v heads, their z]."""
        B, L, _ = qkvz.shape
        r = self.nv // self.nk
        qkvz = qkvz.reshape(B, L, self.nk, -1)
        q, k, v, z = mx.split(qkvz, [self.dk, 2 * self.dk, 2 * self.dk + r * self.dv], axis=-1)
        ba = ba.reshape(B, L, self.nk, 2 * r)
        b, a = ba[..., :r], ba[..., r:]
        return (
            q.reshape(B, L, self.key_dim),
            k.reshape(B, L, self.key_dim),
            v.reshape(B, L, self.value_dim),
            z.reshape(B, L, self.nv, self.dv),
            b.reshape(B, L, self.nv),
            a.reshape(B, L, self.nv),
        )

    def __call__(self, x: mx.array, cache: Optional[RecurrentCache] = None) -> mx.array:
        B, L, _ = x.shape
        q, k, v, z, b, a = self._split(self.in_proj_qkvz(x), self.in_proj_ba(x))

        tail = None if cache is None else cache[0]
        if tail is None:
            tail = mx.zeros((B, self.kernel - 1, self.conv_dim), dtype=x.dtype)
        conv_in = mx.concatenate([tail, mx.concatenate([q, k, v], axis=-1)], axis=1)
        conv_out = nn.silu(self.conv1d(conv_in))
        q, k, v = mx.split(conv_out, [self.key_dim, 2 * self.key_dim], axis=-1)

        f32 = mx.float32
        q = q.reshape(B, L, self.nk, self.dk).astype(f32)
        k = k.reshape(B, L, self.nk, self.dk).astype(f32)
        v = v.reshape(B, L, self.nv, self.dv).astype(f32)
        q = q * mx.rsqrt((q * q).sum(-1, keepdims=True) + 1e-6) * self.dk**-0.5
        k = k * mx.rsqrt((k * k).sum(-1, keepdims=True) + 1e-6)
        if self.nv > self.nk:
            q = mx.repeat(q, self.nv // self.nk, axis=2)
            k = mx.repeat(k, self.nv // self.nk, axis=2)
        beta = mx.sigmoid(b.astype(f32))
        g = -mx.exp(self.A_log.astype(f32)) * nn.softplus(a.astype(f32) + self.dt_bias.astype(f32))

        state = None if cache is None else cache[1]
        if state is None:
            state = mx.zeros((B, self.nv, self.dk, self.dv), dtype=f32)
        out, state = gated_delta_rule(q, k, v, g, beta, state)

        if cache is not None:
            cache[0] = mx.contiguous(conv_in[:, L:])
            cache[1] = state
            cache.advance(L)

        out = self.norm(out.astype(x.dtype), z)
        return self.out_proj(out.reshape(B, L, -1))


class Attention(nn.Module):
    """Gated full attention: q_proj yields queries and a sigmoid output gate; per-head
    q/k RMSNorm; rotary embedding on the first `partial_rotary_factor` of each head."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads = args.num_attention_heads
        self.n_kv_heads = args.num_key_value_heads
        self.head_dim = args.head_dim
        self.scale = args.head_dim**-0.5
        dim, bias = args.hidden_size, args.attention_bias
        self.q_proj = nn.Linear(dim, 2 * self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(dim, self.n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(dim, self.n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, dim, bias=bias)
        self.q_norm = ZeroCenteredRMSNorm(self.head_dim, args.rms_norm_eps)
        self.k_norm = ZeroCenteredRMSNorm(self.head_dim, args.rms_norm_eps)
        self.rope = nn.RoPE(
            int(self.head_dim * args.partial_rotary_factor),
            traditional=False,
            base=args.rope_theta,
            scale=rope_scale(args.rope_scaling),
        )

    def __call__(self, x: mx.array, mask: Any = None, cache: Optional[KVCache] = None) -> mx.array:
        B, L, _ = x.shape
        q, gate = mx.split(self.q_proj(x).reshape(B, L, self.n_heads, 2 * self.head_dim), 2, axis=-1)
        q = self.q_norm(q).transpose(0, 2, 1, 3)
        k = self.k_norm(self.k_proj(x).reshape(B, L, self.n_kv_heads, -1)).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        offset = 0 if cache is None else cache.offset
        q = self.rope(q, offset=offset)
        k = self.rope(k, offset=offset)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)
        out = out.transpose(0, 2, 1, 3).reshape(B, L, -1)
        return self.o_proj(out * mx.sigmoid(gate.reshape(B, L, -1)))


class SparseMoeBlock(nn.Module):
    """Top-k softmax-routed experts plus a sigmoid-gated shared expert.

    Every expert runs on every token and is weighted by its routing score (0 when not
    chosen): simple and exact, fine for the tiny bundled models, slow for large ones.
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.top_k = args.num_experts_per_tok
        self.norm_topk_prob = args.norm_topk_prob
        dim = args.hidden_size
        self.gate = nn.Linear(dim, args.num_experts, bias=False)
        self.experts = [MLP(dim, args.moe_intermediate_size) for _ in range(args.num_experts)]
        self.shared_expert = MLP(dim, args.shared_expert_intermediate_size)
        self.shared_expert_gate = nn.Linear(dim, 1, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        probs = mx.softmax(self.gate(x).astype(mx.float32), axis=-1)
        inds = mx.argpartition(-probs, kth=self.top_k - 1, axis=-1)[..., : self.top_k]
        scores = mx.take_along_axis(probs, inds, axis=-1)
        if self.norm_topk_prob:
            scores = scores / scores.sum(axis=-1, keepdims=True)
        chosen = inds[..., None] == mx.arange(len(self.experts))  # [B, L, k, E]
        weights = (scores[..., None] * chosen).sum(axis=-2).astype(x.dtype)  # [B, L, E]
        y = mx.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        for e, expert in enumerate(self.experts):
            y = y + weights[..., e : e + 1] * expert(x)
        return y


class DecoderLayer(nn.Module):
    """Pre-norm block whose mixer is a gated delta-net (`linear_attn`) or attention (`self_attn`)."""

    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.is_linear = args.is_linear(layer)
        if self.is_linear:
            self.linear_attn = GatedDeltaNet(args)
        else:
            self.self_attn = Attention(args)
        if args.is_moe(layer):
            self.mlp: SparseMoeBlock | MLP = SparseMoeBlock(args)
        else:
            self.mlp = MLP(args.hidden_size, args.intermediate_size)
        self.input_layernorm = ZeroCenteredRMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = ZeroCenteredRMSNorm(args.hidden_size, args.rms_norm_eps)

    def __call__(self, x: mx.array, mask: Any = None, cache: Any = None) -> mx.array:
        if self.is_linear:
            r = self.linear_attn(self.input_layernorm(x), cache)
        else:
            r = self.self_attn(self.input_layernorm(x), mask, cache)
        h = x + r
        return h + self.mlp(self.post_attention_layernorm(h))


class Qwen3NextModel(nn.Module):
    """Embeddings, decoder layers and the final norm (HF's `model.*` prefix)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [DecoderLayer(args, i) for i in range(args.num_hidden_layers)]
        self.norm = ZeroCenteredRMSNorm(args.hidden_size, args.rms_norm_eps)
        self.fa_idx = next((i for i, layer in enumerate(self.layers) if not layer.is_linear), None)

    def __call__(self, inputs: mx.array, cache: Optional[list] = None) -> mx.array:
        h = self.embed_tokens(inputs)
        if cache is None:
            cache = [None] * len(self.layers)
        mask = None if self.fa_idx is None else create_attention_mask(h, cache[self.fa_idx])
        for layer, c in zip(self.layers, cache):
            h = layer(h, mask, c)
        return self.norm(h)


class Model(nn.Module):
    """Qwen3-Next causal LM: `model(inputs [B, L], cache) -> logits [B, L, vocab]`."""

    model_type = MODEL_TYPE
    architecture = ARCHITECTURE

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = Qwen3NextModel(args)
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

    def make_cache(self) -> list[Union[RecurrentCache, KVCache]]:
        """Per layer: `RecurrentCache(2)` ([conv tail, delta state]) or `KVCache()`."""
        return [RecurrentCache(2) if layer.is_linear else KVCache() for layer in self.layers]

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Drop checkpoint tensors the model does not own (MTP head, rotary tables, tied lm_head)."""
        weights = {k: v for k, v in weights.items() if not k.startswith("mtp.") and "rotary_emb.inv_freq" not in k}
        if self.args.tie_word_embeddings:
            weights.pop("lm_head.weight", None)
        return weights
