"""The SSH gateway against a real sandbox, driven by the stock OpenSSH tools."""

from __future__ import annotations

import asyncio
import hashlib
import http.server
import itertools
import json
import logging
import os
import shutil
import socket
import stat
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from jupyter_sandbox._errors import SandboxError
from jupyter_sandbox.agent.protocol import Frame
from jupyter_sandbox.backends.base import Backend
from jupyter_sandbox.backends.local import LocalBackend, SandboxSpec
from jupyter_sandbox.ssh import Gateway, GatewayLimits, Target, generate_token, hash_token
from jupyter_sandbox.ssh.limits import FailedLogins
from jupyter_sandbox.ssh.sftp import SFTP_SERVERS
from jupyter_sandbox.ssh.tokens import ALPHABET, token_matches
from tests.backend_fixtures import direct_kubernetes_backend

TOOLS = ("ssh", "scp", "sftp", "ssh-keygen", "rsync", "tmux", "curl", "ssh-audit")
APT_PACKAGES = "openssh-client openssh-sftp-server rsync tmux curl (and pip install ssh-audit)"
MISSING = [t for t in TOOLS if shutil.which(t) is None]
HAVE_OPENSSH_SFTP = any(os.path.exists(path) for path in SFTP_SERVERS)
# Transfers run with OpenSSH's sftp-server and with the built-in one (which needs nothing).
needs_openssh_sftp = pytest.mark.skipif(
    not HAVE_OPENSSH_SFTP and not os.environ.get("CI"),
    reason="needs sftp-server: apt-get install openssh-sftp-server",
)
SFTP_SERVER_KINDS = [pytest.param("openssh", marks=needs_openssh_sftp), "builtin"]
GATEWAY_MARKS = [
    pytest.mark.skipif(os.geteuid() != 0, reason="runs as root"),
    # On CI a missing tool is a failure, not a skip: the install step must provide it.
    pytest.mark.skipif(
        bool(MISSING) and not os.environ.get("CI"),
        reason=f"needs {', '.join(MISSING)}: apt-get install {APT_PACKAGES}",
    ),
]
# The tests with a sandbox run with each backend's (a sandbox pod on the fake cluster).
pytestmark = [*GATEWAY_MARKS, pytest.mark.backends("local", "kubernetes")]
# The fake kubelet's pods share the host's network namespace: there a sandbox's
# 127.0.0.1 is the host's, so what "reaches the sandbox, not the host" cannot be told.
SANDBOX_LOOPBACK = pytest.mark.backends("local")
MiB = 1 << 20
WAIT = 30.0
_uids = itertools.count(1_200_100 + (os.getpid() % 1000) * 50)


class Loop:
    """An asyncio loop in a thread, so tests can block on OpenSSH subprocesses."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = WAIT):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn: Callable, *args) -> None:
        self.loop.call_soon_threadsafe(fn, *args)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


class Sandbox:
    """A running sandbox and shortcuts to its agent."""

    def __init__(self, loop: Loop, backend: Backend, runtime) -> None:
        self.loop, self.backend, self.runtime = loop, backend, runtime
        self.agent = backend.agent(runtime)

    def sh(self, cmd: str) -> tuple[int, bytes]:
        """Run `cmd` inside the sandbox; exit code and stdout."""

        async def run() -> tuple[int, bytes]:
            async with await self.agent.open("exec", cmd=cmd, stdin=False) as stream:
                await stream.result()
                out = b""
                while (frame := await stream.recv()) is not None:
                    kind, payload = frame
                    if kind == Frame.STDOUT:
                        out += payload
                    elif kind == Frame.EXIT:
                        return json.loads(payload)["exit_code"], out
            raise AssertionError("agent closed the stream without EXIT")

        return self.loop.run(run())

    def can_connect(self, port: int) -> bool:
        """Does something listen on the sandbox's own 127.0.0.1:port?"""
        try:
            self.loop.run(self.agent.call("connect", host="127.0.0.1", port=port))
        except SandboxError:
            return False
        return True

    def spawn(self, cmd: str) -> None:
        self.loop.run(self.agent.call("spawn", cmd=cmd))


