"""``jupyter-sandbox`` (also ``jupyter sandbox``): the command line."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from .. import __version__
from .._config import BACKENDS, Paths, Settings
from .._durations import format_relative, format_size, format_size_down, format_span
from .._errors import CommandError, SandboxError, SandboxExpired, SandboxNotFound
from .._models import KEEP_HOMES, SandboxInfo
from .._ssh_config import HOST_ALIAS, temporary_ssh_config
from ..client import Sandbox
from . import tunnel

if TYPE_CHECKING:
    from ..service.hub_auth import HubSettings


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "remote_command") or (extra[0].startswith("-") and extra[0] != "--"):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.remote_command = extra[1:] if extra[0] == "--" else extra
    if not getattr(args, "func", None):
        parser.print_help()
        raise SystemExit(2)
    try:
        code = args.func(args)
    except KeyboardInterrupt:
        code = 130
    except (SandboxError, ValueError, OSError) as e:
        print(f"jupyter-sandbox: {e}", file=sys.stderr)
        code = 1
    raise SystemExit(code or 0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jupyter-sandbox", description="Disposable, isolated Linux sandboxes."
    )
    parser.add_argument("--version", action="version", version=__version__)
    sub = parser.add_subparsers(metavar="COMMAND")

    def command(name: str, func: Callable, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(func=func)
        return p

    p = command("create", cmd_create, "create a sandbox and print its id")
    p.add_argument("--name")
    p.add_argument(
        "--timeout",
        default="5m",
        help='how long it lives: a duration such as "30s", "5m", "1h" (default 5m)',
    )
    add_limit_options(p)
    p.add_argument(
        "--record-terminals",
        action="store_true",
        help="record its SSH terminal sessions (asciicast v2); users are told at login",
    )

    p = command("list", cmd_list, "list sandboxes")
    p.add_argument(
        "--json",
        action="store_true",
        help="a JSON array of objects with the fields " + ", ".join(SANDBOX_FIELDS),
    )
    p.add_argument("--all", action="store_true", help="include sandboxes that have ended")

    p = command("info", cmd_info, "show a sandbox's state, limits and live usage")
    p.add_argument("sandbox", help="id or name")
    p.add_argument(
        "--json",
        action="store_true",
        help="a JSON object: the fields of list --json and " + ", ".join(INFO_FIELDS),
    )

    p = command("exec", cmd_exec, "run a command in a sandbox, streaming its output")
    p.add_argument("sandbox", help="id or name")
    p.add_argument("command", nargs=argparse.REMAINDER, help="command (after --)")
    p.add_argument("--cwd")
    p.add_argument("--timeout", type=float, help="kill the command after this many seconds")

    p = command("upload", cmd_upload, "copy a local file or directory into a sandbox")
    p.add_argument("sandbox")
    p.add_argument("src")
    p.add_argument("dst")

    p = command("download", cmd_download, "copy a file or directory out of a sandbox")
    p.add_argument("sandbox")
    p.add_argument("src")
    p.add_argument("dst")

    p = command("logs", cmd_logs, "print a sandbox's log (background output, events)")
    p.add_argument("sandbox")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new entries")
    p.add_argument("--tail", type=int, help="only the last N entries")

    p = command(
        "recordings",
        cmd_recordings,
        "list a sandbox's terminal recordings, or write one (asciicast v2) to stdout",
    )
    p.add_argument("sandbox")
    p.add_argument("name", nargs="?", help="the recording to write (asciinema play FILE)")

    p = command("kill", cmd_kill, "kill sandboxes")
    p.add_argument("sandboxes", nargs="*", metavar="SANDBOX")
    p.add_argument(
        "--all",
        action="store_true",
        help="kill all your sandboxes (asks first on a terminal; an instructor's --all "
        "means their own too)",
    )
    p.add_argument("-y", "--yes", action="store_true", help="do not ask before --all")

    p = command("extend", cmd_extend, "set a sandbox's deadline to a duration from now")
    p.add_argument("sandbox")
    p.add_argument("timeout")

    p = command("restart", cmd_restart, "start a failed sandbox again, with its files")
    p.add_argument("sandbox")

    p = command("ssh", cmd_ssh, "give SSH access to a sandbox and print the ssh command")
    p.add_argument("sandbox")
    p.add_argument(
        "--ttl",
        help='how long the credential is valid, e.g. "1h" (default: as long as the sandbox)',
    )
    p.add_argument("--single-use", action="store_true", help="allow exactly one connection")
    p.add_argument("--public-key", metavar="FILE", help="also require this OpenSSH key")
    p.add_argument(
        "--connect",
        action="store_true",
        help="run ssh now instead of printing (then: -- COMMAND runs COMMAND in the sandbox)",
    )
    p.add_argument("--revoke", action="store_true", help="revoke all SSH access instead")
    p.set_defaults(remote_command=[])  # with --connect, a command after -- (set by main)

    p = command("status", cmd_status, "show the sandbox service's state")
    p.add_argument(
        "--json",
        action="store_true",
        help="a JSON object with the fields " + ", ".join((*STATUS_FIELDS, "log_file")),
    )

    p = command("usage", cmd_usage, "show your quota and what your sandboxes use of it")
    p.add_argument("--user", help="another user's (instructors, on the system service)")
    p.add_argument(
        "--json",
        action="store_true",
        help="a JSON object with the fields " + ", ".join(USAGE_FIELDS),
    )

    p = command(
        "tunnel",
        tunnel.run,
        "carry SSH to a sandbox over a Jupyter server's websocket (an ssh ProxyCommand)",
    )
    tunnel.add_arguments(p)

    p = command(
        "serve",
        cmd_serve,
        "run the sandbox service in the foreground, restarted whenever it crashes",
    )
    p.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    p.add_argument(
        "--no-supervisor",
        action="store_true",
        help="run the service alone, with nothing to restart it (for init systems that do)",
    )
    p.add_argument(
        "--tcp",
        metavar="HOST:PORT",
        help="also listen on TCP (requests need the token from the runtime file)",
    )
    p.add_argument(
        "--system",
        action="store_true",
        help="run the machine's one service for every user (as root; socket in "
        "/run/jupyter-sandbox, callers told apart by their uid)",
    )
    p.add_argument(
        "--hub-auth",
        action="store_true",
        help="with --tcp: callers are JupyterHub users, named by their hub API tokens "
        "(needs JUPYTERHUB_API_URL; also JUPYTER_SANDBOX_AUTH=hub)",
    )
    p.add_argument(
        "--backend",
        metavar="NAME",
        help=f"where sandboxes run: {' or '.join(BACKENDS)} (default: "
        "$JUPYTER_SANDBOX_BACKEND, else local)",
    )
    return parser


def add_limit_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--memory", help='memory limit, e.g. "512M"')
    p.add_argument("--cpus", type=float, help="CPU limit, e.g. 0.5")
    p.add_argument("--pids", type=int, help="process limit")
    p.add_argument("--network", choices=("none", "host"), default="none")
    p.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="K=V",
        help="environment variable (repeatable)",
    )
    p.add_argument("--label", action="append", default=[], metavar="K=V", help="label (repeatable)")


def parse_pairs(pairs: list[str], what: str) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"invalid {what} {pair!r}: expected KEY=VALUE")
        out[key] = value
    return out


def cmd_create(args: argparse.Namespace) -> int:
    sandbox = Sandbox.create(
        name=args.name,
        timeout=args.timeout,
        memory=args.memory,
        cpus=args.cpus,
        pids=args.pids,
        network=args.network,
        env=parse_pairs(args.env, "--env"),
        labels=parse_pairs(args.label, "--label"),
        record_terminals=args.record_terminals,
    )
    print(sandbox.id)
    return 0


def _when(timestamp: float | None) -> str:
    if timestamp is None:
        return "-"
    return datetime.datetime.fromtimestamp(timestamp).strftime("%Y-%m-%d %H:%M:%S")


# What `list --json` and `info --json` print for each sandbox (times in seconds since
# 1970, sizes in bytes, as the service reports them); `info` adds INFO_FIELDS.
SANDBOX_FIELDS = (
    "id",
    "name",
    "status",
    "created_at",
    "timeout",
    "expires_at",
    "owner",
    "labels",
    "limits",
    "network",
    "failure",
    "failed_at",
    "ended_at",
    "end_reason",
    "recording",
    "files_kept",
)
INFO_FIELDS = ("limits_note", "syscall_filter", "usage")
USAGE_FIELDS = ("user", "uid", "instructor", "mode", "quota", "source", "usage")
STATUS_FIELDS = ("pid", "version", "started_at", "sandboxes", "pool", "ssh", "isolation", "cgroups")


def sandbox_json(info: SandboxInfo, fields: tuple[str, ...] = SANDBOX_FIELDS) -> dict:
    return {name: getattr(info, name) for name in fields}


def print_json(data: object) -> None:
    print(json.dumps(data, indent=2))


def _ago(timestamp: float | None) -> str:
    return "-" if timestamp is None else format_relative(timestamp - time.time())


def _ends(info: SandboxInfo) -> str:
    """When the sandbox ends: "in 4 min", "session", or "-" once it has ended."""
    if info.status == "ended":
        return "-"
    return "session" if info.expires_at is None else _ago(info.expires_at)


def _reason(info: SandboxInfo) -> str:
    """Why a sandbox failed or ended, in words; "" while it runs."""
    if info.status == "ended":  # a failed sandbox ends by its deadline or a kill later
        failed = f" (after it failed: {info.failure})" if info.failure else ""
        return f"{info.end_reason or 'ended'}{failed}"
    return info.failure or ""


def _size(value: int | None) -> str:
    return "-" if value is None else format_size(value)


def print_table(rows: list[tuple[str, ...]]) -> None:
    """Rows under a header, in columns as wide as their widest cell."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


