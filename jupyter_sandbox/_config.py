"""Where the service keeps its socket, state and sandboxes, and its tunables."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from jupyter_core.paths import jupyter_data_dir, jupyter_runtime_dir

from ._durations import parse_size


def _env_float(name: str, default: float) -> float:
    value = os.environ.get(name)
    return float(value) if value else default


# Machine-wide: root services' storages and the registry of host-uid ranges.
SYSTEM_DIR = Path("/var/lib/jupyter-sandbox")
# The system service's (`serve --system`) socket and runtime file, and its data.
SYSTEM_RUN_ENV, SYSTEM_RUN = "JUPYTER_SANDBOX_SYSTEM_RUN", Path("/run/jupyter-sandbox")
SYSTEM_DATA_ENV, SYSTEM_DATA = "JUPYTER_SANDBOX_SYSTEM_DATA", SYSTEM_DIR / "system"


@dataclass(frozen=True)
class Paths:
    """Files of one sandbox service."""

    runtime_dir: Path
    data_dir: Path
    storage_dir: Path
    mode: str = "user"  # "user": one user's own service; "system": the machine's one

    @classmethod
    def system(cls) -> Paths:
        """The files of the system service: its run directory (socket, runtime file) and
        its data directory, which holds the sandboxes' storage too."""
        data_dir = Path(os.environ.get(SYSTEM_DATA_ENV) or SYSTEM_DATA)
        run_dir = Path(os.environ.get(SYSTEM_RUN_ENV) or SYSTEM_RUN)
        return cls(run_dir, data_dir, data_dir / "sandboxes", mode="system")

    @classmethod
    def default(cls) -> Paths:
        data_dir = Path(jupyter_data_dir()) / "sandbox"
        storage = os.environ.get("JUPYTER_SANDBOX_DIR")
        if storage:
            storage_dir = Path(storage)
        elif os.geteuid() == 0:
            # Sandboxes of a root service run as unprivileged uids, which must be able
            # to reach their directories; root's home is usually closed to them.
            storage_dir = service_storage(data_dir)
        else:
            storage_dir = data_dir / "sandboxes"
        return cls(Path(jupyter_runtime_dir()), data_dir, storage_dir)

    def make_system_dirs(self) -> None:
        """The system service's directories: its run directory open to every user (who
        connect to its socket), its data directory passable by its sandboxes' uids only."""
        for directory, mode in ((self.runtime_dir, 0o755), (self.data_dir, 0o711)):
            directory.mkdir(mode=mode, parents=True, exist_ok=True)
            os.chmod(directory, mode)

    @property
    def socket(self) -> Path:
        return self.runtime_dir / "jupyter-sandbox.sock"

    @property
    def runtime_file(self) -> Path:
        return self.runtime_dir / "jupyter-sandbox.json"

    @property
    def lock_file(self) -> Path:
        return self.runtime_dir / "jupyter-sandbox.lock"

    @property
    def supervisor_file(self) -> Path:
        """The supervisor's pid, locked for as long as it runs."""
        return self.runtime_dir / "jupyter-sandbox-supervisor.pid"

    @property
    def database(self) -> Path:
        return self.data_dir / "state.sqlite3"

    @property
    def log_file(self) -> Path:
        return self.data_dir / "service.log"


def service_storage(data_dir: Path) -> Path:
    """The default storage of a root service: its own, named after its data directory.

    Stable across restarts, so a restarted service finds its sandboxes again.
    """
    key = hashlib.sha256(os.path.realpath(data_dir).encode()).hexdigest()[:16]
    return SYSTEM_DIR / "services" / key


def host_memory() -> int:
    """Bytes of RAM on this host."""
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def host_cpus() -> int:
    """CPUs this service may run on."""
    return len(os.sched_getaffinity(0))


def host_pids() -> int:
    """The most processes and threads this host's kernel can hold at once."""
    counts = []
    for name in ("pid_max", "threads-max"):
        try:
            counts.append(int(Path(f"/proc/sys/kernel/{name}").read_text()))
        except (OSError, ValueError):
            pass
    return min(counts, default=1 << 22)


def _env_switch(name: str, default: bool) -> bool:
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return default
    if value in ("on", "1", "true", "yes"):
        return True
    if value in ("off", "0", "false", "no"):
        return False
    raise ValueError(f'{name}={value!r}: expected "on" or "off"')


