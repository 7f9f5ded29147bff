"""The teacher's audit: SSH sessions in the sandbox's log, and recorded terminals.

Everything here goes through the real service and the stock OpenSSH clients
(``ssh -tt``, ``scp``, ``sftp``); the sandbox's log is read back as a user reads it
(``logs()``), recordings through the API (``recordings()``, ``recording(name)``).
"""

from __future__ import annotations

import calendar
import getpass
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from jupyter_sandbox import FileNotFound, Sandbox, SandboxExpired
from jupyter_sandbox.ssh import recording
from jupyter_sandbox.ssh.audit import shown
from tests.conftest import UNPINNED_SSH, ServiceEnv, sandbox_pids, wait_for

pytestmark = [
    pytest.mark.unprivileged,
    pytest.mark.skipif(
        any(shutil.which(t) is None for t in ("ssh", "scp", "sftp")),
        reason="needs the OpenSSH clients: apt-get install openssh-client",
    ),
]
UTC_TIME = re.compile(r" at (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) UTC")
MiB = 1 << 20


@pytest.fixture
def recorded(service_env: ServiceEnv) -> Iterator[Sandbox]:
    """A session sandbox whose terminals are recorded."""
    with Sandbox.create(record_terminals=True) as sb:
        yield sb


def ssh_argv(sb: Sandbox, *options: str) -> list[str]:
    access = sb.expose_ssh()
    return ["ssh", *UNPINNED_SSH, *options, "-p", str(access.port), f"{access.username}@127.0.0.1"]


def run(argv: list[str], stdin: bytes = b"", timeout: float = 60) -> subprocess.CompletedProcess:
    env = {**os.environ, "TERM": "xterm-256color"}
    return subprocess.run(argv, input=stdin, capture_output=True, timeout=timeout, env=env)


def ssh_lines(sb: Sandbox) -> list[str]:
    return [e.text for e in sb.logs() if e.source == "ssh"]


def session_lines(sb: Sandbox, ends: int) -> list[str]:
    """The SSH lines of the log once `ends` sessions (and their connections) have ended."""

    def ended() -> list[str] | None:
        lines = ssh_lines(sb)
        closed = [t for t in lines if t.startswith("SSH connection") and " closed after " in t]
        return lines if len(closed) >= ends else None

    return wait_for(ended, message=f"{ends} SSH connections to be logged as closed")


def one_session(lines: list[str], what: str) -> tuple[str, str]:
    """The start and end line of the only session whose start mentions `what`."""
    starts = [t for t in lines if t.startswith("SSH session") and what in t]
    assert len(starts) == 1, (what, lines)
    label = starts[0].split(" (", 1)[0].split(" at ", 1)[0]  # "SSH session N from A port P"
    ends = [t for t in lines if t.startswith(f"{label} ended after ")]
    assert len(ends) == 1, (label, lines)
    return starts[0], ends[0]


# -- session lines --------------------------------------------------------------------


