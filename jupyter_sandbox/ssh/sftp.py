"""The SFTP subsystem, served by OpenSSH's sftp-server running inside the sandbox.

The gateway never touches sandbox files itself: the agent starts sftp-server
as the sandbox user in the sandbox's namespaces, and the gateway only relays
the SFTP byte stream (see ``session``). Paths, symlinks and permissions are
therefore resolved by the sandbox's own kernel view, exactly as for a shell.
"""

from __future__ import annotations

from .._errors import SandboxError
from ..agent.remote import AgentClient

SFTP_SERVERS = (
    "/usr/lib/openssh/sftp-server",  # Debian, Ubuntu
    "/usr/libexec/openssh/sftp-server",  # Fedora, RHEL
    "/usr/libexec/sftp-server",  # Alpine, Arch
    "/usr/lib/ssh/sftp-server",  # Arch (older)
)


class SubsystemUnavailable(Exception):
    """The client asked for a subsystem this sandbox cannot serve."""


async def sftp_server_argv(agent: AgentClient) -> list[str]:
    """The command that serves SFTP inside the sandbox."""
    for path in SFTP_SERVERS:
        try:
            info = await agent.call("stat", path=path)
        except SandboxError:
            continue
        if info["type"] in ("file", "symlink"):
            return [path]
    raise SubsystemUnavailable(
        "SFTP is unavailable: no sftp-server inside the sandbox (install the "
        "openssh-sftp-server package on the host); legacy `scp -O` still works"
    )