def cmd_list(args: argparse.Namespace) -> int:
    sandboxes = Sandbox.list(include_ended=args.all)
    if args.json:
        print_json([sandbox_json(s) for s in sandboxes])
        return 0
    if not sandboxes:
        print("no sandboxes" + ("" if args.all else " running (--all shows ended ones)"))
        return 0
    rows = [("ID", "NAME", "STATUS", "CREATED", "ENDS", "MEMORY", "CPUS", "DISK", "LABELS")]
    rows[0] += ("OWNER", "REASON")
    for s in sandboxes:
        labels = ",".join(f"{k}={v}" for k, v in s.labels.items()) or "-"
        cpus = s.limits.get("cpus")
        rows.append(
            (
                s.id,
                s.name,
                s.status,
                _ago(s.created_at),
                _ends(s),
                _size(s.limits.get("memory")),
                "-" if cpus is None else f"{cpus:g}",
                _size(s.limits.get("disk")),
                labels,
                s.owner or "-",
                _reason(s),
            )
        )
    print_table(rows)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    info = Sandbox.connect(args.sandbox).info()
    if args.json:
        print_json(sandbox_json(info, SANDBOX_FIELDS + INFO_FIELDS))
        return 0
    limits = info.limits
    status = info.status
    if _reason(info):
        when = info.ended_at if info.status == "ended" else info.failed_at
        status += f": {_reason(info)} ({_ago(when)})"
    lines = [
        ("id", info.id),
        ("name", info.name),
        ("status", status),
        ("created", f"{_ago(info.created_at)} ({_when(info.created_at)})"),
        ("ends", _lifetime(info)),
        ("network", info.network),
        ("terminals", "recorded" if info.recording else "not recorded"),
        ("memory", _size(limits.get("memory"))),
        ("cpus", "-" if limits.get("cpus") is None else f"{limits['cpus']:g}"),
        ("processes", str(limits.get("pids") or "-")),
        ("open files", str(limits.get("fds") or "-")),
        ("disk", _size(limits.get("disk"))),
    ]
    tmpfs = limits.get("tmpfs") or {}
    if tmpfs:
        lines.append(("tmpfs", ", ".join(f"{p} {format_size(n)}" for p, n in tmpfs.items())))
    lines += [
        ("labels", ", ".join(f"{k}={v}" for k, v in info.labels.items()) or "-"),
        ("owner", info.owner or "-"),
        ("usage", _usage(info.usage)),
    ]
    if info.status == "failed":
        lines.append(("files", _files_after_failure(info)))
    if info.limits_note:
        lines.append(("note", info.limits_note))
    if info.syscall_filter:
        lines.append(("syscalls", info.syscall_filter))
    print_table(lines)
    return 0