def _env_choice(name: str, choices: tuple[str, ...], default: str) -> str:
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return default
    if value not in choices:
        raise ValueError(f"{name}={value!r}: expected one of {', '.join(choices)}")
    return value


SFTP_CHOICES = ("auto", "builtin", "openssh")
BACKENDS = ("local", "kubernetes")


@dataclass(frozen=True)
class Settings:
    """Service tunables, read from JUPYTER_SANDBOX_* environment variables.

    Every sandbox gets these limits unless its creator asks for others
    (``Sandbox.create(memory=..., cpus=..., pids=..., fds=...)``):

    * memory: 1 GiB, or a quarter of the host's RAM if that is less
      (JUPYTER_SANDBOX_DEFAULT_MEMORY, e.g. "2G"); the writable tmpfs (/tmp 3/8 of it,
      /dev/shm 1/8, /var/tmp 1/16, /run 1/32 up to 16 MiB) are sized from it;
    * cpus: 2, or the host's CPU count if that is less (JUPYTER_SANDBOX_DEFAULT_CPUS);
    * pids: 1024 processes and threads;
    * fds: 4096 open files per process (RLIMIT_NOFILE, JUPYTER_SANDBOX_DEFAULT_FDS);
    * disk: 10 GiB for the home, as a filesystem of its own where the service runs as
      root (JUPYTER_SANDBOX_DEFAULT_DISK, e.g. "20G").

    The syscall filter is on; JUPYTER_SANDBOX_SECCOMP=off turns it off, and every
    sandbox's info then says so.

    SFTP is served by OpenSSH's sftp-server where the host has one, else by the built-in
    server; JUPYTER_SANDBOX_SFTP=openssh or builtin insists on one (see ``ssh.sftp``).

    Terminal sessions are not recorded unless a sandbox is created with
    ``record_terminals=True``; JUPYTER_SANDBOX_RECORD_TERMINALS=on records those of every
    sandbox created while it is on (see ``ssh.recording``).

    Sandboxes run where the backend puts them (JUPYTER_SANDBOX_BACKEND or ``serve
    --backend``): "local" (the default), bubblewrap containers on this host; "kubernetes",
    pods of a cluster (``pip install jupyter-sandbox[kubernetes]``; see
    docs/kubernetes.md). Another name stops the service at start, naming the choices.
    """

    idle_timeout: float = 600.0
    lease_ttl: float = 10.0
    reap_interval: float = 0.5
    uid_base: int = 1_200_000
    default_memory: int = min(1 << 30, host_memory() // 4)
    default_cpus: float = float(min(2, host_cpus()))
    default_pids: int = 1024
    default_fds: int = 4096
    default_disk: int = 10 << 30
    pool_size: int = 2
    seccomp: bool = True
    sftp: str = "auto"
    record_terminals: bool = False
    backend: str = "local"

    @classmethod
    def from_env(cls) -> Settings:
        memory = os.environ.get("JUPYTER_SANDBOX_DEFAULT_MEMORY")
        disk = os.environ.get("JUPYTER_SANDBOX_DEFAULT_DISK")
        return cls(
            idle_timeout=_env_float("JUPYTER_SANDBOX_IDLE_TIMEOUT", cls.idle_timeout),
            lease_ttl=_env_float("JUPYTER_SANDBOX_LEASE_TTL", cls.lease_ttl),
            uid_base=int(_env_float("JUPYTER_SANDBOX_UID_BASE", cls.uid_base)),
            default_memory=parse_size(memory) if memory else cls.default_memory,
            default_cpus=_env_float("JUPYTER_SANDBOX_DEFAULT_CPUS", cls.default_cpus),
            default_fds=int(_env_float("JUPYTER_SANDBOX_DEFAULT_FDS", cls.default_fds)),
            default_disk=parse_size(disk) if disk else cls.default_disk,
            pool_size=int(_env_float("JUPYTER_SANDBOX_POOL", cls.pool_size)),
            seccomp=_env_switch("JUPYTER_SANDBOX_SECCOMP", cls.seccomp),
            sftp=_env_choice("JUPYTER_SANDBOX_SFTP", SFTP_CHOICES, cls.sftp),
            record_terminals=_env_switch("JUPYTER_SANDBOX_RECORD_TERMINALS", cls.record_terminals),
            backend=os.environ.get("JUPYTER_SANDBOX_BACKEND", "").strip().lower() or cls.backend,
        )
