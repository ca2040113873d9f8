"""mlx-lm integration: its models and caches through the trie, generate_step, the LRUPromptCache drop-in, files."""

from __future__ import annotations

import inspect

import mlx.core as mx
import numpy as np
import pytest

pytest.importorskip("mlx_lm")

from mlx_lm.generate import generate_step as mlx_generate_step  # noqa: E402
from mlx_lm.models import glm4_moe_lite, llama, qwen3_next  # noqa: E402
from mlx_lm.models.cache import (  # noqa: E402
    LRUPromptCache,
    QuantizedKVCache,
    RotatingKVCache,
    load_prompt_cache,
    make_prompt_cache,
)

from kvtrie import PrefixCache  # noqa: E402
from kvtrie.integrations.mlx_lm import (  # noqa: E402
    TriePromptCache,
    generate_step,
    load_prompt_cache_file,
    make_prefix_cache,
    save_prompt_cache_file,
)

from tolerance import ATOL  # noqa: E402

CONFIGS = {
    "llama": (llama, dict(model_type="llama", hidden_size=64, num_hidden_layers=2, intermediate_size=128,
                          num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=261)),
    "qwen3_next": (qwen3_next, dict(model_type="qwen3_next", hidden_size=64, num_hidden_layers=4, intermediate_size=128,
                                    num_attention_heads=4, linear_num_value_heads=4, linear_num_key_heads=2,
                                    linear_key_head_dim=16, linear_value_head_dim=16, linear_conv_kernel_dim=4,
                                    num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1,
                                    shared_expert_intermediate_size=32, mlp_only_layers=[0], moe_intermediate_size=32,
                                    rms_norm_eps=1e-6, vocab_size=261, num_key_value_heads=2, rope_theta=1e4,
                                    partial_rotary_factor=0.25, max_position_embeddings=4096, head_dim=16)),
    "glm4_moe_lite": (glm4_moe_lite, dict(model_type="glm4_moe_lite", vocab_size=261, hidden_size=64,
                                          intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1,
                                          n_routed_experts=4, kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8,
                                          qk_nope_head_dim=16, v_head_dim=16, num_experts_per_tok=2,
                                          first_k_dense_replace=1, max_position_embeddings=4096)),
}


def tiny(name: str, **overrides):
    """A tiny random mlx-lm model built from a config (no download), deterministic."""
    module, cfg = CONFIGS[name]
    mx.random.seed(0)
    model = module.Model(module.ModelArgs.from_dict({**cfg, **overrides}))
    mx.eval(model.parameters())
    return model


def greedy(logprobs: mx.array) -> mx.array:
    return mx.argmax(logprobs, axis=-1)


def run(gen, n: int):
    out = []
    for (token, logprobs), _ in zip(gen, range(n)):
        out.append((int(token), np.array(logprobs.astype(mx.float32))))
    gen.close()
    return out


def cold(model, prompt, n):
    gen = mlx_generate_step(mx.array(prompt), model, prompt_cache=make_prompt_cache(model), sampler=greedy, max_tokens=n)
    return run(gen, n)


def assert_same(warm, cold_run):
    assert [t for t, _ in warm] == [t for t, _ in cold_run], "greedy tokens must be identical"
    for (_, a), (_, b) in zip(warm, cold_run):
        np.testing.assert_allclose(a, b, atol=10 * ATOL, rtol=0)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_warm_equals_cold_through_generate_step(name):
    model = tiny(name)
    pc = make_prefix_cache(model, snapshot_interval=16)
    rng = np.random.default_rng(0)
    system = rng.integers(0, 256, 120).tolist()
    first = system + [1, 2, 3]
    turn1 = run(generate_step(first, model, pc, sampler=greedy, max_tokens=5, capture_hints=[len(system)]), 5)
    assert_same(turn1, cold(model, first, 5))
    # the next turn: prompt + the reply generate_step yielded + new text
    second = first + [t for t, _ in turn1] + [9, 9]
    assert pc.stats()["tokens_stored"] == len(first) + 5
    warm = run(generate_step(second, model, pc, sampler=greedy, max_tokens=4), 4)
    assert pc.stats()["cached_tokens"] >= len(first) + 5
    assert_same(warm, cold(model, second, 4))
    # another conversation on the same system prompt: restores the system prompt
    other = system + [7, 7, 7, 7]
    before = pc.stats()["cached_tokens"]
    warm = run(generate_step(other, model, pc, sampler=greedy, max_tokens=3), 3)
    assert pc.stats()["cached_tokens"] - before >= len(system)
    assert_same(warm, cold(model, other, 3))