def _files_after_failure(info: SandboxInfo) -> str:
    """What became of a failed sandbox's files, and the ways out."""
    ref = info.id
    if info.files_kept:
        return (
            f"kept until its deadline or a kill: `jupyter-sandbox download {ref} ...`, "
            f"`jupyter-sandbox restart {ref}` or `jupyter-sandbox kill {ref}`"
        )
    return (
        f"not kept: `jupyter-sandbox restart {ref}` starts it with an empty home, or "
        f"`jupyter-sandbox kill {ref}`; {KEEP_HOMES}"
    )


def _lifetime(info: SandboxInfo) -> str:
    if info.status == "ended":
        return f"ended {_ago(info.ended_at)}"
    if info.expires_at is None:
        return "session (ends with the program that created it)"
    return f"{_ago(info.expires_at)} ({_when(info.expires_at)})"


def _usage(usage: dict | None) -> str:
    if not usage or not usage.get("available"):
        return (usage or {}).get("reason") or "not measured"
    parts = []
    if usage.get("memory_bytes") is not None:
        parts.append(f"memory {format_size(usage['memory_bytes'])}")
    if usage.get("pids") is not None:
        parts.append(f"{usage['pids']} processes")
    if usage.get("cpu_seconds") is not None:
        parts.append(f"cpu {usage['cpu_seconds']:.2f} s")
    return ", ".join(parts) or "not measured"


