"""Listening sockets the supervisor holds across restarts: the SSH gateway's (which
port, bound by whom) and the TCP API's (`serve --tcp`).

While a service restarts, its ports would be free for any local user to take, and
with them the logins, tokens and requests meant for the service. The supervisor
binds them once and hands them to each service it starts. Stdlib only: the
supervisor stays small.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
from collections.abc import Mapping
from pathlib import Path

log = logging.getLogger("jupyter_sandbox.service")
DEFAULT_PORT = 2222
PORT_FILE = "ssh_port"  # "<port listened on> <port configured then>"
# The fd of the gateway's listening socket, bound by the supervisor and kept across
# restarts, so no other process can take the port while the service is down.
LISTEN_FD_ENV = "JUPYTER_SANDBOX_SSH_LISTEN_FD"
API_LISTEN_FD_ENV = "JUPYTER_SANDBOX_API_LISTEN_FD"  # the same for `serve --tcp`


def configured_address(environ: Mapping[str, str] = os.environ) -> tuple[str, int]:
    """The host and port the gateway is configured to listen on."""
    host = environ.get("JUPYTER_SANDBOX_SSH_HOST", "127.0.0.1")
    return host, int(environ.get("JUPYTER_SANDBOX_SSH_PORT", DEFAULT_PORT))


def listening_socket(key_dir: Path, host: str, port: int) -> socket.socket:
    """A socket listening on the port used last, so the `ssh -p PORT` commands handed
    out still work after a restart; else on `port`, else on any free one.

    The last port counts only while `port` is the one it was chosen for: a new
    configuration takes effect at the next start. Losing the last port to another
    process is logged: whoever holds it now receives the logins meant for us.
    """
    candidates = [port]
    last = None
    with contextlib.suppress(OSError, ValueError):
        last, configured = (int(n) for n in (key_dir / PORT_FILE).read_text().split())
        if configured == port:
            candidates.insert(0, last)
    for candidate in dict.fromkeys(candidates):
        try:
            return bind_listener(host, candidate)
        except OSError as e:
            if e.errno != errno.EADDRINUSE:
                raise
            if candidate == last:
                log.warning(
                    "SSH: port %d, used last, is taken by another process; `ssh -p %d` "
                    "commands handed out before reach that process, not this service",
                    last,
                    last,
                )
    return bind_listener(host, 0)


def bind_listener(host: str, port: int) -> socket.socket:
    if not host and socket.has_dualstack_ipv6():  # every address, IPv4 and IPv6
        return socket.create_server(
            ("", port), family=socket.AF_INET6, backlog=socket.SOMAXCONN, dualstack_ipv6=True
        )
    family, _, _, _, address = socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    return socket.create_server(address, family=family, backlog=socket.SOMAXCONN)


def inherited_socket(
    name: str = LISTEN_FD_ENV, environ: Mapping[str, str] = os.environ
) -> socket.socket | None:
    """The listening socket the supervisor handed down in `name`, if it did."""
    fd = environ.get(name)
    if not fd:
        return None
    sock = socket.socket(fileno=int(fd))
    sock.set_inheritable(False)  # not for the sandboxes this service starts
    return sock
