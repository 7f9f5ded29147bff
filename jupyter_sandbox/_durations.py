"""Parsing of timeouts, TTLs and sizes given by users."""

from __future__ import annotations

import math
import re
from collections.abc import Callable

from ._errors import InvalidRequest

SESSION = "session"
_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|h|m|s)", re.ASCII)
_DURATIONS = re.compile(rf"(?:{_DURATION.pattern}\s*)+", re.ASCII)
_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)", re.IGNORECASE | re.ASCII)
_NUMBER = re.compile(r"\s*\d+(\.\d+)?\s*", re.ASCII)
MAX_BYTES = 1 << 62  # larger than any disk or memory
MAX_SECONDS = 366 * 86400  # the longest duration accepted: a year
DURATION_FORMS = '"session", a number of seconds, or a duration such as "30s", "5m", "1h30m"'


def parse_duration(value: str | float | int) -> float:
    """Seconds in a duration: 30, "30s", "5m", "1h30m", "250ms"."""
    if isinstance(value, bool):
        raise InvalidRequest(f"invalid duration {shown(value)}: expected {DURATION_FORMS}")
    if value == SESSION:  # a timeout, but no duration: a deadline cannot be "session"
        raise InvalidRequest(
            '"session" is not a duration here: give one such as "30s", "5m" or "1h30m" '
            "(a sandbox with a deadline cannot go back to living with its owner)"
        )
    number = isinstance(value, str) and _NUMBER.fullmatch(value)
    if isinstance(value, (int, float)) or number:
        seconds = _float(value)
    elif isinstance(value, str) and _DURATIONS.fullmatch(value.strip()):
        seconds = sum(float(n) * _UNITS[u] for n, u in _DURATION.findall(value))
    else:
        raise InvalidRequest(f"invalid duration {shown(value)}: expected {DURATION_FORMS}")
    if not 0 < seconds <= MAX_SECONDS:
        raise InvalidRequest(
            f"invalid duration {shown(value)}: must be more than 0 and at most a year"
        )
    return seconds


def _float(value: str | float | int) -> float:
    try:
        return float(value)
    except OverflowError:  # an int too large for a float
        return math.inf


def shown(value: object, limit: int = 60) -> str:
    """`value`'s repr for an error message, cut to about `limit` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 5] + "…" + text[-4:]


def parse_timeout(value: str | float | int | None) -> float | None:
    """None for "session" (the sandbox lives with its owner), else seconds."""
    if value is None or value == SESSION:
        return None
    return parse_duration(value)


def parse_size(value: str | int | None) -> int | None:
    """Bytes in a size: 536870912, "512M", "2G", "512MiB"."""
    if value is None:
        return None
    match = _SIZE.fullmatch(value.strip()) if isinstance(value, str) else None
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    elif match:
        number, unit = float(match.group(1)), match.group(2).lower()
        size = number * 1024 ** "_kmgt".index(unit or "_")
    else:
        raise InvalidRequest(
            f'invalid size {shown(value)}: expected bytes or a size such as "512M", "2G"'
        )
    if not size < MAX_BYTES:
        raise InvalidRequest(f"invalid size {shown(value)}: larger than any disk or memory")
    size = int(size)
    if size < 4 * 1024 * 1024:
        raise InvalidRequest(f"invalid size {shown(value)}: at least 4M is needed to run anything")
    return size


def format_duration(seconds: float) -> str:
    """A short human form: 1h05m, 4m30s, 12s."""
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def format_span(seconds: float) -> str:
    """A duration as it can be typed back, rounded down: "8h", "1h30m", "5m", "45s"."""
    hours, rest = divmod(max(0, int(seconds)), 3600)
    minutes, secs = divmod(rest, 60)
    parts = (f"{value}{unit}" for value, unit in ((hours, "h"), (minutes, "m"), (secs, "s")))
    return "".join(part for part in parts if not part.startswith("0")) or "0s"


def format_relative(seconds: float) -> str:
    """A time difference from now in words: "in 4 min", "3 s ago", "in 1 h 5 min"."""
    return f"in {_span(seconds)}" if seconds >= 0 else f"{_span(-seconds)} ago"


def _span(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    minutes = round(seconds / 60)
    if minutes < 60:
        return f"{minutes} min"
    hours = round(seconds / 3600)
    if minutes < 24 * 60:
        hours, minutes = divmod(minutes, 60)
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours} h" if hours else f"{days} d"


def format_size(size: float) -> str:
    """Bytes in binary units: "1 GiB", "256 MiB", "1.5 KiB"; exact below 1 KiB: "9 bytes"."""
    return _in_units(size, lambda value: value)


def format_size_down(size: float) -> str:
    """`size` as format_size gives it but rounded down to a tenth, so that it fits: asking
    for "at most 23.4 GiB" of a 23.45 GiB host is then accepted."""
    return _in_units(size, lambda value: math.floor(value * 10) / 10)


def _in_units(size: float, tenth: Callable[[float], float]) -> str:
    for power, unit in ((4, "TiB"), (3, "GiB"), (2, "MiB"), (1, "KiB")):
        value = size / 1024**power
        if value >= 1:
            value = tenth(value)
            return f"{value:.0f} {unit}" if value == int(value) else f"{value:.1f} {unit}"
    count = int(size)
    return "1 byte" if count == 1 else f"{count} bytes"
