"""Hub users authenticate to the sandbox service with their JupyterHub tokens.

A real JupyterHub issues and checks the tokens (tests/hub/token_hub.py), a real service
runs `serve --tcp HOST:PORT --hub-auth`, and each user's calls are made by the real
client in a process of its own that has only JUPYTER_SANDBOX_URL and
JUPYTERHUB_API_TOKEN, as a kernel in a Zero to JupyterHub user pod has. Nothing is
mocked. The hub starts no servers, so all but the SSH test (which needs a network
namespace for a user pod of its own) run unprivileged too.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from jupyter_sandbox import ServiceUnavailable
from jupyter_sandbox.service.connections import MAX_PER_USER
from jupyter_sandbox.service.hub_auth import HubUids
from tests.conftest import wait_for
from tests.hub.token_hub import (
    ADMIN,
    CACHE_SECONDS,
    INSTRUCTOR,
    LIMITED,
    LIMITED_GROUP,
    NUMERIC,
    OS_NAMED,
    ROOT,
    HubAuthService,
    TokenHub,
    hub_auth_service,
    requirements,
    start_token_hub,
)
from tests.kernel_fixtures import Kernel

HUB_UID_BASE = 1 << 31
MISSING = "sb-0000000000"


@pytest.fixture(scope="module")
def token_hub() -> Iterator[TokenHub]:
    requirements()
    base = Path(tempfile.mkdtemp(prefix="jsb-tokenhub-"))
    hub = start_token_hub(base)
    try:
        yield hub
    finally:
        hub.stop()
        kept = Path(tempfile.gettempdir()) / f"jupyter-sandbox-tests-{os.getuid()}-tokenhub.log"
        shutil.copy(base / "hub.log", kept)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def service(token_hub: TokenHub) -> Iterator[HubAuthService]:
    with hub_auth_service(token_hub) as started:
        yield started


@pytest.fixture(autouse=True)
def nothing_left(service: HubAuthService, token_hub: TokenHub) -> Iterator[None]:
    """After each test: the hub and the service are up again, and every sandbox the test
    made is ended by the operator, leaving no process, mount or directory."""
    yield
    if token_hub.proc is None:
        token_hub.start()
    if service.proc is None:
        service.start()
    service.clean_up()
    sandboxes = service.storage / "sandboxes"
    wait_for(
        lambda: not sandboxes.exists() or not any(sandboxes.iterdir()),
        20,
        message="the ended sandboxes' directories to go",
    )


def create(service: HubAuthService, token: str, name: str, check: bool = True) -> dict:
    """A sandbox `name` of the token's user that outlives the client process."""
    code = (
        f"sb = Sandbox.create(name={name!r}, timeout='10m')\n"
        "info = sb.info()\n"
        "print(json.dumps({'id': info.id, 'name': info.name, 'user': info.user, 'uid': info.uid}))"
    )
    return service.client(token, code, check=check)


def listed(service: HubAuthService, token: str) -> set[str]:
    return set(service.client(token, "print(json.dumps([s.id for s in Sandbox.list()]))"))


def client_error(service: HubAuthService, token: str | None, code: str) -> dict:
    """The type and message of the error `code` raises in the real client."""
    wrapped = (
        "try:\n"
        + "".join(f"    {line}\n" for line in code.splitlines())
        + "except js.SandboxError as e:\n"
        "    print(json.dumps({'type': type(e).__name__, 'message': str(e)}))\n"
        "else:\n"
        "    print(json.dumps(None))\n"
    )
    return service.client(token, wrapped)


def hub_user_calls(hub: TokenHub, user: str) -> int:
    """How many GET /hub/api/user requests of `user` the hub has logged."""
    return hub.log.count(f"GET /hub/api/user ({user}@")


# -- attacks ---------------------------------------------------------------------------


