"""A sandbox whose agent is replaced by an attacker's program gains nothing on the host.

Each test creates a real sandbox with the real service, then, as the host, takes
its agent socket away and binds a program of its own there that speaks the agent
protocol (request line, then ``>BI`` frames) and answers with what an attacker
would send. Transfers are tried both ways a client takes: through the service
(HTTP) and straight to the agent socket with pipes (same machine). Afterwards
nothing outside the target exists or changed, the client got a typed error or a
safe result, and the service still serves another sandbox.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import socket
import stat
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from jupyter_sandbox import CommandTimeout, FileError, Sandbox, SandboxError
from jupyter_sandbox.agent.protocol import HEADER, Frame, encode
from jupyter_sandbox.client._async import shared_transport
from jupyter_sandbox.client._sync import portal
from jupyter_sandbox.untrusted import extract, messages, streams
from jupyter_sandbox.untrusted.streams import ANSWER_TIMEOUT, GRACE, INACTIVITY
from tests.conftest import wait_for
from tests.security._trees import remove, walk

MiB = 1 << 20


# -- the hostile agent ---------------------------------------------------------------


class Conn:
    """One connection from the host to the hostile agent."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.rfile = sock.makefile("rb")

    def send(self, kind: int, payload: bytes = b"") -> None:
        self.sock.sendall(encode(kind, payload))

    def send_json(self, kind: int, obj: object) -> None:
        self.send(kind, json.dumps(obj).encode())

    def pipe(self) -> int:
        """Ask for the client's pipe end, as the real agent does."""
        self.send(Frame.FD)
        _, fds, _, _ = socket.recv_fds(self.sock, 1, 1)
        return fds[0]

    def stream(self, request: dict, data: bytes | Iterator[bytes]) -> None:
        """Send `data` as the body of a transfer: DATA frames, or into the client's pipe."""
        chunks = _pieces(data) if isinstance(data, bytes) else data
        if request.get("pipe"):
            fd = self.pipe()
            try:
                for chunk in chunks:
                    os.write(fd, chunk)
            finally:
                os.close(fd)
        else:
            for chunk in chunks:
                self.send(Frame.DATA, chunk)
        self.send(Frame.END)


def _pieces(data: bytes, size: int = 256 * 1024) -> Iterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


Handler = Callable[[Conn, dict], None]


class HostileAgent:
    """An attacker's program listening where the sandbox's agent did."""

    def __init__(self, socket_path: str, pipes: bool) -> None:
        os.unlink(socket_path)
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(socket_path)
        os.chmod(socket_path, 0o600)
        self.server.listen(64)
        self.pipes = pipes
        self.handlers: dict[str, Handler] = {}
        self.seen: list[dict] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def on(self, op: str, handler: Handler) -> None:
        self.handlers[op] = handler

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                sock, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._answer, args=(sock,), daemon=True).start()

    def _answer(self, sock: socket.socket) -> None:
        conn = Conn(sock)
        with contextlib.suppress(OSError), sock:
            request = json.loads(conn.rfile.readline())
            self.seen.append(request)
            op = request["op"]
            if op == "ping":
                if self.pipes:
                    conn.send_json(Frame.RESULT, {"version": 2, "pid": 1, "uptime": 1.0})
                else:
                    conn.send_json(Frame.ERROR, {"type": "BadRequest", "message": "no"})
                return
            self.handlers[op](conn, request)

    def close(self) -> None:
        self.stop.set()
        with contextlib.suppress(OSError):
            self.server.shutdown(socket.SHUT_RDWR)
        self.server.close()
        self.thread.join(5)


def agent_socket(sandbox: Sandbox) -> str:
    async def ask() -> dict:
        return await shared_transport().request("GET", f"/v1/sandboxes/{sandbox.id}/agent")

    return portal().call(ask())["socket"]


# -- what must not change ------------------------------------------------------------


def snapshot(root: Path) -> dict[str, tuple]:
    """Names, types, modes, owners and contents under `root` (links not followed)."""
    st = os.lstat(root)
    found: dict[str, tuple] = {".": (st.st_mode, st.st_uid, st.st_gid)}
    for name, st in walk(root):
        if name.startswith("target"):
            continue
        content = (root / name).read_bytes() if stat.S_ISREG(st.st_mode) else b""
        found[name] = (st.st_mode, st.st_uid, st.st_gid, hashlib.sha256(content).hexdigest())
    return found


