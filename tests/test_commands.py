"""Running commands: results, errors, streaming, stdin, timeouts, interrupts, background."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from jupyter_sandbox import CommandError, CommandTimeout, Sandbox
from tests.conftest import wait_for

pytestmark = [pytest.mark.unprivileged, pytest.mark.backends("local", "kubernetes")]


def test_create_with_options_and_run(service_env):
    with Sandbox.create(
        timeout="10m", memory="512M", cpus=1, env={"A": "1"}, labels={"course": "linux101"}
    ) as sb:
        result = sb.sh("echo $A; whoami; pwd; hostname")
        assert result.stdout.split() == ["1", "sandbox", "/home/sandbox", sb.id]
        assert result.exit_code == 0 and result.stderr == ""
        user = sb.sh("id; getent passwd sandbox; getent group sandbox").stdout
        assert user == (
            "uid=1000(sandbox) gid=1000(sandbox) groups=1000(sandbox)\n"
            "sandbox:x:1000:1000:Sandbox user:/home/sandbox:/bin/bash\nsandbox:x:1000:\n"
        )
        info = sb.info()
        assert info.labels == {"course": "linux101"}
        assert info.limits["memory"] == 512 * 1024 * 1024 and info.limits["cpus"] == 1
        assert 590 < info.time_left <= 600


def test_nonzero_exit_raises_with_result(sandbox):
    with pytest.raises(CommandError) as excinfo:
        sandbox.sh("echo out; echo err >&2; exit 3")
    result = excinfo.value.result
    assert (result.stdout, result.stderr, result.exit_code) == ("out\n", "err\n", 3)
    assert sandbox.sh("exit 4", check=False).exit_code == 4


def test_cwd_env_and_stdin(sandbox):
    sandbox.fs.mkdir("work/dir")
    assert sandbox.sh("pwd", cwd="work/dir").stdout == "/home/sandbox/work/dir\n"
    assert sandbox.sh("echo $X", env={"X": "y z"}).stdout == "y z\n"
    assert sandbox.sh("tr a-z A-Z", input="hello\n").stdout == "HELLO\n"
    binary = bytes(range(256)) * 1000
    assert sandbox.sh("cat", input=binary).stdout_bytes == binary


def test_output_streams_while_the_command_runs(sandbox):
    """The first line arrives while the command still waits for the test's go-ahead."""
    lines: list[str] = []
    first_seen = threading.Event()

    def on_stdout(line: str) -> None:
        lines.append(line)
        first_seen.set()

    def release() -> None:
        first_seen.wait(30)
        Sandbox.connect(sandbox.id).fs.write_text("go", "")

    threading.Thread(target=release, daemon=True).start()
    result = sandbox.sh(
        "echo first; while [ ! -e go ]; do sleep 0.01; done; echo second", on_stdout=on_stdout
    )
    assert lines == ["first\n", "second\n"]
    assert result.stdout == "first\nsecond\n"


def test_stream_iterator(sandbox):
    got = [(line.stream, line.text) for line in sandbox.stream("echo a; echo b >&2; echo c")]
    assert sorted(got) == [("stderr", "b\n"), ("stdout", "a\n"), ("stdout", "c\n")]
    with pytest.raises(CommandError):
        list(sandbox.stream("exit 2"))


def test_timeout_kills_command_and_sandbox_stays_usable(sandbox):
    started = time.monotonic()
    with pytest.raises(CommandTimeout):
        sandbox.sh("sleep 30", timeout=0.5)
    assert time.monotonic() - started < 10
    assert sandbox.sh("echo alive").stdout == "alive\n"


def test_keyboard_interrupt_stops_remote_command(sandbox):
    def interrupt_on_first_line(line: str) -> None:
        os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C (or a kernel interrupt) sends

    # Python's own Ctrl-C handler, also where this run inherited SIGINT ignored (as a
    # background job of a non-interactive shell does).
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            sandbox.sh(
                "echo started; exec sleep 300 # marker-ki", on_stdout=interrupt_on_first_line
            )
    finally:
        signal.signal(signal.SIGINT, inherited)
    wait_for(
        lambda: "marker-ki" not in sandbox.sh("ps -eo args").stdout,
        10,
        message="the interrupted command to be gone",
    )
    assert sandbox.sh("echo usable").stdout == "usable\n"


def test_background_process(sandbox):
    sandbox.fs.write_text("app/index.html", "hello from the app")
    web = sandbox.spawn("python3 -m http.server 8000", cwd="app")
    assert web.running
    page = sandbox.sh(
        "for i in $(seq 100); do curl -sf localhost:8000/index.html && exit; "
        "sleep 0.1; done; exit 1"
    ).stdout
    assert page == "hello from the app"
    assert [p.pid for p in sandbox.processes()] == [web.pid]
    web.kill()
    assert web.wait(timeout=10) == 143
    assert not web.running
    job = sandbox.spawn("echo out; echo err >&2; exit 5")
    assert job.wait(timeout=10) == 5
    assert sorted((o.stream, o.text) for o in job.output()) == [
        ("stderr", "err\n"),
        ("stdout", "out\n"),
    ]
    assert {p.pid for p in Sandbox.connect(sandbox.id).processes()} == {web.pid, job.pid}


def test_logs_survive_reconnect(service_env):
    with Sandbox.create(timeout="5m") as sb:
        job = sb.spawn("for i in 1 2 3; do echo line$i; done")
        job.wait(timeout=10)
        other = Sandbox.connect(sb.id)
        texts = [e.text for e in other.logs() if e.stream == "stdout"]
        assert texts == ["line1\n", "line2\n", "line3\n"]
        events = [e.text for e in other.logs() if e.stream == "event"]
        assert events[0].startswith("started:") and events[-1] == "exited with code 0"
        assert [e.text for e in other.logs(tail=1)] == ["exited with code 0"]


def test_follow_logs_sees_new_lines(sandbox):
    follower = sandbox.logs(follow=True)
    sandbox.spawn("echo one; while [ ! -e go ]; do sleep 0.01; done; echo two")
    seen = []
    for entry in follower:
        if entry.stream == "stdout":
            seen.append(entry.text)
            if entry.text == "one\n":
                sandbox.fs.write_text("go", "")
            if entry.text == "two\n":
                break
    follower.close()
    assert seen == ["one\n", "two\n"]
