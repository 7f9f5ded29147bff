"""TLS for the agent's TCP listener (pod mode; stdlib only).

Only a client presenting the one certificate the agent was given (the service's
per-sandbox certificate, loaded as the only CA) gets in, over TLS 1.3. A client
without it, with another, or not speaking TLS is dropped without an answer; the
handshakes run on one thread (``Server``), each with a deadline, so a client that
never finishes its handshake holds a descriptor and only that long, never a thread:
another pod's flood of silent connections uses up neither the pod's pids limit nor
the places the service's own handshakes need.

An OpenSSL connection must not be read and written by two threads at once, yet the
agent reads a connection on one thread while others write to it (a command's
input and output, a relayed connection). So each TLS connection is carried by one
thread that alone uses the TLS object (through memory BIOs) and bridges it to a
socketpair; the agent serves the other end of the pair as it serves a Unix
connection. End of stream passes both ways (a close_notify for the agent's, a
shutdown of the pair for the client's). When the agent is done with a connection,
what it sent goes out, then a close_notify and a FIN, and whatever the client
still sends is read and dropped for a moment: a reset never overtakes the answer.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import socket
import ssl
import time

HANDSHAKE_TIMEOUT = 10.0  # seconds a client has to complete the TLS handshake
# Handshakes under way (a descriptor and a TLS object each): over QUIET_HANDSHAKES, a new
# connection ends the oldest if it has been under way for STALE seconds (a live client
# finishes in milliseconds); at MAX_HANDSHAKES, the oldest whatever its age.
QUIET_HANDSHAKES, MAX_HANDSHAKES, STALE = 64, 512, 1.0
BACKLOG_ROUND = 64  # connections accepted at a time before the handshakes are served
LINGER = 2.0  # seconds the rest of a finished connection's input is read and dropped
CHUNK = 256 * 1024
BUFFERED = 1 << 20  # bytes held per direction before that side is read no further
# Seconds idle before the first probe, seconds between probes, probes unanswered.
KEEPALIVE = ((socket.TCP_KEEPIDLE, 30), (socket.TCP_KEEPINTVL, 10), (socket.TCP_KEEPCNT, 3))


class HandshakeFailed(Exception):
    """The client did not complete a TLS handshake the agent accepts."""


def server_context(cert: bytes, key: bytes, peer: bytes) -> ssl.SSLContext:
    """TLS 1.3 only, the agent's pair, and `peer` as the one certificate admitted."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cadata=peer.decode("ascii"))
    context.num_tickets = 0  # no resumption: every connection shows the certificate
    load_pair(context, cert, key)
    return context


def load_pair(context: ssl.SSLContext, cert: bytes, key: bytes) -> None:
    """Load a certificate and key from memory: a memfd, never a path on a filesystem."""
    fd = os.memfd_create("tls-pair", os.MFD_CLOEXEC)
    try:
        os.write(fd, cert.rstrip(b"\n") + b"\n" + key)
        context.load_cert_chain(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)


