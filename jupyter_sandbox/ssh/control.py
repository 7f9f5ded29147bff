"""The private channel between the service and a gateway worker: JSON lines over a
socketpair, both ways, with numbered requests and their answers.

Nothing secret crosses it: a worker asks for a token by its hash (``tokens.hash_token``),
and the answer names the sandbox's agent socket, which the worker (same user as the
service) connects to itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import socket
from collections.abc import Awaitable, Callable
from typing import Any

MAX_MESSAGE = 16 << 20  # a target carries the sandbox's environment, which users set
Message = dict[str, Any]
Handler = Callable[[Message], Awaitable[Message | None] | Message | None]


class ChannelClosed(ConnectionError):
    """The other end of the channel went away."""


class Channel:
    """One end of the channel: `send` a message, `request` one and await its answer;
    `serve` hands every incoming message to a handler and sends back what it returns for
    a request (a message with an ``id``)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[Message]] = {}

    @classmethod
    async def over(cls, sock: socket.socket) -> Channel:
        reader, writer = await asyncio.open_unix_connection(sock=sock, limit=MAX_MESSAGE)
        return cls(reader, writer)

    def send(self, message: Message) -> None:
        """Queue `message` for the other end (silently dropped once the channel closed)."""
        if not self.writer.is_closing():
            self.writer.write(json.dumps(message, separators=(",", ":")).encode() + b"\n")

    async def request(self, message: Message) -> Message:
        """Send a request and wait for its answer; `ChannelClosed` if the other end goes."""
        number = next(self._ids)
        answer = asyncio.get_running_loop().create_future()
        self._waiting[number] = answer
        try:
            self.send({**message, "id": number})
            if self.writer.is_closing():
                raise ChannelClosed("the channel is closed")
            return await answer
        finally:
            self._waiting.pop(number, None)

    async def serve(self, handle: Handler) -> None:
        """Dispatch incoming messages until the other end closes; then fail every request
        still waiting for an answer."""
        try:
            while line := await self.reader.readline():
                message = json.loads(line)
                if "answer" in message:
                    waiting = self._waiting.get(message["answer"])
                    if waiting is not None and not waiting.done():
                        waiting.set_result(message)
                    continue
                result = handle(message)
                if isinstance(result, Awaitable):
                    result = await result
                if "id" in message:
                    self.send({**(result or {}), "answer": message["id"]})
        except (ConnectionError, ValueError):
            pass  # a reset or a torn line: the other end is gone either way
        finally:
            for waiting in self._waiting.values():
                if not waiting.done():
                    waiting.set_exception(ChannelClosed("the other end of the channel went away"))
            self.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.writer.close()
