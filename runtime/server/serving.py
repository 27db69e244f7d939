"""One OpenAI request fanned out into engine requests, and their outputs merged back.

What it is: `Generation` runs one task per choice (prompt p, sample i -> engine request
`{rid}-{p*n+i}`), each turning `RequestOutput`s into `ChoiceDelta`s (output.py) and
observing latency metrics, and `stream()` merges them in arrival order. Leaving `stream()`
early (client gone, error, cancellation) cancels the tasks, and each task's engine request
is aborted by EngineClient.generate's cleanup. What it is not: validation or the wire
format (openai_api.py, anthropic_api.py, responses_api.py, responses.py).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from tscompile.runtime.protocol import AddRequest
from tscompile.runtime.server.engine_client import EngineClient
from tscompile.runtime.server.metrics import Metrics
from tscompile.runtime.server.output import ChoiceDelta, ChoiceProcessor, ChoiceUsage
from tscompile.runtime.server.parsers.base import OutputParser

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ChoiceSpec:
    index: int                  # the OpenAI choice index
    prompt_index: int           # which prompt of a batch (completions); 0 for chat
    request: AddRequest
    stops: tuple[str, ...] = ()
    # Makes the choice's output parser from its prompt ids (None: all tokens are content).
    parser: Callable[[Sequence[int]], OutputParser] | None = None


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int

    def as_dict(self) -> dict[str, Any]:
        return {"prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": self.cached_tokens}}


class Generation:
    def __init__(self, client: EngineClient, tokenizer: Any, metrics: Metrics,
                 specs: Sequence[ChoiceSpec]):
        self.client = client
        self.tokenizer = tokenizer
        self.metrics = metrics
        self.specs = tuple(specs)
        self._usage: dict[int, ChoiceUsage] = {}

    def usage(self) -> Usage:
        """A prompt is counted once however many samples it had (as OpenAI does)."""
        prompt: dict[int, tuple[int, int]] = {}
        completion = 0
        for spec in self.specs:
            u = self._usage.get(spec.index) or ChoiceUsage(len(spec.request.prompt_ids), 0, 0)
            p, c = prompt.get(spec.prompt_index, (0, 0))
            prompt[spec.prompt_index] = (max(p, u.prompt_tokens), max(c, u.cached_tokens))
            completion += u.completion_tokens
        return Usage(sum(p for p, _ in prompt.values()), completion,
                     sum(c for _, c in prompt.values()))

    async def stream(self) -> AsyncIterator[ChoiceDelta]:
        """Deltas of all choices as they come; each choice ends with one whose
        finish_reason is set. Use with contextlib.aclosing."""
        queue: asyncio.Queue[ChoiceDelta] = asyncio.Queue()
        tasks = [asyncio.create_task(self._run(spec, queue), name=spec.request.rid)
                 for spec in self.specs]
        try:
            left = len(tasks)
            while left:
                delta = await queue.get()
                if delta.finish_reason is not None:
                    left -= 1
                yield delta
        finally:
            for t in tasks:
                t.cancel()

    async def _run(self, spec: ChoiceSpec, queue: asyncio.Queue[ChoiceDelta]) -> None:
        req = spec.request
        proc = ChoiceProcessor(spec.index, self.tokenizer, req.prompt_ids, spec.stops,
                               want_logprobs=req.params.logprobs,
                               parser=spec.parser(req.prompt_ids) if spec.parser else None)
        m = self.metrics
        last: float | None = None
        try:
            async with contextlib.aclosing(self.client.generate(req)) as outputs:
                async for out in outputs:
                    now = time.monotonic()
                    if out.token_ids:
                        if last is None:
                            m.time_to_first_token.observe(now - req.arrival)
                        else:
                            m.inter_token_latency.observe(now - last)
                        last = now
                    delta = proc.process(out)
                    if proc.stopped_by_string:
                        self.client.abort(req.rid, reason="stop")
                    if delta.finish_reason is not None:
                        self._usage[spec.index] = proc.usage()
                        m.e2e_request_latency.observe(now - req.arrival)
                        m.request_success.labels(delta.finish_reason).inc()
                    queue.put_nowait(delta)
                    if delta.finish_reason is not None:
                        return
            raise RuntimeError(f"engine stream of {req.rid} ended without a finish_reason")
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a bug here must not hang the other choices
            log.exception("choice %s of %s failed", spec.index, req.rid)
            self._usage[spec.index] = proc.usage()
            queue.put_nowait(ChoiceDelta(spec.index, finish_reason="error",
                                         error=f"internal error: {type(e).__name__}: {e}"))
