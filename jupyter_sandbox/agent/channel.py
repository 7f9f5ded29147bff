"""One client connection of the agent: a request line, then frames both ways."""

from __future__ import annotations

import json
import os
import socket
import stat
import threading

import protocol
from protocol import CHUNK, Frame


class AgentError(Exception):
    """An error reported to the client as an ERROR frame."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class Channel:
    """One client connection: a request line, then frames both ways."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.rfile = sock.makefile("rb", buffering=CHUNK)
        self._send_lock = threading.Lock()

    def send(self, kind: int, payload: bytes = b"") -> None:
        data = protocol.encode(kind, payload)
        with self._send_lock:
            self.sock.sendall(data)

    def send_json(self, kind: int, obj: object) -> None:
        self.send(kind, json.dumps(obj, separators=(",", ":")).encode())

    def recv(self) -> tuple[int, bytes] | None:
        """Next frame from the client, or None at end of stream."""
        header = self.rfile.read(protocol.HEADER.size)
        if len(header) < protocol.HEADER.size:
            return None
        kind, size = protocol.HEADER.unpack(header)
        payload = self.rfile.read(size) if size else b""
        if len(payload) < size:
            return None
        return kind, payload

    def receive_pipe(self) -> int:
        """Ask for and receive a pipe end; bulk data then bypasses the frames."""
        self.send(Frame.FD)
        _, fds, _, _ = socket.recv_fds(self.sock, 1, 1)
        if len(fds) != 1 or not stat.S_ISFIFO(os.fstat(fds[0]).st_mode):
            for fd in fds:
                os.close(fd)
            raise AgentError("BadRequest", "expected exactly one pipe")
        return fds[0]

    def data_frames(self):
        """Payloads of DATA frames until END; raises if the stream stops early."""
        while True:
            frame = self.recv()
            if frame is None:
                raise AgentError("ConnectionLost", "client closed the stream before END")
            kind, payload = frame
            if kind == Frame.END:
                return
            if kind == Frame.DATA:
                yield payload

    def client_gone(self) -> bool:
        """Has the client closed its end (checked without consuming anything)?"""
        try:
            return self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            return False
        except OSError:
            return True


class FrameWriter:
    """A write-only file object that sends DATA frames."""

    def __init__(self, channel: Channel) -> None:
        self.channel, self.buffer = channel, bytearray()

    def write(self, data: bytes) -> int:
        self.buffer += data
        if len(self.buffer) >= CHUNK:
            self.flush()
        return len(data)

    def flush(self) -> None:
        if self.buffer:
            self.channel.send(Frame.DATA, bytes(self.buffer))
            self.buffer.clear()


class FrameReader:
    """A read-only file object over DATA frames until END."""

    def __init__(self, channel: Channel) -> None:
        self.frames = channel.data_frames()
        self.pending = b""
        self.finished = False

    def read(self, size: int = -1) -> bytes:
        while not self.finished and (size < 0 or len(self.pending) < size):
            chunk = next(self.frames, None)
            if chunk is None:
                self.finished = True
            else:
                self.pending += chunk
        if size < 0:
            size = len(self.pending)
        data, self.pending = self.pending[:size], self.pending[size:]
        return data


def start_thread(target, *args) -> threading.Thread:
    """A daemon thread running `target(*args)`, started."""
    thread = threading.Thread(target=target, args=args, daemon=True)
    thread.start()
    return thread
