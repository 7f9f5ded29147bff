"""Callers identified by their JupyterHub token (`serve --tcp HOST:PORT --hub-auth`).

Every TCP request carries ``Authorization: token <t>`` (or ``Bearer <t>``): the API
token of a hub user, such as a notebook server's JUPYTERHUB_API_TOKEN. The service asks
the hub ``GET $JUPYTERHUB_API_URL/user`` with it; every token may read its own user's
name, groups and admin flag there, so a notebook server's token is enough. The caller is
that hub user: its groups are the hub groups, it is an instructor if it is a hub admin or
a member of one of the config file's ``instructors`` groups.

Every token names its user there, whatever it was made for, so the token's scopes must
also grant access to this service (``access:services!service=$JUPYTERHUB_SERVICE_NAME``)
or to the user's own servers (``access:servers!server=<user>/...``: a notebook server's
token; whoever may use that server may act as its user anyway). A token scoped down for
another use (another hub service's OAuth token of the user, one that may only read
activity) is refused: it must not open the user's sandboxes, nor a hub admin's token
everyone's.

The hub's answers are kept for JUPYTER_SANDBOX_HUB_CACHE seconds (default 10, at most
30), keyed by a hash of the token (the token itself is never kept, logged or shown), and
concurrent requests with one new token ask the hub once (and at most MAX_ASKING
questions are with the hub at a time); a token the hub rejects is
remembered as rejected for JUPYTER_SANDBOX_HUB_REJECT_CACHE seconds (default 2, at most
the former). A revoked token stops working within JUPYTER_SANDBOX_HUB_CACHE seconds for
new requests; one still running (a followed log, the event feed) ends within twice that.

The service's own JUPYTERHUB_API_TOKEN (as a hub service, with the scopes
``read:users:name`` and ``read:users:groups``) is optional: with it, an instructor may
ask for the usage of any hub user by name; without it, only of users who have called the
service since it started.

Uids: each hub user name gets a number of its own, from `HUB_UID_BASE` up in the order
the names first call, recorded in ``<data dir>/hub-uids.json`` (written atomically)
before it is first used, so it outlives restarts and is never given to another name.
The range lies above every OS account and host-uid range, so no hub user shares a uid
with the service's own user or root, and every scoping by uid holds as in system mode.
A lost or damaged file is rebuilt from the sandboxes' records (they name user and uid):
every user with a sandbox keeps its uid. A hub user deleted and created again under the
same name is the same user here, as the hub's API gives no other stable identity.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import re
import ssl
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from .._errors import InvalidRequest, PermissionDenied, ServiceUnavailable
from .identity import HUB_UID_BASE, HUB_UID_LAST, Caller

log = logging.getLogger("jupyter_sandbox.service")

AUTH_ENV = "JUPYTER_SANDBOX_AUTH"  # "hub": as `serve --hub-auth`; "token": --tcp's own token
CACHE_ENV, REJECT_CACHE_ENV = "JUPYTER_SANDBOX_HUB_CACHE", "JUPYTER_SANDBOX_HUB_REJECT_CACHE"
API_URL_ENV, API_TOKEN_ENV = "JUPYTERHUB_API_URL", "JUPYTERHUB_API_TOKEN"
SERVICE_NAME_ENV = "JUPYTERHUB_SERVICE_NAME"  # this service's name at the hub
MAX_CACHE = 30.0
UIDS_FILE = "hub-uids.json"
HUB_TIMEOUT = httpx.Timeout(10.0, connect=5.0)
MAX_CACHED = 10_000  # tokens remembered at once; the oldest are forgotten first
# Questions to the hub at once: a flood of made-up tokens waits here, not at the hub.
MAX_ASKING = 32
# What a JupyterHub token can look like (hex, or URL-safe base64 for OAuth ones).
_TOKEN = re.compile(r"[A-Za-z0-9._~+/=-]{1,512}")
_SCHEMES = ("token", "bearer")
SEND_TOKEN = (
    "this service takes JupyterHub tokens: send the header "
    "`Authorization: token <your JupyterHub API token>` (in a notebook server it is "
    "$JUPYTERHUB_API_TOKEN, which the jupyter-sandbox client sends by itself)"
)
UNKNOWN_TOKEN = (
    "the hub does not know this token: check that it is a current JupyterHub API token "
    "of your user ($JUPYTERHUB_API_TOKEN in a notebook server; restart the server if the "
    "hub has revoked it)"
)


def auth_mode(hub_flag: bool = False) -> str:
    """How TCP callers authenticate: "hub" (`--hub-auth` or JUPYTER_SANDBOX_AUTH=hub) or
    "token" (the service's own bearer token, the default)."""
    value = os.environ.get(AUTH_ENV, "").strip().lower() or "token"
    if value not in ("hub", "token"):
        raise ValueError(f'{AUTH_ENV}={value!r}: expected "hub" or "token"')
    return "hub" if hub_flag else value


class Unauthenticated(PermissionDenied):
    """The request carries no token, or one the hub does not accept as a user's."""

    status = 401


class HubUnavailable(ServiceUnavailable):
    """The hub could not be asked about a token; the request may be sent again."""


def _seconds(name: str, default: float, most: float) -> float:
    text = os.environ.get(name, "").strip()
    try:
        value = float(text) if text else default
    except ValueError:
        value = -1.0
    if not 0 <= value <= most:
        raise ValueError(f"{name}={text!r}: expected a number of seconds from 0 to {most:g}")
    return value


@dataclass(frozen=True)
class HubSettings:
    """Where the hub is and how long its answers are kept."""

    api_url: str  # ending in /hub/api
    service_token: str | None = field(repr=False)  # the service's own, as a hub service
    cache_seconds: float = 10.0
    reject_seconds: float = 2.0
    service_name: str | None = None  # as a hub service: tokens with access to it are taken

    @classmethod
    def from_env(cls) -> HubSettings:
        """From JUPYTERHUB_API_URL, JUPYTERHUB_API_TOKEN and JUPYTER_SANDBOX_HUB_*;
        ValueError saying what to set."""
        url = os.environ.get(API_URL_ENV, "").strip().rstrip("/")
        if not url.startswith(("http://", "https://")):
            raise ValueError(
                f"--hub-auth checks every caller's token with JupyterHub, so it needs "
                f"{API_URL_ENV}, the hub's API URL (such as http://hub:8081/hub/api; "
                f"JupyterHub sets it for the services it starts): set it"
                + (f" (it is {url!r}, not an http:// or https:// URL)" if url else "")
            )
        cache = _seconds(CACHE_ENV, cls.cache_seconds, MAX_CACHE)
        return cls(
            api_url=url,
            service_token=os.environ.get(API_TOKEN_ENV) or None,
            cache_seconds=cache,
            reject_seconds=_seconds(REJECT_CACHE_ENV, min(cls.reject_seconds, cache), cache),
            service_name=os.environ.get(SERVICE_NAME_ENV, "").strip() or None,
        )


class HubUids:
    """The uid of each hub user name, persisted in `path` before it is first handed out."""

    def __init__(self, path: Path, known: Iterable[tuple[str, int]] = ()) -> None:
        """Read `path`; `known` (user, uid) pairs from the sandboxes' records fill in what
        a lost or damaged file no longer says."""
        self.path = path
        self._uids = self._read()
        taken = set(self._uids.values())
        for user, uid in known:
            if not HUB_UID_BASE <= uid <= HUB_UID_LAST:
                continue
            if user not in self._uids and uid not in taken:
                self._uids[user] = uid
            taken.add(uid)  # never handed out again, adopted or not
        self._next = max(taken, default=HUB_UID_BASE - 1) + 1
        self._lock = asyncio.Lock()

    def _read(self) -> dict[str, int]:
        try:
            data = json.loads(self.path.read_bytes())
            uids = data["uids"]
            if not all(isinstance(u, str) and type(n) is int for u, n in uids.items()):
                raise TypeError("not a table of names and numbers")
            if not all(HUB_UID_BASE <= n <= HUB_UID_LAST for n in uids.values()):
                raise ValueError("a uid is outside the range of hub users")
            if len(set(uids.values())) != len(uids):
                raise ValueError("a uid is given to two names")
            return dict(uids)
        except FileNotFoundError:
            return {}
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            aside = self.path.with_name(f"{self.path.name}.damaged-{int(time.time())}")
            os.replace(self.path, aside)
            log.error(
                "the hub users' uids in %s cannot be read (%s): kept aside as %s and rebuilt "
                "from the sandboxes' records (users without sandboxes get new uids)",
                self.path,
                e,
                aside,
            )
            return {}

    async def uid(self, user: str) -> int:
        """`user`'s uid; a new one is written to the file before it is returned."""
        if (known := self._uids.get(user)) is not None:
            return known
        async with self._lock:
            if (known := self._uids.get(user)) is not None:
                return known
            uid = self._next
            if uid > HUB_UID_LAST:
                raise ServiceUnavailable("every uid for hub users is given out")
            uids = {**self._uids, user: uid}
            try:
                await asyncio.to_thread(self._write, uids)
            except OSError as e:
                raise ServiceUnavailable(
                    f"the service could not record a uid for hub user {user!r} in {self.path} "
                    f"({e.strerror}): free space there or fix it, then try again"
                ) from None
            self._uids, self._next = uids, uid + 1
            return uid

    def _write(self, uids: dict[str, int]) -> None:
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(tmp, flags, 0o600)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump({"uids": uids}, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        directory = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


@dataclass(frozen=True)
class _HubUser:
    """What the hub says of a token's user."""

    name: str
    groups: frozenset[str]
    admin: bool
    scopes: frozenset[str] | None = None  # of the token asked about; None: a hub before 2.0


class HubDirectory:
    """Callers by their JupyterHub token, with instructors from the hub and the config."""

    def __init__(
        self,
        settings: HubSettings,
        uids: HubUids,
        instructor_groups: Iterable[str] = (),
    ) -> None:
        self.settings = settings
        self.uids = uids
        self.instructor_groups = frozenset(instructor_groups)
        # No proxy from the environment sees the tokens; an https:// hub's certificate is
        # checked against the system's CAs (or SSL_CERT_FILE).
        trusted = ssl.create_default_context(cafile=os.environ.get("SSL_CERT_FILE") or None)
        self._client = httpx.AsyncClient(timeout=HUB_TIMEOUT, trust_env=False, verify=trusted)
        logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per hub call is noise
        # sha256 of a token -> (when the answer goes stale, the user or None: rejected)
        self._cache: dict[bytes, tuple[float, _HubUser | None]] = {}
        self._asking: dict[bytes, asyncio.Future[_HubUser | None]] = {}
        self._seen: dict[str, _HubUser] = {}  # by name: for an instructor's lookups
        self._hub_down = False
        self._asking_hub = asyncio.Semaphore(MAX_ASKING)

    def set_instructor_groups(self, groups: Iterable[str]) -> None:
        """Take a new list of instructor groups (a reloaded config file)."""
        self.instructor_groups = frozenset(groups)

    async def close(self) -> None:
        await self._client.aclose()

    async def caller(self, authorization: Sequence[str]) -> Caller:
        """The hub user whose token the request's Authorization header(s) carry;
        Unauthenticated or HubUnavailable otherwise."""
        user = await self._user(_token(authorization))
        return await self._caller(user)

    async def until_unknown(self, authorization: Sequence[str]) -> None:
        """Return once the hub no longer knows the token, asked again every cache period
        (at least a second); while the hub cannot be asked, the token holds."""
        while True:
            await asyncio.sleep(max(self.settings.cache_seconds, 1.0))
            try:
                await self.caller(authorization)
            except Unauthenticated:
                return
            except HubUnavailable:
                continue

    async def named(self, name: str) -> Caller:
        """The hub user `name`, for an instructor asking about them."""
        user = self._seen.get(name)
        if self.settings.service_token is not None:
            reply = await self._ask(f"/users/{quote(name, safe='')}", self.settings.service_token)
            if reply.status_code == 404:
                raise InvalidRequest(f"the hub has no user named {name!r}")
            user = self._parsed(reply, "GET /users/<name>") if reply.status_code == 200 else None
        if user is None:
            raise InvalidRequest(
                f"no hub user named {name!r} has called this service since it started (give "
                f"the service a hub token with the scopes read:users:name and "
                f"read:users:groups in {API_TOKEN_ENV} to ask the hub about any user)"
            )
        return await self._caller(user)

    async def _caller(self, user: _HubUser) -> Caller:
        return Caller(
            uid=await self.uids.uid(user.name),
            user=user.name,
            groups=user.groups,
            instructor=user.admin or bool(user.groups & self.instructor_groups),
        )

    async def _user(self, token: str) -> _HubUser:
        key = hashlib.sha256(token.encode()).digest()
        cached = self._cache.get(key)
        if cached is not None and time.monotonic() < cached[0]:
            user = cached[1]
        elif key in self._asking:
            user = await asyncio.shield(self._asking[key])
        else:
            asking = asyncio.get_running_loop().create_future()
            self._asking[key] = asking
            try:
                user = await self._look_up(token)
                asking.set_result(user)
            except BaseException as e:
                asking.set_exception(e)
                asking.exception()  # retrieved: nobody else may be waiting
                raise
            finally:
                del self._asking[key]
            self._remember(key, user)
        if user is None:
            raise Unauthenticated(UNKNOWN_TOKEN)
        return user

    def _remember(self, key: bytes, user: _HubUser | None) -> None:
        now = time.monotonic()
        keep = self.settings.cache_seconds if user else self.settings.reject_seconds
        if len(self._cache) >= MAX_CACHED:
            self._cache = {k: v for k, v in self._cache.items() if v[0] > now}
            while len(self._cache) >= MAX_CACHED:
                del self._cache[next(iter(self._cache))]
        self._cache[key] = (now + keep, user)
        if user is not None:
            self._seen[user.name] = user

    async def _look_up(self, token: str) -> _HubUser | None:
        """The user the hub says `token` is; None if the hub rejects it."""
        reply = await self._ask("/user", token)
        if reply.status_code in (401, 403):
            return None
        if reply.status_code != 200:
            raise self._unavailable(f"answered {reply.status_code} to GET /user")
        user = self._parsed(reply, "GET /user")
        if user.scopes is not None and not _grants_access(user, self.settings.service_name):
            service = self.settings.service_name or "<this service's name at the hub>"
            raise Unauthenticated(
                f"this token of hub user {user.name!r} was made for another use: its scopes "
                f"grant access neither to this service (access:services!service={service}) "
                "nor to the user's own server. Send your notebook server's "
                f"$JUPYTERHUB_API_TOKEN, or a token with the scope "
                f"access:services!service={service}"
            )
        return user

    async def _ask(self, path: str, token: str) -> httpx.Response:
        url = self.settings.api_url + path
        try:
            async with self._asking_hub:
                reply = await self._client.get(url, headers={"Authorization": f"token {token}"})
        except httpx.HTTPError as e:
            raise self._unavailable(f"cannot be reached ({type(e).__name__})") from None
        if self._hub_down and reply.status_code < 500:
            self._hub_down = False
            log.info("the hub at %s answers again", self.settings.api_url)
        return reply

    def _unavailable(self, what: str) -> HubUnavailable:
        if not self._hub_down:
            self._hub_down = True
            log.error(
                "the hub at %s %s: requests get 503 until it answers", self.settings.api_url, what
            )
        return HubUnavailable(
            f"the sandbox service cannot check your token: the hub at {self.settings.api_url} "
            f"{what}. Retry in a moment; if it keeps failing, tell the hub's administrator"
        )

    def _parsed(self, reply: httpx.Response, request: str) -> _HubUser:
        try:
            model: Any = reply.json()
            kind, name = model.get("kind", "user"), model["name"]
            groups = model.get("groups") or []
            scopes = model.get("scopes")
            if not (isinstance(name, str) and isinstance(groups, list)):
                raise TypeError
            if scopes is not None and not isinstance(scopes, list):
                raise TypeError
        except (ValueError, KeyError, TypeError, AttributeError):
            raise self._unavailable(f"gave an answer to {request} that is not a user") from None
        if kind != "user":
            raise Unauthenticated(
                f"this token belongs to the hub {kind} {name!r}, not to a user: send the "
                "JupyterHub API token of the user whose sandboxes these are"
            )
        if not name or len(name) > 255 or not name.isprintable():
            raise Unauthenticated(
                f"the hub user name {name[:64]!r} cannot be used here (empty, longer than "
                "255 characters or not printable): ask the hub's administrator to rename it"
            )
        return _HubUser(
            name,
            frozenset(g for g in groups if isinstance(g, str)),
            model.get("admin") is True,
            None if scopes is None else frozenset(s for s in scopes if isinstance(s, str)),
        )


def _grants_access(user: _HubUser, service_name: str | None) -> bool:
    """Do the token's scopes give access to this service, or to its user's own servers?"""
    wanted = {"access:services", "access:servers", f"access:servers!user={user.name}"}
    if service_name:
        wanted.add(f"access:services!service={service_name}")
    own_server = f"access:servers!server={user.name}/"
    return any(scope in wanted or scope.startswith(own_server) for scope in user.scopes or ())


def _token(authorization: Sequence[str]) -> str:
    """The token of the request's only Authorization header; Unauthenticated otherwise."""
    if not authorization:
        raise Unauthenticated(SEND_TOKEN)
    if len(authorization) > 1:
        raise Unauthenticated(
            f"the request has {len(authorization)} Authorization headers: "
            "send one, `Authorization: token <your JupyterHub API token>`"
        )
    scheme, _, token = authorization[0].strip().partition(" ")
    if scheme.lower() not in _SCHEMES:
        raise Unauthenticated(SEND_TOKEN)
    token = token.strip()
    if not _TOKEN.fullmatch(token):
        raise Unauthenticated(UNKNOWN_TOKEN)
    return token


def open_hub_directory(settings: HubSettings, data_dir: Path, manager: Any) -> HubDirectory:
    """The hub directory of a service whose `manager` has started (its records fill in a
    lost uid file)."""
    known = [(r.user, r.uid) for r in manager.list(include_ended=True)]
    return HubDirectory(settings, HubUids(data_dir / UIDS_FILE, known))
