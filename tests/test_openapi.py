"""The service's OpenAPI document: complete, valid, served, and true to the service."""

from __future__ import annotations

import httpx
import pytest
from openapi_spec_validator import validate

from jupyter_sandbox._config import host_memory
from jupyter_sandbox._errors import ERRORS
from jupyter_sandbox.client._async import shared_transport
from jupyter_sandbox.client._sync import portal
from jupyter_sandbox.service import openapi
from jupyter_sandbox.service.api import make_app

pytestmark = pytest.mark.unprivileged

SOME_HOST = openapi.Bounds(memory=4 << 30, cpus=2.0, fds=1024, disk=64 << 30)


def registered_routes() -> set[tuple[str, str]]:
    """(method, path) of every route the service's app registers (HEAD comes with GET)."""
    app = make_app(manager=None, ssh=None)  # routing only: no handler runs
    return {
        (route.method, route.resource.canonical)
        for route in app.router.routes()
        if route.method != "HEAD"
    }


def documented_routes(document: dict) -> set[tuple[str, str]]:
    return {
        (method.upper(), path)
        for path, operations in document["paths"].items()
        for method in operations
    }


def served_document() -> dict:
    async def get() -> dict:
        return await shared_transport().request("GET", "/v1/openapi.json")

    return portal().call(get())


def test_every_route_is_documented_and_every_documented_route_exists():
    document = openapi.document(SOME_HOST)
    registered, documented = registered_routes(), documented_routes(document)
    assert registered - documented == set(), "routes missing from the OpenAPI document"
    assert documented - registered == set(), "documented routes the service does not have"


def test_the_document_is_valid_openapi_with_unique_operations():
    document = openapi.document(SOME_HOST)
    validate(document)
    ids = [op["operationId"] for ops in document["paths"].values() for op in ops.values()]
    assert len(ids) == len(set(ids)) == len(registered_routes())


def test_documented_errors_are_the_typed_errors_and_their_statuses():
    document = openapi.document(SOME_HOST)
    statuses = {cls.status for cls in ERRORS.values() if cls.status >= 400}
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            for status, answer in operation["responses"].items():
                if int(status) < 400:
                    continue
                assert int(status) in statuses | {401, 413}, (method, path, status)
                schema = answer["content"]["application/json"]["schema"]
                assert schema == {"$ref": "#/components/schemas/Error"}
            # Every operation can fail on bad input, a missing token over TCP, or inside.
            assert {"400", "401", "500"} <= set(operation["responses"]), (method, path)
    error = document["components"]["schemas"]["Error"]
    assert error["required"] == ["error", "message"]


def test_the_service_serves_its_document_with_this_hosts_limits(service_env):
    document = served_document()
    validate(document)
    assert documented_routes(document) == registered_routes()
    create = document["components"]["schemas"]["CreateSandbox"]["properties"]
    memory_as_bytes = create["memory"]["anyOf"][0]
    assert memory_as_bytes["maximum"] == host_memory()
    assert create["name"]["pattern"] == "^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"


def test_unknown_endpoints_and_methods_answer_with_the_error_shape(service_env):
    async def raw(method: str, path: str) -> httpx.Response:
        client = await shared_transport().client()
        return await client.request(method, path)

    missing = portal().call(raw("GET", "/v1/nothing-here"))
    assert missing.status_code == 404
    assert missing.json()["error"] == "InvalidRequest"
    assert "/v1/openapi.json" in missing.json()["message"]
    wrong_method = portal().call(raw("PATCH", "/v1/sandboxes"))
    assert wrong_method.status_code == 405 and set(wrong_method.json()) == {"error", "message"}


def test_over_tcp_the_document_needs_the_token(tcp_service):
    url = tcp_service["url"] + "/v1/openapi.json"
    refused = httpx.get(url)
    assert refused.status_code == 401 and refused.json()["error"] == "PermissionDenied"
    served = httpx.get(url, headers={"Authorization": f"Bearer {tcp_service['token']}"})
    assert served.status_code == 200
    assert documented_routes(served.json()) == registered_routes()
