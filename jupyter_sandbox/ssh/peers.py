"""Who is connecting: the source that abuse limits count by.

A remote peer is its IPv4 address or its IPv6 /64 (one host usually holds a
whole /64). A local peer (loopback, or the host's own address) is its user:
every local user shares 127.0.0.0/8 and ::1, where the Jupyter tunnel comes
from too, and any of them can pick any of those addresses. The user is the
owner of the client's socket, asked of the kernel by the connection's exact
address pair (sock_diag netlink: one socket, constant time, whatever the size
of the socket table); it is looked up for every connection, so a reused port
never names a previous owner. A client socket that is gone or owned by no
process (closed: TIME_WAIT, an orphan) names nobody: `GONE`.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import socket
import struct
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


def source_of(peer: tuple, local: tuple) -> str | _Gone:
    """``"local uid N"``, `UNKNOWN_LOCAL` or `GONE` for a local peer, else ``"A.B.C.D"``
    or ``"X:Y:Z:W::/64"``; `Unavailable` for a local peer where sock_diag is missing."""
    peer_ip, local_ip = plain(peer[0]), plain(local[0])
    if peer_ip.is_loopback or peer_ip == local_ip:
        return _local_source(local_peer_uid(peer_ip, peer[1], local_ip, local[1]))
    if peer_ip.version == 6:
        return str(ipaddress.IPv6Network((peer_ip, IPV6_NETWORK), strict=False))
    return str(peer_ip)


class ProcReader:
    """`source_of` local peers from /proc/net, where sock_diag is missing: whole tables are
    read in a thread, one at a time, each within PROC_TIMEOUT, with at most PROC_QUEUE
    waiting; `UNKNOWN_LOCAL` past those bounds, so a flood cannot stall or pile up reads."""

    def __init__(self) -> None:
        self._one_at_a_time = asyncio.Lock()
        self._waiting = 0

    async def source_of(self, peer: tuple, local: tuple) -> str | _Gone:
        if self._waiting >= PROC_QUEUE:
            return UNKNOWN_LOCAL
        self._waiting += 1
        try:
            async with self._one_at_a_time:
                read = asyncio.to_thread(
                    proc_net_uid, plain(peer[0]), peer[1], plain(local[0]), local[1]
                )
                return _local_source(await asyncio.wait_for(read, PROC_TIMEOUT))
        except (TimeoutError, OSError):
            return UNKNOWN_LOCAL
        finally:
            self._waiting -= 1


def _local_source(uid: int | _Gone | None) -> str | _Gone:
    if uid is GONE:
        return GONE
    return UNKNOWN_LOCAL if uid is None else f"local uid {uid}"


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
