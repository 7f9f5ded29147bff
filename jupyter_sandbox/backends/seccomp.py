"""The sandbox's syscall filters: classic BPF programs assembled here, no compiler needed.

Two programs, both default-allow like Flatpak's filter (flatpak-run.c ``setup_seccomp``),
in its *devel* flavour: ``ptrace`` and ``personality`` stay allowed so that strace, gdb
and py-spy work on a user's own processes.

* The **base** program is installed by bwrap (``--seccomp FD``) before the agent starts.
  It still lets the agent set itself up: ``unshare`` without ``CLONE_NEWUSER`` and the
  classic ``mount(2)``.
* The **lockdown** program is installed by the agent on top of the base once its setup
  is done, before any user code runs. It takes ``unshare``, ``mount`` and the other
  namespace and mount calls away. The kernel applies the strictest result of all the
  filters a process has, so user code runs under at least Flatpak's policy.

Each program checks the architecture first: a syscall made through another ABI than
the one the program was built for (i386 through ``int 0x80`` on x86_64, 32-bit ARM on
aarch64) kills the process, and x32 numbers on x86_64 fail with ``ENOSYS``.
"""

from __future__ import annotations

import errno
import fcntl
import os
import platform
import struct
from dataclasses import dataclass

# linux/audit.h, linux/seccomp.h, linux/filter.h
AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
X32_SYSCALL_BIT = 0x40000000
RET_KILL_PROCESS = 0x80000000
RET_ERRNO = 0x00050000
RET_ALLOW = 0x7FFF0000
BPF_LD_W_ABS = 0x20  # BPF_LD | BPF_W | BPF_ABS
BPF_JEQ_K = 0x15  # BPF_JMP | BPF_JEQ | BPF_K
BPF_JGE_K = 0x35  # BPF_JMP | BPF_JGE | BPF_K
BPF_JSET_K = 0x45  # BPF_JMP | BPF_JSET | BPF_K
BPF_RET_K = 0x06  # BPF_RET | BPF_K
# Offsets in struct seccomp_data (both arches are little-endian: low word first).
NR, ARCH = 0, 4


def _arg_low(index: int) -> int:
    return 16 + 8 * index


CLONE_NEWUSER = 0x10000000
TIOCSTI, TIOCLINUX = 0x5412, 0x541C
ALLOWED_FAMILIES = (0, 1, 2, 10, 16)  # AF_UNSPEC, AF_UNIX, AF_INET, AF_INET6, AF_NETLINK

# Syscall numbers of every call the programs name: (x86_64, aarch64); None where the
# arch has no such call. aarch64 uses the generic table (asm-generic/unistd.h).
SYSCALLS: dict[str, tuple[int | None, int | None]] = {
    "ioctl": (16, 29),
    "socket": (41, 198),
    "clone": (56, 220),
    "ptrace": (101, 117),
    "syslog": (103, 116),
    "uselib": (134, None),
    "personality": (135, 92),
    "modify_ldt": (154, None),
    "pivot_root": (155, 41),
    "chroot": (161, 51),
    "acct": (163, 89),
    "mount": (165, 40),
    "umount2": (166, 39),
    "swapon": (167, 224),
    "swapoff": (168, 225),
    "reboot": (169, 142),
    "iopl": (172, None),
    "ioperm": (173, None),
    "init_module": (175, 105),
    "delete_module": (176, 106),
    "quotactl": (179, 60),
    "nfsservctl": (180, 42),
    "lookup_dcookie": (212, 18),
    "mbind": (237, 235),
    "set_mempolicy": (238, 237),
    "get_mempolicy": (239, 236),
    "kexec_load": (246, 104),
    "add_key": (248, 217),
    "request_key": (249, 218),
    "keyctl": (250, 219),
    "migrate_pages": (256, 238),
    "unshare": (272, 97),
    "move_pages": (279, 239),
    "perf_event_open": (298, 241),
    "open_by_handle_at": (304, 265),
    "setns": (308, 268),
    "finit_module": (313, 273),
    "kexec_file_load": (320, 294),
    "bpf": (321, 280),
    "userfaultfd": (323, 282),
    "io_uring_setup": (425, 425),
    "io_uring_enter": (426, 426),
    "io_uring_register": (427, 427),
    "open_tree": (428, 428),
    "move_mount": (429, 429),
    "fsopen": (430, 430),
    "fsconfig": (431, 431),
    "fsmount": (432, 432),
    "fspick": (433, 433),
    "clone3": (435, 435),
    "mount_setattr": (442, 442),
    "quotactl_fd": (443, 443),
    "set_mempolicy_home_node": (450, 450),
    "open_tree_attr": (467, 467),
}

