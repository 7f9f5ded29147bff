"""Typed errors shared by the client and the service.

The service reports an error as JSON ``{"error": <class name>, "message": ...}``;
the client raises the class of that name, so a caller can catch exactly what
went wrong whichever side noticed it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._models import CommandResult


class SandboxError(Exception):
    """Base class of every error raised by jupyter-sandbox."""

    status = 500


class SandboxNotFound(SandboxError, LookupError):
    """No live sandbox has that id or name."""

    status = 404


class SandboxExpired(SandboxError):
    """The sandbox has ended (expired, killed or lost); it can no longer be used."""

    status = 410


class SandboxFailed(SandboxError):
    """The sandbox ended unexpectedly (out of memory, killed, host restart): ``restart()``
    it or ``kill()`` it. Its files are kept until its deadline or a kill (download them)
    unless the message says they are not (kubernetes with an emptyDir home)."""

    status = 409


class SandboxExists(SandboxError):
    """A live sandbox already has that name."""

    status = 409


class InvalidRequest(SandboxError, ValueError):
    """An argument is malformed; the message says which and what is accepted."""

    status = 400


class IsolationUnavailable(SandboxError):
    """This host cannot isolate sandboxes; nothing is ever run unisolated instead."""

    status = 503


class ServiceUnavailable(SandboxError):
    """The sandbox service could not be reached or started."""

    status = 503


class FileNotFound(SandboxError, FileNotFoundError):
    """A path inside the sandbox does not exist."""

    status = 404


class FileExists(SandboxError, FileExistsError):
    """A path inside the sandbox already exists."""

    status = 409


class PermissionDenied(SandboxError, PermissionError):
    """The sandbox user may not do that to a path inside the sandbox."""

    status = 403


class QuotaExceeded(SandboxError):
    """The caller's quota (sandboxes at once, memory, CPUs, lifetime) does not allow this;
    the message names the quota, its limit, the current use, where it is set and what to do."""

    status = 403


class FileError(SandboxError, OSError):
    """Any other file operation inside the sandbox failed."""

    status = 400


class DiskFull(SandboxError, OSError):
    """A disk or filesystem is full; the message names it, its size and what to free."""

    status = 507


class ProcessNotFound(SandboxError, LookupError):
    """No background process with that pid was started in the sandbox."""

    status = 404


class CommandError(SandboxError):
    """A command exited with a non-zero code; ``result`` holds its output."""

    status = 200

    def __init__(self, message: str, result: CommandResult | None = None) -> None:
        super().__init__(message)
        self.result = result


class CommandTimeout(CommandError, TimeoutError):
    """A command ran longer than its timeout and was killed."""


ERRORS: dict[str, type[SandboxError]] = {
    cls.__name__: cls
    for cls in (
        SandboxError,
        SandboxNotFound,
        SandboxExpired,
        SandboxFailed,
        SandboxExists,
        InvalidRequest,
        IsolationUnavailable,
        ServiceUnavailable,
        FileNotFound,
        FileExists,
        PermissionDenied,
        QuotaExceeded,
        FileError,
        DiskFull,
        ProcessNotFound,
        CommandError,
        CommandTimeout,
    )
}
# Error kinds reported by the agent that are not class names of their own.
ERRORS["BadRequest"] = InvalidRequest
ERRORS["ConnectionLost"] = SandboxError


def error_from(kind: str, message: str) -> SandboxError:
    """The exception for an error reported by the service or the agent."""
    return ERRORS.get(kind, SandboxError)(message)
