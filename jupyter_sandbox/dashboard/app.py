"""The dashboard's tornado application and its entry point."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal

from tornado import web

from .config import DashboardConfig
from .handlers import handlers
from .service import SystemService

log = logging.getLogger("jupyter_sandbox.dashboard")
CLOSE_TIMEOUT = 5.0


def make_app(config: DashboardConfig, service: SystemService) -> web.Application:
    """The dashboard under `config.prefix`, acting through `service`."""
    return web.Application(
        handlers(config, service),
        # Login state cookies are signed with a key of this process: a restart logs
        # everyone in again through the hub, which is silent for a hub session.
        cookie_secret=secrets.token_bytes(32),
        xsrf_cookies=True,
        websocket_ping_interval=30,
    )


async def serve(config: DashboardConfig) -> None:
    service = SystemService()
    server = make_app(config, service).listen(config.port, config.host, xheaders=True)
    log.info("sandbox dashboard at http://%s:%d%s", config.host, config.port, config.prefix)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.stop()
    # Followed logs and tunnels stay open until their sandbox ends: end them now.
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(server.close_all_connections(), CLOSE_TIMEOUT)
    await service.close()


def main(argv: list[str] | None = None) -> None:
    config = DashboardConfig.from_args(argv)
    if not os.environ.get("JUPYTERHUB_API_TOKEN"):
        raise SystemExit(
            "the sandbox dashboard runs as a JupyterHub service: add it to "
            "c.JupyterHub.services in jupyterhub_config.py (see the README's JupyterHub "
            "section) and the hub starts it with its token"
        )
    logging.basicConfig(level=logging.INFO, format="[dashboard %(levelname)s] %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request is noise
    asyncio.run(serve(config))
