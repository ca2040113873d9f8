"""Reference models: shapes, cache consistency, the delta rule, HF round trips, seeding."""

from __future__ import annotations

import importlib
import json
from functools import lru_cache

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mlx.utils import tree_flatten

from kvtrie.models import qwen3_next
from kvtrie.models.cache import KVCache, RecurrentCache
from kvtrie.models.load import (
    MODELS,
    init_random_weights,
    load_model,
    model_from_config,
    save_model,
)
from kvtrie.models.tokenizer import ByteTokenizer

from tolerance import ATOL, atol_for

NAMES = sorted(MODELS)
SEQ_LEN = 20


@lru_cache(maxsize=None)
def _reference(name: str):
    """(model, tokens [1, SEQ_LEN], logits of one uncached full prefill)."""
    model, _ = load_model(name, seed=0)
    tokens = mx.array(np.random.default_rng(1).integers(0, 261, (1, SEQ_LEN)), dtype=mx.int32)
    logits = model(tokens)
    mx.eval(logits)
    return model, tokens, logits


def _run_chunks(model, tokens: mx.array, cuts: list[int]) -> mx.array:
    """Logits of feeding `tokens` through one live cache, split at positions `cuts`."""
    cache = model.make_cache()
    bounds = [0, *cuts, tokens.shape[1]]
    out = [model(tokens[:, a:b], cache=cache) for a, b in zip(bounds, bounds[1:])]
    assert all(c.offset == tokens.shape[1] for c in cache)
    return mx.concatenate(out, axis=1)


def _params(model) -> dict[str, mx.array]:
    return dict(tree_flatten(model.parameters()))


@pytest.mark.parametrize("name", NAMES)
def test_forward_shapes_and_cache_kinds(name):
    model, tokenizer = load_model(name)
    assert isinstance(tokenizer, ByteTokenizer) and tokenizer.vocab_size == 261
    cache = model.make_cache()
    assert len(cache) == len(model.layers)
    tokens = mx.array([[1, 2, 3, 4, 5, 6, 7]])
    logits = model(tokens, cache=cache)
    assert logits.shape == (1, 7, 261) and logits.dtype == mx.float32
    assert mx.all(mx.isfinite(logits)).item()
    assert all(c.offset == 7 for c in cache)
    if name == "tiny-qwen3-next":
        kinds = [type(c) for c in cache]
        assert kinds == [RecurrentCache, RecurrentCache, RecurrentCache, KVCache]
        conv, state = cache[0][0], cache[0][1]
        assert conv.shape == (1, 3, model.layers[0].linear_attn.conv_dim)
        assert state.shape == (1, 4, 16, 16) and state.dtype == mx.float32


@pytest.mark.parametrize("name", NAMES)
def test_token_by_token_equals_full_prefill(name):
    model, tokens, full = _reference(name)
    stepped = _run_chunks(model, tokens, list(range(1, SEQ_LEN)))
    np.testing.assert_allclose(np.array(stepped), np.array(full), atol=atol_for(model), rtol=1e-5)


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=10)
@given(cuts=st.sets(st.integers(1, SEQ_LEN - 1), max_size=6))
def test_chunked_prefill_equals_full_prefill(name, cuts):
    model, tokens, full = _reference(name)
    chunked = _run_chunks(model, tokens, sorted(cuts))
    np.testing.assert_allclose(np.array(chunked), np.array(full), atol=atol_for(model), rtol=1e-5)


def test_llama_prefix_logits_equal_full_sequence_logits():
    model, tokens, full = _reference("tiny-llama")
    for i in (0, 1, 7, SEQ_LEN - 1):
        prefix = model(tokens[:, : i + 1])
        np.testing.assert_allclose(np.array(prefix[:, -1]), np.array(full[:, i]), atol=ATOL)
    cached = model(tokens, cache=model.make_cache())
    np.testing.assert_allclose(np.array(cached), np.array(full), atol=ATOL)


