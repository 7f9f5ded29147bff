"""Host side of the agent protocol: one asyncio connection per request.

Every path that talks to an agent (service, gateway, SFTP, forwarding) goes
through here, and everything an agent sends is checked by ``untrusted.messages``
before anyone sees it: frame sizes before their payload is read, frame kinds
against the operation, RESULT, EXIT and ERROR payloads against their shapes.
Answers have deadlines (``untrusted.streams``), so a silent agent cannot hold a
caller forever.

An agent is reached through its Unix socket (a local sandbox) or over TCP with
TLS 1.3 (a pod): there the client trusts only the sandbox's agent certificate (the
pin is the check, not a name) and presents the service's pair for that sandbox.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .. import _tls_transport
from .._errors import FileError, SandboxError, SandboxExpired
from ..untrusted import messages
from ..untrusted.messages import ProtocolViolation
from ..untrusted.streams import ANSWER_TIMEOUT, INACTIVITY, AgentTimeout
from . import protocol
from .protocol import Frame
from .tls_server import load_pair, tune

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

    Over a Unix socket, frames go out through a second descriptor of the socket: when
    the agent stops reading and closes (it refused a request and said why), a failed
    send must not tear down the reading side before the agent's answer has been read.
    Over TLS the bytes must pass through the transport that encrypts them: they go
    through the writer (with drain), and the agent's side makes sure its answer
    arrives before any reset (it ends with a close_notify and a FIN, then reads and
    drops what is still coming); the reader keeps what arrived either way.
    """

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, op: str, tls: bool
    ) -> None:
        self.reader, self.writer, self.op = reader, writer, op
        self._out = (
            None if tls else socket.socket(fileno=os.dup(writer.get_extra_info("socket").fileno()))
        )

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
        await _within(self._write(protocol.encode(kind, payload)), timeout, "read")

    async def _write(self, data: bytes) -> None:
        if self._out is not None:
            await asyncio.get_running_loop().sock_sendall(self._out, data)
        else:
            if self.writer.is_closing():  # the agent ended the connection: sends go nowhere
                raise ConnectionResetError("the sandbox's agent closed the connection")
            self.writer.write(data)
            await self.writer.drain()

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
        if self._out is not None:
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


class AgentIdentityMismatch(ProtocolViolation):
    """The agent's address answered with a certificate other than the sandbox's pinned one."""


@dataclass(frozen=True)
class TlsEndpoint:
    """Where a pod's agent listens, with what pins the connection: the agent's
    certificate (the only one trusted) and the service's pair for this sandbox (PEM)."""

    host: str
    port: int
    agent_cert: bytes = field(repr=False)
    service_cert: bytes = field(repr=False)
    service_key: bytes = field(repr=False)

    PEM_FIELDS = ("agent_cert", "service_cert", "service_key")

    def to_json(self) -> dict[str, Any]:
        return {
            "host": self.host,
            "port": self.port,
            **{name: getattr(self, name).decode("ascii") for name in self.PEM_FIELDS},
        }

    @classmethod
    def from_json(cls, data: object) -> TlsEndpoint:
        """The endpoint `to_json` gave; ValueError for anything else."""
        if not isinstance(data, dict):
            raise ValueError("a TLS endpoint must be an object")
        host, port = data.get("host"), data.get("port")
        pems = [data.get(name) for name in cls.PEM_FIELDS]
        if not isinstance(host, str) or not host or type(port) is not int or not 0 < port < 65536:
            raise ValueError("a TLS endpoint needs a host and a port from 1 to 65535")
        if not all(isinstance(pem, str) and "-----BEGIN" in pem for pem in pems):
            raise ValueError(f"a TLS endpoint needs {', '.join(cls.PEM_FIELDS)} as PEM text")
        return cls(host, port, *(pem.encode("ascii") for pem in pems))


