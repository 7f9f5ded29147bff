"""Students and an instructor under a real JupyterHub, with the system sandbox service.

Each student's server runs as that student (LocalProcessSpawner); everything is driven
through the hub's URL: kernels through ``/user/<name>/api/kernels``, the panel's API
through ``/user/<name>/sandbox/api/``, SSH through the ``/user/<name>/`` tunnel, the
dashboard at ``/services/sandboxes/``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest

from tests.conftest import UNPINNED_SSH, sandbox_pids, wait_for
from tests.hub_fixtures import (
    HUB_ADMIN,
    HUB_TA,
    LEASE_TTL,
    Hub,
    OsUser,
    UserServer,
    as_root,
    system_sandboxes,
    wait_no_sandboxes,
)

LOAD = "%load_ext jupyter_sandbox"


@contextmanager
def notebook(hub: Hub, user: OsUser) -> Iterator[tuple[UserServer, str]]:
    """A kernel in `user`'s server with the magics loaded; shut down afterwards."""
    server = hub.server(user)
    kernel = server.start_kernel()
    try:
        reply = server.run_cell(kernel, LOAD)
        assert reply["reply"]["status"] == "ok", reply
        yield server, kernel
    finally:
        server.api("DELETE", f"api/kernels/{kernel}")


def sandbox_cell(server: UserServer, kernel: str, name: str, body: str, opts: str = "") -> str:
    """Run a ``%%sandbox`` cell; its stdout."""
    reply = server.run_cell(kernel, f"%%sandbox {name} {opts}\n{body}")
    assert reply["reply"]["status"] == "ok", reply
    return reply["stdout"]


def sandbox_id(server: UserServer, kernel: str, name: str, opts: str = "") -> str:
    return sandbox_cell(server, kernel, name, "hostname", opts).strip().splitlines()[-1]


