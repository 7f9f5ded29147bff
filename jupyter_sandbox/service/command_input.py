"""A command's standard input, from the client's request to the agent.

``POST .../exec`` takes the command either as a JSON body (with its input, if any,
base64-encoded as ``input_b64``) or as ``agent.protocol.COMMAND_WITH_INPUT``: the same
JSON object on one line, then the input as raw bytes to the end of the body (at most
``MAX_INPUT``, announced by its Content-Length).

HTTP clients send the whole body before they read the answer, so the body is read
as fast as it comes and kept here until the command takes it, whatever the command
does meanwhile (a filter writing as much as it reads would otherwise wait on a client
that waits on it). Input the command never reads (it exited, closed its stdin, read
only a little) is read and dropped, so the answer always reaches the client.
"""

from __future__ import annotations

import asyncio
import contextlib

from aiohttp import ClientPayloadError, web

from .._errors import InvalidRequest
from ..agent.protocol import CHUNK, MAX_INPUT, Frame
from ..agent.remote import AgentStream

MAX_REQUEST_LINE = 1 << 20  # bytes of the JSON line, as for any other JSON body


async def read_request_line(request: web.Request) -> str:
    """The first line (the JSON request) of a ``COMMAND_WITH_INPUT`` body."""
    if request.content_length is None:
        raise InvalidRequest("a command with input needs a Content-Length")
    if request.content_length > MAX_REQUEST_LINE + MAX_INPUT:
        raise InvalidRequest(
            f"a command's input can be at most {MAX_INPUT >> 20} MiB; write a larger one "
            "to a file in the sandbox and redirect the command's input from it"
        )
    try:
        line = await request.content.readuntil(b"\n", max_size=MAX_REQUEST_LINE)
    except ValueError:
        raise InvalidRequest(
            f"the command's request line is longer than {MAX_REQUEST_LINE} bytes"
        ) from None
    if not line.endswith(b"\n"):
        raise InvalidRequest("the command's request line (JSON) must end with a newline")
    try:
        return line.decode()
    except UnicodeDecodeError:
        raise InvalidRequest("the command's request line is not UTF-8") from None


class CommandInput:
    """Input on its way to a running command: read from its source, sent to the agent."""

    def __init__(self, source: web.StreamReader | None, data: bytes = b"") -> None:
        self.source = source
        self.chunks: asyncio.Queue[bytes | None] = asyncio.Queue()  # None: the end
        if data:
            self.chunks.put_nowait(data)
        if source is None:
            self.chunks.put_nowait(None)
        self.taken = False  # the agent takes no more: whatever still comes is dropped

    async def _read(self, source: web.StreamReader) -> None:
        """The client's bytes, as fast as they come (dropped once not wanted)."""
        try:
            while chunk := await source.read(CHUNK):
                if not self.taken:
                    self.chunks.put_nowait(chunk)
        except (ConnectionError, ClientPayloadError):
            pass  # the client went away mid-body: the answer cannot reach it either
        finally:
            self.chunks.put_nowait(None)

    async def _send(self, agent: AgentStream) -> None:
        """Input to the agent, then EOF; stops when the agent takes no more."""
        try:
            while (chunk := await self.chunks.get()) is not None:
                await agent.send(Frame.STDIN, chunk)
            await agent.send(Frame.EOF)
        except ConnectionError:
            pass  # the command has ended and its agent connection with it: input unread
        finally:
            self.taken = True
            while not self.chunks.empty():
                self.chunks.get_nowait()

    @contextlib.asynccontextmanager
    async def feeding(self, agent: AgentStream):
        """Send the input while the body of the block runs; after it, read the client's
        body to its end, so a client still sending can then read the answer."""
        reader = None if self.source is None else asyncio.ensure_future(self._read(self.source))
        sender = asyncio.ensure_future(self._send(agent))
        try:
            yield
        finally:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sender
            if reader is not None:
                await reader
