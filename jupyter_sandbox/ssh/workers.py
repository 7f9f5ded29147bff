"""Gateway worker processes: several processes serve the one SSH port, so a class's
parallel transfers are not bound to one Python process.

The service keeps the listening socket (held by the supervisor across restarts) and
starts `count` workers (``python -m jupyter_sandbox.ssh.worker``), each handed that
socket and one end of a private socketpair (`control.Channel`); every worker accepts
on the socket and runs a `Gateway` whose bookkeeping is here, in the service:

* tokens are resolved here, by hash (`resolve`), and a single-use token is claimed
  here, so a token is valid or used up for every worker at once;
* failed logins, logins in progress and each user's connections are counted here, for
  all workers together (`limits.LocalLedger`): the limits hold as if one process served
  the port. A login in progress that a limit drops is the one of its source that waits
  longest; the connections of a worker that dies stop counting;
* revoking a token or ending a sandbox closes its live sessions in every worker;
* a worker that dies is started again, and the end of each session it served is
  written to its sandbox's log;
* every worker dies with the service, even by SIGKILL (``PR_SET_PDEATHSIG``, and the
  channel's end), so none is left serving tokens nobody can revoke.

Connections are spread evenly: the kernel wakes every worker for a new connection, and
a worker holding more connections than the least busy other one leaves it to that one
for a moment (`SharedLoads`, `worker.FairListener`), so eight parallel copies run on
every core rather than on whichever worker woke first.

Every worker loads the service's host key itself: clients see one host key.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import mmap
import os
import socket
import struct
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path

from .._exits import describe_exit as _describe
from . import hostkey
from .audit import duration
from .control import Channel, Message
from .gateway import Target
from .limits import GatewayLimits, LocalLedger

log = logging.getLogger(__name__)

WORKERS_ENV = "JUPYTER_SANDBOX_SSH_WORKERS"
READY_TIMEOUT = 30.0  # for a worker to listen after it started
STOP_TIMEOUT = 10.0  # for a worker to close its connections before it is killed
RESTART_DELAYS = (0.25, 0.5, 1.0, 2.0, 4.0)  # after the 1st, 2nd, ... death in a row
STEADY = 60.0  # a worker that lived this long starts the count of deaths over

TargetResolver = Callable[[str], Awaitable[Target | None]]  # by token hash
EventSink = Callable[[str, str], None]


def worker_count(environ: Mapping[str, str] = os.environ) -> int:
    """`JUPYTER_SANDBOX_SSH_WORKERS`, default the number of CPUs this process may use."""
    text = environ.get(WORKERS_ENV, "").strip()
    if not text:
        return max(1, len(os.sched_getaffinity(0)))
    try:
        count = int(text)
    except ValueError:
        count = 0
    if count < 1:
        raise ValueError(
            f"{WORKERS_ENV}={text!r}: expected a number of gateway processes, 1 or more "
            "(1 serves SSH in the service's own process)"
        )
    return count


def target_message(target: Target) -> Message:
    """A target as the channel carries it: the agent as its endpoint, no callables."""
    message = {f.name: getattr(target, f.name) for f in fields(target) if f.name != "claim"}
    return message | {"agent": target.agent.endpoint()}


class SharedLoads:
    """How many connections each worker holds, in memory the service shares with its
    workers (a memfd): each worker writes its own slot and reads the others'."""

    SLOT = struct.Struct("=I")
    ABSENT = 0xFFFFFFFF  # no worker runs in this slot (yet, or any more)

    def __init__(self, fd: int, count: int) -> None:
        self.fd, self.count = fd, count
        self.map = mmap.mmap(fd, self.SLOT.size * count)

    @classmethod
    def create(cls, count: int) -> SharedLoads:
        fd = os.memfd_create("jupyter-sandbox-ssh-loads", os.MFD_CLOEXEC)
        os.ftruncate(fd, cls.SLOT.size * count)
        loads = cls(fd, count)
        for index in range(count):
            loads.set(index, cls.ABSENT)
        return loads

    def set(self, index: int, load: int) -> None:
        self.SLOT.pack_into(self.map, self.SLOT.size * index, load)

    def least_of_others(self, index: int) -> int | None:
        """The smallest load of the other running workers; None if none runs."""
        loads = [
            self.SLOT.unpack_from(self.map, self.SLOT.size * other)[0]
            for other in range(self.count)
            if other != index
        ]
        running = [load for load in loads if load != self.ABSENT]
        return min(running, default=None)

    def close(self) -> None:
        self.map.close()
        os.close(self.fd)


