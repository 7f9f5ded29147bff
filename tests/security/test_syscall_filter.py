"""The syscall filter: attacks on the kernel from user code inside a sandbox.

Each live test runs raw syscalls with Python's ctypes inside a sandbox and checks
the errno the filter answers with. The arguments are chosen so that the kernel
alone would answer differently (EFAULT, EINVAL, ENOTTY, success...): the test with
the filter turned off shows those other answers, so these tests fail if the filter
is missing. The programs themselves are also checked instruction by instruction,
for both arches, with a small classic-BPF interpreter.
"""

from __future__ import annotations

import errno
import json
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from jupyter_sandbox import Sandbox
from jupyter_sandbox.backends import seccomp
from tests.conftest import wait_for

PROBE = r"""
import ctypes, errno, json, os, socket, sys

NR = json.loads(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
MINUS = lambda n: (1 << 64) - n


def call(name, *args):
    ctypes.set_errno(0)
    result = libc.syscall(ctypes.c_long(NR[name]), *[ctypes.c_ulong(a) for a in args])
    if result == 0 and name == "clone":
        os._exit(0)  # the child of a clone the filter failed to stop
    if result == -1:
        return errno.errorcode.get(ctypes.get_errno(), str(ctypes.get_errno()))
    if name == "clone":
        os.waitpid(result, 0)
    return "ok"


def family(number):
    try:
        socket.socket(number, socket.SOCK_DGRAM).close()
    except OSError as e:
        return errno.errorcode[e.errno]
    return "ok"


pty, _ = os.openpty()
print(json.dumps({
    "unshare(CLONE_NEWUSER)": call("unshare", 0x10000000),
    "clone(CLONE_NEWUSER)": call("clone", 0x10000000 | 17, 0, 0, 0, 0),
    "keyctl": call("keyctl", 0, MINUS(3), 0),
    "add_key": call("add_key", 0, 0, 0, 0, MINUS(2)),
    "request_key": call("request_key", 0, 0, 0, 0),
    "io_uring_setup": call("io_uring_setup", 1, 0),
    "bpf": call("bpf", 9999, 0, 0),
    "perf_event_open": call("perf_event_open", 0, 0, MINUS(1), MINUS(1), 0),
    "userfaultfd": call("userfaultfd", 1 | 0x40000000),
    "mount": call("mount", 0, 0, 0, 0, 0),
    "umount2": call("umount2", 0, 0xFFFF),
    "chroot": call("chroot", 0),
    "setns": call("setns", MINUS(1), 0),
    "pivot_root": call("pivot_root", 0, 0),
    "open_tree": call("open_tree", MINUS(1), 0, 0),
    "fsopen": call("fsopen", 0, 0),
    "clone3": call("clone3", 0, 0),
    "ioctl(TIOCSTI | high bits)": call("ioctl", pty, 0xFFFFFFFF00005412, 0),
    "ioctl(TIOCLINUX)": call("ioctl", pty, 0x541C, 0),
    "kexec_load": call("kexec_load", 0, 0, 0, 0),
    "init_module": call("init_module", 0, 0, 0),
    "x32 getpid": call("x32", 0) if "x32" in NR else "ENOSYS",
    "socket(AF_PACKET)": family(17),
    "socket(AF_BLUETOOTH)": family(31),
    "socket(AF_ALG)": family(38),
}))
"""

BLOCKED = {
    "unshare(CLONE_NEWUSER)": "EPERM",
    "clone(CLONE_NEWUSER)": "EPERM",
    "keyctl": "EPERM",
    "add_key": "EPERM",
    "request_key": "EPERM",
    "io_uring_setup": "EPERM",
    "bpf": "EPERM",
    "perf_event_open": "EPERM",
    "userfaultfd": "EPERM",
    "mount": "EPERM",
    "umount2": "EPERM",
    "chroot": "EPERM",
    "setns": "EPERM",
    "pivot_root": "EPERM",
    "open_tree": "ENOSYS",
    "fsopen": "ENOSYS",
    "clone3": "ENOSYS",
    "ioctl(TIOCSTI | high bits)": "EPERM",
    "ioctl(TIOCLINUX)": "EPERM",
    "kexec_load": "EPERM",
    "init_module": "EPERM",
    "x32 getpid": "ENOSYS",
    "socket(AF_PACKET)": "EAFNOSUPPORT",
    "socket(AF_BLUETOOTH)": "EAFNOSUPPORT",
    "socket(AF_ALG)": "EAFNOSUPPORT",
}
# What the kernel alone answers to the same calls in a sandbox, where that differs.
UNFILTERED_DIFFERS = ("keyctl", "io_uring_setup", "bpf", "mount", "umount2", "clone3", "fsopen")


