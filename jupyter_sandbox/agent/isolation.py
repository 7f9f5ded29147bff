"""Puts the agent out of reach of the code it runs (stdlib only, ctypes).

bwrap starts the agent with CAP_SYS_ADMIN in the sandbox's user namespace. The
agent makes itself non-dumpable (no ptrace, no ``/proc/PID/mem``, no
``pidfd_getfd``), then one thread of it, the spawner, unshares a mount and a pid
namespace for itself. Its first child, the "user init", becomes pid 1 of the new
pid namespace and mounts a ``/proc`` that shows only that namespace. Every
command the agent starts is forked by the spawner and lands there too: the agent
has no pid in it, so ``kill -1``, ``prlimit``, ``ptrace`` and ``pidfd_open``
cannot name it. The agent's state directory is covered by an empty read-only
tmpfs in the agent's own mount namespace (which the spawner's copies), so no path,
not even a link user code plants, resolves into it: the agent reaches its state
only through a directory descriptor opened before. The agent's threads and the
user init then install the lockdown syscall filter, if one was given, and drop
every capability before any user code runs.

The user init is the one process user code can still name. A pid namespace's
init gets no signal it has no handler for from inside the namespace; it ignores
every signal (so its children are reaped by the kernel) and blocks every signal,
including the two glibc keeps handlers for (32 and 33, which glibc's
``sigprocmask`` refuses to block), so no signal ever wakes it: it only sleeps
and spends no CPU time a lowered ``RLIMIT_CPU`` could count.
"""

from __future__ import annotations

import ctypes
import os
import platform
import signal
import struct
import subprocess
import sys
import threading

import protocol

CLONE_FS = 0x00000200
CLONE_NEWNS = 0x00020000
CLONE_NEWPID = 0x20000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
PR_SET_NAME = 15
PR_SET_DUMPABLE = 4
PR_SET_SECCOMP = 22
PR_CAPBSET_DROP = 24
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
SECCOMP_MODE_FILTER = 2
SIG_BLOCK = 0
# rt_sigprocmask's syscall number: glibc's wrapper leaves its own signals unblocked.
RT_SIGPROCMASK = {"x86_64": 14, "aarch64": 135, "riscv64": 135, "ppc64le": 174, "s390x": 175}
CAPABILITY_VERSION_3 = 0x20080522
PROC_FLAGS = MS_NOSUID | MS_NODEV | MS_NOEXEC
# What bwrap covers read-only in the /proc it mounts; the new /proc gets the same.
PROC_READ_ONLY = ("sys", "sysrq-trigger", "irq", "bus")
FAILED = "sandbox agent: cannot isolate itself from user code"
SOCK_FILTER = struct.Struct("=HBBI")  # struct sock_filter: code, jt, jf, k
MAX_FILTER = 4096  # BPF_MAXINSNS

_libc = ctypes.CDLL(None, use_errno=True)
_ulong = ctypes.c_ulong
_libc.prctl.argtypes = [ctypes.c_int, _ulong, _ulong, _ulong, _ulong]
_libc.mount.argtypes = [ctypes.c_char_p] * 3 + [_ulong, ctypes.c_char_p]
_libc.unshare.argtypes = [ctypes.c_int]
_libc.capset.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
_libc.syscall.restype = ctypes.c_long


class SetupError(Exception):
    """The isolation could not be set up; the agent must not serve."""


class SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


class Isolation:
    """The agent's side of the setup: the user init and the spawner."""

    def __init__(self, spawner: Spawner, state_dir: int) -> None:
        self.spawner = spawner
        self.state_dir = state_dir  # a descriptor: no path leads there any more
        self.host_disk = state_dir  # on the host's disk, as the sandbox's directory is

    own_popen = staticmethod(subprocess.Popen)  # the agent's own helpers, in its namespaces

    def popen(self, args: list, **kwargs) -> subprocess.Popen:
        """``subprocess.Popen``, started in the user's pid namespace."""
        return self.spawner.call(subprocess.Popen, args, **kwargs)

    def inner_pid(self, pid: int) -> int:
        """`pid` (as the agent names it) as the sandbox user sees it, from NSpid."""
        with open(f"/proc/{pid}/status", "rb") as f:  # the agent's /proc: it names both
            status = f.read()
        for line in status.splitlines():
            if line.startswith(b"NSpid:"):
                return int(line.split()[-1])
        raise ProcessLookupError(pid)

    def wait_user_init(self) -> int:
        """Block until the user init ends; its wait status."""
        pid = self.spawner.user_init()
        while True:
            try:
                return os.waitpid(pid, 0)[1]
            except InterruptedError:
                continue


