"""Abuse limits: start-up limits on logins in progress, failed-login blocking per source,
connections per user and channels per connection.

The first two count by *source* (see `peers.identify`): a local user, an IPv4 address
or an IPv6 /64. Neither ever refuses a valid token: failed logins only slow down
unknown tokens, and the start-up limits make room for a new connection by dropping the
idlest login in progress of the source that holds the most. The last two do refuse a
valid token, with a message: a user holding `max_connections_per_user` connections gets
no more, and a connection holding `max_channels` channels opens no more.
"""

from __future__ import annotations

import logging
import os
import random
import resource
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Protocol

log = logging.getLogger(__name__)

MAX_TRACKED = 4096
BITE_LOG_INTERVAL = 10.0  # at most one log line about the start-up limits this often
ENV_PREFIX = "JUPYTER_SANDBOX_SSH_"
SYSTEM_CONNECTIONS_PER_USER = 64  # the system service's default: one student's share


@dataclass(frozen=True)
class MaxStartups:
    """sshd's MaxStartups ``start:rate:full``: past `start` logins in progress, each new
    connection makes the limit bite with probability `rate` percent, rising linearly to
    100 at `full`."""

    start: int
    rate: int
    full: int

    @classmethod
    def parse(cls, text: str) -> MaxStartups:
        """``"start:rate:full"``, or one number for a hard limit with no early drop."""
        try:
            numbers = [int(part) for part in text.split(":")]
        except ValueError:
            numbers = []
        if len(numbers) == 1:
            numbers = [numbers[0], 100, numbers[0]]
        if len(numbers) != 3:
            raise ValueError(f"expected start:rate:full (like 10:30:100), not {text!r}")
        start, rate, full = numbers
        if not (1 <= start <= full and 0 <= rate <= 100):
            raise ValueError(f"need 1 <= start <= full and 0 <= rate <= 100 in {text!r}")
        return cls(start, rate, full)

    def __str__(self) -> str:
        return f"{self.start}:{self.rate}:{self.full}"

    def bites(self, pending: int, draw: Callable[[], float] = random.random) -> bool:
        """Does one more connection, with `pending` logins already in progress, bite?"""
        if pending < self.start:
            return False
        if pending >= self.full:
            return True
        percent = self.rate + (100 - self.rate) * (pending - self.start) / (self.full - self.start)
        return draw() * 100 < percent


@dataclass(frozen=True)
class GatewayLimits:
    """Abuse and liveness settings of the gateway."""

    max_failures: int = 10  # failed logins from one source within failure_window ...
    failure_window: float = 60.0
    block_time: float = 300.0  # ... make its unknown tokens wait blocked_delay, this long
    blocked_delay: float = 2.0
    # Logins in progress. A class of 150 logging in at the same instant from one machine
    # must fit under `start` of both, with room to spare.
    per_source_startups: MaxStartups = MaxStartups(200, 30, 400)
    startups: MaxStartups = MaxStartups(400, 30, 1000)
    login_timeout: float = 20.0  # from the TCP accept, before the version banner too
    keepalive_interval: float = 30.0
    keepalive_count_max: int = 3
    # Open channels (sessions, forwards) of one connection, and connections logged in (or
    # logging in with a valid token) per user: the token's issuer, in every worker. None:
    # no cap, the default of a per-user service, whose every token is its owner's.
    max_channels: int = 64
    max_connections_per_user: int | None = None

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] = os.environ, *, system: bool = False
    ) -> GatewayLimits:
        """Defaults (with `system`, those of the system service: 64 connections per user),
        overridden by ``JUPYTER_SANDBOX_SSH_MAX_FAILURES``, ``_MAX_STARTUPS``,
        ``_PER_SOURCE_MAX_STARTUPS`` (both ``start:rate:full``), ``_LOGIN_TIMEOUT``,
        ``_MAX_CHANNELS`` and ``_MAX_CONNECTIONS_PER_USER``."""
        limits = cls(max_connections_per_user=SYSTEM_CONNECTIONS_PER_USER if system else None)
        settings = {
            "max_failures": ("MAX_FAILURES", int),
            "startups": ("MAX_STARTUPS", MaxStartups.parse),
            "per_source_startups": ("PER_SOURCE_MAX_STARTUPS", MaxStartups.parse),
            "login_timeout": ("LOGIN_TIMEOUT", float),
            "max_channels": ("MAX_CHANNELS", _at_least_one),
            "max_connections_per_user": ("MAX_CONNECTIONS_PER_USER", _at_least_one),
        }
        for name, (suffix, parse) in settings.items():
            text = environ.get(ENV_PREFIX + suffix)
            if text:
                try:
                    limits = replace(limits, **{name: parse(text)})
                except ValueError as e:
                    raise ValueError(f"{ENV_PREFIX}{suffix}: {e}") from None
        return limits

    def within_fd_limit(self) -> GatewayLimits:
        """These limits, with logins in progress held to half the process's fd limit."""
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        budget = soft // 2 if soft != resource.RLIM_INFINITY else self.startups.full
        if self.startups.full <= budget:
            return self
        log.warning("SSH start-up limit %s lowered to fit the fd limit of %d", self.startups, soft)

        def fit(startups: MaxStartups) -> MaxStartups:
            full = min(startups.full, budget)
            return MaxStartups(min(startups.start, full), startups.rate, full)

        return replace(
            self, startups=fit(self.startups), per_source_startups=fit(self.per_source_startups)
        )


