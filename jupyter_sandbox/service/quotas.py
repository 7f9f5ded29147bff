"""Quotas: how many sandboxes, how much memory, CPU, pids and lifetime each OS user may hold.

They come from the ``[quota.*]`` tables of the service's config file::

    [quota.default]            # every user
    sandboxes = 3              # at once (running + failed)
    memory = "4G"              # total of their sandboxes' memory limits
    cpus = 4                   # total of their cpus limits
    pids = 4096                # total of their pids limits (the kernel's table is shared)
    lifetime = "8h"            # longest deadline from now ("session" is always allowed)

    [quota.group.students]     # members of group "students"
    sandboxes = 2

    [quota.user.alice]         # alice alone
    memory = "8G"

Any key may be "unlimited". Per key, a user's own table wins, then the most generous of
the tables of the user's groups, then the default table; a key no table sets is
unlimited.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._durations import (
    MAX_BYTES,
    format_size,
    format_size_down,
    format_span,
    parse_duration,
    parse_size,
)
from .._errors import InvalidRequest, QuotaExceeded
from .config_file import ConfigError
from .limits import MIN_MEMORY

UNLIMITED = "unlimited"
# The keys `usage` reports (the shape clients were built to). A table may also set pids,
# which is enforced, and whose refusal says what is left.
KEYS = ("sandboxes", "memory", "cpus", "lifetime")
# What each key accepts, for the message about a bad value.
ALLOWED = {
    "sandboxes": 'a whole number of sandboxes at once, such as 3, or "unlimited"',
    "memory": 'a size such as "4G" or "512M" (or bytes), or "unlimited"',
    "cpus": 'a number of CPUs such as 4 or 0.5, or "unlimited"',
    "pids": 'a whole number of processes and threads, such as 4096, or "unlimited"',
    "lifetime": 'a duration such as "8h", "90m" or "1h30m" (or seconds), or "unlimited"',
}


class QuotaConfigError(ConfigError):
    """A ``[quota.*]`` table of the config file is malformed; the message says where."""


def _sandboxes(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError
    return value


def _memory(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError
    size = parse_size(value)
    if size is None or size >= MAX_BYTES:
        raise ValueError
    return size


def _cpus(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError
    if not 0 < value < math.inf:
        raise ValueError
    return float(value)


def _lifetime(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError
    return parse_duration(value)


PARSERS: dict[str, Callable[[Any], float]] = {
    "sandboxes": _sandboxes,
    "memory": _memory,
    "cpus": _cpus,
    "pids": _sandboxes,  # a whole number, like a count of sandboxes
    "lifetime": _lifetime,
}


def _table(name: str, table: Any, path: Path | None) -> dict[str, float]:
    """The limits of one ``[quota...]`` table; math.inf for "unlimited"."""
    where = f"{path}: [{name}]" if path else f"[{name}]"
    if not isinstance(table, Mapping):
        raise QuotaConfigError(f"{where} must be a table of {', '.join(PARSERS)}")
    limits = {}
    for key, value in table.items():
        if key not in PARSERS:
            raise QuotaConfigError(
                f"{where}: unknown key {key!r}; a quota table takes {', '.join(PARSERS)}"
            )
        if value == UNLIMITED:
            limits[key] = math.inf
            continue
        try:
            limits[key] = PARSERS[key](value)
        except (ValueError, InvalidRequest):
            raise QuotaConfigError(
                f"{where}: {key} = {_toml(value)} is not valid: expected {ALLOWED[key]}"
            ) from None
    return limits


def _toml(value: Any) -> str:
    text = f'"{value}"' if isinstance(value, str) else str(value).lower()
    return text if len(text) <= 60 else text[:55] + "…"


def _named_tables(kind: str, tables: Any, path: Path | None) -> dict[str, dict[str, float]]:
    if not isinstance(tables, Mapping):
        where = f"{path}: " if path else ""
        raise QuotaConfigError(
            f"{where}[quota.{kind}] must hold tables named after each {kind}, "
            f"such as [quota.{kind}.{'students' if kind == 'group' else 'alice'}]"
        )
    return {name: _table(f"quota.{kind}.{name}", table, path) for name, table in tables.items()}


@dataclass(frozen=True)
class Limit:
    """One key of a user's quota: its value (None: unlimited) and which table set it."""

    value: float | None
    source: str  # 'group "students"', "the quota set for alice", "the default quota"; "": none


