"""File names that come from a sandbox: one safe component each, bounded in length."""

from __future__ import annotations

import os
import posixpath

from .._errors import FileError

MAX_NAME = 255  # bytes of one component (NAME_MAX)
MAX_PATH = 64 * 1024  # bytes of a tree member's whole name
MAX_LINK = 4095  # bytes of a symlink target (PATH_MAX - 1)


def _size(text: str) -> int:
    try:
        return len(os.fsencode(text))
    except UnicodeEncodeError:
        raise FileError(f"the sandbox sent a name that is not valid text: {text[:200]!r}") from None


def check_name(name: object, what: str = "file name") -> str:
    """`name` if it is one path component safe to create on the host, else FileError."""
    if not isinstance(name, str):
        raise FileError(f"the sandbox sent a {what} that is not a string")
    if name in ("", ".", "..") or "/" in name or "\0" in name:
        raise FileError(f"the sandbox sent an unsafe {what}: {name!r}")
    if _size(name) > MAX_NAME:
        raise FileError(f"the sandbox sent a {what} longer than {MAX_NAME} bytes")
    return name


def remote_name(remote: str) -> str:
    """The host name for a download of `remote` into a directory: its last component."""
    name = posixpath.basename(remote.rstrip("/"))
    if name in ("", ".", "..") or "\0" in name or len(os.fsencode(name)) > MAX_NAME:
        raise FileError(f"{remote!r} has no file name to download into a directory under")
    return name


def member_parts(name: object) -> list[str]:
    """The components of a tree member's relative name; each one checked.

    A trailing slash (directories) is allowed; empty, '.' and '..' components,
    absolute names and NUL bytes are not.
    """
    if not isinstance(name, str) or not name:
        raise FileError(f"the sandbox sent an archive member without a name: {name!r}")
    if _size(name) > MAX_PATH:
        raise FileError(f"the sandbox sent an archive member name over {MAX_PATH} bytes")
    if name.startswith("/"):
        raise FileError(f"the sandbox sent an absolute archive member name: {name[:200]!r}")
    parts = name[:-1].split("/") if name.endswith("/") else name.split("/")
    return [check_name(part, "archive member name") for part in parts]


def check_link_target(target: object) -> str:
    """A symlink target: any text without NUL, bounded (it is created, never followed)."""
    if not isinstance(target, str) or not target or "\0" in target:
        raise FileError(f"the sandbox sent an unsafe symlink target: {target!r}")
    if _size(target) > MAX_LINK:
        raise FileError(f"the sandbox sent a symlink target over {MAX_LINK} bytes")
    return target
