"""Who is calling the service: the OS user (or hub user) behind each API request.

Per-user mode: every caller is the service's own user (the socket is 0600, the TCP
API needs the bearer token), never an instructor. System mode: the kernel's
SO_PEERCRED of the Unix-socket connection names the uid; its login name and groups
come from the passwd and group databases, and members of a configured instructor
group (and root) are instructors. Hub mode (`service.hub_auth`): a TCP caller is the
JupyterHub user its token names, with a uid from HUB_UID_BASE up.
"""

from __future__ import annotations

import grp
import os
import pwd
import socket
import struct
import time
from collections.abc import Iterable
from dataclasses import dataclass, replace

# The header with which a trusted front end (the instructor dashboard) names the hub
# user it acts for. It changes how audit lines name the actor, never the rights.
ACTING_FOR_HEADER = "X-Sandbox-Acting-For"
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
_CACHE_SECONDS = 10.0  # how long a uid's name and groups are reused before looked up again
# The uids of JupyterHub users (`serve --hub-auth`): above every OS account, subordinate
# and host-uid range, so a hub user's uid is never an OS user's ((uid_t)-1 is no uid).
HUB_UID_BASE, HUB_UID_LAST = 1 << 31, (1 << 32) - 2


@dataclass(frozen=True)
class Caller:
    """The OS user (or hub user) behind a request."""

    uid: int
    user: str  # login name (pwd), or str(uid) if none; a hub user's hub name
    groups: frozenset[str]  # names of all the user's groups (primary + supplementary)
    instructor: bool  # member of a configured instructor group, or uid 0
    acting_for: str | None = None  # hub user an on-behalf-of request names

    @property
    def actor(self) -> str:
        """How audit lines name this caller: "bob", or "alice (via root)" for a front end
        running as root that acts for hub user alice."""
        return self.user if self.acting_for is None else f"{self.acting_for} (via {self.user})"


def user_name(uid: int) -> str:
    """The login name of `uid`, or the number itself if the passwd database has none."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def group_names(uid: int) -> frozenset[str]:
    """Names of all groups of `uid`: its primary group and every supplementary one.

    A uid without a passwd entry has no groups; a gid without a name is named by number.
    """
    try:
        entry = pwd.getpwuid(uid)
    except KeyError:
        return frozenset()
    names = set()
    for gid in os.getgrouplist(entry.pw_name, entry.pw_gid):
        try:
            names.add(grp.getgrgid(gid).gr_name)
        except KeyError:
            names.add(str(gid))
    return frozenset(names)


def service_caller() -> Caller:
    """The service's own user, as every caller of a per-user service is."""
    uid = os.getuid()
    return Caller(uid=uid, user=user_name(uid), groups=group_names(uid), instructor=False)


def peer_uid(sock: socket.socket) -> int:
    """The uid of the process at the other end of a Unix socket, as of its connect()."""
    data = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    return _UCRED.unpack(data)[1]


class Directory:
    """Callers by uid in system mode, with instructors from the configured groups.

    Names and groups are looked up at most every few seconds per uid, so a burst of
    requests does not read the group database for each one.
    """

    def __init__(self, instructor_groups: Iterable[str] = ()) -> None:
        self.instructor_groups = frozenset(instructor_groups)
        self._cache: dict[int, tuple[float, Caller]] = {}

    def set_instructor_groups(self, groups: Iterable[str]) -> None:
        """Take a new list of instructor groups (a reloaded config file)."""
        self.instructor_groups = frozenset(groups)
        self._cache.clear()

    def caller(self, uid: int) -> Caller:
        now = time.monotonic()
        cached = self._cache.get(uid)
        if cached is not None and now - cached[0] < _CACHE_SECONDS:
            return cached[1]
        groups = group_names(uid)
        caller = Caller(
            uid=uid,
            user=user_name(uid),
            groups=groups,
            instructor=uid == 0 or bool(groups & self.instructor_groups),
        )
        self._cache[uid] = (now, caller)
        return caller


def acting_for(caller: Caller, name: str | None) -> Caller:
    """`caller` naming the hub user it acts for, if it may (root or an instructor)."""
    if not (caller.uid == 0 or caller.instructor):
        return caller
    shown = "".join(c for c in (name or "")[:64] if c.isprintable())
    return replace(caller, acting_for=shown) if shown else caller
