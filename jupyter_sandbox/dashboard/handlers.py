"""The dashboard's page and JSON API, all behind the hub's OAuth login.

Every handler first checks that the hub user is an instructor (see ``access``); anyone
else gets 403 (a page for the browser, JSON for the API). POSTs and DELETEs made with
the login cookie go through JupyterHub's XSRF check; no token ever goes into a URL or
into the page: an SSH credential is only in the answer to a POST, shown when asked for.
"""

from __future__ import annotations

import contextlib
import html
import json
from pathlib import Path
from typing import Any

from jupyterhub.services.auth import HubOAuthCallbackHandler, HubOAuthenticated
from tornado import web
from tornado.iostream import StreamClosedError

from .._durations import parse_duration
from .._errors import SandboxError
from .._tunnel_socket import GatewayTunnel
from .access import is_instructor
from .config import DashboardConfig
from .service import SystemService

STATIC = Path(__file__).resolve().parent / "static"
LOG_TAIL = 500
REF = r"(?P<ref>[\w.-]+)"
LOOPBACK = ("127.0.0.1", "::1", "localhost")


class _Base(HubOAuthenticated, web.RequestHandler):
    def initialize(self, config: DashboardConfig, service: SystemService) -> None:
        self.config = config
        self.service = service

    @property
    def hub_name(self) -> str:
        return self.current_user["name"]

    def get_current_user(self) -> dict[str, Any] | None:
        self._identifying = True
        return super().get_current_user()

    def check_xsrf_cookie(self) -> None:
        """Tornado checks XSRF before it knows the user: identify first, so a request with
        a hub API token (no cookie, no XSRF risk) passes and a cookie one is checked."""
        if not getattr(self, "_identifying", False):
            self.current_user  # noqa: B018 -- marks token-authenticated requests
        super().check_xsrf_cookie()

    async def prepare(self) -> None:
        if self.current_user is None:
            # Not logged in: pages go to the hub's login; API calls are told so.
            if self.request.path.startswith(self.config.prefix + "api/"):
                raise web.HTTPError(
                    401,
                    "not logged in: open the dashboard in a browser logged in to the hub, "
                    "or send a hub API token (Authorization: token ...)",
                )
            self.redirect(self.get_login_url())
            return
        if not await is_instructor(self.current_user, self.config, self.hub_auth):
            raise web.HTTPError(403, self._refusal())

    def _refusal(self) -> str:
        groups, roles = sorted(self.config.instructor_groups), sorted(self.config.instructor_roles)
        who = f"members of the instructor group(s) ({', '.join(groups)})"
        if roles:
            who += f" and holders of the role(s) {', '.join(roles)}"
        return (
            f"{self.hub_name} is not an instructor here: the sandbox dashboard is for hub "
            f"admins and {who}. Ask a hub admin to add you if you teach this course; your "
            "own sandboxes are in your server's Sandboxes panel."
        )

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        error = kwargs.get("exc_info", (None, None))[1]
        message = getattr(error, "log_message", None) or self._reason
        self.set_header("Cache-Control", "no-store")
        if self.request.path.startswith(self.config.prefix + "api/"):
            self.set_header("Content-Type", "application/json")
            self.finish(json.dumps({"error": self._reason, "message": message}))
            return
        page = (STATIC / "refused.html").read_text()
        self.finish(
            page.replace("{{status}}", str(status_code))
            .replace("{{reason}}", html.escape(self._reason))
            .replace("{{message}}", html.escape(message))
        )


@contextlib.contextmanager
def service_errors() -> Any:
    """Report the service's typed errors with their own status and message."""
    try:
        yield
    except SandboxError as e:
        status = e.status if e.status >= 400 else 502
        raise web.HTTPError(status, str(e), reason=type(e).__name__) from e
    except ValueError as e:
        raise web.HTTPError(400, str(e), reason="InvalidRequest") from e


class PageHandler(_Base):
    """The dashboard page; the page's script does the rest through the API."""

    def get(self) -> None:
        page = (STATIC / "index.html").read_text()
        self.xsrf_token  # noqa: B018 -- sets the _xsrf cookie the page's script sends back
        self.set_header("Cache-Control", "no-store")
        self.finish(
            page.replace("{{user}}", html.escape(self.hub_name))
            .replace("{{prefix}}", html.escape(self.config.prefix))
            .replace("{{interval}}", str(int(self.config.usage_interval * 1000)))
        )


class _Api(_Base):
    def reply(self, data: Any, status: int = 200) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.set_header("Cache-Control", "no-store")
        self.finish(json.dumps(data))

    def body(self) -> dict[str, Any]:
        try:
            data = json.loads(self.request.body or b"{}")
        except ValueError as e:
            raise web.HTTPError(400, f"the request body is not JSON: {e}") from e
        if not isinstance(data, dict):
            raise web.HTTPError(400, "the request body must be a JSON object")
        return data