def test_every_kind_of_session_logs_who_what_and_how_it_ended(sandbox: Sandbox, tmp_path: Path):
    ssh = ssh_argv(sandbox)
    assert run([*ssh, "echo out; echo err >&2; exit 3"]).returncode == 3
    typed = b"echo typed-$((6*7))\nexit 7\n"
    shell = run(["ssh", "-tt", *ssh[1:]], typed)
    assert shell.returncode == 7 and b"typed-42" in shell.stdout
    (tmp_path / "up.txt").write_bytes(b"u" * 1000)
    port = ssh[ssh.index("-p") + 1]
    remote = ssh[-1]
    scp = ["scp", *UNPINNED_SSH, "-P", port]
    assert run([*scp, str(tmp_path / "up.txt"), f"{remote}:up.txt"]).returncode == 0
    assert run([*scp, "-O", str(tmp_path / "up.txt"), f"{remote}:legacy.txt"]).returncode == 0
    (tmp_path / "batch").write_text(f"get up.txt {tmp_path / 'down.txt'}\n")
    sftp = ["sftp", *UNPINNED_SSH, "-P", port, "-b", str(tmp_path / "batch"), remote]
    assert run(sftp).returncode == 0
    assert (tmp_path / "down.txt").read_bytes() == b"u" * 1000
    sandbox.spawn("exec python3 -m http.server 8017 --bind 127.0.0.1")
    wait_for(lambda: sandbox.sh("bash -c 'exec 3<>/dev/tcp/127.0.0.1/8017'", check=False).ok)
    forward = run(["ssh", "-W", "127.0.0.1:8017", *ssh[1:]], b"GET / HTTP/1.0\r\n\r\n")
    assert forward.stdout.startswith(b"HTTP/1.0 200")
    assert run(["ssh", "-W", "127.0.0.1:9", *ssh[1:]]).returncode == 255
    assert run(["ssh", "-s", *ssh[1:], "no-such-subsystem"]).returncode != 0

    lines = session_lines(sandbox, ends=8)
    me = f"(local user {getpass.getuser()}, uid {os.getuid()})"
    for line in lines:
        if line.startswith(("SSH connection from", "SSH session")) and " at " in line:
            assert line.split(" at ")[0].endswith(me), line
            moment = time.strptime(UTC_TIME.search(line)[1], "%Y-%m-%d %H:%M:%S")
            assert abs(calendar.timegm(moment) - time.time()) < 120, line  # UTC, not local

    start, end = one_session(lines, ': exec "echo out; echo err >&2; exit 3"')
    assert re.search(r"ended after [0-9.]+ s: exit status 3, 0 B in, 8 B out$", end), end
    start, end = one_session(lines, ": shell, pty ")
    assert start.endswith(': shell, pty 80x24 "xterm-256color"'), start
    assert f": exit status 7, {len(typed)} B in, " in end, end
    start, end = one_session(lines, ': exec "scp -t ')
    assert 'legacy.txt"' in start and ": exit status 0, " in end, end
    sftp_sessions = [t for t in lines if t.endswith(": sftp")]
    assert len(sftp_sessions) == 2, lines  # scp (over SFTP, as OpenSSH 9 does) and sftp
    start, end = one_session(lines, 'direct-tcpip forward to "127.0.0.1":8017')
    assert re.search(r": closed, 18 B in, [0-9.]+ (B|KiB) out$", end), end
    refused = [t for t in lines if 'forward to "127.0.0.1":9 refused: ' in t]
    assert len(refused) == 1, lines
    assert any('subsystem "no-such-subsystem" refused: only sftp is served' in t for t in lines)


