"""A fake kubelet and scheduler of one node, for tests: no real one can run here.

The scheduler part binds a pod to the node once its PVCs exist and its resource
requests fit the node's allocatable cpu, memory and ephemeral-storage (a large node's,
64 cpu, 256Gi and 1Ti, or what the fake cluster's control API sets); until then the pod
stays Pending with PodScheduled False, reason Unschedulable and the real scheduler's
message.

It runs every pod of the fake API server's store on this machine: container 0's command
in bubblewrap (tests/kube/pod_runner.py) with the pod's uid/gid, env (value,
secretKeyRef, configMapKeyRef, fieldRef, envFrom, $(VAR) expansion) and volumes
materialised as host directories under its directory (configMap and secret keys as files,
emptyDir, emptyDir medium Memory as a tmpfs, PVC directories that outlive pods and go
when the claim is deleted). Each pod gets its own loopback address (127.0.x.y) as pod IP.
Its status moves as a real kubelet's does: Pending with PodScheduled, Running with
podIP/hostIP/startTime, Ready once the readinessProbe's TCP port accepts (probed every
periodSeconds), then Failed/Succeeded with the container's terminated state. Deletion:
SIGTERM, SIGKILL after the grace period, then the final delete.

Knowingly left out: the image (the host's programs run the command), resource limits
(recorded, not enforced: no OOMKilled), restarts (restartPolicy Always/OnFailure pods
end like Never ones), init and sidecar containers, liveness/startup probes, exec and
httpGet probes, NetworkPolicy (pods share the host network), and pod events. A pod's
processes run as the fake cluster's own host uid (root when it runs as root) mapped to
runAsUser/runAsGroup inside a user namespace, not as that host uid; fsGroup is ignored;
secret volumes are files on disk, not a tmpfs.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import logging
import os
import random
import re
import shutil
import signal
import socket
import struct
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tests.kube import pod_runner
from tests.kube.fake_api import BY_PLURAL, ApiError, Event, Resource, Store, now_rfc3339

log = logging.getLogger(__name__)

NODE_NAME = "fake-node"
HOST_IP = "127.0.0.1"
IMAGE_PATH = "/usr/local/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
IMAGE_CMD = ["python3"]  # python:3.12-slim's CMD, for a container without a command
MIN_KILL_GRACE = 2  # seconds a force-deleted pod's container still gets after SIGTERM
PODS, SECRETS, CONFIGMAPS, PVCS = (
    BY_PLURAL[p] for p in ("pods", "secrets", "configmaps", "persistentvolumeclaims")
)


class NotYet(Exception):
    """The container cannot start yet (a missing secret, config map or claim)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason, self.message = reason, message


def _sub_path(volume: Path, mount: dict) -> Path:
    """What a volumeMount's subPath binds: that file or directory of the volume (for a
    configMap or secret, the key's file), made as an empty directory when it is missing,
    as a kubelet does."""
    sub_path = mount["subPath"]
    if sub_path.startswith("/") or ".." in Path(sub_path).parts:
        raise NotYet(
            "CreateContainerConfigError",
            f'volumeMount "{mount["name"]}": subPath {sub_path!r} must be a relative path '
            "without '..'",
        )
    path = volume / sub_path
    if not path.exists():
        path.mkdir(parents=True)
    return path


class IpPool:
    """Unique pod IPs on loopback, handed out in turn so a freed one is reused last.

    Other fake clusters may run on this machine at the same time: the pool starts at a
    random place and skips every address some socket of this host already uses.
    """

    SIZE = 253 * 254  # 127.0.2.1 - 127.0.254.254

    def __init__(self) -> None:
        self.used: set[str] = set()
        self.next = random.randrange(self.SIZE)

    def take(self) -> str:
        busy = self.used | addresses_in_use()
        for _ in range(self.SIZE):
            x, y = divmod(self.next, 254)
            self.next = (self.next + 1) % self.SIZE
            ip = f"127.0.{x + 2}.{y + 1}"
            if ip not in busy:
                self.used.add(ip)
                return ip
        raise RuntimeError("no free pod IP left in 127.0.2.1-127.0.254.254")

    def give_back(self, ip: str) -> None:
        self.used.discard(ip)


