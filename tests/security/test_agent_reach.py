"""Attacks on the agent from user code inside its sandbox.

Each test runs an attack as the sandbox user would, from a shell in the sandbox,
then checks that the agent still serves: a command answers within its timeout,
a file written before is intact, and a background process still starts and logs.
"""

from __future__ import annotations

import os
import signal
import textwrap
import uuid

import pytest

from jupyter_sandbox import FileNotFound, Sandbox, SandboxError
from tests.conftest import ServiceEnv, sandbox_processes, wait_for

pytestmark = pytest.mark.unprivileged

# Python inside the sandbox: every pid it can see, except its own.
VISIBLE = """
import ctypes, errno, os, signal, sys
libc = ctypes.CDLL(None, use_errno=True)
me = os.getpid()
pids = sorted(int(p) for p in os.listdir("/proc") if p.isdigit() and int(p) != me)
"""


def run_inside(sandbox: Sandbox, code: str, timeout: float = 30) -> str:
    """Run Python `code` as the sandbox user (replacing the shell) and return its stdout."""
    script = VISIBLE + textwrap.dedent(code)
    return sandbox.sh(f"exec python3 -c {_quote(script)}", timeout=timeout, check=False).stdout


def _quote(text: str) -> str:
    return "'" + text.replace("'", "'\"'\"'") + "'"


@pytest.fixture
def victim(sandbox: Sandbox) -> Sandbox:
    """A sandbox with a file and a running background process, as a user leaves it."""
    sandbox.fs.write_text("work.txt", "precious\n")
    sandbox.spawn("sleep 600")
    return sandbox


def assert_agent_serves(sandbox: Sandbox) -> None:
    """The agent answers in time, the files are intact, and spawn and logs still work."""
    result = sandbox.sh("echo alive", timeout=10)
    assert result.stdout == "alive\n"
    assert sandbox.fs.read_text("work.txt") == "precious\n"
    marker = uuid.uuid4().hex
    proc = sandbox.spawn(f"echo {marker}")
    assert proc.wait(timeout=10) == 0
    with sandbox.logs(tail=50) as entries:
        assert any(marker in entry.text for entry in entries)


def test_kill_minus_one_leaves_the_agent(victim: Sandbox):
    """Attack: `kill -9 -1` signals every process the user may signal."""
    victim.sh("kill -9 -1", check=False, timeout=10)
    assert_agent_serves(victim)


def test_pkill_by_uid_leaves_the_agent(victim: Sandbox):
    """Attack: `pkill -9 -u $(id -u)` kills every process of the sandbox's uid."""
    victim.sh("pkill -9 -u $(id -u)", check=False, timeout=10)
    assert_agent_serves(victim)


def test_stopping_every_visible_process_leaves_the_agent(victim: Sandbox):
    """Attack: SIGSTOP to every pid in /proc, so that every later call would hang."""
    out = run_inside(
        victim,
        """
        for pid in pids:
            try:
                os.kill(pid, signal.SIGSTOP)
                print("stopped", pid)
            except OSError:
                pass
        """,
    )
    assert "stopped" in out  # the attack reached something (the user's own sleep)
    assert_agent_serves(victim)


def test_prlimit_on_every_visible_process_leaves_the_agent(victim: Sandbox):
    """Attack: `prlimit` 3 fds, 1 process, 16 MiB of address space, 1 s of CPU on every pid."""
    result = victim.sh(
        "for p in $(ls /proc | grep -E '^[0-9]+$'); do [ $p = $$ ] || "
        "prlimit --pid $p --nofile=3:3 --nproc=1:1 --as=16777216:16777216 --cpu=1:1 "
        "&& echo limited $p; done",
        check=False,
        timeout=20,
    )
    assert "limited 1\n" in result.stdout  # same uid: pid 1 (the user init) is reachable
    assert_agent_serves(victim)


