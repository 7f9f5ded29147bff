"""Host side of the agent protocol: one asyncio connection per request.

Every path that talks to an agent (service, gateway, SFTP, forwarding) goes
through here, and everything an agent sends is checked by ``untrusted.messages``
before anyone sees it: frame sizes before their payload is read, frame kinds
against the operation, RESULT, EXIT and ERROR payloads against their shapes.
Answers have deadlines (``untrusted.streams``), so a silent agent cannot hold a
caller forever.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
from collections.abc import AsyncIterator, Awaitable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from .._errors import FileError, SandboxError, SandboxExpired
from ..untrusted import messages
from ..untrusted.messages import ProtocolViolation
from ..untrusted.streams import ANSWER_TIMEOUT, INACTIVITY, AgentTimeout
from . import protocol
from .protocol import Frame

PARSE_ON_LOOP = 64 << 10  # bytes of a RESULT parsed on the event loop; larger ones are not
# Larger results are parsed in this one thread, one at a time: however many hostile
# agents answer at once, one parse uses the memory and the loop keeps serving.
_large_results = ThreadPoolExecutor(1, thread_name_prefix="agent-results")


async def parse_result(op: str, payload: bytes) -> dict[str, Any]:
    """``messages.parse_result``, off the event loop for payloads over PARSE_ON_LOOP."""
    if len(payload) <= PARSE_ON_LOOP:
        return messages.parse_result(op, payload)
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(_large_results, messages.parse_result, op, payload)


T = TypeVar("T")


async def _within(awaitable: Awaitable[T], seconds: float | None, what: str) -> T:
    if seconds is None:
        return await awaitable
    try:
        return await asyncio.wait_for(awaitable, seconds)
    except asyncio.TimeoutError:
        raise AgentTimeout(f"the sandbox's agent did not {what} within {seconds:g} s") from None


class AgentStream:
    """An open request to the agent: checked frames in, frames out.

    Frames go out through a second descriptor of the socket: when the agent stops
    reading and closes (it refused a request and said why), a failed send must not
    tear down the reading side before the agent's answer has been read.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, op: str) -> None:
        self.reader, self.writer, self.op = reader, writer, op
        self._out = socket.socket(fileno=os.dup(writer.get_extra_info("socket").fileno()))

    async def recv(self, timeout: float | None = None) -> tuple[int, bytes] | None:
        """The next frame, or None when the agent closed the connection.

        A frame the operation does not allow, or larger than its kind may be, raises
        ProtocolViolation (before its payload is read); EXIT payloads come back in
        canonical form. `timeout` bounds the wait for the whole frame.
        """
        try:
            header = await _within(self.reader.readexactly(protocol.HEADER.size), timeout, "answer")
            kind, size = protocol.HEADER.unpack(header)
            frame = messages.check_header(self.op, kind, size)
            payload = (
                await _within(self.reader.readexactly(size), timeout, "answer") if size else b""
            )
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
        if frame == Frame.EXIT:
            payload = json.dumps(messages.parse_exit(payload)).encode()
        return frame, payload

    async def send(self, kind: int, payload: bytes = b"", timeout: float | None = None) -> None:
        """Send a frame; with `timeout`, AgentTimeout if the agent takes none of it that long."""
        loop = asyncio.get_running_loop()
        await _within(loop.sock_sendall(self._out, protocol.encode(kind, payload)), timeout, "read")

    async def send_json(self, kind: int, obj: object) -> None:
        await self.send(kind, json.dumps(obj).encode())

    async def result(self, timeout: float | None = ANSWER_TIMEOUT) -> dict[str, Any]:
        """Wait for the RESULT frame, checked for this operation; raise the agent's error."""
        frame = await self.recv(timeout)
        if frame is None:
            raise SandboxExpired("the sandbox went away during the request")
        kind, payload = frame
        if kind == Frame.RESULT:
            return await parse_result(self.op, payload)
        if kind == Frame.ERROR:
            raise messages.agent_error(payload)
        raise ProtocolViolation(f"the sandbox's agent answered {self.op} with a {kind.name} frame")

    async def data(
        self, limit: int | None = None, inactivity: float | None = INACTIVITY
    ) -> AsyncIterator[bytes]:
        """Payloads of DATA frames until END, at most `limit` bytes in all."""
        received = 0
        while True:
            frame = await self.recv(inactivity)
            if frame is None:
                raise SandboxExpired("the sandbox went away during a transfer")
            kind, payload = frame
            if kind == Frame.END:
                return
            if kind == Frame.ERROR:
                raise messages.agent_error(payload)
            if kind != Frame.DATA:
                raise ProtocolViolation(
                    f"the sandbox's agent sent a {kind.name} frame mid-transfer"
                )
            received += len(payload)
            if limit is not None and received > limit:
                raise FileError(f"the sandbox sent more than the {limit} bytes it announced")
            yield payload

    async def close(self) -> None:
        self._out.close()
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (ConnectionError, OSError):
            pass

    async def __aenter__(self) -> AgentStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class _ResetEndsReader(asyncio.StreamReader):
    """A reader that still yields what arrived before a connection reset, then ends.

    An agent that refuses a request closes its end with our unread frames still
    queued there; the kernel then resets the connection. Its answer, sent just
    before, is already in our buffer and must be read, not dropped with the reset.
    """

    def set_exception(self, exc: BaseException) -> None:
        if isinstance(exc, ConnectionError):
            self.feed_eof()
        else:
            super().set_exception(exc)


async def _open_unix_connection(path: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    loop = asyncio.get_running_loop()
    reader = _ResetEndsReader(limit=protocol.MAX_FRAME * 2, loop=loop)
    stream_protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
    transport, _ = await loop.create_unix_connection(lambda: stream_protocol, path)
    return reader, asyncio.StreamWriter(transport, stream_protocol, reader, loop)


class AgentClient:
    """Talks to the agent of one sandbox through its Unix socket."""

    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path

    async def open(self, op: str, **args: Any) -> AgentStream:
        """Connect and send the request for `op`; the agent's answer comes as frames."""
        if op not in messages.OPS:
            raise SandboxError(f"no such agent operation: {op}")
        try:
            reader, writer = await _within(
                _open_unix_connection(self.socket_path), ANSWER_TIMEOUT, "accept the connection"
            )
        except (FileNotFoundError, ConnectionRefusedError) as e:
            raise SandboxExpired(f"the sandbox is not running ({e.strerror})") from None
        stream = AgentStream(reader, writer, op)
        try:
            await _within(
                asyncio.get_running_loop().sock_sendall(
                    stream._out, protocol.request_line(op, **args)
                ),
                ANSWER_TIMEOUT,
                "read the request",
            )
        except BaseException:
            await stream.close()
            raise
        return stream

    async def call(
        self, op: str, *, answer_timeout: float | None = ANSWER_TIMEOUT, **args: Any
    ) -> dict[str, Any]:
        """A request with one RESULT answer, checked; AgentTimeout after `answer_timeout`."""
        async with await self.open(op, **args) as stream:
            return await stream.result(answer_timeout)
