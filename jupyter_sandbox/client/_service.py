"""Finding the sandbox service: the machine's system service, else the user's own,
waiting for it while it restarts, or starting the user's own.

JUPYTER_SANDBOX_MODE chooses: "auto" (the default) uses the system service where its
runtime file exists and its socket answers, else the user's own service (started on
demand); "user" only the user's own; "system" only the system service, never started
from a client.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from .._config import Paths
from .._errors import ServiceUnavailable
from ..service.supervisor import ALREADY_RUNNING, service_environment, supervisor_pid

START_TIMEOUT = 30.0
# How long a client waits for a system service whose runtime file is there but whose
# socket does not answer (its supervisor restarts it within a second or two).
SYSTEM_WAIT = 5.0
_POLL = 0.1
MODE_ENV = "JUPYTER_SANDBOX_MODE"
MODES = ("auto", "user", "system")
START_SYSTEM_SERVICE = (
    "start it with `systemctl start jupyter-sandbox` (or, as root, `jupyter-sandbox serve "
    "--system`), or set JUPYTER_SANDBOX_MODE=user for a service of your own"
)

T = TypeVar("T")


def service_mode() -> str:
    """Which service a client uses: JUPYTER_SANDBOX_MODE, "auto" if unset."""
    mode = os.environ.get(MODE_ENV, "").strip().lower() or "auto"
    if mode not in MODES:
        raise ServiceUnavailable(
            f"{MODE_ENV}={mode!r} is not a mode: use auto (the default), user or system"
        )
    return mode


async def find_system(
    paths: Paths, mode: str, connect: Callable[[], Awaitable[T | None]]
) -> T | None:
    """`connect()`'s answer from the system service at `paths`, or None where it is not
    used: in "auto" mode, when there is none or it does not answer within SYSTEM_WAIT.

    In "system" mode, ServiceUnavailable instead of None, saying how to start it.
    """
    if mode == "auto" and not paths.runtime_file.exists():
        return None
    deadline = time.monotonic() + SYSTEM_WAIT
    while True:
        found = await connect()
        if found is not None:
            return found
        if not paths.runtime_file.exists() or time.monotonic() > deadline:
            break
        await asyncio.sleep(_POLL)
    if mode == "auto":
        return None
    raise ServiceUnavailable(
        f"the system sandbox service is not running (JUPYTER_SANDBOX_MODE=system, and "
        f"nothing answers on {paths.socket}): {START_SYSTEM_SERVICE}"
    )


def is_supervised(paths: Paths) -> bool:
    """Is a supervisor running that restarts the service when it dies?"""
    return supervisor_pid(paths) is not None


async def find_or_start(paths: Paths, connect: Callable[[], Awaitable[T | None]]) -> T:
    """`connect()`'s answer once the service answers, starting the service if none runs.

    While the service restarts under its supervisor (or another client starts one),
    this waits for it rather than starting a second one.
    """
    deadline = time.monotonic() + START_TIMEOUT
    started = False
    while True:
        found = await connect()
        if found is not None:
            return found
        if time.monotonic() > deadline:
            raise ServiceUnavailable(
                f"the sandbox service did not come up within {START_TIMEOUT:.0f} s; "
                f"see {paths.log_file}"
            )
        if not started and not is_supervised(paths):
            started = True
            await asyncio.to_thread(start_service, paths)
            continue
        await asyncio.sleep(_POLL)


def start_service(paths: Paths) -> None:
    """Start `jupyter-sandbox serve` detached and wait until it listens (or fails).

    It runs under its supervisor, which restarts it after a crash; neither gets this
    process's credentials in its environment.
    """
    paths.data_dir.mkdir(parents=True, exist_ok=True)
    read_fd, write_fd = os.pipe()
    log_fd = os.open(paths.log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    os.fchmod(log_fd, 0o600)  # the service's log is private, even one made before this rule
    with os.fdopen(log_fd, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "jupyter_sandbox", "serve", "--ready-fd", str(write_fd)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            pass_fds=(write_fd,),
            start_new_session=True,
            env=service_environment(os.environ),
        )
    os.close(write_fd)
    # The service outlives this process's interest in it; reap it whenever it exits
    # so it never lingers as a zombie of a long-lived client such as a kernel.
    threading.Thread(target=proc.wait, name="jupyter-sandbox-service", daemon=True).start()
    with os.fdopen(read_fd, "rb") as ready:
        # The service writes one line: "ready" once listening, or "failed <why>". EOF
        # without it means it exited (another service won the race, or it crashed).
        line = ready.readline(4096).decode(errors="replace").strip()
    if line.startswith("failed "):
        raise ServiceUnavailable(f"{line.removeprefix('failed ')} (log: {paths.log_file})")
    if line:
        return
    try:
        proc.wait(START_TIMEOUT)
    except subprocess.TimeoutExpired:
        return
    if proc.returncode not in (0, ALREADY_RUNNING):
        raise ServiceUnavailable(
            f"the sandbox service exited with status {proc.returncode} as it started: "
            f"{_last_line(paths.log_file)} (log: {paths.log_file})"
        )


def _last_line(path: Path) -> str:
    """The last line of a log, which says why a process ended."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - 4096))
            lines = f.read().decode(errors="replace").strip().splitlines()
    except OSError:
        return "no log"
    return lines[-1] if lines else "nothing logged"


def runtime_info(paths: Paths) -> dict[str, Any] | None:
    try:
        return json.loads(paths.runtime_file.read_text())
    except (OSError, ValueError):
        return None


SERVICE_URL_ENV, SERVICE_TOKEN_ENV = "JUPYTER_SANDBOX_URL", "JUPYTER_SANDBOX_TOKEN"
HUB_TOKEN_ENV = "JUPYTERHUB_API_TOKEN"


def remote_credentials() -> tuple[dict[str, str], str]:
    """The Authorization header for the service at JUPYTER_SANDBOX_URL, and what to check
    if it is refused: JUPYTER_SANDBOX_TOKEN (the service's own token) as a bearer token,
    else the hub user's JUPYTERHUB_API_TOKEN (a service started with --hub-auth)."""
    if token := os.environ.get(SERVICE_TOKEN_ENV):
        return {"Authorization": f"Bearer {token}"}, (
            f"the client sent {SERVICE_TOKEN_ENV}: check that it is the token in the "
            "service's runtime file, or unset it to send your JupyterHub token instead"
        )
    if token := os.environ.get(HUB_TOKEN_ENV):
        return {"Authorization": f"token {token}"}, (
            f"the client sent your JupyterHub token, ${HUB_TOKEN_ENV}: check that it is "
            "current (restart your server from the hub's control panel for a new one) and "
            f"that {SERVICE_URL_ENV} is the sandbox service of this hub"
        )
    return {}, (
        f"the client sent no token: set {HUB_TOKEN_ENV} (your JupyterHub API token; a "
        f"notebook server started by the hub has it) or {SERVICE_TOKEN_ENV} (the service's "
        "own token, from its runtime file)"
    )