# Flatpak's list, then what it leaves to other layers and a sandbox never needs.
EPERM_ALWAYS = (
    # Flatpak
    "syslog",
    "uselib",
    "acct",
    "modify_ldt",
    "quotactl",
    "add_key",
    "keyctl",
    "request_key",
    "move_pages",
    "mbind",
    "get_mempolicy",
    "set_mempolicy",
    "migrate_pages",
    "setns",
    "umount2",
    "pivot_root",
    "chroot",
    "perf_event_open",
    # kernel attack surface and host-wide operations
    "quotactl_fd",
    "set_mempolicy_home_node",
    "bpf",
    "userfaultfd",
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
    "kexec_load",
    "kexec_file_load",
    "init_module",
    "finit_module",
    "delete_module",
    "open_by_handle_at",
    "iopl",
    "ioperm",
    "swapon",
    "swapoff",
    "reboot",
    "lookup_dcookie",
    "nfsservctl",
)
# seccomp cannot look into clone3's or the mount API's structs: glibc falls back on ENOSYS.
ENOSYS_ALWAYS = (
    "clone3",
    "open_tree",
    "open_tree_attr",
    "move_mount",
    "fsopen",
    "fsconfig",
    "fsmount",
    "fspick",
    "mount_setattr",
)
# Flatpak blocks these outside its devel mode; sandboxes are for debugging too.
DEVEL_ALLOWED = ("ptrace", "personality")
# What the agent needs for its own setup and gives up before user code runs.
LOCKDOWN_EPERM = ("unshare", "mount", "umount2", "setns", "pivot_root", "chroot")
POLICY = "flatpak-devel"


@dataclass(frozen=True)
class Insn:
    """One sock_filter instruction; `jt`/`jf` may name a label, resolved on assembly."""

    code: int
    k: int = 0
    jt: int | str = 0
    jf: int | str = 0


def _assemble(items: list[Insn | str]) -> bytes:
    """Pack instructions into struct sock_filter; strings in `items` are labels."""
    labels: dict[str, int] = {}
    insns: list[Insn] = []
    for item in items:
        if isinstance(item, str):
            labels[item] = len(insns)
        else:
            insns.append(item)

    def offset(target: int | str, at: int) -> int:
        if isinstance(target, int):
            return target
        jump = labels[target] - at - 1
        if not 0 <= jump <= 255:
            raise ValueError(f"jump to {target} out of range")
        return jump

    if len(insns) > 4096:
        raise ValueError("seccomp program too long")
    return b"".join(
        struct.pack("=HBBI", i.code, offset(i.jt, n), offset(i.jf, n), i.k)
        for n, i in enumerate(insns)
    )


def _ret(action: int) -> Insn:
    return Insn(BPF_RET_K, action)


def _errno(value: int) -> int:
    return RET_ERRNO | value


def _arch_check(arch: str) -> list[Insn | str]:
    """Kill on a foreign ABI; on x86_64 also refuse x32 numbers."""
    out: list[Insn | str] = [
        Insn(BPF_LD_W_ABS, ARCH),
        Insn(BPF_JEQ_K, AUDIT_ARCH[arch], jt=1),
        _ret(RET_KILL_PROCESS),
        Insn(BPF_LD_W_ABS, NR),
    ]
    if arch == "x86_64":
        out += [Insn(BPF_JGE_K, X32_SYSCALL_BIT, jf=1), _ret(_errno(errno.ENOSYS))]
    return out


