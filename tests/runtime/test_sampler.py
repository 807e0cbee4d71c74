"""Sampling filters and the seeded sampler (runtime/sampler.py), on hand-built vectors."""

from __future__ import annotations

import math

import numpy as np
import pytest

from minicpmo.runtime.errors import InputError
from minicpmo.runtime.sampler import (
    apply_min_p,
    apply_penalties,
    apply_top_k,
    apply_top_p,
    draw,
    make_sampler,
    softmax,
)
from minicpmo.runtime.types import GenerationParams

NEG = -np.inf


def logits_of(probs) -> np.ndarray:
    return np.log(np.asarray(probs, dtype=np.float64))


def kept(x: np.ndarray) -> list[int]:
    return np.flatnonzero(np.isfinite(x)).tolist()


# -- filters -----------------------------------------------------------------------------------------

def test_top_k():
    x = np.array([1.0, 5.0, 3.0, 4.0, 2.0])
    assert kept(apply_top_k(x, 2)) == [1, 3]
    assert kept(apply_top_k(x, 1)) == [1]
    assert apply_top_k(x, 0) is x and apply_top_k(x, 5) is x


def test_top_k_keeps_ties_with_the_kth():
    assert kept(apply_top_k(np.array([3.0, 1.0, 3.0, 2.0]), 1)) == [0, 2]


@pytest.mark.parametrize("top_p, expected", [
    (0.49, [0]),  # the best token alone holds 0.5
    (0.6, [0, 1]),
    (0.79, [0, 1]),  # 0.5 + 0.3 covers 0.79
    (0.81, [0, 1, 2]),
    (1.0, [0, 1, 2, 3]),
    (0.01, [0]),  # at least one token stays
])
def test_top_p(top_p, expected):
    x = logits_of([0.5, 0.3, 0.15, 0.05])
    assert kept(apply_top_p(x, top_p)) == expected


def test_top_p_fast_path_equals_full_sort():
    rng = np.random.default_rng(0)
    x = rng.normal(size=10_000) * 4
    for top_p in (0.1, 0.5, 0.9, 0.99, 0.999999):
        probs = softmax(x)
        order = np.argsort(probs)
        drop = np.cumsum(probs[order]) <= 1 - top_p
        drop[-1] = False
        expected = sorted(order[~drop].tolist())
        assert kept(apply_top_p(x, top_p)) == expected


def test_top_p_after_top_k_ignores_removed_tokens():
    x = apply_top_k(logits_of([0.4, 0.3, 0.2, 0.1]), 2)  # renormalised: 4/7, 3/7
    assert kept(apply_top_p(x, 0.5)) == [0]
    assert kept(apply_top_p(x, 0.6)) == [0, 1]


def test_repetition_penalty_hf_semantics():
    x = np.array([2.0, -2.0, 1.0, -1.0], dtype=np.float32)
    history = np.array([0, 1, 0, 1], dtype=np.int64)  # prompt = first 2 ids, generated = [0, 1]
    out = apply_penalties(x, history, 2, repetition_penalty=2.0)
    assert out.tolist() == [1.0, -4.0, 1.0, -1.0]
    assert x.tolist() == [2.0, -2.0, 1.0, -1.0]  # the caller's buffer is untouched
    only_prompt = np.array([2, 3, 0], dtype=np.int64)
    assert apply_penalties(x, only_prompt, 2, repetition_penalty=2.0).tolist() == [1.0, -2.0, 1.0, -1.0]
    assert apply_penalties(x, only_prompt, 2, repetition_penalty=2.0,
                           penalize_prompt=True).tolist() == [1.0, -2.0, 0.5, -2.0]


def test_presence_and_frequency_penalties_count_generated_tokens_only():
    x = np.zeros(4)
    history = np.array([3, 3, 1, 1, 1, 2], dtype=np.int64)  # prompt [3, 3]; generated 1,1,1,2
    out = apply_penalties(x, history, 2, presence_penalty=0.5, frequency_penalty=0.25)
    assert out.tolist() == [0.0, -(0.5 + 0.75), -(0.5 + 0.25), 0.0]


def test_draw_follows_the_distribution():
    rng = np.random.default_rng(0)
    x = logits_of([0.1, 0.6, 0.3])
    counts = np.bincount([draw(x, rng) for _ in range(4000)], minlength=3) / 4000
    assert np.allclose(counts, [0.1, 0.6, 0.3], atol=0.03)
    assert draw(np.array([NEG, 0.0, NEG]), rng) == 1


# -- the sampler -------------------------------------------------------------------------------------

def test_greedy_is_argmax_with_lowest_id_on_ties():
    sampler = make_sampler(GenerationParams(temperature=0.0))
    assert sampler(np.array([1.0, 3.0, 3.0, 2.0], dtype=np.float32), np.array([], np.int64), 0) == 1


