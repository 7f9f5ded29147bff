"""The agent: runs inside every sandbox and does all work there (stdlib only).

Started by the local backend as ``python3 -E -s -S main.pyc LISTEN_FD LOCKDOWN_FD USER_CGROUP``
with the listening Unix socket inherited as LISTEN_FD, a syscall filter to
install after its setup as LOCKDOWN_FD, and the user's cgroup ``tasks`` files
as USER_CGROUP (numbers separated by commas); "-" stands for none. A last
argument ``files-only`` makes it serve file operations and logs only, and run
no command (the files of a sandbox that failed stay reachable). It first puts itself
out of reach of user code (``isolation``), then serves: each accepted connection
carries one request (see ``protocol``) and is served by its own thread.

In a Kubernetes pod it is started as ``python3 -E -s -S main.py --pod [files-only]``:
the pod's main process, set up by ``pod`` instead, serving TLS on a TCP port
(``tls_server``) instead of a Unix socket.
Everything the agent does (processes, files, TCP connections) happens inside
the sandbox's namespaces and as the sandbox user: a path or an address given by
a client can only ever reach what the sandbox itself can reach.

One module per concern: ``channel`` (framing of a connection), ``isolation``,
``logs``, ``processes`` (exec, spawn, signals, ptys), ``files`` (file operations
and tar streams) and ``relay`` (connections from inside); ``pod`` and ``tls_server``
for pod mode.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import socket
import sys
import time

import files
import isolation
import protocol
import relay
from channel import AgentError, Channel, start_thread
from logs import Log
from processes import Processes
from protocol import Frame

REQUEST_LIMIT = 1 << 20
POD = "--pod"


class Agent:
    """Accepts connections and dispatches each request to the handler of its operation."""

    def __init__(self, isolated: isolation.Isolation, files_only: bool = False) -> None:
        self.isolated = isolated
        self.log = Log(isolated.state_dir)
        files.host_disk = isolated.host_disk
        files.own_popen = isolated.own_popen
        self.processes = Processes(self.log, isolated)
        self.started = time.time()
        parts = (self, files) if files_only else (self, self.processes, files, relay)
        self.handlers = {
            name[3:]: getattr(part, name)
            for part in parts
            for name in dir(part)
            if name.startswith("op_")
        }

    def serve(self, listener: socket.socket) -> None:
        """Accept connections; each is served on its own thread."""
        while True:
            conn, _ = listener.accept()
            try:
                start_thread(self.handle, conn)
            except RuntimeError:  # no thread to be had: the sandbox hit its pid limit
                conn.close()

    def handle(self, conn: socket.socket) -> None:
        channel = Channel(conn)
        try:
            line = channel.rfile.readline(REQUEST_LIMIT)
            if not line:
                return
            request = json.loads(line)
            handler = self.handlers.get(str(request.pop("op", "")))
            if handler is None:
                raise AgentError("BadRequest", "unknown operation")
            handler(channel, **request)
        except AgentError as e:
            self._report(channel, e.kind, str(e))
        except FileNotFoundError as e:
            self._report(channel, "FileNotFound", f"no such file or directory: {e.filename}")
        except FileExistsError as e:
            self._report(channel, "FileExists", f"already exists: {e.filename}")
        except PermissionError as e:
            self._report(channel, "PermissionDenied", f"permission denied: {e.filename}")
        except BlockingIOError as e:  # EAGAIN: typically fork() at the pid limit
            self._report(channel, "SandboxError", f"the sandbox is out of resources: {e}")
        except (IsADirectoryError, NotADirectoryError, OSError) as e:
            if e.errno in files.FULL_ERRNOS:
                self._report(channel, "DiskFull", files.full_message(e.filename))
                return
            if e.errno == errno.EROFS and (reason := files.read_only_home(e.filename)):
                self._report(channel, "DiskFull", reason)
                return
            where = f": {e.filename}" if getattr(e, "filename", None) else ""
            self._report(channel, "FileError", f"{e.strerror or e}{where}")
        except (TypeError, ValueError, KeyError) as e:
            self._report(channel, "BadRequest", f"bad request: {e}")
        except RuntimeError as e:  # typically: can't start a thread at the pid limit
            self._report(channel, "SandboxError", f"the sandbox is out of resources: {e}")
        except Exception as e:  # anything else still gets an answer, not a closed connection
            self._report(channel, "SandboxError", f"the sandbox's agent failed: {e!r}")
        finally:
            # shutdown() ends the connection for the peer even while a file object
            # made from the socket (or a lingering pump thread) still refers to it.
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                conn.close()

    @staticmethod
    def _report(channel: Channel, kind: str, message: str) -> None:
        try:
            channel.send_json(Frame.ERROR, {"type": kind, "message": message})
        except OSError:
            pass

    def op_ping(self, channel: Channel) -> None:
        channel.send_json(
            Frame.RESULT,
            {"version": protocol.VERSION, "pid": os.getpid(), "uptime": time.time() - self.started},
        )

    def op_logs(
        self,
        channel: Channel,
        after: int = 0,
        tail: int | None = None,
        follow: bool = False,
        pid: int | None = None,
    ) -> None:
        """Log entries as RESULT frames; with `follow`, until the client goes away."""
        source, until = None, None
        if pid is not None:
            entry = self.processes.find(pid)
            source, until = f"proc:{entry.pid}", entry.done.is_set
        channel.sock.settimeout(None)
        for item in self.log.follow(int(after), tail, bool(follow), source, until):
            if item is None:
                if channel.client_gone():
                    return
                continue
            channel.send_json(Frame.RESULT, item)
        channel.send(Frame.END)

    def watch_user_init(self) -> None:
        """End the agent, and so the sandbox, when the user init is gone."""
        status = self.isolated.wait_user_init()
        message = f"the sandbox's init process ended (wait status {status}): the sandbox stops"
        self.log.write("agent", "event", message)
        with contextlib.suppress(OSError):  # a full disk must not keep the agent alive
            print(message, file=sys.stderr, flush=True)
        os._exit(protocol.EXIT_USER_INIT_LOST)


def main() -> None:
    for sig in (signal.SIGINT, signal.SIGQUIT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    if sys.argv[1:2] == [POD]:
        pod_main(sys.argv[2:] == [protocol.FILES_ONLY])
        return
    listen_fd = int(sys.argv[1])
    lockdown_fd = None if sys.argv[2] == "-" else int(sys.argv[2])
    user_cgroup = [] if sys.argv[3] == "-" else [int(fd) for fd in sys.argv[3].split(",")]
    files_only = sys.argv[4:] == [protocol.FILES_ONLY]
    keep = sorted({listen_fd, *([] if lockdown_fd is None else [lockdown_fd]), *user_cgroup})
    for low, high in zip([2, *keep], [*keep, 1 << 16]):
        os.closerange(low + 1, high)  # descriptors bwrap was handed for the setup only
    lockdown = isolation.read_filter(lockdown_fd) if lockdown_fd is not None else None
    try:
        isolated = isolation.enter(lockdown, user_cgroup)
    except isolation.SetupError as e:
        sys.exit(f"{isolation.FAILED}: {e}")
    listener = socket.socket(fileno=listen_fd)
    os.set_inheritable(listen_fd, False)
    os.chdir(protocol.SANDBOX_HOME)
    sys.stdin.close()
    agent = Agent(isolated, files_only)
    start_thread(agent.watch_user_init)
    agent.serve(listener)


def pod_main(files_only: bool) -> None:
    """The agent as a pod's main process (see ``pod``)."""
    import pod  # imported here: the local agent's start-up time counts
    import tls_server

    try:
        isolated, credentials = pod.enter()  # first: nothing may see the credentials
        context = tls_server.server_context(credentials.cert, credentials.key, credentials.peer)
        del credentials
        listener = pod.listen()
        os.chdir(protocol.SANDBOX_HOME)
    except (pod.SetupError, OSError, ValueError) as e:  # ssl.SSLError is an OSError
        sys.exit(f"{pod.FAILED}: {e}")
    sys.stdin.close()
    agent = Agent(isolated, files_only)
    start_thread(agent.watch_user_init)
    tls_server.Server(context, start_thread).serve(listener, agent.handle)


if __name__ == "__main__":
    main()