@pytest.mark.unprivileged
def test_the_token_of_a_hub_service_is_not_a_user(
    service: HubAuthService, token_hub: TokenHub
) -> None:
    """A hub service's token (another service's, the sandbox service's own, the hub
    admin service's) names no user: 401 saying so. Nor is there a --tcp token of the
    service's own that would pass in hub mode."""
    for token in (token_hub.other_token, token_hub.service_token, token_hub.admin_token):
        reply = service.call("GET", "/v1/sandboxes", token)
        assert reply.status_code == 401
        assert "not to a user" in reply.json()["message"]
        assert "the hub service" in reply.json()["message"]
    runtime = json.loads(
        (Path(service.env["JUPYTER_RUNTIME_DIR"]) / "jupyter-sandbox.json").read_text()
    )
    assert runtime["token"] is None
    assert not (service.data_dir / "api-token").exists()
    bearer = {"Authorization": f"Bearer {secrets.token_urlsafe(32)}"}
    assert service.call("GET", "/v1/sandboxes", None, headers=bearer).status_code == 401


@pytest.mark.unprivileged
def test_a_user_named_like_a_number_gets_no_uid_of_that_number(
    service: HubAuthService, token_hub: TokenHub
) -> None:
    """Hub user "0" is not uid 0 (root, an instructor by uid) and sees nobody else's."""
    alice = create(service, token_hub.token("alice"), "hers")
    zero = token_hub.token(NUMERIC)
    usage = service.call("GET", "/v1/usage", zero).json()
    assert usage["user"] == NUMERIC and usage["mode"] == "hub"
    assert usage["uid"] >= HUB_UID_BASE
    assert usage["instructor"] is False
    assert alice["id"] not in listed(service, zero)
    assert service.call("GET", f"/v1/sandboxes/{alice['id']}", zero).status_code == 404
    mine = create(service, zero, "mine")
    assert mine["uid"] == usage["uid"] and mine["user"] == NUMERIC


@pytest.mark.unprivileged
def test_a_user_named_like_an_os_user_gets_none_of_its_sandboxes(
    service: HubAuthService, token_hub: TokenHub
) -> None:
    """The service's own OS user (over its Unix socket) and the hub user of that name
    are two users: the hub user does not see, name or count the OS user's sandbox."""
    made = service.operator("POST", "/v1/sandboxes", json={"name": "os-own", "timeout": "10m"})
    assert made.status_code == 201, made.text
    os_sandbox = made.json()
    token = token_hub.token(OS_NAMED)
    usage = service.call("GET", "/v1/usage", token).json()
    assert usage["user"] == OS_NAMED
    assert usage["uid"] != os_sandbox["uid"] and usage["uid"] >= HUB_UID_BASE
    assert usage["usage"]["sandboxes"] == 0
    assert os_sandbox["id"] not in listed(service, token)
    for ref in (os_sandbox["id"], "os-own"):
        assert service.call("GET", f"/v1/sandboxes/{ref}", token).status_code == 404


def raw_request(
    service: HubAuthService, head: bytes, source: str = "127.0.0.1"
) -> tuple[int, bytes]:
    """Send `head` (a request without a body) from address `source` as is; the status
    and body of the answer."""
    with socket.create_connection(address(service), timeout=30, source_address=(source, 0)) as sock:
        sock.sendall(head)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    status = int(data.split(b" ", 2)[1])
    return status, data.partition(b"\r\n\r\n")[2]


def address(service: HubAuthService) -> tuple[str, int]:
    host, port = service.url.removeprefix("http://").split(":")
    return host, int(port)


