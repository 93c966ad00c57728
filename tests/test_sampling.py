"""Each sampling filter on hand-made distributions, the greedy path, seeding and draw frequencies; the fast
paths (top_k bound, binned top_p, block draw) against plain full-sort references; penalties; top_logprobs."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ternlm.errors import ParamError, TernlmError
from ternlm.sampling import (
    Sampler,
    SamplingParams,
    TokenCounts,
    apply_frequency_presence_penalty,
    apply_repetition_penalty,
    apply_temperature,
    inverse_cdf,
    log_softmax,
    min_p_filter,
    process,
    top_k_filter,
    top_k_ids,
    top_logprobs,
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
    assert kept(process(logits, SamplingParams(temperature=1.0, top_p=0.8))) == {0, 1}
    assert kept(process(logits, SamplingParams(temperature=0.25, top_p=0.8))) == {0}


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
        {"frequency_penalty": 2.5}, {"frequency_penalty": float("nan")}, {"presence_penalty": -2.01},
        {"presence_penalty": float("inf")},
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


def test_bad_token_ids() -> None:
    with pytest.raises(ParamError, match=">= 0"):
        Sampler(SamplingParams(), prompt_ids=[3, -1])
    with pytest.raises(TernlmError, match="vocab"):
        Sampler(SamplingParams(seed=0), prompt_ids=[4]).sample(np.zeros(4, dtype=np.float32))


# ---- references: the plain full-vocab chain this module replaced ---------------------------------------


def ref_penalized(logits: np.ndarray, params: SamplingParams, prompt: list[int], output: list[int]) -> np.ndarray:
    """Penalties by hand: transformers' rule over prompt + output, then OpenAI's over the output only."""
    x = logits.astype(np.float64)
    for t in set(prompt + output):
        x[t] = x[t] / params.repetition_penalty if x[t] > 0 else x[t] * params.repetition_penalty
    for t, count in Counter(output).items():
        x[t] -= params.frequency_penalty * count + params.presence_penalty
    return x.astype(logits.dtype)


def ref_top_p(logits: np.ndarray, p: float) -> np.ndarray:
    """The full stable sort this module used before it binned."""
    if p >= 1.0:
        return logits
    order = np.argsort(-logits, kind="stable")
    cum = np.cumsum(np.exp(log_softmax(logits)[order]))
    n_keep = min(int(np.count_nonzero(cum < p - 1e-9)) + 1, logits.shape[-1])
    out = np.full_like(logits, -np.inf)
    out[order[:n_keep]] = logits[order[:n_keep]]
    return out


def ref_top_k(logits: np.ndarray, k: int) -> np.ndarray:
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = np.partition(logits, -k)[-k]
    return np.where(logits >= kth, logits, -np.inf).astype(logits.dtype)


def ref_final(x: np.ndarray, params: SamplingParams) -> np.ndarray:
    """Temperature → top_k → top_p → min_p, each on the whole vocab."""
    x = x / np.asarray(params.temperature, dtype=x.dtype)
    x = ref_top_p(ref_top_k(x, params.top_k), params.top_p)
    if params.min_p > 0:
        x = np.where(x >= np.max(x) + math.log(params.min_p), x, -np.inf).astype(x.dtype)
    return x


def ref_draw(final: np.ndarray, u: float) -> int:
    cdf = np.cumsum(np.exp(log_softmax(final)))
    token = int(np.searchsorted(cdf, u * cdf[-1], side="right"))
    return token if token < len(cdf) else int(np.searchsorted(cdf, cdf[-1], side="left"))


def random_logits(rng: np.random.Generator, n: int, scale: float, ties: bool, neg_inf: float) -> np.ndarray:
    """Random-normal logits, optionally rounded to quarters (many ties) and with some -inf entries."""
    x = rng.normal(size=n) * scale
    if ties:
        x = np.round(x * 4) / 4
    x[rng.random(n) < neg_inf] = -np.inf
    x[rng.integers(n)] = scale  # at least one finite value
    return x.astype(np.float32)


# ---- penalties -----------------------------------------------------------------------------------------


def test_frequency_presence_penalty_reference() -> None:
    logits = np.array([2.0, -1.0, 0.5, 3.0, 0.0], dtype=np.float32)
    output = [3, 1, 3, 3, 0]
    counts = TokenCounts(output)
    out = apply_frequency_presence_penalty(logits, counts.ids, counts.counts, 0.5, 0.25)
    # 0: 2 - (0.5·1 + 0.25); 1: -1 - 0.75; 3: 3 - (0.5·3 + 0.25); 2 and 4 never generated.
    np.testing.assert_allclose(out, [1.25, -1.75, 0.5, 1.25, 0.0])
    np.testing.assert_array_equal(logits, [2.0, -1.0, 0.5, 3.0, 0.0])  # input untouched
    assert out.dtype == np.float32
    assert apply_frequency_presence_penalty(logits, counts.ids, counts.counts, 0.0, 0.0) is logits
    negative = apply_frequency_presence_penalty(logits, counts.ids, counts.counts, -1.0, -2.0)
    np.testing.assert_allclose(negative[[0, 3]], [2.0 + 3.0, 3.0 + 5.0])  # negative values encourage repeats


def test_token_counts_incremental() -> None:
    counts = TokenCounts([5, 2, 5])
    counts.add(7)
    for _ in range(200):  # past the initial capacity
        counts.add(9)
    for t in range(100, 200):
        counts.add(t)
    assert counts.ids[:4].tolist() == [5, 2, 7, 9] and counts.counts[:4].tolist() == [2, 1, 1, 200]
    assert len(counts.ids) == 104 and counts.max_id == 199


@pytest.mark.parametrize("rep", [1.0, 1.3])
def test_sampler_penalties_match_hand_reference(rep: float) -> None:
    rng = np.random.default_rng(11)
    params = SamplingParams(temperature=0.0, repetition_penalty=rep, frequency_penalty=0.7, presence_penalty=0.4)
    prompt = [1, 4, 4, 9]
    sampler, output = Sampler(params, prompt), []
    for _ in range(40):
        logits = (rng.normal(size=12) + np.where(np.arange(12) < 3, 2.0, 0.0)).astype(np.float32)
        ref = ref_penalized(logits, params, prompt, output)
        token, logprob = sampler.sample(logits)
        assert token == int(np.argmax(ref))
        assert logprob == pytest.approx(float(log_softmax(ref)[token]), abs=1e-5)
        np.testing.assert_allclose(process(logits, params, prompt, output), ref, rtol=1e-6, atol=1e-6)
        output.append(token)
    assert len(set(output)) > 3  # the penalties pushed it around


def test_frequency_presence_ignore_the_prompt() -> None:
    logits = np.array([4.0, 3.9, 0.0], dtype=np.float32)
    params = SamplingParams(temperature=0.0, frequency_penalty=2.0, presence_penalty=2.0)
    np.testing.assert_array_equal(process(logits, params, prompt_ids=[0, 0, 0, 0]), logits)
    sampler = Sampler(params, prompt_ids=[0, 0, 0, 0])
    token, logprob = sampler.sample(logits)
    assert token == 0 and logprob == pytest.approx(float(log_softmax(logits)[0]))  # the prompt's 0s cost nothing
    token, logprob = sampler.sample(logits)  # now 0 was generated once: 4 - (2·1 + 2) = 0 < 3.9
    assert token == 1 and logprob == pytest.approx(float(log_softmax(np.array([0.0, 3.9, 0.0]))[1]), rel=1e-6)
    # the repetition penalty, by contrast, does see the prompt
    rep = Sampler(SamplingParams(temperature=0.0, repetition_penalty=2.0), prompt_ids=[0])
    assert rep.sample(logits)[0] == 1


# ---- the fast paths against the references -------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.sampled_from([1, 2, 7, 300, 4096, 4097, 20_000]),
    scale=st.sampled_from([0.01, 0.5, 1.0, 3.0, 30.0]),
    ties=st.booleans(),
    neg_inf=st.sampled_from([0.0, 0.3, 0.99]),
    p=st.floats(1e-6, 1.0),
)
def test_top_p_keeps_the_full_sort_set(seed: int, n: int, scale: float, ties: bool, neg_inf: float, p: float) -> None:
    logits = random_logits(np.random.default_rng(seed), n, scale, ties, neg_inf)
    np.testing.assert_array_equal(top_p_filter(logits, p), ref_top_p(logits, p))


@pytest.mark.parametrize(("scale", "p"), [(1.0, 0.9), (1.0, 0.5), (3.0, 0.95), (10.0, 0.99), (0.0, 0.7)])
def test_top_p_full_vocab(scale: float, p: float) -> None:
    for seed in range(3):
        logits = (np.random.default_rng(seed).normal(size=128_256) * scale).astype(np.float32)
        np.testing.assert_array_equal(top_p_filter(logits, p), ref_top_p(logits, p))


@settings(max_examples=100, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.sampled_from([1, 5, 255, 256, 257, 3000, 70_000]),
    k=st.sampled_from([1, 2, 40, 255, 300, 10_000]),
    ties=st.booleans(),
    neg_inf=st.sampled_from([0.0, 0.5, 0.9999]),
)
def test_top_k_matches_partition(seed: int, n: int, k: int, ties: bool, neg_inf: float) -> None:
    logits = random_logits(np.random.default_rng(seed), n, 1.0, ties, neg_inf)
    assert np.all(np.diff(top_k_ids(logits, k)) > 0)
    np.testing.assert_array_equal(top_k_filter(logits, k), ref_top_k(logits, k))


@settings(max_examples=100, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.sampled_from([1, 3, 256, 257, 1000, 70_000]),
       zeros=st.sampled_from([0.0, 0.5, 0.999]))
def test_inverse_cdf_matches_full_cumsum(seed: int, n: int, zeros: float) -> None:
    rng = np.random.default_rng(seed)
    weights = rng.random(n) * (rng.random(n) >= zeros)
    weights[rng.integers(n)] = 1.0
    cdf = np.cumsum(weights)
    for u in [*rng.random(20), 0.0, 1.0 - 2**-53]:
        pos = inverse_cdf(weights, float(u))
        assert weights[pos] > 0
        expected = int(np.searchsorted(cdf, u * cdf[-1], side="right"))
        assert pos == expected or expected == n  # at the very top both take the last token with mass


CHAINS = [
    SamplingParams(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05),
    SamplingParams(top_p=0.9),
    SamplingParams(temperature=1.3),
    SamplingParams(temperature=0.7, min_p=0.1),
    SamplingParams(temperature=0.9, top_p=0.8, repetition_penalty=1.2, frequency_penalty=0.3, presence_penalty=0.6),
]


@pytest.mark.parametrize("params", CHAINS)
def test_same_tokens_as_the_full_vocab_chain(params: SamplingParams) -> None:
    # The fast chain keeps the old inverse-CDF order (token id), so a seed still gives the tokens it gave before.
    rng = np.random.default_rng(5)
    prompt = rng.integers(0, 10_000, size=50).tolist()
    sampler, ref_rng, output = Sampler(params, prompt), np.random.Generator(np.random.PCG64(99)), []
    sampler.rng = np.random.Generator(np.random.PCG64(99))
    for _ in range(30):
        logits = (rng.normal(size=10_000) * 2).astype(np.float32)
        final = ref_final(ref_penalized(logits, params, prompt, output), params)
        expected = ref_draw(final, ref_rng.random())
        token, logprob = sampler.sample(logits)
        assert token == expected
        assert logprob == pytest.approx(float(log_softmax(final)[token]), abs=1e-6)
        np.testing.assert_array_equal(np.isfinite(process(logits, params, prompt, output)), np.isfinite(final))
        output.append(token)


def test_seeded_reproducibility_with_penalties() -> None:
    rng = np.random.default_rng(2)
    table = (rng.normal(size=(25, 5000)) * 2).astype(np.float32)
    params = SamplingParams(temperature=0.9, top_p=0.9, frequency_penalty=0.5, presence_penalty=0.5, seed=77)

    def run(p: SamplingParams) -> list[int]:
        sampler = Sampler(p, prompt_ids=[1, 2, 3])
        return [sampler.sample(row)[0] for row in table]

    assert run(params) == run(params) != run(SamplingParams(**{**params.__dict__, "seed": 78}))


@pytest.mark.parametrize(
    ("params", "vocab", "scale"),
    [
        (SamplingParams(temperature=0.8, top_k=10, top_p=0.9, min_p=0.05, seed=3), 128_256, 1.0),
        (SamplingParams(top_p=0.9, seed=4), 8192, 3.0),  # the binned top_p and the block draw on a dense vocab
    ],
)
def test_draw_frequencies_match_filtered_softmax(params: SamplingParams, vocab: int, scale: float) -> None:
    logits = (np.random.default_rng(8).normal(size=vocab) * scale).astype(np.float32)
    target = np.exp(log_softmax(ref_final(logits, params)))
    sampler, n = Sampler(params), 20_000
    draws = np.bincount([sampler.sample(logits)[0] for _ in range(n)], minlength=vocab)
    assert draws[target == 0].sum() == 0
    # Tokens expected >= 20 times each get a cell, the rest share one; a 0.1% critical value of chi-square
    # is below df + 5·sqrt(2·df) for these df, and a wrong distribution lands far above it.
    big, rest = target * n >= 20, (target * n < 20) & (target > 0)
    counts = np.append(draws[big], draws[rest].sum()) if rest.any() else draws[big]
    probs = np.append(target[big], target[rest].sum()) if rest.any() else target[big]
    df = len(counts) - 1
    assert df >= 2 and chi_square(counts, probs) < df + 5 * math.sqrt(2 * df)


# ---- top_logprobs --------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.sampled_from([1, 3, 25, 300, 128_256]), k=st.integers(0, 20),
       ties=st.booleans(), neg_inf=st.sampled_from([0.0, 0.5]))
def test_top_logprobs_matches_numpy(seed: int, n: int, k: int, ties: bool, neg_inf: float) -> None:
    rng = np.random.default_rng(seed)
    logits = random_logits(rng, n, 2.0, ties, neg_inf)
    token = int(rng.integers(n))
    ref = log_softmax(logits)
    order = np.argsort(-ref, kind="stable")[: min(k, n)]
    logprob, best = top_logprobs(logits, token, k)
    assert logprob == pytest.approx(float(ref[token]), abs=1e-9) or logprob == ref[token] == -np.inf
    assert [t for t, _ in best] == order.tolist()
    np.testing.assert_allclose([lp for _, lp in best], ref[order], atol=1e-9)


def test_top_logprobs_is_the_raw_distribution() -> None:
    logits = np.log(np.array([0.1, 0.6, 0.3], dtype=np.float32))
    logprob, best = top_logprobs(logits, 0, 2)
    assert logprob == pytest.approx(math.log(0.1), rel=1e-6)
    assert [t for t, _ in best] == [1, 2]
    assert [lp for _, lp in best] == pytest.approx([math.log(0.6), math.log(0.3)], rel=1e-6)
    assert top_logprobs(logits, 2, 0) == (pytest.approx(math.log(0.3), rel=1e-6), [])


@pytest.mark.parametrize("k", [-1, 21, 1.5, True, None])
def test_top_logprobs_k_validated(k: object) -> None:
    with pytest.raises(ParamError, match="top_logprobs"):
        top_logprobs(np.zeros(4, dtype=np.float32), 0, k)  # type: ignore[arg-type]


def test_top_logprobs_bad_token() -> None:
    with pytest.raises(TernlmError):
        top_logprobs(np.zeros(4, dtype=np.float32), 4, 1)