def client_options(known_hosts: Path, *extra: str) -> list[str]:
    """Options of the OpenSSH clients: pinned host key, no user config or keys."""
    opts = {
        "StrictHostKeyChecking": "yes",
        "UserKnownHostsFile": str(known_hosts),
        "GlobalKnownHostsFile": "/dev/null",
        "BatchMode": "yes",
        "IdentitiesOnly": "yes",
        "IdentityFile": "none",
        "LogLevel": "ERROR",
        "ConnectTimeout": "20",
    }
    args: list[str] = []
    for key, value in opts.items():
        args += ["-o", f"{key}={value}"]
    return args + list(extra)


class Gw:
    """A gateway on a free port, with a dict of tokens and an ssh command line."""

    def __init__(self, loop: Loop, directory: Path, **options: object) -> None:
        self.loop, self.directory = loop, directory
        self.tokens: dict[str, Target] = {}
        self.events: list[tuple[str, str]] = []
        self.gateway = Gateway(
            self._resolve,
            directory / "hostkeys",
            on_event=lambda sid, text: self.events.append((sid, text)),
            **options,
        )
        loop.run(self.gateway.start())
        self.known_hosts = directory / "known_hosts"
        self.known_hosts.write_text(self.gateway.known_hosts_line("127.0.0.1", self.port) + "\n")

    async def _resolve(self, token: str) -> Target | None:
        return self.tokens.get(token)

    @property
    def port(self) -> int:
        return self.gateway.port

    def issue(
        self,
        sandbox: Sandbox,
        public_key: str | None = None,
        sftp: str = "auto",
        uid: int | None = None,
    ) -> str:
        """A token for `sandbox`, issued to `uid` (default: this process's user)."""
        token = generate_token()
        self.tokens[token] = Target(
            sandbox_id=sandbox.runtime.directory.rsplit("/", 1)[-1],
            agent=sandbox.agent,
            env={"JSB_TEST": "1"},
            token_hash=hash_token(token),
            public_key=public_key,
            sftp=sftp,
            uid=os.getuid() if uid is None else uid,
        )
        return token

    def options(self, *extra: str) -> list[str]:
        return client_options(self.known_hosts, *extra)

    def ssh(self, token: str, *args: str) -> list[str]:
        return ["ssh", "-p", str(self.port), *self.options(), f"{token}@127.0.0.1", *args]

    def close(self) -> None:
        self.loop.run(self.gateway.close())

    def __enter__(self) -> Gw:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- fixtures ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def loop() -> Iterator[Loop]:
    loop = Loop()
    yield loop
    loop.stop()


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="jsb-ssh-", dir="/var/tmp"))
    os.chmod(path, 0o755)  # the sandbox runs as an unprivileged host uid
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def sandbox(
    loop: Loop,
    workdir: Path,
    backend: str,
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Sandbox]:
    """A sandbox of the test's backend, started and stopped by that backend directly."""
    view = None
    if backend == "kubernetes":
        cluster = request.getfixturevalue("kube_cluster")
        sandboxes, view = direct_kubernetes_backend(cluster, workdir / "storage", monkeypatch)
    else:
        sandboxes = LocalBackend(workdir / "storage")
    loop.run(sandboxes.prepare())
    if sandboxes.unavailable:
        pytest.skip(sandboxes.unavailable)
    sb_id = f"sb-ssh{next(_uids)}"
    runtime = loop.run(sandboxes.start(SandboxSpec(id=sb_id)))
    yield Sandbox(loop, sandboxes, runtime)
    loop.run(sandboxes.stop(runtime))
    assert not os.path.exists(runtime.directory)
    if view:
        loop.run(sandboxes.close())
        view.check_clean()
        cluster.delete("configmaps", f"jupyter-sandbox-{view.instance}")


@pytest.fixture
def gw(loop: Loop, workdir: Path) -> Iterator[Gw]:
    gateway = Gw(loop, workdir)
    yield gateway
    gateway.close()


@pytest.fixture
def sftp_server() -> str:
    """The SFTP server setting of `token`; SFTP tests parametrize it over SFTP_SERVER_KINDS."""
    return "auto"