@pytest.fixture
def host(tmp_path: Path) -> Iterator[Path]:
    """A host directory: `canary/` must never change, downloads go to `target/`."""
    canary = tmp_path / "canary"
    (canary / "sub").mkdir(parents=True)
    (canary / "secret").write_text("host only\n")
    os.chmod(canary / "secret", 0o600)
    before = snapshot(tmp_path)
    yield tmp_path
    assert snapshot(tmp_path) == before
    assert_safe_tree(tmp_path / "target")


def assert_safe_tree(target: Path) -> None:
    """No set-id, sticky, device or FIFO file, none owned by another uid, no temp left."""
    if not target.is_dir() or target.is_symlink():
        return
    for name, st in walk(target):
        assert not st.st_mode & (stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX), name
        assert stat.S_IFMT(st.st_mode) in (stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK), name
        assert (st.st_uid, st.st_gid) == (os.getuid(), os.getgid()), name
        assert not name.endswith(".part"), f"temp file left: {name}"


@pytest.fixture(scope="module")
def bystander(service_env) -> Iterator[Sandbox]:
    """Another user's sandbox, which must keep working whatever the hostile one sends."""
    with Sandbox.create() as sb:
        yield sb


@pytest.fixture
def hostile(request, sandbox, bystander) -> Iterator[HostileAgent]:
    """The sandbox's agent replaced; the client transfers over HTTP or over pipes."""
    agent = HostileAgent(agent_socket(sandbox), pipes=request.param == "pipe")
    yield agent
    agent.close()
    assert bystander.sh("echo still here").stdout == "still here\n"


# -- tar streams an attacker would send ------------------------------------------------


def member(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", **attrs) -> tuple:
    info = tarfile.TarInfo(name)
    directory_or_file = 0o755 if kind == tarfile.DIRTYPE else 0o644  # as tar writes them
    info.type, info.size, info.mode = kind, len(data), attrs.pop("mode", directory_or_file)
    for key, value in attrs.items():
        setattr(info, key, value)
    return info, data


def tar_of(*members: tuple) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data else None)
    return out.getvalue()


def raw_header(name: bytes, kind: bytes = tarfile.REGTYPE, size: int = 0) -> bytes:
    """A ustar header with exactly the given name bytes (NUL and all)."""
    header = bytearray(512)
    header[0 : len(name)] = name
    header[100:108] = b"0000644\0"
    header[124:136] = b"\x80" + size.to_bytes(11, "big")  # base-256: any size
    header[156:157] = kind
    header[257:263] = b"ustar\0"
    header[263:265] = b"00"
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header)


def tree_answer(agent: HostileAgent, *tars: bytes | Callable[[], Iterator[bytes]]) -> None:
    """Answer stat with a directory, and each tar_out in turn with the next stream."""
    pending = list(tars)
    agent.on("stat", lambda conn, request: conn.send_json(Frame.RESULT, dir_info()))

    def tar_out(conn: Conn, request: dict) -> None:
        conn.send_json(Frame.RESULT, dir_info())
        body = pending.pop(0)
        conn.stream(request, body if isinstance(body, bytes) else body())

    agent.on("tar_out", tar_out)


def dir_info(name: str = "tree", **changes) -> dict:
    info = {
        "name": name,
        "path": f"/home/sandbox/{name}",
        "type": "dir",
        "size": 4096,
        "mode": 0o755,
        "mtime": 1.0,
        "target": None,
    }
    return {**info, **changes}


def file_info(size: int, **changes) -> dict:
    return {**dir_info("f.txt"), "type": "file", "size": size, "mode": 0o644, **changes}


# -- downloads of trees --------------------------------------------------------------


pytestmark = [
    pytest.mark.unprivileged,
    pytest.mark.parametrize("hostile", ["http", "pipe"], indirect=True),
]


