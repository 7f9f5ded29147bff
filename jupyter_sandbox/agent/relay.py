"""Connections from inside the sandbox (TCP or Unix), relayed as raw bytes to a client."""

from __future__ import annotations

import socket

from channel import Channel, start_thread
from files import resolve
from protocol import CHUNK, Frame


def op_connect(
    channel: Channel, host: str = "127.0.0.1", port: int = 0, path: str | None = None
) -> None:
    """Open a TCP (or Unix) connection from inside the sandbox, then relay raw bytes."""
    if path is not None:
        peer = socket.socket(socket.AF_UNIX)
        try:
            peer.connect(resolve(path))
        except BaseException:
            peer.close()
            raise
    else:
        peer = socket.create_connection((host, int(port)), timeout=10)
        peer.settimeout(None)
    channel.send_json(Frame.RESULT, {"connected": True})
    relay(channel.sock, peer, channel.rfile)


def relay(client: socket.socket, peer: socket.socket, client_file) -> None:
    """Copy bytes both ways until both sides are done."""

    def upstream() -> None:
        try:
            while data := client_file.read1(CHUNK):
                peer.sendall(data)
        except OSError:
            pass
        _shutdown(peer, socket.SHUT_WR)

    thread = start_thread(upstream)
    try:
        while data := peer.recv(CHUNK):
            client.sendall(data)
    except OSError:
        pass
    _shutdown(client, socket.SHUT_WR)
    thread.join()
    peer.close()


def _shutdown(sock: socket.socket, how: int) -> None:
    try:
        sock.shutdown(how)
    except OSError:
        pass