def cmd_exec(args: argparse.Namespace) -> int:
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        raise ValueError("no command given: jupyter-sandbox exec ID -- CMD ...")
    sandbox = Sandbox.connect(args.sandbox)

    def write(stream):
        def out(text: str) -> None:
            stream.write(text)
            stream.flush()

        return out

    piped = None if sys.stdin is None or sys.stdin.isatty() else sys.stdin.buffer.read()
    try:
        result = sandbox.sh(
            shlex.join(command) if len(command) > 1 else command[0],
            cwd=args.cwd,
            timeout=args.timeout,
            check=False,
            input=piped,
            on_stdout=write(sys.stdout),
            on_stderr=write(sys.stderr),
        )
    except CommandError as e:  # a timeout
        print(f"jupyter-sandbox: {e}", file=sys.stderr)
        return 124
    return result.exit_code


class ProgressBar:
    """A one-line progress display on stderr (only on a terminal)."""

    def __init__(self, label: str) -> None:
        self.label, self.enabled, self.last = label, sys.stderr.isatty(), 0.0

    def __call__(self, done: int, total: int | None) -> None:
        now = time.monotonic()
        if not self.enabled or now - self.last < 0.1:
            return
        self.last = now
        if total:
            filled = int(30 * done / total)
            bar = "#" * filled + "-" * (30 - filled)
            sys.stderr.write(f"\r{self.label} [{bar}] {done / total:4.0%} {done >> 20} MiB")
        else:
            sys.stderr.write(f"\r{self.label} {done >> 20} MiB")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")


def cmd_upload(args: argparse.Namespace) -> int:
    bar = ProgressBar("upload")
    Sandbox.connect(args.sandbox).fs.upload(args.src, args.dst, progress=bar)
    bar.close()
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    bar = ProgressBar("download")
    Sandbox.connect(args.sandbox).fs.download(args.src, args.dst, progress=bar)
    bar.close()
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    for entry in Sandbox.connect(args.sandbox).logs(follow=args.follow, tail=args.tail):
        sys.stdout.write(entry.line() + "\n")
        sys.stdout.flush()
    return 0


def cmd_recordings(args: argparse.Namespace) -> int:
    sandbox = Sandbox.connect(args.sandbox)
    if args.name is not None:
        sys.stdout.buffer.write(sandbox.recording(args.name))
        return 0
    found = sandbox.recordings()
    if not found:
        recorded = (
            "are recorded, none yet"
            if sandbox.info().recording
            else ("are not recorded (create a sandbox with --record-terminals to record them)")
        )
        print(f"no recordings: the terminal sessions of {args.sandbox} {recorded}")
        return 0
    rows = [("NAME", "STARTED", "SIZE")]
    rows += [(r.name, _when(r.started_at), format_size(r.size)) for r in found]
    print_table(rows)
    return 0


def cmd_kill(args: argparse.Namespace) -> int:
    if args.all == bool(args.sandboxes):
        raise ValueError("name the sandboxes to kill, or use --all (not both)")
    if not args.all:
        for ref in args.sandboxes:
            Sandbox.connect(ref).kill()
            print(f"killed {ref}")
        return 0
    mine = Sandbox.list(mine=True)
    if not mine:
        print("no sandboxes to kill")
        return 0
    if sys.stdin.isatty() and not args.yes and not confirm_kill(mine):
        print("nothing killed")
        return 1
    for info in mine:
        try:
            Sandbox.connect(info.id).kill()
        except (SandboxExpired, SandboxNotFound):
            print(f"{info.id} had ended already")
        else:
            print(f"killed {info.id}")
    return 0


