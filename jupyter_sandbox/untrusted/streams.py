"""Time bounds on everything read from (or written to) a sandbox.

A stopped, stalled or hostile agent must never hang the host: every answer
has a deadline, and every transfer an inactivity limit and a minimum average
throughput (``Throughput``), after which the operation ends with ``AgentTimeout``.
"""

from __future__ import annotations

import os
import select
import time

from .._errors import SandboxError

ANSWER_TIMEOUT = 30.0  # seconds for the first answer to a request
INACTIVITY = 30.0  # seconds a sandbox may stay silent in the middle of a transfer
GRACE = 5.0  # beyond a command's own timeout, for the agent to end it and say so
CHUNK = 256 * 1024
MIN_RATE = 16 << 10  # bytes per second a transfer must average over each RATE_WINDOW
RATE_WINDOW = 60.0  # seconds; the first window is also the grace period of a transfer


class AgentTimeout(SandboxError):
    """The sandbox's agent did not answer (or stopped sending) in time."""

    status = 504


def silent(seconds: float) -> AgentTimeout:
    return AgentTimeout(f"the sandbox's agent sent nothing for {seconds:g} s; gave up on it")


def wait_for_fd(fd: int, events: int, seconds: float) -> None:
    """Wait until `fd` is ready for `events` (poll flags); AgentTimeout after `seconds`."""
    poller = select.poll()
    poller.register(fd, events)
    if not poller.poll(seconds * 1000):
        raise silent(seconds)


class Throughput:
    """Counts a transfer's bytes; AgentTimeout if a window of RATE_WINDOW seconds brought
    less than MIN_RATE bytes per second on average (an agent trickling bytes just often
    enough to beat the inactivity limit)."""

    def __init__(self) -> None:
        self.rate, self.window = MIN_RATE, RATE_WINDOW
        self.started, self.received = time.monotonic(), 0

    def add(self, size: int) -> None:
        self.received += size
        elapsed = time.monotonic() - self.started
        if elapsed < self.window:
            return
        if self.received < self.rate * elapsed:
            raise AgentTimeout(
                f"the sandbox's agent sent {self.received} bytes in {elapsed:.0f} s, under "
                f"{self.rate / 1024:g} KiB/s; gave up on the transfer"
            )
        self.started, self.received = time.monotonic(), 0


class AgentSpoke(Exception):
    """The agent sent something on its socket while a pipe transfer waited for data
    (typically an ERROR frame): read that instead."""


def wait_for_data(fd: int, seconds: float, watch: int | None = None) -> None:
    """Wait until `fd` is readable; AgentSpoke if `watch` becomes readable first."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    if watch is not None:
        poller.register(watch, select.POLLIN)
    ready = {ready_fd for ready_fd, _ in poller.poll(seconds * 1000)}
    if fd in ready:
        return
    if ready:
        raise AgentSpoke()
    raise silent(seconds)


class PipeReader:
    """A binary file object over a pipe; no read waits longer than `inactivity`.

    With `watch` (the agent's socket), a frame arriving there while the pipe is
    silent ends the read with AgentSpoke.
    """

    def __init__(self, fd: int, inactivity: float = INACTIVITY, watch: int | None = None) -> None:
        self.fd, self.inactivity, self.watch = fd, inactivity, watch
        self.throughput = Throughput()

    def read(self, size: int = -1) -> bytes:
        if size < 0:
            parts = []
            while part := self.read(CHUNK):
                parts.append(part)
            return b"".join(parts)
        wait_for_data(self.fd, self.inactivity, self.watch)
        data = os.read(self.fd, size)
        self.throughput.add(len(data))
        return data


class PipeWriter:
    """A binary file object over a non-blocking pipe end; no write waits longer than
    `inactivity` for the sandbox to take more."""

    def __init__(self, fd: int, inactivity: float = INACTIVITY) -> None:
        os.set_blocking(fd, False)
        self.fd, self.inactivity = fd, inactivity

    def write(self, data: bytes) -> int:
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(self.fd, view) :]
            except BlockingIOError:
                wait_for_fd(self.fd, select.POLLOUT, self.inactivity)
        return len(data)

    def flush(self) -> None:
        pass
