"""Host-side tree helpers for the tests: no recursion, links never followed."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path


def walk(root: Path) -> Iterator[tuple[str, os.stat_result]]:
    """(relative name, lstat) of everything under `root`, at any depth."""
    pending = [""]
    while pending:
        relative = pending.pop()
        for name in os.listdir(root / relative):
            path = os.path.join(relative, name)
            st = os.lstat(root / path)
            yield path, st
            if stat.S_ISDIR(st.st_mode):
                pending.append(path)


def remove(root: Path) -> None:
    """Delete a tree of any depth (pytest's own cleanup recurses)."""
    directories = [""]
    for name, st in walk(root):
        if stat.S_ISDIR(st.st_mode):
            os.chmod(root / name, 0o700)
            directories.append(name)
        else:
            os.unlink(root / name)
    for name in sorted(directories, key=len, reverse=True):
        os.rmdir(root / name)