def ssh_via_tunnel(url: str, token: str, ssh_token: str, target: str, command: str) -> Any:
    """The real ``ssh`` with ``jupyter-sandbox tunnel`` through `url` as its ProxyCommand."""
    proxy = f"{sys.executable} -m jupyter_sandbox.cli.tunnel --url {url} %h"
    return subprocess.run(
        ["ssh", *UNPINNED_SSH, "-o", f"ProxyCommand={proxy}", f"{ssh_token}@{target}", command],
        env={**os.environ, "JUPYTER_TOKEN": token},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_every_student_runs_a_sandbox_cell_as_themselves(hub: Hub) -> None:
    ids = {}
    hub.start_servers(*hub.students)
    with (
        notebook(hub, hub.students[0]) as (s0, k0),
        notebook(hub, hub.students[1]) as (s1, k1),
        notebook(hub, hub.students[2]) as (s2, k2),
    ):
        for user, server, kernel in zip(hub.students, (s0, s1, s2), (k0, k1, k2), strict=True):
            out = sandbox_cell(server, kernel, "work", f"echo hello from {user.name}; hostname")
            assert f"hello from {user.name}" in out
            ids[user.name] = out.strip().splitlines()[-1]
        listed = {s["id"]: s for s in system_sandboxes(hub.service)}
        for user in hub.students:
            record = listed[ids[user.name]]
            assert (record["user"], record["uid"]) == (user.name, user.uid)
    # The kernels' shutdown ended their session sandboxes.
    wait_no_sandboxes(hub.service)


def test_students_are_isolated(hub: Hub) -> None:
    alice, bob = hub.students[0], hub.students[1]
    with notebook(hub, alice) as (a, ka), notebook(hub, bob) as (b, kb):
        alice_box = sandbox_id(a, ka, "mine")
        bob_box = sandbox_id(b, kb, "mine")
        # Bob's panel lists only his own; Alice's sandbox is unknown to him...
        listed = b.api("GET", "sandbox/api/sandboxes").json()["sandboxes"]
        assert [s["id"] for s in listed] == [bob_box]
        for method, path in (
            ("GET", f"sandbox/api/sandboxes/{alice_box}"),
            ("DELETE", f"sandbox/api/sandboxes/{alice_box}"),
            ("POST", f"sandbox/api/sandboxes/{alice_box}/ssh"),
        ):
            reply = b.api(method, path, json={} if method == "POST" else None)
            assert reply.status_code == 404, (method, path, reply.text)
        # ...and to his kernel's client, exactly like an id that never existed.
        probe = b.run_cell(
            kb,
            "from jupyter_sandbox import Sandbox\n"
            f"for ref in ({alice_box!r}, 'sb-never-was'):\n"
            "    try:\n        Sandbox.connect(ref).kill()\n"
            "    except Exception as e:\n        print(type(e).__name__)\n",
        )
        assert probe["stdout"].split() == ["SandboxNotFound", "SandboxNotFound"], probe
        # Alice's sandbox is untouched.
        assert sandbox_cell(a, ka, "mine", "echo still here").strip() == "still here"
    wait_no_sandboxes(hub.service)


def test_panel_api_through_the_hub(hub: Hub) -> None:
    student = hub.students[0]
    server = hub.server(student)
    created = server.api("POST", "sandbox/api/sandboxes", json={"name": "panel", "timeout": "5m"})
    assert created.status_code == 201, created.text
    box = created.json()
    try:
        assert box["user"] == student.name
        listed = server.api("GET", "sandbox/api/sandboxes").json()["sandboxes"]
        assert [s["id"] for s in listed] == [box["id"]]
        extended = server.api(
            "POST", f"sandbox/api/sandboxes/{box['id']}/timeout", json={"timeout": "20m"}
        ).json()
        assert extended["expires_at"] - time.time() > 19 * 60
    finally:
        killed = server.api("DELETE", f"sandbox/api/sandboxes/{box['id']}")
    assert killed.status_code == 204, killed.text
    assert not system_sandboxes(hub.service)


def test_ssh_through_the_hub_url(hub: Hub) -> None:
    student = hub.students[1]
    server = hub.server(student)
    box = server.api("POST", "sandbox/api/sandboxes", json={"timeout": "5m"}).json()
    try:
        access = server.api("POST", f"sandbox/api/sandboxes/{box['id']}/ssh", json={}).json()
        result = ssh_via_tunnel(server.url, server.token, access["token"], box["id"], "hostname")
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == box["id"]
    finally:
        server.api("DELETE", f"sandbox/api/sandboxes/{box['id']}")


def test_a_students_token_does_not_work_for_another_over_loopback(hub: Hub) -> None:
    alice, bob = hub.students[0], hub.students[2]
    a, b = hub.server(alice), hub.server(bob)
    box = a.api("POST", "sandbox/api/sandboxes", json={"timeout": "5m"}).json()
    try:
        access = a.api("POST", f"sandbox/api/sandboxes/{box['id']}/ssh", json={}).json()
        direct = ["ssh", *UNPINNED_SSH, "-p", str(access["port"])]
        target = f"{access['token']}@127.0.0.1"

        def ssh_as(user: OsUser) -> subprocess.CompletedProcess:
            return subprocess.run(
                ["runuser", "-u", user.name, "--", *direct, target, "hostname"],
                capture_output=True,
                text=True,
                timeout=60,
            )

        # Bob read Alice's token (say from `ps`): over loopback it is refused for him...
        stolen = ssh_as(bob)
        assert stolen.returncode != 0 and box["id"] not in stolen.stdout
        # ...also through his own server's tunnel (a loopback peer of his uid)...
        tunneled = ssh_via_tunnel(b.url, b.token, access["token"], box["id"], "hostname")
        assert tunneled.returncode != 0 and box["id"] not in tunneled.stdout
        # ...while it works for Alice, directly and through her server.
        assert ssh_as(alice).stdout.strip() == box["id"]
        mine = ssh_via_tunnel(a.url, a.token, access["token"], box["id"], "hostname")
        assert mine.stdout.strip() == box["id"], mine.stderr
    finally:
        a.api("DELETE", f"sandbox/api/sandboxes/{box['id']}")


def test_stopping_a_server_from_the_hub_ends_its_sandboxes_by_lease(hub: Hub) -> None:
    """The hub's SIGINT makes Jupyter Server exit without shutting kernels down: the
    kernel's session sandbox ends when its lease lapses, bounded and without a leak."""
    student = hub.students[2]
    server = hub.server(student)
    kernel = server.start_kernel()
    assert server.run_cell(kernel, LOAD)["reply"]["status"] == "ok"
    box = sandbox_id(server, kernel, "left")
    assert box in {s["id"] for s in system_sandboxes(hub.service)}
    hub.stop_server(student)  # waits until none of the student's processes is left
    stopped_at = time.time()
    # Nothing renews the lease once the student's processes are gone: the sandbox ends
    # within one lease TTL (plus the reaper's half-second round and this poll).
    wait_for(
        lambda: box not in {s["id"] for s in system_sandboxes(hub.service)},
        LEASE_TTL + 2,
        message="the orphaned session sandbox to end by lease",
    )
    ended = _info_as_root(hub, box)
    assert ended["status"] == "ended" and "lease" in (ended["end_reason"] or ""), ended
    assert ended["ended_at"] - stopped_at <= LEASE_TTL + 1, ended


def _info_as_root(hub: Hub, box: str) -> dict[str, Any]:
    listed = as_root(hub.service, "GET", "/v1/sandboxes", params={"all": "1"}).json()
    return next(s for s in listed["sandboxes"] if s["id"] == box)


# -- the instructor dashboard ------------------------------------------------------------


def dashboard_login(hub: Hub, user: OsUser) -> tuple[httpx.Client, httpx.Response]:
    """`user` logged in to the hub and then to the dashboard (through the hub's OAuth):
    the session and the dashboard page's answer."""
    session = hub.login(user)
    return session, session.get("/services/sandboxes/")


def xsrf_headers(session: httpx.Client) -> dict[str, str]:
    return {"X-XSRFToken": session.cookies.get("_xsrf", path="/services/sandboxes/") or ""}


def test_dashboard_as_an_instructor(hub: Hub) -> None:
    student = hub.students[0]
    with notebook(hub, student) as (server, kernel):
        box = sandbox_id(server, kernel, "lab1", "--timeout 5m")
        teacher, page = dashboard_login(hub, hub.instructor)
        assert page.status_code == 200, page.text[:500]
        assert "instructor dashboard" in page.text and hub.instructor.name in page.text
        assert hub.admin_token not in page.text and "token=" not in str(page.url)

        listed = teacher.get("/services/sandboxes/api/sandboxes").json()["sandboxes"]
        row = next(s for s in listed if s["id"] == box)
        assert row["user"] == student.name and "usage" in row

        # A POST without the XSRF token is refused; with it, time is added.
        before = row["expires_at"]
        path = f"/services/sandboxes/api/sandboxes/{box}/extend"
        assert teacher.post(path, json={"add": "10m"}).status_code == 403
        extended = teacher.post(path, json={"add": "10m"}, headers=xsrf_headers(teacher))
        assert extended.status_code == 200, extended.text
        assert extended.json()["expires_at"] - before >= 599

        # The student sees who did it, in the sandbox's own log.
        shown = server.run_cell(
            kernel,
            "from jupyter_sandbox import Sandbox\n"
            f"print('\\n'.join(e.text for e in Sandbox.connect({box!r}).logs()))",
        )
        audit = [line for line in shown["stdout"].splitlines() if "instructor" in line]
        assert any(hub.instructor.name in line and "extended" in line for line in audit), shown

        killed = teacher.delete(
            f"/services/sandboxes/api/sandboxes/{box}", headers=xsrf_headers(teacher)
        )
        assert killed.status_code == 200, killed.text
        assert box not in {s["id"] for s in system_sandboxes(hub.service)}


def test_dashboard_restarts_a_failed_sandbox(hub: Hub) -> None:
    student = hub.students[2]
    server = hub.server(student)
    box = server.api("POST", "sandbox/api/sandboxes", json={"timeout": "5m"}).json()["id"]
    try:
        server.api("POST", f"sandbox/api/sandboxes/{box}/ssh", json={})  # something to keep
        os.kill(sandbox_pids(hub.service.storage, box)["agent"], signal.SIGKILL)
        teacher, _ = dashboard_login(hub, hub.instructor)
        listed = "/services/sandboxes/api/sandboxes"

        def status() -> str:
            reply = teacher.get(listed)
            assert reply.status_code == 200, reply.text
            return next(s["status"] for s in reply.json()["sandboxes"] if s["id"] == box)

        wait_for(lambda: status() == "failed", 20, message="the sandbox to fail")
        restarted = teacher.post(
            f"/services/sandboxes/api/sandboxes/{box}/restart", headers=xsrf_headers(teacher)
        )
        assert restarted.status_code == 200, restarted.text
        assert status() == "running"
        # The student's own server sees it running again, and who restarted it.
        mine = server.api("GET", f"sandbox/api/sandboxes/{box}").json()
        assert mine["status"] == "running"
        log = _log_as_root(hub, box)
        assert any(hub.instructor.name in line and "restart" in line for line in log), log
    finally:
        server.api("DELETE", f"sandbox/api/sandboxes/{box}")


def _log_as_root(hub: Hub, box: str) -> list[str]:
    lines = as_root(hub.service, "GET", f"/v1/sandboxes/{box}/logs").text.splitlines()
    return [json.loads(line)["text"] for line in lines if line]


def test_dashboard_refuses_a_student(hub: Hub) -> None:
    student, page = dashboard_login(hub, hub.students[1])
    assert page.status_code == 403
    assert "not an instructor" in page.text and hub.instructor_group in page.text
    api = student.get("/services/sandboxes/api/sandboxes")
    assert api.status_code == 403 and "not an instructor" in api.json()["message"]
    # A student's API token is refused too, and so is the tunnel.
    token = hub.token(hub.students[1])
    dashboard = f"{hub.url}/services/sandboxes/"
    reply = httpx.get(f"{dashboard}api/sandboxes", headers=auth(token))
    assert reply.status_code == 403
    tunnel = subprocess.run(
        [sys.executable, "-m", "jupyter_sandbox.cli.tunnel", "--url", dashboard, "sb-any"],
        env={**os.environ, "JUPYTER_TOKEN": token},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert tunnel.returncode == 1 and "not authenticated" in tunnel.stderr, tunnel.stderr


@pytest.mark.parametrize("name", [HUB_ADMIN, HUB_TA])
def test_dashboard_admits_hub_admins_and_instructor_roles(hub: Hub, name: str) -> None:
    """A hub admin, and a hub user holding the --instructor-role, neither of them an OS
    user nor in the instructor group."""
    token = hub.api("POST", f"users/{name}/tokens", json={"note": "hub tests"})["token"]
    reply = httpx.get(f"{hub.url}/services/sandboxes/api/sandboxes", headers=auth(token))
    assert reply.status_code == 200, reply.text
    assert reply.json()["acting_as"] == name


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"token {token}"}


def test_dashboard_terminal_through_the_hub(hub: Hub) -> None:
    """An instructor's terminal: a one-connection credential from the dashboard, used by
    the real ssh through the dashboard's tunnel at /services/sandboxes/."""
    student = hub.students[1]
    server = hub.server(student)
    box = server.api("POST", "sandbox/api/sandboxes", json={"timeout": "5m"}).json()
    try:
        token = hub.token(hub.instructor)
        auth = {"Authorization": f"token {token}"}
        access = httpx.post(
            f"{hub.url}/services/sandboxes/api/sandboxes/{box['id']}/ssh", headers=auth
        )
        assert access.status_code == 200, access.text
        result = ssh_via_tunnel(
            f"{hub.url}/services/sandboxes/", token, access.json()["token"], box["id"], "hostname"
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == box["id"]
    finally:
        server.api("DELETE", f"sandbox/api/sandboxes/{box['id']}")


@pytest.fixture(autouse=True)
def _hub_is_up(hub: Hub) -> None:
    assert hub.proc.poll() is None, hub.log[-3000:]
