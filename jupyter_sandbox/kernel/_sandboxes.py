"""The sandboxes a kernel uses, by the names its cells give them.

Names are local to a kernel: sandbox NAME of a kernel is the service's
``NAME-<first 8 characters of the kernel id>``, so two notebooks that both say
``%%sandbox`` never share a sandbox by accident. "session" sandboxes created
here belong to the kernel and end with it; duration ones survive it and are
found again by name after a restart (the kernel id stays the same). While
nbgrader executes the notebook (it sets ``NBGRADER_EXECUTION``), every sandbox the
kernel creates ends with it, whatever its timeout: nothing a student's cells start
outlives the grading of their notebook.
"""

from __future__ import annotations

import difflib
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from .._durations import format_duration, format_size, parse_size, parse_timeout
from .._errors import SandboxError, SandboxExpired, SandboxNotFound
from .._models import SandboxInfo
from ..client import Sandbox


@dataclass(frozen=True)
class KernelIdentity:
    """Who owns the sandboxes made here: a kernel (and its notebook) or a plain IPython."""

    id: str
    notebook: str | None = None

    @classmethod
    def current(cls) -> KernelIdentity:
        """The running kernel's id (from its ``kernel-<id>.json`` connection file)."""
        notebook = os.environ.get("JPY_SESSION_NAME") or None
        try:
            from ipykernel.connect import get_connection_file

            stem = Path(get_connection_file()).stem
        except Exception:  # not in a kernel: terminal IPython
            return cls(f"ipython-{os.getpid()}", notebook)
        return cls(stem.removeprefix("kernel-"), notebook)

    @property
    def short(self) -> str:
        return self.id.removeprefix("ipython-")[:8]

    @property
    def owner(self) -> str:
        return f"kernel {self.id}" + (f" ({self.notebook})" if self.notebook else "")

    @property
    def labels(self) -> dict[str, str]:
        return {"kernel": self.id, **({"notebook": self.notebook} if self.notebook else {})}


@dataclass(frozen=True)
class SandboxOptions:
    """Creation options given on a cell; None means "not given"."""

    timeout: str | None = None
    memory: str | None = None
    cpus: float | None = None
    network: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    record_terminals: bool | None = None

    @property
    def given(self) -> bool:
        """Whether any option that fixes how a sandbox is made was given."""
        fixing = (self.timeout, self.memory, self.cpus, self.network, self.record_terminals)
        return any(v is not None for v in fixing)

    def conflicts(self, info: SandboxInfo) -> list[str]:
        """The options that disagree with an existing sandbox, as "--opt X (it has Y)"."""
        found = []
        if self.timeout is not None:
            has = None if info.timeout == "session" else float(info.timeout)
            if parse_timeout(self.timeout) != has:
                shown = "session" if has is None else format_duration(has)
                found.append(f"--timeout {self.timeout} (it has {shown})")
        memory = info.limits.get("memory")
        if self.memory is not None and parse_size(self.memory) != memory:
            shown = "no memory limit" if memory is None else format_size(memory)
            found.append(f"--memory {self.memory} (it has {shown})")
        cpus = info.limits.get("cpus")
        if self.cpus is not None and self.cpus != cpus:
            found.append(
                f"--cpus {self.cpus:g} (it has {'no CPU limit' if cpus is None else f'{cpus:g}'})"
            )
        if self.network is not None and self.network != info.network:
            found.append(f"--network {self.network} (it has {info.network})")
        if self.record_terminals and not info.recording:
            found.append("--record-terminals (its terminals are not recorded)")
        return found


def typed_name(info: SandboxInfo) -> str:
    """The name a sandbox was given in its notebook, without its kernel suffix."""
    kernel = info.labels.get("kernel", "")
    suffix = f"-{kernel.removeprefix('ipython-')[:8]}"
    return info.name.removesuffix(suffix) if kernel and info.name.endswith(suffix) else info.name


class SandboxConflict(SandboxError):
    """A cell asked for options that an existing sandbox does not have."""


def nbgrader_executing() -> bool:
    """Whether nbgrader is running this kernel's notebook (autograde or validate)."""
    return bool(os.environ.get("NBGRADER_EXECUTION"))


