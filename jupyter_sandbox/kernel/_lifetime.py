"""Ending a kernel's sandboxes when the kernel shuts down or restarts.

IPython has no shutdown event, and jupyter_client SIGTERMs a kernel 2.5 s after
its shutdown request (ipykernel installs no SIGTERM handler, so ``atexit`` does
not run then). The reliable moment is the ``shutdown_request`` message itself:
it is wrapped so the kernel's sandboxes end before the kernel replies. A kernel
that is SIGKILLed stops renewing its leases and the service reaps its sandboxes.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

_TABLES = ("control_handlers", "shell_handlers")


def hook_shutdown(kernel: Any, on_shutdown: Callable[[], None]) -> Callable[[], None]:
    """Call `on_shutdown` first whenever `kernel` handles a shutdown request.

    Returns a function that removes the hook.
    """
    originals: dict[str, Callable] = {}
    for table_name in _TABLES:
        table = getattr(kernel, table_name, None)
        original = table.get("shutdown_request") if table else None
        if original is None:
            continue

        async def hooked(
            stream: Any, ident: Any, parent: Any, _original: Callable = original
        ) -> None:
            try:
                on_shutdown()
            except Exception:
                log.exception("could not end this kernel's sandboxes")
            result = _original(stream, ident, parent)
            if inspect.isawaitable(result):
                await result

        originals[table_name] = original
        table["shutdown_request"] = hooked

    def unhook() -> None:
        for table_name, original in originals.items():
            getattr(kernel, table_name)["shutdown_request"] = original

    return unhook