@dataclass(eq=False)
class RemoteLogin:
    """A login in progress in a worker, as the shared limits count it."""

    worker: Worker
    conn: int
    source: str
    last_active: float  # when it was admitted: the one waiting longest is dropped first

    def abort(self) -> None:
        self.worker.channel.send({"op": "abort", "conn": self.conn})


@dataclass
class Session:
    """A live connection a worker serves."""

    sandbox_id: str
    peer: str  # "ADDRESS port PORT", as the audit lines name it
    opened: float


class Worker:
    """One worker process and its end of the channel."""

    def __init__(self, index: int, proc: asyncio.subprocess.Process, channel: Channel) -> None:
        self.index, self.proc, self.channel = index, proc, channel
        self.started = time.monotonic()
        self.logins: dict[int, RemoteLogin] = {}
        self.sessions: dict[int, Session] = {}
        self.reserved: set[int] = set()  # connections counted against their user
        self.ready = asyncio.get_running_loop().create_future()


class WorkerPool:
    """`count` gateway workers on one listening socket; the same surface as `Gateway`
    for the service (`port`, `close_sessions`, `known_hosts_line`, ...)."""

    def __init__(
        self,
        count: int,
        sock: socket.socket,
        host_key_dir: Path,
        resolve: TargetResolver,
        claim: Callable[[str], bool],
        on_event: EventSink,
        *,
        limits: GatewayLimits | None = None,
        post_quantum_only: bool = False,
    ) -> None:
        self.count = count
        self.sock = sock
        self.host_key_dir = Path(host_key_dir)
        self.resolve, self.claim, self.on_event = resolve, claim, on_event
        self.limits = (limits or GatewayLimits()).within_fd_limit()
        self.ledger = LocalLedger(self.limits)
        self.post_quantum_only = post_quantum_only
        self.host_key = hostkey.load_host_key(self.host_key_dir)
        self.host_key_fingerprint = hostkey.fingerprint(self.host_key)
        self.port = sock.getsockname()[1]
        self.workers: list[Worker | None] = [None] * count
        self.loads = SharedLoads.create(count)
        self._deaths = [0] * count
        self._tasks: set[asyncio.Task] = set()
        self._closing = False

    # -- the gateway's surface ---------------------------------------------------------

    async def start(self) -> None:
        """Start every worker; raise what the first one that failed said."""
        started = await asyncio.gather(
            *(self._start(i) for i in range(self.count)), return_exceptions=True
        )
        failed = [e for e in started if isinstance(e, BaseException)]
        if failed:
            await self.close()
            raise failed[0]

    async def close(self) -> None:
        """Stop every worker (each drops its connections) and wait for them."""
        self._closing = True
        running = [w for w in self.workers if w is not None]
        for worker in running:
            worker.channel.close()  # a worker stops when its channel ends
        await asyncio.gather(*(self._reap(w) for w in running))
        for task in list(self._tasks):
            task.cancel()
        self.loads.close()

    def close_sessions(self, sandbox_id: str, token_hash: str | None = None) -> None:
        """Drop live connections to a sandbox (or made with one token) in every worker."""
        for worker in self.workers:
            if worker is not None:
                worker.channel.send(
                    {"op": "close", "sandbox_id": sandbox_id, "token_hash": token_hash}
                )

    def known_hosts_line(self, hostname: str, port: int) -> str:
        return hostkey.known_hosts_line(self.host_key, hostname, port)

    def unauthenticated(self) -> int:
        """Logins in progress in all workers."""
        return self.ledger.startups.total

    # -- workers -----------------------------------------------------------------------

    async def _start(self, index: int) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        argv = [
            sys.executable,
            "-m",
            "jupyter_sandbox.ssh.worker",
            f"--listen-fd={self.sock.fileno()}",
            f"--control-fd={theirs.fileno()}",
            f"--loads-fd={self.loads.fd}",
            f"--workers={self.count}",
            f"--host-keys={self.host_key_dir}",
            f"--parent={os.getpid()}",
            f"--index={index}",
        ]
        if self.post_quantum_only:
            argv.append("--post-quantum-only")
        if self.limits.max_connections_per_user is not None:
            argv.append(f"--max-connections-per-user={self.limits.max_connections_per_user}")
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                pass_fds=(self.sock.fileno(), theirs.fileno(), self.loads.fd),
            )
        finally:
            theirs.close()
        worker = Worker(index, proc, await Channel.over(ours))
        self.workers[index] = worker
        self._spawn(self._serve(worker))
        try:
            await asyncio.wait_for(asyncio.shield(worker.ready), READY_TIMEOUT)
        except TimeoutError:
            raise RuntimeError(
                f"SSH gateway worker {index} (pid {proc.pid}) did not listen within "
                f"{READY_TIMEOUT:g} s; see the lines above in the service log"
            ) from None

    async def _serve(self, worker: Worker) -> None:
        """Answer a worker until its channel ends; then account for it and replace it."""
        await worker.channel.serve(lambda message: self._handle(worker, message))
        returncode = await self._reap(worker)
        if not self._closing:
            self.loads.set(worker.index, SharedLoads.ABSENT)
        for login in worker.logins.values():
            self.ledger.remove(login)
        for conn in worker.reserved:
            self.ledger.users.release((worker, conn))
        if not worker.ready.done():
            worker.ready.set_exception(
                RuntimeError(
                    f"SSH gateway worker {worker.index} {_describe(returncode)} before it "
                    "listened; see the lines above in the service log"
                )
            )
            return
        if self._closing:
            return
        why = f"its gateway worker (pid {worker.proc.pid}) {_describe(returncode)}"
        for session in worker.sessions.values():
            lasted = duration(time.monotonic() - session.opened)
            line = f"SSH connection from {session.peer} closed after {lasted}: {why}"
            self.on_event(session.sandbox_id, line)
        self.workers[worker.index] = None
        steady = time.monotonic() - worker.started > STEADY
        self._deaths[worker.index] = 1 if steady else self._deaths[worker.index] + 1
        delay = RESTART_DELAYS[min(self._deaths[worker.index], len(RESTART_DELAYS)) - 1]
        log.warning(
            "SSH gateway worker %d (pid %d) %s with %d session(s); starting another in %.2f s",
            worker.index,
            worker.proc.pid,
            _describe(returncode),
            len(worker.sessions),
            delay,
        )
        await asyncio.sleep(delay)
        if not self._closing:
            try:
                await self._start(worker.index)
            except (OSError, RuntimeError) as e:
                log.error("SSH gateway worker %d could not be started again: %s", worker.index, e)

    async def _handle(self, worker: Worker, message: Message) -> Message | None:
        op = message.get("op")
        if op == "resolve":
            target = await self.resolve(message["token_hash"])
            return {"target": None if target is None else target_message(target)}
        if op == "claim":
            return {"claimed": self.claim(message["token_hash"])}
        if op == "failed":
            return {"blocked": await self.ledger.failed(message["source"])}
        if op == "reserve":
            users = self.ledger.users
            if not users.reserve((worker, message["conn"]), message["user"]):
                return {"refused_by": users.limit}
            worker.reserved.add(message["conn"])
            return {"refused_by": None}
        if op == "event":
            self.on_event(message["sandbox_id"], message["text"])
        elif op == "admit":
            login = RemoteLogin(worker, message["conn"], message["source"], time.monotonic())
            worker.logins[login.conn] = login
            self.ledger.admit(login)
        elif op == "remove":
            login = worker.logins.pop(message["conn"], None)
            if login is not None:
                self.ledger.remove(login)
        elif op == "opened":
            peer = f"{message['address']} port {message['port']}"
            session = Session(message["sandbox_id"], peer, time.monotonic())
            worker.sessions[message["conn"]] = session
        elif op == "closed":
            worker.sessions.pop(message["conn"], None)
        elif op == "release" and message["conn"] in worker.reserved:
            worker.reserved.discard(message["conn"])
            self.ledger.users.release((worker, message["conn"]))
        elif op == "ready" and not worker.ready.done():
            worker.ready.set_result(None)
        return None

    async def _reap(self, worker: Worker) -> int:
        """The worker's exit status, once it exited (killed if it does not, in time)."""
        try:
            return await asyncio.wait_for(worker.proc.wait(), STOP_TIMEOUT)
        except TimeoutError:
            log.error("SSH gateway worker %d did not stop: killing it", worker.index)
            with contextlib.suppress(ProcessLookupError):
                worker.proc.kill()
            return await worker.proc.wait()

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