def _program(arch: str, rules: dict[str, list[Insn | str]]) -> bytes:
    """The arch check, then one block per syscall; unnamed syscalls are allowed.

    Each block starts with the syscall number in the accumulator and ends in a return.
    """
    column = 0 if arch == "x86_64" else 1
    items = _arch_check(arch)
    for n, (name, block) in enumerate(rules.items()):
        number = SYSCALLS[name][column]
        if number is None:
            continue
        items += [Insn(BPF_JEQ_K, number, jf=f"next{n}"), *block, f"next{n}"]
    items.append(_ret(RET_ALLOW))
    return _assemble(items)


def _flag_block(arg: int, flag: int, action: int) -> list[Insn | str]:
    """`action` when `flag` is set in the low word of argument `arg`, else allow."""
    return [
        Insn(BPF_LD_W_ABS, _arg_low(arg)),
        Insn(BPF_JSET_K, flag, jf=1),
        _ret(action),
        _ret(RET_ALLOW),
    ]


def _ioctl_block() -> list[Insn | str]:
    """TIOCSTI and TIOCLINUX, compared on the low 32 bits only (CVE-2019-10063)."""
    return [
        Insn(BPF_LD_W_ABS, _arg_low(1)),
        Insn(BPF_JEQ_K, TIOCSTI, jt=1),
        Insn(BPF_JEQ_K, TIOCLINUX, jf=1),
        _ret(_errno(errno.EPERM)),
        _ret(RET_ALLOW),
    ]


def _socket_block() -> list[Insn | str]:
    checks = [Insn(BPF_JEQ_K, family, jt="socket_family_ok") for family in ALLOWED_FAMILIES]
    return [
        Insn(BPF_LD_W_ABS, _arg_low(0)),
        *checks,
        _ret(_errno(errno.EAFNOSUPPORT)),
        "socket_family_ok",
        _ret(RET_ALLOW),
    ]


def base_program(arch: str | None = None) -> bytes:
    """The filter bwrap installs: Flatpak's devel policy, with the agent's setup calls."""
    eperm = errno.EPERM
    rules: dict[str, list[Insn | str]] = {
        "clone": _flag_block(0, CLONE_NEWUSER, _errno(eperm)),
        "unshare": _flag_block(0, CLONE_NEWUSER, _errno(eperm)),
        "ioctl": _ioctl_block(),
        "socket": _socket_block(),
    }
    rules.update({name: [_ret(_errno(eperm))] for name in EPERM_ALWAYS})
    rules.update({name: [_ret(_errno(errno.ENOSYS))] for name in ENOSYS_ALWAYS})
    return _program(arch or host_arch(), rules)


def lockdown_program(arch: str | None = None) -> bytes:
    """The filter the agent adds after its setup: no more namespaces or mounts."""
    return _program(
        arch or host_arch(), {name: [_ret(_errno(errno.EPERM))] for name in LOCKDOWN_EPERM}
    )


def host_arch() -> str:
    """This machine's arch, in the names of `AUDIT_ARCH`."""
    machine = platform.machine()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)


def supported() -> bool:
    return host_arch() in AUDIT_ARCH


def describe(enabled: bool) -> str:
    """What `info()` says about the filter of a sandbox."""
    if not enabled:
        return (
            "OFF (JUPYTER_SANDBOX_SECCOMP=off): no syscall filter, code in the sandbox may "
            "use every syscall the kernel offers"
        )
    return (
        f"on: {POLICY} policy for {host_arch()} (base filter from bwrap, lockdown filter "
        "for user code; no nested user namespaces)"
    )


def memfd(program: bytes, name: str) -> int:
    """A sealed memfd holding `program`, positioned at its start for bwrap to read."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.write(fd, program)
        os.lseek(fd, 0, os.SEEK_SET)
        fcntl.fcntl(
            fd,
            fcntl.F_ADD_SEALS,
            fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE,
        )
    except BaseException:
        os.close(fd)
        raise
    return fd
