"""The agent as the main process of a Kubernetes pod (stdlib only, ctypes).

In a pod there is no bwrap and no capability: the container is the sandbox, the
agent is its pid 1 and user code runs as the same uid. What keeps user code away
from the agent here: it is non-dumpable before anything else happens (no ptrace,
no ``/proc/1/mem``, ``/proc/1/environ`` or ``/proc/1/fd``), and as pid 1 of its pid
namespace it gets no signal from inside that it has no handler for, SIGKILL
included. Its TLS credentials come in environment variables; they are removed
from its environment, and scrubbed from the copy the kernel shows as
``/proc/1/environ``, before any user process starts, and the key is loaded
through a memfd, never written to a path.

Being pid 1, the agent adopts what user code orphans (a double fork) and reaps
those zombies, without ever reaping a process it started itself: those belong to
the ``subprocess.Popen`` that waits for them, and their exit statuses with them.
SIGCHLD and SIGTERM are blocked in every thread and taken by one (``wait_user_init``):
a SIGCHLD makes it reap, a SIGTERM from outside the pid namespace (the kubelet
stopping the pod; its sender has no pid inside) ends the agent, one from inside is
ignored, and so is one whose sender wrote its own siginfo (``rt_sigqueueinfo``
claiming a sender from outside).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading

import protocol

CERT_ENV = "JUPYTER_SANDBOX_AGENT_CERT"
KEY_ENV = "JUPYTER_SANDBOX_AGENT_KEY"
PEER_ENV = "JUPYTER_SANDBOX_AGENT_PEER"
ADDRESS_ENV = "JUPYTER_SANDBOX_AGENT_ADDRESS"
PORT_ENV = "JUPYTER_SANDBOX_AGENT_PORT"
DEFAULT_ADDRESS = "0.0.0.0"
DEFAULT_PORT = 7000
PR_SET_DUMPABLE = 4
PR_SET_CHILD_SUBREAPER = 36
WATCHED = {signal.SIGCHLD, signal.SIGTERM}
# How a signal sent with kill(2) (SI_USER) or by the kernel (SI_KERNEL) is marked; a
# process may mark its own (rt_sigqueueinfo) only with a negative code, si_pid of its
# choosing included, so only these codes make si_pid 0 mean "from outside the pod".
SENT_BY_KILL = (0, 0x80)
REAP_INTERVAL = 2.0  # seconds between reaps even without a SIGCHLD (one may be missed)
BACKLOG = 128
FAILED = "sandbox agent (pod mode): cannot start"
WARNING = "sandbox agent (pod mode): warning"

_libc = ctypes.CDLL(None, use_errno=True)
_libc.prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4


class SetupError(Exception):
    """The pod-mode setup failed; the agent must not serve."""


class Credentials:
    """The agent's TLS pair and the one client certificate it admits (PEM bytes)."""

    def __init__(self, cert: bytes, key: bytes, peer: bytes) -> None:
        self.cert, self.key, self.peer = cert, key, peer


class PodIsolation:
    """What the agent needs from its setup, for a pod: no namespaces of its own.

    Compatible with ``isolation.Isolation``: ``popen``, ``inner_pid``, ``state_dir``,
    ``host_disk``, ``own_popen`` and ``wait_user_init``.
    """

    def __init__(self, state_dir: int) -> None:
        self.state_dir = state_dir  # a descriptor of the agent's state directory
        self.host_disk = None  # the node's disk is the kubelet's to watch, not ours
        self._children: dict[int, subprocess.Popen] = {}
        self._lock = threading.Lock()  # held while a child is started and while reaping

    def popen(self, args: list, **kwargs) -> subprocess.Popen:
        """``subprocess.Popen``, its process registered so that the reaper leaves it alone.

        The child must not inherit the agent's blocked signals: the calling thread
        unblocks them around the fork (a signal for the agent arriving on it then is
        dropped, as pid 1 drops what it has no handler for).
        """
        with self._lock:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, WATCHED)
            try:
                proc = subprocess.Popen(args, **kwargs)
            finally:
                signal.pthread_sigmask(signal.SIG_BLOCK, WATCHED)
            self._children[proc.pid] = proc
        return proc

    own_popen = popen  # the agent's own helpers (a `cat`) are children like any other

    def inner_pid(self, pid: int) -> int:
        """The agent and user code share one pid namespace: pids are the same."""
        return pid

    def wait_user_init(self) -> int:
        """Never returns: the agent is the pod's init (see the module docstring)."""
        while True:
            info = signal.sigtimedwait(WATCHED, REAP_INTERVAL)
            if info is not None and info.si_signo == signal.SIGTERM and _from_outside(info):
                os._exit(0)
            with contextlib.suppress(OSError):  # /proc unreadable for a moment: next time
                self.reap_orphans()

    def reap_orphans(self) -> list[int]:
        """Reap every zombie child the agent did not start itself; their pids."""
        reaped = []
        with self._lock:
            for pid, proc in list(self._children.items()):
                if proc.returncode is not None:  # waited for: its pid may be anyone's now
                    del self._children[pid]
            for pid in _zombie_children():
                if pid in self._children:
                    continue
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, os.WNOHANG)
                    reaped.append(pid)
        return reaped