def test_streamlocal_and_killed_sessions_are_logged(sandbox: Sandbox, tmp_path: Path):
    ssh = ssh_argv(sandbox)
    server = (
        "import socket\n"
        "s=socket.socket(socket.AF_UNIX); s.bind('app.sock'); s.listen()\n"
        "while True:\n"
        "  c,_=s.accept(); c.sendall(b'from-unix'); c.close()\n"
    )
    sandbox.fs.write_text("unix_server.py", server)
    sandbox.spawn("exec python3 unix_server.py")
    wait_for(lambda: sandbox.sh("test -S app.sock", check=False).ok)
    local = str(tmp_path / "t.sock")
    tunnel = subprocess.Popen(
        ["ssh", "-N", "-L", f"{local}:/home/sandbox/app.sock", *ssh[1:]],
        stdin=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for(
            lambda: os.path.exists(local) or tunnel.poll() is not None,
            message="the local end of the tunnel",
        )
        assert tunnel.poll() is None, tunnel.stderr.read()
        out = subprocess.run(["python3", "-c", _READ_UNIX, local], capture_output=True, timeout=30)
        assert out.stdout == b"from-unix"
    finally:
        tunnel.terminate()
        tunnel.wait(30)
    assert run(["ssh", "-tt", *ssh[1:], "kill -KILL $$"]).returncode == 137
    lines = session_lines(sandbox, ends=2)
    _, end = one_session(lines, 'streamlocal forward to "/home/sandbox/app.sock"')
    assert re.search(r": closed, 0 B in, 9 B out$", end), end
    _, end = one_session(lines, 'exec "kill -KILL $$"')
    assert ": killed by signal KILL (exit status 137), " in end, end


_READ_UNIX = (
    "import socket,sys\n"
    "c=socket.socket(socket.AF_UNIX); c.connect(sys.argv[1])\n"
    "sys.stdout.buffer.write(c.recv(100))\n"
)


def test_huge_and_hostile_commands_are_logged_escaped_and_bounded(sandbox: Sandbox):
    ssh = ssh_argv(sandbox)
    access_token = ssh[-1].split("@")[0]
    hostile = "echo '\x1b[2J\x1b]0;owned\x07' done\necho 'second line' \u202e"
    assert (
        run([*ssh, hostile]).stdout == b"\x1b[2J\x1b]0;owned\x07 done\nsecond line \xe2\x80\xae\n"
    )
    # As large as an SSH packet the gateway takes allows (ssh joins its arguments); too long
    # for one argument of bash -c, which the user is told.
    big_args = ["true", *["x" * 50_000] * 4]
    big = " ".join(big_args)
    assert b"Argument list too long" in run([*ssh, *big_args]).stderr
    huge = "true " + "y" * MiB  # larger than any packet the gateway takes: refused whole
    refused = run([*ssh, *[huge[i : i + 100_000] for i in range(0, len(huge), 100_000)]])
    assert refused.returncode == 255 and refused.stdout == b""
    lines = session_lines(sandbox, ends=3)
    start, _ = one_session(lines, "owned")
    assert start.endswith(
        ": exec \"echo '\\x1b[2J\\x1b]0;owned\\x07' done\\necho 'second line' \\u202e\""
    )
    start, end = one_session(lines, '"true xxx')
    assert start.endswith(f'…" ({len(big)} characters, the first 1000 shown)'), start[-80:]
    assert ": could not start: Argument list too long" in end, end
    for entry in sandbox.logs():
        assert len(entry.text) < 1500, entry.text[:200]
        assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f\u202e]", entry.text), entry.text
        assert access_token not in entry.text
    assert shown("z" * MiB).endswith(f'…" ({MiB} characters, the first 1000 shown)')


# -- recordings -----------------------------------------------------------------------


def parse_cast(data: bytes) -> tuple[dict, list[list]]:
    """An asciicast v2 file: its header and events, every line checked."""
    header, *lines = data.decode().splitlines()
    head = json.loads(header)
    assert head["version"] == 2 and head["width"] > 0 and head["height"] > 0
    assert isinstance(head["timestamp"], int)
    events = [json.loads(line) for line in lines]
    times = [e[0] for e in events]
    assert times == sorted(times) and all(isinstance(t, float | int) for t in times)
    for event in events:
        assert len(event) == 3 and event[1] in ("o", "r", "m") and isinstance(event[2], str)
    return head, events


def output_of(events: list[list]) -> str:
    return "".join(e[2] for e in events if e[1] == "o")


def recordings_dir(env: ServiceEnv, sb: Sandbox) -> Path:
    return env.storage / "sandboxes" / sb.id / recording.DIRECTORY


def test_recording_is_off_by_default(service_env: ServiceEnv, sandbox: Sandbox):
    assert sandbox.info().recording is False
    shell = run(["ssh", "-tt", *ssh_argv(sandbox)[1:]], b"echo hi\nexit\n")
    assert shell.returncode == 0 and b"recorded" not in shell.stdout
    lines = session_lines(sandbox, ends=1)
    assert not [t for t in lines if "record" in t]
    assert sandbox.recordings() == []
    assert not recordings_dir(service_env, sandbox).exists()


