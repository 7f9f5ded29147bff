"""A gateway worker process: ``python -m jupyter_sandbox.ssh.worker``, started by the
service (`workers.WorkerPool`), never by hand.

It accepts on the listening socket it inherits and serves logins with a `Gateway`
whose tokens, limits and session bookkeeping are the service's, asked over the
private channel it inherits (`control.Channel`). It ends when the service does: by
``PR_SET_PDEATHSIG`` (SIGKILL) if the service dies, and when the channel ends.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import logging
import os
import signal
import socket
import sys
import time
from dataclasses import replace
from pathlib import Path

from ..agent.remote import AgentClient
from .control import Channel, Message
from .gateway import Connection, Gateway, Target
from .limits import GatewayLimits
from .tokens import hash_token
from .workers import SharedLoads

log = logging.getLogger(__name__)
PR_SET_PDEATHSIG = 1
# How long a busier worker leaves a new connection to a less busy one before it takes
# it after all (that one may be stuck on a long computation); a gap in its refusals
# longer than SPIN_GAP means another connection.
FAIR_GRACE = 0.005
SPIN_GAP = 0.001


class FairListener(socket.socket):
    """The shared listening socket, accepted from only while this worker holds no more
    connections than the least busy other worker (or after FAIR_GRACE)."""

    def __init__(self, fileno: int, loads: SharedLoads, index: int) -> None:
        super().__init__(fileno=fileno)
        self.loads, self.index = loads, index
        self.gateway: Gateway | None = None  # this worker's, once it runs
        self.accepted = 0
        self._streak_start = self._last_refusal = float("-inf")

    def accept(self) -> tuple[socket.socket, object]:
        others = self.loads.least_of_others(self.index)
        if others is not None and self.load() > others:
            now = time.monotonic()
            if now - self._last_refusal > SPIN_GAP:
                self._streak_start = now
            self._last_refusal = now
            if now - self._streak_start < FAIR_GRACE:
                raise BlockingIOError  # the event loop waits for the next connection
        accepted = super().accept()
        self.accepted += 1
        self.publish()
        return accepted

    def load(self) -> int:
        """Connections accepted and not ended (some not yet handed to the gateway)."""
        if self.gateway is None:
            return self.accepted
        gateway = self.gateway
        return self.accepted - gateway.connections_made + len(gateway.connections)

    def publish(self) -> None:
        self.loads.set(self.index, self.load())


class ServiceLedger:
    """The `limits.Ledger` of a worker: the service counts for every worker (and, with
    no cap on connections per user, nobody counts them)."""

    def __init__(
        self, channel: Channel, listener: FairListener, connections_per_user: int | None
    ) -> None:
        self.channel, self.listener = channel, listener
        self.connections_per_user = connections_per_user

    async def failed(self, source: str) -> bool:
        return bool((await self.channel.request({"op": "failed", "source": source}))["blocked"])

    def admit(self, conn: Connection) -> None:
        self.listener.publish()
        self.channel.send({"op": "admit", "conn": conn.id, "source": conn.source})

    def remove(self, conn: Connection) -> None:
        self.listener.publish()
        self.channel.send({"op": "remove", "conn": conn.id})

    def opened(self, conn: Connection, sandbox_id: str) -> None:
        message = {"op": "opened", "conn": conn.id, "sandbox_id": sandbox_id}
        self.channel.send({**message, "address": conn.address, "port": conn.port})

    def closed(self, conn: Connection) -> None:
        self.channel.send({"op": "closed", "conn": conn.id})

    async def reserve(self, conn: Connection, user: str) -> int | None:
        if self.connections_per_user is None:
            return None
        answer = await self.channel.request({"op": "reserve", "conn": conn.id, "user": user})
        return answer["refused_by"]

    def release(self, conn: Connection) -> None:
        if self.connections_per_user is not None:
            self.channel.send({"op": "release", "conn": conn.id})


class Worker:
    """A `Gateway` on the inherited socket, answering the service's orders."""

    def __init__(
        self,
        channel: Channel,
        listener: FairListener,
        gateway_options: dict,
        connections_per_user: int | None = None,
    ) -> None:
        self.channel, self.listener = channel, listener
        limits = replace(GatewayLimits.from_env(), max_connections_per_user=connections_per_user)
        self.gateway = Gateway(
            self.resolve,
            on_event=self.event,
            ledger=ServiceLedger(channel, listener, connections_per_user),
            limits=limits,
            sock=listener,
            **gateway_options,
        )
        listener.gateway = self.gateway
        # The service's orders to close sessions, collected for each token being resolved:
        # one that arrives with the answer finds no connection with that target yet.
        self._resolving: list[list[tuple[str, str | None]]] = []

    async def resolve(self, token: str) -> Target | None:
        """The service's answer for the token, asked by its hash; None if the service
        closed its sessions (revoked it, ended its sandbox) while the answer was on its way."""
        closed: list[tuple[str, str | None]] = []
        self._resolving.append(closed)
        try:
            answer = await self.channel.request({"op": "resolve", "token_hash": hash_token(token)})
        finally:
            self._resolving.remove(closed)
        fields = answer["target"]
        if fields is None:
            return None
        fields["agent"] = AgentClient.from_endpoint(fields["agent"])
        target = Target(**fields)
        for sandbox_id, token_hash in closed:
            if sandbox_id == target.sandbox_id and token_hash in (None, target.token_hash):
                return None
        if target.single_use:
            target.claim = lambda: self.claim(target.token_hash)
        return target

    async def claim(self, token_hash: str) -> bool:
        answer = await self.channel.request({"op": "claim", "token_hash": token_hash})
        return bool(answer["claimed"])

    def event(self, sandbox_id: str, text: str) -> None:
        self.channel.send({"op": "event", "sandbox_id": sandbox_id, "text": text})

    def handle(self, message: Message) -> None:
        op = message.get("op")
        if op == "close":
            self.gateway.close_sessions(message["sandbox_id"], message.get("token_hash"))
            for closed in self._resolving:
                closed.append((message["sandbox_id"], message.get("token_hash")))
        elif op == "abort":
            for conn in list(self.gateway.connections):
                if conn.id == message["conn"]:
                    conn.abort_login()

    async def run(self) -> None:
        """Serve until the service closes the channel (or goes away), then drop every
        connection."""
        await self.gateway.start()
        self.listener.publish()  # 0: from now on this worker takes its share
        self.channel.send({"op": "ready"})
        await self.channel.serve(self.handle)
        await self.gateway.close()