class Spawner:
    """The one thread whose children land in the user's namespaces.

    Namespaces are per thread: after ``unshare(CLONE_NEWPID)`` a thread may fork
    into the new namespace but can never start a thread again, so this thread
    unshares it alone and forks on behalf of all others; the rest of the agent
    keeps starting threads, and keeps its own mount namespace and ``/proc``.

    The agent serves while this thread still sets up (start-up time counts); a
    request for a command waits for it. If the setup fails, the agent ends.
    """

    def __init__(self, lockdown: bytes | None, user_cgroup: list[int]) -> None:
        self.lockdown = lockdown
        self.user_cgroup = user_cgroup
        self._user_init = 0
        self._requests: list = []
        self._cond = threading.Condition()
        self._ready = threading.Event()
        threading.Thread(target=self._run, daemon=True, name="spawner").start()

    def user_init(self) -> int:
        """The user init's pid, once it is ready."""
        self._ready.wait()
        return self._user_init

    def call(self, function, *args, **kwargs):
        """`function(*args, **kwargs)` run on the spawner thread."""
        done = threading.Event()
        outcome: list = []
        with self._cond:
            self._requests.append((function, args, kwargs, done, outcome))
            self._cond.notify()
        done.wait()
        ok, value = outcome[0]
        if not ok:
            raise value
        return value

    def _run(self) -> None:
        try:
            self._user_init = _start_user_init(self.lockdown, self.user_cgroup)
        except BaseException as e:  # no isolation, no agent
            print(f"{FAILED}: {e}", file=sys.stderr, flush=True)
            os._exit(1)
        self._ready.set()
        while True:
            try:
                with self._cond:
                    self._cond.wait_for(lambda: self._requests)
                    function, args, kwargs, done, outcome = self._requests.pop(0)
                try:
                    outcome.append((True, function(*args, **kwargs)))
                except BaseException as e:  # raised in the caller
                    outcome.append((False, e))
                done.set()
            except BaseException:  # this thread may never end
                continue


def enter(lockdown: bytes | None, user_cgroup: list[int]) -> Isolation:
    """Set the agent apart from user code; see the module docstring.

    `user_cgroup`: descriptors of the user's cgroup ``tasks`` files, which the
    spawner writes "0" to, moving itself (alone) there before it forks user code.
    Must run before the agent reads any request.
    """
    _check(_libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0), "prctl(PR_SET_DUMPABLE)")
    state_dir = _cover_state()
    spawner = Spawner(lockdown, user_cgroup)
    lock_down(lockdown)
    return Isolation(spawner, state_dir)


def _join_user_cgroup(tasks_fds: list[int]) -> None:
    """Move the calling thread alone into the user's cgroup, then close the descriptors."""
    for fd in tasks_fds:
        try:
            os.write(fd, b"0")
        except OSError as e:
            raise SetupError(f"cannot join the user's cgroup: {e}") from None
        finally:
            os.close(fd)