def addresses_in_use() -> set[str]:
    """The local IPv4 addresses of this host's TCP and UDP sockets."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/udp"):
        with contextlib.suppress(OSError), open(table) as f:
            for line in list(f)[1:]:
                local = line.split()[1].split(":")[0]
                found.add(socket.inet_ntoa(struct.pack("<I", int(local, 16))))
    return found


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion: $$ is a literal $, an unknown $(X) stays as it is."""

    def one(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))

    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)", one, text)


def _field(pod: dict, path: str, pod_ip: str) -> str:
    meta = pod["metadata"]
    if m := re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path):
        return (meta.get(m.group(1)) or {}).get(m.group(2), "")
    values = {
        "metadata.name": meta["name"],
        "metadata.namespace": meta.get("namespace", ""),
        "metadata.uid": meta["uid"],
        "spec.nodeName": NODE_NAME,
        "spec.serviceAccountName": pod["spec"].get("serviceAccountName", ""),
        "status.podIP": pod_ip,
        "status.podIPs": pod_ip,
        "status.hostIP": HOST_IP,
        "status.hostIPs": HOST_IP,
    }
    if path not in values:
        raise NotYet("CreateContainerConfigError", f"unsupported fieldRef fieldPath {path!r}")
    return values[path]


@dataclass
class PodWorker:
    """What the kubelet holds for one pod it runs."""

    namespace: str
    name: str
    uid: str
    directory: Path
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    container: pod_runner.Container | None = None
    pod_ip: str = ""
    task: asyncio.Task | None = None


