"""The pod agent's channel: pinned TLS 1.3 both ways, and the agent as a pod's pid 1.

Real parts: the agent runs in pod mode (``main.py --pod``) as pid 1 of a real
bubblewrap container sharing the host network (``tests.kube.pod_runner``, the fake
kubelet's runner: what no container runtime can do here), listening on a loopback
address as its pod IP, with credentials from ``SandboxCredentials.generate``; the
service's real ``AgentClient`` talks to it over TCP. Attackers are real TLS and TCP
clients. Every container is stopped, and checked gone, by its fixture.
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from jupyter_sandbox._errors import FileError, SandboxError
from jupyter_sandbox.agent import tls_server
from jupyter_sandbox.agent.protocol import Frame
from jupyter_sandbox.agent.remote import (
    AgentClient,
    AgentIdentityMismatch,
    AgentStream,
    TlsEndpoint,
)
from jupyter_sandbox.backends.tls import SandboxCredentials
from jupyter_sandbox.untrusted import messages
from tests.conftest import ROOT, wait_for
from tests.kube import pod_runner

AGENT_SOURCES = ROOT / "jupyter_sandbox" / "agent"
AGENT_DIR = "/opt/jupyter-sandbox/agent"
PORT = 7000
SECRET_NAMES = (
    "JUPYTER_SANDBOX_AGENT_CERT",
    "JUPYTER_SANDBOX_AGENT_KEY",
    "JUPYTER_SANDBOX_AGENT_PEER",
)


def _free_address() -> str:
    """A loopback address (127.0.77.N) whose agent port nobody holds now."""
    for n in range(10, 250):
        address = f"127.0.77.{n}"
        with socket.socket() as probe:
            try:
                probe.bind((address, PORT))
            except OSError:
                continue
            return address
    raise RuntimeError("no free 127.0.77.N address for a test pod")


class Pod:
    """One pod-mode agent in a bubblewrap container, and the service's client for it."""

    def __init__(
        self, directory: Path, files_only: bool = False, behind_init: bool = False
    ) -> None:
        self.directory = directory
        self.credentials = SandboxCredentials.generate("sb-channeltest")
        self.address = _free_address()
        mounts = {AGENT_DIR: AGENT_SOURCES}
        for name, target in (("home", "/home/sandbox"), ("state", "/run/sandbox"), ("tmp", "/tmp")):
            (directory / name).mkdir()
            mounts[target] = directory / name
        env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "JUPYTER_SANDBOX_AGENT_ADDRESS": self.address,
            "JUPYTER_SANDBOX_AGENT_PORT": str(PORT),
            "JUPYTER_SANDBOX_AGENT_CERT": self.credentials.agent_cert.decode(),
            "JUPYTER_SANDBOX_AGENT_KEY": self.credentials.agent_key.decode(),
            "JUPYTER_SANDBOX_AGENT_PEER": self.credentials.service_cert.decode(),
        }
        command = ["python3", "-E", "-s", "-S", f"{AGENT_DIR}/main.py", "--pod"]
        command += ["files-only"] if files_only else []
        if behind_init:  # a shell as the container's pid 1, the agent its child
            command = ["/bin/sh", "-c", f"{shlex.join(command)} & wait"]
        self.log = open(directory / "agent.log", "wb")  # noqa: SIM115 (closed in stop)
        self.container = pod_runner.start_container(
            command,
            env,
            mounts,
            self.address,
            uid=1000,
            read_only=(AGENT_DIR,),
            stdout=self.log.fileno(),
            stderr=self.log.fileno(),
        )
        self.client = AgentClient(self.credentials.endpoint(self.address, PORT))
        wait_for(self._answers, timeout=20, message="the pod agent's first answer")

    def _answers(self) -> bool:
        if self.container.poll() is not None:
            raise AssertionError(f"the agent ended: {self.agent_log()}")
        try:
            return run(self.client.call("ping"))["pid"] > 0
        except SandboxError:
            return False

    def agent_log(self) -> str:
        return (self.directory / "agent.log").read_text(errors="replace")

    def stop(self) -> None:
        pod_runner.stop_container(self.container)
        self.log.close()
        assert not pod_runner.pids_of(self.container), "container processes outlived it"


def run(coroutine):
    return asyncio.run(coroutine)


