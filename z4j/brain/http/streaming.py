"""A response body sent as it is made: for exports larger than memory should hold.

A route returns `Streamed` in place of a JSON value; `Api` hands it to
`send_streamed`, which sends each chunk with ``more_body`` as soon as it is
made. Hypercorn's ``send`` waits for the socket, so a slow reader slows the
producer instead of piling chunks up: memory is one chunk at a time.

The first chunk is made before the status goes out, so a refusal found
then (bad input, the store down) is still a proper 4xx/5xx. A failure after
that can only cut the body short: the response then ends without its last
chunk (HTTP/1.1 chunked encoding lets the client see it was cut), never
with a body that looks whole. A client that goes away cancels the
producer at once (its ``http.disconnect``), wherever it is waiting.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, Awaitable, Callable

import attrs
import trio

from ._request import Receive, Send

__all__ = ["Spawn", "StreamCut", "Streamed", "send_streamed"]

log = logging.getLogger("z4j.api")


class StreamCut(Exception):
    """The body failed after its status went out; the server drops the connection."""


# Starts a task beside the response (in its nursery): a producer's read-ahead.
Spawn = Callable[[Callable[[], Awaitable[None]]], None]


@attrs.frozen
class Streamed:
    """A body made by ``chunks(spawn)`` (an async generator of bytes), of
    ``content_type``; ``spawn`` starts a task that ends with the response."""

    content_type: bytes
    chunks: Callable[[Spawn], AsyncGenerator[bytes, None]]
    headers: tuple[tuple[bytes, bytes], ...] = ()


async def send_streamed(
    status: int,
    body: Streamed,
    headers: list[tuple[bytes, bytes]],
    receive: Receive,
    send: Send,
) -> None:
    """Send ``body``; exceptions before the first chunk propagate (nothing was sent)."""
    refused: Exception | None = None
    gone = False
    async with trio.open_nursery() as nursery:
        chunks = body.chunks(nursery.start_soon)
        try:
            first = await anext(chunks, b"")
        except Exception as exc:
            refused = exc  # raised below, outside the nursery (not in a group)
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                await chunks.aclose()
            nursery.cancel_scope.cancel()
        else:

            async def watch() -> None:
                nonlocal gone
                # The request was read already: the next message is the client going away.
                while (await receive())["type"] != "http.disconnect":
                    pass
                gone = True
                log.info("export cancelled: the client went away")
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch)
            try:
                start = [*headers, *body.headers, (b"content-type", body.content_type)]
                await send({"type": "http.response.start", "status": status, "headers": start})
                chunk = first
                while True:
                    if chunk:
                        await send({"type": "http.response.body", "body": chunk, "more_body": True})
                    try:
                        chunk = await anext(chunks)
                    except StopAsyncIteration:
                        break
            except Exception as exc:
                log.warning("a streamed response was cut short: %r", exc)
                raise StreamCut(str(exc)) from exc
            finally:
                with trio.CancelScope(shield=True), trio.move_on_after(5):
                    await chunks.aclose()
                nursery.cancel_scope.cancel()
    if refused is not None:
        raise refused
    # Outside the watch: ending the response may itself report the client
    # gone (the server closes the connection), which must not cancel it.
    if not gone:
        await send({"type": "http.response.body", "body": b"", "more_body": False})