def numbers() -> dict[str, int]:
    column = 0 if seccomp.host_arch() == "x86_64" else 1
    table = {name: nrs[column] for name, nrs in seccomp.SYSCALLS.items() if nrs[column]}
    if seccomp.host_arch() == "x86_64":
        table["x32"] = seccomp.X32_SYSCALL_BIT | 39  # getpid
    return table


def probe(sandbox: Sandbox) -> dict[str, str]:
    sandbox.fs.write_text("probe.py", PROBE)
    result = sandbox.sh(f"python3 probe.py '{json.dumps(numbers())}'", timeout=60)
    return json.loads(result.stdout)


@pytest.mark.unprivileged
def test_blocked_syscalls_fail_with_their_errno(sandbox):
    """Nested user namespaces, keyrings, io_uring, bpf, perf, userfaultfd, mounts, the new
    mount API, clone3, tty injection, kexec/modules, x32 and odd socket families: each
    call made from user code gets the filter's errno, not the kernel's own answer."""
    assert probe(sandbox) == BLOCKED


@pytest.mark.unprivileged
def test_unshare_command_cannot_make_a_user_namespace(sandbox):
    """The classic first step of a kernel exploit: `unshare -Ur` to become root in a
    fresh user namespace."""
    result = sandbox.sh("unshare -Ur id -u", check=False)
    assert result.exit_code != 0 and "Operation not permitted" in result.stderr


@pytest.mark.unprivileged
@pytest.mark.skipif(seccomp.host_arch() != "x86_64", reason="i386 syscalls exist on x86_64")
def test_i386_syscalls_kill_the_process(sandbox):
    """Dodging an x86_64 filter through the i386 ABI (`int 0x80`, other syscall numbers):
    the filter checks the arch first and kills the process."""
    code = (
        "import ctypes, mmap\n"
        "page = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)\n"
        "page.write(bytes.fromhex('b814000000cd80c3'))  # mov eax, 20 (getpid); int 0x80; ret\n"
        "address = ctypes.addressof(ctypes.c_char.from_buffer(page))\n"
        "print('survived', ctypes.CFUNCTYPE(ctypes.c_int)(address)())\n"
    )
    sandbox.fs.write_text("i386.py", code)
    result = sandbox.sh("python3 i386.py", check=False)
    assert result.exit_code == 128 + 31 and "survived" not in result.stdout  # SIGSYS


@pytest.mark.unprivileged
def test_everyday_calls_keep_working(sandbox):
    """The filter must not break what users run: fork, threads, loopback TCP, netlink
    (ip), unix sockets, ptrace of their own processes (strace) and personality."""
    script = (
        "import os, socket, threading\n"
        "t = threading.Thread(target=print, args=('thread',)); t.start(); t.join()\n"
        "pid = os.fork()\n"
        "os._exit(0) if pid == 0 else print('fork', os.waitpid(pid, 0)[1])\n"
        "server = socket.create_server(('127.0.0.1', 0))\n"
        "client = socket.create_connection(server.getsockname())\n"
        "conn, _ = server.accept(); client.sendall(b'tcp'); print(conn.recv(3).decode())\n"
        "a, b = socket.socketpair(); a.sendall(b'unix'); print(b.recv(4).decode())\n"
    )
    sandbox.fs.write_text("ok.py", script)
    assert sandbox.sh("python3 ok.py").stdout.split() == ["thread", "fork", "0", "tcp", "unix"]
    assert "lo" in sandbox.sh("ip -o link").stdout
    assert sandbox.sh("setarch -R true && echo personality").stdout == "personality\n"
    if not Path("/usr/bin/strace").exists():
        pytest.skip("strace is not installed (apt-get install strace)")
    traced = sandbox.sh("strace -f -e trace=execve -o trace.txt sh -c true; cat trace.txt")
    assert "execve(" in traced.stdout