@pytest.fixture(scope="module")
def pod(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pod]:
    """A pod shared by the tests that leave it as they found it."""
    started = Pod(tmp_path_factory.mktemp("pod"))
    yield started
    started.stop()


@pytest.fixture
def fresh_pod(tmp_path: Path) -> Iterator[Pod]:
    """A pod of the test's own, for tests that attack it."""
    started = Pod(tmp_path)
    yield started
    started.stop()


async def sh(client: AgentClient, cmd: str, timeout: float = 30) -> tuple[int, str, str]:
    """Run `cmd` in the sandbox: (exit code, stdout, stderr)."""
    out, err = [], []
    async with await client.open("exec", cmd=cmd, stdin=False) as stream:
        while (frame := await stream.recv(timeout)) is not None:
            kind, payload = frame
            if kind == Frame.STDOUT:
                out.append(payload)
            elif kind == Frame.STDERR:
                err.append(payload)
            elif kind == Frame.ERROR:
                raise messages.agent_error(payload)
            elif kind == Frame.EXIT:
                code = json.loads(payload)["exit_code"]
                return code, b"".join(out).decode(), b"".join(err).decode()
    raise AssertionError("the agent closed the command's connection without its exit")


async def write_file(client: AgentClient, path: str, data: bytes) -> dict:
    async with await client.open("write", path=path) as stream:
        try:
            for at in range(0, len(data), 1 << 16):
                await stream.send(Frame.DATA, data[at : at + (1 << 16)], 10)
            await stream.send(Frame.END, b"", 10)
        except ConnectionError:
            pass  # refused early: the answer says why
        return await stream.result()


async def read_file(client: AgentClient, path: str) -> bytes:
    async with await client.open("read", path=path) as stream:
        info = await stream.result()
        return b"".join([chunk async for chunk in stream.data(info["size"])])


# -- the channel does the agent's work ---------------------------------------------------


@pytest.mark.unprivileged
def test_commands_run_over_tls_with_their_exit_codes(pod: Pod):
    code, out, err = run(sh(pod.client, "echo out; echo err >&2; exit 7"))
    assert (code, out, err) == (7, "out\n", "err\n")
    assert run(sh(pod.client, "id -u; echo $HOME"))[1] == "1000\n/home/sandbox\n"
    # the agent blocks the signals it waits for; its commands must not inherit that
    assert run(sh(pod.client, "grep SigBlk /proc/self/status"))[1] == "SigBlk:\t0000000000000000\n"


@pytest.mark.unprivileged
def test_command_input_and_output_cross_the_channel_both_ways(pod: Pod):
    """A command reading its input while writing output: both directions at once."""
    data = os.urandom(3 << 20)

    async def round_trip() -> bytes:
        async with await pod.client.open("exec", cmd="cat") as stream:
            assert (await stream.result())["pid"] > 1

            async def feed() -> None:
                for at in range(0, len(data), 1 << 16):
                    await stream.send(Frame.STDIN, data[at : at + (1 << 16)], 10)
                await stream.send(Frame.EOF)

            feeding = asyncio.ensure_future(feed())
            out = bytearray()
            while (frame := await stream.recv(10)) is not None and frame[0] != Frame.EXIT:
                if frame[0] == Frame.STDOUT:
                    out += frame[1]
            await feeding
            return bytes(out)

    assert run(round_trip()) == data


@pytest.mark.unprivileged
def test_files_are_written_and_read_back_over_tls(pod: Pod):
    data = os.urandom((4 << 20) + 17)
    info = run(write_file(pod.client, "work/blob.bin", data))
    assert info["size"] == len(data) and info["type"] == "file"
    assert run(read_file(pod.client, "work/blob.bin")) == data


@pytest.mark.unprivileged
def test_a_refused_upload_is_answered_before_the_connection_ends(pod: Pod):
    """The agent refuses at once and closes with megabytes still coming: its answer
    still arrives, typed, instead of a reset."""
    run(sh(pod.client, "mkdir -p adir"))
    with pytest.raises(FileError, match="is a directory"):
        run(write_file(pod.client, "adir", os.urandom(16 << 20)))
    assert run(pod.client.call("ping"))["pid"] == 1


