"""Running one body's engine streams together: admission before the response starts, then one merged stream.

`open_streams` waits for every choice's first output, so a refusal (unknown model, bad prompt, full queue)
becomes an HTTP status before a 200 and its SSE headers are sent. `Choices` then yields (choice, output)
as they come. Closing it (routes.py does when the response ends, however it ends: a client disconnect
included) closes every engine stream, which aborts unfinished requests and frees their KV blocks at the
next engine step.
"""
from __future__ import annotations

import asyncio
from typing import AsyncIterator

from starlette.requests import Request

from server.engine.request import RequestOutput


class ClientGone(Exception):
    """The HTTP client disconnected before the response was ready."""


async def until_disconnect(request: Request, awaitable):
    """Await `awaitable` unless the client disconnects first (then cancel it and raise ClientGone)."""
    work = asyncio.ensure_future(awaitable)

    async def watch():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not watcher.done():
            watcher.cancel()
    if work.done():
        return work.result()
    work.cancel()
    await asyncio.gather(work, return_exceptions=True)
    raise ClientGone()


async def open_streams(streams: list[AsyncIterator[RequestOutput]]) -> list[RequestOutput]:
    """The first output of every stream. If any is refused, close them all and raise its error."""
    tasks = [asyncio.ensure_future(anext(s)) for s in streams]
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(s.aclose() for s in streams), return_exceptions=True)
        raise
    return [t.result() for t in tasks]


class Choices:
    """(choice index, output) from all streams, starting with their first outputs, until all have finished.
    `aclose()` closes every engine stream whether or not iteration ever started."""

    def __init__(self, streams: list[AsyncIterator[RequestOutput]], firsts: list[RequestOutput]):
        self.streams, self.firsts = streams, firsts
        self._gen = self._iter()

    def __aiter__(self):
        return self._gen

    async def aclose(self) -> None:
        await self._gen.aclose()
        await asyncio.gather(*(s.aclose() for s in self.streams), return_exceptions=True)

    async def _iter(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        streams, firsts = self.streams, self.firsts
        for i, out in enumerate(firsts):
            yield i, out
        live = [i for i, out in enumerate(firsts) if not out.finished]
        if len(live) == 1:  # one choice (the common case): no tasks in between
            i = live[0]
            async for out in streams[i]:
                yield i, out
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int):
            try:
                async for out in streams[i]:
                    queue.put_nowait((i, out, None))
                queue.put_nowait((i, None, None))  # this stream is over
            except Exception as exc:
                queue.put_nowait((i, None, exc))

        tasks = [asyncio.ensure_future(pump(i)) for i in live]
        try:
            remaining = len(live)
            while remaining:
                i, out, exc = await queue.get()
                if exc is not None:
                    raise exc
                if out is None:
                    remaining -= 1
                else:
                    yield i, out
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