class SandboxesApi(_Api):
    async def get(self) -> None:
        with service_errors():
            sandboxes = await self.service.sandboxes(self.hub_name)
        self.reply({"sandboxes": sandboxes, "acting_as": self.hub_name})


class SandboxApi(_Api):
    async def delete(self, ref: str) -> None:
        with service_errors():
            self.reply(await self.service.request("DELETE", f"/v1/sandboxes/{ref}", self.hub_name))


class ExtendApi(_Api):
    """POST {"add": "10m"}: adds that much to the time left; it never shortens."""

    async def post(self, ref: str) -> None:
        add = self.body().get("add")
        if add is None:
            raise web.HTTPError(400, "'add' is required: how much time to add, e.g. \"10m\"")
        with service_errors():
            self.reply(await self.service.extend_by(ref, parse_duration(add), self.hub_name))


class RestartApi(_Api):
    async def post(self, ref: str) -> None:
        with service_errors():
            path = f"/v1/sandboxes/{ref}/restart"
            self.reply(await self.service.request("POST", path, self.hub_name))


class SshApi(_Api):
    """POST: a one-connection SSH credential, for a terminal in the sandbox."""

    async def post(self, ref: str) -> None:
        with service_errors():
            access = await self.service.request(
                "POST", f"/v1/sandboxes/{ref}/ssh", self.hub_name, {"single_use": True}
            )
        # A token the dashboard (uid 0) made works over loopback only for uid 0: from
        # this machine an instructor goes through the hub's tunnel, so a command for a
        # loopback gateway address is not offered.
        direct = access["hostname"] not in LOOPBACK
        self.reply(
            {
                "sandbox": ref,
                "token": access["username"],
                "command": access["command"] if direct else None,
                "expires_at": access["expires_at"],
                "host_key_fingerprint": access["host_key_fingerprint"],
                "known_hosts_line": access["known_hosts_line"],
            }
        )


class LogsApi(_Api):
    """GET: the sandbox's log as server-sent events, following until it ends."""

    async def get(self, ref: str) -> None:
        self.set_header("Content-Type", "text/event-stream")
        self.set_header("Cache-Control", "no-store")
        tail = self.get_query_argument("tail", str(LOG_TAIL))
        try:
            async for entry in self.service.logs(
                ref, self.hub_name, int(tail) if tail.isdigit() else LOG_TAIL
            ):
                self.write(f"data: {json.dumps(entry)}\n\n")
                await self.flush()
            self.write("event: end\ndata: {}\n\n")
        except SandboxError as e:
            message = {"error": type(e).__name__, "message": str(e)}
            self.write(f"event: failure\ndata: {json.dumps(message)}\n\n")
        except StreamClosedError:
            return
        self.finish()


class TunnelSocket(HubOAuthenticated, GatewayTunnel):
    """Carries an SSH connection to the service's gateway, like the server extension's
    tunnel, so ``jupyter-sandbox tunnel --url <hub>/services/sandboxes/`` reaches it."""

    initialize = _Base.initialize

    async def get(self, ref: str) -> None:
        user = self.current_user
        if user is None:
            raise web.HTTPError(403, "log in to the hub first (give a hub API token)")
        if not await is_instructor(user, self.config, self.hub_auth):
            raise web.HTTPError(403, f"{user['name']} is not an instructor here")
        with service_errors():
            await self.service.request("GET", f"/v1/sandboxes/{ref}", user["name"])
            self.address = await self.service.gateway(user["name"])
        await super().get(ref)


def handlers(config: DashboardConfig, service: SystemService) -> list[tuple[str, type, dict]]:
    """URL patterns under the service's prefix, and their handlers."""
    p = config.prefix
    kwargs = {"config": config, "service": service}
    routes: list[tuple[str, type, dict]] = [
        (p + r"oauth_callback", HubOAuthCallbackHandler, {}),
        (p + r"static/(.*)", web.StaticFileHandler, {"path": str(STATIC)}),
    ]
    for pattern, handler in (
        (p + r"?", PageHandler),
        (p + r"api/sandboxes", SandboxesApi),
        (p + rf"api/sandboxes/{REF}", SandboxApi),
        (p + rf"api/sandboxes/{REF}/extend", ExtendApi),
        (p + rf"api/sandboxes/{REF}/restart", RestartApi),
        (p + rf"api/sandboxes/{REF}/ssh", SshApi),
        (p + rf"api/sandboxes/{REF}/logs", LogsApi),
        (p + rf"sandbox/api/tunnel/{REF}", TunnelSocket),
    ):
        routes.append((pattern, handler, kwargs))
    return routes