@dataclass(frozen=True)
class Quota:
    """The quota of one user, resolved from the tables."""

    user: str
    limits: dict[str, Limit]
    advice: str  # how to get more: whom to ask and where the file is

    def value(self, key: str) -> float | None:
        return self.limits[key].value

    def as_json(self) -> dict[str, float | int | None]:
        """Each key's value (bytes, CPUs, seconds), None for unlimited."""
        data: dict[str, float | int | None] = {}
        for key in KEYS:
            value = self.value(key)
            if value is None:
                data[key] = None
            elif key in ("sandboxes", "memory"):
                data[key] = int(value)
            else:
                data[key] = float(value)
        return data

    def sources(self) -> dict[str, str | None]:
        """Which table sets each key ('group "students"'), None where nothing does."""
        return {key: self.limits[key].source or None for key in KEYS}


@dataclass(frozen=True)
class Use:
    """What a user holds now: sandboxes (running and failed), their memory, CPUs and pids."""

    sandboxes: int = 0
    memory: int = 0
    cpus: float = 0.0
    pids: int = 0

    @classmethod
    def of(cls, limits: Iterable[Mapping[str, Any]]) -> Use:
        """The use of sandboxes with these limits (memory in bytes, cpus, pids)."""
        held = list(limits)
        return cls(
            sandboxes=len(held),
            memory=sum(int(lim.get("memory") or 0) for lim in held),
            cpus=round(sum(float(lim.get("cpus") or 0.0) for lim in held), 6),
            pids=sum(int(lim.get("pids") or 0) for lim in held),
        )

    def as_json(self) -> dict[str, float | int]:
        return {"sandboxes": self.sandboxes, "memory": self.memory, "cpus": self.cpus}


@dataclass(frozen=True)
class Quotas:
    """The quota tables of a config file; no tables at all means no quotas."""

    default: dict[str, float] = field(default_factory=dict)
    groups: dict[str, dict[str, float]] = field(default_factory=dict)
    users: dict[str, dict[str, float]] = field(default_factory=dict)
    path: Path | None = None
    administered: bool = False  # True in system mode: an administrator sets them

    @classmethod
    def parse(
        cls, config: Mapping[str, Any], path: Path | None = None, administered: bool = False
    ) -> Quotas:
        """The ``quota`` table of a parsed config file; QuotaConfigError if it is malformed."""
        quota = config.get("quota", {})
        where = f"{path}: " if path else ""
        if not isinstance(quota, Mapping):
            raise QuotaConfigError(f"{where}quota must be a table ([quota.default] and others)")
        unknown = set(quota) - {"default", "group", "user"}
        if unknown:
            raise QuotaConfigError(
                f"{where}unknown table [quota.{sorted(unknown)[0]}]: quota tables are "
                "[quota.default], [quota.group.<group>] and [quota.user.<user>]"
            )
        return cls(
            default=_table("quota.default", quota.get("default", {}), path),
            groups=_named_tables("group", quota.get("group", {}), path),
            users=_named_tables("user", quota.get("user", {}), path),
            path=path,
            administered=administered,
        )

    @property
    def empty(self) -> bool:
        return not (self.default or self.groups or self.users)

    def advice(self) -> str:
        """Where more can be had, to end a quota message with."""
        where = self.path or "the service's config file"
        if self.administered:
            return f"ask an administrator to raise {{key}} in {where}"
        return (
            f"raise {{key}} in {where} and reload the service "
            "(kill -HUP the pid jupyter-sandbox status shows)"
        )

    def of(self, user: str, groups: Iterable[str]) -> Quota:
        """The quota of `user`, a member of `groups`."""
        groups = sorted(set(groups))
        limits = {}
        for key in PARSERS:
            own = self.users.get(user, {}).get(key)
            granted = [(self.groups[g][key], g) for g in groups if key in self.groups.get(g, {})]
            if own is not None:
                limit = Limit(own, f"the quota set for {user}")
            elif granted:
                value, group = max(granted, key=lambda pair: pair[0])
                limit = Limit(value, f'group "{group}"')
            elif key in self.default:
                limit = Limit(self.default[key], "the default quota")
            else:
                limit = Limit(math.inf, "")
            limits[key] = Limit(None if limit.value == math.inf else limit.value, limit.source)
        return Quota(user, limits, self.advice())


