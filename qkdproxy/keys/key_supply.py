"""Answers a key exchange's requests from an endpoint's key sources: the KME calls, in asyncio.

:mod:`qkdproxy.core.tls.keyexchange` only says which key it needs (:data:`KeyRequest`); this
module makes the call and hands the answer (or the failure) back. ETSI 004 CLOSE runs off
the handshake's path, bounded, in a task the key context keeps until it ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from typing import TypeVar

from qkdproxy.core.keys import KeySourceUnavailableError
from qkdproxy.core.tls.keyexchange import (
    CloseStream,
    FetchKey,
    KeyAnswer,
    KeyFailure,
    KeyRequest,
    KeySteps,
    OpenStream,
    StreamKey,
    TakeKey,
)
from qkdproxy.keys.context import KeyContext
from qkdproxy.keys.sources import StreamKeySource

T = TypeVar("T")
STREAM_CLOSE_TIMEOUT = 5.0


async def run(steps: KeySteps[T]) -> T:
    """Run one key-exchange step to its end, answering each request it makes."""
    answer: KeyAnswer = None
    while True:
        try:
            request = steps.steps.send(answer)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]
        # The driver always gives the key exchange a KeyContext (the core sees a protocol).
        assert isinstance(steps.context, KeyContext)
        answer = await supply(request, steps.context)


async def supply(request: KeyRequest, context: KeyContext) -> KeyAnswer:
    """The answer to one request: the key-source call's result, or its failure."""
    if isinstance(request, CloseStream):
        close_later(context, request.ksid)
        return None
    sources = context.sources
    # The calls are made here, not in a helper coroutine: one coroutine fewer per key.
    try:
        if isinstance(request, TakeKey) and sources.master is not None:
            return await sources.master.take_key()
        if isinstance(request, FetchKey) and sources.slave is not None:
            return await sources.slave.get_key(request.key_id)
        if isinstance(request, OpenStream) and sources.stream is not None:
            return await sources.stream.open(request.ksid)
        if isinstance(request, StreamKey) and sources.stream is not None:
            return await sources.stream.get_key(request.ksid, request.index)
        raise KeySourceUnavailableError(f"no key source for {type(request).__name__}")
    except Exception as exc:  # the key exchange turns it into the right alert
        return KeyFailure(exc)


def close_later(context: KeyContext, ksid: bytes) -> None:
    """ETSI 004 CLOSE in the background, bounded and best effort: the KME reclaims an
    abandoned stream when its TTL ends."""
    stream = context.sources.stream
    if stream is None:
        return
    loop = context.loop.get()
    task = loop.create_task(_close_quietly(stream, ksid))
    # Bounded by cancelling its task: asyncio.wait_for would look the loop up again and run
    # the call in a second task.
    deadline = loop.call_later(STREAM_CLOSE_TIMEOUT, task.cancel)
    context.background.add(task)
    task.add_done_callback(functools.partial(_closed, context.background, deadline))


async def _close_quietly(stream: StreamKeySource, ksid: bytes) -> None:
    with contextlib.suppress(Exception):
        await stream.close(ksid)


def _closed(
    background: set[asyncio.Task[None]], deadline: asyncio.TimerHandle, task: asyncio.Task[None]
) -> None:
    deadline.cancel()
    background.discard(task)
