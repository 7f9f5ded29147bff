"""Sandbox lifecycle: create, look up, extend, kill; leases, expiry and the reaper.

The manager is the only place that decides when a sandbox ends. A sandbox
ends when it is killed, when its deadline passes (a duration timeout), or when
the lease of its owner is not renewed in time ("session" sandboxes). Deadlines
are enforced by the reaper loop here, whether or not any client is connected.

A sandbox found unusable (its agent or its init gone: out of memory, killed, a
host restart) *fails*: what is left of its processes is stopped, its files stay.
Its file operations go to an agent started again over its directory for files
only; commands and SSH logins get SandboxFailed, which says why and what to do;
`restart` starts it again as it was; its deadline or a kill ends it as any other.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._config import Settings
from .._durations import parse_duration, parse_timeout, shown
from .._errors import (
    DiskFull,
    InvalidRequest,
    SandboxError,
    SandboxExists,
    SandboxExpired,
    SandboxFailed,
    SandboxNotFound,
)
from ..agent.remote import AgentClient
from ..backends import space
from ..backends.base import Backend, Limits, Runtime, SandboxSpec
from .audit_log import AuditLog, AuditTrail
from .identity import Caller, group_names, service_caller
from .limits import max_fds, requested
from .quotas import Quotas, Use, check_create, check_lifetime
from .state import ENDED, FAILED, POOLED, RUNNING, SandboxRecord, State

log = logging.getLogger("jupyter_sandbox.service")

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
ENV_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
ENDED_KEPT_FOR = 86400.0
HEALTH_INTERVAL = 2.0
END_WAIT = 30.0  # seconds a followed log waits for its sandbox's end to be recorded
POOL_RETRY = 60.0  # seconds the warm pool waits after its disk was full


@dataclass
class Live:
    """A running sandbox: its record, how to reach it, its last usage sample."""

    record: SandboxRecord
    runtime: Runtime
    agent: AgentClient
    sample: dict | None = None
    # Held while its processes change: failing, starting again, serving files, ending.
    lock: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)


class Manager:
    def __init__(self, state: State, backend: Backend, settings: Settings) -> None:
        self.state = state
        self.backend = backend
        self.settings = settings
        self.live: dict[str, Live] = {}
        self.listeners: list[Callable[[str, SandboxRecord], None]] = []
        self.pool: dict[str, Runtime] = {}
        self.pool_starting: set[str] = set()
        self._create_lock = asyncio.Lock()
        self._reserved_names: set[tuple[int, str]] = set()  # (uid, name) being created
        self._refilling: asyncio.Future | None = None
        self._pool_paused_until = 0.0  # after a full disk, the pool waits before it refills
        self._background: set[asyncio.Future] = set()
        self._closing = False
        self._ending: dict[str, asyncio.Future] = {}
        self._reaper: asyncio.Task | None = None
        self.own_user = service_caller()
        self.quotas = Quotas()  # none, until the config file sets some
        self.audit = AuditTrail()
        # Sandboxes admitted by `create` and still starting: their user's uid and limits.
        self._claims: dict[str, tuple[int, dict[str, Any]]] = {}

    # -- startup and shutdown ----------------------------------------------------------

    async def start(self) -> None:
        """Re-adopt sandboxes that survived a service restart, then start the reaper.

        The state knows them from each sandbox directory's own record, whatever became
        of the database. A directory that was never recorded is a leftover, swept; a
        failed sandbox stays failed with its files.
        """
        known = {r.id for r in self.state.records(RUNNING, POOLED, FAILED)}
        try:
            swept = await self.backend.sweep_orphans(known)
        except Exception:  # cleaning up never stops the service from starting
            log.exception("sweeping sandboxes left behind failed; trying again at the next start")
            swept = []
        for sandbox_id in swept:
            log.warning("stopped sandbox %s, left behind by a killed service", sandbox_id)
        for sandbox_id in self.backend.unadopted(known):
            self._adopt_unreadable(sandbox_id)
        for record in self.state.records(POOLED, FAILED, RUNNING):
            try:
                runtime = (
                    self.backend.runtime(record.id, record.runtime) if record.runtime else None
                )
            except ValueError as e:
                runtime = self.backend.stand_in(record.id)
                if runtime is None:
                    log.warning("left sandbox %s alone (its files are kept): %s", record.id, e)
                    continue
                if record.status != POOLED:
                    self._stand_in(record, runtime, f"its recorded runtime is unreadable ({e})")
            if record.status == POOLED:
                await self._end(record, runtime, "pool drained")
            elif runtime is None or not self.backend.exists(record.id):
                # Known to the database alone: it ended while no change could be written.
                await self._end(record, None, "lost while the service was down")
            elif record.status == FAILED:
                try:  # a files-only agent the last service started, or an unrecorded start
                    await self.backend.halt(runtime)
                except Exception:
                    log.exception("stopping what is left of failed sandbox %s failed", record.id)
                self.live[record.id] = Live(record, runtime, self.backend.agent(runtime))
            else:
                await self._readopt(Live(record, runtime, self.backend.agent(runtime)))
        await self.reap()  # deadlines and leases that lapsed while no service ran
        self._reaper = asyncio.create_task(self._reap_forever())
        self.refill_pool()

    def _adopt_unreadable(self, sandbox_id: str) -> None:
        """Adopt, as failed, a sandbox whose record cannot be read and that the database
        does not know: its files stay reachable and it can be killed or restarted (with
        this service's default settings, as its own are lost)."""
        runtime = self.backend.stand_in(sandbox_id)
        if runtime is None:
            return
        try:
            kept = self.backend.keep_record_aside(sandbox_id)
        except OSError as e:
            log.warning("left sandbox %s alone (its files are kept): %s", sandbox_id, e)
            return
        record = SandboxRecord(
            id=sandbox_id,
            name=sandbox_id,
            status=FAILED,
            created_at=time.time(),
            limits=self.default_limits().as_dict(),
        )
        why = self.state.unreadable.get(sandbox_id, "it could not be read")
        self._stand_in(record, runtime, f"its record does not check out ({why}; kept as {kept})")

    def _stand_in(self, record: SandboxRecord, runtime: Runtime, why: str) -> None:
        """Fail a sandbox whose recorded runtime is lost, with `runtime` in its place."""
        record.status, record.failed_at = FAILED, time.time()
        record.failure = f"{why}, so the service lost track of its processes"
        record.runtime = runtime.to_json()
        self.state.save(record, quiet=True)
        log.warning(
            "sandbox %s: %s; adopted it as failed. %s",
            record.id,
            why,
            files_after_failure(runtime),
        )

    async def _readopt(self, live: Live) -> None:
        """Take a running sandbox back after a restart, or fail it if it can no longer serve."""
        record = live.record
        self.live[record.id] = live
        reason = await self.backend.failure(live.runtime, _memory(record), service_was_down=True)
        if reason is None:
            try:
                await asyncio.wait_for(live.agent.call("ping"), 5)
            except Exception:
                reason = "its agent did not answer after a service restart"
        if reason is not None:
            await self._fail(live, reason)
            return
        self.state.save(record, quiet=True)  # its own record, if an older version started it
        log.info("re-adopted sandbox %s", record.id)

    async def close(self) -> None:
        await self._drain_pool()
        if self._reaper:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper

    # -- queries -----------------------------------------------------------------------

    @staticmethod
    def visible(record: SandboxRecord, caller: Caller | None) -> bool:
        """May `caller` see this sandbox? Its own, or any for an instructor (None: the
        service itself)."""
        return caller is None or caller.instructor or record.uid == caller.uid

    def find(self, ref: str, caller: Caller | None = None) -> Live | None:
        """The running or failed sandbox with this id or name that `caller` may see, if any.

        Names are unique per user: an instructor naming a sandbox gets their own of that
        name, else the only one of anyone's (InvalidRequest if several users have one).
        """
        live = self.live.get(ref)
        if live is not None and self.visible(live.record, caller):
            return live
        named = [
            s for s in self.live.values() if s.record.name == ref and self.visible(s.record, caller)
        ]
        if len(named) > 1 and caller is not None:
            own = [s for s in named if s.record.uid == caller.uid]
            if not own:
                which = ", ".join(f"{s.record.user}: {s.record.id}" for s in named)
                raise InvalidRequest(
                    f"sandboxes of several users are named {ref!r} ({which}): give the id"
                )
            named = own
        return named[0] if named else None

    def get(self, ref: str, caller: Caller | None = None) -> Live:
        """The sandbox `ref` names, for `caller`: another user's answers exactly as a
        sandbox that does not exist (SandboxNotFound), so none is given away."""
        live = self.find(ref, caller)
        if live is not None:
            return live
        ended = [
            r
            for r in self.state.records(ENDED)
            if ref in (r.id, r.name) and self.visible(r, caller)
        ]
        if ended:
            record = max(ended, key=lambda r: (r.id == ref, r.created_at))
            raise SandboxExpired(f"sandbox {ref!r} has ended: {record.end_reason}")
        raise SandboxNotFound(f"no sandbox with id or name {shown(ref)}")

    def running(self, ref: str, caller: Caller | None = None) -> Live:
        """A sandbox that can run commands; SandboxFailed for one that failed."""
        live = self.get(ref, caller)
        if live.record.status == FAILED:
            raise SandboxFailed(failed_message(live))
        return live

    async def files(self, ref: str, caller: Caller | None = None) -> Live:
        """A sandbox whose agent serves file operations: a running one (checked first),
        or a failed one, whose agent is started again over its directory for files only."""
        live = self.get(ref, caller)
        await self.check(live)
        if live.record.status == FAILED:
            await self._serve_files(live)
        return live

    async def check(self, live: Live, agent_lost: bool = False) -> bool:
        """Fail a running sandbox now if it can no longer serve; True if it has failed.
        `agent_lost`: a request found its agent unreachable just now."""
        if live.record.status == RUNNING:
            reason = await self.backend.failure(
                live.runtime, _memory(live.record), agent_lost=agent_lost
            )
            if reason is not None:
                await self._fail(live, reason)
        return live.record.status == FAILED

    def list(
        self, include_ended: bool = False, caller: Caller | None = None
    ) -> list[SandboxRecord]:
        """The sandboxes `caller` may see, oldest first; with the ended ones if asked."""
        records = [s.record for s in self.live.values()]
        if include_ended:
            records += self.state.records(ENDED)
        visible = [r for r in records if self.visible(r, caller)]
        return sorted(visible, key=lambda r: r.created_at)

    def use_of(self, uid: int) -> Use:
        """What the user `uid` holds against its quota: its running and failed sandboxes,
        and those being started for it."""
        held = [s.record.limits for s in self.live.values() if s.record.uid == uid]
        held += [limits for owner, limits in self._claims.values() if owner == uid]
        return Use.of(held)

    def usage(self, live: Live) -> dict[str, Any]:
        """Live CPU and memory use; CPU percent over the time since the last sample."""
        if live.record.status == FAILED:
            return {"available": False, "reason": "the sandbox failed: nothing of it runs"}
        sample = self.backend.usage(live.runtime)
        if sample is None:
            return {"available": False, "reason": live.runtime.limits_note}
        previous, live.sample = live.sample, sample
        percent = None
        if previous and sample["cpu_seconds"] is not None and sample["time"] > previous["time"]:
            percent = (
                100
                * (sample["cpu_seconds"] - previous["cpu_seconds"])
                / (sample["time"] - previous["time"])
            )
        return {"available": True, "cpu_percent": percent, **sample}

    # -- lifecycle ---------------------------------------------------------------------

    async def create(
        self,
        *,
        name: str | None = None,
        timeout: Any = None,
        memory: Any = None,
        cpus: Any = None,
        pids: Any = None,
        fds: Any = None,
        disk: Any = None,
        network: str = "none",
        env: dict | None = None,
        labels: dict | None = None,
        owner: str = "",
        caller: Caller | None = None,
        record_terminals: bool = False,
    ) -> SandboxRecord:
        """Start a sandbox for `caller` (the service's own user if None); limits not given
        take the defaults of `Settings`; its terminal sessions are recorded if
        `record_terminals` or the service records them all."""
        caller = caller or self.own_user
        seconds = parse_timeout(timeout)
        defaults = self.default_limits()
        limits = requested(
            defaults, self.backend.storage, memory=memory, cpus=cpus, pids=pids, fds=fds, disk=disk
        )
        if network not in ("none", "host"):
            raise InvalidRequest(f'invalid network {shown(network)}: expected "none" or "host"')
        env = check_env(env or {})
        labels = _check_labels(labels or {})
        if not isinstance(owner, str):
            raise InvalidRequest("owner must be a string")
        if not isinstance(record_terminals, bool):
            raise InvalidRequest("record_terminals must be true or false")
        if name is not None and not (isinstance(name, str) and NAME_RE.fullmatch(name)):
            raise InvalidRequest(
                f"invalid name {shown(name)}: use letters, digits, '.', '_' or '-' "
                "(up to 63), starting with a letter or digit"
            )
        async with self._create_lock:
            taken = {(s.record.uid, s.record.name) for s in self.live.values()}
            taken |= self._reserved_names
            if name is not None and (caller.uid, name) in taken:
                failed = any(
                    (s.record.uid, s.record.name, s.record.status) == (caller.uid, name, FAILED)
                    for s in self.live.values()
                )
                raise SandboxExists(
                    f"a sandbox named {name!r} failed and is kept: restart or kill it first"
                    if failed
                    else f"a sandbox named {name!r} is already running"
                )
            quota = self.quotas.of(caller.user, caller.groups)
            use = self.use_of(caller.uid)
            check_create(quota, use, limits.memory, limits.cpus, seconds, limits.pids or 0)
            if name is not None:
                self._reserved_names.add((caller.uid, name))
            # A pooled sandbox's tmpfs sizes, fd limit and home were fixed when it started.
            fixed = (limits.memory, limits.fds, limits.disk) == (
                defaults.memory,
                defaults.fds,
                defaults.disk,
            )
            pooled = self._take_pooled() if network == "none" and fixed else None
            sandbox_id = pooled[0] if pooled else "sb-" + secrets.token_hex(5)
            self._claims[sandbox_id] = (caller.uid, limits.as_dict())
        try:
            if pooled is not None and not await self._fit_pooled(*pooled, limits):
                # It cannot take these limits (it is pooled again): a fresh sandbox instead.
                claim = self._claims.pop(sandbox_id)
                sandbox_id, pooled = "sb-" + secrets.token_hex(5), None
                self._claims[sandbox_id] = claim
            if pooled is not None:
                runtime = pooled[1]
            else:
                spec = SandboxSpec(sandbox_id, network, limits, self.settings.seccomp)
                runtime = await self.backend.start(spec)
        finally:
            self._reserved_names.discard((caller.uid, name))
            # From here to its entry in self.live nothing awaits: no other create can
            # see this sandbox as neither claimed nor live.
            self._claims.pop(sandbox_id, None)
        now = time.time()
        record = SandboxRecord(
            id=sandbox_id,
            name=name or sandbox_id,
            status=RUNNING,
            created_at=now,
            timeout=seconds,
            expires_at=now + seconds if seconds else None,
            lease_id=None if seconds else secrets.token_urlsafe(16),
            lease_expires=None if seconds else now + self.settings.lease_ttl,
            owner=owner,
            labels=labels,
            env=env,
            network=network,
            limits=limits.as_dict(),
            runtime=runtime.to_json(),
            user=caller.user,
            uid=caller.uid,
            recording=record_terminals or self.settings.record_terminals,
        )
        try:
            self.state.add(record)
        except OSError as e:  # never a sandbox without its record: it would be swept
            await self.backend.stop(runtime)
            if space.is_full(e):
                raise space.full_error(self.backend.storage) from None
            raise
        self.live[sandbox_id] = Live(record, runtime, self.backend.agent(runtime))
        self._notify("created", record)
        log.info(
            "created sandbox %s (%s)%s", sandbox_id, record.name, " from the pool" * bool(pooled)
        )
        self.refill_pool()
        return record

    def default_limits(self) -> Limits:
        return Limits(
            memory=self.settings.default_memory,
            cpus=self.settings.default_cpus,
            pids=self.settings.default_pids,
            fds=min(self.settings.default_fds, max_fds()),
            disk=self.settings.default_disk,
        )

    # -- the warm pool -----------------------------------------------------------------

    def _take_pooled(self) -> tuple[str, Runtime] | None:
        """A pre-started sandbox with default settings, if one is ready."""
        while self.pool:
            sandbox_id, runtime = self.pool.popitem()
            if self.backend.serving(runtime):
                return sandbox_id, runtime
            self._drop_later(sandbox_id, runtime)
        return None

    async def _fit_pooled(self, sandbox_id: str, runtime: Runtime, limits: Limits) -> bool:
        """Give a sandbox taken from the pool `limits`; False, and it goes back to the pool
        as it was, when it cannot take them (a backend whose limits are fixed at start)."""
        try:
            fits = self.backend.set_limits(runtime, limits)
        except Exception:
            await self._drop_pooled(sandbox_id, runtime)  # no longer pooled: must not linger
            raise
        if not fits:
            self.pool[sandbox_id] = runtime
        return fits

    def _drop_later(self, sandbox_id: str, runtime: Runtime) -> None:
        """End a sandbox taken out of the pool, in the background."""
        task = asyncio.ensure_future(self._drop_pooled(sandbox_id, runtime))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _drop_pooled(self, sandbox_id: str, runtime: Runtime) -> None:
        record = self.state.get(sandbox_id)
        if record is not None:
            await self._end(record, runtime, "pool drained")

    def refill_pool(self) -> None:
        """Start sandboxes in the background until the pool is full again."""
        if time.monotonic() < self._pool_paused_until:
            return
        if self._refilling is None or self._refilling.done():
            self._refilling = asyncio.ensure_future(self._fill_pool())

    async def _fill_pool(self) -> None:
        while (
            len(self.pool) < self.settings.pool_size
            and not self.backend.unavailable
            and not self._closing
        ):
            sandbox_id = "sb-" + secrets.token_hex(5)
            limits = self.default_limits()
            self.pool_starting.add(sandbox_id)
            try:
                runtime = await self.backend.start(
                    SandboxSpec(sandbox_id, "none", limits, self.settings.seccomp)
                )
            except DiskFull as e:
                self._pause_pool(e)
                return
            except Exception:
                log.exception("could not start a pooled sandbox")
                return
            finally:
                self.pool_starting.discard(sandbox_id)
            record = SandboxRecord(
                id=sandbox_id,
                name=sandbox_id,
                status=POOLED,
                created_at=time.time(),
                runtime=runtime.to_json(),
                limits=limits.as_dict(),
            )
            try:
                self.state.add(record)
            except OSError as e:
                await self.backend.stop(runtime)
                if space.is_full(e):
                    self._pause_pool(space.full_error(self.backend.storage))
                else:
                    log.exception("could not record a pooled sandbox")
                return
            self.pool[sandbox_id] = runtime

    def _pause_pool(self, error: DiskFull) -> None:
        """The disk is full: say so once, and refill only after POOL_RETRY."""
        self._pool_paused_until = time.monotonic() + POOL_RETRY
        log.warning("the warm pool stays empty for now: %s", error)

    async def _drain_pool(self) -> None:
        self._closing = True
        if self._refilling is not None:
            await self._refilling  # a start cut short would leave its processes behind
        while self.pool:
            await self._drop_pooled(*self.pool.popitem())

    async def kill(self, ref: str, reason: str = "killed") -> SandboxRecord:
        live = self.get(ref)
        await self._end_live(live, reason)
        return live.record

    async def restart(self, ref: str) -> SandboxRecord:
        """Start a failed sandbox again: the same id, name, home, limits and deadline."""
        live = self.get(ref)
        async with live.lock:
            record = live.record
            if record.status != FAILED:
                raise InvalidRequest(
                    f"sandbox {record.name!r} is {record.status}: only a failed sandbox can be "
                    "restarted (kill it and create a new one to start afresh)"
                )
            await self.backend.halt(live.runtime)  # its files-only agent, if one runs
            runtime = await self.backend.start(self._spec(live), resume=True)
            live.runtime, live.agent, live.sample = runtime, self.backend.agent(runtime), None
            record.status, record.failure, record.failed_at = RUNNING, None, None
            record.runtime = runtime.to_json()
            self.state.save(record, quiet=True)  # it runs again, recorded or not
        self._notify("restarted", record)
        self.note(record.id, "service", "sandbox restarted")
        log.info("restarted sandbox %s (%s)", record.id, record.name)
        return record

    async def _fail(self, live: Live, reason: str) -> None:
        """Mark a running sandbox failed: stop what is left of its processes, keep its files."""
        async with live.lock:
            record = live.record
            if record.status != RUNNING or self.live.get(record.id) is not live:
                return  # another call failed, restarted or ended it meanwhile
            try:
                await self.backend.halt(live.runtime)
            except Exception:
                log.exception("stopping what is left of sandbox %s failed", record.id)
            record.status, record.failure, record.failed_at = FAILED, reason, time.time()
            live.sample = None
            self.state.save(record, quiet=True)
        self._notify("failed", record)
        self.note(record.id, "service", f"sandbox failed: {reason}")
        log.warning(
            "sandbox %s failed: %s; %s",
            record.id,
            reason,
            "its files are kept" if live.runtime.files_survive_failure else "its files are gone",
        )

    async def _serve_files(self, live: Live) -> None:
        """Make sure a failed sandbox has an agent serving its files (started once, kept)."""
        async with live.lock:
            runtime = live.runtime
            if live.record.status != FAILED:
                return
            if runtime.files_only:
                if self.backend.serving(runtime):
                    return
                await self.backend.halt(runtime)  # that agent ended too: start another
            live.runtime = await self.backend.start(self._spec(live), resume=True, files_only=True)
            live.agent = self.backend.agent(live.runtime)
            live.record.runtime = live.runtime.to_json()
            self.state.save(live.record, quiet=True)  # a full disk must not hide the files
            log.info("serving the files of failed sandbox %s", live.record.id)

    def _spec(self, live: Live) -> SandboxSpec:
        """What a sandbox was started with, to start it again over its directory."""
        record = live.record
        names = ("memory", "cpus", "pids", "fds", "disk")
        limits = Limits(**{name: record.limits.get(name) for name in names})
        return SandboxSpec(record.id, record.network, limits, self.settings.seccomp)

    async def _end_live(self, live: Live, reason: str) -> None:
        """End a sandbox once no start or failure of it is under way."""
        async with live.lock:
            await self._end(live.record, live.runtime, reason)

    def extend(self, ref: str, timeout: Any, caller: Caller | None = None) -> SandboxRecord:
        """Set a new deadline, counted from now; "session" is not a deadline.

        The deadline is bound by the lifetime quota of the sandbox's user, unless an
        instructor extends someone else's sandbox."""
        live = self.get(ref)
        seconds = parse_duration(timeout)
        self._check_lifetime(live.record, seconds, caller or self.own_user)
        live.record.timeout = seconds
        live.record.expires_at = time.time() + seconds
        live.record.lease_id = live.record.lease_expires = None
        self._notify("updated", live.record)
        try:
            self.state.save(live.record)
        except OSError as e:
            outcome = (
                "the new deadline is in effect, but a service restarted without its "
                "database would not know it"
            )
            raise record_error(live.record.id, e, outcome, self.backend.storage) from None
        return live.record

    def _check_lifetime(self, record: SandboxRecord, seconds: float, caller: Caller) -> None:
        """QuotaExceeded if a deadline `seconds` from now is past the lifetime quota of the
        sandbox's user; an instructor acting on another user's sandbox is not bound by it."""
        if caller.uid == record.uid:
            quota = self.quotas.of(caller.user, caller.groups)
        elif caller.instructor:
            return
        else:
            quota = self.quotas.of(record.user, group_names(record.uid))
        check_lifetime(quota, seconds, extending=True)

    def renew(self, ref: str, lease_id: str) -> SandboxRecord:
        live = self.get(ref)
        if live.record.lease_id is None or not secrets.compare_digest(
            live.record.lease_id, str(lease_id)
        ):
            raise InvalidRequest("this lease does not own the sandbox")
        live.record.lease_expires = time.time() + self.settings.lease_ttl
        self.state.save(live.record)
        return live.record

    async def _end(self, record: SandboxRecord, runtime: Runtime | None, reason: str) -> None:
        """Stop a sandbox and record why; concurrent calls wait for the first one."""
        if record.status == ENDED:
            return
        if record.id not in self._ending:
            self._ending[record.id] = asyncio.ensure_future(self._stop(record, runtime, reason))
        await asyncio.shield(self._ending[record.id])

    async def end_recorded(self, sandbox_id: str) -> None:
        """Once an end of the sandbox under way is recorded (at most END_WAIT seconds):
        its followed log ends with its agent, before the end is in its record."""
        ending = self._ending.get(sandbox_id)
        if ending is not None:
            await asyncio.wait({ending}, timeout=END_WAIT)

    async def _stop(self, record: SandboxRecord, runtime: Runtime | None, reason: str) -> None:
        try:
            self.state.delete_tokens(record.id)
            if runtime is not None:
                try:
                    await self.backend.stop(runtime)
                except Exception:
                    log.exception("cleaning up sandbox %s failed", record.id)
            self.live.pop(record.id, None)
            record.status, record.ended_at, record.end_reason = ENDED, time.time(), reason
            record.lease_id = None
            self.state.save(record)
            self.audit.forget(record.id)
            self._notify("ended", record)
            log.info("sandbox %s ended: %s", record.id, reason)
        finally:
            self._ending.pop(record.id, None)

    def audit_log(self, live: Live) -> AuditLog:
        """The service's audit log of a sandbox (``audit_log``), in its directory."""
        return self.audit.of(live.record.id, live.runtime.directory)

    def note(self, sandbox_id: str, source: str, text: str) -> None:
        """Write a line into a sandbox's audit log, which logs() shows with stream
        "audit"; nothing if the sandbox is gone."""
        live = self.live.get(sandbox_id)
        if live is not None:
            self.audit_log(live).note(source, text)

    def _notify(self, event: str, record: SandboxRecord) -> None:
        for listener in list(self.listeners):
            try:
                listener(event, record)
            except Exception:
                log.exception("sandbox event listener failed")

    # -- the reaper --------------------------------------------------------------------

    async def _reap_forever(self) -> None:
        last_health = 0.0
        while True:
            await asyncio.sleep(self.settings.reap_interval)
            try:
                await self.reap(check_health=time.monotonic() - last_health > HEALTH_INTERVAL)
            except Exception:
                log.exception("reaper pass failed")
            if time.monotonic() - last_health > HEALTH_INTERVAL:
                last_health = time.monotonic()

    async def reap(self, check_health: bool = True) -> None:
        """End every sandbox past its deadline; fail every one that can no longer serve."""
        now = time.time()
        for live in list(self.live.values()):
            deadline = live.record.deadline()
            if deadline is not None and deadline[0] <= now:
                await self._end_live(live, deadline[1])
            elif check_health:
                await self.check(live)
        self.state.forget_ended(ENDED_KEPT_FOR)


def record_error(sandbox_id: str, error: OSError, outcome: str, storage: Path) -> SandboxError:
    """The error for a change whose record file could not be written: what became of the
    change (`outcome`), which file failed and why, what to do. DiskFull for a full disk."""
    path = error.filename2 or error.filename  # a rename's target is the record itself
    where = f"{error.strerror}: {path}" if path else str(error)
    text = (
        f"{outcome}: the record file of sandbox {sandbox_id} could not be written ({where}). "
        f"Make {storage} writable again (free space, permissions, attributes) and retry"
    )
    return DiskFull(text) if space.is_full(error) else SandboxError(text)


def failed_message(live: Live) -> str:
    """What SandboxFailed says: which sandbox, why, whether its files are kept, and the
    ways out."""
    record = live.record
    name = repr(record.name) + (f" ({record.id})" if record.name != record.id else "")
    return f"sandbox {name} failed: {record.failure}. {files_after_failure(live.runtime)}"


def files_after_failure(runtime: Runtime) -> str:
    """What became of a failed sandbox's files, and what to do, in a sentence."""
    if runtime.files_survive_failure:
        return (
            "Its files are kept until its deadline or a kill: download its files, restart "
            "it with sb.restart(), or kill it"
        )
    return (
        "Its files are not kept: restart it with sb.restart() to start again with an empty "
        "home, or kill it; set JUPYTER_SANDBOX_K8S_HOME=pvc on the service to keep homes "
        "across failures"
    )


def _memory(record: SandboxRecord) -> int | None:
    memory = record.limits.get("memory")
    return memory if isinstance(memory, int) else None


def _check_labels(labels: object) -> dict[str, str]:
    if not isinstance(labels, dict) or not all(
        isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in labels.values()
    ):
        raise InvalidRequest("labels must be a mapping of names to strings or numbers")
    return {str(k): str(v) for k, v in labels.items()}


def check_env(env: object) -> dict[str, str]:
    """Environment variables: names of letters, digits and '_'; values without NUL bytes."""
    if not isinstance(env, dict):
        raise InvalidRequest("env must be a mapping of names to strings")
    for key, value in env.items():
        if not isinstance(key, str) or not ENV_KEY_RE.fullmatch(key):
            raise InvalidRequest(f"invalid environment variable name {shown(key)}")
        if (
            isinstance(value, bool)
            or not isinstance(value, (str, int, float))
            or "\0" in str(value)
        ):
            raise InvalidRequest(
                f"environment variable {key} must be a string (or number) without NUL bytes"
            )
    return {k: str(v) for k, v in env.items()}
