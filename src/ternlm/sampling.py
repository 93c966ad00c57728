"""Turn logits into the next token: penalties, filters, then a seeded draw.

The chain runs penalties → temperature → top_k → top_p → min_p → draw, the order transformers and vLLM
users expect. It is cheap on a 128k vocabulary because no step sorts or exponentiates more than it must:
top_k narrows the vocab to its few dozen candidates before anything else runs, top_p sorts only the tokens
whose value lies where the cumulative mass crosses p, and the draw sums 256-token blocks before it scans one.

The results are those of the plain full-vocab chain (full stable sort for top_p, cumsum over the vocab for
the draw): top_p keeps exactly that set, and the draw is the same inverse CDF in token-id order, so a seed
gives the tokens it gave before — both up to float64 rounding of a cumulative sum landing on a boundary.

A Sampler belongs to one request: it keeps that request's seeded random stream and, updated per token,
the distinct ids seen so far (prompt + output, for the repetition penalty) and the output counts (for the
frequency and presence penalties), so a step never rescans the history.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from ternlm.errors import ParamError, TernlmError

MAX_TOP_LOGPROBS = 20  # OpenAI's limit for top_logprobs
_BLOCK = 256  # block width for the top_k bound and the two-level draw
_BINS_PER_LOGIT = 64  # top_p bins: 1/64 logit wide, so the band to sort holds few tokens even when flat
_BINS = 2048  # 32 logits of bins below the top; everything lower shares the last bin
_CHUNK = 32768  # values per chunk when binning a whole vocab
_SORT_DIRECTLY = 4096  # below this many values top_p just sorts them all
_TOP_P_SLACK = 1e-9  # stops float rounding (0.5 + 0.3 = 0.79999…) from pulling in one token too many


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. temperature 0 means greedy; top_k 0, top_p 1, min_p 0, repetition_penalty 1 and
    frequency/presence_penalty 0 switch their step off."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ParamError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ParamError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not (0.0 < self.top_p <= 1.0):
            raise ParamError(f"top_p must be in (0, 1], got {self.top_p}")
        if not (0.0 <= self.min_p <= 1.0):
            raise ParamError(f"min_p must be in [0, 1], got {self.min_p}")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise ParamError(f"repetition_penalty must be finite and > 0, got {self.repetition_penalty}")
        for name in ("frequency_penalty", "presence_penalty"):
            if not (-2.0 <= getattr(self, name) <= 2.0):
                raise ParamError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        bad_seed = isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0
        if self.seed is not None and bad_seed:
            raise ParamError(f"seed must be an integer >= 0 or None, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class TokenCounts:
    """Distinct token ids and how often each occurred, kept as growing numpy arrays so that recording a
    token is O(1) amortised and the penalties index with them directly instead of rebuilding from history."""

    def __init__(self, tokens: Iterable[int] = ()) -> None:
        self._slot: dict[int, int] = {}
        self._ids = np.zeros(64, dtype=np.int64)
        self._counts = np.zeros(64, dtype=np.float64)
        self.max_id = -1
        for token in tokens:
            self.add(token)

    def add(self, token: int) -> None:
        token = int(token)
        slot = self._slot.get(token)
        if slot is None:
            if token < 0:
                raise ParamError(f"token ids must be >= 0, got {token}")
            slot = self._slot[token] = len(self._slot)
            if slot == len(self._ids):
                self._ids = np.concatenate([self._ids, np.zeros_like(self._ids)])
                self._counts = np.concatenate([self._counts, np.zeros_like(self._counts)])
            self._ids[slot] = token
            self.max_id = max(self.max_id, token)
        self._counts[slot] += 1

    @property
    def ids(self) -> np.ndarray:
        """The distinct ids, in order of first occurrence (a view: copy it to keep it)."""
        return self._ids[: len(self._slot)]

    @property
    def counts(self) -> np.ndarray:
        """How often each of `ids` occurred, as float64 (a view)."""
        return self._counts[: len(self._slot)]


# ---- whole-vocab helpers ------------------------------------------------------------------------------


def _finite_max(logits: np.ndarray) -> np.floating:
    top = np.max(logits)
    if not np.isfinite(top):
        raise TernlmError("logits have no finite maximum (all -inf, or NaN/+inf present)")
    return top


def _shifted_exp(values: np.ndarray, top: float, out: np.ndarray | None = None) -> np.ndarray:
    """exp(values - top) in float64, computed in one array (out, or a fresh one) with no temporaries."""
    out = np.subtract(values, top, out=out, dtype=np.float64)
    return np.exp(out, out=out)


def logsumexp(logits: np.ndarray) -> float:
    """log Σ exp(logits) in float64, stable; -inf entries add nothing."""
    top = _finite_max(logits)
    return float(top) + math.log(float(np.sum(_shifted_exp(logits, float(top)))))


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Float64 log-probabilities of (vocab,) logits; -inf entries stay -inf."""
    return logits.astype(np.float64) - logsumexp(logits)