@pytest.mark.unprivileged
def test_logs_of_a_background_process_stream_to_the_end(pod: Pod):
    async def logs() -> list[str]:
        info = await pod.client.call("spawn", cmd="for i in 1 2 3; do echo line$i; sleep 0.1; done")
        async with await pod.client.open("logs", follow=True, pid=info["pid"]) as stream:
            texts = []
            while (frame := await stream.recv(10)) is not None and frame[0] != Frame.END:
                entry = json.loads(frame[1])
                if entry.get("stream") == "stdout":
                    texts.append(entry["text"])
            return texts

    assert "".join(run(logs())) == "line1\nline2\nline3\n"


def _serve_inside(pod: Pod, body: str) -> int:
    """Start a one-connection TCP server in the sandbox running `body` (with the
    connection as `c`); its port."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = f"import socket\ns = socket.create_server(('127.0.0.1', {port}))\nc, _ = s.accept()\n"
    run(pod.client.call("spawn", argv=["python3", "-c", server + body]))
    return port


async def _connect_inside(pod: Pod, port: int) -> AgentStream:
    """A relayed connection to `port` inside, once its server listens."""
    deadline = time.monotonic() + 10
    while True:
        stream = await pod.client.open("connect", host="127.0.0.1", port=port)
        try:
            await stream.result()
            return stream
        except SandboxError:
            await stream.close()
            assert time.monotonic() < deadline, "the server inside never listened"
            await asyncio.sleep(0.05)


async def _read_to_end(stream: AgentStream) -> bytes:
    received = bytearray()
    while chunk := await asyncio.wait_for(stream.reader.read(1 << 16), 10):
        received += chunk
    return bytes(received)


@pytest.mark.unprivileged
def test_a_tcp_connection_is_relayed_both_ways(pod: Pod):
    """A server inside echoes 1 MiB back while it still arrives, then closes."""
    body = (
        "got = 0\n"
        "while got < 1 << 20 and (d := c.recv(65536)):\n"
        "    got += len(d); c.sendall(d)\n"
        "c.close()\n"
    )
    port = _serve_inside(pod, body)
    data = os.urandom(1 << 20)

    async def relay() -> bytes:
        async with await _connect_inside(pod, port) as stream:
            stream.writer.write(data)
            return await _read_to_end(stream)

    assert run(relay()) == data


@pytest.mark.unprivileged
def test_the_services_end_of_stream_reaches_the_server_inside(pod: Pod):
    """Half-close from the service: the server reads to its end, then answers."""
    body = (
        "got = 0\n"
        "while d := c.recv(65536):\n"
        "    got += len(d)\n"
        "c.sendall(b'got %d' % got)\n"
        "c.close()\n"
    )
    port = _serve_inside(pod, body)

    async def relay() -> bytes:
        async with await _connect_inside(pod, port) as stream:
            assert stream.writer.can_write_eof()
            stream.writer.write(b"x" * 300_000)
            stream.writer.write_eof()
            return await _read_to_end(stream)

    assert run(relay()) == b"got 300000"


@pytest.mark.unprivileged
def test_after_the_server_inside_ends_its_side_the_service_still_sends(pod: Pod):
    """Half-close from inside: the server says all it has and shuts its sending side,
    then still reads what the service sends, to its end."""
    body = (
        "c.sendall(b'hello')\n"
        "c.shutdown(socket.SHUT_WR)\n"
        "got = 0\n"
        "while d := c.recv(65536):\n"
        "    got += len(d)\n"
        "open('/home/sandbox/received.txt', 'w').write(str(got))\n"
    )
    port = _serve_inside(pod, body)

    async def relay() -> bytes:
        async with await _connect_inside(pod, port) as stream:
            greeting = await _read_to_end(stream)
            stream.writer.write(b"y" * 200_000)
            await stream.writer.drain()
            stream.writer.write_eof()
            return greeting

    assert run(relay()) == b"hello"

    def received() -> bytes | None:
        try:
            return run(read_file(pod.client, "received.txt"))
        except FileNotFoundError:
            return None

    assert wait_for(received, message="the server inside to read to the end") == b"200000"


# -- who gets in ----------------------------------------------------------------------


def _attacker_context(pair: tuple[bytes, bytes] | None, pod: Pod) -> ssl.SSLContext:
    """A client that knows the agent's certificate (the best case for an attacker)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.load_verify_locations(cadata=pod.credentials.agent_cert.decode())
    if pair is not None:
        tls_server.load_pair(context, *pair)
    return context


