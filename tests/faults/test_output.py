"""Output of any shape comes back exact, keeps the logs bounded and the service answering.

The shapes are the ones that once went wrong or could: one line of 32 MiB with no
newline (the client re-split it on every chunk), binary, carriage-return floods
(progress bars), and multi-byte UTF-8 split across chunk boundaries. How fast they
stream is measured in bench/bench_sandbox.py, not here.
"""

from __future__ import annotations

import threading
import time

import pytest

from jupyter_sandbox import Sandbox
from jupyter_sandbox.agent import logs as agent_logs
from jupyter_sandbox.client._async import LINE_PIECE
from tests.conftest import ServiceEnv

pytestmark = pytest.mark.unprivileged

MiB = 1 << 20
LONG_LINE = f"head -c {32 * MiB} /dev/zero | tr '\\0' a"
# Text with 2-, 3- and 4-byte characters, written 7 bytes at a time so that nearly
# every write ends inside a character; no newline anywhere.
SPLIT_UTF8 = (
    "python3 -c \"import os; data = ('aé€😀' * 200000).encode(); "
    '[os.write(1, data[i:i + 7]) for i in range(0, len(data), 7)]"'
)
UTF8_TEXT = "aé€😀" * 200000
SHAPES = {
    "one long line": LONG_LINE,
    "binary": f"head -c {8 * MiB} /dev/urandom",
    "carriage returns": f"yes 'progress 50%' | head -c {8 * MiB} | tr '\\n' '\\r'",
    "split UTF-8": SPLIT_UTF8,
}


def test_a_32_mib_line_comes_back_exact(sandbox: Sandbox):
    result = sandbox.sh(LONG_LINE, timeout=120)
    assert len(result.stdout_bytes) == 32 * MiB
    assert result.stdout_bytes == b"a" * (32 * MiB)
    assert result.stdout == "a" * (32 * MiB)


def test_binary_output_comes_back_exact(sandbox: Sandbox):
    sandbox.sh(f"head -c {8 * MiB} /dev/urandom > blob")
    expected = sandbox.fs.read_bytes("blob")
    result = sandbox.sh("cat blob; cat blob >&2", timeout=60)
    assert result.stdout_bytes == expected
    assert result.stderr_bytes == expected


def test_carriage_return_flood_comes_back_exact(sandbox: Sandbox):
    result = sandbox.sh(SHAPES["carriage returns"], timeout=60)
    assert result.stdout_bytes.count(b"\r") == 8 * MiB // len("progress 50%\n")
    assert set(result.stdout_bytes.split(b"\r")[:-1]) == {b"progress 50%"}


def test_utf8_split_across_chunks_decodes_whole(sandbox: Sandbox):
    """Every character survives, in the result and in the pieces callbacks see."""
    pieces: list[str] = []
    result = sandbox.sh(SPLIT_UTF8, timeout=60, on_stdout=pieces.append)
    assert result.stdout == UTF8_TEXT
    assert "".join(pieces) == UTF8_TEXT
    assert "\ufffd" not in "".join(pieces)
    # A line this long reaches callbacks in pieces, not once at the end.
    assert len(pieces) > 1
    assert all(len(p.encode()) <= LINE_PIECE + (1 << 20) for p in pieces)


def test_lines_keep_their_newlines(sandbox: Sandbox):
    lines = [line.text for line in sandbox.stream("printf 'one\\ntwo\\n\\nthree'")]
    assert lines == ["one\n", "two\n", "\n", "three"]


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_log_files_stay_bounded(sandbox: Sandbox, service_env: ServiceEnv, shape: str):
    """A background process's output of any shape keeps the log files and ring bounded."""
    proc = sandbox.spawn(SHAPES[shape])
    assert proc.wait(timeout=120) == 0
    state = service_env.storage / "sandboxes" / sandbox.id / "state"
    sizes = {p.name: p.stat().st_size for p in state.glob("log.jsonl*")}
    assert sizes and set(sizes) <= {"log.jsonl", "log.jsonl.1"}, sizes
    assert all(size <= agent_logs.LOG_LIMIT for size in sizes.values()), sizes
    with sandbox.logs() as entries:
        output = [e for e in entries if e.source == f"proc:{proc.pid}" and e.stream == "stdout"]
    assert output and all(len(e.text) <= agent_logs.ENTRY_BYTES for e in output)
    assert sum(len(e.text) for e in output) <= agent_logs.RING_BYTES
    assert sandbox.sh("echo alive", timeout=10).stdout == "alive\n"


def test_service_answers_others_while_a_long_line_streams(service_env: ServiceEnv):
    """Other commands of the same client answer while a 32 MiB line streams through it
    (the quadratic re-split held the client's event loop for ~20 s)."""
    with Sandbox.create() as busy, Sandbox.create() as other:
        other.sh("true")
        done = threading.Event()
        results: list[int] = []

        def stream_long_lines() -> None:
            try:
                for _ in range(3):
                    results.append(len(busy.sh(LONG_LINE, timeout=120).stdout_bytes))
            finally:
                done.set()

        thread = threading.Thread(target=stream_long_lines)
        thread.start()
        slowest = 0.0
        while not done.is_set():
            started = time.monotonic()
            assert other.sh("echo hi", timeout=30).stdout == "hi\n"
            slowest = max(slowest, time.monotonic() - started)
        thread.join()
        assert results == [32 * MiB] * 3
        assert slowest < 10, f"a small command waited {slowest:.1f} s behind the long line"
