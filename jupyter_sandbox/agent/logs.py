"""The sandbox log: background output and events, a ring in memory and a tail on disk.

Everything in it is bounded whatever a process writes: an entry's text (a longer
line, or one without a newline, arrives in pieces), the ring (by count and by
bytes), and the files (``log.jsonl`` up to ``LOG_LIMIT`` bytes, then one rotated
``log.jsonl.1``).
"""

from __future__ import annotations

import codecs
import collections
import contextlib
import errno
import itertools
import json
import os
import threading
import time
from functools import partial

LOG_LIMIT = 1 << 20  # bytes of log.jsonl; it is rotated before it would grow past this
RING_SIZE = 20000  # entries kept in memory
RING_BYTES = 8 << 20  # characters of text kept in memory
ENTRY_BYTES = 16 << 10  # bytes of output per entry
LOG_NAME = "log.jsonl"
ENTRY_OVERHEAD = 200  # what an entry costs in memory besides its text, roughly


class Log:
    """Numbered entries, kept in a bounded ring and appended to a bounded file."""

    def __init__(self, directory: int) -> None:
        self.directory = directory  # a descriptor; file names are relative to it
        self.name = LOG_NAME
        self.ring: collections.deque = collections.deque()
        self.ring_bytes = 0
        self.seq = 0
        self.cond = threading.Condition()
        self._file = None
        self._load()

    def _load(self) -> None:
        for name in (self.name + ".1", self.name):
            try:
                with open(name, "rb", opener=self._opener) as f:
                    data = f.read(LOG_LIMIT + 1)  # more is not one of ours: the rest is skipped
            except OSError:
                continue
            for line in data.splitlines():
                try:
                    entry = json.loads(line)
                    self.seq = max(self.seq, int(entry["seq"]))
                    self._keep(entry)
                except (ValueError, TypeError, KeyError):
                    continue

    def _keep(self, entry: dict) -> None:
        self.ring.append(entry)
        self.ring_bytes += len(entry["text"]) + ENTRY_OVERHEAD
        while len(self.ring) > RING_SIZE or self.ring_bytes > RING_BYTES:
            self.ring_bytes -= len(self.ring.popleft()["text"]) + ENTRY_OVERHEAD

    def write(self, source: str, stream: str, text: str) -> None:
        """Add an entry (several if `text` is longer than an entry may be).

        NUL becomes U+FFFD: log text is for reading, and the host refuses NUL in text.
        """
        text = text.replace("\0", "\ufffd")
        for start in range(0, max(len(text), 1), ENTRY_BYTES):
            self._write(source, stream, text[start : start + ENTRY_BYTES])

    def _write(self, source: str, stream: str, text: str) -> None:
        with self.cond:
            self.seq += 1
            entry = {
                "seq": self.seq,
                "time": time.time(),
                "source": source,
                "stream": stream,
                "text": text,
            }
            self._keep(entry)
            self._append((json.dumps(entry) + "\n").encode())
            self.cond.notify_all()

    def _append(self, line: bytes) -> None:
        """Append a line to the file, rotating it first if it would pass LOG_LIMIT."""
        try:
            if self._file is None:
                self._file = self._open_for_append()
            if self._file.tell() and self._file.tell() + len(line) > LOG_LIMIT:
                self._file.close()
                self._file = None
                d = self.directory
                os.replace(self.name, self.name + ".1", src_dir_fd=d, dst_dir_fd=d)
                self._file = self._open_for_append()
            self._write_whole(self._file, line)
        except OSError:  # a full disk loses file entries, never the ring
            if self._file is not None:
                with contextlib.suppress(OSError):
                    self._file.close()
            self._file = None

    @staticmethod
    def _write_whole(file, line: bytes) -> None:
        """Append all of `line` or none of it: a full disk takes part of a write without
        an error, and the next entry would then continue a broken line."""
        start = file.tell()
        try:
            if file.write(line) != len(line):
                raise OSError(errno.ENOSPC, "the log's disk took only part of an entry")
        except OSError:
            with contextlib.suppress(OSError):
                file.truncate(start)
            raise

    def _opener(self, name: str, flags: int) -> int:
        return os.open(name, flags | os.O_NOFOLLOW, 0o600, dir_fd=self.directory)

    def _open_for_append(self):
        return open(self.name, "ab", buffering=0, opener=self._opener)

    def _since(self, seq: int) -> list:
        """Entries after `seq`; the ring holds consecutive numbers, so slice, don't scan."""
        if not self.ring:
            return []
        start = max(0, seq + 1 - self.ring[0]["seq"])
        entries = list(itertools.islice(self.ring, start, None))
        if entries and entries[0]["seq"] != max(seq + 1, self.ring[0]["seq"]):
            return [e for e in self.ring if e["seq"] > seq]  # not consecutive after all
        return entries

    def _newer(self, seq: int, until) -> bool:
        return self.seq > seq or bool(until and until())

    def follow(self, after: int, tail: int | None, follow: bool, source: str | None, until=None):
        """Entries newer than `after` (or the last `tail`), then new ones while `follow`."""
        with self.cond:
            entries = [
                e
                for e in self.ring
                if e["seq"] > after and (source is None or e["source"] == source)
            ]
        if tail is not None:
            entries = entries[-tail:] if tail else []
        yield from entries
        last = entries[-1]["seq"] if entries else (self.seq if tail is not None else after)
        while follow:
            with self.cond:
                self.cond.wait_for(partial(self._newer, last, until), timeout=1.0)
                new = self._since(last)
                finished = until is not None and until()
            for entry in new:
                last = entry["seq"]
                if source is None or entry["source"] == source:
                    yield entry
            if finished and not new:
                return
            if not new:
                yield None  # lets the caller notice a closed client


def pump_output(log: Log, pipe, source: str, stream: str) -> None:
    """Copy a process's output into the log, line by line, no entry over ENTRY_BYTES."""
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    for chunk in iter(partial(pipe.readline, ENTRY_BYTES), b""):
        if text := decoder.decode(chunk):
            log.write(source, stream, text)
    if tail := decoder.decode(b"", final=True):
        log.write(source, stream, tail)
    pipe.close()