def test_three_conversations_sharing_2000_tokens_hold_one_copy():
    """Measured next to mlx-lm's own LRUPromptCache in the same test."""
    model = tiny("llama")
    rng = np.random.default_rng(1)
    shared = rng.integers(0, 256, 2000).tolist()
    convs = [shared + rng.integers(0, 256, 50).tolist() for _ in range(3)]
    pc = make_prefix_cache(model)
    lru = LRUPromptCache(max_size=100)
    for tokens in convs:
        run(generate_step(tokens, model, pc, sampler=greedy, max_tokens=1), 1)
        cache, rest = lru.fetch_nearest_cache("m", tokens)
        cache = cache or make_prompt_cache(model)
        mx.eval(model(mx.array(rest)[None], cache=cache))
        lru.insert_cache("m", tokens, cache)
    per_token = 2 * 2 * 2 * 16 * 4  # layers x (K, V) x kv heads x head dim x float32
    unique = 2000 + 3 * 51
    held = pc.stats()["device_bytes"]
    assert held == unique * per_token  # one copy of the prefix, exactly
    assert lru.nbytes > 2.5 * held, f"mlx-lm keeps a copy per sequence: {lru.nbytes} vs {held} bytes"


def test_drop_in_prompt_cache_has_mlx_lm_s_methods_and_shapes():
    for name in ("fetch_nearest_cache", "insert_cache", "trim_to", "stats_by_type", "__len__"):
        theirs = inspect.signature(getattr(LRUPromptCache, name)).parameters
        ours = inspect.signature(getattr(TriePromptCache, name)).parameters
        assert list(theirs) == list(ours), name
    model = tiny("llama")
    cache = TriePromptCache(max_size=2)
    tokens = list(range(40))
    assert cache.fetch_nearest_cache("m", tokens) == (None, tokens)
    live = make_prompt_cache(model)
    mx.eval(model(mx.array(tokens)[None], cache=live))
    cache.insert_cache("m", tokens, live)
    assert len(cache) == 1 and cache.nbytes > 0
    got, rest = cache.fetch_nearest_cache("m", tokens)  # an exact hit still leaves a token
    assert rest == tokens[-1:] and got[0].offset == 39
    got, rest = cache.fetch_nearest_cache("m", tokens[:10] + [99])  # any prefix restores
    assert rest == [99] and got[0].offset == 10
    logits = model(mx.array(rest)[None], cache=got)
    ref = model(mx.array(tokens[:10] + [99])[None], cache=make_prompt_cache(model))
    np.testing.assert_allclose(np.array(logits[0, -1]), np.array(ref[0, -1]), atol=ATOL)
    for i in range(3):  # max_size=2: the least recently used sequence goes
        seq = [100 + i] + tokens
        live = make_prompt_cache(model)
        mx.eval(model(mx.array(seq)[None], cache=live))
        cache.insert_cache("m", seq, live)
    assert len(cache) == 2
    stats = cache.stats_by_type()
    assert set(stats) == {"assistant", "user", "system"} and stats["assistant"]["n_sequences"] == 2
    cache.trim_to(n_sequences=1)
    assert len(cache) == 1
    cache.trim_to(n_bytes=0)
    assert len(cache) == 0 and cache.nbytes == 0


def test_prompt_cache_files_enter_and_leave_the_trie(tmp_path):
    model = tiny("llama")
    pc = make_prefix_cache(model)
    tokens = list(range(3, 80))
    run(generate_step(tokens, model, pc, sampler=greedy, max_tokens=1), 1)
    path = str(tmp_path / "prompt.safetensors")
    save_prompt_cache_file(pc, tokens, path)
    caches = load_prompt_cache(path)  # mlx-lm reads it
    assert caches[0].offset == len(tokens)
    fresh = make_prefix_cache(model)
    assert load_prompt_cache_file(fresh, path) == tokens
    with fresh.begin(tokens + [1]) as a, pc.begin(tokens + [1]) as b:
        assert a.cached == b.cached == len(tokens)
        for x, y in zip(a.caches, b.caches):
            assert mx.array_equal(x.state[0][..., : x.offset, :], y.state[0][..., : y.offset, :])
    with pytest.raises(ValueError, match="restored"):
        save_prompt_cache_file(pc, list(range(500, 520)), path)


