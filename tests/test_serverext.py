"""The server extension's endpoints through pytest-jupyter (base_url ``/a%40b/``)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from serverext_fixtures import jp_environ, jp_server_config, until  # noqa: F401
from tornado.httpclient import HTTPClientError
from tornado.websocket import WebSocketClientConnection

from jupyter_sandbox import AsyncSandbox, SandboxExpired, SandboxNotFound
from jupyter_sandbox.client import AsyncFileSystem
from tests.conftest import UNPINNED_SSH

pytest_plugins = ["pytest_jupyter.jupyter_server"]
pytestmark = pytest.mark.usefixtures("service_env")

API = ("sandbox", "api")
REST = [  # (method, path after sandbox/api/)
    ("GET", "sandboxes"),
    ("POST", "sandboxes"),
    ("GET", "sandboxes/x"),
    ("DELETE", "sandboxes/x"),
    ("POST", "sandboxes/x/timeout"),
    ("POST", "sandboxes/x/ssh"),
    ("DELETE", "sandboxes/x/ssh"),
    ("POST", "sandboxes/x/terminal"),
    ("GET", "sandboxes/x/recordings"),
    ("GET", "sandboxes/x/recordings/20261201T152913Z-1.cast"),
    ("GET", "usage"),
]
SOCKETS = ["events", "sandboxes/x/logs", "tunnel/x"]


def body(response: Any) -> Any:
    return json.loads(response.body.decode())


async def recv_json(ws: WebSocketClientConnection, timeout: float = 10.0) -> dict[str, Any]:
    message = await asyncio.wait_for(ws.read_message(), timeout)
    assert message is not None, "the websocket closed"
    return json.loads(message)


async def next_of(ws: WebSocketClientConnection, kind: str, sandbox_id: str | None = None) -> Any:
    """The next feed message of `kind` (about `sandbox_id`, if given)."""
    while True:
        message = await recv_json(ws)
        if message["type"] == kind and (
            sandbox_id is None or message.get("sandbox", {}).get("id") == sandbox_id
        ):
            return message


@pytest.mark.parametrize(("method", "path"), REST)
async def test_rest_refuses_unauthenticated(jp_fetch, method: str, path: str) -> None:
    with pytest.raises(HTTPClientError) as e:
        await jp_fetch(
            *API,
            path,
            method=method,
            headers={"Authorization": ""},
            body="{}" if method == "POST" else None,
            allow_nonstandard_methods=True,
        )
    assert e.value.code == 403


@pytest.mark.parametrize("path", SOCKETS)
async def test_websockets_refuse_unauthenticated(jp_ws_fetch, path: str) -> None:
    with pytest.raises(HTTPClientError) as e:
        await jp_ws_fetch(*API, path, headers={"Authorization": ""})
    assert e.value.code == 403


async def test_changes_need_xsrf_with_cookie_auth(jp_fetch) -> None:
    """A logged-in browser cookie alone cannot change anything: XSRF is enforced."""
    first = await jp_fetch(*API, "sandboxes")  # token auth sets the login cookie
    cookies = [c.split(";")[0] for c in first.headers.get_list("Set-Cookie")]
    login = "; ".join(c for c in cookies if not c.startswith("_xsrf"))
    cookie_only = {"Authorization": "", "Cookie": login}
    listed = await jp_fetch(*API, "sandboxes", headers=cookie_only)  # reading is fine
    assert body(listed) == {"sandboxes": []}
    with pytest.raises(HTTPClientError) as e:
        await jp_fetch(*API, "sandboxes", method="POST", body="{}", headers=cookie_only)
    assert e.value.code == 403
    with_xsrf = {"Authorization": "", "Cookie": f"{login}; _xsrf=abc", "X-XSRFToken": "abc"}
    created = await jp_fetch(
        *API, "sandboxes", method="POST", headers=with_xsrf, body=json.dumps({"timeout": "1m"})
    )
    assert created.code == 201
    await jp_fetch(*API, "sandboxes", body(created)["id"], method="DELETE", headers=with_xsrf)


async def test_routes_live_under_base_url(jp_fetch, jp_base_url, http_server_client) -> None:
    assert jp_base_url == "/a%40b/"
    assert body(await jp_fetch(*API, "sandboxes")) == {"sandboxes": []}
    with pytest.raises(HTTPClientError) as e:
        await http_server_client.fetch(
            "/sandbox/api/sandboxes", headers={"Authorization": (await _auth(jp_fetch))}
        )
    assert e.value.code == 404


async def _auth(jp_fetch) -> str:
    response = await jp_fetch("api", "me")
    return response.request.headers["Authorization"]


async def test_lifecycle_and_event_feed(jp_fetch, jp_ws_fetch) -> None:
    """Create, list, extend and kill; the feed pushes each change and live usage."""
    feed = await jp_ws_fetch(*API, "events")
    assert await next_of(feed, "snapshot")
    created = await jp_fetch(
        *API,
        "sandboxes",
        method="POST",
        body=json.dumps(
            {"name": "panel-one", "timeout": "2m", "memory": "256M", "labels": {"course": "x"}}
        ),
    )
    sandbox = body(created)
    assert created.code == 201 and sandbox["name"] == "panel-one"
    assert sandbox["owner"].startswith("JupyterLab") and sandbox["labels"] == {"course": "x"}
    assert (await next_of(feed, "created", sandbox["id"]))["sandbox"]["name"] == "panel-one"
    usage = await next_of(feed, "usage")
    assert usage["usage"][sandbox["id"]]["memory_bytes"] > 0

    listed = body(await jp_fetch(*API, "sandboxes"))["sandboxes"]
    assert [s["id"] for s in listed] == [sandbox["id"]]
    assert body(await jp_fetch(*API, "sandboxes", "panel-one"))["id"] == sandbox["id"]

    extended = body(
        await jp_fetch(
            *API,
            "sandboxes",
            sandbox["id"],
            "timeout",
            method="POST",
            body=json.dumps({"timeout": "1h"}),
        )
    )
    assert extended["expires_at"] - sandbox["expires_at"] > 3000
    assert (await next_of(feed, "updated", sandbox["id"]))["sandbox"]["timeout"] == 3600

    killed = await jp_fetch(*API, "sandboxes", sandbox["id"], method="DELETE")
    assert killed.code == 204
    assert (await next_of(feed, "ended", sandbox["id"]))["sandbox"]["status"] != "running"
    feed.close()


async def test_errors_keep_their_status(jp_fetch) -> None:
    with pytest.raises(HTTPClientError) as e:
        await jp_fetch(*API, "sandboxes", "sb-nonexistent")
    assert e.value.code == 404
    with pytest.raises(HTTPClientError) as e:
        await jp_fetch(*API, "sandboxes", method="POST", body=json.dumps({"bogus": 1}))
    assert e.value.code == 400
    with pytest.raises(HTTPClientError) as e:
        await jp_fetch(*API, "sandboxes", method="POST", body=json.dumps({"timeout": "soon"}))
    assert e.value.code == 400


async def test_extend_adds_to_the_time_left(jp_fetch) -> None:
    """The panel's Extend: {"add": ...} adds to what is left, so it never shortens."""
    sandbox = await AsyncSandbox.create(timeout="14m")
    try:
        before = (await sandbox.info()).time_left
        extended = body(
            await jp_fetch(
                *API, "sandboxes", sandbox.id, "timeout", method="POST", body='{"add": "5m"}'
            )
        )
        after = (await sandbox.info()).time_left
        assert before + 300 - 5 <= after <= before + 300
        assert extended["expires_at"] == pytest.approx((await sandbox.info()).expires_at)
        for wrong, said in (
            ({}, '\\"add\\"'),
            ({"add": "5m", "timeout": "1h"}, '\\"add\\"'),
            ({"add": "soon"}, "invalid duration 'soon'"),
        ):
            with pytest.raises(HTTPClientError) as e:
                await jp_fetch(
                    *API, "sandboxes", sandbox.id, "timeout", method="POST", body=json.dumps(wrong)
                )
            assert e.value.code == 400
            assert said in e.value.response.body.decode()
    finally:
        await sandbox.kill()