def test_tar_writing_through_its_own_symlink_is_refused(sandbox, hostile, host):
    """Attack: `x -> <canary>` then `x/pwned`, and a hard link `h` to `x/secret`."""
    canary = host / "canary"
    tree_answer(
        hostile,
        tar_of(member("x", tarfile.SYMTYPE, linkname=str(canary)), member("x/pwned", data=b"1")),
        tar_of(
            member("y", tarfile.SYMTYPE, linkname=str(canary)),
            member("h", tarfile.LNKTYPE, linkname="y/secret"),
        ),
    )
    with pytest.raises(FileError, match="symlink"):
        sandbox.fs.download("tree", host / "target")
    assert os.readlink(host / "target" / "x") == str(canary)  # recreated, never followed
    with pytest.raises(FileError, match="hard link"):
        sandbox.fs.download("tree", host / "target")
    assert not (host / "target" / "h").exists()


@pytest.mark.parametrize(
    "name",
    ["../escape", "/tmp/escape-abs", "a/../../escape", "a//b", "./.", "x" * 256],
)
def test_tar_names_that_leave_the_target_are_refused(sandbox, hostile, host, name):
    """Attack: members named '../', absolute, with '..' inside, empty or over-long parts."""
    tree_answer(hostile, tar_of(member("ok", data=b"fine"), member(name, data=b"evil")))
    with pytest.raises(FileError, match=r"unsafe|absolute|longer"):
        sandbox.fs.download("tree", host / "target")
    assert not Path("/tmp/escape-abs").exists() and not (host / "escape").exists()
    assert sorted(os.listdir(host / "target")) == ["ok"]


def test_tar_name_with_nul_is_refused(sandbox, hostile, host):
    """Attack: a member whose name has a NUL byte in the middle (pax path record)."""
    record = b" path=a\0b\n"
    record = b"%d" % (len(record) + 2) + record
    pax = raw_header(b"pax", tarfile.XHDTYPE, len(record)) + record.ljust(512, b"\0")
    body = pax + raw_header(b"placeholder") + b"\0" * 1024
    tree_answer(hostile, body)
    with pytest.raises(FileError):
        sandbox.fs.download("tree", host / "target")
    assert os.listdir(host / "target") == []


def test_tar_hard_links_outside_are_refused(sandbox, hostile, host):
    """Attack: hard links to an absolute host file, through '..', and to a non-member."""
    secret = host / "canary" / "secret"
    for linkname in (str(secret), "../canary/secret", "never-sent"):
        tree_answer(hostile, tar_of(member("h", tarfile.LNKTYPE, linkname=linkname)))
        with pytest.raises(FileError):
            sandbox.fs.download("tree", host / "target")
    assert secret.stat().st_nlink == 1
    assert os.listdir(host / "target") == []


def test_tar_hard_link_to_its_own_file_works(sandbox, hostile, host):
    """A hard link to a file this same download wrote is made (and only that)."""
    link = member("b", tarfile.LNKTYPE, linkname="a")
    tree_answer(hostile, tar_of(member("a", data=b"data"), link))
    sandbox.fs.download("tree", host / "target")
    a, b = (host / "target" / "a").stat(), (host / "target" / "b").stat()
    assert (a.st_ino, a.st_nlink) == (b.st_ino, 2)


def test_tar_modes_and_owners_are_never_applied(sandbox, hostile, host):
    """Attack: a root-owned setuid binary, setgid and sticky directories, foreign owners."""
    tree_answer(
        hostile,
        tar_of(
            member("bin", tarfile.DIRTYPE, mode=0o3777, uid=0, gid=0),
            member("bin/su", data=b"#!/bin/sh\n", mode=0o4755, uid=0, gid=0, uname="root"),
            member("bin/sg", data=b"x", mode=0o2775, uid=4242, gid=4242),
            member("locked", tarfile.DIRTYPE, mode=0o500),
            member("locked/inside", data=b"x", mode=0o400),
        ),
    )
    sandbox.fs.download("tree", host / "target")
    mask = extract.umask()
    modes = {
        name: stat.S_IMODE((host / "target" / name).lstat().st_mode)
        for name in ("bin", "bin/su", "bin/sg", "locked", "locked/inside")
    }
    assert modes == {
        "bin": 0o777 & ~mask,
        "bin/su": 0o755 & ~mask,
        "bin/sg": 0o775 & ~mask,
        "locked": 0o500,
        "locked/inside": 0o400,
    }
    os.chmod(host / "target" / "locked", 0o700)  # so the fixture can look inside