@pytest.mark.parametrize("kind", ["rotating", "rotating-keep", "quantized"])
def test_window_and_quantized_caches_store_every_token_and_restore_any_prefix(kind):
    """RotatingKVCache (keep + window) and QuantizedKVCache layers are stored per token, once:
    any prefix restores (the window rebuilt from the path), and quantized payloads stay packed."""
    if kind == "quantized" and mx.default_device().type != mx.DeviceType.cpu:
        pytest.skip("MLX 0.32.4's CUDA backend has no quantized_matmul for this tiny shape (8x8x32x2, 8 bits)")
    model = tiny("llama", num_attention_heads=2, num_key_value_heads=1)  # head_dim 32: quantizable

    def make():
        if kind.startswith("rotating"):
            return [RotatingKVCache(max_size=16, keep=4 if kind == "rotating-keep" else 0) for _ in model.layers]
        return [QuantizedKVCache(group_size=32, bits=8) for _ in model.layers]

    pc = PrefixCache(make)
    tokens = list(range(1, 60))
    # a window with sink tokens is not chunking-invariant in mlx-lm: there, store and compare one
    # token per forward pass; elsewhere a 30-token chunk (the window scrolls inside it) then decode
    first = 1 if kind == "rotating-keep" else 30

    def feed(caches, seq):
        mx.eval(model(mx.array(seq[:first])[None], cache=caches))
        for t in seq[first:]:
            mx.eval(model(mx.array([[t]]), cache=caches))

    with pc.begin(tokens) as s:
        assert s.cached == 0 and s.capture_at == ()  # nothing to snapshot: every layer is per-token
        feed(s.caches, tokens)
        s.commit(tokens)
    assert pc.stats()["tokens_stored"] == 59 and pc.stats()["snapshot_bytes"] == 0
    for cut in (3, 10, 16, 17, 40, 58, 59):
        full = tokens[:cut] + [99, 98]
        with pc.begin(full) as s:
            assert s.cached == cut
            logits = model(mx.array(full[cut:])[None], cache=s.caches)
        ref_cache = make()
        if kind == "rotating-keep" or cut <= first:
            feed(ref_cache, tokens[:cut])
        else:
            mx.eval(model(mx.array(tokens[:cut])[None], cache=ref_cache))  # one shot: chunking-invariant
        ref = model(mx.array(full[cut:])[None], cache=ref_cache)
        np.testing.assert_allclose(np.array(logits[0, -1]), np.array(ref[0, -1]), atol=ATOL, err_msg=f"cut {cut}")
    node = next(n for _, n, _ in pc.walk())
    if kind == "quantized":
        assert node.payload.layers[0].arrays[0].dtype == mx.uint32  # still packed
        assert len(node.payload.layers[0].arrays) == 6
    per_token = sum(a.nbytes // a.shape[2] for a in pc._rules[0].live(ref_cache[0])) * len(model.layers)
    assert pc.stats()["kv_bytes"] == 59 * per_token  # every token's KV once, nothing of the live windows


def test_unknown_cache_type_is_refused_by_name():
    class ShiftedCache:
        offset = 0

        def update_and_fetch(self, k, v):
            return k, v

    with pytest.raises(TypeError, match="ShiftedCache"):
        PrefixCache(lambda: [ShiftedCache()])


def test_use_in_server_swaps_the_prompt_cache_class():
    import mlx_lm.server as server

    from kvtrie.integrations.mlx_lm import use_in_server

    original = server.LRUPromptCache
    try:
        use_in_server(host_bytes=1 << 20)
        cache = server.LRUPromptCache(5)  # as mlx_lm.server.run() builds it
        assert isinstance(cache, TriePromptCache) and cache.max_size == 5
    finally:
        server.LRUPromptCache = original