def test_a_recorded_terminal_is_announced_and_replays_what_happened(
    service_env: ServiceEnv, recorded: Sandbox
):
    assert recorded.info().recording is True
    assert {s.id: s.recording for s in Sandbox.list()}[recorded.id] is True
    ssh = ssh_argv(recorded)
    typed = b'echo hello-$((6*7))\nprintf \'\\xff\\xfe bad utf8 "]\\n[0, "o", "fake"]\\n\'\nexit\n'
    shell = run(["ssh", "-tt", *ssh[1:]], typed)
    assert shell.stdout.startswith(recording.NOTICE.encode() + b"\r\n"), shell.stdout[:200]
    assert b"hello-42" in shell.stdout
    assert run([*ssh, "echo no pty, no recording"]).stdout == b"no pty, no recording\n"
    lines = session_lines(recorded, ends=2)
    [name] = [r.name for r in recorded.recordings()]
    assert any(t.endswith(f": recording the terminal to {name}") for t in lines), lines
    [listed] = recorded.recordings()
    data = recorded.recording(listed)
    assert len(data) == listed.size and abs(listed.started_at - time.time()) < 120
    head, events = parse_cast(data)
    assert (head["width"], head["height"], head["env"]["TERM"]) == (80, 24, "xterm-256color")
    assert head["title"] == "shell"
    screen = output_of(events)
    assert "echo hello-$((6*7))" in screen  # what was typed, as the terminal echoed it
    assert "hello-42" in screen and '"]\r\n[0, "o", "fake"]' in screen and "\ufffd" in screen
    directory = recordings_dir(service_env, recorded)
    assert directory.stat().st_mode & 0o777 == 0o700
    assert (directory / name).stat().st_mode & 0o777 == 0o600
    assert (directory / name).stat().st_uid == os.geteuid()


def test_a_flood_is_cut_at_the_recording_limit(service_env: ServiceEnv, recorded: Sandbox):
    ssh = ssh_argv(recorded)
    flood = subprocess.run(
        ["ssh", "-tt", *ssh[1:], "yes | head -c 40M; echo; echo after-the-flood"],
        capture_output=True,
        stdin=subprocess.DEVNULL,
        timeout=300,
    )
    assert flood.returncode == 0 and flood.stdout.endswith(b"after-the-flood\r\n")
    lines = session_lines(recorded, ends=1)
    [info] = recorded.recordings()
    assert recording.RECORDING_LIMIT - (256 << 10) < info.size <= recording.RECORDING_LIMIT
    assert any(t.endswith(f"recording {info.name} truncated: it reached 64 MiB") for t in lines)
    _, events = parse_cast(recorded.recording(info.name))
    assert events[-2][1:] == ["m", "recording truncated: it reached 64 MiB"]
    assert "after-the-flood" not in output_of(events[-50:])
    on_disk = sum(p.stat().st_size for p in recordings_dir(service_env, recorded).iterdir())
    assert on_disk == info.size


def test_a_sandbox_cannot_reach_or_replace_its_recordings(
    service_env: ServiceEnv, recorded: Sandbox
):
    run(["ssh", "-tt", *ssh_argv(recorded)[1:]], b"echo secret-in-the-recording\nexit\n")
    session_lines(recorded, ends=1)
    [info] = recorded.recordings()
    host_path = recordings_dir(service_env, recorded) / info.name
    before = host_path.read_bytes()
    search = "find / \\( -path /proc -o -path /sys \\) -prune -o -name '*.cast' -print"
    assert recorded.sh(f"{search} 2>/dev/null", check=False).stdout == ""
    probe = recorded.sh(f"cat {host_path} /proc/*/root{host_path} 2>&1", check=False)
    assert probe.exit_code != 0 and "secret-in-the-recording" not in probe.stdout
    for path in (str(host_path), f"/proc/1/root{host_path}"):
        with pytest.raises(FileNotFound):  # the agent, asked directly, sees none either
            recorded.fs.read_bytes(path)
    replace = f"mkdir -p {host_path.parent} && ln -sf /etc/passwd {host_path} && echo made"
    assert recorded.sh(replace).stdout == "made\n"  # in the sandbox's own view only
    assert recorded.recording(info.name) == before == host_path.read_bytes()
    assert not host_path.is_symlink()


