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

from .._errors import FileError, FileNotFound, PermissionDenied
from ..agent import protocol
from ..agent.remote import AgentClient

SFTP_SERVERS = (
    "/usr/lib/openssh/sftp-server",  # Debian, Ubuntu
    "/usr/libexec/openssh/sftp-server",  # Fedora, RHEL
    "/usr/libexec/sftp-server",  # Alpine, Arch
    "/usr/lib/ssh/sftp-server",  # Arch (older)
)
# The built-in server where each backend puts the agent's code, with the Python that runs
# the agent there: the local sandbox's /usr/bin/python3, a pod's python3 on its image's PATH.
BUILTIN_SERVERS = (
    (protocol.PYTHON, protocol.SFTP_SERVER),
    ("python3", protocol.POD_SFTP_SERVER),
)
SETTING = "JUPYTER_SANDBOX_SFTP"  # read into Settings.sftp


class SubsystemUnavailable(Exception):
    """The client asked for a subsystem this sandbox cannot serve."""


async def sftp_server_argv(agent: AgentClient, choice: str = "auto") -> list[str]:
    """The command that serves SFTP inside the sandbox, as `choice` (Settings.sftp) says."""
    if choice != "builtin":
        for path in SFTP_SERVERS:
            if await _is_file(agent, path):
                return [path]
        if choice != "auto":
            raise SubsystemUnavailable(
                f"SFTP is unavailable: {SETTING}=openssh, but the sandbox has no OpenSSH "
                "sftp-server (install the openssh-sftp-server package on the host, or unset "
                f"{SETTING} to use the built-in server)"
            )
    return await _builtin_argv(agent)


async def _builtin_argv(agent: AgentClient) -> list[str]:
    """The built-in server's command: the sandbox's answers only choose a known layout."""
    for python, program in BUILTIN_SERVERS:
        if await _is_file(agent, program):
            return [python, "-E", "-s", "-S", "-B", program]
    raise SubsystemUnavailable(
        "SFTP is unavailable: the sandbox's agent has no built-in SFTP server at "
        f"{' or '.join(program for _, program in BUILTIN_SERVERS)} (restart the sandbox so "
        "its agent is installed again)"
    )


async def _is_file(agent: AgentClient, path: str) -> bool:
    """Whether the sandbox has a program at `path`; an unreachable agent raises SandboxError."""
    try:
        info = await agent.call("stat", path=path)
    except (FileNotFound, FileError, PermissionDenied):
        return False
    return info["type"] in ("file", "symlink")
