"""SSH credentials of sandboxes: issue, resolve, revoke, expire; runs the gateway.

A credential is a random token used as the SSH username. Only its hash is
stored. It is valid until its TTL, a revoke or the sandbox's end, whichever
comes first; when it stops being valid, live sessions opened with it are
closed within a second. From this machine, it works only for the OS user who
was given it (see ``ssh.gateway``).

The gateway runs in this process (``JUPYTER_SANDBOX_SSH_WORKERS=1``) or as
worker processes on the same port (``ssh.workers``, the default: one per CPU).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncssh

from .._durations import parse_duration
from .._errors import InvalidRequest
from ..ssh import Gateway, GatewayLimits, Target, generate_token, hash_token
from ..ssh.workers import WorkerPool, worker_count
from .manager import Manager, failed_message, record_error
from .ssh_port import PORT_FILE, configured_address, inherited_socket, listening_socket
from .state import FAILED, SandboxRecord, SshToken

log = logging.getLogger("jupyter_sandbox.service")
EXPIRY_INTERVAL = 0.5


class SshAccessManager:
    """Issues tokens for sandboxes and lets the gateway resolve them."""

    def __init__(self, manager: Manager, key_dir: Path, *, system: bool = False) -> None:
        self.manager = manager
        self.state = manager.state
        self.key_dir = key_dir
        self.host, self.port = configured_address()
        self.public_host = os.environ.get("JUPYTER_SANDBOX_SSH_PUBLIC_HOST")
        self.public_port = os.environ.get("JUPYTER_SANDBOX_SSH_PUBLIC_PORT")
        self.limits = GatewayLimits.from_env(system=system)
        self.sftp = manager.settings.sftp
        # Only post-quantum key exchange: passes ssh-audit cleanly, needs OpenSSH >= 9.9.
        self.post_quantum_only = os.environ.get("JUPYTER_SANDBOX_SSH_PQ_ONLY") == "1"
        self.workers = worker_count()
        self.gateway: Gateway | WorkerPool | None = None
        self._expiry: dict[str, tuple[str, float]] = {}  # token hash -> (sandbox, deadline)
        self._task: asyncio.Task | None = None
        manager.listeners.append(self._on_sandbox_event)

    async def start(self) -> None:
        """Listen on the socket the supervisor holds, else bind one (`listening_socket`)."""
        sock = inherited_socket() or listening_socket(self.key_dir, self.host, self.port)
        if self.workers == 1:
            self.gateway = Gateway(
                self.resolve,
                self.key_dir,
                self.host,
                self.port,
                self._on_ssh_event,
                limits=self.limits,
                post_quantum_only=self.post_quantum_only,
                sock=sock,
            )
        else:
            self.gateway = WorkerPool(
                self.workers,
                sock,
                self.key_dir,
                self.resolve_hash,
                self.state.use_token,
                self._on_ssh_event,
                limits=self.limits,
                post_quantum_only=self.post_quantum_only,
            )
        await self.gateway.start()
        (self.key_dir / PORT_FILE).write_text(f"{self.gateway.port} {self.port}")
        for token in self.state.tokens():
            if token.expires_at is not None:
                self._expiry[token.token_hash] = (token.sandbox_id, token.expires_at)
        self._task = asyncio.create_task(self._expire_forever())
        processes = "in this process" if self.workers == 1 else f"in {self.workers} workers"
        log.info("SSH gateway on %s:%d, %s", self.host, self.gateway.port, processes)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.gateway is not None:
            await self.gateway.close()

    # -- issuing and revoking ----------------------------------------------------------

    def expose(
        self,
        ref: str,
        ttl: Any = None,
        single_use: bool = False,
        public_key: str | None = None,
        *,
        uid: int | None = None,
    ) -> dict[str, Any]:
        """A new credential for a sandbox, as the fields of ``SshAccess``; it records `uid`,
        the caller who asked for it (the service's own uid if None)."""
        live = self.manager.running(ref)
        assert self.gateway is not None
        if public_key is not None:
            try:
                asyncssh.import_public_key(public_key)
            except (asyncssh.KeyImportError, ValueError) as e:
                raise InvalidRequest(f"invalid public_key: {e}") from None
        expires_at = time.time() + parse_duration(ttl) if ttl is not None else None
        token = generate_token()
        token_hash = hash_token(token)
        try:
            self.state.add_token(
                SshToken(
                    token_hash=token_hash,
                    sandbox_id=live.record.id,
                    created_at=time.time(),
                    expires_at=expires_at,
                    single_use=bool(single_use),
                    public_key=public_key,
                    uid=os.getuid() if uid is None else uid,
                )
            )
        except OSError as e:  # a credential no one was given must not stay valid
            self.state.revoke_tokens(live.record.id, token_hash)
            storage = self.manager.backend.storage
            raise record_error(live.record.id, e, "no SSH access was given", storage) from None
        if expires_at is not None:
            self._expiry[token_hash] = (live.record.id, expires_at)
        host = self.public_host or self.host
        port = int(self.public_port or self.gateway.port)
        command = f"ssh {token}@{host}" if port == 22 else f"ssh -p {port} {token}@{host}"
        ends = [t for t in (expires_at, live.record.expires_at) if t is not None]
        return {
            "hostname": host,
            "port": port,
            "username": token,
            "command": command,
            "expires_at": min(ends) if ends else None,
            "sandbox_id": live.record.id,
            "host_key_fingerprint": self.gateway.host_key_fingerprint,
            "known_hosts_line": self.gateway.known_hosts_line(host, port),
        }

    def revoke(self, ref: str, token: str | None = None) -> int:
        """Revoke one token of a sandbox, or all; their live sessions are closed."""
        live = self.manager.get(ref)
        hashes = self.state.revoke_tokens(live.record.id, hash_token(token) if token else None)
        for token_hash in hashes:
            self._expiry.pop(token_hash, None)
            if self.gateway is not None:
                self.gateway.close_sessions(live.record.id, token_hash)
        if hashes:
            self._note(live.record.id, f"SSH access revoked ({len(hashes)} credential(s))")
        return len(hashes)

    # -- the gateway's view ------------------------------------------------------------

    async def resolve(self, token: str) -> Target | None:
        """The sandbox a token grants, or None if it is unknown, used up or no longer valid.

        A single-use token is used up by the login that completes (`Target.claim`), not
        by one that only presents it, so a wrong key cannot burn it."""
        return await self.resolve_hash(hash_token(token))

    async def resolve_hash(self, token_hash: str) -> Target | None:
        """`resolve` for a token known by its hash (as gateway workers ask)."""
        token = self.state.token(token_hash)
        if token is None:
            return None
        if token.expires_at is not None and token.expires_at <= time.time():
            return None
        live = self.manager.live.get(token.sandbox_id)
        if live is None:
            return None
        if token.single_use and token.used:
            return None
        if live.record.status == FAILED:
            return Target(
                live.record.id,
                live.agent,
                {},
                token_hash,
                refusal=failed_message(live),
                uid=token.uid,
            )
        return Target(
            sandbox_id=live.record.id,
            agent=live.agent,
            env=dict(live.record.env),
            token_hash=token_hash,
            public_key=token.public_key,
            single_use=token.single_use,
            claim=self._claimer(token_hash) if token.single_use else None,
            sftp=self.sftp,
            uid=token.uid,  # a record from before uids were kept: the service's own
            record_in=live.runtime.directory if live.record.recording else None,
        )

    def _claimer(self, token_hash: str) -> Callable[[], Awaitable[bool]]:
        async def claim() -> bool:
            return self.state.use_token(token_hash)

        return claim

    def _on_ssh_event(self, sandbox_id: str, text: str) -> None:
        """Every line the gateway (or a worker of it) writes into a sandbox's log."""
        self._note(sandbox_id, text)

    def _note(self, sandbox_id: str, text: str) -> None:
        """Put an event line into the sandbox's audit log, which the sandbox cannot touch."""
        self.manager.note(sandbox_id, "ssh", text)

    def _on_sandbox_event(self, event: str, record: SandboxRecord) -> None:
        if event in ("failed", "ended") and self.gateway is not None:
            self.gateway.close_sessions(record.id)
        if event == "ended" and self.gateway is not None:
            for token_hash in [h for h, (s, _) in self._expiry.items() if s == record.id]:
                del self._expiry[token_hash]

    async def _expire_forever(self) -> None:
        while True:
            await asyncio.sleep(EXPIRY_INTERVAL)
            now = time.time()
            for token_hash, (sandbox_id, deadline) in list(self._expiry.items()):
                if deadline <= now:
                    del self._expiry[token_hash]
                    if self.gateway is not None:
                        self.gateway.close_sessions(sandbox_id, token_hash)
                    self._note(sandbox_id, "SSH access expired")
