"""The SSH gateway: listens, maps token usernames to sandboxes, enforces abuse limits.

Abuse limits never refuse a valid token: logins in progress are capped per
source and in total by dropping the idlest one (`limits.StartupLimiter`), every
connection must log in within `login_timeout` of its TCP accept, and a source
with too many failed logins only gets its unknown tokens answered slowly.

A token presented from this machine (loopback, or one of the host's own
addresses: see `peers`) is honoured only for the OS user it was issued to,
`Target.uid`: a token read from another user's `ps` is refused like a wrong one.
A token of a JupyterHub user (a uid from `HUB_UID_BASE` up, `serve --hub-auth`) is
never any local user's, so it is honoured from other machines only: in a cluster, from
the users' pods, which are never the gateway's own.

What one token holder may take is capped too, so one user cannot use up a worker's
file descriptors for everyone: the connections each user (the tokens' issuer) holds,
counted by the ledger for all workers together, and the channels of each connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import asyncssh

from ..agent.remote import AgentClient
from ..service.identity import HUB_UID_BASE
from . import forwarding, hostkey, peers
from .algorithms import server_algorithms
from .audit import ChannelAudit, ConnectionAudit
from .limits import ENV_PREFIX, GatewayLimits, Ledger, LocalLedger
from .logs import quiet_asyncssh
from .session import SandboxSession

log = logging.getLogger(__name__)

SERVER_VERSION = "jupyter-sandbox"
BACKLOG = 128
SOMAXCONN = Path("/proc/sys/net/core/somaxconn")
OTHER_USER = (
    "jupyter-sandbox: this token works only for the OS user it was issued to; "
    "from this machine, use it as that user (or ask for a token of your own)\n"
)
HUB_USER = (
    "jupyter-sandbox: this token was issued to a JupyterHub user, and no local user of "
    "the gateway's machine is one: use it from your notebook server (its terminal, or "
    "the Jupyter tunnel)\n"
)


def too_many_connections(uid: int, limit: int) -> str:
    """The banner of a login refused because its user holds `limit` connections."""
    return (
        f"jupyter-sandbox: uid {uid} holds {limit} SSH connections to this gateway already, "
        "the most one user may; close some (or run several sessions over one connection "
        "with ssh -o ControlMaster=auto -o ControlPath=...) and try again\n"
    )


def too_many_channels(limit: int) -> str:
    """The channel-open failure reason of a connection that holds `limit` channels."""
    return (
        f"this connection holds {limit} open channels (sessions and forwards), the most "
        "one may; close some, or open another connection"
    )


@dataclass
class Target:
    """What a valid token grants: one sandbox, reached through its agent."""

    sandbox_id: str
    agent: AgentClient
    env: dict[str, str]
    token_hash: str
    public_key: str | None = None  # OpenSSH public key line that must also be presented
    single_use: bool = False
    # Uses the token up when a login with it completes: False if another login was first.
    claim: Callable[[], Awaitable[bool]] | None = None
    sftp: str = "auto"  # which SFTP server runs in the sandbox: see ssh.sftp
    # Why a valid token gets no login (its sandbox failed): shown to the user, then denied.
    refusal: str | None = None
    # The OS user the token was issued to: the only local user it works for.
    uid: int = field(default_factory=os.getuid)
    # The sandbox's directory, when its terminals are recorded (see ssh.recording).
    record_in: str | None = None


Resolver = Callable[[str], Awaitable["Target | None"]]
EventSink = Callable[[str, str], None]


class Gateway:
    """An SSH server whose usernames are tokens and whose sessions run inside sandboxes."""

    def __init__(
        self,
        resolve: Resolver,
        host_key_dir: Path,
        host: str = "127.0.0.1",
        port: int = 0,
        on_event: EventSink | None = None,
        *,
        limits: GatewayLimits | None = None,
        post_quantum_only: bool = False,
        sock: socket.socket | None = None,
        ledger: Ledger | None = None,
    ) -> None:
        self.resolve = resolve
        self.host, self.port = host, port
        self.sock = sock  # bound already (held across restarts): `host` and `port` unused
        self.on_event = on_event
        self.limits = (limits or GatewayLimits()).within_fd_limit()
        self.algorithms = server_algorithms(post_quantum_only)
        self.ledger = ledger or LocalLedger(self.limits)
        self.host_key = hostkey.load_host_key(Path(host_key_dir))
        self.host_key_fingerprint = hostkey.fingerprint(self.host_key)
        self.connections: set[Connection] = set()
        self.connections_made = 0  # ever (with `connections`: those accepted and ended)
        self.proc_reader = peers.ProcReader()  # only where sock_diag is missing
        self._acceptor: asyncssh.SSHAcceptor | None = None
        quiet_asyncssh()

    async def start(self) -> None:
        """Listen; `self.port` is the real port afterwards."""
        limits = self.limits
        backlog = max(BACKLOG, limits.startups.full)
        where = {"sock": self.sock} if self.sock else {"host": self.host, "port": self.port}
        self._acceptor = await asyncssh.listen(
            **where,
            server_factory=lambda: Connection(self),
            server_host_keys=[self.host_key],
            encoding=None,
            line_editor=False,
            agent_forwarding=False,
            x11_forwarding=False,
            login_timeout=limits.login_timeout,  # asyncssh starts it at the TCP accept
            backlog=backlog,
            keepalive_interval=limits.keepalive_interval,
            keepalive_count_max=limits.keepalive_count_max,
            server_version=SERVER_VERSION,
            **self.algorithms,
        )
        self.port = self._acceptor.get_port()
        _warn_of_a_short_backlog(backlog)

    async def close(self) -> None:
        """Stop listening and drop every connection."""
        if self._acceptor is not None:
            self._acceptor.close()
            await self._acceptor.wait_closed()
            self._acceptor = None
        connections = list(self.connections)
        for connection in connections:
            connection.close()
        await asyncio.gather(*(c.wait_closed() for c in connections))

    def close_sessions(self, sandbox_id: str, token_hash: str | None = None) -> None:
        """Drop live connections to a sandbox (or only those made with one token)."""
        for connection in list(self.connections):
            target = connection.target
            if (
                target is not None
                and target.sandbox_id == sandbox_id
                and (token_hash is None or target.token_hash == token_hash)
            ):
                connection.close()

    def known_hosts_line(self, hostname: str, port: int) -> str:
        """A known_hosts line that pins this gateway's host key."""
        return hostkey.known_hosts_line(self.host_key, hostname, port)

    def unauthenticated(self) -> int:
        """Connections still logging in (counted here, in one process)."""
        assert isinstance(self.ledger, LocalLedger)
        return self.ledger.startups.total

    def event(self, sandbox_id: str, text: str) -> None:
        if self.on_event is not None:
            try:
                self.on_event(sandbox_id, text)
            except Exception:
                log.exception("SSH event handler failed")


