"""Bad input gets a typed, actionable error, and the service keeps serving everyone."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import httpx
import pytest

from jupyter_sandbox import (
    FileNotFound,
    InvalidRequest,
    ProcessNotFound,
    Sandbox,
    SandboxExists,
    SandboxNotFound,
)
from jupyter_sandbox.client._async import AsyncProcess
from jupyter_sandbox.client._sync import Process, portal
from tests.conftest import ServiceEnv

pytestmark = pytest.mark.unprivileged


@pytest.mark.parametrize("timeout", ["soon", "-5s", 0, "5 parsecs", "", True, 10**9])
def test_bad_timeouts_name_the_accepted_forms(service_env, timeout):
    with pytest.raises(ValueError, match="invalid duration") as excinfo:
        Sandbox.create(timeout=timeout)
    assert '"session"' in str(excinfo.value) or "at most a year" in str(excinfo.value)


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("memory", "lots", "invalid size"),
        ("memory", "1k", "at least 4M"),
        ("cpus", -1, "invalid cpus"),
        ("pids", 2, "invalid pids"),
        ("network", "bridge", 'expected "none" or "host"'),
        ("env", {"1BAD": "x"}, "invalid environment variable name"),
        ("name", "../etc", "invalid name"),
    ],
)
def test_bad_create_options(service_env, option, value, message):
    with pytest.raises(InvalidRequest, match=message):
        Sandbox.create(**{option: value})


def test_unknown_ids_duplicate_names_and_missing_things(service_env):
    with pytest.raises(SandboxNotFound, match="no sandbox with id or name 'nope'"):
        Sandbox.connect("nope")
    with Sandbox.create(name="unique-name") as sb:
        with pytest.raises(SandboxExists):
            Sandbox.create(name="unique-name")
        with pytest.raises(FileNotFound):
            sb.sh("true", cwd="no/such/dir")
        with pytest.raises(ProcessNotFound):
            Process(AsyncProcess(sb._inner, {"pid": 99999, "command": "x"})).wait(1)
        with pytest.raises(InvalidRequest):
            sb.sh("true", timeout=-1)
        assert sb.sh("echo fine").stdout == "fine\n"


def raw_request(env: ServiceEnv, request: bytes) -> tuple[int, dict]:
    """Talk HTTP to the service's socket by hand, as a broken client would."""
    socket_path = json.loads(env.runtime_file.read_text())["socket"]
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(socket_path)
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body) if body.startswith(b"{") else {}


def test_malformed_requests_do_not_hurt_the_service(service_env: ServiceEnv, sandbox):
    status, body = raw_request(
        service_env,
        b"POST /v1/sandboxes HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
        b"\r\nContent-Length: 9\r\nConnection: close\r\n\r\n{not json",
    )
    assert status == 400 and body["error"] == "InvalidRequest"
    status, body = raw_request(
        service_env,
        b"POST /v1/sandboxes HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
        b'\r\nContent-Length: 16\r\nConnection: close\r\n\r\n{"bogus": true} ',
    )
    assert status == 400 and "unknown option" in body["message"]
    status, _ = raw_request(service_env, b"GARBAGE\r\n\r\n")
    assert status == 400
    status, body = raw_request(
        service_env,
        f"POST /v1/sandboxes/{sandbox.id}/files/chmod HTTP/1.1\r\nHost: x\r\n"
        "Content-Length: 2\r\nConnection: close\r\n\r\n{}".encode(),
    )
    assert status == 404
    assert sandbox.sh("echo still serving").stdout == "still serving\n"


def post_json(env: ServiceEnv, path: str, body: object) -> tuple[int, dict]:
    data = json.dumps(body).encode()
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    head += f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n"
    return raw_request(env, head.encode() + data)


@pytest.mark.parametrize(
    "body",
    [
        {"labels": [1]},
        {"labels": {"a": {"b": 1}}},
        {"owner": {"a": 1}},
        {"name": 5},
        {"env": ["A=1"]},
    ],
)
def test_create_options_of_the_wrong_type_are_invalid_requests(service_env: ServiceEnv, body):
    """Attack: create options of a type the service does not expect (not a 500)."""
    status, answer = post_json(service_env, "/v1/sandboxes", body)
    assert (status, answer["error"]) == (400, "InvalidRequest"), answer


@pytest.mark.parametrize(
    ("op", "body", "message"),
    [
        ("stat", {"path": ".", "answer_timeout": 0.001}, "unknown option"),
        ("stat", {"path": ".", "pipe": True}, "unknown option"),
        ("stat", {}, "needs the argument"),
        ("list", {"path": ["."]}, "must be of type str"),
        ("mkdir", {"path": "d", "mode": "0777"}, "must be of type int"),
        ("remove", {"path": "d", "recursive": "yes"}, "must be of type bool"),
        ("rename", {"src": "a"}, "needs the argument"),
    ],
)
def test_file_op_arguments_are_checked(service_env: ServiceEnv, sandbox, op, body, message):
    """Attack: file operations with arguments of the service's own call, of the agent's
    protocol, missing or of the wrong type: each is InvalidRequest, never a 500."""
    status, answer = post_json(service_env, f"/v1/sandboxes/{sandbox.id}/files/{op}", body)
    assert (status, answer["error"]) == (400, "InvalidRequest"), answer
    assert message in answer["message"]
    assert sandbox.fs.stat(".").type == "dir"


def test_huge_request_bodies_are_refused(service_env: ServiceEnv, sandbox):
    async def huge_create() -> None:
        await sandbox._inner._transport.request(
            "POST", "/v1/sandboxes", json={"labels": {"x": "y" * (4 << 20)}}
        )

    with pytest.raises(InvalidRequest, match="the request body is larger than 1 MiB"):
        portal().call(huge_create())
    assert sandbox.sh("echo ok").stdout == "ok\n"


def test_tcp_listener_requires_the_token(tmp_path, tcp_service):
    """`serve --tcp` for shared deployments: every request needs the bearer token."""
    url, token = tcp_service["url"], tcp_service["token"]
    assert oct(tcp_service["runtime_file"].stat().st_mode & 0o777) == "0o600"
    assert httpx.get(url + "/v1/sandboxes").status_code == 401
    wrong = {"Authorization": "Bearer nope"}
    assert httpx.get(url + "/v1/status", headers=wrong).status_code == 401
    client = subprocess.run(
        [sys.executable, "-m", "jupyter_sandbox", "list", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        env={
            **tcp_service["env"],
            "JUPYTER_SANDBOX_URL": url,
            "JUPYTER_SANDBOX_TOKEN": token,
            "JUPYTER_RUNTIME_DIR": str(tmp_path / "elsewhere"),
        },
    )
    assert client.returncode == 0 and json.loads(client.stdout) == []
    agent = httpx.get(url + "/v1/sandboxes/x/agent", headers={"Authorization": f"Bearer {token}"})
    assert agent.status_code in (403, 404)