def _answer(pod: Pod, context: ssl.SSLContext | None, request: bytes = b'{"op":"ping"}\n') -> bytes:
    """What the agent sends back to `request` (over TLS with `context`, else plaintext)."""
    with socket.create_connection((pod.address, PORT), timeout=10) as raw:
        try:
            sock = raw if context is None else context.wrap_socket(raw, server_hostname=None)
            sock.sendall(request)
            answer = b""
            while chunk := sock.recv(4096):
                answer += chunk
            return answer
        except (ssl.SSLError, ConnectionError):
            return b""


@pytest.mark.unprivileged
def test_the_pinned_client_gets_an_answer_from_a_plain_tls_client(pod: Pod):
    """The counterpart of the attacks below: the same raw client, with the right pair."""
    pair = (pod.credentials.service_cert, pod.credentials.service_key)
    answer = _answer(pod, _attacker_context(pair, pod))
    assert answer[:1] == bytes([Frame.RESULT]) and b'"pid":1' in answer


@pytest.mark.unprivileged
@pytest.mark.parametrize("who", ["no certificate", "its own certificate", "another sandbox's"])
def test_clients_without_the_sandboxs_service_certificate_get_no_answer(pod: Pod, who: str):
    """Attack: a TLS client without a certificate, with a self-signed one of its own, or
    with the service's pair of another sandbox."""
    other = SandboxCredentials.generate("sb-other")
    pairs = {
        "no certificate": None,
        "its own certificate": (other.agent_cert, other.agent_key),
        "another sandbox's": (other.service_cert, other.service_key),
    }
    assert _answer(pod, _attacker_context(pairs[who], pod)) == b""
    assert run(pod.client.call("ping"))["pid"] == 1


@pytest.mark.unprivileged
def test_the_service_client_of_another_sandbox_is_refused(pod: Pod):
    other = SandboxCredentials.generate("sb-other")
    endpoint = TlsEndpoint(
        pod.address, PORT, pod.credentials.agent_cert, other.service_cert, other.service_key
    )
    with pytest.raises(SandboxError):
        run(AgentClient(endpoint).call("ping"))