class KernelSandboxes:
    """Local names to sandbox handles; creates on first use, ends owned ones on shutdown."""

    def __init__(self, identity: KernelIdentity, *, end_all_with_kernel: bool = False) -> None:
        self.identity = identity
        self.end_all_with_kernel = end_all_with_kernel
        self._named: dict[str, Sandbox] = {}
        self._owned: dict[str, Sandbox] = {}  # by id: "session" sandboxes created here
        self._revoke_listeners: dict[str, list[Callable[[], None]]] = {}
        self._lock = threading.RLock()

    def service_name(self, name: str) -> str:
        return f"{name}-{self.identity.short}"

    def names(self) -> dict[str, str]:
        """Sandbox id -> local name, for the sandboxes this kernel has names for."""
        with self._lock:
            return {sb.id: name for name, sb in self._named.items()}

    def owns(self, sandbox_id: str) -> bool:
        return sandbox_id in self._owned

    def open(self, name: str, options: SandboxOptions | None = None) -> Sandbox:
        """Sandbox `name`, created with `options` on first use."""
        options = options or SandboxOptions()
        with self._lock:
            sandbox = self._named.get(name) or self._adopt(name)
            if sandbox is None:
                sandbox = Sandbox.create(
                    name=self.service_name(name),
                    timeout=options.timeout or "session",
                    memory=options.memory,
                    cpus=options.cpus,
                    network=options.network or "none",
                    env=options.env or None,
                    labels=self.identity.labels,
                    owner=self.identity.owner,
                    record_terminals=bool(options.record_terminals),
                )
                if self.end_all_with_kernel or options.timeout in (None, "session"):
                    self._owned[sandbox.id] = sandbox
            elif options.given:
                conflicts = options.conflicts(sandbox.info())
                if conflicts:
                    raise SandboxConflict(
                        f"sandbox {name!r} already exists without "
                        + ", ".join(conflicts)
                        + f"; end it first with `%sandbox kill {name}` or drop the option"
                    )
            self._named[name] = sandbox
            return sandbox

    def _adopt(self, name: str) -> Sandbox | None:
        """This kernel's sandbox `name` left from before a restart, if it is still of use."""
        try:
            sandbox = Sandbox.connect(self.service_name(name))
        except (SandboxNotFound, SandboxExpired):
            return None
        if sandbox.info().timeout == "session":
            # Its owner was an earlier process of this kernel that died: the lease is
            # lapsing and nobody can renew it. Replace it rather than hand it out.
            sandbox.kill()
            return None
        return sandbox

    def find(self, ref: str, to_create: str | None = None) -> Sandbox:
        """A sandbox by local name, else by service id or name; never creates one.

        Not found: SandboxNotFound suggesting a close name, and `to_create` (how to
        make one instead) when given.
        """
        with self._lock:
            if ref in self._named:
                return self._named[ref]
        for candidate in (self.service_name(ref), ref):
            try:
                return Sandbox.connect(candidate)
            except (SandboxNotFound, SandboxExpired):
                continue
        close = difflib.get_close_matches(ref, self._known_names(), n=1, cutoff=0.6)
        message = (
            f"no sandbox named {ref!r}; did you mean {close[0]!r}?"
            if close
            else f"no sandbox named {ref!r} in this kernel, and no sandbox "
            f"with that id or name in the service (see `%sandbox list`)"
        )
        raise SandboxNotFound(
            message + (f" To create one, use `{to_create}`." if to_create else "")
        )

    def _known_names(self) -> set[str]:
        """The names a user may mean: this kernel's local names, the service's names and ids."""
        known = set(self.names().values())
        suffix = f"-{self.identity.short}"
        for info in Sandbox.list():
            known.update((info.id, info.name, info.name.removesuffix(suffix)))
        return known

    def connect(self, ref: str, name: str | None = None) -> tuple[str, Sandbox]:
        """Give the sandbox `ref` (id or service name) the local name `name`.

        Without `name`, the name its creator typed: a kernel's sandbox is known to the
        service as NAME-<kernel id prefix>, and is called NAME here too.
        """
        sandbox = Sandbox.connect(ref)
        name = name or typed_name(sandbox.info())
        with self._lock:
            self._named[name] = sandbox
        return name, sandbox

    def forget(self, sandbox_id: str) -> None:
        """Drop every local name of a sandbox that has ended."""
        with self._lock:
            self._owned.pop(sandbox_id, None)
            self._revoke_listeners.pop(sandbox_id, None)
            for name in [n for n, sb in self._named.items() if sb.id == sandbox_id]:
                del self._named[name]

    def disown(self, sandbox_id: str) -> None:
        """The sandbox now has a deadline of its own: it no longer ends with the kernel
        (unless every sandbox does)."""
        if not self.end_all_with_kernel:
            self._owned.pop(sandbox_id, None)

    def on_revoke(self, sandbox_id: str, listener: Callable[[], None]) -> None:
        """Call `listener` when `revoke_ssh` here revokes the sandbox's credentials."""
        with self._lock:
            self._revoke_listeners.setdefault(sandbox_id, []).append(listener)

    def revoke_ssh(self, sandbox: Sandbox) -> int:
        """Revoke every SSH credential of `sandbox`; its widgets here show it."""
        count = sandbox.revoke_ssh()
        with self._lock:
            listeners = list(self._revoke_listeners.get(sandbox.id, ()))
        for listener in listeners:
            listener()
        return count

    def kill(self, sandbox: Sandbox) -> None:
        sandbox.kill()
        self.forget(sandbox.id)

    def close(self) -> None:
        """End every "session" sandbox this kernel created, concurrently."""
        with self._lock:
            owned = list(self._owned.values())
        if owned:
            with ThreadPoolExecutor(len(owned)) as pool:
                list(pool.map(self.kill, owned))