_connection_ids = itertools.count(1)


class Connection(asyncssh.SSHServer):
    """One client connection: authentication by token, then forwarding requests."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.id = next(_connection_ids)  # names it to the service, for gateway workers
        self.conn: asyncssh.SSHServerConnection | None = None
        self.address = ""  # the peer's address and port, for the sandbox's log
        self.port = 0
        self.audit: ConnectionAudit | None = None  # once logged in
        self.peer = peers.UNKNOWN  # whom abuse limits count this connection against
        self.last_active = 0.0
        self.target: Target | None = None
        self.authenticated = False
        self.logging_in = True  # until the login completes (the start-up limits' concern)
        self.counted_for_user = False  # against its token's user (ledger.reserve)
        self.channels_refused = False  # has the channel limit bitten yet
        self._identifying: asyncio.Future | None = None
        self._claiming: asyncio.Future | None = None

    @property
    def source(self) -> str:
        return self.peer.source

    # -- connection ------------------------------------------------------------------

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        peer, local = conn.get_extra_info("peername"), conn.get_extra_info("sockname")
        try:
            found = peers.identify(peer, local)
        except peers.Unavailable:
            found = peers.UNKNOWN
            self._identifying = asyncio.ensure_future(self._identify_from_proc(peer, local))
        self.peer = peers.UNKNOWN if found is peers.GONE else found
        self.address, self.port = str(peer[0]), int(peer[1])
        self.last_active = time.monotonic()
        self.conn = conn
        self.gateway.connections.add(self)
        self.gateway.connections_made += 1
        _track_receives(conn, self)
        self.gateway.ledger.admit(self)
        if found is peers.GONE:  # the client closed already: nobody to serve
            asyncio.get_running_loop().call_soon(self.abort)

    async def _identify_from_proc(self, peer: tuple, local: tuple) -> None:
        """Count a connection admitted as `peers.UNKNOWN` against its user once known."""
        found = await self.gateway.proc_reader.identify(peer, local)
        if found is peers.GONE:
            self.abort()
            return
        pending = not self.authenticated and self in self.gateway.connections
        if pending:
            self.gateway.ledger.remove(self)
        self.peer = found
        if pending:
            self.gateway.ledger.admit(self)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.conn is None:
            return
        self.gateway.connections.discard(self)
        self.gateway.ledger.remove(self)
        if self.counted_for_user:
            self.gateway.ledger.release(self)
        for task in (self._identifying, self._claiming):
            if task is not None:
                task.cancel()
        target = self.target
        if target is not None and self.authenticated:
            self.gateway.ledger.closed(self)
        if self.audit is not None:
            self.audit.closed()
        elif target is not None and target.public_key:
            _forget(self.gateway.ledger.failed(self.source))  # the right token but not its key

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()

    def abort(self) -> None:
        """Drop the connection at once (a login in progress making room for another)."""
        if self.conn is not None:
            self.conn.abort()

    def abort_login(self) -> None:
        """`abort`, unless the login completed meanwhile: the start-up limits, counted in
        the service for every worker, may pick a login whose end is still on its way."""
        if self.logging_in:
            self.abort()

    async def wait_closed(self) -> None:
        if self.conn is not None:
            await self.conn.wait_closed()

    # -- authentication --------------------------------------------------------------

    async def begin_auth(self, username: str) -> bool:
        """Resolve the token; no further auth when it needs no key, deny all when unknown.

        A valid token always gets in, whatever the source's failures; a blocked source's
        unknown tokens are only answered late. A token of another user presented from
        this machine counts as unknown, with a banner saying why."""
        if self._identifying is not None:
            await asyncio.shield(self._identifying)
        target = await self.gateway.resolve(username)
        if target is not None and not self._may_use(target):
            self._refuse_for_user(target)
            target = None
        self.target = target
        if target is not None and target.refusal is not None:
            self._banner(target.refusal + "\n")
            self.target = None
            return True  # no method succeeds
        if target is not None and not await self._reserve(target):
            self.target = None
            return True
        if target is not None:
            return target.public_key is not None
        if await self.gateway.ledger.failed(self.source):
            await asyncio.sleep(self.gateway.limits.blocked_delay)
        return True

    async def _reserve(self, target: Target) -> bool:
        """Count this connection against its token's user; if that user holds the most
        connections one may, say so in a banner and give False."""
        limit = await self.gateway.ledger.reserve(self, f"uid {target.uid}")
        if limit is None and self not in self.gateway.connections:  # it ended meanwhile
            self.gateway.ledger.release(self)
            return False
        self.counted_for_user = limit is None
        if limit is not None:
            log.warning(
                "SSH: refused a login to sandbox %s: uid %d holds %d connections already "
                "(%sMAX_CONNECTIONS_PER_USER)",
                target.sandbox_id,
                target.uid,
                limit,
                ENV_PREFIX,
            )
            self._banner(too_many_connections(target.uid, limit))
        return limit is None

    def _may_use(self, target: Target) -> bool:
        """A local client may use only tokens of its own user; remote ones any token."""
        return not self.peer.local or self.peer.uid == target.uid

    def _refuse_for_user(self, target: Target) -> None:
        who = "a local user who could not be identified"
        if self.peer.uid is not None:
            who = f"local uid {self.peer.uid}"
        log.warning(
            "SSH: refused a token of sandbox %s presented from this machine by %s: it was "
            "issued to uid %d",
            target.sandbox_id,
            who,
            target.uid,
        )
        self._banner(HUB_USER if target.uid >= HUB_UID_BASE else OTHER_USER)

    def _banner(self, text: str) -> None:
        if self.conn is not None:  # OpenSSH prints the banner on stderr
            self.conn.send_auth_banner(text)

    def auth_completed(self) -> None:
        """Serve the login, unless its single-use token was used up by another meanwhile."""
        self.logging_in = False
        self.gateway.ledger.remove(self)
        target = self.target
        assert target is not None
        if target.claim is None:
            self._grant(target)
        else:
            self._claiming = asyncio.ensure_future(self._claim(target))

    async def _claim(self, target: Target) -> None:
        assert target.claim is not None
        if await target.claim():
            self._grant(target)
        else:
            self.close()

    def _grant(self, target: Target) -> None:
        self.authenticated = True
        self.gateway.ledger.opened(self, target.sandbox_id)
        emit = partial(self.gateway.event, target.sandbox_id)
        self.audit = ConnectionAudit(emit, self.address, self.port, self.peer)
        self.audit.opened(target.single_use)

    async def _granted(self) -> Target:
        """The target, once the login is served (its single-use token claimed)."""
        if self._claiming is not None:
            await asyncio.shield(self._claiming)
        if not self.authenticated or self.target is None:
            raise asyncssh.ChannelOpenError(asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED, "")
        return self.target

    def public_key_auth_supported(self) -> bool:
        return True  # also for unknown tokens, so they look like key-protected ones

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        target = self.target
        if target is None or not target.public_key:
            return False
        try:
            wanted = asyncssh.import_public_key(target.public_key)
        except (asyncssh.KeyImportError, ValueError):
            return False
        return wanted.public_data == key.public_data

    # -- channels --------------------------------------------------------------------

    def open_channels(self) -> int:
        """Channels of this connection not closed yet (asyncssh 2.x lists them)."""
        return 0 if self.conn is None else len(self.conn._channels)

    def _check_channels(self) -> None:
        """Refuse a new channel of a connection that holds `max_channels` open (asyncssh
        calls the channel hooks before it makes the channel: it is not counted yet)."""
        limit = self.gateway.limits.max_channels
        if self.open_channels() >= limit:
            if not self.channels_refused:  # once a connection: the client may insist
                self.channels_refused = True
                log.warning(
                    "SSH: a connection from %s to sandbox %s holds %d channels: refusing more "
                    "(%sMAX_CHANNELS)",
                    self.source,
                    self.target.sandbox_id if self.target else "?",
                    limit,
                    ENV_PREFIX,
                )
            raise asyncssh.ChannelOpenError(
                asyncssh.OPEN_RESOURCE_SHORTAGE, too_many_channels(limit)
            )

    def session_requested(self) -> SandboxSession | Awaitable[SandboxSession] | bool:
        self._check_channels()
        if self._claiming is not None and not self._claiming.done():
            return self._session()
        if not self.authenticated:
            return False
        assert self.target is not None
        return SandboxSession(self.target, self._channel_audit())

    async def _session(self) -> SandboxSession:
        return SandboxSession(await self._granted(), self._channel_audit())

    def _channel_audit(self) -> ChannelAudit:
        """The log lines of a new channel of this (logged in) connection."""
        assert self.audit is not None
        return self.audit.channel()

    # -- forwarding ------------------------------------------------------------------

    def connection_requested(
        self, dest_host: str, dest_port: int, orig_host: str, orig_port: int
    ) -> Awaitable[asyncssh.SSHTCPSession]:
        self._check_channels()
        return self._tcp_session(dest_host, dest_port)

    async def _tcp_session(self, dest_host: str, dest_port: int) -> asyncssh.SSHTCPSession:
        target = await self._granted()
        return await forwarding.tcp_session(
            target.agent, dest_host, dest_port, self._channel_audit()
        )

    def unix_connection_requested(self, dest_path: str) -> Awaitable[asyncssh.SSHUNIXSession]:
        self._check_channels()
        return self._unix_session(dest_path)

    async def _unix_session(self, dest_path: str) -> asyncssh.SSHUNIXSession:
        target = await self._granted()
        return await forwarding.unix_session(target.agent, dest_path, self._channel_audit())

    def server_requested(self, listen_host: str, listen_port: int) -> bool:
        return self._refuse_listen()

    def unix_server_requested(self, listen_path: str) -> bool:
        return self._refuse_listen()

    def _refuse_listen(self) -> bool:
        if self.conn is not None:
            self.conn.send_debug(forwarding.REMOTE_FORWARD_REFUSED, always_display=True)
        return False


def _forget(awaitable: Awaitable[object]) -> None:
    """Run `awaitable` on its own; its outcome matters to no one here."""
    task = asyncio.ensure_future(awaitable)
    task.add_done_callback(lambda t: t.cancelled() or t.exception())


def _track_receives(conn: asyncssh.SSHServerConnection, owner: Connection) -> None:
    """Note every receive's time (the start-up limits drop the idlest login first) and
    re-arm TCP_QUICKACK after it (the kernel clears it), which removes the delayed-ACK
    stalls of the key exchange with OpenSSH clients."""
    sock = conn.get_extra_info("socket")
    quickack = sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6)
    received = conn.data_received

    def data_received(data: bytes, datatype: object = None) -> None:
        owner.last_active = time.monotonic()
        if quickack:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
        received(data, datatype)

    conn.data_received = data_received


def _warn_of_a_short_backlog(wanted: int) -> None:
    """Say so if the kernel holds fewer connections waiting to be accepted than `wanted`:
    past that, a burst's further logins wait for their client's SYN retry (1 s, then 3)."""
    try:
        cap = int(SOMAXCONN.read_text())
    except (OSError, ValueError):
        return
    if cap < wanted:
        log.info(
            "SSH: the kernel holds at most %d connections waiting to be accepted "
            "(net.core.somaxconn), fewer than the %d the gateway asked for; a larger burst of "
            "logins is slowed by a second, not refused",
            cap,
            wanted,
        )