async def test_extend_gives_a_session_sandbox_a_deadline(jp_fetch) -> None:
    sandbox = await AsyncSandbox.create()
    try:
        await jp_fetch(
            *API, "sandboxes", sandbox.id, "timeout", method="POST", body='{"add": "10m"}'
        )
        assert 600 - 5 <= (await sandbox.info()).time_left <= 600
    finally:
        await sandbox.kill()


async def test_usage_answers_whether_the_service_has_quotas(jp_fetch) -> None:
    """The panel's quota block: the service's /v1/usage, or "available": false before it
    had one."""
    usage = body(await jp_fetch(*API, "usage"))
    if usage["available"]:
        assert set(usage) >= {"user", "quota", "usage"}
    else:
        assert usage == {"available": False}


async def test_create_uploads_image_directory(jp_fetch, jp_root_dir) -> None:
    """The form's "Image directory" (relative to root_dir) lands in the sandbox's home."""
    image = jp_root_dir / "course" / "image"
    (image / "data").mkdir(parents=True)
    (image / "data" / "hello.txt").write_text("hello from the image\n")
    (image / "run.sh").write_text("echo ran\n")
    (image / "run.sh").chmod(0o755)
    created = await jp_fetch(
        *API,
        "sandboxes",
        method="POST",
        body=json.dumps({"name": "imaged", "timeout": "1m", "image": "course/image/"}),
    )
    assert created.code == 201
    sandbox = await AsyncSandbox.connect(body(created)["id"])
    try:
        assert (await sandbox.sh("cat data/hello.txt")).stdout == "hello from the image\n"
        assert (await sandbox.sh("./run.sh")).stdout == "ran\n"  # mode kept
        assert await sandbox.fs.read_text("data/hello.txt") == "hello from the image\n"
    finally:
        await sandbox.kill()