# -- checks -----------------------------------------------------------------------------------


def _message(quota: Quota, key: str, may: str, has: str, todo: str) -> str:
    source = quota.limits[key].source
    advice = quota.advice.format(key=f'"{key}"')
    return f"quota exceeded: user {quota.user} may {may} ({source}), {has}. {todo} or {advice}."


def _cpus_text(cpus: float) -> str:
    return f"{cpus:g} CPU" + ("" if cpus == 1 else "s")


KILL_ONE = "Kill one (jupyter-sandbox kill ID)"


def check_create(
    quota: Quota, use: Use, memory: int, cpus: float, lifetime: float | None, pids: int = 0
) -> None:
    """QuotaExceeded unless a sandbox with these limits fits in what `quota` leaves."""
    count = quota.value("sandboxes")
    if count is not None and use.sandboxes + 1 > count:
        raise QuotaExceeded(
            _message(
                quota,
                "sandboxes",
                f"have {count:g} sandbox{'es' * (count != 1)} at once",
                f"and has {use.sandboxes}",
                KILL_ONE,
            )
        )
    total = quota.value("memory")
    if total is not None and use.memory + memory > total:
        left = max(0, int(total) - use.memory)
        ask = (
            f"Ask for at most {format_size_down(left)} of memory, k" if left >= MIN_MEMORY else "K"
        )
        raise QuotaExceeded(
            _message(
                quota,
                "memory",
                f"have {format_size(total)} of memory across their sandboxes at once",
                f"has {format_size(use.memory)} and this sandbox asks for {format_size(memory)}",
                ask + KILL_ONE[1:],
            )
        )
    total = quota.value("cpus")
    if total is not None and use.cpus + cpus > total + 1e-9:
        left = max(0.0, total - use.cpus)
        ask = f"Ask for at most {_cpus_text(round(left, 2))}, k" if left >= 0.01 else "K"
        raise QuotaExceeded(
            _message(
                quota,
                "cpus",
                f"have {_cpus_text(total)} across their sandboxes at once",
                f"has {_cpus_text(use.cpus)} and this sandbox asks for {_cpus_text(cpus)}",
                ask + KILL_ONE[1:],
            )
        )
    total = quota.value("pids")
    if total is not None and use.pids + pids > total:
        left = max(0, int(total) - use.pids)
        raise QuotaExceeded(
            _message(
                quota,
                "pids",
                f"have {total:g} processes and threads across their sandboxes at once",
                f"has {use.pids} and this sandbox asks for {pids}",
                f"Ask for at most pids={left}, k" + KILL_ONE[1:],
            )
        )
    if lifetime is not None:
        check_lifetime(quota, lifetime)


def check_lifetime(quota: Quota, seconds: float, extending: bool = False) -> None:
    """QuotaExceeded if a deadline `seconds` from now is further than `quota` allows."""
    longest = quota.value("lifetime")
    if longest is None or seconds <= longest + 1e-6:
        return
    most = format_span(longest)
    if extending:
        asked = f"and extending this sandbox would end it in {format_span(seconds)}"
        todo = f"Extend it to at most {most} from now (jupyter-sandbox extend ID {most})"
    else:
        asked = f"and this sandbox asks for {format_span(seconds)}"
        todo = (
            f'Ask for at most {most}, use timeout "session" (the sandbox then lives as long '
            "as the notebook or script that made it)"
        )
    raise QuotaExceeded(
        _message(quota, "lifetime", f"give a sandbox at most {most} to live from now", asked, todo)
    )
