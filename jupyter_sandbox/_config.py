"""Where the service keeps its socket, state and sandboxes, and its tunables."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from jupyter_core.paths import jupyter_data_dir, jupyter_runtime_dir


def _env_float(name: str, default: float) -> float:
    value = os.environ.get(name)
    return float(value) if value else default


@dataclass(frozen=True)
class Paths:
    """Files of one user's sandbox service."""

    runtime_dir: Path
    data_dir: Path
    storage_dir: Path

    @classmethod
    def default(cls) -> Paths:
        data_dir = Path(jupyter_data_dir()) / "sandbox"
        storage = os.environ.get("JUPYTER_SANDBOX_DIR")
        if storage:
            storage_dir = Path(storage)
        elif os.geteuid() == 0:
            # Sandboxes of a root service run as unprivileged uids, which must be able
            # to reach their directories; root's home is usually closed to them.
            storage_dir = Path("/var/lib/jupyter-sandbox")
        else:
            storage_dir = data_dir / "sandboxes"
        return cls(Path(jupyter_runtime_dir()), data_dir, storage_dir)

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
    def database(self) -> Path:
        return self.data_dir / "state.sqlite3"

    @property
    def log_file(self) -> Path:
        return self.data_dir / "service.log"


@dataclass(frozen=True)
class Settings:
    """Service tunables, read from JUPYTER_SANDBOX_* environment variables."""

    idle_timeout: float = 600.0
    lease_ttl: float = 10.0
    reap_interval: float = 0.5
    uid_base: int = 1_200_000
    default_pids: int = 1024
    pool_size: int = 2

    @classmethod
    def from_env(cls) -> Settings:
        return cls(
            idle_timeout=_env_float("JUPYTER_SANDBOX_IDLE_TIMEOUT", cls.idle_timeout),
            lease_ttl=_env_float("JUPYTER_SANDBOX_LEASE_TTL", cls.lease_ttl),
            uid_base=int(_env_float("JUPYTER_SANDBOX_UID_BASE", cls.uid_base)),
            pool_size=int(_env_float("JUPYTER_SANDBOX_POOL", cls.pool_size)),
        )
