"""A bound on the connections each user holds open to a system or hub service.

The system service's socket is everyone's (0666). Without a bound, one user who opens
connections until the service runs out of file descriptors (idle ones, or requests
whose headers never end) would leave it unable to accept anyone else's. Each uid (by
SO_PEERCRED) may hold MAX_PER_USER at once; root, which the dashboard runs as, is not
bound. A hub service's TCP port (`serve --hub-auth`) is every hub user's: there each
peer address (a user's pod) may hold MAX_PER_USER, as connections are opened before
any token is read. A connection over the bound is answered at once with an error, and
closed once the client has sent its request (so that it reads the answer), or after
LINGER seconds; at most MAX_LINGERING such connections are kept open meanwhile, others
closed at once.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections import Counter
from collections.abc import Callable, Hashable

from aiohttp import web

from .identity import peer_uid

# Connections one user may hold open at once: a JupyterLab panel following a class's
# logs uses a few dozen; the service's fd limit is shared by every user of the machine.
MAX_PER_USER = 256
LINGER = 1.0  # seconds a refused connection stays open for its client to read why
MAX_LINGERING = 64


def _refusal(limit: int) -> bytes:
    body = json.dumps(
        {
            "error": "QuotaExceeded",
            "message": f"you hold {limit} connections to the sandbox service at once, the "
            "most one user may: close some (end the processes or streams that hold them) "
            "and try again",
        }
    ).encode()
    head = (
        "HTTP/1.1 429 Too Many Requests\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


_LINGERING = -1  # the key under which refused connections still open are counted


# Whom a connection counts against: a key, or None for a peer no bound applies to.
PeerKey = Callable[[asyncio.BaseTransport], Hashable | None]


def _peer_uid(transport: asyncio.BaseTransport) -> int | None:
    uid = peer_uid(transport.get_extra_info("socket"))
    return None if uid == 0 else uid


def _peer_address(transport: asyncio.BaseTransport) -> str:
    return str(transport.get_extra_info("peername")[0])


class _Bounded(asyncio.Protocol):
    """The service's protocol for one connection, if its user is within the bound."""

    def __init__(
        self, make: Callable[[], asyncio.Protocol], held: Counter, limit: int, key: PeerKey
    ) -> None:
        self.make, self.held, self.limit, self.key = make, held, limit, key
        self.inner: asyncio.Protocol | None = None
        self.peer: Hashable | None = None
        self.transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = self.key(transport)
        if peer is not None and self.held[peer] >= self.limit:
            self._refuse(transport)
            return
        self.peer = peer
        self.held[peer] += 1
        self.inner = self.make()
        self.inner.connection_made(transport)

    def _refuse(self, transport: asyncio.BaseTransport) -> None:
        transport.write(_refusal(self.limit))  # type: ignore[attr-defined]
        if self.held[_LINGERING] >= MAX_LINGERING:
            transport.close()
            return
        self.held[_LINGERING] += 1
        self.transport = transport
        asyncio.get_running_loop().call_later(LINGER, transport.close)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.transport is not None:
            self.held[_LINGERING] -= 1
        if self.inner is None:
            return
        self.held[self.peer] -= 1
        if not self.held[self.peer]:
            del self.held[self.peer]
        self.inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.inner is not None:
            self.inner.data_received(data)
        elif self.transport is not None and b"\r\n\r\n" in data:  # it sent its request
            self.transport.close()

    def eof_received(self) -> bool | None:
        return self.inner.eof_received() if self.inner is not None else None

    def pause_writing(self) -> None:
        if self.inner is not None:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.inner is not None:
            self.inner.resume_writing()


def _bounded(
    site: web.BaseSite, held: Counter, limit: int, peer: PeerKey
) -> Callable[[], _Bounded]:
    """A protocol factory for `site`'s server that holds each peer to `limit` connections."""
    make = site._runner.server
    assert make is not None
    return lambda: _Bounded(make, held, limit, peer)


class BoundedUnixSite(web.UnixSite):
    """A Unix-socket site on which each uid holds at most `limit` connections."""

    def __init__(self, runner: web.BaseRunner, path: str, limit: int = MAX_PER_USER) -> None:
        super().__init__(runner, path)
        self.limit = limit
        self.held: Counter = Counter()

    async def start(self) -> None:
        await web.BaseSite.start(self)
        self._server = await asyncio.get_running_loop().create_unix_server(
            _bounded(self, self.held, self.limit, _peer_uid),
            self._path,
            backlog=self._backlog,
        )


class BoundedSockSite(web.SockSite):
    """A TCP site on a listening socket at which each peer address holds at most `limit`
    connections."""

    def __init__(
        self, runner: web.BaseRunner, sock: socket.socket, limit: int = MAX_PER_USER
    ) -> None:
        super().__init__(runner, sock)
        self.limit = limit
        self.held: Counter = Counter()

    async def start(self) -> None:
        await web.BaseSite.start(self)
        self._server = await asyncio.get_running_loop().create_server(
            _bounded(self, self.held, self.limit, _peer_address),
            sock=self._sock,
            backlog=self._backlog,
        )