def test_tar_devices_and_fifos_are_never_made(sandbox, hostile, host):
    """Attack: character and block devices (/dev/mem's numbers) and a FIFO."""
    tree_answer(
        hostile,
        tar_of(
            member("mem", tarfile.CHRTYPE, devmajor=1, devminor=1),
            member("disk", tarfile.BLKTYPE, devmajor=8, devminor=0),
            member("fifo", tarfile.FIFOTYPE),
            member("file", data=b"kept"),
        ),
    )
    with pytest.raises(FileError, match=r"device or FIFO.*mem, disk, fifo"):
        sandbox.fs.download("tree", host / "target")
    assert os.listdir(host / "target") == ["file"]


def test_second_download_never_follows_a_link_the_first_left(sandbox, hostile, host):
    """Attack: download 1 leaves `link -> canary`; download 2 sends `link/` (mode 0777)
    and `link/file`, hoping to chmod the canary and write into it."""
    canary = host / "canary"
    tree_answer(
        hostile,
        tar_of(member("link", tarfile.SYMTYPE, linkname=str(canary))),
        tar_of(member("link", tarfile.DIRTYPE, mode=0o777), member("link/file", data=b"x")),
        tar_of(member("link2", tarfile.SYMTYPE, linkname=str(canary))),
        tar_of(member("link2", data=b"replaces the link, not the canary", mode=0o666)),
    )
    for _ in range(4):
        sandbox.fs.download("tree", host / "target")
    assert (host / "target" / "link").is_dir() and not (host / "target" / "link").is_symlink()
    assert (host / "target" / "link" / "file").read_bytes() == b"x"
    assert not (host / "target" / "link2").is_symlink()


