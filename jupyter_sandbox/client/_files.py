"""Files of a sandbox: upload, download, read, write, list, stat, mkdir, remove, rename.

Transfers stream in chunks: a directory travels as a tar stream produced or
consumed by a thread through a small bounded queue, so no transfer holds more
than a few chunks in memory however large it is.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import queue
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from .._errors import FileError, FileNotFound, SandboxError, error_from
from .._models import FileInfo
from ..agent.protocol import CHUNK, Frame
from ..untrusted.extract import FileDownload, Limits, extract_tree
from ..untrusted.streams import INACTIVITY, Throughput
from ._direct import DirectTransfer
from ._tar import add_tree
from ._transport import DOWNLOAD, READ, UPLOAD, WRITE, Call, read_frames

if TYPE_CHECKING:
    from ._async import AsyncSandbox

Progress = Callable[[int, "int | None"], None]
_QUEUE_DEPTH = 8
_QUERIES = ("stat", "list")  # file operations that change nothing
_DONE = object()
_FAILED = object()
# The service ends a transfer whose agent went silent after INACTIVITY seconds and
# says so; waiting twice that long only guards against a service that hangs.
_DOWNLOAD_TIMEOUT = httpx.Timeout(2 * INACTIVITY, connect=5.0)


class AsyncFileSystem:
    """``sandbox.fs``: paths are inside the sandbox, relative ones to its home."""

    def __init__(self, sandbox: AsyncSandbox) -> None:
        self._sandbox = sandbox
        self._direct_transfer: DirectTransfer | bool | None = None

    def _url(self, op: str) -> str:
        return f"/v1/sandboxes/{self._sandbox.id}/files/{op}"

    async def _op(self, op: str, **args: Any) -> Any:
        call = Call(
            f"the file operation {op} of {args.get('path') or args.get('src')!r}",
            "look at the file before trying again" if op not in _QUERIES else "try again",
            idempotent=op in _QUERIES,
        )
        return await self._sandbox._transport.request("POST", self._url(op), json=args, call=call)

    async def stat(self, path: str) -> FileInfo:
        return FileInfo.from_json(await self._op("stat", path=path))

    async def exists(self, path: str) -> bool:
        try:
            await self.stat(path)
        except FileNotFound:
            return False
        return True

    async def list(self, path: str = ".") -> list[FileInfo]:
        return [FileInfo.from_json(e) for e in (await self._op("list", path=path))["entries"]]

    async def mkdir(self, path: str, parents: bool = True, exist_ok: bool = True) -> FileInfo:
        return FileInfo.from_json(
            await self._op("mkdir", path=path, parents=parents, exist_ok=exist_ok)
        )

    async def remove(self, path: str, recursive: bool = False) -> None:
        await self._op("remove", path=path, recursive=recursive)

    async def rename(self, src: str, dst: str) -> FileInfo:
        return FileInfo.from_json(await self._op("rename", src=src, dst=dst))

    async def write_bytes(self, path: str, data: bytes, mode: int | None = None) -> FileInfo:
        return await self._put_file(path, _chunks_of(data), mode, WRITE)

    async def write_text(self, path: str, text: str, mode: int | None = None) -> FileInfo:
        return await self.write_bytes(path, text.encode(), mode)

    async def read_bytes(self, path: str) -> bytes:
        """The file's contents; exactly the size the sandbox announced for it."""
        async with self._get("read", path, READ) as (info, data):
            chunks = [chunk async for chunk in data]
        content = b"".join(chunks)
        if len(content) != info["size"]:
            raise FileError(
                f"the sandbox sent {len(content)} of the {info['size']} bytes it announced"
            )
        return content

    async def read_text(self, path: str) -> str:
        return (await self.read_bytes(path)).decode()

    async def upload(
        self, local: str | os.PathLike, remote: str, progress: Progress | None = None
    ) -> None:
        """Copy a local file or directory tree to `remote` (modes and symlinks kept)."""
        source = Path(local)
        if not source.exists() and not source.is_symlink():
            raise FileNotFoundError(f"no such local file or directory: {source}")
        is_tree = source.is_dir()
        total = _tree_size(source) if is_tree else source.stat().st_size
        report = _with_total(progress, total)
        direct = await self._direct()
        if direct is not None:
            send = "upload_tree" if is_tree else "upload_file"
            await self._direct_call(send, source, remote, report)
        elif is_tree:
            body = _counting(_thread_producer(add_tree, source), report)
            await self._send("tar", {"path": remote}, body, UPLOAD)
        else:
            body = _counting(_thread_producer(_read_file, source), report)
            await self._put_file(remote, body, source.stat().st_mode & 0o7777, UPLOAD)

    async def download(
        self, remote: str, local: str | os.PathLike, progress: Progress | None = None
    ) -> None:
        """Copy a file or directory tree out of the sandbox to `local`.

        Whatever the sandbox sends is written by ``untrusted.extract``: nothing
        outside `local`, no link followed, no set-id, device or FIFO file made.
        """
        info = await self.stat(remote)
        if info.type not in ("file", "dir", "symlink"):
            raise FileError(f"not a regular file or directory in the sandbox: {info.path}")
        target = Path(local)
        is_tree = info.type == "dir"
        report = _with_total(progress, None if is_tree else info.size)
        limits = Limits(max_bytes=await self._capacity())
        direct = await self._direct()
        if direct is not None:
            receive = "download_tree" if is_tree else "download_file"
            await self._direct_call(receive, remote, target, report, limits)
        elif is_tree:
            async with self._get("tar", remote, DOWNLOAD) as (_, data):
                chunks = _counting(data, report)
                await _thread_consumer(chunks, lambda read: extract_tree(read, target, limits))
        else:
            await self._download_file(remote, target, report, limits)

    async def _capacity(self) -> int | None:
        """The most the sandbox can hold: its disk limit and its tmpfs sizes."""
        limits = (await self._sandbox.info()).limits
        try:
            return int(limits["disk"]) + sum(int(size) for size in limits["tmpfs"].values())
        except (KeyError, TypeError, ValueError, AttributeError):
            return None

    async def _download_file(
        self, remote: str, target: Path, report: Progress | None, limits: Limits
    ) -> None:
        async with self._get("read", remote, DOWNLOAD) as (info, data):
            with FileDownload(target, info, remote, limits) as out:
                async for chunk in _counting(data, report):
                    out.write(chunk)
                out.commit()

    async def _direct(self) -> DirectTransfer | None:
        """The agent's socket, if this process may use it (same machine and user)."""
        if self._direct_transfer is None:
            try:
                data = await self._sandbox._transport.request(
                    "GET", f"/v1/sandboxes/{self._sandbox.id}/agent"
                )
                direct = DirectTransfer(data["socket"])
                usable = await asyncio.to_thread(direct.usable)
            except (SandboxError, KeyError):
                usable = False
            self._direct_transfer = direct if usable else False
        return self._direct_transfer or None

    async def _direct_call(self, method: str, *args: Any) -> None:
        """A direct transfer; if the agent's socket refuses it (the sandbox failed, and its
        files are served by an agent started again), the service is asked for the socket
        once more (which raises SandboxFailed or SandboxExpired if that cannot be) and the
        transfer retried."""
        assert isinstance(self._direct_transfer, DirectTransfer)
        try:
            await asyncio.to_thread(getattr(self._direct_transfer, method), *args)
        except ConnectionRefusedError:
            await self._sandbox._transport.request("GET", f"/v1/sandboxes/{self._sandbox.id}/agent")
            await asyncio.to_thread(getattr(self._direct_transfer, method), *args)

    async def _put_file(
        self, path: str, body: AsyncGenerator[bytes, None], mode: int | None, call: Call
    ) -> FileInfo:
        params = {"path": path}
        if mode is not None:
            params["mode"] = oct(mode)[2:]
        return FileInfo.from_json(await self._send("write", params, body, call))

    async def _send(
        self, op: str, params: dict[str, str], body: AsyncGenerator[bytes, None], call: Call
    ) -> Any:
        """PUT `body`, closed as the request ends: a failed one leaves no producer waiting."""
        async with contextlib.aclosing(body):
            return await self._sandbox._transport.request(
                "PUT", self._url(op), params=params, content=body, timeout=None, call=call
            )

    @contextlib.asynccontextmanager
    async def _get(
        self, op: str, path: str, call: Call
    ) -> AsyncIterator[tuple[dict[str, Any], AsyncIterator[bytes]]]:
        """The sandbox's description of `path` and an iterator over its bytes."""
        async with self._sandbox._transport.stream(
            "GET", self._url(op), params={"path": path}, timeout=_DOWNLOAD_TIMEOUT, call=call
        ) as response:
            frames = read_frames(response)
            kind, payload = await anext(frames, (None, b""))
            if kind != Frame.RESULT:
                raise SandboxError("the service's download answer did not start with RESULT")
            yield json.loads(payload), _data_of(frames)


