"""Host side of the agent protocol: one asyncio connection per request."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from .._errors import SandboxError, SandboxExpired, error_from
from . import protocol
from .protocol import Frame


def raise_agent_error(payload: bytes) -> None:
    """Raise the typed error an ERROR frame reports."""
    error = json.loads(payload)
    raise error_from(error["type"], error["message"])


class AgentStream:
    """An open request to the agent: frames in, frames out."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def recv(self) -> tuple[int, bytes] | None:
        """The next frame, or None when the agent closed the connection."""
        try:
            header = await self.reader.readexactly(protocol.HEADER.size)
            kind, size = protocol.HEADER.unpack(header)
            payload = await self.reader.readexactly(size) if size else b""
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
        return kind, payload

    async def send(self, kind: int, payload: bytes = b"") -> None:
        self.writer.write(protocol.encode(kind, payload))
        await self.writer.drain()

    async def send_json(self, kind: int, obj: object) -> None:
        await self.send(kind, json.dumps(obj).encode())

    async def result(self) -> dict[str, Any]:
        """Wait for a RESULT frame; raise the agent's error if it reports one."""
        frame = await self.recv()
        if frame is None:
            raise SandboxExpired("the sandbox went away during the request")
        kind, payload = frame
        if kind == Frame.RESULT:
            return json.loads(payload)
        if kind == Frame.ERROR:
            raise_agent_error(payload)
        raise SandboxError(f"unexpected frame {kind} from the agent")

    async def data(self) -> AsyncIterator[bytes]:
        """Payloads of DATA frames until END."""
        while True:
            frame = await self.recv()
            if frame is None:
                raise SandboxExpired("the sandbox went away during a transfer")
            kind, payload = frame
            if kind == Frame.END:
                return
            if kind == Frame.ERROR:
                raise_agent_error(payload)
            yield payload

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (ConnectionError, OSError):
            pass

    async def __aenter__(self) -> AgentStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class AgentClient:
    """Talks to the agent of one sandbox through its Unix socket."""

    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path

    async def open(self, op: str, **args: Any) -> AgentStream:
        try:
            reader, writer = await asyncio.open_unix_connection(
                self.socket_path, limit=protocol.MAX_FRAME * 2
            )
        except (FileNotFoundError, ConnectionRefusedError) as e:
            raise SandboxExpired(f"the sandbox is not running ({e.strerror})") from None
        writer.write(protocol.request_line(op, **args))
        return AgentStream(reader, writer)

    async def call(self, op: str, **args: Any) -> dict[str, Any]:
        """A request with one RESULT answer."""
        async with await self.open(op, **args) as stream:
            return await stream.result()
