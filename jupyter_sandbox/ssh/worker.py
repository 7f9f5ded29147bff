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
from pathlib import Path

from ..agent.remote import AgentClient
from .control import Channel, Message
from .gateway import Connection, Gateway, Target
from .limits import GatewayLimits
from .tokens import hash_token

log = logging.getLogger(__name__)
PR_SET_PDEATHSIG = 1


class ServiceLedger:
    """The `limits.Ledger` of a worker: the service counts for every worker."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel

    async def failed(self, source: str) -> bool:
        return bool((await self.channel.request({"op": "failed", "source": source}))["blocked"])

    def admit(self, conn: Connection) -> None:
        self.channel.send({"op": "admit", "conn": conn.id, "source": conn.source})

    def remove(self, conn: Connection) -> None:
        self.channel.send({"op": "remove", "conn": conn.id})

    def opened(self, conn: Connection, sandbox_id: str) -> None:
        message = {"op": "opened", "conn": conn.id, "sandbox_id": sandbox_id}
        self.channel.send({**message, "address": conn.address})

    def closed(self, conn: Connection) -> None:
        self.channel.send({"op": "closed", "conn": conn.id})


class Worker:
    """A `Gateway` on the inherited socket, answering the service's orders."""

    def __init__(self, channel: Channel, gateway_options: dict) -> None:
        self.channel = channel
        self.gateway = Gateway(
            self.resolve,
            on_event=self.event,
            ledger=ServiceLedger(channel),
            limits=GatewayLimits.from_env(),
            **gateway_options,
        )

    async def resolve(self, token: str) -> Target | None:
        """The service's answer for the token, asked by its hash."""
        answer = await self.channel.request({"op": "resolve", "token_hash": hash_token(token)})
        fields = answer["target"]
        if fields is None:
            return None
        fields["agent"] = AgentClient(fields["agent"])
        target = Target(**fields)
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
        elif op == "abort":
            for conn in list(self.gateway.connections):
                if conn.id == message["conn"]:
                    conn.abort()

    async def run(self) -> None:
        """Serve until the service closes the channel (or goes away), then drop every
        connection."""
        await self.gateway.start()
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
    parser.add_argument("--host-keys", type=Path, required=True)
    parser.add_argument("--parent", type=int, required=True)
    parser.add_argument("--index", type=int, default=0)
    parser.add_argument("--post-quantum-only", action="store_true")
    args = parser.parse_args(argv)
    die_with_parent(args.parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C is the service's
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s %(levelname)s [ssh worker {args.index}] %(message)s",
    )
    listening = socket.socket(fileno=args.listen_fd)
    control = socket.socket(fileno=args.control_fd)

    async def run() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        worker = Worker(
            await Channel.over(control),
            {
                "host_key_dir": args.host_keys,
                "sock": listening,
                "post_quantum_only": args.post_quantum_only,
            },
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
