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
    QuotaExceeded,
    SandboxError,
    SandboxExists,
    SandboxExpired,
    SandboxFailed,
    SandboxNotFound,
    ServiceUnavailable,
)
from ._models import (
    CommandResult,
    FileInfo,
    LogEntry,
    OutputLine,
    Recording,
    SandboxInfo,
    SshAccess,
    Usage,
)
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
    "QuotaExceeded",
    "Recording",
    "Sandbox",
    "SandboxError",
    "SandboxExists",
    "SandboxExpired",
    "SandboxFailed",
    "SandboxInfo",
    "SandboxNotFound",
    "ServiceUnavailable",
    "SshAccess",
    "Usage",
    "__version__",
    "load_ipython_extension",
    "unload_ipython_extension",
]


def load_ipython_extension(ipython: object) -> None:
    """``%load_ext jupyter_sandbox``: the ``%%sandbox``, ``%sandbox``, ``%sandbox_ssh`` magics."""
    from .kernel import load_ipython_extension as load

    load(ipython)


def unload_ipython_extension(ipython: object) -> None:
    from .kernel import unload_ipython_extension as unload

    unload(ipython)


def _jupyter_labextension_paths() -> list[dict[str, str]]:
    return [{"src": "labextension", "dest": "jupyter-sandbox"}]


def _jupyter_server_extension_points() -> list[dict[str, str]]:
    return [{"module": "jupyter_sandbox.serverext"}]
