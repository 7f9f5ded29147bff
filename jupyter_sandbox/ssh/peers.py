"""Who is connecting: the source that abuse limits count by, and the local user.

A remote peer is its IPv4 address or its IPv6 /64 (one host usually holds a
whole /64). A local peer is its user: every local user shares 127.0.0.0/8 and
::1, where the Jupyter tunnel comes from too, and any of them can pick any of
those addresses, or bind one of the host's own addresses (its LAN address,
IPv4 or IPv6) and connect to loopback with it. So every connection is looked
up in the kernel's socket table by its exact address pair (sock_diag netlink:
one socket, constant time, whatever the size of the socket table): a client
socket found there is on this host, whatever its address, and its owner is
the local user. The lookup is made for every connection, so a reused port
never names a previous owner. A loopback or host-address client whose socket
is gone or owned by no process (closed: TIME_WAIT, an orphan) names nobody:
`GONE`; one the kernel could not be asked about is `UNKNOWN`.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import socket
import struct
import time
from dataclasses import dataclass
from pathlib import Path

PROC_NET = Path("/proc/net")
UID_FIELD = 7  # sl local_address rem_address st tx:rx tr:when retrnsmt uid ...
INODE_FIELD = 9
IPV6_NETWORK = 64
UNKNOWN_LOCAL = "local unknown"  # a local peer whose owner could not be asked
PROC_TIMEOUT = 1.0  # the fallback read of /proc/net, in a thread
PROC_QUEUE = 32  # fallback reads waiting their turn
NETLINK_TIMEOUT = 0.05  # the kernel answers while sending; this only bounds a surprise

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST = 1
NLMSG_ERROR = 2
INET_DIAG_NOCOOKIE = 0xFFFFFFFF
NETLINK_ROUTE = 0
RTM_NEWADDR, RTM_GETADDR = 20, 22
NLM_F_DUMP = 0x300
NLMSG_DONE = 3
IFA_ADDRESS, IFA_LOCAL = 1, 2
IFADDR = struct.Struct("=BBBBI")  # family, prefix length, flags, scope, interface
RTATTR = struct.Struct("=HH")  # length, type
HOST_ADDRESSES_TTL = 1.0  # seconds a reading of the host's addresses is used
ALL_STATES = 0xFFFFFFFF
NLMSG_HEADER = struct.Struct("=IHHII")  # length, type, flags, sequence, port id
DIAG_REQUEST = struct.Struct("=BBBBI")  # family, protocol, extensions, pad, states
DIAG_SOCKID = struct.Struct(">HH16s16s")  # source port, destination port, addresses
DIAG_SOCKID_TAIL = struct.Struct("=III")  # interface, cookie
DIAG_REPLY = struct.Struct("=BBBB48xIIIII")  # family, state, ..., uid, inode

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class _Gone:
    def __repr__(self) -> str:
        return "GONE"


GONE = _Gone()  # the client's socket no longer exists or belongs to no process


class Unavailable(OSError):
    """The kernel cannot be asked by sock_diag here."""


@dataclass(frozen=True)
class Peer:
    """Whom a connection comes from."""

    source: str  # what abuse limits count it against
    local: bool = False  # a client on this host
    uid: int | None = None  # a local client's user; None if the kernel could not say


UNKNOWN = Peer(UNKNOWN_LOCAL, local=True)


def identify(peer: tuple, local: tuple) -> Peer | _Gone:
    """The `Peer` behind a connection's (peer, local) socket addresses, `GONE` for a local
    client that is gone; `Unavailable` for a loopback or host-address peer where
    sock_diag is missing."""
    peer_ip, local_ip = plain(peer[0]), plain(local[0])
    on_host = peer_ip.is_loopback or peer_ip == local_ip or peer_ip in host_addresses()
    try:
        uid = local_peer_uid(peer_ip, peer[1], local_ip, local[1])
    except Unavailable:
        if on_host:
            raise
        uid = GONE  # not the host's address: where a socket can be looked up, it is not here
    if isinstance(uid, int):
        return local_peer(uid)
    if on_host:
        return GONE if uid is GONE else UNKNOWN
    if peer_ip.version == 6:
        return Peer(str(ipaddress.IPv6Network((peer_ip, IPV6_NETWORK), strict=False)))
    return Peer(str(peer_ip))


def local_peer(uid: int) -> Peer:
    return Peer(f"local uid {uid}", local=True, uid=uid)


class ProcReader:
    """`identify` local peers from /proc/net, where sock_diag is missing: whole tables are
    read in a thread, one at a time, each within PROC_TIMEOUT, with at most PROC_QUEUE
    waiting; `UNKNOWN` past those bounds, so a flood cannot stall or pile up reads."""

    def __init__(self) -> None:
        self._one_at_a_time = asyncio.Lock()
        self._waiting = 0

    async def identify(self, peer: tuple, local: tuple) -> Peer | _Gone:
        if self._waiting >= PROC_QUEUE:
            return UNKNOWN
        self._waiting += 1
        try:
            async with self._one_at_a_time:
                read = asyncio.to_thread(
                    proc_net_uid, plain(peer[0]), peer[1], plain(local[0]), local[1]
                )
                return _local_source(await asyncio.wait_for(read, PROC_TIMEOUT))
        except (TimeoutError, OSError):
            return UNKNOWN
        finally:
            self._waiting -= 1


def _local_source(uid: int | _Gone | None) -> Peer | _Gone:
    if uid is GONE:
        return GONE
    return UNKNOWN if uid is None else local_peer(uid)


def local_peer_uid(
    peer: Address, peer_port: int, local: Address, local_port: int
) -> int | _Gone | None:
    """The uid owning the client end of a loopback TCP connection, `GONE` if it has no
    owner any more, None if the kernel did not say; `Unavailable` without sock_diag."""
    family = socket.AF_INET if peer.version == 4 and local.version == 4 else socket.AF_INET6
    if family == socket.AF_INET6:
        peer, local = _as_v6(peer), _as_v6(local)
    sockid = DIAG_SOCKID.pack(peer_port, local_port, peer.packed, local.packed)
    request = (
        DIAG_REQUEST.pack(family, socket.IPPROTO_TCP, 0, 0, ALL_STATES)
        + sockid
        + DIAG_SOCKID_TAIL.pack(0, INET_DIAG_NOCOOKIE, INET_DIAG_NOCOOKIE)
    )
    header = NLMSG_HEADER.pack(
        NLMSG_HEADER.size + len(request), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST, 1, 0
    )
    try:
        diag = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG)
    except (OSError, AttributeError) as e:
        raise Unavailable(str(e)) from None
    with diag:
        diag.settimeout(NETLINK_TIMEOUT)
        try:
            diag.send(header + request)
            reply = diag.recv(8192)
        except TimeoutError:
            return None
        except OSError as e:
            raise Unavailable(str(e)) from None
    return _owner(reply)


def _owner(reply: bytes) -> int | _Gone | None:
    if len(reply) < NLMSG_HEADER.size:
        return None
    _, kind, _, _, _ = NLMSG_HEADER.unpack_from(reply)
    if kind == NLMSG_ERROR:
        (error,) = struct.unpack_from("=i", reply, NLMSG_HEADER.size)
        if -error == errno.ENOENT:
            return GONE
        if -error in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise Unavailable(errno.errorcode.get(-error, str(error)))
        return None
    if kind != SOCK_DIAG_BY_FAMILY or len(reply) < NLMSG_HEADER.size + DIAG_REPLY.size:
        return None
    *_, uid, inode = DIAG_REPLY.unpack_from(reply, NLMSG_HEADER.size)
    return uid if inode else GONE


def host_addresses() -> frozenset[Address]:
    """The addresses of this host's interfaces (rtnetlink), read at most once a second; an
    empty set where the kernel cannot be asked (loopback and the connection's own local
    address still count as the host's)."""
    now = time.monotonic()
    if now - _host_addresses[0] > HOST_ADDRESSES_TTL:
        try:
            _host_addresses[:] = [now, _read_host_addresses()]
        except OSError:
            _host_addresses[:] = [now, frozenset()]
    return _host_addresses[1]


_host_addresses: list = [float("-inf"), frozenset()]


def _read_host_addresses() -> frozenset[Address]:
    request = NLMSG_HEADER.pack(
        NLMSG_HEADER.size + IFADDR.size, RTM_GETADDR, NLM_F_REQUEST | NLM_F_DUMP, 1, 0
    ) + IFADDR.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
    found: set[Address] = set()
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_ROUTE) as route:
        route.settimeout(NETLINK_TIMEOUT * 10)
        route.send(request)
        while True:
            reply = route.recv(65536)
            at = 0
            while at + NLMSG_HEADER.size <= len(reply):
                length, kind, _, _, _ = NLMSG_HEADER.unpack_from(reply, at)
                if kind in (NLMSG_DONE, NLMSG_ERROR) or length < NLMSG_HEADER.size:
                    return frozenset(found)
                if kind == RTM_NEWADDR:
                    found.update(_addresses(reply[at + NLMSG_HEADER.size : at + length]))
                at += _aligned(length)


