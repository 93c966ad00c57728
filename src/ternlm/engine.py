"""The serving engine: one thread owns the model and runs every request through slots, decoding them together.

Each loop iteration admits waiting requests into free slots, runs one prefill chunk of one prompt, then one
decode step of every slot that is generating, as a single batched forward pass: decode reads every weight
once per step whatever the batch, so b sequences cost little more than one. Prompts are prefilled a chunk
at a time so that a long prompt delays running streams by one chunk, not by its whole length.

A slot keeps its KV cache after its request ends. A new request goes to the free slot whose cached tokens
share the longest prefix with its prompt and skips recomputing that prefix (same system prompt, the history
of a multi-turn chat); the tokens skipped are reported as cached_tokens.
"""

from __future__ import annotations

import asyncio
import collections
import queue
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from ternlm.api import Model
from ternlm.errors import EngineError, OverloadedError, TernlmError
from ternlm.generate import Decoding, GenerationEvent, check_request
from ternlm.kvcache import KVCache
from ternlm.metrics import Metrics
from ternlm.sampling import SamplingParams

_DONE = object()  # ends a Stream


class Stream:
    """The events of one request, handed from the engine thread to a consumer (async or blocking).

    Items are GenerationEvents, then either _DONE or an exception raised by the engine for this request.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop | None) -> None:
        self._loop = loop
        self._async: asyncio.Queue | None = asyncio.Queue() if loop is not None else None
        self._sync: queue.SimpleQueue | None = queue.SimpleQueue() if loop is None else None
        self.cancelled = threading.Event()

    def put(self, item: object) -> None:
        """Called by the engine thread."""
        if self._async is not None:
            try:
                self._loop.call_soon_threadsafe(self._async.put_nowait, item)
            except RuntimeError:  # the event loop has closed (server shutdown): nobody is listening
                self.cancel()
        else:
            self._sync.put(item)

    def cancel(self) -> None:
        """Stop generating (e.g. the client went away); the engine frees the slot at its next step."""
        self.cancelled.set()

    async def get(self, timeout: float | None = None) -> GenerationEvent | None:
        """The next event, None when the stream ended; asyncio.TimeoutError after `timeout` seconds."""
        item = await asyncio.wait_for(self._async.get(), timeout)
        return self._unwrap(item)

    async def __aiter__(self) -> AsyncIterator[GenerationEvent]:
        while (event := await self.get()) is not None:
            yield event

    def __iter__(self) -> Iterator[GenerationEvent]:
        while (event := self._unwrap(self._sync.get())) is not None:
            yield event

    @staticmethod
    def _unwrap(item: object) -> GenerationEvent | None:
        if item is _DONE:
            return None
        if isinstance(item, BaseException):
            raise item
        return item


@dataclass
class Request:
    """A prompt and how to continue it; `decoding` carries the sampling, stop and constraint state."""

    prompt_ids: list[int]
    decoding: Decoding
    stream: Stream
    submitted: float = field(default_factory=time.perf_counter)
    last_token_at: float = 0.0


@dataclass
class Slot:
    """A KV cache and the request (if any) running in it; `tokens` are the ids whose KV the cache holds."""

    cache: KVCache
    tokens: list[int] = field(default_factory=list)
    request: Request | None = None
    pending: list[int] = field(default_factory=list)  # prompt ids still to prefill
    next_token: int = 0  # the last sampled token, fed at the next decode step
    last_used: float = 0.0


class Engine:
    """Owns a Model and serves many requests at once from one background thread."""

    def __init__(self, model: Model, slots: int = 8, queue_size: int = 64, prefill_chunk: int = 256,
                 metrics: Metrics | None = None) -> None:
        if slots < 1 or queue_size < 0 or prefill_chunk < 1:
            raise TernlmError(f"slots ({slots}) and prefill_chunk ({prefill_chunk}) must be >= 1, "
                              f"queue_size ({queue_size}) >= 0")
        self.model = model
        self.slots = [Slot(KVCache(model.config, model.n_ctx)) for _ in range(slots)]
        self.queue_size = queue_size
        self.prefill_chunk = prefill_chunk
        self.metrics = metrics or Metrics()
        self.metrics.slots.set(slots)
        self._waiting: collections.deque[Request] = collections.deque()
        self._wake = threading.Condition()
        self._running = False
        self._thread: threading.Thread | None = None
        self.error: str | None = None  # why the engine thread died, if it did
        self._rate: collections.deque[tuple[float, int]] = collections.deque(maxlen=32)  # (time, tokens) per step

    # -- called from any thread ------------------------------------------------------------------------------

    def submit(self, prompt_ids: Sequence[int], max_tokens: int, sampling: SamplingParams, *,
               stop: Sequence[str] | None = None, ignore_eos: bool = False, logprobs: int | None = None,
               constraint: object | None = None, loop: asyncio.AbstractEventLoop | None = None) -> Stream:
        """Queue a request and return its Stream. Bad requests raise here (ParamError, ContextOverflowError),
        as does a full queue (OverloadedError). Pass the running event loop to consume the stream with await."""
        model = self.model
        ids = [int(i) for i in model.check_ids(prompt_ids)]
        check_request(ids, max_tokens, model.n_ctx, stop, model.tokenizer is not None)
        stop_ids = () if ignore_eos else model.stop_ids
        decoding = Decoding(model.tokenizer, ids, max_tokens, sampling, stop, stop_ids, constraint, logprobs)
        request = Request(ids, decoding, Stream(loop))
        with self._wake:
            if not self._running:
                raise OverloadedError("the engine is not running")
            if len(self._waiting) >= self.queue_size + self._free_slots():
                raise OverloadedError(f"{len(self._waiting)} requests are waiting; try again shortly")
            self._waiting.append(request)
            self.metrics.queue_depth.set(len(self._waiting))
            self._wake.notify()
        return request.stream

    def start(self) -> None:
        with self._wake:
            self._running = True
        self._thread = threading.Thread(target=self._loop, name="ternlm-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Finish: running and waiting requests end with an error."""
        with self._wake:
            self._running = False
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()

    def stats(self) -> dict:
        active = [s for s in self.slots if s.request is not None]
        return {"slots": len(self.slots), "active_slots": len(active), "queue_depth": len(self._waiting),
                "kv_used": sum(len(s.tokens) for s in active) / (len(self.slots) * self.model.n_ctx)}

    # -- the engine thread -----------------------------------------------------------------------------------

    def _free_slots(self) -> int:
        return sum(s.request is None for s in self.slots)

    def _loop(self) -> None:
        try:
            while True:
                with self._wake:
                    while self._running and not self._waiting and all(s.request is None for s in self.slots):
                        self._wake.wait()
                    if not self._running:
                        break
                    self._admit()
                self._drop_cancelled()
                self._step()
                self._update_gauges()
        except BaseException as e:  # a bug: fail every request loudly rather than hang its client
            with self._wake:
                self._running = False
            self.error = f"{type(e).__name__}: {e}"
            self._fail_all(EngineError(f"engine stopped: {self.error}"))
            raise
        self._fail_all(TernlmError("the server is shutting down"))

    def _admit(self) -> None:
        while self._waiting and (free := [s for s in self.slots if s.request is None]):
            request = self._waiting.popleft()
            if request.stream.cancelled.is_set():
                request.stream.put(_DONE)
                continue
            slot = max(free, key=lambda s: (_common_prefix(s.tokens, request.prompt_ids), -s.last_used))
            # At least the last prompt token is recomputed: its logits pick the first new token.
            reuse = min(_common_prefix(slot.tokens, request.prompt_ids), len(request.prompt_ids) - 1)
            slot.request, slot.tokens = request, request.prompt_ids[:reuse]
            slot.pending = request.prompt_ids[reuse:]
            request.decoding.cached_tokens = reuse
            m = self.metrics
            m.prefix_lookups.inc()
            if reuse:
                m.prefix_hits.inc()
                m.cached_tokens.inc(reuse)
            m.prompt_tokens.inc(len(request.prompt_ids))
        self.metrics.queue_depth.set(len(self._waiting))

    def _drop_cancelled(self) -> None:
        for slot in self.slots:
            if slot.request is not None and slot.request.stream.cancelled.is_set():
                self._release(slot)

    def _step(self) -> None:
        """One forward pass: a token for every slot past its prompt, plus one chunk of the longest-waiting
        prompt still to prefill, so a new prompt shares its pass over the weights with the decodes."""
        active = [s for s in self.slots if s.request is not None]
        batch = [s for s in active if not s.pending]
        chunks = [[s.next_token] for s in batch]
        filling = [s for s in active if s.pending]
        if filling:
            slot = min(filling, key=lambda s: s.request.submitted)
            chunk, slot.pending = slot.pending[:self.prefill_chunk], slot.pending[self.prefill_chunk:]
            batch.append(slot)
            chunks.append(chunk)
        if not batch:
            return
        logits = self._run(lambda: self.model.transformer.forward_batch(
            [np.asarray(c, dtype=np.int64) for c in chunks], [s.cache for s in batch],
            [len(s.tokens) for s in batch]), batch)
        if logits is None:
            return
        generated = 0
        for slot, chunk, row in zip(batch, chunks, logits, strict=True):
            slot.tokens += chunk
            if not slot.pending:
                self._emit(slot, row)
                generated += 1
        now = time.perf_counter()
        self._rate.append((now, generated))
        if len(self._rate) > 1:
            span = now - self._rate[0][0]
            self.metrics.tokens_per_second.set(sum(n for _, n in list(self._rate)[1:]) / span if span else 0.0)

    def _run(self, forward, slots: list[Slot]) -> np.ndarray | None:
        """Run a forward pass; a failure ends the requests it was for, not the engine."""
        try:
            return forward()
        except TernlmError as e:
            for slot in slots:
                slot.request.stream.put(e)
                self._release(slot, keep_cache=False)
            return None

    def _emit(self, slot: Slot, logits: np.ndarray) -> None:
        request = slot.request
        try:
            event = request.decoding.feed(logits)
        except TernlmError as e:
            request.stream.put(e)
            self._release(slot)
            return
        now = time.perf_counter()
        if request.last_token_at:
            self.metrics.itl.observe(now - request.last_token_at)
        else:
            self.metrics.ttft.observe(now - request.submitted)
        request.last_token_at = now
        self.metrics.generated_tokens.inc()
        request.stream.put(event)
        slot.next_token = event.token
        if event.finish_reason is not None:
            self._release(slot)

    def _release(self, slot: Slot, keep_cache: bool = True) -> None:
        slot.request.stream.put(_DONE)
        slot.request, slot.pending = None, []
        slot.last_used = time.perf_counter()
        if not keep_cache:
            slot.tokens = []

    def _fail_all(self, error: TernlmError) -> None:
        with self._wake:
            waiting, self._waiting = list(self._waiting), collections.deque()
        for request in waiting:
            request.stream.put(error)
        for slot in self.slots:
            if slot.request is not None:
                slot.request.stream.put(error)
                slot.request = None

    def _update_gauges(self) -> None:
        stats = self.stats()
        self.metrics.active_slots.set(stats["active_slots"])
        self.metrics.kv_used.set(stats["kv_used"])


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(diff[0]) if len(diff) else n