def _image_cases(root: Path) -> dict[str, tuple[str, str]]:
    """name: (the "image" sent, a part of the 400 message)."""
    outside = root.parent / "outside"
    outside.mkdir(exist_ok=True)
    (outside / "secret.txt").write_text("secret")
    (root / "escape").symlink_to(outside)
    (root / "file.txt").write_text("not a directory")
    return {
        "dotdot": ("../outside", "outside the server's root"),
        "nested-dotdot": ("course/../../outside", "outside the server's root"),
        "absolute-outside": (str(outside), "outside the server's root"),
        "symlink-outside": ("escape", "outside the server's root"),
        "missing": ("no/such/dir", "does not exist"),
        "file": ("file.txt", "is not a directory"),
        "empty": ("", "must be a directory path"),
        "not-a-string": (["x"], "must be a directory path"),  # type: ignore[dict-item]
    }


IMAGE_CASES = ["dotdot", "nested-dotdot", "absolute-outside", "symlink-outside"]
IMAGE_CASES += ["missing", "file", "empty", "not-a-string"]


@pytest.mark.parametrize("case", IMAGE_CASES)
async def test_create_refuses_bad_image_directory(jp_fetch, jp_root_dir, case: str) -> None:
    image, message = _image_cases(jp_root_dir)[case]
    with pytest.raises(HTTPClientError) as e:
        await jp_fetch(
            *API,
            "sandboxes",
            method="POST",
            body=json.dumps({"name": f"bad-{case}", "timeout": "1m", "image": image}),
        )
    assert e.value.code == 400
    assert message in body(e.value.response)["message"]
    assert await AsyncSandbox.list() == []  # refused before any sandbox was made


async def test_failed_image_upload_kills_the_sandbox(
    jp_fetch, jp_root_dir, monkeypatch: pytest.MonkeyPatch
) -> None:
    (jp_root_dir / "image").mkdir()

    async def broken(self: Any, local: Any, remote: str, progress: Any = None) -> None:
        raise PermissionError(13, "Permission denied", str(local))

    monkeypatch.setattr(AsyncFileSystem, "upload", broken)
    with pytest.raises(HTTPClientError) as e:
        await jp_fetch(
            *API,
            "sandboxes",
            method="POST",
            body=json.dumps({"name": "half-made", "timeout": "1m", "image": "image"}),
        )
    assert e.value.code == 400
    assert "cannot upload the image directory" in body(e.value.response)["message"]
    assert await AsyncSandbox.list() == []