# ---- penalties -----------------------------------------------------------------------------------------


def apply_repetition_penalty(logits: np.ndarray, previous_ids: Sequence[int] | np.ndarray,
                             penalty: float) -> np.ndarray:
    """Make seen tokens less likely (transformers' rule: positive logits / penalty, others × penalty).
    Repeated ids are harmless: every copy reads the unpenalised value and writes the same result."""
    if penalty == 1.0 or len(previous_ids) == 0:
        return logits
    ids = np.asarray(previous_ids, dtype=np.int64)
    out = logits.copy()
    seen = out[ids]
    out[ids] = np.where(seen > 0, seen / penalty, seen * penalty)
    return out


def apply_frequency_presence_penalty(logits: np.ndarray, ids: np.ndarray, counts: np.ndarray,
                                     frequency: float, presence: float) -> np.ndarray:
    """OpenAI's additive penalties: logits[t] -= frequency × count_t + presence for each distinct output
    token t (ids must be distinct; counts are their occurrences in the output, not the prompt)."""
    if (frequency == 0.0 and presence == 0.0) or len(ids) == 0:
        return logits
    out = logits.copy()
    out[ids] = out[ids] - (frequency * np.asarray(counts, dtype=np.float64) + presence)
    return out


def penalize(logits: np.ndarray, params: SamplingParams, seen: TokenCounts, output: TokenCounts) -> np.ndarray:
    """The repetition penalty over prompt + output, then frequency/presence over the output alone."""
    x = apply_repetition_penalty(logits, seen.ids, params.repetition_penalty)
    return apply_frequency_presence_penalty(x, output.ids, output.counts, params.frequency_penalty,
                                            params.presence_penalty)


def apply_temperature(logits: np.ndarray, temperature: float) -> np.ndarray:
    """Sharpen (<1) or flatten (>1) the distribution; temperature must be > 0."""
    if temperature <= 0:
        raise TernlmError(f"temperature must be > 0 here (0 means greedy), got {temperature}")
    return logits if temperature == 1.0 else logits / np.asarray(temperature, dtype=logits.dtype)


# ---- top_k ---------------------------------------------------------------------------------------------


def _block_maxima(x: np.ndarray) -> np.ndarray:
    n_blocks = x.shape[-1] // _BLOCK
    return x[: n_blocks * _BLOCK].reshape(n_blocks, _BLOCK).max(axis=1)


def top_k_ids(x: np.ndarray, k: int) -> np.ndarray:
    """Ascending ids of the k largest values and of any ties with the k-th (transformers keeps them).

    k blocks each hold a value >= the k-th largest block maximum, so that maximum bounds the k-th largest
    value from below: one comparison pass leaves a few hundred values to partition instead of 128k."""
    if k >= x.shape[-1]:
        return np.arange(x.shape[-1])
    maxima = _block_maxima(x)
    bound = np.partition(maxima, -k)[-k] if k <= len(maxima) else -np.inf
    near = np.flatnonzero(x >= bound)
    values = x[near]
    return near[values >= np.partition(values, -k)[-k]]


def top_k_filter(logits: np.ndarray, k: int) -> np.ndarray:
    """Keep the k largest logits (ties with the k-th are kept, as in transformers); k <= 0 keeps all."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    ids = top_k_ids(logits, k)
    out = np.full_like(logits, -np.inf)
    out[ids] = logits[ids]
    return out


# ---- top_p ---------------------------------------------------------------------------------------------


def _sorted_prefix(values: np.ndarray, weights: np.ndarray, target: float) -> np.ndarray:
    """Positions of the most likely tokens while the mass before each stays < target (at least one); a
    stable sort, so ties go in position order."""
    order = np.argsort(-values, kind="stable")
    cum = np.cumsum(weights[order])
    return order[: min(int(np.count_nonzero(cum < target)) + 1, len(order))]


def _value_bins(values: np.ndarray, top: np.floating) -> np.ndarray:
    """Bin of each value counting down from the top, 1/64 logit wide, the last bin catching everything
    lower; weakly decreasing in the value, so each bin is one contiguous run of the sorted order."""
    depth = np.subtract(top, values)
    np.multiply(depth, _BINS_PER_LOGIT, out=depth)
    np.minimum(depth, _BINS - 1, out=depth)  # also makes the -inf tokens' +inf finite
    return depth.astype(np.intp)


def _binned_mass(values: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each value's bin (int16) and the total weight per bin, in 32k-value chunks: whole-vocab temporaries
    would make the allocator return memory to the OS and page-fault it back on every call."""
    top = np.max(values)
    bins = np.empty(len(values), dtype=np.int16)
    mass = np.zeros(_BINS)
    for start in range(0, len(values), _CHUNK):
        chunk = _value_bins(values[start : start + _CHUNK], top)
        mass += np.bincount(chunk, weights=weights[start : start + _CHUNK], minlength=_BINS)
        bins[start : start + _CHUNK] = chunk
    return bins, mass