def _at_least_one(text: str) -> int:
    try:
        number = int(text)
    except ValueError:
        number = 0
    if number < 1:
        raise ValueError(f"expected a whole number, 1 or more, not {text!r}")
    return number


class Pending(Protocol):
    """A connection still logging in."""

    source: str
    last_active: float  # monotonic time of its last received byte (or its accept)

    def abort(self) -> None: ...


class StartupLimiter:
    """Logins in progress per source and in total; makes room when a limit bites.

    Unlike sshd, which drops the new connection, this drops the idlest login in
    progress: of the new connection's own source when its per-source limit bites,
    else of the source holding the most. A fresh, fast handshake always gets its
    chance, and a flood only ever displaces its own connections.
    """

    def __init__(
        self,
        limits: GatewayLimits,
        draw: Callable[[], float] = random.random,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limits = limits
        self.draw = draw
        self.clock = clock
        self.by_source: dict[str, set[Pending]] = {}
        self.total = 0
        self._bites = 0
        self._bites_logged_at: float | None = None

    def admit(self, conn: Pending) -> Pending | None:
        """Count `conn` in; the connection to drop to make room for it, if any."""
        mine = self.by_source.get(conn.source, ())
        if self.limits.per_source_startups.bites(len(mine), self.draw):
            victim = _idlest(mine)
        elif self.limits.startups.bites(self.total, self.draw):
            victim = _idlest(max(self.by_source.values(), key=len))
        else:
            victim = None
        if victim is not None:
            self.remove(victim)
        self.by_source.setdefault(conn.source, set()).add(conn)
        self.total += 1
        if victim is not None:
            self._bitten(victim)
        return victim

    def remove(self, conn: Pending) -> None:
        """`conn` logged in or went away."""
        pending = self.by_source.get(conn.source)
        if pending is None or conn not in pending:
            return
        pending.discard(conn)
        self.total -= 1
        if not pending:
            del self.by_source[conn.source]

    def _bitten(self, victim: Pending) -> None:
        """Log the first bite at once, later ones as a count at most every interval."""
        self._bites += 1
        now = self.clock()
        if self._bites_logged_at is not None and now - self._bites_logged_at < BITE_LOG_INTERVAL:
            return
        log.warning(
            "SSH start-up limit: dropped %d idle login(s) in progress, the last from %s "
            "(%d in progress from it, %d in all; limits %sPER_SOURCE_MAX_STARTUPS=%s, "
            "%sMAX_STARTUPS=%s)",
            self._bites,
            victim.source,
            len(self.by_source.get(victim.source, ())),
            self.total,
            ENV_PREFIX,
            self.limits.per_source_startups,
            ENV_PREFIX,
            self.limits.startups,
        )
        self._bites = 0
        self._bites_logged_at = now


def _idlest(pending: Iterable[Pending]) -> Pending | None:
    return min(pending, key=lambda conn: conn.last_active, default=None)


class FailedLogins:
    """Counts failed logins per source and says which sources are blocked."""

    def __init__(self, limits: GatewayLimits, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self.clock = clock
        self.failures: dict[str, deque[float]] = {}
        self.blocked_until: dict[str, float] = {}

    def record(self, source: str) -> None:
        """One more failed login from `source`; block it once over the limit."""
        now = self.clock()
        if len(self.failures) >= MAX_TRACKED:
            self._forget_stale(now)
        times = self.failures.setdefault(source, deque())
        times.append(now)
        self._expire(times, now)
        if len(times) >= self.limits.max_failures:
            if source not in self.blocked_until:
                log.warning("SSH: %d failed logins from %s, slowing it down", len(times), source)
            self.blocked_until[source] = now + self.limits.block_time
            times.clear()

    def blocked(self, source: str) -> bool:
        until = self.blocked_until.get(source)
        if until is None:
            return False
        if self.clock() < until:
            return True
        del self.blocked_until[source]
        return False

    def _expire(self, times: deque[float], now: float) -> None:
        while times and times[0] <= now - self.limits.failure_window:
            times.popleft()

    def _forget_stale(self, now: float) -> None:
        for source, times in list(self.failures.items()):
            self._expire(times, now)
            if not times:
                del self.failures[source]
        for source, until in list(self.blocked_until.items()):
            if until <= now:
                del self.blocked_until[source]


class ConnectionsPerUser:
    """Connections each user holds (logged in, or logging in with a valid token)."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.by_user: dict[str, set[Hashable]] = {}
        self.user_of: dict[Hashable, str] = {}

    def reserve(self, conn: Hashable, user: str) -> bool:
        """Count `conn` against `user`, unless `user` holds `limit` connections already."""
        if self.user_of.get(conn) == user:
            return True
        self.release(conn)
        held = self.by_user.setdefault(user, set())
        if self.limit is not None and len(held) >= self.limit:
            if not held:
                del self.by_user[user]
            return False
        held.add(conn)
        self.user_of[conn] = user
        return True

    def release(self, conn: Hashable) -> None:
        """`conn` ended (nothing happens if it was not counted)."""
        user = self.user_of.pop(conn, None)
        if user is None:
            return
        held = self.by_user[user]
        held.discard(conn)
        if not held:
            del self.by_user[user]

    def count(self, user: str) -> int:
        return len(self.by_user.get(user, ()))


class Ledger(Protocol):
    """Where a gateway counts failed logins and logins in progress, and tells of the
    sessions it serves: `LocalLedger` in its own process, or the service's one for
    gateway workers (``ssh.workers``), so the limits hold for all workers together."""

    async def failed(self, source: str) -> bool:
        """Count a failed login of `source`; was `source` blocked before it?"""

    def admit(self, conn: Pending) -> None:
        """Count a login in progress in; a limit that bites aborts the idlest one."""

    def remove(self, conn: Pending) -> None:
        """A login in progress logged in or went away."""

    def opened(self, conn: Pending, sandbox_id: str) -> None:
        """A login completed: its connection serves `sandbox_id` now."""

    def closed(self, conn: Pending) -> None:
        """A connection that `opened` ended."""

    async def reserve(self, conn: Pending, user: str) -> int | None:
        """Count a connection with a valid token against its `user`; if that user holds
        the most connections one may already, it is not counted: that limit, else None."""

    def release(self, conn: Pending) -> None:
        """A connection that `reserve` counted ended."""


class LocalLedger:
    """The `Ledger` of a gateway that serves every connection in its own process."""

    def __init__(self, limits: GatewayLimits) -> None:
        self.failures = FailedLogins(limits)
        self.startups = StartupLimiter(limits)
        self.users = ConnectionsPerUser(limits.max_connections_per_user)

    async def failed(self, source: str) -> bool:
        blocked = self.failures.blocked(source)
        self.failures.record(source)
        return blocked

    def admit(self, conn: Pending) -> None:
        victim = self.startups.admit(conn)
        if victim is not None:
            victim.abort()

    def remove(self, conn: Pending) -> None:
        self.startups.remove(conn)

    def opened(self, conn: Pending, sandbox_id: str) -> None:
        """Sessions need no bookkeeping beyond the gateway's own in one process."""

    def closed(self, conn: Pending) -> None:
        """See `opened`."""

    async def reserve(self, conn: Pending, user: str) -> int | None:
        return None if self.users.reserve(conn, user) else self.users.limit

    def release(self, conn: Pending) -> None:
        self.users.release(conn)