def test_signals_to_pid_one_spend_none_of_its_cpu_limit(victim: Sandbox):
    """Attack: lower pid 1's RLIMIT_CPU to 1 s, then flood it with the signals glibc
    keeps handlers for (32, 33) from several processes, so that each delivery wakes it
    until the kernel kills it at its CPU limit (and the sandbox ends with it).

    Pid 1 must spend no CPU time at all while flooded, and the agent must still serve.
    """
    out = run_inside(
        victim,
        """
        import resource, time
        def ticks():
            fields = open("/proc/1/stat").read().rsplit(")", 1)[1].split()
            return int(fields[11]) + int(fields[12])
        resource.prlimit(1, resource.RLIMIT_CPU, (1, 1))
        before = ticks()
        children = []
        for n in range(4):
            pid = os.fork()
            if pid == 0:
                sent, end = 0, time.monotonic() + 3
                while time.monotonic() < end:
                    os.kill(1, 32 + n % 2)
                    sent += 1
                print("sent", sent, flush=True)
                os._exit(0)
            children.append(pid)
        for pid in children:
            os.waitpid(pid, 0)
        print("ticks", before, ticks(), flush=True)
        """,
    )
    sent = [int(line.split()[1]) for line in out.splitlines() if line.startswith("sent")]
    assert len(sent) == 4 and min(sent) > 1000, out
    before, after = (int(n) for n in out.split("ticks")[1].split())
    assert after == before, out
    assert victim.sh("true", timeout=10).exit_code == 0
    assert_agent_serves(victim)


def test_ptrace_reaches_only_the_users_own_processes(victim: Sandbox):
    """Attack: PTRACE_ATTACH and PTRACE_SEIZE on every visible pid, to take over the agent."""
    out = run_inside(
        victim,
        """
        for pid in pids:
            for request in (16, 0x4206):  # PTRACE_ATTACH, PTRACE_SEIZE
                if libc.ptrace(request, pid, 0, 0) == 0:
                    print("traced", pid)
                    libc.ptrace(17, pid, 0, 0)  # PTRACE_DETACH
                elif pid == 1:
                    print("refused", pid, errno.errorcode[ctypes.get_errno()])
        """,
    )
    assert "traced 1\n" not in out
    assert "refused 1 EPERM" in out
    assert_agent_serves(victim)


def test_pidfd_getfd_takes_no_descriptor_of_the_agent(victim: Sandbox):
    """Attack: pidfd_open + pidfd_getfd on every visible pid, to take the agent's socket."""
    out = run_inside(
        victim,
        """
        import socket, stat
        libc.syscall.restype = ctypes.c_long
        for pid in pids:
            try:
                pidfd = os.pidfd_open(pid)
            except OSError:
                continue
            for target in range(64):
                fd = libc.syscall(438, pidfd, target, 0)  # pidfd_getfd
                if fd < 0:
                    if pid == 1 and target == 0:
                        print("refused", pid, errno.errorcode[ctypes.get_errno()])
                    continue
                print("took", pid, target)
                if stat.S_ISSOCK(os.fstat(fd).st_mode):
                    s = socket.socket(fileno=fd)
                    if s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                        print("listener", pid, target)
                    s.detach()
                os.close(fd)
        """,
    )
    assert "took 1 " not in out and "listener" not in out
    assert "refused 1 EPERM" in out
    assert_agent_serves(victim)


def test_pidfd_send_signal_through_proc_dirfd_leaves_the_agent(victim: Sandbox):
    """Attack: pidfd_send_signal(SIGKILL, SIGSTOP) through a /proc/<pid> dirfd of every pid."""
    out = run_inside(
        victim,
        """
        for pid in pids:
            try:
                fd = os.open(f"/proc/{pid}", os.O_DIRECTORY)
            except OSError:
                continue
            for sig in (signal.SIGSTOP, signal.SIGKILL):
                if libc.syscall(424, fd, sig, None, 0) == 0:  # pidfd_send_signal
                    print("sent", pid, sig)
            os.close(fd)
        """,
    )
    assert "sent" in out  # the call works; pid 1 simply does not take it
    assert_agent_serves(victim)


def test_oom_score_adj_of_pid_one_is_not_writable(victim: Sandbox):
    """Attack: raise oom_score_adj of every visible pid, so the OOM killer picks the agent."""
    out = run_inside(
        victim,
        """
        for pid in pids:
            try:
                with open(f"/proc/{pid}/oom_score_adj", "w") as f:
                    f.write("1000")
                print("raised", pid)
            except OSError as e:
                print("refused", pid, type(e).__name__)
        """,
    )
    assert "raised 1\n" not in out and "refused 1 PermissionError" in out
    assert_agent_serves(victim)


def test_memory_environ_and_fds_of_pid_one_are_unreadable(victim: Sandbox):
    """Attack: read /proc/1/mem, environ and fd (the process user code can still name)."""
    out = run_inside(
        victim,
        """
        for name in ("mem", "environ", "fd", "maps", "root/proc", "ns/pid"):
            path = f"/proc/1/{name}"
            try:
                if os.path.isdir(path) and not os.path.islink(path):
                    os.listdir(path)
                else:
                    with open(path, "rb") as f:
                        f.read(1)
                print("read", name)
            except OSError as e:
                print("refused", name, type(e).__name__)
        """,
    )
    for name in ("mem", "environ", "fd", "maps", "root/proc", "ns/pid"):
        assert f"refused {name} PermissionError" in out, out
    assert_agent_serves(victim)