def test_greedy_applies_repetition_penalty():
    sampler = make_sampler(GenerationParams(temperature=0.0, repetition_penalty=2.0))
    history = np.array([5, 1], dtype=np.int64)  # prompt [5], generated [1]
    assert sampler(np.array([0.0, 3.0, 2.0], dtype=np.float32), history, 1) == 2


def test_same_seed_same_tokens():
    rng = np.random.default_rng(1)
    steps = [rng.normal(size=50).astype(np.float32) for _ in range(20)]
    params = GenerationParams(temperature=1.0, top_k=20, top_p=0.9, seed=42)

    def run(p):
        sampler, history = make_sampler(p), np.array([0], np.int64)
        out = []
        for logits in steps:
            out.append(sampler(logits, history, 1))
            history = np.append(history, out[-1])
        return out

    assert run(params) == run(params)
    assert run(params) != run(GenerationParams(temperature=1.0, top_k=20, top_p=0.9, seed=43))
    assert make_sampler(GenerationParams(temperature=1.0, seed=-5))  # any integer seeds


def test_low_temperature_concentrates_and_top_k_1_is_greedy():
    logits = np.array([1.0, 1.5, 0.5], dtype=np.float32)
    hist = np.array([], np.int64)
    sharp = make_sampler(GenerationParams(temperature=0.01, seed=0))
    assert {sharp(logits, hist, 0) for _ in range(50)} == {1}
    top1 = make_sampler(GenerationParams(temperature=5.0, top_k=1, seed=0))
    assert {top1(logits, hist, 0) for _ in range(50)} == {1}


@pytest.mark.parametrize("field, value", [
    ("temperature", -0.1), ("temperature", math.inf), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -1),
    ("top_k", 2.5), ("repetition_penalty", 0.0), ("presence_penalty", 2.5), ("frequency_penalty", -3),
    ("seed", "7"),
])
def test_bad_params_name_the_field(field, value):
    with pytest.raises(InputError) as info:
        make_sampler(GenerationParams(**{field: value}))
    assert info.value.param == field and field in str(info.value)


def test_top_k_shortcut_draws_the_same_token_as_the_full_vector():
    rng = np.random.default_rng(5)
    logits = (rng.normal(size=5000) * 3).astype(np.float32)
    history = np.arange(40, dtype=np.int64)
    params = GenerationParams(temperature=0.7, top_k=50, top_p=0.8, repetition_penalty=1.05, seed=11)
    sampler, reference_rng = make_sampler(params), np.random.default_rng(11)
    for _ in range(100):
        x = apply_penalties(logits, history, 20, repetition_penalty=1.05) / 0.7
        assert sampler(logits, history, 20) == draw(apply_top_p(apply_top_k(x, 50), 0.8), reference_rng)


@pytest.mark.parametrize("min_p, expected", [
    (0.0, [0, 1, 2, 3]),
    (0.11, [0, 1, 2]),  # 0.05 < 0.11 * 0.5
    (0.29, [0, 1, 2]),  # 0.15 > 0.29 * 0.5
    (0.61, [0]),  # 0.3 < 0.305
    (1.0, [0]),
])
def test_min_p(min_p, expected):
    x = logits_of([0.5, 0.3, 0.15, 0.05])
    assert kept(apply_min_p(x, min_p)) == expected
    assert kept(apply_min_p(np.where(np.arange(4) == 0, NEG, x), 0.55)) == [1]  # relative to the best left


def test_min_p_in_the_sampler_never_draws_a_dropped_token():
    probs = [0.5, 0.3, 0.15, 0.05]
    sampler = make_sampler(GenerationParams(temperature=1.0, min_p=0.4, seed=0))
    drawn = {sampler(logits_of(probs), np.zeros(0, dtype=np.int64), 0) for _ in range(300)}
    assert drawn == {0, 1}
    with pytest.raises(InputError, match="min_p"):
        make_sampler(GenerationParams(min_p=1.5))


def test_top_logprobs_are_the_log_softmax_best_first_ties_by_id():
    from minicpmo.runtime.sampler import top_logprobs

    logits = np.random.default_rng(3).standard_normal(5000).astype(np.float32)
    logits[[7, 9, 11]] = 4.0  # a three-way tie at the top
    x = logits.astype(np.float64)
    reference = x - (x.max() + np.log(np.exp(x - x.max()).sum()))
    chosen, best = top_logprobs(logits, 42, 5)
    assert chosen == pytest.approx(reference[42], abs=1e-6)  # float32 exp, float64 sum
    assert [i for i, _ in best] == [7, 9, 11, *np.argsort(-x, kind="stable")[3:5]]
    assert [v for _, v in best] == pytest.approx(reference[[i for i, _ in best]], abs=1e-6)
    assert top_logprobs(logits, 0, 0)[1] == [] and len(top_logprobs(logits[:3], 0, 5)[1]) == 3
