"""Size and shape checks of every frame and result an agent sends to the host.

An agent answers a request with frames (``agent.protocol``): a header of kind and
payload size, then the payload. Here the host decides, before reading a payload,
whether its size is acceptable for its kind and for the operation asked; then
turns RESULT, EXIT and ERROR payloads into canonical values of known keys and
types, or raises a typed error naming what was wrong. Nothing an agent sends
reaches a client, a log or the disk without passing through here.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

from .._errors import (
    DiskFull,
    FileError,
    FileExists,
    FileNotFound,
    InvalidRequest,
    PermissionDenied,
    ProcessNotFound,
    SandboxError,
)
from ..agent.protocol import MAX_FRAME, Frame
from . import names

# RESULT frames, by what they hold (each operation's bound is in OPS).
SMALL_RESULT = 4 << 10  # a few numbers: ping, exec, remove, tar_in, connect
FILE_RESULT = 96 << 10  # one file description (a path of up to names.MAX_PATH)
PROCESS_RESULT = MAX_FRAME + (4 << 10)  # one process, with the command the user ran
LIST_RESULT = 4 << 20  # a listing of at most MAX_ENTRIES, or a list of processes
MAX_ENTRIES = 20_000
MAX_RESULT = LIST_RESULT  # the largest RESULT of any operation
MAX_ERROR = 64 << 10
MAX_EXIT = 4 << 10
MAX_MESSAGE = 2000  # characters of an error message passed on
MAX_PID = 1 << 22  # the kernel's largest pid_max
MAX_SIZE = 1 << 62
MAX_TIME = 1 << 40  # seconds either side of 1970
FILE_TYPES = ("file", "dir", "symlink", "other")
# What an agent may send; never "audit", the stream of the service's own entries.
LOG_STREAMS = ("stdout", "stderr", "event")

# Error kinds an agent may report, and the error each one becomes on the host.
AGENT_ERRORS: dict[str, type[SandboxError]] = {
    "BadRequest": InvalidRequest,
    "InvalidRequest": InvalidRequest,
    "FileNotFound": FileNotFound,
    "FileExists": FileExists,
    "PermissionDenied": PermissionDenied,
    "FileError": FileError,
    "DiskFull": DiskFull,
    "ProcessNotFound": ProcessNotFound,
    "SandboxError": SandboxError,
    "ConnectionLost": SandboxError,
}


class ProtocolViolation(SandboxError):
    """The sandbox's agent sent something the protocol does not allow."""

    status = 502


# -- frames --------------------------------------------------------------------------

_EMPTY = (Frame.END, Frame.EOF, Frame.FD)
_LIMITS = {Frame.ERROR: MAX_ERROR, Frame.EXIT: MAX_EXIT}


def check_header(op: str, kind: int, size: int) -> Frame:
    """The frame kind, if a frame of `kind` and `size` may answer `op`; else raise.

    Called before the payload is read, so an agent cannot make the host read
    (or allocate) more than the limit for that kind of frame.
    """
    allowed = OPS[op].frames if op in OPS else ()
    try:
        frame = Frame(kind)
    except ValueError:
        raise ProtocolViolation(f"the sandbox's agent sent an unknown frame kind {kind}") from None
    if frame not in allowed and frame not in (Frame.RESULT, Frame.ERROR):
        raise ProtocolViolation(f"the sandbox's agent sent an unexpected {frame.name} frame")
    if frame == Frame.RESULT:
        limit = OPS[op].max_result if op in OPS else SMALL_RESULT
    else:
        limit = 0 if frame in _EMPTY else _LIMITS.get(frame, MAX_FRAME)
    if size > limit:
        raise ProtocolViolation(
            f"the sandbox's agent announced a frame of {size} bytes "
            f"({frame.name}, at most {limit} allowed)"
        )
    return frame


def parse_json(payload: bytes, what: str) -> Any:
    """A JSON payload, or ProtocolViolation (bad UTF-8, bad JSON, too deep)."""
    try:
        return json.loads(payload)
    except (ValueError, RecursionError):
        raise ProtocolViolation(f"the sandbox's agent sent a {what} that is not JSON") from None