def nucleus_mask(values: np.ndarray, weights: np.ndarray, p: float) -> np.ndarray:
    """Which tokens top_p keeps: the smallest most-likely set whose mass reaches p, ties in position order —
    the set a full stable sort finds. weights are exp(values - max) (any common scale).

    Large inputs are binned by value and the per-bin masses summed, so only the bin where the running mass
    crosses p is sorted; every bin above it is kept whole and every bin below dropped."""
    target = (p - _TOP_P_SLACK) * float(np.sum(weights))
    keep = np.zeros(len(values), dtype=bool)
    if len(values) <= _SORT_DIRECTLY:
        keep[_sorted_prefix(values, weights, target)] = True
        return keep
    bins, mass = _binned_mass(values, weights)
    cum = np.cumsum(mass)
    edge = min(int(np.searchsorted(cum, target, side="left")), _BINS - 1)
    band = np.flatnonzero(bins == edge)
    before = float(cum[edge - 1]) if edge else 0.0
    np.less(bins, edge, out=keep)
    keep[band[_sorted_prefix(values[band], weights[band], target - before)]] = True
    return keep


def top_p_filter(logits: np.ndarray, p: float) -> np.ndarray:
    """Keep the smallest set of most likely tokens whose probability sums to >= p (at least one)."""
    if p >= 1.0:
        return logits
    keep = nucleus_mask(logits, _shifted_exp(logits, float(_finite_max(logits))), p)
    return np.where(keep, logits, -np.inf).astype(logits.dtype, copy=False)


# ---- min_p ---------------------------------------------------------------------------------------------


def min_p_mask(values: np.ndarray, min_p: float) -> np.ndarray:
    """Tokens whose probability is at least min_p × the top token's: p_i / p_max = exp(l_i - l_max), so the
    test needs no softmax."""
    return values >= np.max(values) + math.log(min_p)


def min_p_filter(logits: np.ndarray, min_p: float) -> np.ndarray:
    """Drop tokens whose probability is below min_p × the top token's probability."""
    if min_p <= 0.0:
        return logits
    return np.where(min_p_mask(logits, min_p), logits, -np.inf).astype(logits.dtype, copy=False)


# ---- the chain -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Candidates:
    """The tokens still in play: ids (None: position = token id, the whole vocab), their processed logits,
    and float64 weights exp(logit - max logit), 0 for tokens a filter dropped."""

    ids: np.ndarray | None
    logits: np.ndarray
    weights: np.ndarray

    def token(self, position: int) -> int:
        return position if self.ids is None else int(self.ids[position])

    def logprob(self, position: int) -> float:
        """log p under the final distribution, from the logit itself rather than log(weight)."""
        return float(self.logits[position]) - float(np.max(self.logits)) - math.log(float(np.sum(self.weights)))

    def dense(self, vocab: int) -> np.ndarray:
        """The final logits as a (vocab,) vector, -inf for dropped tokens."""
        kept = np.where(self.weights > 0, self.logits, -np.inf).astype(self.logits.dtype, copy=False)
        if self.ids is None:
            return kept
        out = np.full(vocab, -np.inf, dtype=self.logits.dtype)
        out[self.ids] = kept
        return out


def candidates(x: np.ndarray, params: SamplingParams, out: np.ndarray | None = None) -> Candidates:
    """Temperature → top_k → top_p → min_p on penalised (vocab,) logits. top_k narrows to its candidates
    first, so with it on the later steps see a few dozen values, not the vocab. Without top_k the weights
    go into out when given: a (vocab,) float64 array the caller reuses."""
    _finite_max(x)  # NaN would slip through top_k's comparisons
    x = apply_temperature(x, params.temperature)
    ids = top_k_ids(x, params.top_k) if params.top_k > 0 else None
    values = x if ids is None else x[ids]
    weights = _shifted_exp(values, float(_finite_max(values)), out if ids is None else None)
    if params.top_p < 1.0:
        np.multiply(weights, nucleus_mask(values, weights, params.top_p), out=weights)
    if params.min_p > 0.0:
        np.multiply(weights, min_p_mask(values, params.min_p), out=weights)
    return Candidates(ids, values, weights)


