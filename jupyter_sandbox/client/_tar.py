"""Directory trees as tar streams, written and unpacked safely on the client's side."""

from __future__ import annotations

import tarfile
from pathlib import Path
from typing import IO

from .._errors import FileError
from ..agent import protocol


def add_tree(source: Path, out: IO[bytes]) -> None:
    """Write the contents of `source` (modes kept, symlinks as symlinks) as a tar stream."""
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for child in sorted(source.iterdir()):
            tar.add(child, arcname=child.name, recursive=True)


def extract_tree(source: IO[bytes], target: Path) -> None:
    """Unpack a tar stream into `target`; nothing may be written outside it."""
    target.mkdir(parents=True, exist_ok=True)
    # Members are checked here, on every Python version; tarfile's own filters
    # (3.11.4+) would refuse absolute symlinks, which must stay as they are.
    trusted = {"filter": "fully_trusted"} if hasattr(tarfile, "fully_trusted_filter") else {}
    with tarfile.open(fileobj=source, mode="r|") as tar:
        for member in tar:
            try:
                protocol.check_tar_member(str(target), member)
            except ValueError as e:
                raise FileError(str(e)) from None
            tar.extract(member, target, set_attrs=not member.issym(), **trusted)
    while source.read(1 << 16):  # the padding after the last member
        pass
