"""The sandbox's /etc/passwd and /etc/group: one user `sandbox`, the same on every backend.

uid and gid 1000 are `sandbox` (home /home/sandbox, shell /bin/bash), so ``whoami``,
``id`` and ``getent passwd sandbox`` answer alike in a bubblewrap sandbox and in a pod,
and programs that look the user up (scp, OpenSSH's sftp-server, git, pip) find it.
"""

from __future__ import annotations

from ..agent import protocol


def account_files() -> dict[str, str]:
    """The text of the sandbox's passwd and group files, by file name."""
    user, uid, home = protocol.SANDBOX_USER, protocol.SANDBOX_UID, protocol.SANDBOX_HOME
    return {
        "passwd": f"root:x:0:0:root:/root:/bin/bash\n{user}:x:{uid}:{uid}:Sandbox user:"
        f"{home}:/bin/bash\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n",
        "group": f"root:x:0:\n{user}:x:{uid}:\nnogroup:x:65534:\n",
    }
