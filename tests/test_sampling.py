"""Each sampling filter on hand-made distributions, the greedy path, seeding and draw frequencies."""

from __future__ import annotations

import numpy as np
import pytest

from ternlm.errors import TernlmError
from ternlm.sampling import (
    Sampler,
    SamplingParams,
    apply_repetition_penalty,
    apply_temperature,
    log_softmax,
    min_p_filter,
    process,
    top_k_filter,
    top_p_filter,
)

PROBS = np.array([0.5, 0.3, 0.15, 0.05])


def logits_of(probs: np.ndarray) -> np.ndarray:
    return np.log(np.asarray(probs)).astype(np.float32)


def kept(logits: np.ndarray) -> set[int]:
    return set(np.flatnonzero(np.isfinite(logits)).tolist())


def test_repetition_penalty_hf_semantics() -> None:
    logits = np.array([2.0, -2.0, 1.0, 0.5], dtype=np.float32)
    out = apply_repetition_penalty(logits, [0, 1, 1], 2.0)
    np.testing.assert_array_equal(out, [1.0, -4.0, 1.0, 0.5])
    np.testing.assert_array_equal(logits, [2.0, -2.0, 1.0, 0.5])  # input untouched
    assert apply_repetition_penalty(logits, [], 2.0) is logits
    assert out.dtype == np.float32


def test_temperature() -> None:
    logits = np.array([1.0, 2.0], dtype=np.float32)
    np.testing.assert_allclose(apply_temperature(logits, 0.5), [2.0, 4.0])
    assert apply_temperature(logits, 0.5).dtype == np.float32
    with pytest.raises(TernlmError):
        apply_temperature(logits, 0.0)


@pytest.mark.parametrize(
    ("logits", "k", "expected"),
    [
        ([1, 3, 2, 5, 4], 2, {3, 4}),
        ([1, 3, 2, 5, 4], 1, {3}),
        ([3, 2, 2, 0], 2, {0, 1, 2}),  # ties with the k-th are kept
        ([1, 3, 2], 0, {0, 1, 2}),
        ([1, 3, 2], 10, {0, 1, 2}),
    ],
)
def test_top_k(logits: list[float], k: int, expected: set[int]) -> None:
    assert kept(top_k_filter(np.array(logits, dtype=np.float32), k)) == expected


@pytest.mark.parametrize(
    ("p", "expected"),
    [
        (0.1, {0}), (0.5, {0}), (0.8, {0, 1}), (0.81, {0, 1, 2}), (0.95, {0, 1, 2}), (0.99, {0, 1, 2, 3}),
        (1.0, {0, 1, 2, 3}),
    ],
)
def test_top_p(p: float, expected: set[int]) -> None:
    shuffled = np.array([2, 0, 3, 1])  # order in the vocab must not matter
    out = top_p_filter(logits_of(PROBS[shuffled]), p)
    assert {int(shuffled[i]) for i in kept(out)} == expected


def test_top_p_keeps_one_token_when_one_dominates() -> None:
    assert kept(top_p_filter(np.array([10.0, 0.0, 0.0], dtype=np.float32), 0.001)) == {0}


@pytest.mark.parametrize(("min_p", "expected"), [(0.0, {0, 1, 2, 3}), (0.05, {0, 1, 2, 3}), (0.25, {0, 1, 2}),
                                                 (0.5, {0, 1}), (0.61, {0}), (1.0, {0})])
def test_min_p(min_p: float, expected: set[int]) -> None:
    assert kept(min_p_filter(logits_of(PROBS), min_p)) == expected


def test_filtered_values_unchanged() -> None:
    logits = logits_of(PROBS)
    out = top_p_filter(logits, 0.8)
    np.testing.assert_array_equal(out[:2], logits[:2])
    assert out.dtype == np.float32 and np.all(np.isneginf(out[2:]))