def raw_get(env: ServiceEnv, path: str) -> tuple[int, bytes]:
    """GET `path` exactly as written (an HTTP client would resolve its dot segments)."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(json.loads(env.runtime_file.read_text())["socket"])
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


@pytest.mark.parametrize(
    "name",
    [
        "..",
        "%2E%2E",
        "../../record.json",
        "%2E%2E%2Frecord.json",
        "..%2F..%2Fmanifest.json",
        "record.json",
        "x.cast",
        "20261201T152913Z-0.cast",
        "20261201T152913Z-1.cast%00",
        "20261201T152913Z-1.cast%2F..",
        "a" * 5000,
    ],
)
def test_recording_names_are_checked(service_env: ServiceEnv, recorded: Sandbox, name: str):
    run(["ssh", "-tt", *ssh_argv(recorded)[1:]], b"exit\n")
    session_lines(recorded, ends=1)
    assert len(recorded.recordings()) == 1
    status, body = raw_get(service_env, f"/v1/sandboxes/{recorded.id}/recordings/{name}")
    assert status in (400, 404), (status, body[:200])
    assert json.loads(body)["error"] in ("InvalidRequest", "FileNotFound")
    assert b'"format"' not in body and b"ssh_tokens" not in body  # no file of the service's
    assert recorded.info().status == "running"  # and the service goes on serving


def test_recordings_outlive_a_failure_and_go_with_the_sandbox(service_env: ServiceEnv):
    sb = Sandbox.create(timeout="10m", record_terminals=True)
    try:
        run(["ssh", "-tt", *ssh_argv(sb)[1:]], b"echo kept-after-failure\nexit\n")
        session_lines(sb, ends=1)
        [info] = sb.recordings()
        data = sb.recording(info.name)
        os.kill(sandbox_pids(service_env.storage, sb.id)["agent"], signal.SIGKILL)
        wait_for(lambda: sb.info().status == "failed", message="the sandbox to fail")
        assert sb.recordings() == [info] and sb.recording(info.name) == data
        assert "kept-after-failure" in output_of(parse_cast(data)[1])
    finally:
        sb.kill()
    assert not (service_env.storage / "sandboxes" / sb.id).exists()
    with pytest.raises(SandboxExpired):
        sb.recordings()


def test_the_cli_creates_lists_and_writes_recordings(service_env: ServiceEnv):
    sandbox_id = service_env.run_cli("create", "--record-terminals").stdout.strip()
    sb = Sandbox.connect(sandbox_id)
    try:
        assert re.search(r"terminals\s+recorded\n", service_env.run_cli("info", sandbox_id).stdout)
        assert "none yet" in service_env.run_cli("recordings", sandbox_id).stdout
        run(["ssh", "-tt", *ssh_argv(sb)[1:]], b"echo from-the-cli\nexit\n")
        session_lines(sb, ends=1)
        [info] = sb.recordings()
        listed = service_env.run_cli("recordings", sandbox_id).stdout.splitlines()
        assert listed[0].split() == ["NAME", "STARTED", "SIZE"] and info.name in listed[1]
        cast = subprocess.run(
            [sys.executable, "-m", "jupyter_sandbox", "recordings", sandbox_id, info.name],
            env={**os.environ, **service_env.env},
            capture_output=True,
            timeout=60,
            check=True,
        ).stdout
        assert "from-the-cli" in output_of(parse_cast(cast)[1])
    finally:
        sb.kill()
    plain = service_env.run_cli("create").stdout.strip()
    try:
        assert "--record-terminals" in service_env.run_cli("recordings", plain).stdout
        assert re.search(r"terminals\s+not recorded\n", service_env.run_cli("info", plain).stdout)
    finally:
        Sandbox.connect(plain).kill()


def test_the_service_setting_records_every_sandbox(separate_service_env: dict[str, str]):
    env = {
        **separate_service_env,
        "JUPYTER_SANDBOX_RECORD_TERMINALS": "on",
        "JUPYTER_SANDBOX_POOL": "0",
    }
    script = f"""