async def _data_of(
    frames: AsyncIterator[tuple[int, bytes]],
) -> AsyncGenerator[bytes, None]:
    """DATA payloads until END; an ERROR frame raises its error, a trickle AgentTimeout."""
    throughput = Throughput()
    async for kind, payload in frames:
        if kind == Frame.DATA:
            throughput.add(len(payload))
            yield payload
        elif kind == Frame.END:
            return
        elif kind == Frame.ERROR:
            error = json.loads(payload)
            raise error_from(error["type"], error["message"])
    raise SandboxError("the download was cut off before its end")


async def _chunks_of(data: bytes) -> AsyncGenerator[bytes, None]:
    for start in range(0, len(data), CHUNK):
        yield data[start : start + CHUNK]
    if not data:
        yield b""


async def _counting(
    chunks: AsyncGenerator[bytes, None], progress: Progress | None
) -> AsyncGenerator[bytes, None]:
    """`chunks`, reporting progress; closing this closes them."""
    done = 0
    async with contextlib.aclosing(chunks):
        async for chunk in chunks:
            done += len(chunk)
            yield chunk
            if progress is not None:
                progress(done, None)


def _with_total(progress: Progress | None, total: int | None) -> Progress | None:
    """A progress callback that always reports `total` as the expected size."""
    if progress is None:
        return None
    return lambda done, _: progress(done, total)