@pytest.mark.unprivileged
def test_a_plaintext_request_gets_no_answer(pod: Pod):
    assert _answer(pod, None) == b""
    assert _answer(pod, None, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n") == b""
    assert run(pod.client.call("ping"))["pid"] == 1


@pytest.mark.unprivileged
def test_clients_that_never_handshake_block_nobody_and_are_dropped(pod: Pod):
    """Attack: connections that send nothing; the service is served meanwhile, and they
    are closed once the handshake deadline passes."""
    silent = [socket.create_connection((pod.address, PORT), timeout=5) for _ in range(16)]
    try:
        started = time.monotonic()
        assert run(pod.client.call("ping"))["pid"] == 1
        assert run(sh(pod.client, "echo served"))[1] == "served\n"
        assert time.monotonic() - started < tls_server.HANDSHAKE_TIMEOUT / 2
        for sock in silent:
            sock.settimeout(tls_server.HANDSHAKE_TIMEOUT + 10)
            assert sock.recv(1) == b""  # closed by the agent, without a word
    finally:
        for sock in silent:
            sock.close()


def _agent_threads(pod: Pod) -> int:
    status = run(sh(pod.client, "cat /proc/1/status"))[1]
    return int(status.split("Threads:", 1)[1].split()[0])


@pytest.mark.unprivileged
def test_hostile_and_abandoned_connections_leave_no_thread_behind(fresh_pod: Pod):
    """Attack: clients that stop at every stage (before the handshake, in it, right
    after it, after a request, mid-answer) and garbage after a good handshake; the
    agent ends up with the threads it started with."""
    baseline = _attacker_context(None, fresh_pod)
    good = _attacker_context(
        (fresh_pod.credentials.service_cert, fresh_pod.credentials.service_key), fresh_pod
    )
    before = _agent_threads(fresh_pod)

    def hostile(stage: str) -> None:
        with socket.create_connection((fresh_pod.address, PORT), timeout=10) as raw:
            if stage == "silent":
                return
            if stage == "plaintext":
                raw.sendall(b'{"op":"ping"}\n')
                return
            context = baseline if stage == "no certificate" else good
            sock = raw
            try:
                sock = context.wrap_socket(raw, server_hostname=None)
                if stage == "garbage":
                    socket.socket.sendall(sock, os.urandom(4096))  # not a TLS record
                elif stage == "request":
                    sock.sendall(b'{"op":"exec","cmd":"sleep 30"}\n')
                elif stage == "mid-answer":
                    sock.sendall(b'{"op":"exec","cmd":"yes | head -c 50000000"}\n')
                    sock.recv(100)
            except (ssl.SSLError, ConnectionError):
                pass
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
            sock.close()  # with a zero linger: a reset

    stages = ("silent", "plaintext", "no certificate", "handshake", "garbage", "request")
    for stage in (*stages, "mid-answer") * 5:
        hostile(stage)
    assert run(fresh_pod.client.call("ping"))["pid"] == 1
    wait_for(lambda: _agent_threads(fresh_pod) <= before, timeout=20, message="threads to end")
    assert run(fresh_pod.client.call("procs"))["processes"] == []


@pytest.mark.unprivileged
def test_an_agent_with_another_certificate_is_refused_by_the_client(pod: Pod):
    """Attack: something else answers at the sandbox's address (the pod replaced, the
    address reused): it cannot present the pinned certificate, and the client refuses."""
    other = SandboxCredentials.generate("sb-other")
    endpoint = TlsEndpoint(
        pod.address,
        PORT,
        other.agent_cert,
        pod.credentials.service_cert,
        pod.credentials.service_key,
    )
    with pytest.raises(AgentIdentityMismatch, match="did not present the sandbox's certificate"):
        run(AgentClient(endpoint).call("ping"))


@pytest.mark.unprivileged
def test_endpoints_rebuild_the_same_client(pod: Pod):
    endpoint = json.loads(json.dumps(pod.client.endpoint()))
    assert run(AgentClient.from_endpoint(endpoint).call("ping"))["pid"] == 1
    assert "PRIVATE KEY" not in repr(pod.client) and "PRIVATE KEY" not in repr(pod.credentials)
    assert AgentClient.from_endpoint({"unix": "/run/x.sock"}).endpoint() == {"unix": "/run/x.sock"}
    for bad in ({"tls": {"host": "h", "port": 0}}, {"tls": "x"}, {}, {"unix": ""}):
        with pytest.raises(ValueError):
            AgentClient.from_endpoint(bad)


# -- the agent out of reach of user code ----------------------------------------------


@pytest.mark.unprivileged
def test_credentials_are_not_in_user_processes_environment(pod: Pod):
    code, out, _ = run(sh(pod.client, "env"))
    assert code == 0 and "PATH=" in out
    assert "JUPYTER_SANDBOX_AGENT" not in out and "BEGIN" not in out


@pytest.mark.unprivileged
def test_memory_environ_and_fds_of_the_agent_are_unreadable(pod: Pod):
    """Attack: read the agent's (pid 1's) memory and environment, open its descriptors
    (its listening socket, its log), follow their links."""
    script = (
        "import os\n"
        "for name in ('mem', 'environ', 'fd/2', 'fd/3'):\n"
        "    path = f'/proc/1/{name}'\n"
        "    for how, look in (('open', lambda: open(path, 'rb')), ('link', os.readlink)):\n"
        "        try:\n"
        "            look() if how == 'open' else look(path)\n"
        "            print('did', how, name)\n"
        "        except OSError as e:\n"
        "            print('refused', how, name, type(e).__name__)\n"
    )
    out = run(sh(pod.client, f"python3 -c {shlex.quote(script)}"))[1]
    assert "did" not in out
    for name in ("mem", "environ", "fd/2", "fd/3"):
        assert f"refused open {name} PermissionError" in out, out
    for name in ("fd/2", "fd/3"):
        assert f"refused link {name} PermissionError" in out, out


def test_the_environment_block_of_the_agent_holds_no_credentials(pod: Pod):
    """Even for root outside the pod: what /proc shows of the agent's start-up
    environment has the PEM variables zeroed, the rest intact."""
    if os.geteuid() != 0:
        pytest.skip("reading a non-dumpable process's environ from outside needs root")
    shown = Path(f"/proc/{pod.container.container_pid}/environ").read_bytes()
    assert b"PATH=/usr/local/bin" in shown
    assert b"BEGIN" not in shown and not any(name.encode() in shown for name in SECRET_NAMES)


@pytest.mark.unprivileged
def test_kill_minus_one_and_signals_to_pid_one_leave_the_agent_serving(fresh_pod: Pod):
    """Attack: kill -9 -1, then SIGKILL, SIGSTOP and SIGTERM to pid 1, from user code."""
    run(fresh_pod.client.call("spawn", cmd="sleep 60"))
    code, out, _ = run(
        sh(fresh_pod.client, "kill -9 -1; kill -9 1; kill -STOP 1; kill 1; echo done")
    )
    assert (code, out) == (0, "done\n")
    assert run(fresh_pod.client.call("ping"))["pid"] == 1
    assert run(sh(fresh_pod.client, "echo still"))[1] == "still\n"
    procs = run(fresh_pod.client.call("procs"))["processes"]
    assert [p["signal"] for p in procs] == [9]  # the background sleep did die


@pytest.mark.unprivileged
def test_orphaned_zombies_are_reaped_while_exit_codes_stay_exact(fresh_pod: Pod):
    """User code double-forks: the orphans come to pid 1, and once they exit no zombie
    is left; meanwhile commands racing with them keep their own exit codes."""
    code, _, _ = run(sh(fresh_pod.client, "for i in 1 2 3 4 5; do (sleep 0.5 &); done; exit 0"))
    assert code == 0
    orphans = run(sh(fresh_pod.client, "ps -eo ppid=,comm= | grep -c '^ *1 sleep$'"))[1]
    assert int(orphans) == 5  # adopted by the agent, still running

    async def racing() -> list[int]:
        commands = [sh(fresh_pod.client, "(sleep 0.05 &); exit 7") for _ in range(12)]
        return [code for code, _, _ in await asyncio.gather(*commands)]

    assert run(racing()) == [7] * 12

    def no_zombies() -> bool:
        states = run(sh(fresh_pod.client, "ps -eo stat=,comm="))[1]
        return "sleep" not in states and not any(s.startswith("Z") for s in states.split("\n"))

    wait_for(no_zombies, timeout=10, message="the orphans to be reaped")


@pytest.mark.unprivileged
def test_sigterm_from_outside_ends_the_agent_at_once(fresh_pod: Pod):
    """The kubelet stopping the pod: SIGTERM from outside the pid namespace ends it
    well within the pod's grace period (SIGTERM from inside was ignored above)."""
    started = time.monotonic()
    fresh_pod.container.signal_command(15)
    assert fresh_pod.container.wait(5) == 0
    assert time.monotonic() - started < 2


@pytest.mark.unprivileged
def test_a_files_only_agent_serves_files_and_runs_nothing(tmp_path: Path):
    files_only = Pod(tmp_path, files_only=True)
    try:
        run(write_file(files_only.client, "kept.txt", b"kept"))
        assert run(read_file(files_only.client, "kept.txt")) == b"kept"
        with pytest.raises(SandboxError, match="unknown operation"):
            run(sh(files_only.client, "true"))
    finally:
        files_only.stop()


@pytest.mark.unprivileged
def test_an_agent_behind_another_init_still_reaps_and_says_what_it_lacks(tmp_path: Path):
    """Started under some other pid 1 (an init the image brings): it warns that user
    code can signal it, and, as a subreaper, still reaps what user code orphans."""
    behind = Pod(tmp_path, behind_init=True)
    try:
        assert run(behind.client.call("ping"))["pid"] == 2
        assert "not the container's pid 1" in behind.agent_log()
        codes = run(sh(behind.client, "for i in 1 2 3; do (sleep 0.2 &); done; exit 5"))[0]
        assert codes == 5
        orphans = run(sh(behind.client, "ps -eo ppid=,comm= | grep -c '^ *2 sleep$'"))[1]
        assert int(orphans) == 3

        def no_zombies() -> bool:
            states = run(sh(behind.client, "ps -eo stat=,comm="))[1]
            return "sleep" not in states and not any(s.startswith("Z") for s in states.split("\n"))

        wait_for(no_zombies, timeout=10, message="the orphans to be reaped")
    finally:
        behind.stop()
