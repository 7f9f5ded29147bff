"""Each sandbox's record, kept in the ``record`` key of its Secret.

The state writes a record synchronously on the event loop whenever what a restart
needs of it changes (lease renewals are not written). A write is queued here and
returns at once: only the latest data of each sandbox is kept, written in order by
one background task per sandbox, retried while the API server cannot take it. A
sandbox being stopped gets no more writes; its Secret goes with it.
"""

from __future__ import annotations

import asyncio
import logging

from . import objects
from .api import Api, ApiError

log = logging.getLogger("jupyter_sandbox.service")

RETRY_FIRST, RETRY_MAX = 0.5, 10.0  # seconds between attempts at a failed write


class RecordWriter:
    """Queued writes of sandboxes' records into their Secrets."""

    def __init__(self, api: Api) -> None:
        self.api = api
        self.pending: dict[str, bytes] = {}  # the latest unwritten record, by sandbox
        self.written: dict[str, bytes] = {}  # the record each Secret holds, as far as known
        self.writes = 0  # API writes made
        self._tasks: dict[str, asyncio.Task] = {}

    def put(self, sandbox_id: str, data: bytes) -> None:
        """Queue `data` as the sandbox's record (replacing a queued one)."""
        if self.written.get(sandbox_id) == data and sandbox_id not in self._tasks:
            return
        self.pending[sandbox_id] = data
        if sandbox_id not in self._tasks:
            task = asyncio.get_running_loop().create_task(self._write(sandbox_id))
            self._tasks[sandbox_id] = task

    def drop(self, sandbox_id: str) -> None:
        """No more writes for a sandbox that is being stopped."""
        self.pending.pop(sandbox_id, None)
        self.written.pop(sandbox_id, None)
        task = self._tasks.pop(sandbox_id, None)
        if task is not None:
            task.cancel()

    async def flush(self, timeout: float) -> int:
        """Wait up to `timeout` seconds for the queued writes; how many are left."""
        tasks = list(self._tasks.values())
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)
        return len(self.pending)

    async def close(self) -> None:
        for task in list(self._tasks.values()):
            task.cancel()
        self._tasks.clear()

    async def _write(self, sandbox_id: str) -> None:
        delay = RETRY_FIRST
        try:
            while sandbox_id in self.pending:
                data = self.pending[sandbox_id]
                body = {"data": {objects.RECORD_KEY: objects.encode(data)}}
                try:
                    await self.api.patch("secrets", objects.secret_name(sandbox_id), body)
                except ApiError as e:
                    if e.status == 404:
                        log.warning(
                            "the Secret of sandbox %s is gone: its record cannot be kept "
                            "(a restart of the service will not know the sandbox)",
                            sandbox_id,
                        )
                        self.pending.pop(sandbox_id, None)
                        return
                    log.warning(
                        "could not write the record of sandbox %s (%s); retrying in %.1f s",
                        sandbox_id,
                        e.message,
                        delay,
                    )
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, RETRY_MAX)
                    continue
                self.writes += 1
                self.written[sandbox_id] = data
                if self.pending.get(sandbox_id) is data:
                    del self.pending[sandbox_id]
        finally:
            if self._tasks.get(sandbox_id) is asyncio.current_task():
                del self._tasks[sandbox_id]
