"""Every architecture family in mlx-lm: warm equals cold through generate_step and through the drop-in.

Each family is a tiny random model (tests/mlx_lm_families.py) with its own caches: plain,
sliding-window and chunked attention, recurrent `ArraysCache`s without an `offset`,
`CacheList`s of several kinds, deepseek-v4's own `LayerCache`. A conversation runs three
requests (a first turn with a hint at the system prompt's end, the next turn, another user
on the same system prompt) through kvtrie, and every greedy token and log-probability
must equal mlx-lm's own cold run of the same prompt.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

pytest.importorskip("mlx_lm")

from mlx_lm.generate import generate_step as mlx_generate_step  # noqa: E402
from mlx_lm.models.cache import make_prompt_cache  # noqa: E402

from kvtrie.integrations.mlx_lm import TriePromptCache, generate_step, make_prefix_cache  # noqa: E402
from kvtrie.layers import KV, STATE, WINDOW  # noqa: E402

import mlx_lm_families as fam  # noqa: E402
from tolerance import ATOL  # noqa: E402

FAMILIES = sorted(fam.FAMILIES)
REPLY = 3


def greedy(logprobs: mx.array) -> mx.array:
    return mx.argmax(logprobs, axis=-1)


def step_kwargs(name: str) -> dict:
    # a family whose logits depend on how a prompt is cut into prefill chunks (an mlx-lm bug,
    # see CHUNK_VARIANT) is compared one token per forward pass, warm and cold alike
    return {"prefill_step_size": 1} if name in fam.CHUNK_VARIANT else {}


def run(gen, n: int) -> list[tuple[int, np.ndarray]]:
    out = []
    for (token, logprobs), _ in zip(gen, range(n)):
        out.append((int(token), np.array(logprobs.astype(mx.float32))))
    gen.close()
    return out


def cold(model, prompt: list[int], name: str) -> list[tuple[int, np.ndarray]]:
    gen = mlx_generate_step(mx.array(prompt), model, prompt_cache=make_prompt_cache(model), sampler=greedy,
                            max_tokens=REPLY, **step_kwargs(name))
    return run(gen, REPLY)


def assert_same(warm, reference, what: str) -> None:
    assert [t for t, _ in warm] == [t for t, _ in reference], f"{what}: greedy tokens must be identical"
    for (_, a), (_, b) in zip(warm, reference):
        np.testing.assert_allclose(a, b, atol=10 * ATOL, rtol=0, err_msg=what)


def prompts(seed: int = 0) -> tuple[list[int], list[int], list[int]]:
    rng = np.random.default_rng(seed)
    system = rng.integers(0, 256, 40).tolist()
    return system, system + [1, 2, 3], system + [7, 7, 7, 7]


def check_storage(pc) -> None:
    """Byte accounting by tier and by kind is exact; per-token payloads span their edges."""
    total = 0
    for _, node, _ in pc.walk():
        data = node.payload
        total += data.nbytes
        for p, kind in zip(data.layers, pc.layer_kinds):
            if kind != STATE and p is not None:
                assert p.length == node.end - node.start
    stats = pc.stats()
    assert stats["device_bytes"] + stats["host_bytes"] == total == stats["kv_bytes"] + stats["snapshot_bytes"]


@pytest.mark.parametrize("name", FAMILIES)
def test_family_through_generate_step(name):
    model = fam.build(name)
    pc = make_prefix_cache(model, hot_sessions=0)  # every turn restores from the trie
    system, first, other = prompts()
    kw = step_kwargs(name)
    turn1 = run(generate_step(first, model, pc, sampler=greedy, max_tokens=REPLY, capture_hints=[len(system)], **kw), REPLY)
    assert_same(turn1, cold(model, first, name), "first turn")
    second = first + [t for t, _ in turn1] + [9, 9]
    before = pc.stats()["cached_tokens"]
    warm = run(generate_step(second, model, pc, sampler=greedy, max_tokens=REPLY, **kw), REPLY)
    assert pc.stats()["cached_tokens"] - before == len(first) + REPLY, "the next turn restores the whole history"
    assert_same(warm, cold(model, second, name), "next turn")
    before = pc.stats()["cached_tokens"]
    warm = run(generate_step(other, model, pc, sampler=greedy, max_tokens=REPLY, **kw), REPLY)
    assert pc.stats()["cached_tokens"] - before >= len(system), "another user restores the system prompt"
    assert_same(warm, cold(model, other, name), "another user")
    check_storage(pc)
    if WINDOW in pc.layer_kinds:  # every position of every window layer was recorded: no holes
        for _, node, _ in pc.walk():
            assert all(p is not None for p, k in zip(node.payload.layers, pc.layer_kinds) if k == WINDOW)


@pytest.mark.parametrize("name", FAMILIES)
def test_family_through_the_drop_in(name):
    """As mlx_lm.server uses its prompt cache: fetch, generate on the rest, insert prompt + reply."""
    model = fam.build(name)
    cache = TriePromptCache(make_cache=lambda key: make_prompt_cache(model), hot_sessions=0)
    system, first, other = prompts(1)
    second = None
    for i, prompt in enumerate([first, None, other]):
        if prompt is None:
            prompt = second
        caches, rest = cache.fetch_nearest_cache("m", prompt)
        cached = len(prompt) - len(rest)
        caches = caches if caches is not None else make_prompt_cache(model)
        gen = mlx_generate_step(mx.array(rest), model, prompt_cache=caches, sampler=greedy, max_tokens=REPLY,
                                **step_kwargs(name))
        warm = run(gen, REPLY)
        assert_same(warm, cold(model, prompt, name), f"request {i}")
        generated = [t for t, _ in warm]
        cache.insert_cache("m", prompt + generated, caches)
        if i == 0:
            second = first + generated + [9, 9]
        if i == 1:
            assert cached == len(first) + REPLY, "the next turn restores the whole history"
        if i == 2 and STATE not in cache._tries["m"].layer_kinds:
            assert cached >= len(system)
    pc = cache._tries["m"]
    check_storage(pc)
    kinds = set(pc.layer_kinds)
    if kinds <= {KV, WINDOW}:  # every stored token's KV once, in every layer
        per_token = pc.stats()["kv_bytes"] / pc.stats()["tokens_stored"]
        assert per_token == pytest.approx(sum(_token_bytes(model, name)), rel=0.01)


def _token_bytes(model, name: str) -> list[int]:
    """Per-token bytes of each per-token layer, measured on a cold cache of `model`."""
    from kvtrie.layers import leaves, rule_for

    caches = make_prompt_cache(model)
    mx.eval(model(mx.array([[1, 2, 3, 4]]), cache=caches))
    out = []
    for c in leaves(caches):
        rule = rule_for(c)
        if rule.kind == STATE:
            continue
        arrays = rule.live(c)
        if arrays is None:
            continue
        out.append(sum(a.nbytes // a.shape[2] for a in arrays))
    return out


def test_every_family_module_is_covered():
    """A new model file in mlx-lm must be added to the families (or to SKIPPED with a reason)."""
    import pkgutil

    import mlx_lm.models

    names = {m.name for m in pkgutil.iter_modules(mlx_lm.models.__path__)}
    assert names == set(fam.FAMILIES) | set(fam.SKIPPED), sorted(names ^ (set(fam.FAMILIES) | set(fam.SKIPPED)))
    cache_kinds = {t for types in fam.CACHE_TYPES.values() for t in types}
    assert {"KVCache", "RotatingKVCache", "ArraysCache", "ChunkedKVCache", "LayerCache"} <= cache_kinds
    assert any(t.startswith("CacheList(") for t in cache_kinds)