def confirm_kill(sandboxes: list[SandboxInfo]) -> bool:
    """Ask on the terminal whether to kill `sandboxes`; only "y" or "yes" says so."""
    print_table(
        [("ID", "NAME", "STATUS", "ENDS")] + [(s.id, s.name, s.status, _ends(s)) for s in sandboxes]
    )
    count = len(sandboxes)
    try:
        answer = input(
            f"kill {'this sandbox' if count == 1 else f'these {count} sandboxes'} "
            "and delete their files? [y/N] "
        )
    except EOFError:
        return False
    return answer.strip().lower() in ("y", "yes")


def cmd_extend(args: argparse.Namespace) -> int:
    info = Sandbox.connect(args.sandbox).extend_timeout(args.timeout)
    print(f"{info.id} now ends at {_when(info.expires_at)}")
    return 0


def cmd_restart(args: argparse.Namespace) -> int:
    info = Sandbox.connect(args.sandbox).restart()
    print(f"{info.id} ({info.name}) is running again, with its files")
    return 0


def cmd_ssh(args: argparse.Namespace) -> int:
    sandbox = Sandbox.connect(args.sandbox)
    if args.revoke:
        print(f"revoked {sandbox.revoke_ssh()} credential(s) of {sandbox.id}")
        return 0
    public_key = Path(args.public_key).read_text().strip() if args.public_key else None
    access = sandbox.expose_ssh(ttl=args.ttl, single_use=args.single_use, public_key=public_key)
    known_hosts = Paths.default().data_dir / "ssh" / "known_hosts"
    known_hosts.parent.mkdir(parents=True, exist_ok=True)  # a system service's user has none
    lines = set(known_hosts.read_text().splitlines()) if known_hosts.exists() else set()
    if access.known_hosts_line not in lines:
        with open(known_hosts, "a") as f:
            f.write(access.known_hosts_line + "\n")
    if args.connect:
        with temporary_ssh_config(
            access.hostname, access.port, access.username, known_hosts
        ) as config:
            return run_in_foreground(["ssh", "-F", str(config), HOST_ALIAS, *args.remote_command])
    if args.remote_command:
        raise ValueError("a command needs --connect")
    print(access.command)
    print(f"host key {access.host_key_fingerprint}; pinned in {known_hosts}", file=sys.stderr)
    return 0


def run_in_foreground(argv: list[str]) -> int:
    """Run `argv` and wait for it, ignoring the keyboard's signals meanwhile (they reach
    the child too, which decides), so this process is still there to clean up after."""
    proc = subprocess.Popen(argv)
    keyboard = (signal.SIGINT, signal.SIGQUIT)
    saved = [signal.signal(sig, signal.SIG_IGN) for sig in keyboard]
    try:
        code = proc.wait()
    finally:
        for sig, handler in zip(keyboard, saved):
            signal.signal(sig, handler)
    return 128 - code if code < 0 else code


def cmd_status(args: argparse.Namespace) -> int:
    from ..client._async import shared_transport
    from ..client._sync import portal

    async def status() -> tuple[dict, str]:
        transport = shared_transport()
        answer = await transport.request("GET", "/v1/status")
        return answer, transport.log_hint()

    answer, log_file = portal().call(status())
    data = {name: answer.get(name) for name in STATUS_FIELDS}
    data["log_file"] = log_file
    if args.json:
        print_json(data)
        return 0
    ssh = data["ssh"] or {}
    print_table(
        [
            ("service", f"running, pid {data['pid']}, version {data['version']}"),
            ("started", _ago(data["started_at"])),
            ("sandboxes", f"{data['sandboxes']} live, {len(data['pool'] or [])} ready in the pool"),
            ("ssh", f"{ssh.get('host')}:{ssh.get('port')}" if ssh.get("port") else "off"),
            ("isolation", data["isolation"]),
            ("cgroups", data["cgroups"]),
            ("log", data["log_file"]),
        ]
    )
    return 0