@pytest.mark.unprivileged
def test_info_reports_the_filter(sandbox):
    """A user can see that the filter is on, and the kernel agrees: the agent's process
    tree runs in seccomp filter mode."""
    report = sandbox.info().syscall_filter
    assert report.startswith("on:") and seccomp.host_arch() in report
    status = sandbox.sh("grep -E '^Seccomp(_filters)?:' /proc/self/status").stdout.split()
    assert status[:2] == ["Seccomp:", "2"] and int(status[3]) >= 2  # base and lockdown


@pytest.mark.unprivileged
def test_filter_off_needs_configuration_and_says_so(tmp_path, separate_service_env):
    """With JUPYTER_SANDBOX_SECCOMP=off (and only then), sandboxes run unfiltered; their
    info says OFF, and the kernel's own answers to the probe differ from the filter's."""
    env = {**separate_service_env, "JUPYTER_SANDBOX_POOL": "0", "JUPYTER_SANDBOX_SECCOMP": "off"}
    service = subprocess.Popen(
        [sys.executable, "-m", "jupyter_sandbox", "serve"], env=env, stderr=subprocess.DEVNULL
    )
    try:
        wait_for((tmp_path / "rt" / "jupyter-sandbox.json").exists, 30, message="the service")
        client = (
            "import json, sys\n"
            "from jupyter_sandbox import Sandbox\n"
            "from tests.security.test_syscall_filter import probe\n"
            "with Sandbox.create() as sb:\n"
            "    status = sb.sh('grep ^Seccomp: /proc/self/status').stdout.split()[1]\n"
            "    print(json.dumps([sb.info().syscall_filter, status, probe(sb)]))\n"
        )
        out = subprocess.run(
            [sys.executable, "-c", client],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            cwd=Path(__file__).resolve().parents[2],
        )
        assert out.returncode == 0, out.stderr
        report, mode, answers = json.loads(out.stdout)
    finally:
        service.terminate()
        service.wait(30)
    assert report.startswith("OFF") and "JUPYTER_SANDBOX_SECCOMP=off" in report
    assert mode == "0"
    assert all(answers[name] != BLOCKED[name] for name in UNFILTERED_DIFFERS), answers


# -- the programs themselves -------------------------------------------------------------


def run_bpf(program: bytes, arch: str, nr: int, args: tuple[int, ...] = ()) -> int:
    """What the kernel would return for one syscall: a classic BPF interpreter for the
    instructions the filters use, over struct seccomp_data."""
    args = (*args, *(0,) * (6 - len(args)))
    data = struct.pack("=IIQ6Q", nr, seccomp.AUDIT_ARCH[arch], 0, *args)
    insns = [struct.unpack("=HBBI", program[i : i + 8]) for i in range(0, len(program), 8)]
    acc, pc = 0, 0
    while True:
        code, jt, jf, k = insns[pc]
        pc += 1
        if code == seccomp.BPF_LD_W_ABS:
            acc = struct.unpack_from("=I", data, k)[0]
        elif code == seccomp.BPF_RET_K:
            return k
        else:
            taken = {
                seccomp.BPF_JEQ_K: acc == k,
                seccomp.BPF_JGE_K: acc >= k,
                seccomp.BPF_JSET_K: bool(acc & k),
            }[code]
            pc += jt if taken else jf


def errno_of(name: str) -> int:
    return seccomp.RET_ERRNO | getattr(errno, name)


