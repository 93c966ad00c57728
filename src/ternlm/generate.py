"""The prefill/decode loop: yields typed events, handles stop tokens, stop strings and limits."""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from ternlm.errors import ContextOverflowError, ParamError
from ternlm.sampling import Sampler, SamplingParams
from ternlm.tokenizer import StreamDecoder, Tokenizer

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
    if tokenizer is None and stop:
        raise ParamError("stop strings need a tokenizer; this model has none")
    if stop_ids is None:
        stop_ids = tokenizer.eos_ids if tokenizer is not None else ()
    stop_set = set() if ignore_eos else set(stop_ids)
    return _run(step, tokenizer, list(prompt_ids), max_tokens, sampling, StopStrings(stop or []), stop_set)


class _NoText:
    """The decoder of a model without a tokenizer: events carry token ids and no text."""

    def push(self, token: int) -> str:
        return ""

    def flush(self) -> str:
        return ""


def _run(
    step: StepFn,
    tokenizer: Tokenizer | None,
    prompt_ids: list[int],
    max_tokens: int,
    sampling: SamplingParams,
    stops: StopStrings,
    stop_ids: set[int],
) -> Iterator[GenerationEvent]:
    n_prompt = len(prompt_ids)
    sampler = Sampler(sampling, prompt_ids)
    decoder = StreamDecoder(tokenizer, context=prompt_ids) if tokenizer is not None else _NoText()

    def event(text: str, token: int, logprob: float, finish: str | None, n: int) -> GenerationEvent:
        return GenerationEvent(text, token, logprob, finish, prompt_tokens=n_prompt, completion_tokens=n)

    def finish_text(text: str) -> tuple[str, bool]:
        """Flush the decoder and the held-back text at the end, still honouring stop strings."""
        tail, hit = stops.feed(decoder.flush())
        return text + tail + ("" if hit else stops.flush()), hit

    logits = step(prompt_ids, 0)
    for n in range(1, max_tokens + 1):
        token, logprob = sampler.sample(logits)
        if token in stop_ids:  # the stop token itself shows no text
            text, _ = finish_text("")
            yield event(text, token, logprob, "stop", n)
            return
        text, hit = stops.feed(decoder.push(token))
        if not hit and n == max_tokens:
            text, hit = finish_text(text)
            yield event(text, token, logprob, "stop" if hit else "length", n)
            return
        yield event(text, token, logprob, "stop" if hit else None, n)
        if hit:
            return
        logits = step([token], n_prompt + n - 1)