@pytest.mark.unprivileged
def test_one_pod_holding_connections_does_not_shut_out_another(
    service: HubAuthService, token_hub: TokenHub
) -> None:
    """Connections are opened before any token is read: each peer address (a user's pod)
    may hold MAX_PER_USER, one more is answered 429 saying what to do, and another
    address is served meanwhile."""
    token = token_hub.token("alice")
    head = (
        f"GET /v1/sandboxes HTTP/1.1\r\nHost: x\r\nAuthorization: token {token}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    held = []
    try:
        for _ in range(MAX_PER_USER):
            held.append(socket.create_connection(address(service), source_address=("127.0.0.3", 0)))
        _, body = wait_for(
            lambda: (answer := raw_request(service, head, "127.0.0.3"))[0] == 429 and answer,
            20,
            message="a connection over the bound to be refused",
        )
        assert "close some" in json.loads(body)["message"]
        assert raw_request(service, head, "127.0.0.4")[0] == 200
    finally:
        for sock in held:
            sock.close()
    wait_for(
        lambda: raw_request(service, head, "127.0.0.3")[0] == 200,
        20,
        message="the address to be served once it holds fewer",
    )


@pytest.mark.unprivileged
def test_malformed_doubled_and_huge_tokens_are_refused_and_the_service_serves_on(
    service: HubAuthService, token_hub: TokenHub
) -> None:
    alice, bob = token_hub.token("alice"), token_hub.token("bob")
    asked = hub_user_calls(token_hub, "alice")
    cases = [
        f"Authorization: token {alice}\r\nAuthorization: token {bob}",  # two users at once
        f"Authorization: token {alice}, token {bob}",
        f"Authorization: token {alice} {bob}",
        f"Authorization: token {'a' * 600}",
        "Authorization: token caf\xe9\xff",
        "Authorization: basic YWxpY2U6cGFzcw==",
        f"Authorization: {alice}",
    ]
    for header in cases:
        head = f"GET /v1/sandboxes HTTP/1.1\r\nHost: x\r\n{header}\r\nConnection: close\r\n\r\n"
        status, body = raw_request(service, head.encode("latin-1"))
        assert status == 401, (header, body)
        assert json.loads(body)["error"] == "PermissionDenied"
    control = b"GET /v1/sandboxes HTTP/1.1\r\nHost: x\r\nAuthorization: token \x7f\x01a\r\n"
    assert raw_request(service, control + b"Connection: close\r\n\r\n")[0] == 400
    huge = b"GET /v1/sandboxes HTTP/1.1\r\nHost: x\r\nAuthorization: token " + b"a" * 100_000
    status, _ = raw_request(service, huge + b"\r\nConnection: close\r\n\r\n")
    assert status in (400, 431)
    assert hub_user_calls(token_hub, "alice") == asked  # none of these reached the hub
    assert service.call("GET", "/v1/sandboxes", alice).status_code == 200
    bearer = {"Authorization": f"Bearer {alice}"}  # the other scheme JupyterHub takes
    assert service.call("GET", "/v1/sandboxes", None, headers=bearer).status_code == 200


# -- scoping ----------------------------------------------------------------------------


@pytest.mark.unprivileged
def test_two_hub_users_each_see_only_their_own_sandboxes(
    service: HubAuthService, token_hub: TokenHub
) -> None:
    alice, bob = token_hub.token("alice"), token_hub.token("bob")
    hers, his = create(service, alice, "work"), create(service, bob, "work")
    assert hers["uid"] != his["uid"]
    assert listed(service, alice) == {hers["id"]}
    assert listed(service, bob) == {his["id"]}
    by_name = service.client(alice, "print(json.dumps(Sandbox.connect('work').info().id))")
    assert by_name == hers["id"]
    for path in ("", "/logs"):  # another's answers exactly like a missing one
        other = service.call("GET", f"/v1/sandboxes/{his['id']}{path}", alice)
        missing = service.call("GET", f"/v1/sandboxes/{MISSING}{path}", alice)
        assert other.status_code == missing.status_code == 404
        assert other.json() == json.loads(missing.text.replace(MISSING, his["id"]))
    error = client_error(service, alice, f"Sandbox.connect({his['id']!r}).sh('true')")
    assert error["type"] == "SandboxNotFound"


@pytest.mark.unprivileged
def test_an_instructor_and_a_hub_admin_see_both_and_act_on_the_record(
    service: HubAuthService, token_hub: TokenHub
) -> None:
    """A member of the instructor group and a hub admin see every user's sandbox; what
    they do in a student's sandbox is in that sandbox's log for the student to read."""
    hers = create(service, token_hub.token("alice"), "work")
    his = create(service, token_hub.token("bob"), "work")
    for user in (INSTRUCTOR, ADMIN):
        token = token_hub.token(user)
        assert service.call("GET", "/v1/usage", token).json()["instructor"] is True
        assert {hers["id"], his["id"]} <= listed(service, token)
    service.client(
        token_hub.token(INSTRUCTOR), f"Sandbox.connect({hers['id']!r}).sh('true'); print(1)"
    )
    reply = service.call(
        "POST",
        f"/v1/sandboxes/{his['id']}/timeout",
        token_hub.token(ADMIN),
        json={"timeout": "20m"},
        headers={"X-Sandbox-Acting-For": "the-dashboard-user"},
    )
    assert reply.status_code == 200, reply.text
    alices_log = service.client(
        token_hub.token("alice"),
        "print(json.dumps([e.text for e in Sandbox.connect('work').logs()]))",
    )
    assert any(f"instructor {INSTRUCTOR}:" in line and "true" in line for line in alices_log)
    bobs_log = [
        json.loads(line)["text"]
        for line in service.call(
            "GET", f"/v1/sandboxes/{his['id']}/logs", token_hub.token("bob")
        ).text.splitlines()
    ]
    assert any(f"the-dashboard-user (via {ADMIN})" in line for line in bobs_log), bobs_log
    usage = service.call("GET", "/v1/usage", token_hub.token(INSTRUCTOR), params={"user": "alice"})
    assert usage.json()["user"] == "alice" and usage.json()["usage"]["sandboxes"] == 1
    refused = service.call("GET", "/v1/usage", token_hub.token("bob"), params={"user": "alice"})
    assert refused.status_code == 403
    nobody = service.call("GET", "/v1/usage", token_hub.token(ADMIN), params={"user": "nobody"})
    assert nobody.status_code == 400 and "the hub has no user named" in nobody.json()["message"]


@pytest.mark.unprivileged
def test_quotas_of_a_hub_group_apply(service: HubAuthService, token_hub: TokenHub) -> None:
    """The config file's [quota.group.limited] holds for the hub group "limited"; other
    users get the default quota."""
    dave = token_hub.token(LIMITED)
    create(service, dave, "first")
    error = client_error(service, dave, "Sandbox.create(name='second', timeout='10m')")
    assert error["type"] == "QuotaExceeded"
    assert f'group "{LIMITED_GROUP}"' in error["message"], error
    alice = token_hub.token("alice")
    create(service, alice, "first")
    create(service, alice, "second")


# -- tokens and the hub --------------------------------------------------------------------


@pytest.mark.unprivileged
def test_a_burst_of_calls_with_one_new_token_asks_the_hub_once(
    service: HubAuthService, token_hub: TokenHub
) -> None:
    token, _ = token_hub.new_token("bob")
    before = hub_user_calls(token_hub, "bob")
    with ThreadPoolExecutor(20) as pool:
        replies = list(pool.map(lambda _: service.call("GET", "/v1/usage", token), range(40)))
    assert {r.status_code for r in replies} == {200}
    wait_for(lambda: hub_user_calls(token_hub, "bob") > before, 10, message="the hub's log")
    assert hub_user_calls(token_hub, "bob") == before + 1


@pytest.mark.unprivileged
def test_a_revoked_token_stops_working_within_the_cache_time(
    service: HubAuthService, token_hub: TokenHub
) -> None:
    token, token_id = token_hub.new_token("alice")
    assert service.call("GET", "/v1/sandboxes", token).status_code == 200
    token_hub.revoke("alice", token_id)
    revoked = time.monotonic()
    wait_for(
        lambda: service.call("GET", "/v1/sandboxes", token).status_code == 401,
        CACHE_SECONDS + 5,
        interval=0.1,
        message="the revoked token to be refused",
    )
    assert time.monotonic() - revoked <= CACHE_SECONDS + 1.0
    reply = service.call("GET", "/v1/sandboxes", token)
    assert "the hub does not know this token" in reply.json()["message"]


class Stream:
    """A stream at `path` read with `token` in a thread of its own until it ends."""

    def __init__(self, service: HubAuthService, token: str, path: str) -> None:
        self.url, self.token, self.status = service.url + path, token, None
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        headers = {"Authorization": f"token {self.token}"}
        timeout = httpx.Timeout(30, read=None)
        with (
            contextlib.suppress(httpx.HTTPError),
            httpx.stream("GET", self.url, headers=headers, timeout=timeout) as reply,
        ):
            self.status = reply.status_code
            for _ in reply.iter_raw():
                pass

    @property
    def open(self) -> bool:
        return self.thread.is_alive()


@pytest.mark.unprivileged
def test_a_revoked_token_ends_the_streams_it_holds_open(
    service: HubAuthService, token_hub: TokenHub
) -> None:
    """A followed log and the event feed, opened with a token the hub then revokes, end
    within twice the cache time; the same streams of a token still good stay open."""
    token, token_id = token_hub.new_token("alice")
    other, other_id = token_hub.new_token("alice")
    hers = create(service, token_hub.token("alice"), "followed")
    paths = ("/v1/events", f"/v1/sandboxes/{hers['id']}/logs?follow=1")
    doomed = [Stream(service, token, path) for path in paths]
    kept = [Stream(service, other, path) for path in paths]
    try:
        wait_for(lambda: all(s.status == 200 for s in doomed + kept), 10, message="streams")
        token_hub.revoke("alice", token_id)
        revoked = time.monotonic()
        wait_for(
            lambda: not any(s.open for s in doomed),
            2 * CACHE_SECONDS + 5,
            interval=0.1,
            message="the revoked token's streams to end",
        )
        assert time.monotonic() - revoked <= 2 * CACHE_SECONDS + 1.5
        assert all(s.open for s in kept)
    finally:
        token_hub.revoke("alice", other_id)  # which ends the other streams too
        wait_for(lambda: not any(s.open for s in kept), 2 * CACHE_SECONDS + 5, message="the rest")
    assert "the hub no longer knows its token" in service.log


@pytest.mark.unprivileged
def test_no_token_and_a_wrong_token_get_401_saying_what_to_check(
    service: HubAuthService,
) -> None:
    reply = service.call("GET", "/v1/sandboxes", None)
    assert reply.status_code == 401
    assert "Authorization: token" in reply.json()["message"]
    error = client_error(service, None, "Sandbox.list()")
    assert error["type"] == "PermissionDenied"
    assert "Authorization: token" in error["message"]
    assert "set JUPYTERHUB_API_TOKEN" in error["message"]
    error = client_error(service, "0123456789abcdef" * 2, "Sandbox.list()")
    assert error["type"] == "PermissionDenied"
    assert "the hub does not know this token" in error["message"]
    assert "$JUPYTERHUB_API_TOKEN" in error["message"]


@pytest.mark.unprivileged
def test_with_the_hub_stopped_calls_get_503_and_work_again_once_it_is_back(
    service: HubAuthService, token_hub: TokenHub
) -> None:
    fresh, _ = token_hub.new_token("bob")  # never shown to the service: not cached
    known = token_hub.token("alice")
    assert service.call("GET", "/v1/sandboxes", known).status_code == 200
    token_hub.stop()
    reply = service.call("GET", "/v1/sandboxes", fresh)
    assert reply.status_code == 503
    message = reply.json()["message"]
    assert token_hub.api_url in message and "Retry" in message
    error = client_error(service, fresh, "Sandbox.list()")
    assert error["type"] == "ServiceUnavailable" and token_hub.api_url in error["message"]
    assert service.operator("GET", "/v1/status").status_code == 200  # the service serves on
    token_hub.start()
    wait_for(
        lambda: service.call("GET", "/v1/sandboxes", fresh).status_code == 200,
        30,
        message="the token to work once the hub is back",
    )
    assert "answers again" in service.log


@pytest.mark.unprivileged
def test_no_token_is_ever_logged(service: HubAuthService, token_hub: TokenHub) -> None:
    """Not a good one, a wrong one, one the hub could not be asked about, nor one sent in
    a header the HTTP parser refuses (too long, or with a control character after it)."""
    good, _ = token_hub.new_token("alice")
    wrong, unasked = "f00d" * 8, "beef" * 8
    assert service.call("GET", "/v1/sandboxes", good).status_code == 200
    assert service.call("GET", "/v1/sandboxes", wrong).status_code == 401
    for after in (b"\x01", b"a" * 9000):
        head = b"GET /v1/sandboxes HTTP/1.1\r\nHost: x\r\nAuthorization: token "
        head += good.encode() + after + b"\r\nConnection: close\r\n\r\n"
        assert raw_request(service, head)[0] == 400
    token_hub.stop()
    assert service.call("GET", "/v1/sandboxes", unasked).status_code == 503
    token_hub.start()
    log = service.log
    assert "the hub at" in log and "not valid HTTP" in log  # what happened is logged
    issued = [token for token, _ in token_hub.tokens.values()]
    for token in (good, wrong, unasked, token_hub.service_token, *issued):
        assert token not in log


@pytest.mark.unprivileged
def test_each_hub_user_keeps_its_uid_and_sandboxes_across_restarts(
    service: HubAuthService, token_hub: TokenHub
) -> None:
    """The uid of each hub user is on disk before it is used: a restarted service gives
    alice the same uid and her sandbox; with the file damaged, the sandboxes' records
    give every user with a sandbox theirs back, and a user new to the service gets a uid
    none of them has."""
    alice, bob = token_hub.token("alice"), token_hub.token("bob")
    hers, his = create(service, alice, "kept"), create(service, bob, "his")
    service.stop()
    service.start()
    again = service.call("GET", "/v1/usage", alice).json()
    assert again["uid"] == hers["uid"]
    assert listed(service, alice) == {hers["id"]}
    assert hers["id"] not in listed(service, bob)
    service.stop()
    uids_file = service.data_dir / "hub-uids.json"
    uids_file.write_text("{damaged")
    service.start()
    assert service.call("GET", "/v1/usage", alice).json()["uid"] == hers["uid"]
    assert listed(service, alice) == {hers["id"]}
    newcomer = service.call("GET", "/v1/usage", token_hub.token(LIMITED)).json()["uid"]
    assert newcomer not in (hers["uid"], his["uid"])
    assert service.call("GET", "/v1/usage", bob).json()["uid"] == his["uid"]
    assert list(service.data_dir.glob("hub-uids.json.damaged-*"))
    assert "cannot be read" in service.log
    service.stop()  # a file that gives alice root's uid is no better than a damaged one
    uids_file.write_text(json.dumps({"uids": {"alice": 0}}))
    service.start()
    assert service.call("GET", "/v1/usage", alice).json()["uid"] == hers["uid"]
    assert "outside the range of hub users" in service.log


@pytest.mark.unprivileged
def test_serve_says_what_to_set_and_takes_hub_mode_from_the_environment(
    token_hub: TokenHub, tmp_path: Path
) -> None:
    """Without JUPYTERHUB_API_URL, or without --tcp, `serve --hub-auth` does not start
    and says what to set; JUPYTER_SANDBOX_AUTH=hub alone is hub mode, also in the
    service its supervisor starts (which gets no credential but its own hub token)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JUPYTERHUB_")}
    env.update(JUPYTER_RUNTIME_DIR=str(tmp_path / "rt"), JUPYTER_DATA_DIR=str(tmp_path / "d"))
    serve = [sys.executable, "-m", "jupyter_sandbox", "serve"]
    expected = {
        "--tcp 127.0.0.1:0 --hub-auth": "needs JUPYTERHUB_API_URL",
        "--hub-auth": "use `serve --tcp HOST:PORT --hub-auth`",
    }
    for args, says in expected.items():
        done = subprocess.run(
            [*serve, *args.split()], env=env, capture_output=True, text=True, timeout=60
        )
        assert done.returncode != 0 and says in done.stderr, done.stderr
    with hub_auth_service(token_hub, flag=False, JUPYTER_SANDBOX_AUTH="hub") as service:
        assert "Authorization: token" in service.call("GET", "/v1/usage", None).json()["message"]
        reply = service.call("GET", "/v1/usage", token_hub.token(ADMIN), params={"user": "bob"})
        assert reply.status_code == 200 and reply.json()["user"] == "bob"  # its own hub token


# -- SSH ----------------------------------------------------------------------------------


@contextlib.contextmanager
def another_pod() -> Iterator[tuple[str, str]]:
    """A network namespace joined to this one by a veth pair, as a user pod is to the
    gateway's: (the namespace, the gateway side's address). Root only."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("a network namespace of its own needs root and iproute2")
    tag = f"{os.getpid() % 100000}"
    ns, outside, inside = f"jsbpod{tag}", f"jsbh{tag}", f"jsbp{tag}"
    subnet = f"10.{200 + os.getpid() % 50}.{os.getpid() % 250}"
    steps = [
        ["ip", "netns", "add", ns],
        ["ip", "link", "add", outside, "type", "veth", "peer", "name", inside],
        ["ip", "link", "set", inside, "netns", ns],
        ["ip", "addr", "add", f"{subnet}.1/30", "dev", outside],
        ["ip", "link", "set", outside, "up"],
        ["ip", "netns", "exec", ns, "ip", "addr", "add", f"{subnet}.2/30", "dev", inside],
        ["ip", "netns", "exec", ns, "ip", "link", "set", inside, "up"],
    ]
    try:
        for step in steps:
            subprocess.run(step, check=True, capture_output=True, timeout=30)
        yield ns, f"{subnet}.1"
    finally:
        subprocess.run(["ip", "link", "del", outside], capture_output=True, timeout=30)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