def cmd_usage(args: argparse.Namespace) -> int:
    usage = Sandbox.usage(args.user)
    if args.json:
        print_json({name: getattr(usage, name) for name in USAGE_FIELDS})
        return 0
    service = {"system": "the system service", "hub": "the hub's sandbox service"}.get(
        usage.mode, "your own service"
    )
    role = ", instructor" if usage.instructor else ""
    print(f"user {usage.user} (uid {usage.uid}{role}), on {service}")
    shown = {
        "sandboxes": lambda n: f"{n:g}",
        "memory": format_size_down,
        "cpus": lambda n: f"{n:g}",
        "lifetime": lambda n: format_span(n) + " from now",
    }
    rows = [("", "IN USE", "QUOTA", "LEFT", "SET BY")]
    for key, show in shown.items():
        limit, used = usage.quota.get(key), usage.usage.get(key)
        left = usage.left(key) if key != "lifetime" else None
        rows.append(
            (
                key,
                "-" if used is None else show(used),
                "unlimited" if limit is None else show(limit),
                "-" if left is None else show(left),
                usage.source.get(key) or "-",
            )
        )
    print_table(rows)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.system:
        from ..service.app import check_system_mode_allowed

        check_system_mode_allowed(args.tcp)
    hub = hub_settings(args)  # a hub mode without its hub stops here, saying what to set
    if args.no_supervisor:
        return serve_unsupervised(args)
    from ..service.hub_auth import API_TOKEN_ENV
    from ..service.supervisor import ALREADY_RUNNING, Supervisor, SupervisorRunning

    service_args = ["--tcp", args.tcp] if args.tcp else []
    service_args += ["--system"] if args.system else []
    # The service gets no credential from the environment but its own hub token, and
    # JUPYTER_SANDBOX_AUTH=hub is said again as --hub-auth.
    service_args += ["--hub-auth"] if hub else []
    keep_env = (API_TOKEN_ENV,) if hub else ()
    service_args += ["--backend", args.backend] if args.backend else []
    tcp = tcp_address(args.tcp) if args.tcp else None
    paths = Paths.system() if args.system else None
    try:
        return Supervisor(
            service_args, paths, ready_fd=args.ready_fd, api_address=tcp, keep_env=keep_env
        ).run()
    except SupervisorRunning as e:
        print(f"jupyter-sandbox: {e}", file=sys.stderr)
        return ALREADY_RUNNING


def serve_unsupervised(args: argparse.Namespace) -> int:
    from ..backends import UnknownBackend
    from ..backends.storage import StorageInUse
    from ..service.app import AlreadyRunning, Service
    from ..service.config_file import ConfigError
    from ..service.supervisor import ALREADY_RUNNING, STORAGE_IN_USE

    tcp = tcp_address(args.tcp) if args.tcp else None
    started = False

    def ready() -> None:
        nonlocal started
        started = True
        tell_starter(args, "ready")

    try:
        paths = Paths.system() if args.system else None
        settings = Settings.from_env()
        if args.backend:
            settings = dataclasses.replace(settings, backend=args.backend.strip().lower())
        asyncio.run(Service(paths, settings, tcp=tcp, hub=hub_settings(args)).run(ready))
    except AlreadyRunning as e:
        print(f"jupyter-sandbox: {e}", file=sys.stderr)
        return ALREADY_RUNNING
    except Exception as e:
        if started:
            raise
        # One line for whoever started it (a client shows it as is); a traceback in the
        # log only for what is not an everyday failure.
        message = " ".join(f"the sandbox service could not start: {e}".split())
        everyday = isinstance(e, (OSError, SandboxError, StorageInUse, ConfigError, UnknownBackend))
        logging.getLogger("jupyter_sandbox.service").error(
            "%s", message, exc_info=None if everyday else e
        )
        tell_starter(args, f"failed {message}")
        # Another service's storage or host uids are not this one's: no restart helps.
        return STORAGE_IN_USE if isinstance(e, StorageInUse) else 1
    return 0


def hub_settings(args: argparse.Namespace) -> HubSettings | None:
    """The hub of `serve --hub-auth` (or JUPYTER_SANDBOX_AUTH=hub), None without one;
    SystemExit saying what to set where it cannot run."""
    from ..service.hub_auth import HubSettings, auth_mode

    try:
        if auth_mode(args.hub_auth) != "hub":
            return None
        if args.system or not args.tcp:
            raise ValueError(
                "hub authentication is for a service that hub users reach over TCP: use "
                "`serve --tcp HOST:PORT --hub-auth`, without --system"
            )
        return HubSettings.from_env()
    except ValueError as e:
        raise SystemExit(f"jupyter-sandbox: {e}") from None


def tcp_address(text: str) -> tuple[str, int]:
    """`serve --tcp`'s "[host:]port" as (host, port)."""
    host, _, port = text.rpartition(":")
    return host or "127.0.0.1", int(port)


def tell_starter(args: argparse.Namespace, line: str) -> None:
    """Answer the client that started this service, through its pipe: once, one line."""
    if args.ready_fd is not None:
        with contextlib.suppress(OSError):
            os.write(args.ready_fd, f"{line}\n".encode())
            os.close(args.ready_fd)
        args.ready_fd = None