def agent_error(payload: bytes) -> SandboxError:
    """The typed error an ERROR frame reports (only known kinds, bounded message)."""
    data = _mapping(parse_json(payload, "error"), "error")
    kind, message = data.get("type"), data.get("message")
    if not isinstance(message, str):
        return ProtocolViolation("the sandbox's agent sent an error without a message")
    text = printable(message)
    if kind not in AGENT_ERRORS:
        return SandboxError(f"the sandbox reported an error of an unknown kind: {text}")
    return AGENT_ERRORS[kind](text)


def printable(text: str, limit: int = MAX_MESSAGE) -> str:
    """`text` cut to `limit` characters, control characters escaped (no terminal tricks)."""
    cut = text[:limit]
    clean = "".join(c if c.isprintable() else repr(c)[1:-1] for c in cut)
    return clean + ("…" if len(text) > limit else "")


# -- values --------------------------------------------------------------------------


def _mapping(value: object, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ProtocolViolation(f"the sandbox's agent sent a {what} that is not an object")
    return value


def _bad(what: str, key: str) -> ProtocolViolation:
    return ProtocolViolation(f"the sandbox's agent sent a bad {key!r} in its {what}")


def _integer(data: dict, key: str, low: int, high: int, what: str, optional: bool = False):
    value = data.get(key)
    if value is None and optional:
        return None
    if type(value) is not int or not low <= value <= high:
        raise _bad(what, key)
    return value


def _number(data: dict, key: str, low: float, high: float, what: str) -> float:
    value = data.get(key)
    if type(value) not in (int, float) or not math.isfinite(value) or not low <= value <= high:
        raise _bad(what, key)
    return value


def _text(data: dict, key: str, what: str, limit: int = MAX_FRAME, optional: bool = False):
    value = data.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, str) or len(value) > limit or "\0" in value:
        raise _bad(what, key)
    return value


def _flag(data: dict, key: str, what: str) -> bool:
    value = data.get(key)
    if type(value) is not bool:
        raise _bad(what, key)
    return value


def _choice(data: dict, key: str, choices: tuple[str, ...], what: str) -> str:
    value = data.get(key)
    if value not in choices:
        raise _bad(what, key)
    return value


def _list(data: dict, key: str, item: Callable[[object], dict], what: str) -> list[dict]:
    value = data.get(key)
    if not isinstance(value, list) or len(value) > MAX_ENTRIES:
        raise _bad(what, key)
    return [item(entry) for entry in value]


# -- results -------------------------------------------------------------------------


def file_info(value: object) -> dict[str, Any]:
    """A file's description: name one safe component, type known, numbers sane."""
    what = "file description"
    data = _mapping(value, what)
    path = _text(data, "path", what, names.MAX_PATH)
    name = _text(data, "name", what, names.MAX_NAME)
    if not (name == "/" and path == "/"):
        try:
            names.check_name(name)
        except FileError:
            raise _bad(what, "name") from None
    return {
        "name": name,
        "path": path,
        "type": _choice(data, "type", FILE_TYPES, what),
        "size": _integer(data, "size", 0, MAX_SIZE, what),
        "mode": _integer(data, "mode", 0, 0o177777, what) & 0o7777,
        "mtime": _number(data, "mtime", -MAX_TIME, MAX_TIME, what),
        "target": _text(data, "target", what, names.MAX_LINK, optional=True),
    }


def exit_status(value: object) -> dict[str, Any]:
    """How a command ended: exit code 0-255, signal number or None, timed out or not."""
    what = "exit status"
    data = _mapping(value, what)
    return {
        "exit_code": _integer(data, "exit_code", 0, 255, what),
        "signal": _integer(data, "signal", 1, 127, what, optional=True),
        "timed_out": data.get("timed_out") is True,
    }


