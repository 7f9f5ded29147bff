"""The built-in SFTP server, as users meet it: the stock sftp, scp and rsync through the gateway.

Tests of commands whose answers users read (listings, errors, renames, resumes) run with
OpenSSH's sftp-server too: both must give the same. The server program itself is also
driven over its pipes, the way the gateway drives it, with pipelined and malformed
requests.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jupyter_sandbox.agent import protocol
from jupyter_sandbox.agent import sftp_server as builtin
from jupyter_sandbox.ssh import sftp
from tests.test_ssh_gateway import GATEWAY_MARKS as gateway_marks
from tests.test_ssh_gateway import (  # noqa: F401
    SFTP_SERVER_KINDS,
    Gw,
    Sandbox,
    client_options,
    digest,
    gw,
    loop,
    needs_openssh_sftp,
    random_file,
    run,
    sandbox,
    token,
    workdir,
)

MiB = 1 << 20
ROOT = os.geteuid() == 0
NOBODY = 65534
SERVER = Path(builtin.__file__)
SERVER_NAMES = {"builtin": "sftp_server.pyc", "openssh": "sftp-server"}


def through_gateway(test):
    """Marks of the gateway tests: root, and the OpenSSH client tools."""
    for mark in gateway_marks:
        test = mark(test)
    return test


@pytest.fixture
def sftp_server() -> str:
    """The SFTP server of `token`: the built-in one, unless a test compares both."""
    return "builtin"


def sftp_batch(gw: Gw, token: str, commands: str) -> subprocess.CompletedProcess:
    args = ["sftp", "-P", str(gw.port), *gw.options(), "-b", "-", f"{token}@127.0.0.1"]
    return run(args, commands.encode())


def sftp_ok(gw: Gw, token: str, commands: str) -> str:
    result = sftp_batch(gw, token, commands)
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout.decode()


def sh(gw: Gw, token: str, command: str) -> str:
    result = run(gw.ssh(token, command))
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout.decode()


def data_file(path: Path, size: int) -> Path:
    """`size` bytes of noise at `path` (not a multiple of any request size)."""
    path.write_bytes(os.urandom(size))
    return path


# -- which server runs -------------------------------------------------------------------


def serving_program(port: int, options: list[str], destination: str) -> str:
    """Which SFTP server runs in the sandbox while an `sftp` session is open."""
    args = ["sftp", "-q", "-P", str(port), *options, destination]
    session = subprocess.Popen(
        args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        session.stdin.write(b"pwd\n")
        session.stdin.flush()
        while b"Remote working directory" not in (line := session.stdout.readline()):
            assert line, session.stderr.read()
        ssh = ["ssh", "-p", str(port), *options, destination]
        result = run([*ssh, "cat /proc/[0-9]*/cmdline | tr '\\0' ' '"])
        assert result.returncode == 0, result.stderr.decode()
        commands = result.stdout.decode()
    finally:
        session.communicate(b"bye\n", timeout=30)
    found = [kind for kind, name in SERVER_NAMES.items() if name in commands]
    assert len(found) == 1, commands
    return found[0]


@through_gateway
@pytest.mark.parametrize(
    ("setting", "host_has_openssh", "expected"),
    [
        ("auto", False, "builtin"),
        pytest.param("auto", True, "openssh", marks=needs_openssh_sftp),
        ("builtin", True, "builtin"),
        pytest.param("openssh", True, "openssh", marks=needs_openssh_sftp),
    ],
)
def test_the_setting_chooses_the_server(
    gw: Gw,
    sandbox: Sandbox,
    monkeypatch: pytest.MonkeyPatch,
    setting: str,
    host_has_openssh: bool,
    expected: str,
) -> None:
    if not host_has_openssh:  # this host has the Debian package: look for it where it is not
        monkeypatch.setattr(sftp, "SFTP_SERVERS", ("/nonexistent/sftp-server",))
    token = gw.issue(sandbox, sftp=setting)
    assert serving_program(gw.port, gw.options(), f"{token}@127.0.0.1") == expected


@through_gateway
def test_openssh_setting_without_sftp_server_says_what_to_do(
    gw: Gw, sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sftp, "SFTP_SERVERS", ("/nonexistent/sftp-server",))
    result = sftp_batch(gw, gw.issue(sandbox, sftp="openssh"), "pwd\n")
    assert result.returncode != 0
    assert b"JUPYTER_SANDBOX_SFTP=openssh" in result.stderr
    assert b"openssh-sftp-server" in result.stderr


SERVICE_CLIENT = """
import json, sys
from jupyter_sandbox import Sandbox
if sys.argv[1] == "create":
    sb = Sandbox.create(timeout="5m")
    access = sb.expose_ssh()
    print(json.dumps({"id": sb.id, "port": access.port, "user": access.username,
                      "known_hosts": access.known_hosts_line}))
