"""EngineClient on plain queues, with the test playing the engine by hand."""
from __future__ import annotations

import asyncio
import contextlib
import queue

import pytest

from tscompile.runtime.protocol import (Abort, AddRequest, EngineReady, RequestOutput,
                                        SamplingParams, StepOutputs)
from tscompile.runtime.server.engine_client import EngineClient


class Handle:
    alive = True

    def is_alive(self) -> bool:
        return self.alive


def make(ready: bool = True):
    reqs, outs, handle = queue.Queue(), queue.Queue(), Handle()
    if ready:
        outs.put(EngineReady("m", 64, 100))
    return EngineClient(reqs, outs, engine=handle, poll_s=0.01), reqs, outs, handle


def add(rid: str) -> AddRequest:
    return AddRequest(rid, (1, 2, 3), SamplingParams())


def drain(q: queue.Queue) -> list:
    out = []
    while not q.empty():
        out.append(q.get_nowait())
    return out


def test_routes_outputs_per_request():
    client, reqs, outs, _ = make()
    assert client.wait_ready(1).max_model_len == 64

    async def main():
        await client.start()
        outs.put(StepOutputs((RequestOutput("a", (5,)), RequestOutput("b", (7,)))))
        outs.put(StepOutputs((RequestOutput("b", (8,), finish_reason="length"),
                              RequestOutput("a", (6,), finish_reason="stop"))))

        async def collect(rid):
            return [o.token_ids for o in [o async for o in client.generate(add(rid))]]
        return await asyncio.gather(collect("a"), collect("b"))

    assert asyncio.run(main()) == [[(5,), (6,)], [(7,), (8,)]]
    assert [m.rid for m in drain(reqs)] == ["a", "b"]       # AddRequests only, no Abort
    client.close()


def test_leaving_early_aborts_once_and_drops_late_outputs():
    client, reqs, outs, _ = make()

    async def main():
        await client.start()
        outs.put(StepOutputs((RequestOutput("a", (5,)),)))
        async with contextlib.aclosing(client.generate(add("a"))) as gen:
            async for _ in gen:
                break
        gen = client.generate(add("s"))
        first = asyncio.ensure_future(gen.__anext__())
        await asyncio.sleep(0)                              # registered, waiting
        outs.put(StepOutputs((RequestOutput("s", (1,)),)))
        got = [await asyncio.wait_for(first, 2)]
        client.abort("s", reason="stop")
        client.abort("s", reason="stop")                   # idempotent
        async for o in gen:
            got.append(o)
        assert [o.finish_reason for o in got] == [None, "stop"]
        outs.put(StepOutputs((RequestOutput("a", (9,), finish_reason="abort"),)))
        await asyncio.sleep(0.05)
        return client.num_pending

    assert asyncio.run(main()) == 0
    msgs = drain(reqs)
    assert [m for m in msgs if isinstance(m, Abort)] == [Abort("a", "abort"), Abort("s", "stop")]
    client.close()


def test_engine_death_fails_pending_and_new_requests():
    client, reqs, outs, handle = make()

    async def main():
        await client.start()
        await asyncio.sleep(0.03)
        assert client.healthy
        gen = client.generate(add("a"))
        first = asyncio.ensure_future(gen.__anext__())
        await asyncio.sleep(0.03)
        handle.alive = False
        out = await asyncio.wait_for(first, 2)
        late = [o async for o in client.generate(add("b"))]
        return out, late

    out, late = asyncio.run(main())
    assert (out.finish_reason, out.error) == ("error", "engine process exited")
    assert [o.finish_reason for o in late] == ["error"]
    assert not client.healthy and client.num_pending == 0
    client.close()


def test_wait_ready_timeout_and_death():
    client, _, _, handle = make(ready=False)
    with pytest.raises(TimeoutError):
        client.wait_ready(timeout=0.05)
    handle.alive = False
    with pytest.raises(RuntimeError, match="died before it was ready"):
        client.wait_ready(timeout=1)