import json, subprocess, sys
from jupyter_sandbox import Sandbox
with Sandbox.create() as sb:
    access = sb.expose_ssh()
    argv = ["ssh", "-tt", *{UNPINNED_SSH!r}, "-p", str(access.port), access.username + "@127.0.0.1"]
    out = subprocess.run(argv, input=b"echo by-setting\\nexit\\n", capture_output=True).stdout
    recordings = sb.recordings()
    data = sb.recording(recordings[0]) if recordings else b""
    print(json.dumps([sb.info().recording, out.decode(errors="replace"), data.decode()]))
"""
    runtime_file = Path(env["JUPYTER_RUNTIME_DIR"]) / "jupyter-sandbox.json"
    try:
        done = subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr
        flagged, out, data = json.loads(done.stdout)
    finally:
        if runtime_file.exists():
            pid = json.loads(runtime_file.read_text())["pid"]
            os.kill(pid, signal.SIGTERM)
            wait_for(lambda: not Path(f"/proc/{pid}").exists(), 30, message="the service to stop")
    assert flagged is True and out.startswith(recording.NOTICE)
    assert "by-setting" in output_of(parse_cast(data.encode())[1])
    sandboxes = Path(env["JUPYTER_SANDBOX_DIR"]) / "sandboxes"
    assert not sandboxes.exists() or not list(sandboxes.iterdir())


# -- the recording files themselves ---------------------------------------------------


def test_all_recordings_of_a_sandbox_are_bounded_together(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(recording, "SANDBOX_LIMIT", 3 * MiB)
    monkeypatch.setattr(recording, "CHECK_EVERY", 64 << 10)
    first, second = (recording.Recording.start(tmp_path, 80, 24, "xterm", "t") for _ in "12")
    chunk = b"\xe2\x82" + b"\xac" + b"x" * 4093  # a character split across two chunks
    for _ in range(1000):
        first.output(chunk[:1])
        first.output(chunk[1:])
        second.output(chunk)
    first.close()
    second.close()
    assert first.stopped and second.stopped and "reached 3 MiB" in second.stopped
    total = sum(p.stat().st_size for p in (tmp_path / recording.DIRECTORY).iterdir())
    assert total <= 3 * MiB + 2 * (recording.CHECK_EVERY + 8192)
    assert "€" in output_of(parse_cast((tmp_path / "recordings" / first.name).read_bytes())[1])
    with pytest.raises(OSError, match="reached 3 MiB"):
        recording.Recording.start(tmp_path, 80, 24, "xterm", "t")
    assert [r.name for r in recording.list_recordings(tmp_path)] == [first.name, second.name]


def test_a_recordings_directory_that_is_a_link_is_not_written_through(tmp_path: Path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    (tmp_path / "sandbox").mkdir()
    (tmp_path / "sandbox" / recording.DIRECTORY).symlink_to(elsewhere)
    with pytest.raises(OSError):
        recording.Recording.start(tmp_path / "sandbox", 80, 24, "xterm", "t")
    assert list(elsewhere.iterdir()) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a small tmpfs: runs as root")
def test_a_full_disk_ends_the_recording_not_the_writer(tmp_path: Path):
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)], check=True)
    try:
        rec = recording.Recording.start(disk, 80, 24, "xterm", "t")
        for _ in range(200):
            rec.output(b"z" * 4096)  # 800 KiB into 256 KiB: never raises
        rec.close()
        assert rec.stopped is not None and "No space left on device" in rec.stopped
        head, events = parse_cast((disk / recording.DIRECTORY / rec.name).read_bytes())
        assert head["version"] == 2 and events and output_of(events) == "z" * 4096 * len(events)
        with pytest.raises(OSError, match="No space left on device"):
            recording.Recording.start(disk, 80, 24, "xterm", "t")
        assert [r.name for r in recording.list_recordings(disk)] == [rec.name]
    finally:
        subprocess.run(["umount", str(disk)], check=True)