def test_chain_order_temperature_before_top_p() -> None:
    # At T=1 top_p=0.8 keeps two tokens; at T=0.25 the first token alone has > 0.8 of the mass.
    logits = logits_of(PROBS)
    assert kept(process(logits, [], SamplingParams(temperature=1.0, top_p=0.8))) == {0, 1}
    assert kept(process(logits, [], SamplingParams(temperature=0.25, top_p=0.8))) == {0}


def test_greedy_is_argmax_after_penalty() -> None:
    logits = np.array([0.1, 3.0, 2.9, -1.0], dtype=np.float32)
    sampler = Sampler(SamplingParams(temperature=0.0, top_k=1, top_p=0.1))
    token, logprob = sampler.sample(logits)
    assert token == 1 and logprob == pytest.approx(float(log_softmax(logits)[1]))
    sampler = Sampler(SamplingParams(temperature=0.0, repetition_penalty=1.5), prompt_ids=[1])
    token, logprob = sampler.sample(logits)
    penalized = apply_repetition_penalty(logits, [1], 1.5)
    assert token == 2 and logprob == pytest.approx(float(log_softmax(penalized)[2]))


def test_logprob_is_of_final_distribution() -> None:
    logits = logits_of(PROBS)
    token, logprob = Sampler(SamplingParams(top_k=2, seed=1)).sample(logits)
    assert token in (0, 1)
    assert logprob == pytest.approx(np.log(PROBS[token] / PROBS[:2].sum()), rel=1e-5)


def test_same_seed_same_tokens() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=50).astype(np.float32)
    params = SamplingParams(temperature=1.2, top_p=0.95, seed=1234)
    a = [Sampler(params).sample(logits)[0] for _ in range(3)]
    s1, s2 = Sampler(params), Sampler(params)
    seq1 = [s1.sample(logits)[0] for _ in range(40)]
    seq2 = [s2.sample(logits)[0] for _ in range(40)]
    s3 = Sampler(SamplingParams(temperature=1.2, top_p=0.95, seed=4321))
    assert seq1 == seq2 and len(set(a)) == 1
    assert seq1 != [s3.sample(logits)[0] for _ in range(40)]


def test_filtered_tokens_never_drawn() -> None:
    logits = logits_of(PROBS)
    sampler = Sampler(SamplingParams(top_k=2, seed=0))
    assert {sampler.sample(logits)[0] for _ in range(500)} <= {0, 1}


def chi_square(counts: np.ndarray, probs: np.ndarray) -> float:
    expected = probs * counts.sum()
    return float(np.sum((counts - expected) ** 2 / expected))


def test_draw_frequencies_match_softmax() -> None:
    logits = np.array([1.0, 0.0, 2.0, -0.5, 1.5], dtype=np.float32)
    temperature, n = 0.7, 20_000
    sampler = Sampler(SamplingParams(temperature=temperature, seed=7))
    counts = np.bincount([sampler.sample(logits)[0] for _ in range(n)], minlength=5)
    target = np.exp(log_softmax(logits / temperature))
    # df = 4: the 0.1% critical value is 18.5, so 30 is loose; ignoring the temperature gives ~4000.
    assert chi_square(counts, target) < 30
    assert chi_square(counts, np.exp(log_softmax(logits))) > 30


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": -0.1}, {"temperature": float("nan")}, {"top_k": -1}, {"top_k": 1.5}, {"top_p": 0.0},
        {"top_p": 1.1}, {"min_p": -0.1}, {"min_p": 1.5}, {"repetition_penalty": 0.0}, {"seed": -1},
    ],
)
def test_params_validated(kwargs: dict) -> None:
    name = next(iter(kwargs))
    with pytest.raises(TernlmError, match=name):
        SamplingParams(**kwargs)


def test_bad_logits() -> None:
    with pytest.raises(TernlmError, match="finite"):
        Sampler(SamplingParams(seed=0)).sample(np.full(4, -np.inf, dtype=np.float32))
    with pytest.raises(TernlmError, match="shape"):
        Sampler(SamplingParams(seed=0)).sample(np.zeros((2, 4), dtype=np.float32))