class Kubelet:
    """Runs the pods of a store on this machine."""

    def __init__(self, store: Store, directory: Path, capacity: dict[str, int] | None = None):
        self.store = store
        self.directory = directory
        self.capacity = Counter(capacity or NODE_CAPACITY)
        self.workers: dict[str, PodWorker] = {}
        self.ips = IpPool()
        self.api_url = ""
        self.running = False

    # lifecycle
    def start(self, api_url: str) -> None:
        self.api_url = api_url
        self.running = True
        (self.directory / "pods").mkdir(parents=True, exist_ok=True)
        (self.directory / "pvcs").mkdir(parents=True, exist_ok=True)
        self.store.listeners.append(self._on_event)
        for pod in self.store.items(PODS):
            self._ensure_worker(pod)

    async def stop(self) -> None:
        """Kill every pod's container and wait for the workers to end."""
        self.running = False
        with contextlib.suppress(ValueError):
            self.store.listeners.remove(self._on_event)
        for worker in self.workers.values():
            if worker.container is not None:
                pod_runner.stop_container(worker.container)
            if worker.task is not None:
                worker.task.cancel()
        await asyncio.gather(
            *(w.task for w in self.workers.values() if w.task), return_exceptions=True
        )
        for worker in list(self.workers.values()):
            self._clean_up(worker)

    def pids(self) -> dict[str, set[int]]:
        """Host pids of each running pod's processes (bwrap's included)."""
        return {
            f"{w.namespace}/{w.name}": pod_runner.pids_of(w.container)
            for w in self.workers.values()
            if w.container is not None and w.container.poll() is None
        }

    def command_pids(self) -> dict[str, int]:
        """The host pid of each running container's command (pid 1 in its pod)."""
        return {
            f"{w.namespace}/{w.name}": w.container.container_pid
            for w in self.workers.values()
            if w.container is not None and w.container.poll() is None
        }

    def log_of(self, namespace: str, name: str) -> str:
        for worker in self.workers.values():
            if (worker.namespace, worker.name) == (namespace, name):
                with contextlib.suppress(OSError):
                    return (worker.directory / "log").read_text(errors="replace")
        return ""

    # events
    def _on_event(self, event: Event) -> None:
        if not self.running:
            return
        if event.resource is PODS:
            worker = self.workers.get(event.obj["metadata"]["uid"])
            if worker is not None:
                worker.wake.set()
            elif event.type != "DELETED":
                self._ensure_worker(event.obj)
        if event.resource is PVCS and event.type == "DELETED":
            meta = event.obj["metadata"]
            shutil.rmtree(self._claim_dir(meta["namespace"], meta["name"]), ignore_errors=True)
        if event.resource in (PODS, SECRETS, CONFIGMAPS, PVCS):
            self.wake_waiting()

    def wake_waiting(self) -> None:
        """Let every pod that waits to be scheduled or started look again."""
        for worker in self.workers.values():
            if worker.container is None:
                worker.wake.set()

    def _ensure_worker(self, pod: dict) -> None:
        meta = pod["metadata"]
        if meta["uid"] in self.workers:
            return
        worker = PodWorker(
            meta["namespace"], meta["name"], meta["uid"], self.directory / "pods" / meta["uid"]
        )
        self.workers[meta["uid"]] = worker
        worker.task = asyncio.get_running_loop().create_task(self._run(worker))

    def _pod(self, worker: PodWorker) -> dict | None:
        pod = self.store.find(PODS, worker.namespace, worker.name)
        return pod if pod is not None and pod["metadata"]["uid"] == worker.uid else None

    async def _wait(self, worker: PodWorker, timeout: float | None) -> None:
        """Until the pod (or what it waits for) changes, or `timeout` seconds pass."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(worker.wake.wait(), timeout)
        worker.wake.clear()

    # one pod
    async def _run(self, worker: PodWorker) -> None:
        try:
            await self._run_pod(worker)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("kubelet: pod %s/%s failed", worker.namespace, worker.name)
        finally:
            if self.running:
                self._clean_up(worker)

    async def _run_pod(self, worker: PodWorker) -> None:
        pod = self._pod(worker)
        if pod is None:
            return
        while not pod["spec"].get("nodeName"):  # the scheduler's part
            if pod["metadata"].get("deletionTimestamp"):
                return
            if (why := self._unschedulable(pod)) is None:
                self._bind(pod)
                break
            self._set_unschedulable(worker, pod, why)
            await self._wait(worker, 5.0)
            if (pod := self._pod(worker)) is None:
                return
        self._set_status(worker, "Pending", {"waiting": {"reason": "ContainerCreating"}})
        while True:  # wait until the container can start
            pod = self._pod(worker)
            if pod is None or pod["metadata"].get("deletionTimestamp"):
                return await self._finish(worker, pod, None)
            try:
                worker.pod_ip = worker.pod_ip or self.ips.take()
                self._start(worker, pod)
                break
            except NotYet as why:
                self._set_status(
                    worker, "Pending", {"waiting": {"reason": why.reason, "message": why.message}}
                )
                await self._wait(worker, 1.0)
            except RuntimeError as exc:
                failure = {"exitCode": 128, "reason": "StartError", "message": str(exc)}
                return await self._finish(worker, pod, None, failure)
        started = now_rfc3339()
        running = {"running": {"startedAt": started}}
        probe = pod["spec"]["containers"][0].get("readinessProbe") or {}
        ready = not probe
        self._set_status(worker, "Running", running, ready=ready, start_time=started)
        exited = self._exit_future(worker.container)
        next_probe = time.monotonic() + probe.get("initialDelaySeconds", 0)
        successes = failures = 0
        while not exited.done():
            pod = self._pod(worker)
            if pod is None or pod["metadata"].get("deletionTimestamp"):
                break
            if probe and time.monotonic() >= next_probe:
                ok = await self._probe(worker, pod, probe)
                successes, failures = (successes + 1, 0) if ok else (0, failures + 1)
                if not ready and successes >= probe.get("successThreshold", 1):
                    ready = True
                elif ready and failures >= probe.get("failureThreshold", 3):
                    ready = False
                self._set_status(worker, "Running", running, ready=ready)
                next_probe = time.monotonic() + probe.get("periodSeconds", 10)
            left = next_probe - time.monotonic() if probe else None
            waker = asyncio.ensure_future(worker.wake.wait())
            await asyncio.wait(
                {waker, exited},
                timeout=max(0.0, left) if left is not None else None,
                return_when=asyncio.FIRST_COMPLETED,
            )
            waker.cancel()
            worker.wake.clear()
        await self._finish(worker, self._pod(worker), started)

    def _unschedulable(self, pod: dict) -> str | None:
        """Why the scheduler cannot bind the pod to this node (None: it can)."""
        namespace = pod["metadata"]["namespace"]
        for volume in pod["spec"].get("volumes") or []:
            claim = (volume.get("persistentVolumeClaim") or {}).get("claimName")
            if claim is None:
                continue
            pvc = self.store.find(PVCS, namespace, claim)
            if pvc is None or pvc["metadata"].get("deletionTimestamp"):
                state = "not found" if pvc is None else "is being deleted"
                return (
                    f'0/1 nodes are available: persistentvolumeclaim "{claim}" {state}. '
                    "preemption: 0/1 nodes are available: 1 Preemption is not helpful for "
                    "scheduling."
                )
        used = Counter()
        for other in self.store.items(PODS):
            if other["spec"].get("nodeName") == NODE_NAME and other["status"].get("phase") not in (
                "Succeeded",
                "Failed",
            ):
                used.update(requests_of(other))
        wanted = requests_of(pod)
        short = [r for r in RESOURCE_NAMES if wanted[r] and used[r] + wanted[r] > self.capacity[r]]
        if not short:
            return None
        listed = ", ".join(f"1 Insufficient {r}" for r in short)
        return (
            f"0/1 nodes are available: {listed}. preemption: 0/1 nodes are available: 1 No "
            "preemption victims found for incoming pod."
        )

    def _set_unschedulable(self, worker: PodWorker, pod: dict, why: str) -> None:
        old = {c["type"]: c for c in pod["status"].get("conditions") or []}.get("PodScheduled")
        condition = {
            "type": "PodScheduled",
            "status": "False",
            "lastProbeTime": None,
            "lastTransitionTime": old["lastTransitionTime"] if old else now_rfc3339(),
            "reason": "Unschedulable",
            "message": why,
        }
        status = dict(pod["status"], phase="Pending", conditions=[condition])
        self.store.write_status(PODS, worker.namespace, worker.name, status)

    def _bind(self, pod: dict) -> None:
        """The scheduler's binding: the pod goes to this node."""
        new = copy.deepcopy(pod)
        new["spec"]["nodeName"] = NODE_NAME
        new["status"]["conditions"] = [
            {
                "type": "PodScheduled",
                "status": "True",
                "lastProbeTime": None,
                "lastTransitionTime": now_rfc3339(),
            }
        ]
        self.store.write(PODS, new)

    async def _probe(self, worker: PodWorker, pod: dict, probe: dict) -> bool:
        port = (probe.get("tcpSocket") or {}).get("port")
        if isinstance(port, str):
            named = {
                p.get("name"): p.get("containerPort")
                for p in pod["spec"]["containers"][0].get("ports") or []
            }
            port = named.get(port, port)
        if not isinstance(port, int):
            return False
        try:
            _, writer = await asyncio.wait_for(
                asyncio.open_connection((probe["tcpSocket"].get("host") or worker.pod_ip), port),
                probe.get("timeoutSeconds", 1),
            )
        except (OSError, TimeoutError):
            return False
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return True

    def _exit_future(self, container: pod_runner.Container) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        fd = os.pidfd_open(container.pid)

        def exited() -> None:
            loop.remove_reader(fd)
            os.close(fd)
            if not future.done():
                future.set_result(container.wait())

        loop.add_reader(fd, exited)
        return future

    async def _finish(
        self, worker: PodWorker, pod: dict | None, started: str | None, failure: dict | None = None
    ) -> None:
        """Stop the container (deleted pod) or record its end; then finish a deletion."""
        container = worker.container
        if container is not None and container.poll() is None:
            grace = MIN_KILL_GRACE
            if pod is not None:
                grace = pod["metadata"].get("deletionGracePeriodSeconds", grace)
            container.signal_command(signal.SIGTERM)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._exit_future(container), grace)
            pod_runner.stop_container(container)
        if container is not None:
            code = container.wait()
            code = 128 - code if code < 0 else code
            terminated = {
                "exitCode": code,
                "reason": "Completed" if code == 0 else "Error",
                "startedAt": started,
                "finishedAt": now_rfc3339(),
                "containerID": self._container_id(worker),
            }
            if code > 128:
                terminated["signal"] = code - 128
            self._set_status(
                worker, "Succeeded" if code == 0 else "Failed", {"terminated": terminated}
            )
        elif failure is not None:
            self._set_status(worker, "Failed", {"terminated": failure})
        while (pod := self._pod(worker)) is not None:
            if pod["metadata"].get("deletionTimestamp"):
                with contextlib.suppress(ApiError):
                    self.store.delete(
                        PODS, worker.namespace, worker.name, 0, preconditions={"uid": worker.uid}
                    )
                return
            await self._wait(worker, None)  # an ended pod stays until it is deleted

    def _clean_up(self, worker: PodWorker) -> None:
        """Forget a pod: its container (if a failure left it running), IP and volumes."""
        if worker.container is not None:
            pod_runner.stop_container(worker.container)
        self.workers.pop(worker.uid, None)
        if worker.pod_ip:
            self.ips.give_back(worker.pod_ip)
        shutil.rmtree(worker.directory, ignore_errors=True)

    # starting a container
    def _start(self, worker: PodWorker, pod: dict) -> None:
        spec = pod["spec"]
        container = spec["containers"][0]
        pod_security = spec.get("securityContext") or {}
        security = container.get("securityContext") or {}
        uid = security.get("runAsUser", pod_security.get("runAsUser", 0))
        gid = security.get("runAsGroup", pod_security.get("runAsGroup", 0))
        if uid == 0 and security.get("runAsNonRoot", pod_security.get("runAsNonRoot")):
            raise NotYet(
                "CreateContainerConfigError",
                "container has runAsNonRoot and image will run as root (pod: "
                f'"{worker.name}_{worker.namespace}({worker.uid})", '
                f"container: {container['name']})",
            )
        env = self._env(pod, container, worker.pod_ip, uid)
        mounts, read_only, tmpfs = self._volumes(worker, pod, container)
        seccomp = (security.get("seccompProfile") or pod_security.get("seccompProfile") or {}).get(
            "type"
        )
        command = [expand(a, env) for a in container.get("command") or IMAGE_CMD]
        command += [expand(a, env) for a in container.get("args") or []]
        worker.directory.mkdir(parents=True, exist_ok=True)
        with open(worker.directory / "log", "ab") as output:
            worker.container = pod_runner.start_container(
                command,
                env,
                mounts,
                worker.pod_ip,
                uid,
                container.get("workingDir") or "/",
                gid=gid,
                read_only=read_only,
                tmpfs=tmpfs,
                hostname=spec.get("hostname") or worker.name,
                forbid_userns=seccomp == "RuntimeDefault",
                stdout=output.fileno(),
                stderr=output.fileno(),
            )

    def _lookup(self, resource: Resource, namespace: str, ref: dict, key: str | None) -> str | None:
        """A key of a secret/config map (decoded), or None when optional and missing."""
        obj = self.store.find(resource, namespace, ref.get("name", ""))
        kind = "secret" if resource is SECRETS else "configmap"
        if obj is None:
            if ref.get("optional"):
                return None
            raise NotYet("CreateContainerConfigError", f'{kind} "{ref.get("name")}" not found')
        if key is None:
            return ""
        if resource is SECRETS and key in (obj.get("data") or {}):
            return base64.b64decode(obj["data"][key]).decode(errors="replace")
        if resource is CONFIGMAPS and key in (obj.get("data") or {}):
            return obj["data"][key]
        if ref.get("optional"):
            return None
        raise NotYet(
            "CreateContainerConfigError",
            f"couldn't find key {key} in {kind.capitalize()} {namespace}/{ref.get('name')}",
        )

    def _env(self, pod: dict, container: dict, pod_ip: str, uid: int) -> dict[str, str]:
        namespace = pod["metadata"]["namespace"]
        host, port = (
            self.api_url.removeprefix("http://").rsplit(":", 1) if self.api_url else ("", "")
        )
        env = {
            "PATH": IMAGE_PATH,
            "LANG": "C.UTF-8",
            "HOSTNAME": pod["spec"].get("hostname") or pod["metadata"]["name"],
            "HOME": "/root" if uid == 0 else "/",
        }
        service = {
            "KUBERNETES_SERVICE_HOST": host,
            "KUBERNETES_SERVICE_PORT": port,
            "KUBERNETES_PORT": f"tcp://{host}:{port}",
        }
        for source in container.get("envFrom") or []:
            prefix = source.get("prefix", "")
            for resource, key in ((CONFIGMAPS, "configMapRef"), (SECRETS, "secretRef")):
                if ref := source.get(key):
                    obj = self.store.find(resource, namespace, ref.get("name", ""))
                    if obj is None and not ref.get("optional"):
                        kind = "secret" if resource is SECRETS else "configmap"
                        raise NotYet(
                            "CreateContainerConfigError", f'{kind} "{ref.get("name")}" not found'
                        )
                    for k in (obj or {}).get("data") or {}:
                        env[prefix + k] = self._lookup(resource, namespace, ref, k) or ""
        for item in container.get("env") or []:
            name = item["name"]
            if "valueFrom" not in item:
                env[name] = expand(item.get("value", ""), {**service, **env})
                continue
            source = item["valueFrom"]
            if ref := source.get("secretKeyRef"):
                value = self._lookup(SECRETS, namespace, ref, ref.get("key"))
            elif ref := source.get("configMapKeyRef"):
                value = self._lookup(CONFIGMAPS, namespace, ref, ref.get("key"))
            elif ref := source.get("fieldRef"):
                value = _field(pod, ref.get("fieldPath", ""), pod_ip)
            else:
                raise NotYet(
                    "CreateContainerConfigError",
                    f"env {name}: unsupported valueFrom {sorted(source)}",
                )
            if value is not None:
                env[name] = value
        return {**service, **env}  # the API server's address, even without service links

    def _claim_dir(self, namespace: str, claim: str) -> Path:
        return self.directory / "pvcs" / namespace / claim

    def _volumes(self, worker: PodWorker, pod: dict, container: dict) -> tuple[dict, set, dict]:
        """Host paths for the container's mounts: (mounts, read-only paths, tmpfs sizes)."""
        namespace = worker.namespace
        volumes = {v["name"]: v for v in pod["spec"].get("volumes") or []}
        sources: dict[str, Path | None] = {}
        sizes: dict[str, int | None] = {}
        root = worker.directory / "volumes"
        for name, volume in volumes.items():
            path = root / name
            if "emptyDir" in volume:
                empty = volume["emptyDir"] or {}
                if empty.get("medium") == "Memory":
                    sources[name] = None
                    sizes[name] = parse_bytes(empty.get("sizeLimit"))
                    continue
                path.mkdir(parents=True, exist_ok=True)
            elif "configMap" in volume or "secret" in volume:
                is_secret = "secret" in volume
                ref = dict(volume["secret" if is_secret else "configMap"])
                if is_secret:
                    ref["name"] = ref.get("secretName", "")
                obj = self.store.find(SECRETS if is_secret else CONFIGMAPS, namespace, ref["name"])
                if obj is None and not ref.get("optional"):
                    kind = "secret" if is_secret else "configmap"
                    raise NotYet(
                        "ContainerCreating",
                        f'MountVolume.SetUp failed for volume "{name}" : '
                        f'{kind} "{ref["name"]}" not found',
                    )
                files = {}
                for key, value in ((obj or {}).get("data") or {}).items():
                    files[key] = base64.b64decode(value) if is_secret else value.encode()
                for key, value in ((obj or {}).get("binaryData") or {}).items():
                    files[key] = base64.b64decode(value)
                items = ref.get("items")
                if items:
                    files = {
                        i.get("path", i["key"]): files[i["key"]] for i in items if i["key"] in files
                    }
                mode = ref.get("defaultMode", 0o644)
                shutil.rmtree(path, ignore_errors=True)
                path.mkdir(parents=True)
                for key, data in files.items():
                    target = path / key
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(data)
                    os.chmod(target, mode)
            elif "persistentVolumeClaim" in volume:
                claim = volume["persistentVolumeClaim"].get("claimName", "")
                pvc = self.store.find(PVCS, namespace, claim)
                if pvc is None or pvc["metadata"].get("deletionTimestamp"):
                    raise NotYet("ContainerCreating", f'persistentvolumeclaim "{claim}" not found')
                if pvc.get("status", {}).get("phase") != "Bound":
                    raise NotYet(
                        "ContainerCreating", f'persistentvolumeclaim "{claim}" is not bound'
                    )
                path = self._claim_dir(namespace, claim)
                path.mkdir(parents=True, exist_ok=True)
            else:
                raise NotYet(
                    "ContainerCreating",
                    f'volume "{name}": this fake node supports emptyDir, configMap, secret '
                    "and persistentVolumeClaim only",
                )
            sources[name] = path
        mounts: dict[str, Path] = {}
        read_only: set[str] = set()
        tmpfs: dict[str, int | None] = {}
        for mount in container.get("volumeMounts") or []:
            name, target = mount["name"], mount["mountPath"]
            if name not in volumes:
                raise NotYet(
                    "CreateContainerConfigError", f'volumeMount "{name}" names no volume of the pod'
                )
            if sources[name] is None:
                tmpfs[target] = sizes[name]
                continue
            mounts[target] = (
                _sub_path(sources[name], mount) if mount.get("subPath") else sources[name]
            )
            secret_or_config = {"secret", "configMap"} & set(volumes[name])
            if mount.get("readOnly") or secret_or_config:
                read_only.add(target)
        return mounts, read_only, tmpfs

    # status
    def _container_id(self, worker: PodWorker) -> str:
        return "containerd://" + worker.uid.replace("-", "")

    def _set_status(
        self,
        worker: PodWorker,
        phase: str,
        state: dict,
        ready: bool = False,
        start_time: str | None = None,
    ) -> None:
        pod = self._pod(worker)
        if pod is None:
            return
        container = pod["spec"]["containers"][0]
        status = copy.deepcopy(pod.get("status") or {})
        now = now_rfc3339()
        running = "running" in state
        created = running or "terminated" in state
        want = {
            "PodReadyToStartContainers": created or bool(worker.pod_ip),
            "Initialized": True,
            "Ready": ready and running,
            "ContainersReady": ready and running,
            "PodScheduled": True,
        }
        old = {c["type"]: c for c in status.get("conditions") or []}
        conditions = []
        for kind, value in want.items():
            text = "True" if value else "False"
            before = old.get(kind)
            entry = {"type": kind, "status": text, "lastProbeTime": None}
            entry["lastTransitionTime"] = (
                before["lastTransitionTime"] if before and before["status"] == text else now
            )
            if not value and kind in ("Ready", "ContainersReady"):
                entry["reason"] = (
                    "PodCompleted"
                    if "terminated" in state and phase == "Succeeded"
                    else "ContainersNotReady"
                )
                entry["message"] = f"containers with unready status: [{container['name']}]"
            conditions.append(entry)
        status.update(phase=phase, conditions=conditions, hostIP=HOST_IP, hostIPs=[{"ip": HOST_IP}])
        if created:
            status.update(podIP=worker.pod_ip, podIPs=[{"ip": worker.pod_ip}])
        if start_time or "startTime" not in status:
            status["startTime"] = start_time or now
        entry = {
            "name": container["name"],
            "state": state,
            "lastState": {},
            "ready": ready and running,
            "restartCount": 0,
            "image": full_image_name(container.get("image", "")),
            "imageID": "",
            "started": running,
        }
        if created:
            entry["containerID"] = self._container_id(worker)
            repository = full_image_name(container.get("image", "")).rsplit(":", 1)[0]
            entry["imageID"] = f"{repository}@sha256:{'0' * 64}"  # the image is not pulled
        status["containerStatuses"] = [entry]
        self.store.write_status(PODS, worker.namespace, worker.name, status)