def ssh_argv(access: dict, known_hosts: Path) -> list[str]:
    return [
        "ssh",
        *("-o", f"UserKnownHostsFile={known_hosts}", "-o", "StrictHostKeyChecking=yes"),
        *("-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-o", "IdentityFile=/dev/null"),
        *("-p", str(access["port"]), f"{access['username']}@{access['hostname']}"),
    ]


def test_a_hub_users_ssh_token_works_from_another_pod_not_from_the_gateways_own(
    token_hub: TokenHub, tmp_path: Path
) -> None:
    """expose_ssh gives a hub user a token issued to their uid. From another network
    namespace (a user pod) it logs in; from the gateway's own machine, where no local
    user is a hub user, it is refused with a banner saying where to use it."""
    with (
        another_pod() as (ns, address),
        hub_auth_service(token_hub, JUPYTER_SANDBOX_SSH_HOST=address) as service,
    ):
        alice = token_hub.token("alice")
        code = (
            "sb = Sandbox.create(name='remote', timeout='10m')\n"
            "a = sb.expose_ssh()\n"
            "print(json.dumps({'id': sb.id, 'uid': sb.info().uid, 'username': a.username,"
            " 'hostname': a.hostname, 'port': a.port, 'known': a.known_hosts_line}))"
        )
        access = service.client(alice, code)
        assert access["hostname"] == address
        known_hosts = tmp_path / "known_hosts"
        known_hosts.write_text(access["known"] + "\n")
        argv = [*ssh_argv(access, known_hosts), "hostname"]
        remote = subprocess.run(
            ["ip", "netns", "exec", ns, *argv], capture_output=True, text=True, timeout=60
        )
        assert remote.returncode == 0, remote.stderr
        assert remote.stdout.strip() == access["id"]
        local = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        assert local.returncode != 0
        assert "issued to a JupyterHub user" in local.stderr
        assert f"issued to uid {access['uid']}" in service.log