async def test_log_websocket_streams_live(jp_fetch, jp_ws_fetch) -> None:
    sandbox = await AsyncSandbox.create(timeout="2m")
    try:
        await sandbox.spawn("echo before")
        logs = await jp_ws_fetch(*API, "sandboxes", sandbox.id, "logs")
        seen: list[str] = []

        async def saw(text: str) -> bool:
            while text not in "".join(seen):
                seen.append((await recv_json(logs))["text"])
            return True

        await saw("before")
        await sandbox.spawn("sleep 0.5; echo after")
        await saw("after")
        await sandbox.kill()
        while await asyncio.wait_for(logs.read_message(), 10) is not None:
            pass  # the stream ends with the sandbox
    finally:
        await sandbox.kill()


async def _start_kernel(jp_fetch) -> str:
    response = await jp_fetch("api", "kernels", method="POST", body=json.dumps({}))
    return body(response)["id"]


async def _kernel_sandboxes(kernel_id: str) -> tuple[AsyncSandbox, AsyncSandbox]:
    """A "session" sandbox of the kernel, and one with a duration that must survive it."""
    labels = {"kernel": kernel_id}
    session = await AsyncSandbox.create(labels=labels, owner="notebook test.ipynb")
    lasting = await AsyncSandbox.create(labels=labels, timeout="2m")
    return session, lasting


async def _ended(sandbox: AsyncSandbox) -> bool:
    try:
        return (await sandbox.info()).status != "running"
    except (SandboxNotFound, SandboxExpired):
        return True


async def test_kernel_shutdown_reaps_its_session_sandboxes(jp_fetch) -> None:
    kernel_id = await _start_kernel(jp_fetch)
    session, lasting = await _kernel_sandboxes(kernel_id)
    try:
        await jp_fetch("api", "kernels", kernel_id, method="DELETE")
        await until(lambda: _ended(session), 5, "the kernel's session sandbox to end")
        assert (await lasting.info()).status == "running"
    finally:
        await session.kill()
        await lasting.kill()


async def test_kernel_restart_reaps_its_session_sandboxes(jp_fetch) -> None:
    kernel_id = await _start_kernel(jp_fetch)
    session, lasting = await _kernel_sandboxes(kernel_id)
    try:
        await jp_fetch("api", "kernels", kernel_id, "restart", method="POST", body="{}")
        await until(lambda: _ended(session), 5, "the kernel's session sandbox to end")
        assert (await lasting.info()).status == "running"
        await jp_fetch("api", "kernels", kernel_id, method="DELETE")
    finally:
        await session.kill()
        await lasting.kill()


async def test_reconcile_reaps_kernels_lost_without_event(jp_fetch, jp_serverapp) -> None:
    kernel_id = await _start_kernel(jp_fetch)
    session, lasting = await _kernel_sandboxes(kernel_id)
    manager = jp_serverapp.kernel_manager
    kernel = manager.get_kernel(kernel_id)
    try:
        manager.remove_kernel(kernel_id)  # gone from the manager; no kernel_actions event
        await until(lambda: _ended(session), 5, "the reconciler to end the sandbox")
        assert (await lasting.info()).status == "running"
    finally:
        await kernel.shutdown_kernel(now=True)
        await session.kill()
        await lasting.kill()


async def test_panel_shows_the_notebook_of_a_kernel_sandbox(jp_fetch) -> None:
    session = await jp_fetch(
        "api",
        "sessions",
        method="POST",
        body=json.dumps(
            {"path": "work/lab.ipynb", "type": "notebook", "kernel": {"name": "python3"}}
        ),
    )
    kernel_id = body(session)["kernel"]["id"]
    sandbox = await AsyncSandbox.create(labels={"kernel": kernel_id}, timeout="1m")
    try:
        info = body(await jp_fetch(*API, "sandboxes", sandbox.id))
        assert info["notebook"] == "work/lab.ipynb"
    finally:
        await sandbox.kill()
        await jp_fetch("api", "sessions", body(session)["id"], method="DELETE")


