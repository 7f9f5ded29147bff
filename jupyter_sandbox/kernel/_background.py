"""A private event loop thread for work the kernel waits on or leaves running.

The kernel's own loop must never be blocked or re-entered, so, like IPython's
``%%script``, coroutines run on a loop in a daemon thread. The main thread can
wait on one while it ticks (to redraw a progress bar), and Ctrl-C cancels it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

_loop: asyncio.AbstractEventLoop | None = None
_lock = threading.Lock()


def loop() -> asyncio.AbstractEventLoop:
    """The background loop, started on first use."""
    global _loop
    with _lock:
        if _loop is None:
            _loop = asyncio.new_event_loop()
            threading.Thread(
                target=_loop.run_forever, name="jupyter-sandbox-kernel", daemon=True
            ).start()
        return _loop


def submit(coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
    """Start `coro` on the background loop."""
    return asyncio.run_coroutine_threadsafe(coro, loop())


def wait(
    coro: Coroutine[Any, Any, T], tick: Callable[[], None] | None = None, every: float = 0.2
) -> T:
    """Run `coro` to completion, calling `tick` every `every` seconds meanwhile.

    KeyboardInterrupt cancels the coroutine, then propagates.
    """
    future = submit(coro)
    try:
        while not concurrent.futures.wait([future], timeout=every).done:
            if tick is not None:
                tick()
        return future.result()
    except KeyboardInterrupt:
        future.cancel()
        raise
