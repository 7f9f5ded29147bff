"""Abuse limits: failed-login rate limiting per source address."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

MAX_TRACKED = 4096


@dataclass
class GatewayLimits:
    """Abuse and liveness settings of the gateway."""

    max_failures: int = 10  # failed logins from one address within failure_window ...
    failure_window: float = 60.0
    block_time: float = 300.0  # ... block that address this long
    max_unauthenticated: int = 64  # connections still logging in, all sources together
    login_timeout: float = 20.0
    keepalive_interval: float = 30.0
    keepalive_count_max: int = 3


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
