"""Disposable, isolated Linux sandboxes for Jupyter: run cells in them, watch their logs, SSH in."""

__version__ = "0.1.0"

from ._errors import (
    CommandError,
    CommandTimeout,
    FileError,
    FileExists,
    FileNotFound,
    InvalidRequest,
    IsolationUnavailable,
    PermissionDenied,
    ProcessNotFound,
    SandboxError,
    SandboxExists,
    SandboxExpired,
    SandboxNotFound,
    ServiceUnavailable,
)
from ._models import CommandResult, FileInfo, LogEntry, OutputLine, SandboxInfo, SshAccess
from .client import AsyncFileSystem, AsyncProcess, AsyncSandbox, FileSystem, Process, Sandbox

__all__ = [
    "AsyncFileSystem",
    "AsyncProcess",
    "AsyncSandbox",
    "CommandError",
    "CommandResult",
    "CommandTimeout",
    "FileError",
    "FileExists",
    "FileInfo",
    "FileNotFound",
    "FileSystem",
    "InvalidRequest",
    "IsolationUnavailable",
    "LogEntry",
    "OutputLine",
    "PermissionDenied",
    "Process",
    "ProcessNotFound",
    "Sandbox",
    "SandboxError",
    "SandboxExists",
    "SandboxExpired",
    "SandboxInfo",
    "SandboxNotFound",
    "ServiceUnavailable",
    "SshAccess",
    "__version__",
]
