"""A thin JSON client of the Kubernetes API, over kubernetes_asyncio's ApiClient.

Objects go in and come out as plain dicts (no model classes): the backend builds them
with ``objects`` and reads only a few fields back. Errors are `ApiError`, with the
status code and the words of the API's Status object; a server that cannot be reached
is `ApiUnreachable`.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import aiohttp
from kubernetes_asyncio import client

REQUEST_TIMEOUT = 15.0  # seconds for one request (watches: between two lines)
PREFIXES = {
    "pods": "/api/v1",
    "secrets": "/api/v1",
    "configmaps": "/api/v1",
    "persistentvolumeclaims": "/api/v1",
    "events": "/api/v1",
    "networkpolicies": "/apis/networking.k8s.io/v1",
    "leases": "/apis/coordination.k8s.io/v1",
    "sandboxes": "/apis/agents.x-k8s.io/v1beta1",
}
MERGE_PATCH = "application/merge-patch+json"


class ApiError(Exception):
    """The API server refused a request: `status` (404, 409, 410, 403...), its reason."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status, self.reason, self.message = status, reason, message


class ApiUnreachable(ApiError):
    """No answer from the API server (refused, reset, timed out)."""

    def __init__(self, host: str, error: BaseException) -> None:
        detail = str(error) or type(error).__name__
        super().__init__(0, "Unreachable", f"the Kubernetes API server at {host} ({detail})")


class Api:
    """Requests on the objects of one namespace."""

    def __init__(self, configuration: client.Configuration, namespace: str) -> None:
        self.client = client.ApiClient(configuration)
        self.host = configuration.host
        self.namespace = namespace

    async def close(self) -> None:
        await self.client.close()

    def path(self, resource: str, name: str | None = None) -> str:
        path = f"{PREFIXES[resource]}/namespaces/{self.namespace}/{resource}"
        return f"{path}/{name}" if name else path

    async def _send(
        self,
        method: str,
        path: str,
        *,
        query: dict | None = None,
        body: dict | None = None,
        content_type: str = "application/json",
        timeout: float | aiohttp.ClientTimeout = REQUEST_TIMEOUT,
    ) -> aiohttp.ClientResponse:
        try:
            return await self.client.call_api(
                path,
                method,
                query_params=list((query or {}).items()),
                header_params={"Accept": "application/json", "Content-Type": content_type},
                body=body,
                auth_settings=["BearerToken"],
                _preload_content=False,
                _request_timeout=timeout,
            )
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            raise ApiUnreachable(self.host, e) from None

    async def request(
        self,
        method: str,
        path: str,
        *,
        query: dict | None = None,
        body: dict | None = None,
        content_type: str = "application/json",
    ) -> dict:
        """One request; its JSON answer, or ApiError."""
        response = await self._send(method, path, query=query, body=body, content_type=content_type)
        try:
            data = await response.read()
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            raise ApiUnreachable(self.host, e) from None
        finally:
            response.release()
        if not 200 <= response.status < 300:
            raise status_error(response.status, data)
        return json.loads(data) if data else {}

    async def get(self, resource: str, name: str) -> dict:
        return await self.request("GET", self.path(resource, name))

    async def list(self, resource: str, selector: str) -> dict:
        return await self.request("GET", self.path(resource), query={"labelSelector": selector})

    async def create(self, resource: str, body: dict) -> dict:
        return await self.request("POST", self.path(resource), body=body)

    async def replace(self, resource: str, body: dict) -> dict:
        name = body["metadata"]["name"]
        return await self.request("PUT", self.path(resource, name), body=body)

    async def patch(self, resource: str, name: str, body: dict) -> dict:
        """A JSON merge patch."""
        path = self.path(resource, name)
        return await self.request("PATCH", path, body=body, content_type=MERGE_PATCH)

    async def delete(self, resource: str, name: str, grace: int | None = None) -> bool:
        """Delete an object (its dependents in the background); False if it was gone."""
        options: dict = {"propagationPolicy": "Background"}
        if grace is not None:
            options["gracePeriodSeconds"] = grace
        try:
            await self.request("DELETE", self.path(resource, name), body=options)
        except ApiError as e:
            if e.status == 404:
                return False
            raise
        return True

    async def watch(
        self, resource: str, selector: str, version: str, seconds: int, idle: float
    ) -> AsyncIterator[dict]:
        """The events of a watch from `version` (bookmarks included), until the server
        ends it; ApiError (410 for a version too old) or ApiUnreachable, also when
        nothing (not even a bookmark) comes for `idle` seconds: a connection the
        network dropped without a word."""
        query = {
            "labelSelector": selector,
            "watch": "true",
            "resourceVersion": version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(seconds),
        }
        timeout = aiohttp.ClientTimeout(sock_connect=REQUEST_TIMEOUT, sock_read=idle)
        response = await self._send("GET", self.path(resource), query=query, timeout=timeout)
        try:
            if response.status != 200:
                raise status_error(response.status, await response.read())
            while True:
                try:
                    line = await response.content.readline()
                except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
                    raise ApiUnreachable(self.host, e) from None
                if not line:
                    return
                if line.strip():
                    event = json.loads(line)
                    if event.get("type") == "ERROR":
                        status = event.get("object") or {}
                        raise status_error(status.get("code") or 500, json.dumps(status).encode())
                    yield event
        finally:
            response.close()


def status_error(status: int, data: bytes) -> ApiError:
    """The ApiError of an answer that is not a success, from its Status object if any."""
    try:
        body = json.loads(data)
    except ValueError:
        body = {}
    if not isinstance(body, dict):
        body = {}
    reason = str(body.get("reason") or status)
    message = str(body.get("message") or data[:200].decode(errors="replace") or reason)
    return ApiError(status, reason, message)
