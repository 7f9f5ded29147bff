"""Wire format between the sandbox service and the agent (stdlib only).

A connection to the agent carries one request: a JSON object on one line,
then frames in both directions. A frame is a 5-byte header (kind, payload
length) followed by the payload. The same framing is used for streamed HTTP
responses of the service, so a client reads exec output the same way.
"""

from __future__ import annotations

import enum
import json
import os
import stat
import struct

VERSION = 2  # 2: file and tar transfers through a passed pipe
PIPE_VERSION = 2
HEADER = struct.Struct(">BI")
MAX_FRAME = 1 << 20
CHUNK = 256 * 1024
# The service's HTTP body for a command with input: its JSON request on one line, then
# the input as raw bytes to the end of the body, at most MAX_INPUT bytes of it.
COMMAND_WITH_INPUT = "application/x-sandbox-command"
MAX_INPUT = 256 << 20

AGENT_SOCKET = "agent.sock"
SANDBOX_HOME = "/home/sandbox"
SANDBOX_USER = "sandbox"
SANDBOX_UID = 1000
STATE_MOUNT = "/run/sandbox"
AGENT_MOUNT = "/run/sandbox-agent"  # the agent's files, read-only, byte-compiled
PYTHON = "/usr/bin/python3"  # the sandbox's Python: runs the agent and its programs
POD_AGENT_DIR = "/opt/jupyter-sandbox/agent"  # in a pod: the agent's sources (a ConfigMap)
# The built-in SFTP server, for sandboxes without OpenSSH's (a program, not an agent module):
# byte-compiled in a local sandbox's agent mount, a source file in a pod.
SFTP_SERVER = f"{AGENT_MOUNT}/sftp_server.pyc"
POD_SFTP_SERVER = f"{POD_AGENT_DIR}/sftp_server.py"
EXIT_USER_INIT_LOST = 73  # the agent's exit code when the sandbox's init process died
FILES_ONLY = "files-only"  # the agent's last argument when it serves file operations only


class Frame(enum.IntEnum):
    STDIN = 0
    STDOUT = 1
    STDERR = 2
    EXIT = 3
    SIGNAL = 4
    RESIZE = 5
    EOF = 6
    DATA = 7
    END = 8
    ERROR = 9
    RESULT = 10
    FD = 11  # "send me the pipe now": the next message carries a descriptor


def encode(kind: int, payload: bytes = b"") -> bytes:
    """One frame as bytes."""
    return HEADER.pack(kind, len(payload)) + payload


def encode_json(kind: int, obj: object) -> bytes:
    return encode(kind, json.dumps(obj, separators=(",", ":")).encode())


def request_line(op: str, **args: object) -> bytes:
    return json.dumps({"op": op, **args}, separators=(",", ":")).encode() + b"\n"


def exit_status(returncode: int) -> dict:
    """Exit code as a shell reports it (128+N for a signal), with the signal number."""
    if returncode < 0:
        return {"exit_code": 128 - returncode, "signal": -returncode}
    return {"exit_code": returncode, "signal": None}


def check_tar_member(root: str, member) -> None:
    """Make a tar member safe to extract under `root`, or raise ValueError.

    Names may not leave `root`, not even through symlinks extracted earlier;
    only files, directories and links are allowed; set-id bits are dropped.
    Symlinks themselves keep their targets (they are extracted, never followed).
    """
    name = os.path.normpath(member.name)
    if os.path.isabs(name) or name == ".." or name.startswith("../"):
        raise ValueError(f"archive member leaves the target: {member.name}")
    if not (member.isfile() or member.isdir() or member.issym() or member.islnk()):
        raise ValueError(f"unsupported archive member: {member.name}")
    real_root = os.path.realpath(root)
    parent = os.path.realpath(os.path.join(root, os.path.dirname(name)))
    if os.path.commonpath([parent, real_root]) != real_root:
        raise ValueError(f"archive member leaves the target: {member.name}")
    if member.islnk():
        link = os.path.normpath(member.linkname)
        if os.path.isabs(link) or link == ".." or link.startswith("../"):
            raise ValueError(f"hard link leaves the target: {member.name}")
    destination = os.path.join(parent, os.path.basename(name))
    if not member.isdir() and os.path.islink(destination):
        os.unlink(destination)  # never write through a link an earlier member made
    member.mode &= 0o7777 & ~(stat.S_ISUID | stat.S_ISGID)