def process_info(value: object) -> dict[str, Any]:
    what = "process description"
    data = _mapping(value, what)
    return {
        "pid": _integer(data, "pid", 1, MAX_PID, what),
        "command": _text(data, "command", what),
        "running": _flag(data, "running", what),
        "exit_code": _integer(data, "exit_code", 0, 255, what, optional=True),
        "signal": _integer(data, "signal", 1, 127, what, optional=True),
    }


def log_entry(value: object) -> dict[str, Any]:
    what = "log entry"
    data = _mapping(value, what)
    return {
        "seq": _integer(data, "seq", 0, MAX_SIZE, what),
        "time": _number(data, "time", -MAX_TIME, MAX_TIME, what),
        "source": _text(data, "source", what, 256),
        "stream": _choice(data, "stream", LOG_STREAMS, what),
        "text": _text(data, "text", what),
    }


def _ping(value: object) -> dict[str, Any]:
    what = "ping answer"
    data = _mapping(value, what)
    return {
        "version": _integer(data, "version", 0, 1 << 16, what),
        "pid": _integer(data, "pid", 1, MAX_PID, what),
        "uptime": _number(data, "uptime", 0, MAX_TIME, what),
    }


def _started(value: object) -> dict[str, Any]:
    return {"pid": _integer(_mapping(value, "start answer"), "pid", 1, MAX_PID, "start answer")}


def _listing(value: object) -> dict[str, Any]:
    return {"entries": _list(_mapping(value, "listing"), "entries", file_info, "listing")}


def _processes(value: object) -> dict[str, Any]:
    data = _mapping(value, "process list")
    return {"processes": _list(data, "processes", process_info, "process list")}


def _unpacked(value: object) -> dict[str, Any]:
    what = "unpack answer"
    return {"files": _integer(_mapping(value, what), "files", 0, MAX_SIZE, what)}


def _connected(value: object) -> dict[str, Any]:
    what = "connect answer"
    if _mapping(value, what).get("connected") is not True:
        raise _bad(what, "connected")
    return {"connected": True}


def _empty(value: object) -> dict[str, Any]:
    _mapping(value, "answer")
    return {}


class Op:
    """What may answer one operation: the RESULT's shape and largest size, other frames."""

    def __init__(self, result: Callable[[object], dict], max_result: int, *frames: Frame) -> None:
        self.result, self.max_result, self.frames = result, max_result, frames


OPS: dict[str, Op] = {
    "ping": Op(_ping, SMALL_RESULT),
    "exec": Op(_started, SMALL_RESULT, Frame.STDOUT, Frame.STDERR, Frame.EXIT),
    "spawn": Op(process_info, PROCESS_RESULT),
    "procs": Op(_processes, LIST_RESULT),
    "proc_wait": Op(process_info, PROCESS_RESULT),
    "proc_signal": Op(process_info, PROCESS_RESULT),
    "logs": Op(log_entry, PROCESS_RESULT, Frame.END),
    "stat": Op(file_info, FILE_RESULT),
    "list": Op(_listing, LIST_RESULT),
    "mkdir": Op(file_info, FILE_RESULT),
    "remove": Op(_empty, SMALL_RESULT),
    "rename": Op(file_info, FILE_RESULT),
    "read": Op(file_info, FILE_RESULT, Frame.DATA, Frame.END, Frame.FD),
    "write": Op(file_info, FILE_RESULT, Frame.FD),
    "tar_out": Op(file_info, FILE_RESULT, Frame.DATA, Frame.END, Frame.FD),
    "tar_in": Op(_unpacked, SMALL_RESULT, Frame.FD),
    "connect": Op(_connected, SMALL_RESULT),
}


def parse_result(op: str, payload: bytes) -> dict[str, Any]:
    """The canonical RESULT of `op` (known keys only), or ProtocolViolation."""
    if op not in OPS:
        raise InvalidRequest(f"unknown operation: {printable(op, 100)}")
    return OPS[op].result(parse_json(payload, f"{op} answer"))


def parse_exit(payload: bytes) -> dict[str, Any]:
    return exit_status(parse_json(payload, "exit status"))