def process(logits: np.ndarray, params: SamplingParams, prompt_ids: Sequence[int] = (),
            output_ids: Sequence[int] = ()) -> np.ndarray:
    """The whole chain up to the draw as a dense vector (-inf = dropped), for inspection and tests;
    greedy (temperature 0) stops after the penalties."""
    output = TokenCounts(output_ids)
    x = penalize(logits, params, TokenCounts([*prompt_ids, *output_ids]), output)
    return x if params.greedy else candidates(x, params).dense(x.shape[-1])


# ---- the draw ------------------------------------------------------------------------------------------


def _last_positive(weights: np.ndarray) -> int:
    return int(np.flatnonzero(weights)[-1])


def inverse_cdf(weights: np.ndarray, u: float) -> int:
    """The position where the running sum of weights first exceeds u × their total (u in [0, 1)): what
    searchsorted(cumsum(weights), u·total, side="right") finds, so a zero weight is never picked, but with
    a running sum over 256-wide block sums and then over one block instead of the whole vocab."""
    cum_blocks = np.cumsum(np.add.reduceat(weights, np.arange(0, len(weights), _BLOCK)))
    target = u * float(cum_blocks[-1])
    block = int(np.searchsorted(cum_blocks, target, side="right"))
    if block >= len(cum_blocks):  # u·total rounded up to the total: take the last token with mass
        return _last_positive(weights)
    start = block * _BLOCK
    chunk = weights[start : start + _BLOCK]
    cum = np.cumsum(chunk) + (float(cum_blocks[block - 1]) if block else 0.0)
    pos = int(np.searchsorted(cum, target, side="right"))
    return start + (pos if pos < len(chunk) else _last_positive(chunk))


def greedy_pick(x: np.ndarray) -> tuple[int, float]:
    """argmax (the first on ties) and its log-probability under softmax(x)."""
    token = int(np.argmax(x))
    return token, float(x[token]) - logsumexp(x)


def draw(cands: Candidates, u: float) -> tuple[int, float]:
    """Inverse-CDF draw over the candidates in id order, with its log-probability."""
    position = inverse_cdf(cands.weights, u)
    return cands.token(position), cands.logprob(position)


class Sampler:
    """Draws the tokens of one request with its own PCG64 stream (the same seed gives the same tokens) and
    remembers them, so the penalties see the prompt and everything sampled so far."""

    def __init__(self, params: SamplingParams, prompt_ids: Sequence[int] = ()) -> None:
        self.params = params
        self.rng = np.random.Generator(np.random.PCG64(params.seed))
        self._seen = TokenCounts(prompt_ids)
        self._output = TokenCounts()
        self._weights: np.ndarray | None = None

    def _weights_buffer(self, vocab: int) -> np.ndarray | None:
        """One (vocab,) float64 array reused for the weights at every step: once the allocator has handed a
        fresh 1 MB back to the OS, page-faulting it in again costs as much as the whole top_p pass."""
        if self.params.top_k:
            return None  # top_k's weights are a few dozen values
        if self._weights is None or len(self._weights) != vocab:
            self._weights = np.empty(vocab, dtype=np.float64)
        return self._weights

    def sample(self, logits: np.ndarray) -> tuple[int, float]:
        """(token id, its log-probability under the final distribution) for (vocab,) logits; the token
        joins this request's history."""
        if logits.ndim != 1:
            raise TernlmError(f"logits must have shape (vocab,), got {logits.shape}")
        if self._seen.max_id >= logits.shape[0]:
            raise TernlmError(f"token id {self._seen.max_id} is outside the vocab of {logits.shape[0]}")
        x = penalize(logits, self.params, self._seen, self._output)
        if self.params.greedy:
            token, logprob = greedy_pick(x)
        else:
            cands = candidates(x, self.params, self._weights_buffer(len(x)))
            token, logprob = draw(cands, self.rng.random())
        self._seen.add(token)
        self._output.add(token)
        return token, logprob


def top_logprobs(logits: np.ndarray, token: int, k: int) -> tuple[float, list[tuple[int, float]]]:
    """log p(token) and the k most likely (token, log p), most likely first (ties: lower id), under the
    model's raw distribution — log_softmax of the unprocessed logits, as vLLM reports by default."""
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= MAX_TOP_LOGPROBS:
        raise ParamError(f"top_logprobs must be an integer in 0..{MAX_TOP_LOGPROBS}, got {k!r}")
    if logits.ndim != 1 or not 0 <= token < logits.shape[0]:
        raise TernlmError(f"token {token} is not in logits of shape {logits.shape}")
    log_z = logsumexp(logits)
    best = top_k_ids(logits, k) if k else np.zeros(0, dtype=np.intp)
    best = best[np.argsort(-logits[best], kind="stable")][:k]
    return float(logits[token]) - log_z, [(int(i), float(logits[i]) - log_z) for i in best]