def test_agent_is_not_among_the_visible_processes(sandbox: Sandbox, service_env: ServiceEnv):
    """Attack: look for the agent in `ps`; it must not be there: it has no pid to name.

    From the host: the agent lives one pid namespace above the user's processes,
    and pid 1 of theirs is the user init.
    """
    ps = sandbox.sh("ps -eo pid=,args=").stdout
    assert "sandbox-agent" not in ps and "main.pyc" not in ps, ps
    assert ps.splitlines()[0].split(None, 1) == ["1", "sandbox-init"]
    sleeper = sandbox.spawn("sleep 600")
    tree = sandbox_tree(service_env, sandbox.id)
    agent = next(pid for pid in tree if _cmdline(pid).startswith("/usr/bin/python3 "))
    init = next(pid for pid in tree if _status(pid)["Name"] == "sandbox-init")
    user = next(pid for pid in tree if _cmdline(pid) == "/bin/sh -c sleep 600 ")
    agent_ns, init_ns, user_ns = (_status(pid)["NSpid"].split() for pid in (agent, init, user))
    assert len(init_ns) == len(user_ns) == len(agent_ns) + 1
    assert init_ns[-1] == "1" and user_ns[-1] == str(sleeper.pid)  # the pid the user sees


def test_agent_state_is_hidden_from_user_code(victim: Sandbox):
    """Attack: forge or erase the sandbox log by writing to the agent's state directory."""
    assert victim.sh("ls -A /run/sandbox").stdout == ""
    forged = victim.sh("echo '{}' >> /run/sandbox/log.jsonl", check=False)
    assert forged.exit_code != 0 and "Read-only file system" in forged.stderr
    assert_agent_serves(victim)


@pytest.mark.parametrize("target", ["/run/sandbox", "../../../run/sandbox"])
def test_links_to_the_state_directory_lead_the_agent_nowhere(
    victim: Sandbox, service_env: ServiceEnv, target: str
):
    """Attack: plant `out -> /run/sandbox` in the home, so that the owner's file calls on
    `out/...` (or the plain path /run/sandbox/...) write into the agent's state directory
    on the host (outside the home's quota) or read and overwrite the agent's own log.

    Every such call must fail with a typed error and leave the state directory as it was.
    """
    victim.sh(f"ln -s {target} out")
    state = service_env.storage / "sandboxes" / victim.id / "state"
    before = sorted(p.name for p in state.iterdir())
    assert "log.jsonl" in before  # the agent's log is there, and only reachable from the host
    for path in ("out/planted.bin", "/run/sandbox/planted.bin"):
        with pytest.raises(SandboxError):
            victim.fs.write_bytes(path, b"Z" * 4096)
        with pytest.raises(SandboxError):
            victim.fs.mkdir(path)
    for path in ("out/log.jsonl", "/run/sandbox/log.jsonl"):
        with pytest.raises(FileNotFound):
            victim.fs.read_bytes(path)
        with pytest.raises(SandboxError):
            victim.fs.remove(path)
    assert victim.fs.list("out") == []
    assert sorted(p.name for p in state.iterdir()) == before
    assert_agent_serves(victim)


def test_user_processes_have_no_capabilities(sandbox: Sandbox):
    """Attack: look for capabilities left from the agent's setup (it held CAP_SYS_ADMIN)."""
    status = sandbox.sh("cat /proc/self/status /proc/1/status").stdout
    caps = [line.split() for line in status.splitlines() if line.startswith("Cap")]
    assert len(caps) == 10 and all(int(value, 16) == 0 for _, value in caps), caps
    assert "NoNewPrivs:\t1" in status
    assert sandbox.sh("mount -t tmpfs none /tmp 2>&1", check=False).exit_code != 0


def test_user_can_trace_its_own_processes(sandbox: Sandbox):
    """Debugging is a feature: strace -f and ptrace of the user's own child still work."""
    traced = sandbox.sh("strace -f -e trace=execve true 2>&1", timeout=30)
    assert "execve(" in traced.stdout
    out = run_inside(
        sandbox,
        """
        child = os.fork()
        if child == 0:
            signal.pause()
            os._exit(0)
        print("seize", libc.ptrace(0x4206, child, 0, 0))
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
        """,
    )
    assert "seize 0" in out


