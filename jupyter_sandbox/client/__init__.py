"""Client API: ``Sandbox`` (blocking) and ``AsyncSandbox`` (asyncio)."""

from ._async import AsyncProcess, AsyncSandbox
from ._files import AsyncFileSystem
from ._sync import FileSystem, Process, Sandbox

__all__ = ["AsyncFileSystem", "AsyncProcess", "AsyncSandbox", "FileSystem", "Process", "Sandbox"]