def test_tar_bombs_are_bounded(sandbox, hostile, host, monkeypatch):
    """Attack: too many members, a member larger than the disk, a 2 MiB pax header,
    and zeros that never end after the archive."""
    monkeypatch.setattr(extract, "MAX_MEMBERS", 50)

    def endless_trailer() -> Iterator[bytes]:
        yield tar_of(member("a", data=b"x"))
        for _ in range(64):
            yield b"\0" * MiB

    huge = raw_header(b"huge", size=1 << 40)
    pax = raw_header(b"pax", tarfile.XHDTYPE, 2 * MiB) + b"9 a=bcde\n" * (2 * MiB // 9 + 1)
    tree_answer(
        hostile,
        tar_of(*(member(f"f{i}", data=b"x") for i in range(60))),
        huge,
        pax,
        endless_trailer,
    )
    for expected in ("too many members", "larger than", "headers over", "kept sending"):
        with pytest.raises(FileError, match=expected):
            sandbox.fs.download("tree", host / "target")
    assert len(os.listdir(host / "target")) <= 51


def test_deep_tree_from_the_agent_downloads(sandbox, hostile, host):
    """A 1,200-deep tree is written without recursion limits (and no descriptor leak)."""
    names = ["/".join(["d"] * depth) for depth in range(1, 1201)]
    leaf = member(names[-1] + "/leaf", data=b"deep")
    tree_answer(hostile, tar_of(*(member(n, tarfile.DIRTYPE) for n in names), leaf))
    fds = len(os.listdir("/proc/self/fd"))
    try:
        sandbox.fs.download("tree", host / "target")
        assert (host / "target" / names[-1] / "leaf").read_bytes() == b"deep"
        assert len(os.listdir("/proc/self/fd")) <= fds + 4
        assert_safe_tree(host / "target")
    finally:
        remove(host / "target")


# -- downloads of files --------------------------------------------------------------


def read_answer(agent: HostileAgent, info: dict, body: bytes | Callable[[], Iterator[bytes]]):
    agent.on("stat", lambda conn, request: conn.send_json(Frame.RESULT, info))

    def read(conn: Conn, request: dict) -> None:
        conn.send_json(Frame.RESULT, info)
        conn.stream(request, body if isinstance(body, bytes) else body())

    agent.on("read", read)


def test_file_that_streams_more_than_announced_is_refused(sandbox, hostile, host):
    """Attack: a file announced as 10 bytes that streams 1 GiB."""

    def gigabyte() -> Iterator[bytes]:
        for _ in range(1024):
            yield b"A" * MiB

    read_answer(hostile, file_info(10), gigabyte)
    started = time.monotonic()
    with pytest.raises(FileError, match="more than the 10 bytes"):
        sandbox.fs.download("f.txt", host / "target")
    assert time.monotonic() - started < 20
    assert not (host / "target").exists()
    with pytest.raises(FileError, match="more than the 10 bytes"):
        sandbox.fs.read_bytes("f.txt")


def test_file_announcements_are_checked(sandbox, hostile, host):
    """Attack: a file larger than the host's disk, one that sends less than announced,
    a setuid mode, and names '../../evil' and 'a/b' for the file put into a directory
    (refused as malformed answers; a safe name is ignored, see the next test)."""
    (host / "target").mkdir()
    read_answer(hostile, file_info(1 << 60), b"")
    with pytest.raises(SandboxError):
        sandbox.fs.download("f.txt", host / "target" / "big")
    read_answer(hostile, file_info(10), b"short")
    with pytest.raises(FileError, match="5 of the 10 bytes"):
        sandbox.fs.download("f.txt", host / "target" / "short")
    read_answer(hostile, file_info(2, mode=0o6777, uid=0), b"#!")
    sandbox.fs.download("f.txt", host / "target" / "tool")
    assert stat.S_IMODE((host / "target" / "tool").stat().st_mode) == 0o777 & ~extract.umask()
    for name in ("../../evil", "a/b", "..", ""):
        read_answer(hostile, file_info(1, name=name), b"x")
        with pytest.raises(SandboxError):
            sandbox.fs.download("f.txt", host / "target")
    assert sorted(os.listdir(host / "target")) == ["tool"]


def test_agent_never_names_the_host_file(sandbox, hostile, host):
    """Attack: `download("f.txt", <dir>)` answered with the name '.bashrc', so the file
    would replace `<dir>/.bashrc`; the file must land as `<dir>/f.txt` instead."""
    home = host / "target"
    home.mkdir()
    (home / ".bashrc").write_text("# the user's own\n")
    read_answer(hostile, file_info(5, name=".bashrc", path="/home/sandbox/.bashrc"), b"pwned")
    sandbox.fs.download("sub/f.txt", home)
    assert (home / ".bashrc").read_text() == "# the user's own\n"
    assert (home / "f.txt").read_bytes() == b"pwned"
    (home / "f.txt").write_text("older copy\n")
    sandbox.fs.download("f.txt", home)  # the user named it: replacing it is what cp does
    assert (home / "f.txt").read_bytes() == b"pwned"
    with pytest.raises(FileError, match="no file name"):
        sandbox.fs.download("..", home)


def test_file_download_never_writes_through_a_symlink(sandbox, hostile, host):
    """Attack: the target name is a symlink to the canary file (left by a tree download)."""
    (host / "target").mkdir()
    os.symlink(host / "canary" / "secret", host / "target" / "f.txt")
    read_answer(hostile, file_info(4), b"evil")
    with pytest.raises(FileError, match="symlink"):
        sandbox.fs.download("f.txt", host / "target")
    with pytest.raises(FileError, match="symlink"):
        sandbox.fs.download("f.txt", host / "target" / "f.txt")
    os.unlink(host / "target" / "f.txt")


# -- every other answer --------------------------------------------------------------


def answer_stat(agent: HostileAgent, payload: bytes, kind: int = Frame.RESULT) -> None:
    frame = HEADER.pack(kind, len(payload)) + payload
    agent.on("stat", lambda conn, request: conn.sock.sendall(frame))


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param(b"{not json", id="garbage-json"),
        pytest.param(b"[" * 40000 + b"]" * 40000, id="deep-json"),
        pytest.param(json.dumps(dir_info("../../evil")).encode(), id="name-dotdot"),
        pytest.param(json.dumps(dir_info("a/b")).encode(), id="name-slash"),
        pytest.param(json.dumps(dir_info(type="chardev")).encode(), id="type"),
        pytest.param(json.dumps(dir_info(size=-1)).encode(), id="size"),
        pytest.param(json.dumps(dir_info(mode="0755")).encode(), id="mode"),
        pytest.param(json.dumps(dir_info(mtime=float("inf"))).encode(), id="mtime"),
        pytest.param(json.dumps({"name": "x"}).encode(), id="missing-keys"),
    ],
)
def test_malformed_results_become_typed_errors(sandbox, hostile, answer):
    """Attack: results that are not JSON, too deep, or of the wrong shape."""
    answer_stat(hostile, answer)
    with pytest.raises(SandboxError, match="agent sent"):
        sandbox.fs.stat("x")


