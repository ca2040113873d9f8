"""Sampler: each knob on hand-made logits, seeding, validation."""

from __future__ import annotations

import math
from collections import Counter

import mlx.core as mx
import numpy as np
import pytest

from kvtrie.models.sampler import Sampler

LOGITS = [1.0, 3.0, 2.5, -1.0, 0.5, 2.9]  # argmax 1, then 5, then 2


def draws(sampler: Sampler, logits, n: int, history=()) -> Counter:
    x = mx.array(logits)
    return Counter(sampler(x, history) for _ in range(n))


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16])
@pytest.mark.parametrize("shape", [(6,), (1, 6), (1, 1, 6)])
def test_greedy_picks_argmax_any_shape_and_dtype(dtype, shape):
    x = mx.array(LOGITS, dtype=dtype).reshape(shape)
    assert Sampler(temperature=0)(x) == 1


def test_top_k_one_is_greedy():
    rng = np.random.default_rng(0)
    s = Sampler(temperature=1.5, top_k=1, seed=0)
    for _ in range(20):
        logits = rng.normal(size=50).astype(np.float32)
        assert s(mx.array(logits)) == int(np.argmax(logits))


def test_top_k_two_only_yields_the_two_best():
    counts = draws(Sampler(temperature=2.0, top_k=2, seed=1), LOGITS, 400)
    assert set(counts) == {1, 5}


def test_top_p_keeps_smallest_set_reaching_p():
    # probabilities 0.5, 0.3, 0.15, 0.05
    logits = np.log([0.5, 0.3, 0.15, 0.05])
    assert set(draws(Sampler(top_p=0.5, seed=2), logits, 200)) == {0}
    assert set(draws(Sampler(top_p=0.75, seed=2), logits, 400)) == {0, 1}
    assert set(draws(Sampler(top_p=0.85, seed=2), logits, 600)) == {0, 1, 2}
    assert set(draws(Sampler(top_p=1.0, seed=2), logits, 1000)) == {0, 1, 2, 3}


def test_min_p_drops_tokens_below_fraction_of_max():
    # relative to the best: 1, 0.6, 0.3, 0.1
    logits = np.log([0.5, 0.3, 0.15, 0.05])
    assert set(draws(Sampler(min_p=0.25, seed=3), logits, 600)) == {0, 1, 2}
    assert set(draws(Sampler(min_p=0.5, seed=3), logits, 400)) == {0, 1}
    assert set(draws(Sampler(min_p=0.7, seed=3), logits, 100)) == {0}


def test_repetition_penalty_by_hand():
    # token 1 (3.0) / 2 = 1.5 < 2.9 (token 5); a negative logit is multiplied, never raised
    logits = mx.array(LOGITS)
    s = Sampler(temperature=0, repetition_penalty=2.0)
    assert s(logits, [1]) == 5
    assert s(logits, [1, 5]) == 2  # 5: 2.9 / 2 = 1.45 < 2.5
    out = np.array(s.apply_penalties(logits, [3, 1]))
    np.testing.assert_allclose(out, [1.0, 1.5, 2.5, -2.0, 0.5, 2.9])


def test_presence_and_frequency_penalties_by_hand():
    logits = mx.array(LOGITS)
    history = [1, 1, 1, 5]
    # presence: 3.0 - 0.2 = 2.8 < 2.9 when only token 1 was seen; 2.8 > 2.7 once 5 was too
    assert Sampler(temperature=0, presence_penalty=0.2)(logits, [1]) == 5
    assert Sampler(temperature=0, presence_penalty=0.2)(logits, history) == 1
    # frequency: 3.0 - 3*0.2 = 2.4 < 2.5 (token 2) and 2.9 - 0.2 = 2.7 -> token 5
    assert Sampler(temperature=0, frequency_penalty=0.2)(logits, history) == 5
    s = Sampler(presence_penalty=0.5, frequency_penalty=0.25)
    out = np.array(s.apply_penalties(logits, history))
    np.testing.assert_allclose(out, [1.0, 3.0 - 0.5 - 0.75, 2.5, -1.0, 0.5, 2.9 - 0.5 - 0.25])


