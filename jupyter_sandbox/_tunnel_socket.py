"""A websocket that carries bytes to and from the SSH gateway's TCP port.

Both the notebook server's extension and the hub's dashboard tunnel SSH this way; each
checks who may open the tunnel and sets ``address`` in its ``get`` before upgrading.
"""

from __future__ import annotations

import asyncio
import contextlib

from tornado.websocket import WebSocketClosedError, WebSocketHandler

CHUNK = 64 * 1024


class GatewayTunnel(WebSocketHandler):
    """Pipes the websocket's binary messages to ``address`` and that socket's bytes back."""

    address: tuple[str, int]
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    async def open(self, *args: str, **kwargs: str) -> None:
        try:
            self.reader, self.writer = await asyncio.open_connection(*self.address)
        except OSError as e:
            self.close(1011, f"cannot reach the SSH gateway: {e}")
            return
        self._task = asyncio.create_task(self._pump())

    async def _pump(self) -> None:
        with contextlib.suppress(WebSocketClosedError, ConnectionError):
            while data := await self.reader.read(CHUNK):
                await self.write_message(data, binary=True)
        self.close()

    async def on_message(self, message: str | bytes) -> None:
        self.writer.write(message.encode() if isinstance(message, str) else message)
        with contextlib.suppress(ConnectionError):
            await self.writer.drain()

    def on_close(self) -> None:
        if hasattr(self, "writer"):
            self._task.cancel()
            self.writer.close()
