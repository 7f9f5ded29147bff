"""Notebook integration: ``%%sandbox``, ``%sandbox``, ``%sandbox_ssh`` and their widget.

Load it with ``%load_ext jupyter_sandbox``. The sandboxes a kernel creates are
kept in one registry per process, which survives ``%reload_ext``; the "session"
ones end when the kernel shuts down or restarts.
"""

from __future__ import annotations

from typing import Any

from ._lifetime import hook_shutdown
from ._sandboxes import KernelIdentity, KernelSandboxes, nbgrader_executing
from .magics import SandboxMagics

__all__ = ["SandboxMagics", "load_ipython_extension", "unload_ipython_extension"]

_sandboxes: KernelSandboxes | None = None


def _registry(shell: Any) -> KernelSandboxes:
    global _sandboxes
    if _sandboxes is None:
        _sandboxes = KernelSandboxes(
            KernelIdentity.current(), end_all_with_kernel=nbgrader_executing()
        )
        kernel = getattr(shell, "kernel", None)
        if kernel is not None:
            hook_shutdown(kernel, _sandboxes.close)
    return _sandboxes


def load_ipython_extension(ipython: Any) -> None:
    """Register the magics (``%load_ext jupyter_sandbox``)."""
    ipython.register_magics(SandboxMagics(ipython, _registry(ipython)))


def unload_ipython_extension(ipython: Any) -> None:
    """Remove the magics; the kernel's sandboxes stay (and still end with the kernel)."""
    ipython.magics_manager.registry.pop("SandboxMagics", None)
    for kind in ("line", "cell"):
        for name in ("sandbox", "sandbox_ssh"):
            ipython.magics_manager.magics[kind].pop(name, None)