def test_penalties_only_look_inside_the_window():
    logits = mx.array(LOGITS)
    s = Sampler(temperature=0, repetition_penalty=2.0, penalty_window=2)
    assert s(logits, [1, 0, 4]) == 1  # token 1 is three back: outside the window
    assert s(logits, [0, 1, 4]) == 5
    assert Sampler(temperature=0, repetition_penalty=2.0, penalty_window=0)(logits, [1]) == 1
    freq = Sampler(frequency_penalty=1.0, penalty_window=3)
    np.testing.assert_allclose(
        np.array(freq.apply_penalties(logits, [1, 1, 1, 1, 2, 2])),
        [1.0, 2.0, 0.5, -1.0, 0.5, 2.9],
    )


def test_penalties_accept_array_histories_and_reject_bad_ids():
    logits = mx.array(LOGITS)
    s = Sampler(temperature=0, repetition_penalty=2.0)
    assert s(logits, np.array([1])) == s(logits, mx.array([1])) == 5
    with pytest.raises(ValueError, match="outside the vocabulary"):
        s(logits, [6])
    with pytest.raises(TypeError, match="integer"):
        s(logits, [1.5])


def test_same_seed_same_sequence_different_seeds_differ():
    logits = mx.array(np.zeros(1000, np.float32))
    s1, s2, s3 = Sampler(seed=7), Sampler(seed=7), Sampler(seed=8)
    seq1 = [s1(logits) for _ in range(50)]
    assert seq1 == [s2(logits) for _ in range(50)]
    assert seq1 != [s3(logits) for _ in range(50)]
    assert seq1[0] == Sampler(seed=7)(logits)
    s1.reset()
    assert [s1(logits) for _ in range(50)] == seq1


def test_seeded_sampler_leaves_global_rng_alone():
    mx.random.seed(123)
    expected = mx.random.uniform(shape=(4,))
    mx.random.seed(123)
    s = Sampler(seed=0)
    for _ in range(5):
        s(mx.array(LOGITS))
    assert mx.array_equal(mx.random.uniform(shape=(4,)), expected)


def test_unseeded_samplers_differ():
    logits = mx.array(np.zeros(1000, np.float32))
    a, b = Sampler(), Sampler()
    assert [a(logits) for _ in range(20)] != [b(logits) for _ in range(20)]


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_matches_softmax(temperature):
    logits = np.array([1.0, 0.0, -0.5, 0.7], np.float32)
    n = 3000
    counts = draws(Sampler(temperature=temperature, seed=11), logits, n)
    p = np.exp(logits / temperature)
    p /= p.sum()
    empirical = np.array([counts[i] / n for i in range(4)])
    # 4 standard deviations of a binomial proportion, plus slack
    bound = 4 * np.sqrt(p * (1 - p) / n) + 0.01
    assert np.all(np.abs(empirical - p) < bound), (empirical, p)


def test_filters_on_low_precision_logits():
    x = mx.array(LOGITS, dtype=mx.bfloat16)
    assert set(draws(Sampler(top_k=2, seed=4), x, 100)) <= {1, 5}
    assert Sampler(temperature=0, repetition_penalty=2.0)(x.astype(mx.float16), [1]) == 5


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": math.nan}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"min_p": 1.0}, "min_p"),
        ({"min_p": -0.1}, "min_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"repetition_penalty": -1.0}, "repetition_penalty"),
        ({"top_k": -1}, "top_k"),
        ({"penalty_window": -1}, "penalty_window"),
        ({"presence_penalty": math.inf}, "presence_penalty"),
        ({"seed": -1}, "seed"),
    ],
)
def test_invalid_config_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Sampler(**kwargs)


def test_invalid_assignment_and_types_raise():
    s = Sampler()
    with pytest.raises(ValueError, match="top_p"):
        s.top_p = 0.0
    with pytest.raises(TypeError, match="top_k"):
        Sampler(top_k=2.5)
    with pytest.raises(TypeError, match="seed"):
        Sampler(seed="x")


def test_bad_logits_raise():
    s = Sampler()
    with pytest.raises(ValueError, match="one position"):
        s(mx.zeros((2, 6)))
    with pytest.raises(TypeError, match="floating"):
        s(mx.zeros((6,), mx.int32))
