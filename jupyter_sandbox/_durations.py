"""Parsing of timeouts, TTLs and sizes given by users."""

from __future__ import annotations

import re

from ._errors import InvalidRequest

SESSION = "session"
_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|h|m|s)")
_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)", re.IGNORECASE)
DURATION_FORMS = '"session", a number of seconds, or a duration such as "30s", "5m", "1h30m"'


def parse_duration(value: str | float | int) -> float:
    """Seconds in a duration: 30, "30s", "5m", "1h30m", "250ms"."""
    if isinstance(value, bool):
        raise InvalidRequest(f"invalid duration {value!r}: expected {DURATION_FORMS}")
    number = isinstance(value, str) and re.fullmatch(r"\s*\d+(\.\d+)?\s*", value)
    if isinstance(value, (int, float)) or number:
        seconds = float(value)
    elif isinstance(value, str) and re.fullmatch(rf"(?:{_DURATION.pattern}\s*)+", value.strip()):
        seconds = sum(float(n) * _UNITS[u] for n, u in _DURATION.findall(value))
    else:
        raise InvalidRequest(f"invalid duration {value!r}: expected {DURATION_FORMS}")
    if not 0 < seconds <= 366 * 86400:
        raise InvalidRequest(f"invalid duration {value!r}: must be more than 0 and at most a year")
    return seconds


def parse_timeout(value: str | float | int | None) -> float | None:
    """None for "session" (the sandbox lives with its owner), else seconds."""
    if value is None or value == SESSION:
        return None
    return parse_duration(value)


def parse_size(value: str | int | None) -> int | None:
    """Bytes in a size: 536870912, "512M", "2G", "512MiB"."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    match = _SIZE.fullmatch(value.strip()) if isinstance(value, str) else None
    if not match:
        raise InvalidRequest(
            f'invalid size {value!r}: expected bytes or a size such as "512M", "2G"'
        )
    number, unit = float(match.group(1)), match.group(2).lower()
    size = int(number * 1024 ** "_kmgt".index(unit or "_"))
    if size < 4 * 1024 * 1024:
        raise InvalidRequest(f"invalid size {value!r}: at least 4M is needed to run anything")
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