else:
    Sandbox.connect(sys.argv[2]).kill()
"""


def service_client(env: dict[str, str], *args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", SERVICE_CLIENT, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def serve(env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "jupyter_sandbox", "serve"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


@through_gateway
def test_service_setting_selects_the_builtin_server(
    separate_service_env: dict[str, str], workdir: Path
) -> None:
    env = {**separate_service_env, "JUPYTER_SANDBOX_POOL": "0", "JUPYTER_SANDBOX_SFTP": "builtin"}
    service = serve(env)
    try:
        access = json.loads(service_client(env, "create"))
        (workdir / "known_hosts").write_text(access["known_hosts"] + "\n")
        options = client_options(workdir / "known_hosts")
        try:
            kind = serving_program(access["port"], options, f"{access['user']}@127.0.0.1")
        finally:
            service_client(env, "kill", access["id"])
    finally:
        service.terminate()
        service.wait(30)
        service.stderr.close()
    assert kind == "builtin"
    assert os.listdir(Path(env["JUPYTER_SANDBOX_DIR"]) / "sandboxes") == []


@pytest.mark.unprivileged
def test_a_wrong_setting_stops_the_service_before_it_starts_anything(
    separate_service_env: dict[str, str],
) -> None:
    env = {**separate_service_env, "JUPYTER_SANDBOX_SFTP": "fast"}
    service = serve(env)
    _, error = service.communicate(timeout=60)
    assert service.returncode != 0
    assert "JUPYTER_SANDBOX_SFTP='fast': expected one of auto, builtin, openssh" in error
    assert not (Path(env["JUPYTER_SANDBOX_DIR"]) / "sandboxes").exists()


# -- transfers -----------------------------------------------------------------------------

SIZES = [0, 1, 32 * 1024 - 1, 255 * 1024 + 1, 5 * MiB + 3]


@through_gateway
def test_put_and_get_files_of_every_size_byte_identical(gw: Gw, token: str, workdir: Path) -> None:
    sources = [data_file(workdir / f"f{size}", size) for size in SIZES]
    sources.append(random_file(workdir / "f40M", 40 * MiB))
    puts = "".join(f"put {p} up/{p.name}\n" for p in sources)
    gets = "".join(f"get up/{p.name} {workdir}/back-{p.name}\n" for p in sources)
    sftp_ok(gw, token, "mkdir up\n" + puts + gets)
    for p in sources:
        assert digest(workdir / f"back-{p.name}") == digest(p), p.name
    remote = sh(gw, token, "cd up && sha256sum *")
    for p in sources:
        assert f"{digest(p)}  {p.name}" in remote


@through_gateway
def test_scp_file_both_ways_byte_identical(gw: Gw, token: str, workdir: Path) -> None:
    source = data_file(workdir / "source.bin", 3 * MiB + 7)
    scp = ["scp", "-q", "-P", str(gw.port), *gw.options()]
    for args in (
        [str(source), f"{token}@127.0.0.1:copy.bin"],
        [f"{token}@127.0.0.1:copy.bin", str(workdir / "back.bin")],
        [f"{token}@127.0.0.1:~/copy.bin", str(workdir / "tilde.bin")],
        [f"{token}@127.0.0.1:~sandbox/copy.bin", str(workdir / "user.bin")],  # expand-path
    ):
        result = run([*scp, *args])
        assert result.returncode == 0, result.stderr.decode()
    copies = [digest(workdir / name) for name in ("back.bin", "tilde.bin", "user.bin")]
    assert copies == [digest(source)] * 3


@through_gateway
@pytest.mark.parametrize("sftp_server", SFTP_SERVER_KINDS)
def test_scp_recursive_tree_with_symlinks(gw: Gw, token: str, workdir: Path) -> None:
    """scp -r copies a tree both ways, with what symlinks to files point to.

    (OpenSSH 9's scp copies no symlink to a directory in SFTP mode, either way and
    whatever the server: the tree has none.)
    """
    tree = workdir / "tree"
    (tree / "a" / "b").mkdir(parents=True)
    (tree / "empty").mkdir()
    data_file(tree / "a" / "b" / "deep.bin", 300 * 1024 + 5)
    (tree / "top.txt").write_text("top\n")
    (tree / "link-to-top").symlink_to("top.txt")
    scp = ["scp", "-q", "-r", "-P", str(gw.port), *gw.options()]
    result = run([*scp, str(tree), f"{token}@127.0.0.1:copy"])
    assert result.returncode == 0, result.stderr.decode()
    listing = sh(gw, token, "cd copy && find . -printf '%y %p\\n' | sort")
    assert listing.split("\n")[:-1] == [
        "d .",
        "d ./a",
        "d ./a/b",
        "d ./empty",
        "f ./a/b/deep.bin",
        "f ./link-to-top",
        "f ./top.txt",
    ]
    sh(gw, token, "cd copy && ln -s top.txt remote-link && ln -s /etc/hostname outside")
    result = run([*scp, f"{token}@127.0.0.1:copy", str(workdir / "back")])
    assert result.returncode == 0, result.stderr.decode()
    back = workdir / "back"
    assert digest(back / "a" / "b" / "deep.bin") == digest(tree / "a" / "b" / "deep.bin")
    assert (back / "remote-link").read_text() == (back / "link-to-top").read_text() == "top\n"
    assert (back / "empty").is_dir()
    # The link was followed inside the sandbox: its /etc/hostname, not the host's.
    assert (back / "outside").read_text() == sh(gw, token, "cat /etc/hostname")


@through_gateway
@pytest.mark.parametrize("sftp_server", SFTP_SERVER_KINDS)
def test_sftp_batch_commands(gw: Gw, token: str, workdir: Path) -> None:
    source, empty = data_file(workdir / "data.bin", 4096 + 1), data_file(workdir / "empty", 0)
    out = sftp_ok(
        gw,
        token,
        f"mkdir work\nput {source} work/data.bin\ncd work\n"
        "rename data.bin renamed.bin\nln -s renamed.bin soft\nln renamed.bin hard\n"
        "cp renamed.bin copied.bin\n"
        f"chmod 640 renamed.bin\nmkdir gone\nrmdir gone\nput {empty} scratch\nrm scratch\n"
        "ls -l\ndf .\ndf -h\n",
    )
    long_lines = {
        line.split()[-1]: line.split() for line in out.splitlines() if " sandbox " in line
    }
    assert set(long_lines) == {"copied.bin", "hard", "renamed.bin", "soft"}
    assert long_lines["renamed.bin"][:5] == ["-rw-r-----", "?", "sandbox", "sandbox", "4097"]
    assert long_lines["soft"][0].startswith("l")
    df_header = next(line for line in out.splitlines() if "Avail" in line)
    assert "Size" in df_header and "%Capacity" in df_header
    state = sh(gw, token, "cd work && stat -c '%n %a %h %F' * && readlink soft && ls -A")
    assert "renamed.bin 640 2 regular file" in state
    assert "soft 777 1 symbolic link" in state
    assert state.splitlines()[-5:] == ["renamed.bin", "copied.bin", "hard", "renamed.bin", "soft"]
    same = "cmp hard renamed.bin && cmp copied.bin renamed.bin && echo same"
    assert sh(gw, token, f"cd work && {same}") == "same\n"


@through_gateway
@pytest.mark.parametrize("sftp_server", SFTP_SERVER_KINDS)
def test_rename_never_replaces_but_posix_rename_does(gw: Gw, token: str) -> None:
    sh(gw, token, "echo a > a && echo b > b")
    result = sftp_batch(gw, token, "rename -l a b\n")  # -l: the protocol's own RENAME
    assert result.returncode != 0 and b"Failure" in result.stderr
    assert sh(gw, token, "cat a b") == "a\nb\n"
    sftp_ok(gw, token, "rename a b\n")  # posix-rename@openssh.com replaces
    assert (
        sh(gw, token, "cat b; ls a 2>&1 || true")
        == "a\nls: cannot access 'a': No such file or directory\n"
    )


@through_gateway
@pytest.mark.parametrize("sftp_server", SFTP_SERVER_KINDS)
def test_resume_with_reget_and_reput(gw: Gw, token: str, workdir: Path) -> None:
    """Only the missing part moves: a prefix that differs from the source is kept as it is."""
    full = data_file(workdir / "full.bin", 6 * MiB + 11)
    sftp_ok(gw, token, f"put {full} full.bin\n")
    prefix = 2 * MiB
    partial = workdir / "partial.bin"
    partial.write_bytes(b"\0" * prefix)
    sftp_ok(gw, token, f"reget full.bin {partial}\n")
    expected = b"\0" * prefix + full.read_bytes()[prefix:]
    assert partial.read_bytes() == expected
    sh(gw, token, f"head -c {prefix} /dev/zero > up.bin")
    sftp_ok(gw, token, f"reput {full} up.bin\n")
    assert sh(gw, token, "sha256sum < up.bin").split()[0] == hashlib.sha256(expected).hexdigest()


@through_gateway
@pytest.mark.parametrize("sftp_server", SFTP_SERVER_KINDS)
def test_errors_reach_the_client(gw: Gw, token: str, workdir: Path) -> None:
    sh(gw, token, "echo no > locked && chmod 000 locked && mkdir -p full/x && mkdir -m 555 ro")
    cases = [
        ("get nope", "not found"),
        (f"get locked {workdir}/locked", "Permission denied"),
        (f"put {workdir}/source ro/new-file", "Permission denied"),
        (f"put {workdir}/source /usr/new-file", "Failure"),  # a read-only file system
        ("rmdir full", "Failure"),
        ("mkdir full", "Failure"),
        ("rm nope", "No such file"),
        ("ls /nonexistent", "not found"),
    ]
    (workdir / "source").write_text("x\n")
    for command, message in cases:
        result = sftp_batch(gw, token, command + "\n")
        assert result.returncode != 0, command
        assert message in result.stderr.decode(), (command, result.stderr)
    scp = ["scp", "-q", "-P", str(gw.port), *gw.options()]
    result = run([*scp, f"{token}@127.0.0.1:nope", str(workdir / "nope")])
    assert result.returncode != 0 and b"No such file" in result.stderr
    assert not (workdir / "locked").exists() and not (workdir / "nope").exists()


@through_gateway
def test_rsync_over_ssh_beside_the_builtin_server(gw: Gw, token: str, workdir: Path) -> None:
    """rsync runs its own protocol over an exec channel: the SFTP setting leaves it alone."""
    tree = workdir / "tree"
    (tree / "d").mkdir(parents=True)
    data_file(tree / "d" / "x.bin", MiB + 1)
    (tree / "link").symlink_to("d/x.bin")
    shell = " ".join(["ssh", "-p", str(gw.port), *gw.options()])
    for src, dst in (
        (f"{tree}/", f"{token}@127.0.0.1:r/"),
        (f"{token}@127.0.0.1:r/", f"{workdir}/b/"),
    ):
        result = run(["rsync", "-a", "-e", shell, src, dst])
        assert result.returncode == 0, result.stderr.decode()
    assert os.readlink(workdir / "b" / "link") == "d/x.bin"
    assert digest(workdir / "b" / "d" / "x.bin") == digest(tree / "d" / "x.bin")


# -- the program on its pipes ---------------------------------------------------------------


class Wire:
    """The built-in server as a child process, spoken to in raw SFTP packets.

    It runs on the sandbox's Python in a directory of its own, as an unprivileged user
    when the tests run as root (in a sandbox it has the sandbox user's rights).
    """

    def __init__(self, directory: Path) -> None:
        self.cwd = directory / "files"
        self.cwd.mkdir()
        server = directory / "sftp_server.py"
        shutil.copyfile(SERVER, server)
        user = {"user": NOBODY, "group": NOBODY, "extra_groups": []} if ROOT else {}
        if ROOT:
            os.chown(self.cwd, NOBODY, NOBODY)
        self.proc = subprocess.Popen(
            [protocol.PYTHON, "-E", "-s", "-S", str(server)],
            cwd=self.cwd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            **user,
        )

    def send(self, kind: int, body: bytes = b"") -> None:
        self.proc.stdin.write(struct.pack(">IB", len(body) + 1, kind) + body)
        self.proc.stdin.flush()

    def request(self, kind: int, request_id: int, *fields: bytes) -> None:
        self.send(kind, struct.pack(">I", request_id) + b"".join(fields))

    def recv(self) -> tuple[int, int, bytes]:
        """Type, request id and the rest of one reply."""
        head = self.proc.stdout.read(4)
        assert len(head) == 4, "the server closed its output"
        body = self.proc.stdout.read(struct.unpack(">I", head)[0])
        return body[0], struct.unpack(">I", body[1:5])[0], body[5:]

    def status(self) -> tuple[int, int]:
        kind, request_id, rest = self.recv()
        assert kind == builtin.STATUS, kind
        return request_id, struct.unpack(">I", rest[:4])[0]

    def close(self) -> int:
        self.proc.stdin.close()
        code = self.proc.wait(10)
        self.proc.stdout.close()
        self.proc.stderr.close()
        return code


def s(value: bytes) -> bytes:
    return struct.pack(">I", len(value)) + value


@pytest.fixture
def wire():
    directory = Path(tempfile.mkdtemp(prefix="jsb-sftp-", dir="/var/tmp"))
    directory.chmod(0o755)
    w = Wire(directory)
    w.send(builtin.INIT, struct.pack(">I", 3))
    kind, version, extensions = w.recv()
    assert (kind, version) == (builtin.VERSION_REPLY, 3)
    assert b"limits@openssh.com" in extensions
    yield w
    w.close()
    for parent, subdirs, _ in os.walk(directory):  # requests may have made any mode
        for name in subdirs:
            path = os.path.join(parent, name)
            if not os.path.islink(path):
                os.chmod(path, 0o700)
    shutil.rmtree(directory)


@pytest.mark.unprivileged
def test_pipelined_reads_answered_in_order(wire: Wire) -> None:
    content = os.urandom(3 * MiB + 5)
    (wire.cwd / "f").write_bytes(content)
    wire.request(builtin.OPEN, 1, s(b"f"), struct.pack(">II", builtin.FXF_READ, 0))
    kind, _, body = wire.recv()
    assert kind == builtin.HANDLE
    handle = body  # a string: length and bytes
    chunk = builtin.MAX_IO
    count = len(content) // chunk + 2
    for i in range(count):  # all in flight before the first reply is read
        wire.request(builtin.READ, 100 + i, handle, struct.pack(">QI", i * chunk, 1 << 20))
    received = b""
    for i in range(count):
        kind, request_id, body = wire.recv()
        assert request_id == 100 + i
        if kind == builtin.DATA:
            received += body[4:]
        else:
            assert kind == builtin.STATUS and struct.unpack(">I", body[:4])[0] == builtin.EOF
    assert received == content


@pytest.mark.unprivileged
def test_malformed_requests_get_bad_message_and_the_session_goes_on(wire: Wire) -> None:
    wire.request(builtin.OPEN, 1, b"\x00\x00")  # truncated path length
    wire.request(builtin.STAT, 2, struct.pack(">I", 1 << 30) + b"abc")  # string past the end
    wire.request(builtin.STAT, 3, s(b"a\0b"))  # NUL in a path
    wire.request(builtin.READ, 4, s(b"\xff\xff\xff\xff"), struct.pack(">QI", 0, 10))
    wire.request(builtin.WRITE, 5, s(b"xy"), struct.pack(">Q", 0) + s(b"data"))
    wire.request(99, 6)  # unknown type
    wire.request(builtin.EXTENDED, 7, s(b"nonsense@example.org"))
    wire.request(builtin.SETSTAT, 8, s(b"."), struct.pack(">I", builtin.ATTR_SIZE))
    wire.send(builtin.STAT, b"\x00")  # too short to carry an id: nothing to answer
    answers = [wire.status() for _ in range(8)]
    assert answers == [
        (1, builtin.BAD_MESSAGE),
        (2, builtin.BAD_MESSAGE),
        (3, builtin.BAD_MESSAGE),
        (4, builtin.FAILURE),
        (5, builtin.FAILURE),
        (6, builtin.OP_UNSUPPORTED),
        (7, builtin.OP_UNSUPPORTED),
        (8, builtin.BAD_MESSAGE),
    ]
    wire.request(builtin.REALPATH, 9, s(b"."))
    kind, request_id, body = wire.recv()
    assert (kind, request_id) == (builtin.NAME, 9)
    assert s(str(wire.cwd).encode()) in body
    assert wire.proc.poll() is None


@pytest.mark.unprivileged
def test_oversized_packet_ends_the_session(wire: Wire) -> None:
    wire.proc.stdin.write(struct.pack(">IB", builtin.MAX_PACKET + 1, builtin.WRITE))
    wire.proc.stdin.flush()
    assert wire.proc.wait(10) != 0
    assert b"over the limit of 262144 bytes" in wire.proc.stderr.read()


REQUEST_TYPES = [
    builtin.OPEN,
    builtin.CLOSE,
    builtin.READ,
    builtin.WRITE,
    builtin.LSTAT,
    builtin.FSTAT,
    builtin.SETSTAT,
    builtin.FSETSTAT,
    builtin.OPENDIR,
    builtin.READDIR,
    builtin.REMOVE,
    builtin.MKDIR,
    builtin.RMDIR,
    builtin.REALPATH,
    builtin.STAT,
    builtin.RENAME,
    builtin.READLINK,
    builtin.SYMLINK,
    builtin.EXTENDED,
    0,
    99,
    255,
]
SENTINEL = 0xFFFFFFFF  # request id of the limits request that closes each example


def fields() -> st.SearchStrategy[bytes]:
    """Request fields, well-formed or not: names, handles, numbers, attributes, junk."""
    name = st.text("abc", min_size=0, max_size=3).map(lambda t: s(t.encode()))
    extension = st.sampled_from([*builtin.EXTENSIONS, b"x@y"]).map(s)
    handle = st.integers(0, 3).map(lambda n: s(struct.pack(">I", n)))
    u32 = st.integers(0, 2**32 - 1).map(lambda n: struct.pack(">I", n))
    u64 = st.integers(0, 2**64 - 1).map(lambda n: struct.pack(">Q", n))
    attrs = st.tuples(st.integers(0, 2**32 - 1), st.binary(max_size=40)).map(
        lambda t: struct.pack(">I", t[0]) + t[1]
    )
    return st.one_of(name, extension, handle, u32, u64, attrs, st.binary(max_size=12))


@pytest.mark.unprivileged
def test_any_request_gets_exactly_one_answer_in_order(wire: Wire) -> None:
    """Whatever the fields, every request with an id is answered, once, in order."""

    @settings(
        max_examples=400, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )
    @given(
        st.lists(
            st.tuples(
                st.sampled_from(REQUEST_TYPES),
                st.integers(0, 1000),
                st.lists(fields(), max_size=6),
                st.integers(0, 64),
            ),
            min_size=1,
            max_size=8,
        )
    )
    def check(requests: list) -> None:
        expected = []
        for kind, request_id, parts, cut in requests:
            body = struct.pack(">I", request_id) + b"".join(parts)
            body = body[: len(body) - cut] if cut < len(body) else body
            wire.send(kind, body)
            if len(body) >= 4:
                expected.append(request_id)
        wire.request(builtin.EXTENDED, SENTINEL, s(b"limits@openssh.com"))
        answered = [wire.recv()[:2] for _ in expected]
        assert [request_id for _, request_id in answered] == expected
        assert wire.recv()[:2] == (builtin.EXTENDED_REPLY, SENTINEL)

    check()
    assert wire.proc.poll() is None