def _client_context(endpoint: TlsEndpoint) -> ssl.SSLContext:
    """TLS 1.3 trusting only the agent's certificate, presenting the service's pair."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.check_hostname = False  # the pin is the check: no name could say more
    context.load_verify_locations(cadata=endpoint.agent_cert.decode("ascii"))
    load_pair(context, endpoint.service_cert, endpoint.service_key)
    return context


Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


def _stream_protocol() -> tuple[asyncio.StreamReader, asyncio.StreamReaderProtocol]:
    reader = _ResetEndsReader(limit=protocol.MAX_FRAME * 2, loop=asyncio.get_running_loop())
    return reader, asyncio.StreamReaderProtocol(reader, loop=asyncio.get_running_loop())


async def _open_unix_connection(path: str) -> Connection:
    loop = asyncio.get_running_loop()
    reader, stream_protocol = _stream_protocol()
    try:
        transport, _ = await loop.create_unix_connection(lambda: stream_protocol, path)
    except (FileNotFoundError, ConnectionRefusedError) as e:
        raise SandboxExpired(f"the sandbox is not running ({e.strerror})") from None
    return reader, asyncio.StreamWriter(transport, stream_protocol, reader, loop)


async def _open_tls_connection(endpoint: TlsEndpoint, context: ssl.SSLContext) -> Connection:
    loop = asyncio.get_running_loop()
    reader, stream_protocol = _stream_protocol()
    where = f"{endpoint.host}:{endpoint.port}"
    try:
        transport = await _tls_transport.open_connection(
            stream_protocol, endpoint.host, endpoint.port, context
        )
    except ssl.SSLCertVerificationError as e:
        raise AgentIdentityMismatch(
            f"the sandbox's agent at {where} did not present the sandbox's certificate "
            f"({e.verify_message}): refused. Another pod may hold that address now; "
            "restart the sandbox if it does not come back"
        ) from None
    except ssl.SSLError as e:
        raise SandboxError(
            f"the TLS handshake with the sandbox's agent at {where} failed ({e.reason}); "
            "the pod may run other credentials: restart the sandbox"
        ) from None
    except (ConnectionError, OSError) as e:
        raise SandboxExpired(
            f"the sandbox's agent at {where} cannot be reached ({e.strerror or e}): "
            "the sandbox is not running"
        ) from None
    tune(transport.get_extra_info("socket"))
    return reader, asyncio.StreamWriter(transport, stream_protocol, reader, loop)


class AgentClient:
    """Talks to the agent of one sandbox: through its Unix socket (a path), or over
    TLS (a `TlsEndpoint`)."""

    def __init__(self, where: str | os.PathLike | TlsEndpoint) -> None:
        self.tls = where if isinstance(where, TlsEndpoint) else None
        self.socket_path = None if self.tls is not None else os.fspath(where)
        self._context: ssl.SSLContext | None = None

    def __repr__(self) -> str:
        return f"AgentClient({self.tls or self.socket_path!r})"

    def endpoint(self) -> dict[str, Any]:
        """Where the agent is, as JSON-able data: another process (an SSH gateway worker)
        rebuilds the client from it with `from_endpoint`. Holds a key: never log it."""
        if self.tls is not None:
            return {"tls": self.tls.to_json()}
        return {"unix": self.socket_path}

    @classmethod
    def from_endpoint(cls, endpoint: dict[str, Any]) -> AgentClient:
        """The client `endpoint()` describes; ValueError for anything else."""
        if isinstance(endpoint, dict) and "tls" in endpoint:
            return cls(TlsEndpoint.from_json(endpoint["tls"]))
        path = endpoint.get("unix") if isinstance(endpoint, dict) else None
        if not isinstance(path, str) or not path:
            raise ValueError("not an agent endpoint: expected {'unix': path} or {'tls': {...}}")
        return cls(path)

    async def _connect(self) -> Connection:
        if self.tls is None:
            return await _open_unix_connection(str(self.socket_path))
        if self._context is None:
            self._context = _client_context(self.tls)
        return await _open_tls_connection(self.tls, self._context)

    async def open(self, op: str, **args: Any) -> AgentStream:
        """Connect and send the request for `op`; the agent's answer comes as frames."""
        if op not in messages.OPS:
            raise SandboxError(f"no such agent operation: {op}")
        reader, writer = await _within(self._connect(), ANSWER_TIMEOUT, "accept the connection")
        stream = AgentStream(reader, writer, op, tls=self.tls is not None)
        try:
            await _within(
                stream._write(protocol.request_line(op, **args)),
                ANSWER_TIMEOUT,
                "read the request",
            )
        except ConnectionError as e:
            await stream.close()
            raise SandboxExpired(
                f"the sandbox's agent closed the connection before taking the request ({e}): "
                "the sandbox is ending, or its agent does not accept this service's credentials"
            ) from None
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