def die_with_parent(parent: int) -> None:
    """SIGKILL for this process when the service dies; exit now if it already has."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent:  # it died before the prctl took effect
        sys.exit(1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jupyter_sandbox.ssh.worker")
    parser.add_argument("--listen-fd", type=int, required=True)
    parser.add_argument("--control-fd", type=int, required=True)
    parser.add_argument("--loads-fd", type=int, required=True)
    parser.add_argument("--workers", type=int, required=True)
    parser.add_argument("--host-keys", type=Path, required=True)
    parser.add_argument("--parent", type=int, required=True)
    parser.add_argument("--index", type=int, default=0)
    parser.add_argument("--post-quantum-only", action="store_true")
    # the service's cap (counted there); none: nothing to count
    parser.add_argument("--max-connections-per-user", type=int)
    args = parser.parse_args(argv)
    die_with_parent(args.parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C is the service's
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s %(levelname)s [ssh worker {args.index}] %(message)s",
    )
    loads = SharedLoads(args.loads_fd, args.workers)
    listening = FairListener(args.listen_fd, loads, args.index)
    control = socket.socket(fileno=args.control_fd)

    async def run() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        worker = Worker(
            await Channel.over(control),
            listening,
            {"host_key_dir": args.host_keys, "post_quantum_only": args.post_quantum_only},
            args.max_connections_per_user,
        )
        serving = asyncio.ensure_future(worker.run())
        stopping = asyncio.ensure_future(stop.wait())
        await asyncio.wait({serving, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if not serving.done():
            worker.channel.close()
            await serving
        serving.result()

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