@pytest.mark.unprivileged
def test_the_magics_in_a_kernel_work_as_the_hub_user(
    service: HubAuthService, token_hub: TokenHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A kernel of alice's notebook server (JUPYTER_SANDBOX_URL and her
    JUPYTERHUB_API_TOKEN, nothing else) runs `%%sandbox` cells and `%sandbox_ssh` in a
    sandbox that is hers: bob does not see it."""
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "kernel-runtime"))
    for name in ("JUPYTER_SANDBOX_TOKEN", "JUPYTER_SANDBOX_MODE"):
        monkeypatch.delenv(name, raising=False)
    env = {"JUPYTER_SANDBOX_URL": service.url, "JUPYTERHUB_API_TOKEN": token_hub.token("alice")}
    kernel = Kernel(env)
    try:
        assert kernel.ok("%%sandbox\necho hello from $(hostname)").stdout.startswith(
            "hello from sb-"
        )
        shown = kernel.ok("%sandbox_ssh")
        assert "ssh" in " ".join(o.text for o in shown.outputs)
        [sandbox] = [s for s in service.sandboxes() if s["user"] == "alice"]
        assert sandbox["uid"] >= HUB_UID_BASE
        assert sandbox["id"] not in listed(service, token_hub.token("bob"))
    finally:
        kernel.shutdown()


@pytest.mark.unprivileged
def test_the_cli_works_as_the_hub_user(service: HubAuthService, token_hub: TokenHub) -> None:
    """`jupyter-sandbox usage` and `list` in a user pod (only JUPYTER_SANDBOX_URL and the
    hub token) speak for that hub user."""
    hers = create(service, token_hub.token("alice"), "alices-own")
    create(service, token_hub.token("bob"), "bobs-own")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JUPYTER", "PYTHON"))}
    env.update(
        PYTHONPATH=str(ROOT),
        JUPYTER_SANDBOX_URL=service.url,
        JUPYTERHUB_API_TOKEN=token_hub.token("alice"),
    )

    def cli(*args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "jupyter_sandbox", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    usage = cli("usage")
    assert f"user alice (uid {hers['uid']}), on the hub's sandbox service" in usage
    listing = cli("list")
    assert "alices-own" in listing and "bobs-own" not in listing


# -- the kubernetes backend ----------------------------------------------------------------


def test_hub_users_on_the_kubernetes_backend(token_hub: TokenHub, tmp_path: Path) -> None:
    """As deployed under Zero to JupyterHub: the service on the kubernetes backend (the
    fake cluster of tests/kube, the only mocked part) with hub authentication. Each hub
    user's sandbox is a pod of its own, seen by its user and the instructor only, and the
    hub group's quota holds. Root only: the fake kubelet runs pods in bubblewrap as uid
    1000."""
    if os.geteuid() != 0:
        pytest.skip("the fake kubelet runs pods as uid 1000, which needs root")
    pytest.importorskip("kubernetes_asyncio")
    from tests.kube.conftest import running_fake_cluster

    with (
        running_fake_cluster(tmp_path / "cluster") as cluster,
        hub_auth_service(
            token_hub,
            JUPYTER_SANDBOX_BACKEND="kubernetes",
            KUBECONFIG=str(cluster.kubeconfig),
            JUPYTER_SANDBOX_K8S_NAMESPACE=cluster.namespace,
            JUPYTER_SANDBOX_K8S_START_TIMEOUT="30",
            JUPYTER_SANDBOX_DEFAULT_CPUS="0.25",
        ) as service,
    ):
        alice, dave = token_hub.token("alice"), token_hub.token(LIMITED)
        hers = create(service, alice, "in-a-pod")
        ran = service.client(
            alice, "print(json.dumps(Sandbox.connect('in-a-pod').sh('hostname').stdout))"
        )
        assert ran.strip() == hers["id"]
        pods = {
            p["metadata"]["labels"]["jupyter-sandbox.io/sandbox"]
            for p in cluster.objects("pods", cluster.namespace)
        }
        assert hers["id"] in pods
        assert hers["id"] not in listed(service, token_hub.token("bob"))
        assert hers["id"] in listed(service, token_hub.token(INSTRUCTOR))
        create(service, dave, "one")
        error = client_error(service, dave, "Sandbox.create(name='two', timeout='10m')")
        assert error["type"] == "QuotaExceeded"
        service.clean_up()
        wait_for(lambda: not cluster.objects("pods", cluster.namespace), 30, message="pods to go")


def test_a_full_disk_gives_a_new_hub_user_no_uid_and_loses_none(tmp_path: Path) -> None:
    """The uid file on a filesystem with no room left: a user new to the service gets
    ServiceUnavailable saying where and what to do, the uids already given out stay as
    they were on disk, and once there is room the new user gets the next uid. Root only
    (a small tmpfs of its own)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)], check=True)
    try:
        uids = HubUids(disk / "hub-uids.json")
        first = asyncio.run(uids.uid("alice"))
        saved = (disk / "hub-uids.json").read_bytes()
        filler = disk / "filler"
        with contextlib.suppress(OSError), open(filler, "wb") as f:
            while True:
                f.write(b"x" * 4096)
                f.flush()
        with pytest.raises(ServiceUnavailable) as refused:
            asyncio.run(uids.uid("bob"))
        assert str(disk / "hub-uids.json") in str(refused.value)
        assert "free space there" in str(refused.value)
        assert (disk / "hub-uids.json").read_bytes() == saved
        assert sorted(p.name for p in disk.iterdir()) == ["filler", "hub-uids.json"]
        filler.unlink()
        assert asyncio.run(uids.uid("bob")) == first + 1
        again = HubUids(disk / "hub-uids.json")  # as a restarted service reads them
        assert [asyncio.run(again.uid(name)) for name in ("alice", "bob")] == [first, first + 1]
    finally:
        subprocess.run(["umount", str(disk)], check=True)