def test_user_init_death_fails_the_sandbox_with_a_reason(service_env: ServiceEnv):
    """Attack from outside the model (the host kills it): the user init dies.

    The agent must notice, say why, and end rather than serve a sandbox without an init;
    the sandbox fails (its files are kept) with that reason.
    """
    sb = Sandbox.create()
    try:
        directory = service_env.storage / "sandboxes" / sb.id
        init = next(
            pid
            for pid in sandbox_tree(service_env, sb.id)
            if _status(pid)["Name"] == "sandbox-init"
        )
        os.kill(init, signal.SIGKILL)
        wait_for(lambda: sb.info().status == "failed", 20, message="the sandbox to fail")
        assert "init process ended" in sb.info().failure
        assert b"init process ended" in (directory / "agent.log").read_bytes()
    finally:
        sb.kill()


def sandbox_tree(service_env: ServiceEnv, sandbox_id: str) -> list[int]:
    """Host pids of a sandbox's processes: its bwrap processes and all their descendants."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parents[int(entry)] = int(_status(int(entry))["PPid"])
            except (OSError, KeyError):
                continue
    tree = [p for p in sandbox_processes(service_env.storage) if f"/{sandbox_id}/" in _cmdline(p)]
    for pid in tree:  # grows while it is walked
        tree += [child for child, parent in parents.items() if parent == pid and child not in tree]
    return tree


def _status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _agent_has_limits_of_its_own(sandbox: Sandbox) -> None:
    """Skip where the agent shares its cgroup limits with user code (no cgroups, or v2)."""
    note = sandbox.info().limits_note or ""
    if "agent shares these limits" in note or "NOT enforced" in note:
        pytest.skip(f"the agent has no limits of its own here: {note}")


@pytest.mark.parametrize("owner_upload", [0, 90 << 20], ids=["alone", "after-tmp-upload"])
def test_filling_a_memfd_to_the_memory_limit_leaves_the_agent(
    service_env: ServiceEnv, owner_upload: int
):
    """Attack: under memory=256M, write into a memfd until the memory cgroup refuses.
    Those pages are in no process's RSS, so an OOM killer that weighed the agent with
    user code would pick it (the biggest RSS) and end the sandbox. The owner may have
    uploaded a file into /tmp (RAM the agent wrote, so charged to the agent) before.

    The OOM must stay among user code: the agent serves and the home is intact.
    """
    with Sandbox.create(memory="256M") as sb:
        _agent_has_limits_of_its_own(sb)
        sb.fs.write_text("work.txt", "precious\n")
        if owner_upload:
            sb.fs.write_bytes("/tmp/upload.bin", bytes(owner_upload))
        filler = sb.spawn(
            "exec python3 -c 'import os\n"
            'fd = os.memfd_create("fill")\n'
            "while True: os.write(fd, bytes(1 << 20))'"
        )
        assert filler.wait(timeout=60) != 0  # killed or refused: it never filled forever
        assert sb.sh("true", timeout=10).exit_code == 0
        assert_agent_serves(sb)
        assert sb.info().status == "running"


def test_forking_to_the_pid_limit_leaves_the_agent(service_env: ServiceEnv):
    """Attack: fork until pids.max and hold every process, so that the agent (whose
    threads shared that limit) cannot start the thread a request needs.

    File operations still answer, and a command either runs or fails with a typed
    error; once the forks are gone, everything works again.
    """
    with Sandbox.create(pids=64) as sb:
        _agent_has_limits_of_its_own(sb)
        sb.fs.write_text("work.txt", "precious\n")
        holder = sb.spawn(
            "exec python3 -c '"
            "import os, time\n"
            "n = 0\n"
            "while True:\n"
            "    try: pid = os.fork()\n"
            "    except OSError: break\n"
            "    if pid == 0: time.sleep(600); os._exit(0)\n"
            "    n += 1\n"
            'print("forked", n, flush=True)\n'
            "time.sleep(600)'"
        )

        def forked() -> bool:
            with sb.logs(tail=20) as entries:
                return any("forked" in entry.text for entry in entries)

        wait_for(forked, 30, message="the fork holder at the pid limit")
        assert sb.fs.read_text("work.txt") == "precious\n"
        sb.fs.write_text("more.txt", "x\n")
        try:
            assert sb.sh("true", timeout=10).exit_code == 0
        except SandboxError as e:  # no process to be had: said so, with a type
            assert "the sandbox is out of resources" in str(e), e
        holder.kill()
        sb.sh("pkill -9 -u $(id -u) python3", check=False, timeout=10)
        wait_for(lambda: sb.sh("true", timeout=10).exit_code == 0, 30, message="recovery")
        assert_agent_serves(sb)