def _tree_size(root: Path) -> int:
    return sum(f.stat().st_size for f in root.rglob("*") if f.is_file() and not f.is_symlink())


class _QueueWriter:
    """A file object whose writes go into a bounded queue in CHUNK-sized pieces.

    Once `stopped` is set (nobody reads the queue any more) a write raises
    _ConsumerGone, so the producing thread ends instead of waiting forever.
    """

    def __init__(self, out: queue.Queue, stopped: threading.Event) -> None:
        self.out, self.stopped, self.buffer = out, stopped, bytearray()

    def write(self, data: bytes) -> int:
        self.buffer += data
        while len(self.buffer) >= CHUNK:
            self.put(bytes(self.buffer[:CHUNK]))
            del self.buffer[:CHUNK]
        return len(data)

    def flush(self) -> None:
        if self.buffer:
            self.put(bytes(self.buffer))
            self.buffer.clear()

    def put(self, item: object) -> None:
        while not self.stopped.is_set():
            try:
                self.out.put(item, timeout=0.1)
                return
            except queue.Full:
                continue
        raise _ConsumerGone()


class _ConsumerGone(Exception):
    """The chunks a producer writes are no longer wanted (the transfer failed)."""


def _read_file(source: Path, out: _QueueWriter) -> None:
    with open(source, "rb") as f:
        while data := f.read(CHUNK):
            out.write(data)


async def _thread_producer(
    produce: Callable[[Path, _QueueWriter], None], source: Path
) -> AsyncGenerator[bytes, None]:
    """Chunks written by `produce` running in a thread, with back-pressure.

    If the chunks stop being read (the transfer failed), the thread ends too.
    """
    chunks: queue.Queue = queue.Queue(_QUEUE_DEPTH)
    stopped = threading.Event()
    failure: list[BaseException] = []

    def run() -> None:
        writer = _QueueWriter(chunks, stopped)
        try:
            produce(source, writer)
            writer.flush()
        except _ConsumerGone:
            return
        except BaseException as e:
            failure.append(e)
        with contextlib.suppress(_ConsumerGone):
            writer.put(_DONE)

    threading.Thread(target=run, daemon=True).start()
    try:
        while (chunk := await asyncio.to_thread(chunks.get)) is not _DONE:
            yield chunk
    finally:
        stopped.set()
        with contextlib.suppress(queue.Full):
            chunks.put_nowait(_DONE)  # wakes a read cut short by cancellation
    if failure:
        raise failure[0]


class _SourceFailed(Exception):
    """What a consumer sees when the chunks it reads failed (their error is raised)."""


class _QueueReader:
    """A file object reading chunks from a bounded queue until _DONE."""

    def __init__(self, source: queue.Queue) -> None:
        self.source, self.pending, self.finished = source, b"", False

    def read(self, size: int = -1) -> bytes:
        while not self.finished and (size < 0 or len(self.pending) < size):
            chunk = self.source.get()
            if chunk is _FAILED:
                raise _SourceFailed()
            if chunk is _DONE:
                self.finished = True
            else:
                self.pending += chunk
        size = len(self.pending) if size < 0 else size
        data, self.pending = self.pending[:size], self.pending[size:]
        return data


async def _thread_consumer(
    chunks: AsyncIterator[bytes], consume: Callable[[_QueueReader], None]
) -> None:
    """Feed chunks to `consume` running in a thread, with back-pressure.

    If `consume` fails, feeding stops and its exception is raised here; if the
    chunks fail, `consume` is stopped and their exception is raised.
    """
    pipe: queue.Queue = queue.Queue(_QUEUE_DEPTH)
    worker = asyncio.ensure_future(asyncio.to_thread(consume, _QueueReader(pipe)))

    async def feed(item: object) -> bool:
        while not worker.done():
            try:
                await asyncio.to_thread(pipe.put, item, True, 0.1)
                return True
            except queue.Full:
                continue
        return False

    try:
        async for chunk in chunks:
            if not await feed(chunk):
                break
    except BaseException:
        await feed(_FAILED)
        with contextlib.suppress(Exception):
            await worker
        raise
    await feed(_DONE)
    await worker
