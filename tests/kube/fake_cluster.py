"""A fake Kubernetes cluster in one process, for tests: the fake API server and kubelet.

    python3 -m tests.kube.fake_cluster --dir DIR [--rbac deploy/kubernetes/rbac.yaml]

prints one JSON line {"kubeconfig": path, "control": url} once it serves, and on
SIGTERM stops, killing every pod process. No real API server or kubelet can run on this
machine; these two are fakes (tests/kube/fake_api.py, tests/kube/kubelet.py), and
everything that talks to them (the official client, the backend, the service, the agent
in each pod) is real.

Control API (plain HTTP on its own port, never affected by the faults it injects):
    GET  /objects/{kind}[?namespace=NS]   the objects of a kind ("pods" or "Pod")
    POST /delete      {"kind", "name", "namespace"?, "grace"?}   delete behind a client's back
    POST /outage      {"seconds", "mode"?}   the API port refuses connections for that long
                                    (mode "hang": it accepts them but answers nothing)
    POST /expire_watches            every open watch gets 410; older versions are compacted
    GET  /stats                     request counts per verb and resource, watch events sent
    POST /stats/reset               start counting again
    GET  /pod_pids                  {namespace/name: [host pids of the pod's processes]}
    GET  /command_pids              {namespace/name: host pid of the container's command}
    GET  /node                      the node's allocatable cpu (millicores), memory, disk
    POST /node        {"cpu"?, "memory"?, "ephemeral-storage"?}   change it (quantities):
                                    pods that no longer fit stay Pending, Unschedulable
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from pathlib import Path

from aiohttp import web

from tests.kube.fake_api import (
    ApiError,
    ApiServer,
    Controllers,
    Rbac,
    Store,
    kubeconfig,
    new_token,
    resource_named,
)
from tests.kube.kubelet import Kubelet, millicores, parse_bytes

NAMESPACE = "jupyter-sandbox"


class Cluster:
    """The store, the API server, its controllers and one kubelet, with fault controls."""

    def __init__(self, directory: Path, rbac: Path | None = None, bookmark_interval: float = 60.0):
        self.directory = directory
        self.store = Store()
        policy = Rbac.from_manifest(rbac, NAMESPACE) if rbac else None
        self.api = ApiServer(self.store, new_token(), policy, bookmark_interval)
        self.controllers = Controllers(self.store)
        self.kubelet = Kubelet(self.store, directory / "node")
        self.api.log_reader = self.kubelet.log_of
        self.control = web.Application()
        self.control.add_routes(
            [
                web.get("/objects/{kind}", self._objects),
                web.post("/delete", self._delete),
                web.post("/outage", self._outage),
                web.post("/expire_watches", self._expire),
                web.get("/stats", self._stats),
                web.post("/stats/reset", self._reset_stats),
                web.get("/pod_pids", self._pod_pids),
                web.get("/command_pids", self._command_pids),
                web.get("/node", self._node),
                web.post("/node", self._node),
            ]
        )
        self.control_runner = web.AppRunner(self.control, access_log=None)
        self.control_url = ""

    async def start(self) -> dict:
        """Serve; returns what the process prints: the kubeconfig path and control URL."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self.controllers.start()
        self.kubelet.start(self.api.url)
        await self.api.start()
        self.kubelet.api_url = self.api.url
        await self.control_runner.setup()
        site = web.TCPSite(self.control_runner, "127.0.0.1", 0)
        await site.start()
        self.control_url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
        path = self.directory / "kubeconfig"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(kubeconfig(self.api.url, self.api.token, NAMESPACE), f, indent=1)
        return {"kubeconfig": str(path), "control": self.control_url}

    async def stop(self) -> None:
        await self.kubelet.stop()
        await self.controllers.stop()
        await self.api.close()
        await self.control_runner.cleanup()

    # control endpoints
    async def _objects(self, request: web.Request) -> web.Response:
        try:
            resource = resource_named(request.match_info["kind"])
        except KeyError as exc:
            return web.json_response({"error": str(exc)}, status=404)
        return web.json_response(self.store.items(resource, request.query.get("namespace")))

    async def _delete(self, request: web.Request) -> web.Response:
        body = await request.json()
        try:
            resource = resource_named(body["kind"])
            namespace = body.get("namespace", NAMESPACE if resource.namespaced else "")
            obj, gone = self.store.delete(resource, namespace, body["name"], body.get("grace"))
        except KeyError as exc:
            return web.json_response({"error": f"missing or unknown {exc}"}, status=400)
        except ApiError as error:
            return web.json_response(error.status(), status=error.code)
        return web.json_response({"object": obj, "gone": gone})

    async def _outage(self, request: web.Request) -> web.Response:
        body = await request.json()
        seconds, mode = float(body["seconds"]), body.get("mode", "refuse")
        try:
            await self.api.outage(seconds, mode)
        except ValueError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response({"down_for": seconds, "mode": mode, "port": self.api.port})

    async def _expire(self, request: web.Request) -> web.Response:
        return web.json_response({"expired_watches": self.api.expire_watches()})

    async def _stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.api.stats())

    async def _reset_stats(self, request: web.Request) -> web.Response:
        self.api.requests.clear()
        self.api.watch_events.clear()
        return web.json_response({})

    async def _node(self, request: web.Request) -> web.Response:
        if request.method == "POST":
            body = await request.json()
            try:
                if "cpu" in body:
                    self.kubelet.capacity["cpu"] = millicores(body["cpu"])
                for name in ("memory", "ephemeral-storage"):
                    if name in body:
                        self.kubelet.capacity[name] = parse_bytes(body[name])
            except (TypeError, ValueError) as exc:
                return web.json_response({"error": f"not a quantity: {exc}"}, status=400)
            self.kubelet.wake_waiting()
        return web.json_response(dict(self.kubelet.capacity))

    async def _command_pids(self, request: web.Request) -> web.Response:
        return web.json_response(self.kubelet.command_pids())

    async def _pod_pids(self, request: web.Request) -> web.Response:
        return web.json_response({key: sorted(pids) for key, pids in self.kubelet.pids().items()})


async def serve(args: argparse.Namespace) -> None:
    cluster = Cluster(Path(args.dir).resolve(), args.rbac, args.bookmark_interval)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    ready = await cluster.start()
    print(json.dumps(ready), flush=True)
    await stopping.wait()
    await cluster.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", required=True, help="where volumes, logs and the kubeconfig go")
    parser.add_argument("--rbac", type=Path, help="a Role manifest whose rules are enforced")
    parser.add_argument(
        "--bookmark-interval", type=float, default=60.0, help="seconds between BOOKMARK events"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()