def _from_outside(info: signal.struct_siginfo) -> bool:
    """Was this signal sent from outside the pod's pid namespace (the kubelet)? Its
    sender has no pid here, and the kernel, not the sender, filled in the siginfo."""
    return info.si_pid == 0 and info.si_code in SENT_BY_KILL


def enter() -> tuple[PodIsolation, Credentials]:
    """The pod-mode setup; must run before anything else in the agent, user code above all."""
    if _libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        raise SetupError(f"prctl(PR_SET_DUMPABLE): {os.strerror(ctypes.get_errno())}")
    signal.pthread_sigmask(signal.SIG_BLOCK, WATCHED)  # every later thread inherits it
    if os.getpid() != 1:  # an init in front (tini, a shared pid namespace): orphans still ours
        _libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
        print(
            f"{WARNING}: it is pid {os.getpid()}, not the container's pid 1, so user code "
            "can signal it (kill -1); make it the container's command",
            file=sys.stderr,
            flush=True,
        )
    credentials = _take_credentials()
    os.environ["HOME"] = protocol.SANDBOX_HOME
    os.environ.setdefault("USER", protocol.SANDBOX_USER)
    try:
        state_dir = os.open(protocol.STATE_MOUNT, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise SetupError(f"no state directory {protocol.STATE_MOUNT}: {e.strerror}") from None
    return PodIsolation(state_dir), credentials


def listen() -> socket.socket:
    """The listening TCP socket on ADDRESS:PORT from the environment (then removed from it)."""
    address = os.environ.pop(ADDRESS_ENV, "") or DEFAULT_ADDRESS
    port_text = os.environ.pop(PORT_ENV, "") or str(DEFAULT_PORT)
    try:
        port = int(port_text)
        return socket.create_server((address, port), backlog=BACKLOG)
    except (ValueError, OSError) as e:
        raise SetupError(f"cannot listen on {address}:{port_text}: {e}") from None


def _take_credentials() -> Credentials:
    """The three PEM variables, out of the environment for good."""
    names = (CERT_ENV, KEY_ENV, PEER_ENV)
    values = [os.environ.pop(name, "") for name in names]
    _scrub_initial_environment(names)
    missing = [name for name, value in zip(names, values) if "-----BEGIN" not in value]
    if missing:
        raise SetupError(f"no PEM data in {', '.join(missing)}: the pod spec must set them")
    return Credentials(*(value.encode() for value in values))


def _scrub_initial_environment(names: tuple[str, ...]) -> None:
    """Zero `names`' entries in the environment block the process started with.

    ``/proc/PID/environ`` shows that block, whatever ``unsetenv`` did since; nothing
    refers to those entries once they are unset.
    """
    with open("/proc/self/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    start, end = int(fields[47]), int(fields[48])  # env_start, env_end: fields 50 and 51
    block = ctypes.string_at(start, end - start)
    for name in names:
        key = name.encode() + b"="
        at = block.find(key)
        while at >= 0:
            stop = block.find(b"\0", at)
            stop = len(block) if stop < 0 else stop
            if at == 0 or block[at - 1] == 0:
                ctypes.memset(start + at, 0, stop - at)
            at = block.find(key, stop)


def _zombie_children() -> list[int]:
    """Pids of this process's children that have exited and wait to be reaped."""
    me, found = os.getpid(), []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if fields[0] == b"Z" and int(fields[1]) == me:
            found.append(int(name))
    return found
