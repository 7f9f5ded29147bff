"""The gateway's persistent host key, so clients can pin it across restarts."""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

import asyncssh

KEY_FILE = "ssh_host_ed25519_key"


def load_host_key(directory: Path) -> asyncssh.SSHKey:
    """The ed25519 host key kept in `directory`, created (mode 0600) on first use."""
    path = directory / KEY_FILE
    if not path.exists():
        _create(path)
    return asyncssh.read_private_key(path)


def _create(path: Path) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = asyncssh.generate_private_key("ssh-ed25519")
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(key.export_private_key())
        with contextlib.suppress(FileExistsError):  # another process won the race: use its key
            os.link(tmp, path)
    finally:
        os.unlink(tmp)


def fingerprint(key: asyncssh.SSHKey) -> str:
    """The key's fingerprint as OpenSSH prints it (``SHA256:...``)."""
    return key.get_fingerprint("sha256")


def known_hosts_line(key: asyncssh.SSHKey, hostname: str, port: int) -> str:
    """A known_hosts line pinning `key` for `hostname` and `port`."""
    algorithm, blob = key.export_public_key("openssh").decode().split()[:2]
    host = hostname if port == 22 else f"[{hostname}]:{port}"
    return f"{host} {algorithm} {blob}"