def test_listing_entries_are_checked(sandbox, hostile):
    """Attack: a directory listing with an entry named '../../etc/passwd'."""
    entries = [dir_info("fine"), dir_info("../../etc/passwd")]
    hostile.on("list", lambda conn, request: conn.send_json(Frame.RESULT, {"entries": entries}))
    with pytest.raises(SandboxError, match="bad 'name'"):
        sandbox.fs.list(".")


def test_huge_frame_headers_are_refused_before_reading(sandbox, hostile):
    """Attack: a header announcing a 4 GiB RESULT (and then nothing)."""

    def huge(conn: Conn, request: dict) -> None:
        conn.sock.sendall(HEADER.pack(Frame.RESULT, (1 << 32) - 1))
        never_answer(conn, request)

    hostile.on("stat", huge)
    started = time.monotonic()
    with pytest.raises(SandboxError, match="4294967295 bytes"):
        sandbox.fs.stat("x")
    assert time.monotonic() - started < 10


def test_results_are_bounded_per_operation(sandbox, hostile):
    """Attack: a stat and an exec answered with 1 MiB RESULT frames (well under the old
    single 16 MiB bound, so many sessions at once made the service parse gigabytes),
    and a listing of more entries than any listing may have."""
    padding = {"padding": "x" * MiB}
    hostile.on("stat", lambda conn, request: conn.send_json(Frame.RESULT, padding))
    with pytest.raises(SandboxError, match=rf"at most {messages.FILE_RESULT} allowed"):
        sandbox.fs.stat("x")

    def exec_(conn: Conn, request: dict) -> None:
        conn.send_json(Frame.RESULT, {"pid": 7, **padding})
        never_answer(conn, request)

    hostile.on("exec", exec_)
    with pytest.raises(SandboxError, match=rf"at most {messages.SMALL_RESULT} allowed"):
        sandbox.sh("true", timeout=30)
    entries = [{"name": "e"}] * (messages.MAX_ENTRIES + 1)
    hostile.on("list", lambda conn, request: conn.send_json(Frame.RESULT, {"entries": entries}))
    with pytest.raises(SandboxError, match="bad 'entries'"):
        sandbox.fs.list(".")


@pytest.mark.parametrize(
    "kind",
    [pytest.param(Frame.STDOUT, id="stdout"), pytest.param(200, id="unknown")],
)
def test_unexpected_frames_are_errors(sandbox, hostile, kind):
    """Attack: answering stat with an output frame, or with a kind that does not exist."""
    answer_stat(hostile, b"hello", kind)
    with pytest.raises(SandboxError, match=r"unexpected|unknown"):
        sandbox.fs.stat("x")


def test_error_frames_are_bounded_and_typed(sandbox, hostile):
    """Attack: errors claiming the service's own kinds, long, with terminal escapes, huge."""
    answers = iter(
        [
            {"type": "ServiceUnavailable", "message": "restart me"},
            {"type": "FileNotFound", "message": "\x1b]0;owned\x07" + "x" * 50000},
            {"type": "FileNotFound"},
            {"type": "FileNotFound", "message": "x" * 100000},
        ]
    )
    hostile.on("stat", lambda conn, request: conn.send_json(Frame.ERROR, next(answers)))
    with pytest.raises(SandboxError) as unknown:
        sandbox.fs.stat("x")
    assert type(unknown.value) is SandboxError and "unknown kind" in str(unknown.value)
    with pytest.raises(FileNotFoundError) as long:
        sandbox.fs.stat("x")
    assert len(str(long.value)) < 2100 and "\x1b" not in str(long.value)
    with pytest.raises(SandboxError, match="without a message"):
        sandbox.fs.stat("x")
    with pytest.raises(SandboxError, match=r"frame of 1000\d\d bytes"):
        sandbox.fs.stat("x")


def test_exit_frames_are_checked(sandbox, hostile):
    """Attack: an EXIT frame whose exit code is not a number, or out of range."""
    codes = iter(["0", 99999, None])

    def exec_(conn: Conn, request: dict) -> None:
        conn.send_json(Frame.RESULT, {"pid": 7})
        conn.send_json(Frame.EXIT, {"exit_code": next(codes), "signal": None})

    hostile.on("exec", exec_)
    for _ in range(3):
        with pytest.raises(SandboxError, match="exit status"):
            sandbox.sh("true")


