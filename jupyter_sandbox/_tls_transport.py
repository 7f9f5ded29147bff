"""TLS over an asyncio TCP connection, with an end of stream each way on its own.

asyncio's TLS transport cannot end its sending side and go on reading
(``can_write_eof()`` is False there), and a close_notify from the peer closes it
whole. A relayed connection needs both, as TCP has them: the side that is done
sending says so, the other goes on. TLS 1.3 allows it (a close_notify ends one
direction only); this transport drives an ``ssl.SSLObject`` over memory BIOs on a
plain TCP transport: ``write_eof()`` sends a close_notify and keeps reading, and the
peer's close_notify is the protocol's ``eof_received()``, after which writing goes on.

A TCP FIN from the peer ends the connection, though: the agent sends one only once
it reads nothing more (after its answer and close_notify), so what would still be
written could only be lost.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

CHUNK = 256 * 1024


async def open_connection(
    protocol: asyncio.Protocol, host: str, port: int, context: ssl.SSLContext
) -> asyncio.Transport:
    """Connect to `host`:`port`, complete the TLS handshake, then hand `protocol` the
    transport; the handshake's ``ssl.SSLError`` (a certificate refused) is raised here."""
    loop = asyncio.get_running_loop()
    layer = _TlsLayer(context, protocol, loop)
    transport, _ = await loop.create_connection(lambda: layer, host, port)
    try:
        await layer.handshake
    except BaseException:
        transport.abort()
        raise
    return layer.app_transport


class _TlsLayer(asyncio.Protocol):
    """The protocol of the TCP transport: TLS records in and out."""

    def __init__(
        self, context: ssl.SSLContext, app: asyncio.Protocol, loop: asyncio.AbstractEventLoop
    ) -> None:
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_hostname=None)
        self.app = app
        self.handshake: asyncio.Future[None] = loop.create_future()
        self.transport: asyncio.Transport | None = None
        self.app_transport = _TlsTransport(self)
        self.eof_sent = False
        self.peer_ended = False  # its close_notify (or a FIN) has come
        self.eof_passed = False  # and the protocol was told
        self.broken: ConnectionError | None = None  # a record that did not decrypt

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._handshake_step()

    def data_received(self, data: bytes) -> None:
        self.incoming.write(data)
        if self.handshake.done():
            self._read()
        else:
            self._handshake_step()

    def eof_received(self) -> bool:
        """TCP's FIN: the last of the peer's records (normally after its close_notify);
        the connection then closes (see the module docstring)."""
        self.incoming.write_eof()
        if not self.handshake.done():
            self._fail(ConnectionResetError("the peer closed the connection in the handshake"))
        else:
            self._read()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.handshake.done():
            self._fail(exc or ConnectionResetError("the connection closed in the handshake"))
        else:
            self.app.connection_lost(exc or self.broken)

    def pause_writing(self) -> None:
        self.app.pause_writing()

    def resume_writing(self) -> None:
        self.app.resume_writing()

    def send_pending(self) -> None:
        data = self.outgoing.read()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def _handshake_step(self) -> None:
        try:
            self.tls.do_handshake()
        except ssl.SSLWantReadError:
            self.send_pending()
            return
        except ssl.SSLError as e:
            self._fail(e)
            return
        self.send_pending()
        self.handshake.set_result(None)
        self.app.connection_made(self.app_transport)
        self._read()  # records that came along with the peer's last handshake message

    def _read(self) -> None:
        """Decrypt what arrived; the records of one read reach the protocol as one piece."""
        received = []
        while not self.peer_ended:
            try:
                data = self.tls.read(CHUNK)
            except ssl.SSLWantReadError:
                break
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                data = b""
            except ssl.SSLError as e:
                self.broken = ConnectionResetError(f"a TLS record did not check out ({e.reason})")
                self.transport.abort()  # connection_lost follows
                break
            if not data:
                self.peer_ended = True
            else:
                received.append(data)
        if received:
            self.app.data_received(b"".join(received))
        if self.peer_ended and not self.eof_passed:
            self.eof_passed = True
            if not self.app.eof_received():
                self.app_transport.close()
        self.send_pending()  # what reading made (a key update's answer)

    def _fail(self, error: BaseException) -> None:
        if not self.handshake.done():
            self.handshake.set_exception(error)
        if self.transport is not None:
            self.transport.abort()


class _TlsTransport(asyncio.Transport):
    """What the application protocol writes to: plaintext in, records out."""

    def __init__(self, layer: _TlsLayer) -> None:
        super().__init__()
        self._layer = layer

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "ssl_object":
            return self._layer.tls
        if name == "sslcontext":  # asyncio's streams then keep the sending side open on EOF
            return None
        return self._layer.transport.get_extra_info(name, default)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._layer.eof_sent:
            raise RuntimeError("write() after write_eof()")
        if self._layer.transport.is_closing():
            return  # as asyncio's transports do: the connection is gone
        self._layer.tls.write(data)
        self._layer.send_pending()

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        """A close_notify: the peer's input ends here; reading goes on."""
        if self._layer.eof_sent or self._layer.transport.is_closing():
            return
        self._layer.eof_sent = True
        try:
            self._layer.tls.unwrap()
        except ssl.SSLWantReadError:
            pass  # the peer's own close_notify comes when it is done
        except ssl.SSLError:
            pass
        self._layer.send_pending()

    def close(self) -> None:
        self.write_eof()
        self._layer.transport.close()

    def abort(self) -> None:
        self._layer.transport.abort()

    def is_closing(self) -> bool:
        return self._layer.transport.is_closing()

    def pause_reading(self) -> None:
        self._layer.transport.pause_reading()

    def resume_reading(self) -> None:
        self._layer.transport.resume_reading()

    def is_reading(self) -> bool:
        return self._layer.transport.is_reading()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._layer.transport.set_write_buffer_limits(high, low)

    def get_write_buffer_size(self) -> int:
        return self._layer.transport.get_write_buffer_size()