@pytest.fixture
def token(gw: Gw, sandbox: Sandbox, sftp_server: str) -> str:
    return gw.issue(sandbox, sftp=sftp_server)


# -- helpers ----------------------------------------------------------------------------


def run(
    args: list[str], data: bytes | None = None, timeout: float = 120
) -> subprocess.CompletedProcess:
    return subprocess.run(args, input=data, capture_output=True, timeout=timeout, check=False)


def wait_for(condition: Callable[[], object], timeout: float = WAIT, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(MiB):
            h.update(chunk)
    return h.hexdigest()


def random_file(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        for _ in range(size // MiB):
            f.write(os.urandom(MiB))
    return path


def fetch(url: str) -> bytes | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.read()
    except OSError:
        return None


class Tunnel:
    """A background `ssh -N` process, terminated on exit."""

    def __init__(self, args: list[str]) -> None:
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def __enter__(self) -> Tunnel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        self.proc.stderr.close()


@pytest.fixture
def http_pair(sandbox: Sandbox) -> Iterator[int]:
    """Port P with an HTTP server inside the sandbox and a different one on the host."""
    port = free_port()
    sandbox.sh("mkdir -p www && echo from-sandbox > www/marker")
    sandbox.spawn(f"cd www && exec python3 -m http.server {port} --bind 127.0.0.1")

    class Host(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b"from-host\n"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    host = http.server.ThreadingHTTPServer(("127.0.0.1", port), Host)
    thread = threading.Thread(target=host.serve_forever, daemon=True)
    thread.start()
    wait_for(lambda: sandbox.can_connect(port), what="the sandbox's HTTP server")
    assert fetch(f"http://127.0.0.1:{port}/marker") == b"from-host\n"
    yield port
    host.shutdown()
    host.server_close()


# -- credentials ------------------------------------------------------------------------


def test_tokens_are_random_safe_usernames_stored_as_hashes() -> None:
    tokens = {generate_token() for _ in range(100)}
    assert len(tokens) == 100
    for token in tokens:
        assert len(token) >= 25 and set(token) <= set(ALPHABET)
        assert token_matches(token, hash_token(token))
        assert hash_token(token) != token and len(hash_token(token)) == 64
    assert not token_matches("x" + token, hash_token(token))


def test_host_key_persists_with_private_mode(loop: Loop, workdir: Path) -> None:
    first, second = Gw(loop, workdir), None
    try:
        key_file = workdir / "hostkeys" / "ssh_host_ed25519_key"
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        second = Gw(loop, workdir)
        assert first.gateway.host_key_fingerprint == second.gateway.host_key_fingerprint
        assert first.gateway.host_key_fingerprint.startswith("SHA256:")
        line = first.gateway.known_hosts_line("example.org", 2222)
        assert line.startswith("[example.org]:2222 ssh-ed25519 ")
        assert first.gateway.known_hosts_line("example.org", 22).startswith("example.org ")
    finally:
        first.close()
        if second:
            second.close()


def test_failed_logins_block_a_source_for_a_while() -> None:
    now = [0.0]
    limiter = FailedLogins(
        GatewayLimits(max_failures=3, failure_window=10, block_time=60), clock=lambda: now[0]
    )
    for _ in range(2):
        limiter.record("10.0.0.1")
    now[0] = 11  # the first two have aged out of the window
    limiter.record("10.0.0.1")
    assert not limiter.blocked("10.0.0.1")
    limiter.record("10.0.0.1")
    limiter.record("10.0.0.1")
    assert limiter.blocked("10.0.0.1") and not limiter.blocked("10.0.0.2")
    now[0] = 72
    assert not limiter.blocked("10.0.0.1")


# -- sessions ---------------------------------------------------------------------------


def test_command_runs_as_sandbox_user_in_its_home(gw: Gw, token: str) -> None:
    result = run(gw.ssh(token, "whoami; pwd; hostname; echo $JSB_TEST"))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.decode().split()
    assert lines[:2] == ["sandbox", "/home/sandbox"]
    assert lines[2].startswith("sb-ssh") and lines[3] == "1"
    wait_for(lambda: len(gw.events) == 4, what="the disconnect event")
    texts = [text for _, text in gw.events]
    assert texts[0].startswith("SSH connection from 127.0.0.1 port ")
    assert texts[1].endswith(': exec "whoami; pwd; hostname; echo $JSB_TEST"')
    assert " ended after " in texts[2] and ": exit status 0, " in texts[2]
    assert texts[3].startswith("SSH connection from 127.0.0.1 port ")
    assert " closed after " in texts[3]


def test_exit_code_and_separate_stderr(gw: Gw, token: str) -> None:
    result = run(gw.ssh(token, "echo out; echo err >&2; exit 7"))
    assert (result.returncode, result.stdout, result.stderr) == (7, b"out\n", b"err\n")


def test_binary_stdin_stdout_round_trip_with_eof(gw: Gw, token: str) -> None:
    data = os.urandom(5 * MiB)
    result = run(gw.ssh(token, "cat"), data)
    assert result.returncode == 0 and result.stdout == data
    result = run(gw.ssh(token, "wc -c; cat >&2"), b"\x00\xff" * 1000)
    assert result.stdout.strip() == b"2000" and result.stderr == b""


def test_piped_script_to_bash_like_vscode(gw: Gw, token: str) -> None:
    script = b"echo start\nuname -s\nexport X=42\necho $X\nexit 3\n"
    result = run(["ssh", "-T", *gw.ssh(token, "bash")[1:]], script)
    assert result.returncode == 3 and result.stdout == b"start\nLinux\n42\n"


def test_only_locale_and_term_are_taken_from_the_client(gw: Gw, token: str) -> None:
    args = gw.ssh(token, "echo $LC_TIME/$FOO/$JSB_TEST")
    args[1:1] = ["-o", "SetEnv=LC_TIME=C.UTF-8 FOO=bar JSB_TEST=2"]
    assert run(args).stdout == b"C.UTF-8//1\n"


# -- authentication and abuse -----------------------------------------------------------


def test_unknown_token_is_denied(gw: Gw, token: str) -> None:
    result = run(gw.ssh(generate_token(), "true"))
    assert result.returncode == 255 and b"Permission denied" in result.stderr
    assert gw.events == []


def test_public_key_is_required_when_set(gw: Gw, sandbox: Sandbox, workdir: Path) -> None:
    keys = {}
    for name in ("good", "other"):
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(workdir / name)])
        keys[name] = workdir / name
    token = gw.issue(sandbox, public_key=(workdir / "good.pub").read_text().strip())

    def with_key(name: str | None) -> subprocess.CompletedProcess:
        args = gw.ssh(token, "whoami")
        if name:
            args[1:1] = ["-o", f"IdentityFile={keys[name]}"]
        return run(args)

    for name in (None, "other"):
        denied = with_key(name)
        assert denied.returncode == 255 and b"Permission denied" in denied.stderr
    assert with_key("good").stdout == b"sandbox\n"


def test_token_never_logged(gw: Gw, token: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="asyncssh")
    bad = generate_token()
    assert run(gw.ssh(token, "true")).returncode == 0
    assert run(gw.ssh(bad, "true")).returncode == 255
    assert "Beginning auth for user" in caplog.text  # the records were captured ...
    assert token not in caplog.text and bad not in caplog.text  # ... without the tokens
    assert all(token not in text for _, text in gw.events)


def _ssh_audit(port: int) -> list[str]:
    """ssh-audit's [fail] and [warn] lines about kex, host key, cipher and MAC algorithms."""
    result = run(["ssh-audit", "-n", "-p", str(port), "127.0.0.1"])
    audited = [
        line
        for line in result.stdout.decode().splitlines()
        if line.startswith(("(kex)", "(key)", "(enc)", "(mac)"))
    ]
    assert audited, result.stdout.decode()
    return [line for line in audited if "[fail]" in line or "[warn]" in line]


def test_ssh_audit_finds_no_weak_algorithms(gw: Gw) -> None:
    """Only the classic curve25519 exchange, kept for OpenSSH < 9.9 clients, is flagged."""
    flagged = _ssh_audit(gw.port)
    assert all(line.startswith("(kex) curve25519-sha256") for line in flagged), flagged
    assert all("post-quantum" in line for line in flagged), flagged


def test_ssh_audit_clean_when_post_quantum_only(loop: Loop, workdir: Path) -> None:
    gw = Gw(loop, workdir, post_quantum_only=True)
    try:
        assert _ssh_audit(gw.port) == []
    finally:
        gw.close()


# -- files --------------------------------------------------------------------------------


def _round_trip(
    workdir: Path, upload: Callable, download: Callable, size: int, subdir: str = "sub dir"
) -> None:
    source = random_file(workdir / "source.bin", size)
    back = workdir / "back.bin"
    for remote in ("up.bin", f"{subdir}/up.bin"):
        upload(source, remote)
        download(remote, back)
        assert digest(back) == digest(source)
        back.unlink()
    source.unlink()


def _scp(gw: Gw, token: str, *mode: str) -> tuple[Callable, Callable]:
    base = ["scp", "-q", *mode, "-P", str(gw.port), *gw.options()]

    def upload(local: Path, remote: str) -> None:
        parent = os.path.dirname(remote)
        if parent:
            assert run(gw.ssh(token, f"mkdir -p '{parent}'")).returncode == 0
        result = run([*base, str(local), f"{token}@127.0.0.1:{remote}"])
        assert result.returncode == 0, result.stderr

    def download(remote: str, local: Path) -> None:
        result = run([*base, f"{token}@127.0.0.1:{remote}", str(local)])
        assert result.returncode == 0, result.stderr

    return upload, download


def _sftp(gw: Gw, token: str) -> tuple[Callable, Callable]:
    def batch(commands: str) -> None:
        args = ["sftp", "-q", "-P", str(gw.port), *gw.options(), "-b", "-", f"{token}@127.0.0.1"]
        result = run(args, commands.encode())
        assert result.returncode == 0, result.stderr

    def upload(local: Path, remote: str) -> None:
        parent = os.path.dirname(remote)
        batch((f'-mkdir "{parent}"\n' if parent else "") + f'put "{local}" "{remote}"\n')

    def download(remote: str, local: Path) -> None:
        batch(f'get "{remote}" "{local}"\n')

    return upload, download


def transfer_cases(*tools: str) -> list:
    """(tool, SFTP server) pairs: legacy `scp -O` (no SFTP) once, SFTP tools with each server."""
    cases = []
    for tool in tools:
        kinds = ["auto"] if tool == "scp -O" else SFTP_SERVER_KINDS
        for kind in kinds:
            value, marks = (kind, ()) if isinstance(kind, str) else (kind.values[0], kind.marks)
            cases.append(pytest.param(tool, value, marks=marks, id=f"{tool}-{value}"))
    return cases


@pytest.mark.parametrize(("tool", "sftp_server"), transfer_cases("scp -O", "scp", "sftp"))
def test_file_transfer_64mib_byte_identical(gw: Gw, token: str, workdir: Path, tool: str) -> None:
    transfer = _sftp(gw, token) if tool == "sftp" else _scp(gw, token, *tool.split()[1:])
    subdir = "subdir" if tool == "scp -O" else "sub dir"  # legacy scp hands paths to a shell
    _round_trip(workdir, *transfer, 64 * MiB, subdir)


@pytest.mark.parametrize(("tool", "sftp_server"), transfer_cases("scp -O", "sftp"))
def test_file_transfer_256mib_byte_identical(gw: Gw, token: str, workdir: Path, tool: str) -> None:
    transfer = _sftp(gw, token) if tool == "sftp" else _scp(gw, token, "-O")
    _round_trip(workdir, *transfer, 256 * MiB, "subdir")


@pytest.mark.parametrize("sftp_server", SFTP_SERVER_KINDS)
def test_sftp_cannot_follow_symlinks_out_of_the_sandbox(
    gw: Gw, token: str, sandbox: Sandbox, workdir: Path
) -> None:
    secret = workdir / "host-only-secret.txt"
    secret.write_text("host secret\n")
    secret.chmod(0o644)
    sandbox.sh(f"ln -s {secret} hostfile; ln -s /etc/shadow shadow; ln -s / root")
    commands = f"get hostfile {workdir}/a\nget shadow {workdir}/b\n"
    args = ["sftp", "-P", str(gw.port), *gw.options(), "-b", "-", f"{token}@127.0.0.1"]
    for line in commands.splitlines():
        result = run(args, (line + "\n").encode())
        assert result.returncode != 0
        assert b"No such file" in result.stderr or b"not found" in result.stderr
    assert not (workdir / "a").exists() and not (workdir / "b").exists()
    listing = run(args, b"ls root/etc\n").stdout.decode()
    assert "shadow" not in listing and "passwd" in listing


def test_rsync_over_ssh(gw: Gw, token: str, workdir: Path) -> None:
    tree = workdir / "tree"
    (tree / "nested").mkdir(parents=True)
    random_file(tree / "nested" / "data.bin", 3 * MiB)
    (tree / "small.txt").write_text("hello\n")
    shell = " ".join(["ssh", "-p", str(gw.port), *gw.options()])
    for src, dst in (
        (f"{tree}/", f"{token}@127.0.0.1:copy/"),
        (f"{token}@127.0.0.1:copy/", f"{workdir}/back/"),
    ):
        result = run(["rsync", "-a", "-e", shell, src, dst])
        assert result.returncode == 0, result.stderr
    assert (workdir / "back" / "small.txt").read_text() == "hello\n"
    assert digest(workdir / "back" / "nested" / "data.bin") == digest(tree / "nested" / "data.bin")


# -- forwarding -------------------------------------------------------------------------


@SANDBOX_LOOPBACK
def test_local_forward_reaches_the_sandbox_not_the_host(gw: Gw, token: str, http_pair: int) -> None:
    local = free_port()
    forward = gw.ssh(token)
    forward[1:1] = ["-N", "-L", f"{local}:localhost:{http_pair}"]
    with Tunnel(forward):
        body = wait_for(lambda: fetch(f"http://127.0.0.1:{local}/marker"), what="the tunnel")
    assert body == b"from-sandbox\n"


@SANDBOX_LOOPBACK
def test_stdio_forward_reaches_the_sandbox(gw: Gw, token: str, http_pair: int) -> None:
    args = gw.ssh(token)
    args[1:1] = ["-W", f"localhost:{http_pair}"]
    result = run(args, b"GET /marker HTTP/1.0\r\n\r\n")
    assert result.stdout.endswith(b"\r\n\r\nfrom-sandbox\n")


@SANDBOX_LOOPBACK
def test_socks_forward_reaches_the_sandbox(gw: Gw, token: str, http_pair: int) -> None:
    local = free_port()
    forward = gw.ssh(token)
    forward[1:1] = ["-N", "-D", f"127.0.0.1:{local}"]
    curl = [
        "curl",
        "-sS",
        "--max-time",
        "5",
        "--socks5-hostname",
        f"127.0.0.1:{local}",
        f"http://localhost:{http_pair}/marker",
    ]
    with Tunnel(forward):
        body = wait_for(lambda: run(curl).stdout, what="the SOCKS proxy")
    assert body == b"from-sandbox\n"


def test_streamlocal_forward_reaches_a_socket_in_the_sandbox(
    gw: Gw, token: str, sandbox: Sandbox
) -> None:
    server = (
        "import socket,os\n"
        "s=socket.socket(socket.AF_UNIX); s.bind('app.sock'); s.listen()\n"
        "while True:\n"
        "  c,_=s.accept(); c.sendall(b'HTTP/1.0 200 OK\\r\\n\\r\\nfrom-unix\\n'); c.close()\n"
    )
    sandbox.sh(f"cat > unix_server.py <<'EOF'\n{server}EOF")
    sandbox.spawn("exec python3 unix_server.py")
    wait_for(lambda: sandbox.sh("test -S app.sock")[0] == 0, what="the Unix socket")
    local = free_port()
    forward = gw.ssh(token)
    forward[1:1] = ["-N", "-L", f"{local}:/home/sandbox/app.sock"]
    with Tunnel(forward):
        body = wait_for(lambda: fetch(f"http://127.0.0.1:{local}/"), what="the tunnel")
    assert body == b"from-unix\n"


def test_forward_to_a_closed_port_fails_cleanly(gw: Gw, token: str) -> None:
    args = gw.ssh(token)
    args[1:1] = ["-W", f"localhost:{free_port()}"]
    result = run(args, b"")
    assert result.returncode == 255 and b"forwarding failed" in result.stderr


def test_remote_forward_is_refused(gw: Gw, token: str) -> None:
    args = gw.ssh(token, "true")
    args[1:1] = ["-o", "ExitOnForwardFailure=yes", "-R", "0:localhost:80"]
    result = run(args)
    assert result.returncode == 255 and b"remote port forwarding failed" in result.stderr


# -- interactive ------------------------------------------------------------------------


class Tmux:
    """A private tmux server running one interactive ssh."""

    def __init__(self, command: list[str], cols: int, rows: int) -> None:
        self.socket = f"jsb-ssh-{os.getpid()}-{next(_uids)}"
        self.env = {**os.environ, "TERM": "xterm-256color"}
        self.tmux(
            "new-session", "-d", "-x", str(cols), "-y", str(rows), subprocess.list2cmdline(command)
        )

    def tmux(self, *args: str) -> str:
        result = subprocess.run(
            ["tmux", "-L", self.socket, *args],
            capture_output=True,
            env=self.env,
            timeout=10,
            check=True,
        )
        return result.stdout.decode()

    def screen(self) -> str:
        return self.tmux("capture-pane", "-p", "-S", "-200")

    def type(self, *keys: str) -> None:
        self.tmux("send-keys", *keys)

    def expect(self, text: str) -> None:
        wait_for(lambda: text in self.screen(), what=f"{text!r} on screen")

    def kill(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True, check=False)


def test_pty_resize_and_ctrl_c(gw: Gw, token: str, sandbox: Sandbox) -> None:
    term = Tmux(["ssh", "-tt", *gw.ssh(token)[1:]], cols=100, rows=30)
    try:
        term.type("echo cols=$(tput cols)", "Enter")
        term.expect("cols=100")
        term.tmux("resize-window", "-x", "120", "-y", "40")
        term.type("echo now=$(tput cols)x$(tput lines)", "Enter")
        term.expect("now=120x40")
        term.type("sleep 100; echo done-$((6*7))", "Enter")
        wait_for(lambda: sandbox.sh("pgrep -x sleep")[0] == 0, what="sleep to run")
        term.type("C-c")
        term.type("echo alive-$((40+2))", "Enter")
        term.expect("alive-42")
        assert "done-42" not in term.screen()
        term.type("exit", "Enter")
        wait_for(lambda: " closed after " in gw.events[-1][1], what="the session to end")
    finally:
        term.kill()


def test_close_sessions_drops_live_session_within_a_second(
    gw: Gw, token: str, sandbox: Sandbox
) -> None:
    other = gw.issue(sandbox)
    sessions = [
        subprocess.Popen(
            gw.ssh(t, "echo ready; exec sleep 100"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.PIPE,
        )
        for t in (token, other)
    ]
    try:
        for proc in sessions:
            assert proc.stdout.readline() == b"ready\n"
        sandbox_id = gw.tokens[token].sandbox_id
        gw.loop.call(gw.gateway.close_sessions, sandbox_id, hash_token(token))
        started = time.monotonic()
        sessions[0].wait(5)
        assert time.monotonic() - started < 1.0
        assert sessions[1].poll() is None  # another token's session stays
        gw.loop.call(gw.gateway.close_sessions, sandbox_id)
        sessions[1].wait(1.0)
        wait_for(lambda: sandbox.sh("pgrep -x sleep")[0] == 1, what="the commands to be killed")
    finally:
        for proc in sessions:
            proc.kill()
            proc.wait()
            proc.stdout.close()
            proc.stderr.close()
            proc.stdin.close()