def never_answer(conn: Conn, request: dict) -> None:
    conn.rfile.read()  # until the host gives up and closes


def test_sh_timeout_holds_when_the_agent_never_answers(sandbox, hostile):
    """Attack: the agent accepts the connection and never answers (a stopped agent)."""
    hostile.on("exec", never_answer)
    started = time.monotonic()
    with pytest.raises(CommandTimeout):
        sandbox.sh("true", timeout=2)
    assert time.monotonic() - started < 2 + GRACE + 3

    def started_then_silent(conn: Conn, request: dict) -> None:
        conn.send_json(Frame.RESULT, {"pid": 7})
        conn.send(Frame.STDOUT, b"partial\n")
        conn.rfile.read()

    hostile.on("exec", started_then_silent)
    started = time.monotonic()
    with pytest.raises(CommandTimeout):
        sandbox.sh("sleep 100", timeout=2)
    assert time.monotonic() - started < 2 + GRACE + 3


def test_silent_agent_ends_transfers_with_a_typed_error(sandbox, hostile, host):
    """Attack: a read that never answers, and a download that stalls after 3 bytes (what
    reading a FIFO looks like); meanwhile the service keeps serving another sandbox."""
    hostile.on("read", never_answer)

    def stalled() -> Iterator[bytes]:
        yield b"abc"
        hostile.stop.wait(120)

    started = time.monotonic()
    with Sandbox.create() as other, ThreadPoolExecutor(2) as pool:
        silent_read = pool.submit(sandbox.fs.read_bytes, "fifo")
        wait_for(lambda: any(r["op"] == "read" for r in hostile.seen), message="the read")
        read_answer(hostile, file_info(10), stalled)
        stalled_download = pool.submit(sandbox.fs.download, "f.txt", host / "target")
        assert other.sh("true").exit_code == 0
        for future in (silent_read, stalled_download):
            with pytest.raises(SandboxError, match=r"did not answer|sent nothing"):
                future.result(ANSWER_TIMEOUT + INACTIVITY)
    assert time.monotonic() - started < max(ANSWER_TIMEOUT, INACTIVITY) + 15
    assert not (host / "target").exists()


def test_trickling_agent_ends_transfers_with_a_typed_error(sandbox, hostile, host, monkeypatch):
    """Attack: a file announced as 100 MiB that arrives one byte every 0.2 s, just often
    enough never to be silent for the inactivity limit: a download and a read each end
    with AgentTimeout once a window brought less than the minimum rate."""
    monkeypatch.setattr(streams, "RATE_WINDOW", 2.0)

    def trickle() -> Iterator[bytes]:  # ends (short) after 12 s, so an unbounded host fails
        for _ in range(60):
            if hostile.stop.wait(0.2):
                return
            yield b"x"

    read_answer(hostile, file_info(100 * MiB), trickle)
    for transfer in (
        lambda: sandbox.fs.download("f.txt", host / "target"),
        lambda: sandbox.fs.read_bytes("f.txt"),
    ):
        started = time.monotonic()
        with pytest.raises(SandboxError, match="KiB/s"):
            transfer()
        assert time.monotonic() - started < 2.0 + 5
    assert not (host / "target").exists()


def test_downloads_are_bounded_by_what_the_sandbox_can_hold(sandbox, hostile, host):
    """Attack: a file, and a tree member, announced one byte larger than the sandbox's
    disk and tmpfs limits together: no sandbox could hold it, so it is refused before
    any byte is written, however much space the host has."""
    limits = sandbox.info().limits
    capacity = limits["disk"] + sum(limits["tmpfs"].values())
    read_answer(hostile, file_info(capacity + 1), b"")
    with pytest.raises(FileError, match="more than the sandbox can hold"):
        sandbox.fs.download("f.txt", host / "target")
    assert not (host / "target").exists()
    tree_answer(hostile, raw_header(b"huge", size=capacity + 1))
    with pytest.raises(FileError, match="larger than"):
        sandbox.fs.download("tree", host / "target")
    assert os.listdir(host / "target") == []
