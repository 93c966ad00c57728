"""The prefill/decode loop: yields typed events, handles stop tokens, stop strings and limits."""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ternlm.errors import ContextOverflowError, ParamError
from ternlm.sampling import Sampler, SamplingParams, top_logprobs
from ternlm.tokenizer import StreamDecoder, Tokenizer

if TYPE_CHECKING:
    from ternlm.grammar import Constraint

# step(new_ids, start_pos) runs the model over new_ids at positions start_pos.. (filling its KV cache)
# and returns the float32 logits (vocab,) of the last position.
StepFn = Callable[[list[int], int], np.ndarray]


@dataclass(frozen=True)
class GenerationEvent:
    """One generated token: the text it finalized (may be ""), and on the last event why generation ended
    ("stop": EOS/stop token/stop string, "length": max_tokens)."""

    text: str
    token: int | None
    logprob: float | None
    finish_reason: str | None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    top_logprobs: list[tuple[int, float]] | None = None  # the k most likely tokens, when logprobs were asked
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache


class StopStrings:
    """Finds stop strings across token boundaries by holding back text that could start one."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Text that is safe to show now, and whether a stop string was hit (the text then ends before it)."""
        self.held += text
        hits = [i for i in (self.held.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.held = self.held[: min(hits)], ""
            return out, True
        # Any future match must start inside the longest suffix that is a prefix of some stop string.
        keep = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.held)), keep, -1):
                if self.held.endswith(s[:k]):
                    keep = k
                    break
        cut = len(self.held) - keep
        out, self.held = self.held[:cut], self.held[cut:]
        return out, False

    def flush(self) -> str:
        out, self.held = self.held, ""
        return out


def check_request(prompt_ids: Sequence[int], max_tokens: int, n_ctx: int, stop: Sequence[str] | None,
                  has_tokenizer: bool) -> None:
    """Raise ParamError / ContextOverflowError for a request that cannot run, before anything runs."""
    if len(prompt_ids) == 0:
        raise ParamError("the prompt is empty; at least one token (e.g. BOS) is needed")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ParamError(f"max_tokens must be an integer >= 1, got {max_tokens!r}")
    if len(prompt_ids) + max_tokens > n_ctx:
        raise ContextOverflowError(
            f"prompt of {len(prompt_ids)} tokens + max_tokens {max_tokens} = "
            f"{len(prompt_ids) + max_tokens} exceeds the context of {n_ctx} tokens"
        )
    if stop is not None and (isinstance(stop, str) or not all(isinstance(s, str) for s in stop)):
        raise ParamError(f"stop must be a list of strings, got {stop!r}")
    if not has_tokenizer and stop:
        raise ParamError("stop strings need a tokenizer; this model has none")


def generate(
    step: StepFn,
    tokenizer: Tokenizer | None,
    prompt_ids: Sequence[int],
    *,
    max_tokens: int,
    n_ctx: int,
    sampling: SamplingParams,
    stop: Sequence[str] | None = None,
    stop_ids: Collection[int] | None = None,
    ignore_eos: bool = False,
) -> Iterator[GenerationEvent]:
    """Stream up to `max_tokens` tokens after `prompt_ids`, one GenerationEvent per token.

    Generation stops on a token in `stop_ids` (default: `tokenizer.eos_ids`; `ignore_eos` disables them)
    or on any of the `stop` strings, which are cut from the text. Without a tokenizer, events carry token ids
    and no text. Arguments are checked here, before anything runs; the model is only stepped as the
    iterator is consumed, and closing it stops generation.
    """
    check_request(prompt_ids, max_tokens, n_ctx, stop, tokenizer is not None)
    if stop_ids is None:
        stop_ids = tokenizer.eos_ids if tokenizer is not None else ()
    decoding = Decoding(tokenizer, list(prompt_ids), max_tokens, sampling, stop, () if ignore_eos else stop_ids)
    return _run(step, decoding)


def _run(step: StepFn, decoding: Decoding) -> Iterator[GenerationEvent]:
    logits = step(decoding.prompt_ids, 0)
    while True:
        event = decoding.feed(logits)
        yield event
        if event.finish_reason is not None:
            return
        logits = step([event.token], decoding.position)


class _NoText:
    """The decoder of a model without a tokenizer: events carry token ids and no text."""

    def push(self, token: int) -> str:
        return ""

    def flush(self) -> str:
        return ""


class Decoding:
    """One request's state after its prompt: turns each step's logits into a GenerationEvent.

    It samples (after an optional constraint's mask), detokenizes, and decides when to stop; it never runs
    the model, so the single-sequence loop above and the server's batched engine share it.
    """

    def __init__(self, tokenizer: Tokenizer | None, prompt_ids: list[int], max_tokens: int,
                 sampling: SamplingParams, stop: Sequence[str] | None = None, stop_ids: Collection[int] = (),
                 constraint: Constraint | None = None, logprobs: int | None = None) -> None:
        self.prompt_ids = prompt_ids
        self.max_tokens = max_tokens
        self.sampler = Sampler(sampling, prompt_ids)
        self.decoder = StreamDecoder(tokenizer, context=prompt_ids) if tokenizer is not None else _NoText()
        self.stops = StopStrings(stop or [])
        self.stop_ids = set(stop_ids)
        self.constraint = constraint
        self.logprobs = logprobs  # None: off; k: report the token's and the k most likely log-probabilities
        self.generated = 0
        self.cached_tokens = 0  # prompt tokens the caller took from a prefix cache, reported in every event

    @property
    def position(self) -> int:
        """Position of the last sampled token, the next one to run through the model."""
        return len(self.prompt_ids) + self.generated - 1

    def feed(self, logits: np.ndarray) -> GenerationEvent:
        """Sample the next token from the (vocab,) logits of the last position; the event's finish_reason
        is set when this token ends generation."""
        raw = logits
        if self.constraint is not None:
            logits = logits.copy()
            self.constraint.mask_logits(logits)
        token, logprob = self.sampler.sample(logits)
        self.generated += 1
        top = None
        if self.logprobs is not None:  # reported under the model's own distribution, as vLLM does
            logprob, top = top_logprobs(raw, token, self.logprobs)
        if self.constraint is not None:
            self.constraint.accept(token)
        if token in self.stop_ids:  # the stop token itself shows no text
            return self._event(self._finish_text("")[0], token, logprob, "stop", top)
        text, hit = self.stops.feed(self.decoder.push(token))
        if not hit and self.constraint is not None and self.constraint.done():  # complete JSON ends it
            text, hit = self._finish_text(text)[0], True
        if not hit and self.generated == self.max_tokens:
            text, hit = self._finish_text(text)
            return self._event(text, token, logprob, "stop" if hit else "length", top)
        return self._event(text, token, logprob, "stop" if hit else None, top)

    def _finish_text(self, text: str) -> tuple[str, bool]:
        """Flush the decoder and the held-back text at the end, still honouring stop strings."""
        tail, hit = self.stops.feed(self.decoder.flush())
        return text + tail + ("" if hit else self.stops.flush()), hit

    def _event(self, text: str, token: int, logprob: float, finish: str | None,
               top: list[tuple[int, float]] | None) -> GenerationEvent:
        return GenerationEvent(text, token, logprob, finish, prompt_tokens=len(self.prompt_ids),
                               completion_tokens=self.generated, top_logprobs=top,
                               cached_tokens=self.cached_tokens)
