"""Turn logits into the next token: penalties, filters, then a seeded draw.

The chain runs penalties → temperature → top_k → top_p → min_p → draw, the order transformers and vLLM
users expect. Every step is a pure function on a (vocab,) logits vector; filtered tokens become -inf.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ternlm.errors import ParamError, TernlmError


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. temperature 0 means greedy; top_k 0, top_p 1, min_p 0 and
    repetition_penalty 1 switch their step off."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
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
        bad_seed = isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0
        if self.seed is not None and bad_seed:
            raise ParamError(f"seed must be an integer >= 0 or None, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Float64 log-probabilities of (vocab,) logits; -inf entries stay -inf."""
    x = logits.astype(np.float64)
    m = np.max(x)
    if not np.isfinite(m):
        raise TernlmError("logits have no finite maximum (all -inf, or NaN/+inf present)")
    shifted = x - m
    return shifted - np.log(np.sum(np.exp(shifted)))


def apply_repetition_penalty(logits: np.ndarray, previous_ids: Sequence[int], penalty: float) -> np.ndarray:
    """Make seen tokens less likely (transformers' rule: positive logits / penalty, others × penalty)."""
    if penalty == 1.0 or len(previous_ids) == 0:
        return logits
    ids = np.unique(np.asarray(previous_ids, dtype=np.int64))
    out = logits.copy()
    seen = out[ids]
    out[ids] = np.where(seen > 0, seen / penalty, seen * penalty)
    return out


def apply_temperature(logits: np.ndarray, temperature: float) -> np.ndarray:
    """Sharpen (<1) or flatten (>1) the distribution; temperature must be > 0."""
    if temperature <= 0:
        raise TernlmError(f"temperature must be > 0 here (0 means greedy), got {temperature}")
    return logits if temperature == 1.0 else logits / np.asarray(temperature, dtype=logits.dtype)


def top_k_filter(logits: np.ndarray, k: int) -> np.ndarray:
    """Keep the k largest logits (ties with the k-th are kept, as in transformers); k <= 0 keeps all."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = np.partition(logits, -k)[-k]
    return np.where(logits >= kth, logits, -np.inf).astype(logits.dtype, copy=False)


def top_p_filter(logits: np.ndarray, p: float) -> np.ndarray:
    """Keep the smallest set of most likely tokens whose probability sums to >= p (at least one)."""
    if p >= 1.0:
        return logits
    order = np.argsort(-logits, kind="stable")
    cum = np.cumsum(np.exp(log_softmax(logits)[order]))
    # The tolerance stops float rounding (0.5 + 0.3 = 0.79999…) from pulling in one token too many.
    n_keep = min(int(np.count_nonzero(cum < p - 1e-9)) + 1, logits.shape[-1])
    out = np.full_like(logits, -np.inf)
    kept = order[:n_keep]
    out[kept] = logits[kept]
    return out


def min_p_filter(logits: np.ndarray, min_p: float) -> np.ndarray:
    """Drop tokens whose probability is below min_p × the top token's probability."""
    if min_p <= 0.0:
        return logits
    # p_i / p_max = exp(l_i - l_max), so the test needs no softmax.
    threshold = np.max(logits) + math.log(min_p)
    return np.where(logits >= threshold, logits, -np.inf).astype(logits.dtype, copy=False)


def process(logits: np.ndarray, previous_ids: Sequence[int], params: SamplingParams) -> np.ndarray:
    """The whole chain up to the draw; greedy (temperature 0) stops after the penalty."""
    x = apply_repetition_penalty(logits, previous_ids, params.repetition_penalty)
    if params.greedy:
        return x
    x = apply_temperature(x, params.temperature)
    x = top_k_filter(x, params.top_k)
    x = top_p_filter(x, params.top_p)
    return min_p_filter(x, params.min_p)


class Sampler:
    """Draws tokens for one request with its own PCG64 stream: the same seed gives the same tokens."""

    def __init__(self, params: SamplingParams, prompt_ids: Sequence[int] = ()) -> None:
        self.params = params
        self.rng = np.random.Generator(np.random.PCG64(params.seed))
        self.history = list(prompt_ids)  # the repetition penalty sees the prompt too, as in transformers

    def sample(self, logits: np.ndarray) -> tuple[int, float]:
        """(token id, its log-probability under the final distribution) for (vocab,) logits; records the token."""
        if logits.ndim != 1:
            raise TernlmError(f"logits must have shape (vocab,), got {logits.shape}")
        x = process(logits, self.history, self.params)
        logp = log_softmax(x)
        if self.params.greedy:
            token = int(np.argmax(x))
        else:
            # Inverse-CDF draw; side="right" can never land on a zero-probability token.
            cdf = np.cumsum(np.exp(logp))
            token = int(np.searchsorted(cdf, self.rng.random() * cdf[-1], side="right"))
            if token >= len(cdf):  # u·total rounded up to total: take the last token with mass
                token = int(np.searchsorted(cdf, cdf[-1], side="left"))
        self.history.append(token)
        return token, float(logp[token])
