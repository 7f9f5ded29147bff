"""The SFTP subsystem, served inside the sandbox: by OpenSSH's sftp-server or the built-in one.

The gateway never touches sandbox files itself: the agent starts the server as the
sandbox user in the sandbox's namespaces, and the gateway only relays the SFTP byte
stream (see ``session``). Paths, symlinks and permissions are therefore resolved by the
sandbox's own kernel view, exactly as for a shell.

Which server runs is a setting, ``JUPYTER_SANDBOX_SFTP``: ``auto`` (the default) runs
OpenSSH's sftp-server where the host has one and the built-in server
(``agent/sftp_server.py``) where it has not; ``openssh`` and ``builtin`` insist on one.
"""

from __future__ import annotations

from .._errors import SandboxError
from ..agent import protocol
from ..agent.remote import AgentClient

SFTP_SERVERS = (
    "/usr/lib/openssh/sftp-server",  # Debian, Ubuntu
    "/usr/libexec/openssh/sftp-server",  # Fedora, RHEL
    "/usr/libexec/sftp-server",  # Alpine, Arch
    "/usr/lib/ssh/sftp-server",  # Arch (older)
)
BUILTIN_ARGV = [protocol.PYTHON, "-E", "-s", "-S", "-B", protocol.SFTP_SERVER]
SETTING = "JUPYTER_SANDBOX_SFTP"  # read into Settings.sftp


class SubsystemUnavailable(Exception):
    """The client asked for a subsystem this sandbox cannot serve."""


async def sftp_server_argv(agent: AgentClient, choice: str = "auto") -> list[str]:
    """The command that serves SFTP inside the sandbox, as `choice` (Settings.sftp) says."""
    if choice == "builtin":
        return BUILTIN_ARGV
    for path in SFTP_SERVERS:
        try:
            info = await agent.call("stat", path=path)
        except SandboxError:
            continue
        if info["type"] in ("file", "symlink"):
            return [path]
    if choice == "auto":
        return BUILTIN_ARGV
    raise SubsystemUnavailable(
        f"SFTP is unavailable: {SETTING}=openssh, but the sandbox has no OpenSSH "
        "sftp-server (install the openssh-sftp-server package on the host, or unset "
        f"{SETTING} to use the built-in server)"
    )
