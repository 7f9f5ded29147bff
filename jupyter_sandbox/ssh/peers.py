"""Who is connecting: the source that abuse limits count by.

A remote peer is its IPv4 address or its IPv6 /64 (one host usually holds a
whole /64). A local peer (loopback, or the host's own address) is its user:
every local user shares 127.0.0.0/8 and ::1, where the Jupyter tunnel comes
from too, and any of them can pick any of those addresses. The user is the
owner of the client's socket, found in /proc/net/tcp{,6} by the connection's
address pair; it is looked up for every connection, so a reused port never
names a previous owner.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Iterator
from pathlib import Path

PROC_NET = Path("/proc/net")
UID_FIELD = 7  # sl local_address rem_address st tx:rx tr:when retrnsmt uid ...
IPV6_NETWORK = 64

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def source_of(peer: tuple, local: tuple) -> str:
    """``"local uid N"`` for a local peer, else ``"A.B.C.D"`` or ``"X:Y:Z:W::/64"``."""
    peer_ip, local_ip = _plain(peer[0]), _plain(local[0])
    if peer_ip.is_loopback or peer_ip == local_ip:
        uid = local_peer_uid(peer_ip, peer[1], local_ip, local[1])
        return "local uid ?" if uid is None else f"local uid {uid}"
    if peer_ip.version == 6:
        return str(ipaddress.IPv6Network((peer_ip, IPV6_NETWORK), strict=False))
    return str(peer_ip)


def local_peer_uid(peer: Address, peer_port: int, local: Address, local_port: int) -> int | None:
    """The uid owning the client end of a loopback TCP connection, if it still exists."""
    for table, peer_hex, local_hex in _encodings(peer, local):
        needle = f" {peer_hex}:{peer_port:04X} {local_hex}:{local_port:04X} "
        try:
            text = (PROC_NET / table).read_text()
        except OSError:
            continue
        at = text.find(needle)
        if at >= 0:
            line = text[text.rfind("\n", 0, at) + 1 : text.find("\n", at)]
            return int(line.split()[UID_FIELD])
    return None


def _plain(host: str) -> Address:
    """The address, with an IPv4-mapped IPv6 one as IPv4."""
    address = ipaddress.ip_address(host.split("%", 1)[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _encodings(peer: Address, local: Address) -> Iterator[tuple[str, str, str]]:
    """(table, peer, local) as the kernel prints them: an IPv4 pair may belong to an
    IPv4 socket (tcp) or to an IPv6 one connected to a mapped address (tcp6)."""
    if peer.version == 4 and local.version == 4:
        yield "tcp", _hex4(peer), _hex4(local)
        yield "tcp6", _hex6(_mapped(peer)), _hex6(_mapped(local))
    else:
        yield "tcp6", _hex6(_as_v6(peer)), _hex6(_as_v6(local))


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