async def _ssh(access: dict[str, Any], command: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        "ssh",
        *UNPINNED_SSH,
        "-p",
        str(access["port"]),
        f"{access['token']}@{access['hostname']}",
        command,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    return proc.returncode or 0, out.decode()


async def test_ssh_access_is_reused_until_revoked(jp_fetch) -> None:
    sandbox = await AsyncSandbox.create(timeout="1m")
    try:
        path = (*API, "sandboxes", sandbox.id, "ssh")
        first = body(await jp_fetch(*path, method="POST", body="{}"))
        assert first["command"].endswith(f"{first['token']}@{first['hostname']}")
        assert body(await jp_fetch(*path, method="POST", body="{}"))["token"] == first["token"]
        fresh = body(await jp_fetch(*path, method="POST", body=json.dumps({"fresh": True})))
        assert fresh["token"] != first["token"]
        assert await _ssh(first, "hostname") == (0, f"{sandbox.id}\n")

        assert body(await jp_fetch(*path, method="DELETE"))["revoked"] >= 2
        code, _ = await _ssh(first, "hostname")
        assert code == 255
        assert body(await jp_fetch(*path, method="POST", body="{}"))["token"] != first["token"]
    finally:
        await sandbox.kill()


async def test_recordings_are_listed_and_served_for_the_panel(jp_fetch) -> None:
    created = await jp_fetch(
        *API, "sandboxes", method="POST", body=json.dumps({"record_terminals": True})
    )
    sandbox = body(created)
    assert sandbox["recording"] is True
    try:
        path = (*API, "sandboxes", sandbox["id"])
        assert body(await jp_fetch(*path, "recordings")) == []
        access = body(await jp_fetch(*path, "ssh", method="POST", body="{}"))
        proc = await asyncio.create_subprocess_exec(
            "ssh",
            "-tt",
            *UNPINNED_SSH,
            "-p",
            str(access["port"]),
            f"{access['token']}@{access['hostname']}",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        await asyncio.wait_for(proc.communicate(b"echo for-the-panel\nexit\n"), 30)
        listed = await until(lambda: _listed(jp_fetch, path), what="the recording")
        [recording] = listed
        assert set(recording) == {"name", "started_at", "size"}
        cast = await jp_fetch(*path, "recordings", recording["name"])
        assert cast.headers["Content-Type"] == "application/x-asciicast"
        header, *events = cast.body.decode().splitlines()
        assert json.loads(header)["version"] == 2 and len(cast.body) == recording["size"]
        assert "for-the-panel" in "".join(json.loads(e)[2] for e in events)
        for name, status in (("x.cast", 400), ("20261201T152913Z-9.cast", 404)):
            with pytest.raises(HTTPClientError) as e:
                await jp_fetch(*path, "recordings", name)
            assert e.value.code == status
    finally:
        await jp_fetch(*API, "sandboxes", sandbox["id"], method="DELETE")


async def _listed(jp_fetch, path: tuple[str, ...]) -> list:
    return body(await jp_fetch(*path, "recordings"))


async def test_terminal_opens_a_shell_in_the_sandbox(jp_fetch, jp_ws_fetch) -> None:
    sandbox = await AsyncSandbox.create(timeout="1m")
    try:
        created = await jp_fetch(
            *API, "sandboxes", sandbox.id, "terminal", method="POST", body="{}"
        )
        name = body(created)["name"]
        terminal = await jp_ws_fetch("terminals", "websocket", name)
        screen = await _read_screen(terminal, "$ ")  # the sandbox shell's prompt
        assert sandbox.id in screen and "token" not in screen.lower()
        terminal.write_message(json.dumps(["stdin", "hostname\r"]))
        await _read_screen(terminal, f"{sandbox.id}\r\n")
        terminal.close()
        await jp_fetch("api", "terminals", name, method="DELETE")
    finally:
        await sandbox.kill()


async def _read_screen(terminal: WebSocketClientConnection, text: str) -> str:
    """Terminal output up to and including `text`."""
    screen = ""
    while text not in screen:
        kind, *data = await recv_json(terminal)
        screen += data[0] if kind == "stdout" else ""
    return screen
