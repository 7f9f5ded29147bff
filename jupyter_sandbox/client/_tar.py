"""Directory trees as tar streams, written and unpacked safely on the client's side."""

from __future__ import annotations

import os
import tarfile
from pathlib import Path
from typing import IO


def add_tree(source: Path, out: IO[bytes]) -> None:
    """Write the contents of `source` (modes kept, symlinks as symlinks) as a tar stream."""
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for child in sorted(source.iterdir()):
            tar.add(child, arcname=child.name, recursive=True)


def extract_tree(source: IO[bytes], target: Path) -> None:
    """Unpack a tar stream into `target`; nothing may be written outside it."""
    target.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=source, mode="r|") as tar:
        for member in tar:
            tar.extract(member, target, filter=_keep_symlinks_filter)
    while source.read(1 << 16):  # the padding after the last member
        pass


def _keep_symlinks_filter(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo:
    """`data` safety (nothing written outside `dest`), but symlinks stay as they were."""
    if member.issym():
        checked = tarfile.tar_filter(member, dest)
        where = os.path.realpath(os.path.join(dest, os.path.dirname(checked.name)))
        if os.path.commonpath([where, os.path.realpath(dest)]) != os.path.realpath(dest):
            raise tarfile.OutsideDestinationError(member, where)
        return checked
    return tarfile.data_filter(member, dest)