@pytest.mark.unprivileged
@pytest.mark.parametrize("arch", sorted(seccomp.AUDIT_ARCH))
def test_programs_decide_as_documented(arch):
    """Every named call, for both arches: blocked ones get their errno, flags and
    requests are checked on the right argument (high bits ignored), unnamed calls pass."""
    base, lockdown = seccomp.base_program(arch), seccomp.lockdown_program(arch)
    column = 0 if arch == "x86_64" else 1

    def nr(name: str) -> int:
        return seccomp.SYSCALLS[name][column]

    for name in seccomp.EPERM_ALWAYS:
        if nr(name) is not None:
            assert run_bpf(base, arch, nr(name)) == errno_of("EPERM"), name
    for name in seccomp.ENOSYS_ALWAYS:
        assert run_bpf(base, arch, nr(name)) == errno_of("ENOSYS"), name
    for name in seccomp.LOCKDOWN_EPERM:
        assert run_bpf(lockdown, arch, nr(name)) == errno_of("EPERM"), name
    allow = seccomp.RET_ALLOW
    assert run_bpf(base, arch, nr("mount")) == allow  # the agent's own setup
    assert run_bpf(base, arch, nr("unshare"), (0x20000 | 0x20000000,)) == allow
    assert run_bpf(base, arch, nr("unshare"), (0x10000000,)) == errno_of("EPERM")
    assert run_bpf(base, arch, nr("clone"), (0x10000000 | 17,)) == errno_of("EPERM")
    assert run_bpf(base, arch, nr("clone"), (0x003D0F00,)) == allow  # pthread_create
    assert run_bpf(base, arch, nr("ioctl"), (0, 0xDEAD_0000_0000_5412)) == errno_of("EPERM")
    assert run_bpf(base, arch, nr("ioctl"), (0, 0x541C)) == errno_of("EPERM")
    assert run_bpf(base, arch, nr("ioctl"), (0, 0x5413)) == allow  # TIOCGWINSZ
    for family in (0, 1, 2, 10, 16):
        assert run_bpf(base, arch, nr("socket"), (family,)) == allow
    for family in (3, 17, 31, 38, 40):
        assert run_bpf(base, arch, nr("socket"), (family,)) == errno_of("EAFNOSUPPORT")
    other = "aarch64" if arch == "x86_64" else "x86_64"
    for program in (base, lockdown):
        for name in seccomp.DEVEL_ALLOWED:  # debuggers and setarch work
            assert run_bpf(program, arch, nr(name)) == allow
        for number in (0, 1, 3, 63, 64):  # read, write, close... on either arch
            assert run_bpf(program, arch, number) == allow
        # The other arch's numbers (i386 or arm32 compat) never reach the rules.
        assert run_bpf(program, other, 0) == seccomp.RET_KILL_PROCESS
    if arch == "x86_64":
        assert run_bpf(base, arch, seccomp.X32_SYSCALL_BIT | 272) == errno_of("ENOSYS")
        assert run_bpf(lockdown, arch, seccomp.X32_SYSCALL_BIT | 165) == errno_of("ENOSYS")


HEADERS = {
    "x86_64": Path("/usr/include/x86_64-linux-gnu/asm/unistd_64.h"),
    "aarch64": Path("/usr/include/asm-generic/unistd.h"),
}


@pytest.mark.unprivileged
@pytest.mark.parametrize("arch", sorted(HEADERS))
def test_syscall_numbers_match_the_kernel_headers(arch):
    """A wrong number in the tables would filter some other call and let this one pass."""
    if not HEADERS[arch].exists():
        pytest.skip(f"{HEADERS[arch]} is not installed (linux-libc-dev)")
    text = HEADERS[arch].read_text()
    defined = {m[0]: int(m[1]) for m in re.findall(r"#define __NR(?:3264)?_(\w+)\s+(\d+)", text)}
    column = 0 if arch == "x86_64" else 1
    ours = {n: v[column] for n, v in seccomp.SYSCALLS.items()}
    newer_than_headers = {"open_tree_attr"}
    assert {n: defined.get(n) for n in ours if n not in newer_than_headers} == {
        n: v for n, v in ours.items() if n not in newer_than_headers
    }