def full_image_name(image: str) -> str:
    """The image as containerd reports it (python:3.12-slim: docker.io/library/python:3.12-slim)."""
    first, _, rest = image.partition("/")
    if not rest:
        image = f"docker.io/library/{image}"
    elif "." not in first and ":" not in first and first != "localhost":
        image = f"docker.io/{image}"
    last = image.rsplit("/", 1)[-1]
    return image if ":" in last or "@" in last else f"{image}:latest"


RESOURCE_NAMES = ("cpu", "memory", "ephemeral-storage")


# The node's allocatable resources unless the control API says otherwise: a large
# cluster node's, not this machine's, so the pods of tests fit (limits are not enforced).
NODE_CAPACITY = {"cpu": 64_000, "memory": 256 * 2**30, "ephemeral-storage": 2**40}


def millicores(quantity: str | int | float | None) -> int:
    """A cpu quantity ("500m", "2", 0.5) in millicores."""
    text = str(quantity or 0)
    if text.endswith("m"):
        return int(float(text[:-1]))
    return int(float(text) * 1000)


def requests_of(pod: dict) -> Counter:
    """The pod's resource requests, as the scheduler adds them up."""
    total: Counter = Counter()
    for container in pod["spec"].get("containers") or []:
        requests = (container.get("resources") or {}).get("requests") or {}
        if "cpu" in requests:
            total["cpu"] += millicores(requests["cpu"])
        for name in ("memory", "ephemeral-storage"):
            if name in requests:
                total[name] += parse_bytes(requests[name]) or 0
    return total


def parse_bytes(quantity: str | int | None) -> int | None:
    """A Kubernetes quantity ("64Mi", "1G", "512") as bytes."""
    if quantity is None:
        return None
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(Ki|Mi|Gi|Ti|k|M|G|T)?", str(quantity))
    if not m:
        raise ValueError(f"{quantity!r} is not a quantity such as 64Mi or 1G")
    factors = {
        None: 1,
        "k": 10**3,
        "M": 10**6,
        "G": 10**9,
        "T": 10**12,
        "Ki": 2**10,
        "Mi": 2**20,
        "Gi": 2**30,
        "Ti": 2**40,
    }
    return int(float(m.group(1)) * factors[m.group(2)])
