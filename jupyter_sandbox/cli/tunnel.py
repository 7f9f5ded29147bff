"""``jupyter-sandbox tunnel``: SSH to a sandbox through the Jupyter server's URL.

An OpenSSH ProxyCommand: it copies stdin to an authenticated websocket of the
jupyter-sandbox server extension and the websocket to stdout; the extension
bridges it to the sandbox service's SSH gateway. For hosts where a laptop can
reach only the Jupyter server (JupyterHub, cloud notebooks)::

    ssh -o ProxyCommand='jupyter-sandbox tunnel --url https://hub/user/me/ %h' <token>@<sandbox>

The Jupyter token comes from ``$JUPYTER_TOKEN`` or ``--token-file``; ``--token`` puts
it in argv, where every local user can read it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote, urlsplit, urlunsplit

if TYPE_CHECKING:
    import aiohttp

CHUNK = 64 * 1024


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sandbox", help="sandbox id or name (%%h in a ProxyCommand)")
    parser.add_argument(
        "--url",
        default=os.environ.get("JUPYTER_SERVER_URL"),
        help="the Jupyter server's URL with its base_url (default: $JUPYTER_SERVER_URL)",
    )
    parser.add_argument(
        "--token",
        default=os.environ.get("JUPYTER_TOKEN"),
        help="a Jupyter (or JupyterHub API) token (default: $JUPYTER_TOKEN)",
    )
    parser.add_argument(
        "--token-file",
        metavar="FILE",
        help="read the token from FILE instead (argv is visible to every local user)",
    )
    parser.add_argument(
        "--cookie",
        default=os.environ.get("JUPYTER_COOKIE"),
        help='a login cookie header instead, "name=value; ..." (default: $JUPYTER_COOKIE)',
    )


def tunnel_url(server: str, sandbox: str) -> str:
    """The extension's tunnel websocket URL under the server's base_url."""
    parts = urlsplit(server)
    if parts.scheme not in ("http", "https", "ws", "wss"):
        raise ValueError(f"--url must be an http(s) URL, not {server!r}")
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    path = parts.path.rstrip("/") + f"/sandbox/api/tunnel/{quote(sandbox, safe='')}"
    return urlunsplit((scheme, parts.netloc, path, "", ""))


async def _stdin() -> asyncio.StreamReader:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    pipe = open(sys.stdin.fileno(), "rb", buffering=0, closefd=False)  # noqa: SIM115
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), pipe)
    return reader


async def _upstream(ws: aiohttp.ClientWebSocketResponse) -> None:
    stdin = await _stdin()
    while data := await stdin.read(CHUNK):
        await ws.send_bytes(data)
    await ws.close()


async def tunnel(url: str, headers: dict[str, str]) -> None:
    """Copy stdin to the websocket at `url` and its messages to stdout until either ends.

    `url` is sent exactly as given: a base_url may contain escapes (JupyterHub's ``%40``).
    """
    import aiohttp  # imported on use: the other CLI commands start faster without it
    from yarl import URL

    stdout = sys.stdout.buffer
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(
            URL(url, encoded=True), headers=headers, heartbeat=30, max_msg_size=0
        ) as ws,
    ):
        upstream = asyncio.create_task(_upstream(ws))
        async for message in ws:
            if message.type == aiohttp.WSMsgType.BINARY:
                stdout.write(message.data)
                stdout.flush()
        upstream.cancel()
        if ws.close_code not in (None, 1000):
            raise ConnectionError(f"the server closed the tunnel (code {ws.close_code})")


def run(args: argparse.Namespace) -> int:
    import aiohttp

    if not args.url:
        raise ValueError("give the Jupyter server's URL with --url or $JUPYTER_SERVER_URL")
    headers = {}
    try:
        token = Path(args.token_file).read_text().strip() if args.token_file else args.token
    except OSError as e:
        print(f"jupyter-sandbox tunnel: cannot read --token-file: {e}", file=sys.stderr)
        return 1
    if token:
        headers["Authorization"] = f"token {token}"
    if args.cookie:
        headers["Cookie"] = args.cookie
    try:
        asyncio.run(tunnel(tunnel_url(args.url, args.sandbox), headers))
    except aiohttp.WSServerHandshakeError as e:
        reason = {403: "not authenticated (check --token)", 404: "no such sandbox or server"}
        print(f"jupyter-sandbox tunnel: {reason.get(e.status, e.message)}", file=sys.stderr)
        return 1
    except (aiohttp.ClientError, ConnectionError, ValueError) as e:
        print(f"jupyter-sandbox tunnel: {e}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="jupyter-sandbox tunnel", description=__doc__)
    add_arguments(parser)
    raise SystemExit(run(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