def _np_delta_net(layer, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Float64 numpy gated delta-net layer, with the delta rule in its textbook form
    S_t = a_t (I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T,  o_t = S_t^T q_t."""

    def w(a):
        return np.array(a, dtype=np.float64)

    def silu(a):
        return a / (1 + np.exp(-a))

    B, L, _ = x.shape
    nk, nv, dk, dv, K = layer.nk, layer.nv, layer.dk, layer.dv, layer.kernel
    r = nv // nk
    qkvz = (x @ w(layer.in_proj_qkvz.weight).T).reshape(B, L, nk, -1)
    ba = (x @ w(layer.in_proj_ba.weight).T).reshape(B, L, nk, 2 * r)
    q = qkvz[..., :dk].reshape(B, L, -1)
    k = qkvz[..., dk : 2 * dk].reshape(B, L, -1)
    v = qkvz[..., 2 * dk : 2 * dk + r * dv].reshape(B, L, -1)
    z = qkvz[..., 2 * dk + r * dv :].reshape(B, L, nv, dv)
    b, a = ba[..., :r].reshape(B, L, nv), ba[..., r:].reshape(B, L, nv)

    mixed = np.concatenate([q, k, v], axis=-1)
    taps = w(layer.conv1d.weight)[:, 0, :]  # [C, K]
    padded = np.concatenate([np.zeros((B, K - 1, mixed.shape[-1])), mixed], axis=1)
    conv = silu(np.stack([np.einsum("bkc,ck->bc", padded[:, t : t + K], taps) for t in range(L)], 1))
    q = conv[..., : nk * dk].reshape(B, L, nk, dk)
    k = conv[..., nk * dk : 2 * nk * dk].reshape(B, L, nk, dk)
    v = conv[..., 2 * nk * dk :].reshape(B, L, nv, dv)
    q = q / np.sqrt((q**2).sum(-1, keepdims=True) + 1e-6) / np.sqrt(dk)
    k = k / np.sqrt((k**2).sum(-1, keepdims=True) + 1e-6)
    q, k = np.repeat(q, r, axis=2), np.repeat(k, r, axis=2)
    beta = 1 / (1 + np.exp(-b))
    alpha = np.exp(-np.exp(w(layer.A_log)) * np.log1p(np.exp(a + w(layer.dt_bias))))

    S = np.zeros((B, nv, dk, dv))
    out = np.zeros((B, L, nv, dv))
    eye = np.eye(dk)
    for t in range(L):
        for bi in range(B):
            for h in range(nv):
                kt, bt = k[bi, t, h], beta[bi, t, h]
                S[bi, h] = alpha[bi, t, h] * (eye - bt * np.outer(kt, kt)) @ S[bi, h] + bt * np.outer(
                    kt, v[bi, t, h]
                )
                out[bi, t, h] = S[bi, h].T @ q[bi, t, h]

    normed = out / np.sqrt((out**2).mean(-1, keepdims=True) + layer.norm.eps)
    gated = normed * w(layer.norm.weight) * silu(z)
    return gated.reshape(B, L, -1) @ w(layer.out_proj.weight).T, S


def test_gated_delta_layer_matches_numpy_reference():
    model, _ = load_model("tiny-qwen3-next", seed=3)
    layer = model.layers[0].linear_attn
    x = np.random.default_rng(2).standard_normal((2, 12, 64)).astype(np.float32)
    expected, expected_state = _np_delta_net(layer, x.astype(np.float64))

    cache = RecurrentCache(2)
    first = layer(mx.array(x[:, :5]), cache)
    second = layer(mx.array(x[:, 5:]), cache)
    got = np.array(mx.concatenate([first, second], axis=1))
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(np.array(cache[1]), expected_state, atol=ATOL)
    assert cache.offset == 12
    np.testing.assert_allclose(np.array(layer(mx.array(x))), expected, atol=1e-4, rtol=1e-4)


def _delta_inputs(seed: int, L: int, H: int = 3, dk: int = 16, dv: int = 8, strong: bool = False):
    """Random gated-delta-rule inputs shaped and scaled as `GatedDeltaNet` makes them: unit
    keys (correlated, as after the conv and silu), queries scaled by `dk**-0.5`, decay rates
    A in [0.05, 1] (or, `strong`, up to 30: state wiped within a few tokens), a state."""
    rng = np.random.default_rng(seed)

    def unit(x):
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    q = unit(rng.standard_normal((2, L, H, dk))) * dk**-0.5
    k = unit(rng.standard_normal((2, L, H, dk)) + 0.5)
    v = rng.standard_normal((2, L, H, dv))
    rate = rng.uniform(0.05, 30.0 if strong else 1.0, H)
    g = -rate * np.logaddexp(0.0, rng.standard_normal((2, L, H)) + 1.0)
    beta = 1 / (1 + np.exp(-rng.standard_normal((2, L, H))))
    state = rng.standard_normal((2, H, dk, dv))
    return [mx.array(x.astype(np.float32)) for x in (q, k, v, g, beta, state)]


def _assert_same_rule(got, expected):
    for a, b in zip(got, expected):
        assert mx.all(mx.isfinite(a)).item()
        np.testing.assert_allclose(np.array(a), np.array(b), atol=ATOL, rtol=1e-5)


@settings(max_examples=12)
@given(
    L=st.sampled_from([1, 2, 3, 7, 8, 16, 17, 31, 40, 64, 100]),
    seed=st.integers(0, 2**16),
    strong=st.booleans(),
)
def test_chunked_delta_rule_matches_step_rule(L, seed, strong):
    """Chunked == step for L below, at and past the chunk (8) and span (32) sizes, ragged or
    not: padding the last chunk leaves the state alone, and strong decays stay finite."""
    x = _delta_inputs(seed, L, strong=strong)
    expected = qwen3_next.gated_delta_step(*x)
    _assert_same_rule(qwen3_next.gated_delta_chunked(*x, chunk=8, span=32), expected)
    _assert_same_rule(qwen3_next.gated_delta_chunked(*x), expected)
    _assert_same_rule(qwen3_next.gated_delta_rule(*x), expected)


@pytest.mark.parametrize("cut", [1, 5, 30, 64, 65])
def test_chunked_delta_rule_carries_state_across_calls(cut):
    q, k, v, g, beta, state = _delta_inputs(cut, 100)
    whole = qwen3_next.gated_delta_chunked(q, k, v, g, beta, state, chunk=16)
    first, mid = qwen3_next.gated_delta_chunked(
        q[:, :cut], k[:, :cut], v[:, :cut], g[:, :cut], beta[:, :cut], state, chunk=16
    )
    second, end = qwen3_next.gated_delta_chunked(
        q[:, cut:], k[:, cut:], v[:, cut:], g[:, cut:], beta[:, cut:], mid, chunk=16
    )
    _assert_same_rule((mx.concatenate([first, second], axis=1), end), whole)


_TIED_OFF = {**MODELS["tiny-llama"][1], "tie_word_embeddings": False}
_TIED_ON = {**MODELS["tiny-qwen3-next"][1], "tie_word_embeddings": True}
ROUNDTRIP = {
    "tiny-llama": lambda: load_model("tiny-llama", seed=5)[0],
    "tiny-qwen3-next": lambda: load_model("tiny-qwen3-next", seed=5)[0],
    "llama-untied": lambda: init_random_weights(model_from_config(_TIED_OFF), 5),
    "qwen3-next-tied": lambda: init_random_weights(model_from_config(_TIED_ON), 5),
}


@pytest.mark.parametrize("build", list(ROUNDTRIP.values()), ids=list(ROUNDTRIP))
def test_save_load_roundtrip_is_exact(tmp_path, build):
    model = build()
    save_model(model, tmp_path, tokenizer=ByteTokenizer())
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == model.model_type
    assert config["architectures"] == [model.architecture]
    assert config["torch_dtype"] == "float32"

    loaded, tokenizer = load_model(tmp_path)
    assert isinstance(tokenizer, ByteTokenizer)
    assert loaded.args == model.args
    a, b = _params(model), _params(loaded)
    assert a.keys() == b.keys()
    assert all(mx.array_equal(a[k], b[k]).item() and a[k].dtype == b[k].dtype for k in a)
    assert ("lm_head.weight" in a) != model.args.tie_word_embeddings
    tokens = mx.array([[3, 1, 4, 1, 5, 9, 2, 6]])
    assert mx.array_equal(model(tokens), loaded(tokens)).item()


@pytest.mark.parametrize("name", NAMES)
def test_matches_mlx_lm_on_the_same_hf_weights(name):
    """Where mlx-lm is installed, its implementation fed our (HF-layout) weights agrees."""
    pytest.importorskip("mlx_lm")
    model, _ = load_model(name, seed=4)
    family = importlib.import_module(f"mlx_lm.models.{model.model_type}")
    ref = family.Model(family.ModelArgs.from_dict(MODELS[name][1]))
    ref.load_weights(list(ref.sanitize(_params(model)).items()), strict=True)
    tokens = mx.array(np.random.default_rng(0).integers(0, 261, (1, 17)))
    np.testing.assert_allclose(np.array(model(tokens)), np.array(ref(tokens)), atol=1e-4)


def test_hf_parameter_names():
    llama_names = set(_params(load_model("tiny-llama")[0]))
    assert {
        "model.embed_tokens.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.mlp.gate_proj.weight",
        "model.layers.0.input_layernorm.weight",
        "model.layers.1.post_attention_layernorm.weight",
        "model.norm.weight",
    } <= llama_names
    qwen = load_model("tiny-qwen3-next")[0]
    names = set(_params(qwen))
    assert {
        "model.layers.0.linear_attn.in_proj_qkvz.weight",
        "model.layers.0.linear_attn.in_proj_ba.weight",
        "model.layers.0.linear_attn.dt_bias",
        "model.layers.0.linear_attn.A_log",
        "model.layers.0.linear_attn.norm.weight",
        "model.layers.0.linear_attn.out_proj.weight",
        "model.layers.0.mlp.down_proj.weight",  # mlp_only_layers=[0]: dense
        "model.layers.1.mlp.gate.weight",
        "model.layers.1.mlp.experts.3.up_proj.weight",
        "model.layers.1.mlp.shared_expert.gate_proj.weight",
        "model.layers.1.mlp.shared_expert_gate.weight",
        "model.layers.3.self_attn.q_proj.weight",
        "model.layers.3.self_attn.q_norm.weight",
        "lm_head.weight",
    } <= names
    assert _params(qwen)["model.layers.0.linear_attn.conv1d.weight"].shape == (2 * 32 + 64, 1, 4)
    assert _params(qwen)["model.layers.3.self_attn.q_proj.weight"].shape == (2 * 4 * 16, 64)


def test_load_sanitizes_extras_and_is_strict(tmp_path):
    model, _ = load_model("tiny-llama")
    save_model(model, tmp_path)
    weights = mx.load(str(tmp_path / "model.safetensors"))
    extra = {
        "model.layers.0.self_attn.rotary_emb.inv_freq": mx.ones((8,)),
        "lm_head.weight": weights["model.embed_tokens.weight"],  # tied: dropped
    }
    mx.save_safetensors(str(tmp_path / "extra.safetensors"), extra)
    loaded, _ = load_model(tmp_path)
    a, b = _params(model), _params(loaded)
    assert all(mx.array_equal(a[k], b[k]).item() for k in a)

    mx.save_safetensors(str(tmp_path / "extra.safetensors"), {"model.bogus.weight": mx.ones((2,))})
    with pytest.raises(ValueError, match="bogus"):
        load_model(tmp_path)
    (tmp_path / "extra.safetensors").unlink()
    del weights["model.norm.weight"]
    mx.save_safetensors(str(tmp_path / "model.safetensors"), weights)
    with pytest.raises(ValueError, match="model.norm.weight"):
        load_model(tmp_path)


def test_bfloat16_checkpoint_loads_in_bfloat16(tmp_path):
    model, _ = load_model("tiny-qwen3-next")
    model.set_dtype(mx.bfloat16)
    save_model(model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    loaded, _ = load_model(tmp_path)
    assert all(p.dtype == mx.bfloat16 for p in _params(loaded).values())
    cache = loaded.make_cache()
    logits = loaded(mx.array([[1, 2, 3]]), cache=cache)
    assert logits.dtype == mx.bfloat16 and mx.all(mx.isfinite(logits)).item()
    assert cache[0][1].dtype == mx.float32


def test_load_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="unknown model 'tiny-gpt'.*tiny-llama"):
        load_model("tiny-gpt")
    with pytest.raises(ValueError, match="no config.json"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "hidden_size": 8}))
    with pytest.raises(ValueError, match="unsupported model_type 'gpt2'"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    with pytest.raises(ValueError, match="missing required keys"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(MODELS["tiny-llama"][1]))
    with pytest.raises(ValueError, match="no \\*.safetensors"):
        load_model(tmp_path)


def test_bad_inputs_are_rejected():
    model, _ = load_model("tiny-llama")
    with pytest.raises(ValueError, match="batch, length"):
        model(mx.array([1, 2, 3]))
    with pytest.raises(TypeError, match="integer"):
        model(mx.array([[1.0, 2.0]]))
    with pytest.raises(ValueError, match="make_cache"):
        model(mx.array([[1, 2]]), cache=[KVCache()])


@pytest.mark.parametrize("name", NAMES)
def test_seed_determinism(name):
    a, b, c = (_params(load_model(name, seed=s)[0]) for s in (7, 7, 8))
    assert all(mx.array_equal(a[k], b[k]).item() for k in a)
    for k in ("model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight"):
        assert not mx.array_equal(a[k], c[k]).item()