class Server:
    """Accepts TCP connections and runs every TLS handshake under way on one thread.

    The handshakes are non-blocking, driven by one poll loop with the listening socket:
    a client that never finishes its handshake holds a descriptor and a TLS object until
    its deadline, never a thread. Past QUIET_HANDSHAKES under way, a new connection ends
    the oldest handshake if it is stale, and at MAX_HANDSHAKES the oldest in any case:
    another pod's flood of silent connections ends its own, never the service's (whose
    handshakes take milliseconds, however many it opens at once). Each connection that
    completes one is served on a thread of its own (``_bridge``).
    """

    def __init__(self, context: ssl.SSLContext, start_thread) -> None:
        self.context, self.start_thread = context, start_thread
        self._poller = select.poll()
        self._pending: dict[int, _Handshake] = {}  # by descriptor, oldest first

    def serve(self, listener: socket.socket, handle) -> None:
        """Serve `listener` for ever; `handle` serves each connection's plain end."""
        listener.setblocking(False)
        self._poller.register(listener, select.POLLIN)
        while True:
            now = time.monotonic()
            for handshake in [h for h in self._pending.values() if h.deadline <= now]:
                self._drop(handshake)
            wait = min((h.deadline for h in self._pending.values()), default=now + 60) - now
            ready = self._poller.poll(max(wait, 0.001) * 1000)
            for fd, events in ready:
                if (handshake := self._pending.get(fd)) is not None:
                    self._step(handshake, events, handle)
            if any(fd == listener.fileno() for fd, _ in ready):  # last: new ones may
                self._accept(listener)  # take the descriptors of those just ended

    def _accept(self, listener: socket.socket) -> None:
        for _ in range(BACKLOG_ROUND):
            try:
                raw, _ = listener.accept()
            except BlockingIOError:
                return
            except OSError as e:  # out of descriptors: make room, or wait a moment
                if e.errno in (errno.EMFILE, errno.ENFILE) and self._pending:
                    self._drop(next(iter(self._pending.values())))
                elif e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    time.sleep(0.1)
                return
            self._admit(raw)

    def _admit(self, raw: socket.socket) -> None:
        try:
            tune(raw)
            raw.setblocking(False)
            handshake = _Handshake(self.context, raw)
        except (OSError, ssl.SSLError):
            _close(raw)
            return
        if len(self._pending) >= QUIET_HANDSHAKES:
            oldest = next(iter(self._pending.values()))
            stale = oldest.started <= time.monotonic() - STALE
            if stale or len(self._pending) >= MAX_HANDSHAKES:
                self._drop(oldest)
        self._pending[raw.fileno()] = handshake
        self._poller.register(raw, select.POLLIN)

    def _step(self, handshake: _Handshake, events: int, handle) -> None:
        try:
            done = handshake.step(events)
        except (HandshakeFailed, OSError, ssl.SSLError):
            self._drop(handshake)
            return
        if handshake.unsent:
            self._poller.modify(handshake.raw, select.POLLIN | select.POLLOUT)
        elif done:
            self._forget(handshake)
            try:
                self.start_thread(self._bridge, handshake, handle)
            except RuntimeError:  # no thread to be had: the pod is at its pids limit
                _close(handshake.raw)
        else:
            self._poller.modify(handshake.raw, select.POLLIN)

    def _forget(self, handshake: _Handshake) -> None:
        del self._pending[handshake.fd]
        with contextlib.suppress(KeyError, ValueError):
            self._poller.unregister(handshake.fd)

    def _drop(self, handshake: _Handshake) -> None:
        self._forget(handshake)
        _close(handshake.raw)

    def _bridge(self, handshake: _Handshake, handle) -> None:
        """`handle` (on a thread of its own) serves the agent's end of a socketpair
        bridged to the client's TLS connection."""
        raw = handshake.raw
        try:
            agent_end, inner = socket.socketpair()
        except OSError:  # out of descriptors
            _close(raw)
            return
        try:
            self.start_thread(handle, agent_end)
        except RuntimeError:  # no thread to be had
            for sock in (agent_end, inner, raw):
                _close(sock)
            return
        try:
            _Bridge(raw, inner, handshake.tls, handshake.incoming, handshake.outgoing).run()
        finally:
            _close(inner)
            _close(raw)


