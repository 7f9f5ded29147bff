"""Port forwarding: every forwarded connection is opened by the agent inside the sandbox.

asyncssh's default handler would connect from the gateway host (``ssh -L`` to
localhost would reach the host's own services), so the gateway answers
direct-tcpip and direct-streamlocal requests with sessions that relay to an
agent ``connect`` stream instead.
"""

from __future__ import annotations

import asyncio
import contextlib
from functools import partial

import asyncssh
from asyncssh.stream import SSHTCPStreamSession, SSHUNIXStreamSession

from .._errors import SandboxError
from ..agent.protocol import CHUNK
from ..agent.remote import AgentClient, AgentStream
from .audit import ChannelAudit, shown

REMOTE_FORWARD_REFUSED = (
    "remote forwarding (ssh -R) is not supported by this gateway: nothing can listen on the "
    "sandbox's behalf"
)


async def tcp_session(
    agent: AgentClient, host: str, port: int, audit: ChannelAudit
) -> SSHTCPStreamSession:
    """A direct-tcpip session connected to host:port as seen from inside the sandbox."""
    what = f"direct-tcpip forward to {shown(host, 255)}:{port}"
    stream = await _connect(agent, audit, what, host=host, port=port)
    return SSHTCPStreamSession(partial(relay, stream, audit))


async def unix_session(agent: AgentClient, path: str, audit: ChannelAudit) -> SSHUNIXStreamSession:
    """A direct-streamlocal session connected to a Unix socket inside the sandbox."""
    stream = await _connect(agent, audit, f"streamlocal forward to {shown(path)}", path=path)
    return SSHUNIXStreamSession(partial(relay, stream, audit))


async def _connect(
    agent: AgentClient, audit: ChannelAudit, what: str, **where: object
) -> AgentStream:
    try:
        stream = await agent.open("connect", **where)
    except SandboxError as e:
        audit.refused(what, str(e))
        raise asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED, str(e)) from None
    try:
        await stream.result()
    except SandboxError as e:
        await stream.close()
        audit.refused(what, str(e))
        raise asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED, str(e)) from None
    audit.start(what)
    return stream


async def relay(
    stream: AgentStream,
    audit: ChannelAudit,
    reader: asyncssh.SSHReader,
    writer: asyncssh.SSHWriter,
) -> None:
    """Copy bytes both ways between an SSH channel and the agent, half-closes included,
    until both directions end or the channel closes (client gone, connection lost,
    sandbox ended, access revoked); then the agent stream is closed."""
    copying = asyncio.gather(_to_agent(reader, stream, audit), _to_channel(stream, writer, audit))
    closed = asyncio.ensure_future(writer.channel.wait_closed())
    try:
        await asyncio.wait({copying, closed}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        copying.cancel()
        closed.cancel()
        await asyncio.wait({copying})
        await stream.close()
        writer.close()
        audit.end("closed")
    if not copying.cancelled():
        copying.result()


async def _to_agent(reader: asyncssh.SSHReader, stream: AgentStream, audit: ChannelAudit) -> None:
    with contextlib.suppress(ConnectionError, asyncssh.Error):
        while data := await reader.read(CHUNK):
            audit.bytes_in += len(data)
            stream.writer.write(data)
            await stream.writer.drain()
        if stream.writer.can_write_eof():
            stream.writer.write_eof()


async def _to_channel(stream: AgentStream, writer: asyncssh.SSHWriter, audit: ChannelAudit) -> None:
    with contextlib.suppress(ConnectionError, asyncssh.Error):
        while data := await stream.reader.read(CHUNK):
            audit.bytes_out += len(data)
            writer.write(data)
            await writer.drain()
        writer.write_eof()
