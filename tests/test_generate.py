"""generate(): warm equals cold (invariant 7) across branch / resume / regenerate patterns."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvtrie import PrefixCache
from kvtrie.models import Sampler, generate, load_model, stream_generate

from fakes import lcp
from tolerance import atol_for


@pytest.fixture(scope="module")
def llama():
    model, tokenizer = load_model("tiny-llama")
    return model, tokenizer


def assert_warm_equals_cold(model, warm, prompt, max_tokens):
    cold = generate(model, None, prompt, max_tokens=max_tokens, return_logits=True)
    assert warm.tokens == cold.tokens, "greedy tokens must be identical"
    assert len(warm.logits) == len(cold.logits)
    for w, c in zip(warm.logits, cold.logits):
        np.testing.assert_allclose(w, c, atol=atol_for(model), rtol=0)


def random_requests(model, pc, data, max_tokens=4):
    """Drive random fresh / resume / branch / regenerate requests through `generate`.

    Checks each request's cached length against the trace and yields (prompt, result). The
    floors (a resumed conversation restores its whole history, a regenerated prompt all but
    its last token) hold where no snapshot is ever dropped: pure transformers, and hybrids
    under the LRU policy; the worth policy may drop speculative snapshots, and restores a
    regenerated prompt whole (with its logits) while it keeps that snapshot.
    """
    floors = not pc.recurrent_layers or pc.policy.name == "lru"
    vocab = st.integers(0, 260)
    history: list[list[int]] = []  # full sequences committed so far (prompt + reply - 1)
    prompts: list[list[int]] = []
    for _ in range(data.draw(st.integers(3, 6), label="requests")):
        kind = data.draw(st.sampled_from(["fresh", "resume", "branch", "regenerate"]) if history else st.just("fresh"))
        floor = 0  # what this request must restore at least
        if kind == "fresh":
            prompt = data.draw(st.lists(vocab, min_size=1, max_size=40), label="fresh")
        elif kind == "resume":  # the next turn of a conversation: previous prompt + reply + new text
            base = data.draw(st.sampled_from(history))
            prompt = base + data.draw(st.lists(vocab, min_size=1, max_size=12))
            floor = len(base)
        elif kind == "branch":  # diverge from an earlier sequence at any point (often mid-edge)
            base = data.draw(st.sampled_from(history))
            cut = data.draw(st.integers(0, len(base)))
            prompt = (base[:cut] + data.draw(st.lists(vocab, min_size=1, max_size=12))) or [1]
        else:  # regenerate: the same prompt again
            prompt = list(data.draw(st.sampled_from(prompts)))
            floor = len(prompt) - 1
        step_size = data.draw(st.integers(1, 24), label="prefill step")
        warm = generate(model, pc, prompt, max_tokens=max_tokens, prefill_step_size=step_size, return_logits=True)
        matched = max((lcp(prompt, h) for h in history), default=0)
        best = min(matched, len(prompt) - 1)
        assert (floor if floors else 0) <= warm.cached_tokens <= (best if floors else min(matched, len(prompt)))
        if not pc.recurrent_layers:
            assert warm.cached_tokens == best
        assert warm.prefill_tokens == len(prompt) - warm.cached_tokens
        yield prompt, warm
        history.append(prompt + warm.tokens[:-1])
        prompts.append(prompt)


@settings(max_examples=8)
@given(data=st.data())
def test_warm_equals_cold_over_random_patterns(llama, data):
    model, _ = llama
    pc = PrefixCache(model.make_cache)
    for prompt, warm in random_requests(model, pc, data):
        assert_warm_equals_cold(model, warm, prompt, 4)


def test_next_turn_restores_prompt_and_reply(llama):
    model, tokenizer = llama
    pc = PrefixCache(model.make_cache)
    prompt = tokenizer.encode("<|im_start|>user\nhello there<|im_end|>\n<|im_start|>assistant\n")
    first = generate(model, pc, prompt, max_tokens=6)
    assert first.cached_tokens == 0 and first.committed_tokens == len(prompt) + 5
    turn2 = prompt + first.tokens + tokenizer.encode("\nand again")
    second = generate(model, pc, turn2, max_tokens=6)
    assert second.cached_tokens == len(prompt) + len(first.tokens) - 1
    assert second.prefill_tokens == len(turn2) - second.cached_tokens


def test_stop_token_ends_generation_and_is_kept(llama):
    model, _ = llama
    prompt = [5, 6, 7, 8]
    free = generate(model, None, prompt, max_tokens=8)
    stop = free.tokens[2]
    stopped = generate(model, None, prompt, max_tokens=8, stop_tokens=[stop])
    first = free.tokens.index(stop)
    assert stopped.tokens == free.tokens[: first + 1] and stopped.finish_reason == "stop"
    assert free.finish_reason == "length" and len(free.tokens) == 8


def test_streaming_matches_generate_and_an_early_stop_commits_what_was_computed(llama):
    model, _ = llama
    prompt = list(range(20, 40))
    full = generate(model, None, prompt, max_tokens=6)
    pc = PrefixCache(model.make_cache)
    gen = stream_generate(model, pc, prompt, max_tokens=6)
    assert list(gen) == full.tokens and gen.result.tokens == full.tokens
    gen2 = stream_generate(model, pc, prompt + [1, 2, 3], max_tokens=6)
    it = iter(gen2)
    next(it), next(it)
    it.close()  # the consumer went away after two tokens
    assert gen2.result.finish_reason == "cancelled" and len(gen2.result.tokens) == 2
    assert pc.stats()["tokens_stored"] == len(prompt) + 5 + 3 + 1


def test_seeded_sampling_is_reproducible_through_the_cache(llama):
    model, _ = llama
    pc = PrefixCache(model.make_cache)
    prompt = list(range(60, 90))
    a = generate(model, pc, prompt, max_tokens=8, sampler=Sampler(temperature=0.8, top_p=0.9, seed=3))
    b = generate(model, pc, prompt, max_tokens=8, sampler=Sampler(temperature=0.8, top_p=0.9, seed=3))
    assert a.tokens == b.tokens and b.cached_tokens == len(prompt) - 1


@pytest.mark.parametrize("kwargs, error", [({"max_tokens": 0}, ValueError), ({"prefill_step_size": 1.5}, TypeError)])
def test_generate_rejects_bad_arguments(llama, kwargs, error):
    model, _ = llama
    pc = PrefixCache(model.make_cache)
    with pytest.raises(error):
        generate(model, pc, [1, 2], **kwargs)
    assert pc.stats()["requests"] == 0
