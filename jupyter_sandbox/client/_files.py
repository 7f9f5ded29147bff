"""Files of a sandbox: upload, download, read, write, list, stat, mkdir, remove, rename.

Transfers stream in chunks: a directory travels as a tar stream produced or
consumed by a thread through a small bounded queue, so no transfer holds more
than a few chunks in memory however large it is.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import tarfile
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._errors import FileNotFound
from .._models import FileInfo
from ..agent.protocol import CHUNK

if TYPE_CHECKING:
    from ._async import AsyncSandbox

Progress = Callable[[int, "int | None"], None]
_QUEUE_DEPTH = 8
_DONE = object()


class AsyncFileSystem:
    """``sandbox.fs``: paths are inside the sandbox, relative ones to its home."""

    def __init__(self, sandbox: AsyncSandbox) -> None:
        self._sandbox = sandbox

    def _url(self, op: str) -> str:
        return f"/v1/sandboxes/{self._sandbox.id}/files/{op}"

    async def _op(self, op: str, **args: Any) -> Any:
        return await self._sandbox._transport.request("POST", self._url(op), json=args)

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
        return await self._put_file(path, _chunks_of(data), mode)

    async def write_text(self, path: str, text: str, mode: int | None = None) -> FileInfo:
        return await self.write_bytes(path, text.encode(), mode)

    async def read_bytes(self, path: str) -> bytes:
        chunks = [chunk async for chunk in self._get("read", path)]
        return b"".join(chunks)

    async def read_text(self, path: str) -> str:
        return (await self.read_bytes(path)).decode()

    async def upload(
        self, local: str | os.PathLike, remote: str, progress: Progress | None = None
    ) -> None:
        """Copy a local file or directory tree to `remote` (modes and symlinks kept)."""
        source = Path(local)
        if not source.exists() and not source.is_symlink():
            raise FileNotFoundError(f"no such local file or directory: {source}")
        if source.is_dir():
            total = sum(
                f.stat().st_size for f in source.rglob("*") if f.is_file() and not f.is_symlink()
            )
            body = _counting(_thread_producer(_write_tar, source), progress, total)
            await self._sandbox._transport.request(
                "PUT", self._url("tar"), params={"path": remote}, content=body, timeout=None
            )
        else:
            size = source.stat().st_size
            body = _counting(_thread_producer(_read_file, source), progress, size)
            await self._put_file(remote, body, source.stat().st_mode & 0o7777)

    async def download(
        self, remote: str, local: str | os.PathLike, progress: Progress | None = None
    ) -> None:
        """Copy a file or directory tree out of the sandbox to `local`."""
        info = await self.stat(remote)
        target = Path(local)
        if info.type == "dir":
            target.mkdir(parents=True, exist_ok=True)
            chunks = _counting(self._get("tar", remote), progress, None)
            await _thread_consumer(chunks, lambda read: _extract_tar(read, target))
            return
        if target.is_dir():
            target = target / info.name
        chunks = _counting(self._get("read", remote), progress, info.size)
        tmp = target.with_name(f".{target.name}.download")
        try:
            with open(tmp, "wb") as f:
                async for chunk in chunks:
                    f.write(chunk)
            os.chmod(tmp, info.mode)
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                tmp.unlink()

    async def _put_file(self, path: str, body: AsyncIterator[bytes], mode: int | None) -> FileInfo:
        params = {"path": path}
        if mode is not None:
            params["mode"] = oct(mode)[2:]
        return FileInfo.from_json(
            await self._sandbox._transport.request(
                "PUT", self._url("write"), params=params, content=body, timeout=None
            )
        )

    async def _get(self, op: str, path: str) -> AsyncIterator[bytes]:
        async with self._sandbox._transport.stream(
            "GET", self._url(op), params={"path": path}, timeout=None
        ) as response:
            json.loads(response.headers.get("X-Sandbox-Stat", "{}"))
            async for chunk in response.aiter_raw():
                yield chunk


async def _chunks_of(data: bytes) -> AsyncIterator[bytes]:
    for start in range(0, len(data), CHUNK):
        yield data[start : start + CHUNK]
    if not data:
        yield b""


async def _counting(
    chunks: AsyncIterator[bytes], progress: Progress | None, total: int | None
) -> AsyncIterator[bytes]:
    done = 0
    async for chunk in chunks:
        done += len(chunk)
        yield chunk
        if progress is not None:
            progress(done, total)


class _QueueWriter:
    """A file object whose writes go into a bounded queue in CHUNK-sized pieces."""

    def __init__(self, out: queue.Queue) -> None:
        self.out, self.buffer = out, bytearray()

    def write(self, data: bytes) -> int:
        self.buffer += data
        while len(self.buffer) >= CHUNK:
            self.out.put(bytes(self.buffer[:CHUNK]))
            del self.buffer[:CHUNK]
        return len(data)

    def flush(self) -> None:
        if self.buffer:
            self.out.put(bytes(self.buffer))
            self.buffer.clear()


def _write_tar(source: Path, out: _QueueWriter) -> None:
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for child in sorted(source.iterdir()):
            tar.add(child, arcname=child.name, recursive=True)


def _read_file(source: Path, out: _QueueWriter) -> None:
    with open(source, "rb") as f:
        while data := f.read(CHUNK):
            out.write(data)


async def _thread_producer(
    produce: Callable[[Path, _QueueWriter], None], source: Path
) -> AsyncIterator[bytes]:
    """Chunks written by `produce` running in a thread, with back-pressure."""
    chunks: queue.Queue = queue.Queue(_QUEUE_DEPTH)
    failure: list[BaseException] = []

    def run() -> None:
        writer = _QueueWriter(chunks)
        try:
            produce(source, writer)
            writer.flush()
        except BaseException as e:
            failure.append(e)
        chunks.put(_DONE)

    threading.Thread(target=run, daemon=True).start()
    while (chunk := await asyncio.to_thread(chunks.get)) is not _DONE:
        yield chunk
    if failure:
        raise failure[0]


class _QueueReader:
    """A file object reading chunks from a bounded queue until _DONE."""

    def __init__(self, source: queue.Queue) -> None:
        self.source, self.pending, self.finished = source, b"", False

    def read(self, size: int = -1) -> bytes:
        while not self.finished and (size < 0 or len(self.pending) < size):
            chunk = self.source.get()
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
    """Feed chunks to `consume` running in a thread, with back-pressure."""
    pipe: queue.Queue = queue.Queue(_QUEUE_DEPTH)
    worker = asyncio.create_task(asyncio.to_thread(consume, _QueueReader(pipe)))
    try:
        async for chunk in chunks:
            await asyncio.to_thread(pipe.put, chunk)
    finally:
        await asyncio.to_thread(pipe.put, _DONE)
        await worker


def _extract_tar(reader: _QueueReader, target: Path) -> None:
    with tarfile.open(fileobj=reader, mode="r|") as tar:
        for member in tar:
            tar.extract(member, target, filter=_keep_symlinks_filter)
    reader.read()


def _keep_symlinks_filter(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo:
    """`data` safety (nothing written outside `dest`), but symlinks stay as they were."""
    if member.issym():
        checked = tarfile.tar_filter(member, dest)
        where = os.path.realpath(os.path.join(dest, os.path.dirname(checked.name)))
        if os.path.commonpath([where, os.path.realpath(dest)]) != os.path.realpath(dest):
            raise tarfile.OutsideDestinationError(member, where)
        return checked
    return tarfile.data_filter(member, dest)