def _addresses(message: bytes) -> list[Address]:
    """IFA_LOCAL and IFA_ADDRESS of one RTM_NEWADDR message (they differ on p2p links)."""
    if len(message) < IFADDR.size:
        return []
    family = message[0]
    at, found = IFADDR.size, []
    while at + RTATTR.size <= len(message):
        length, kind = RTATTR.unpack_from(message, at)
        if length < RTATTR.size:
            break
        value = message[at + RTATTR.size : at + length]
        if kind in (IFA_ADDRESS, IFA_LOCAL):
            if family == socket.AF_INET and len(value) == 4:
                found.append(ipaddress.IPv4Address(value))
            elif family == socket.AF_INET6 and len(value) == 16:
                found.append(ipaddress.IPv6Address(value))
        at += _aligned(length)
    return found


def _aligned(length: int) -> int:
    return (length + 3) & ~3


def proc_net_uid(
    peer: Address, peer_port: int, local: Address, local_port: int
) -> int | _Gone | None:
    """`local_peer_uid` from /proc/net/tcp{,6}: reads whole tables, so only where sock_diag
    is missing, and never on the event loop."""
    encodings = [("tcp6", _hex6(_as_v6(peer)), _hex6(_as_v6(local)))]
    if peer.version == 4 and local.version == 4:
        encodings.insert(0, ("tcp", _hex4(peer), _hex4(local)))
    for table, peer_hex, local_hex in encodings:
        needle = f" {peer_hex}:{peer_port:04X} {local_hex}:{local_port:04X} "
        try:
            text = (PROC_NET / table).read_text()
        except OSError:
            continue
        at = text.find(needle)
        if at >= 0:
            fields = text[text.rfind("\n", 0, at) + 1 : text.find("\n", at)].split()
            return int(fields[UID_FIELD]) if int(fields[INODE_FIELD]) else GONE
    return GONE


def plain(host: str) -> Address:
    """The address, with an IPv4-mapped IPv6 one as IPv4."""
    address = ipaddress.ip_address(host.split("%", 1)[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _mapped(address: ipaddress.IPv4Address) -> ipaddress.IPv6Address:
    return ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + address.packed)


def _as_v6(address: Address) -> ipaddress.IPv6Address:
    return _mapped(address) if address.version == 4 else address


def _hex4(address: ipaddress.IPv4Address) -> str:
    """/proc/net/tcp prints the address as one 32-bit word in host byte order."""
    return f"{struct.unpack('=I', address.packed)[0]:08X}"


def _hex6(address: ipaddress.IPv6Address) -> str:
    """/proc/net/tcp6 prints it as four 32-bit words, each in host byte order."""
    return "".join(f"{word:08X}" for word in struct.unpack("=4I", address.packed))