def _cover_state() -> int:
    """While single-threaded: a mount namespace of the agent's own, with its state
    directory covered; a descriptor of that directory, the one way left to it."""
    _check(_libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS) for the agent")
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    state_dir = os.open(protocol.STATE_MOUNT, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    _mount("none", protocol.STATE_MOUNT, "tmpfs", MS_RDONLY | PROC_FLAGS, "size=4k,mode=0555")
    return state_dir


def _start_user_init(lockdown: bytes | None, user_cgroup: list[int]) -> int:
    """On the spawner thread: new mount and pid namespaces, the init, then into the
    user's cgroup and lock down.

    The init stays in the agent's cgroup: in the user's, an OOM there (user code
    filling a memfd, say) could pick it, and the sandbox would end with it.
    """
    _check(_libc.unshare(CLONE_FS | CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    _check(_libc.unshare(CLONE_NEWPID), "unshare(CLONE_NEWPID)")
    ready_read, ready_write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(ready_read)
        _user_init(ready_write, lockdown)
    os.close(ready_write)
    with os.fdopen(ready_read, "rb") as ready:
        error = ready.read()
    if error:
        os.waitpid(pid, 0)
        raise SetupError(error.decode(errors="replace"))
    _join_user_cgroup(user_cgroup)
    lock_down(lockdown)
    return pid


def _user_init(ready: int, lockdown: bytes | None) -> None:
    """Pid 1 of the user's pid namespace: mount its /proc, lock down, then only sleep."""
    for sig in signal.valid_signals():
        if sig not in (signal.SIGKILL, signal.SIGSTOP):
            try:
                signal.signal(sig, signal.SIG_IGN)  # SIGCHLD ignored: the kernel reaps
            except (OSError, ValueError):
                pass
    try:
        _block_every_signal()
        _mount("proc", "/proc", "proc", PROC_FLAGS)
        for name in PROC_READ_ONLY:
            path = f"/proc/{name}"
            if os.path.exists(path):
                _mount(path, path, None, MS_BIND | MS_REC)
                _mount(None, path, None, MS_BIND | MS_REMOUNT | MS_RDONLY | PROC_FLAGS)
        _rename(b"sandbox-init")
        lock_down(lockdown)
        os.closerange(3, ready)
        os.closerange(ready + 1, 1 << 16)
        null = os.open("/dev/null", os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.close(null)
    except BaseException as e:  # the agent reports it
        os.write(ready, f"user init: {e}".encode())
        os._exit(1)
    os.close(ready)
    while True:
        try:
            signal.pause()
        except BaseException:  # nothing may end this process
            pass


def _block_every_signal() -> None:
    """Block all signals of this thread with the raw syscall (glibc's own ones too)."""
    number = RT_SIGPROCMASK.get(platform.machine())
    if number is None:
        raise SetupError(f"rt_sigprocmask: unknown architecture {platform.machine()}")
    every = ctypes.c_uint64((1 << 64) - 1)
    size = ctypes.sizeof(every)
    _check(_libc.syscall(number, SIG_BLOCK, ctypes.byref(every), None, size), "rt_sigprocmask")


def _rename(name: bytes) -> None:
    """What ``ps`` shows for this process: `name`, over the agent's command line."""
    comm = ctypes.create_string_buffer(name)
    _libc.prctl(PR_SET_NAME, ctypes.addressof(comm), 0, 0, 0)
    with open("/proc/self/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    arg_start, arg_end = int(fields[45]), int(fields[46])  # fields 48 and 49 of stat
    ctypes.memmove(arg_start, name.ljust(arg_end - arg_start, b"\0"), arg_end - arg_start)


def lock_down(lockdown: bytes | None) -> None:
    """Install the lockdown filter (if any), then drop every capability."""
    if lockdown:
        install_filter(lockdown)
    for cap in range(64):
        if _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 and ctypes.get_errno() == 1:
            raise SetupError("cannot drop the capability bounding set (no CAP_SETPCAP)")
    _check(
        _libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0),
        "prctl(PR_CAP_AMBIENT_CLEAR_ALL)",
    )
    header = struct.pack("=Ii", CAPABILITY_VERSION_3, 0)
    data = bytes(24)  # two all-zero {effective, permitted, inheritable}
    _check(_libc.capset(header, data), "capset")


def install_filter(program: bytes) -> None:
    """Install a classic BPF program (an array of struct sock_filter) as a seccomp filter."""
    count, rest = divmod(len(program), SOCK_FILTER.size)
    if rest or not 0 < count <= MAX_FILTER:
        raise SetupError(f"the lockdown filter is not a BPF program ({len(program)} bytes)")
    buffer = ctypes.create_string_buffer(program, len(program))
    fprog = SockFprog(count, ctypes.cast(buffer, ctypes.c_void_p))
    _check(
        _libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(fprog), 0, 0),
        "prctl(PR_SET_SECCOMP)",
    )


def read_filter(fd: int) -> bytes:
    """All of a filter descriptor's contents, then close it."""
    chunks = []
    try:
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks)


def _mount(
    source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None
) -> None:
    source_b, fstype_b, data_b = (None if s is None else s.encode() for s in (source, fstype, data))
    _check(_libc.mount(source_b, target.encode(), fstype_b, flags, data_b), f"mount {target}")


def _check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise SetupError(f"{what}: {os.strerror(errno)}")
