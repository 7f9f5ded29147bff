"""Private OpenSSH client configs: how the project runs ``ssh`` without a token in argv.

The token is the SSH username, and every user can read every process's argv
(``ps``). So the project never runs ``ssh TOKEN@host``: it writes the user into
a 0600 config file and runs ``ssh -F FILE sandbox``.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

HOST_ALIAS = "sandbox"


def write_ssh_config(
    path: Path, host: str, port: int, user: str, known_hosts: Path, *, log_level: str = "ERROR"
) -> None:
    """A config for ``ssh -F path sandbox``, created 0600 (never through a link)."""
    text = (
        f"Host {HOST_ALIAS}\n"
        f"  HostName {_quoted(host)}\n"
        f"  Port {int(port)}\n"
        f"  User {_quoted(user)}\n"
        f"  UserKnownHostsFile {_quoted(str(known_hosts))}\n"
        "  StrictHostKeyChecking yes\n"
        f"  LogLevel {log_level}\n"
    )
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    with os.fdopen(os.open(path, flags, 0o600), "w") as f:
        f.write(text)


@contextlib.contextmanager
def temporary_ssh_config(host: str, port: int, user: str, known_hosts: Path) -> Iterator[Path]:
    """A config as `write_ssh_config` makes, in a fresh private directory, removed after."""
    with tempfile.TemporaryDirectory(prefix="jupyter-sandbox-ssh-") as directory:
        path = Path(directory) / "config"
        write_ssh_config(path, host, port, user, known_hosts)
        yield path


def _quoted(value: str) -> str:
    if any(c in value for c in '"\n\r'):
        raise ValueError(f"cannot write {value!r} into an ssh config")
    return f'"{value}"'
