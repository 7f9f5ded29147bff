"""Local directory trees as tar streams, for uploads (downloads: ``untrusted.extract``)."""

from __future__ import annotations

import os
import tarfile
from pathlib import Path
from typing import IO


def add_tree(source: Path, out: IO[bytes]) -> None:
    """Write the contents of `source` (modes kept, symlinks as symlinks) as a tar stream.

    The tree is walked with an explicit stack, so any depth works.
    """
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        pending = _children(source, "")
        while pending:
            path, arcname = pending.pop()
            tar.add(path, arcname=arcname, recursive=False)
            if path.is_dir() and not path.is_symlink():
                pending += _children(path, arcname + "/")


def _children(directory: Path, prefix: str) -> list[tuple[Path, str]]:
    """Entries of `directory`, last name first (a stack pops them in name order)."""
    names = sorted(os.listdir(directory), reverse=True)
    return [(directory / name, prefix + name) for name in names]