def tune(sock: socket.socket) -> None:
    """No delay for small frames (a terminal's keystrokes), and keepalives: a peer that
    vanished without a FIN (a partitioned node) is noticed within about a minute."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in KEEPALIVE:
        sock.setsockopt(socket.IPPROTO_TCP, option, value)


class _Handshake:
    """The server side of one TLS handshake on a non-blocking socket, step by step."""

    def __init__(self, context: ssl.SSLContext, raw: socket.socket) -> None:
        self.raw, self.fd = raw, raw.fileno()
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_side=True)
        self.started = time.monotonic()
        self.deadline = self.started + HANDSHAKE_TIMEOUT
        self.unsent = b""
        self.done = False

    def step(self, events: int) -> bool:
        """Take what the client sent, answer it; True once the handshake is complete
        (and all of the agent's part of it is sent)."""
        if events & select.POLLIN:
            try:
                data = self.raw.recv(CHUNK)
            except BlockingIOError:
                data = None
            if data == b"":
                raise HandshakeFailed("the client closed the connection")
            if data:
                self.incoming.write(data)
            if not self.done:
                try:
                    self.tls.do_handshake()
                    self.done = True
                except ssl.SSLWantReadError:
                    pass
            self.unsent += self.outgoing.read()
        elif events & (select.POLLHUP | select.POLLERR):
            raise HandshakeFailed("the client's connection was reset")
        if self.unsent:
            with contextlib.suppress(BlockingIOError):
                self.unsent = self.unsent[self.raw.send(self.unsent) :]
        return self.done and not self.unsent


class _Bridge:
    """Carries one TLS connection between the network and the agent's socketpair."""

    def __init__(self, raw, inner, tls, incoming, outgoing) -> None:
        self.raw, self.inner, self.tls = raw, inner, tls
        self.incoming, self.outgoing = incoming, outgoing
        self.to_net = bytearray()  # TLS records for the client
        self.to_agent = bytearray()  # the client's plaintext for the agent
        self.client_sending = True  # no close_notify or EOF from the client yet
        self.agent_sending = True  # no EOF from the agent yet
        self.agent_reading = True  # the agent has not closed its end
        self.agent_told_eof = False
        inner.setblocking(False)

    def run(self) -> None:
        poller = select.poll()
        try:
            self._read_records()  # the client's first request may have come with its Finished
        except ssl.SSLError:
            return
        while self._busy():
            raw_events = select.POLLOUT if self.to_net else 0
            if self.client_sending and len(self.to_agent) < BUFFERED:
                raw_events |= select.POLLIN
            inner_events = select.POLLOUT if self.to_agent and self.agent_reading else 0
            if self.agent_sending and len(self.to_net) < BUFFERED:
                inner_events |= select.POLLIN
            poller.register(self.raw, raw_events)
            if inner_events or self.agent_reading:
                poller.register(self.inner, inner_events)
            else:
                with contextlib.suppress(KeyError):
                    poller.unregister(self.inner)
            try:
                for fd, events in poller.poll():
                    if fd == self.raw.fileno():
                        self._on_network(events)
                    else:
                        self._on_agent(events)
            except (OSError, ssl.SSLError):  # the client went away, or sent garbage
                return
        self._linger()

    def _busy(self) -> bool:
        to_agent = self.agent_reading and (self.client_sending or self.to_agent)
        return bool(self.agent_sending or self.to_net or to_agent)

    def _on_network(self, events: int) -> None:
        if events & (select.POLLHUP | select.POLLERR):  # a reset: nobody to answer any more
            raise ConnectionResetError("the client's connection was reset")
        if events & select.POLLIN:
            data = _receive(self.raw)
            if data == b"":
                self.incoming.write_eof()
            elif data:
                self.incoming.write(data)
            self._read_records()
        if events & select.POLLOUT and self.to_net:
            with contextlib.suppress(BlockingIOError):
                del self.to_net[: self.raw.send(self.to_net)]

    def _read_records(self) -> None:
        """Decrypt what arrived; the client's end of stream ends the agent's input."""
        while self.client_sending:
            try:
                data = self.tls.read(CHUNK)
            except ssl.SSLWantReadError:
                break
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                data = b""
            if not data:
                self.client_sending = False
            elif self.agent_reading:
                self.to_agent += data
        self.to_net += self.outgoing.read()
        self._pass_eof()

    def _on_agent(self, events: int) -> None:
        if events & select.POLLHUP:  # the agent closed its end: it reads nothing more
            self._agent_closed()
        if events & (select.POLLIN | select.POLLHUP | select.POLLERR) and self.agent_sending:
            data = _receive(self.inner)
            if data:
                self.tls.write(data)
            elif data == b"":
                self.agent_sending = False
                with contextlib.suppress(ssl.SSLWantReadError):
                    self.tls.unwrap()  # close_notify: the client's input ends here
            self.to_net += self.outgoing.read()
        if events & select.POLLOUT and self.to_agent and self.agent_reading:
            try:
                del self.to_agent[: self.inner.send(self.to_agent)]
            except BlockingIOError:
                pass
            except (BrokenPipeError, ConnectionResetError):
                self._agent_closed()
            self._pass_eof()

    def _agent_closed(self) -> None:
        self.agent_reading = False
        self.to_agent.clear()

    def _pass_eof(self) -> None:
        if not self.client_sending and not self.to_agent and not self.agent_told_eof:
            self.agent_told_eof = True
            with contextlib.suppress(OSError):
                self.inner.shutdown(socket.SHUT_WR)

    def _linger(self) -> None:
        """All sent: a FIN, then drop what the client still sends, briefly."""
        with contextlib.suppress(OSError):
            self.raw.shutdown(socket.SHUT_WR)
            poller = select.poll()
            poller.register(self.raw, select.POLLIN)
            deadline = time.monotonic() + LINGER
            while self.client_sending and (left := deadline - time.monotonic()) > 0:
                if poller.poll(left * 1000) and not self.raw.recv(CHUNK):
                    return


def _receive(sock: socket.socket) -> bytes | None:
    """What a non-blocking socket has: None if nothing yet, b"" at its end (or a reset)."""
    try:
        return sock.recv(CHUNK)
    except BlockingIOError:
        return None
    except ConnectionError:
        return b""


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.close()
