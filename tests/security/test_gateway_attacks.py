"""Attacks on the SSH gateway's recordings, workers and audit lines, each tried for real."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from jupyter_sandbox.ssh import recording
from jupyter_sandbox.ssh.recording import Recording


def _disk_taken(directory: Path) -> int:
    return sum(entry.stat().st_blocks * 512 for entry in os.scandir(directory))


@pytest.mark.unprivileged
def test_many_tiny_recordings_cannot_fill_the_disk_or_its_inodes(tmp_path: Path) -> None:
    """A token holder who opens pty session after pty session, each ending at once, leaves
    a header-only recording each time (about 200 bytes, but a block and an inode on disk).
    Counting lengths only, 256 MiB of them is over a million files: gigabytes of blocks and
    the host's inodes. The sandbox's recordings must be bounded by what they take."""
    sandbox_dir = tmp_path / "sandbox"
    sandbox_dir.mkdir()
    refused = None
    for _ in range(5000):
        try:
            Recording.start(sandbox_dir, 80, 24, "xterm", "shell").close()
        except OSError as e:
            refused = e
            break
    directory = sandbox_dir / recording.DIRECTORY
    assert refused is not None, f"{len(os.listdir(directory))} recordings started, none refused"
    assert refused.errno == errno.EDQUOT
    assert "recordings" in str(refused)
    files = len(os.listdir(directory))
    assert files <= 1000
    assert _disk_taken(directory) <= recording.SANDBOX_LIMIT
    assert len(recording.list_recordings(sandbox_dir)) == files  # all of them still listed
