"""The Kubernetes backend: each sandbox is a pod running the same agent as the local one.

A sandbox is a Secret ``jsb-<id>`` (its agent's TLS pair, the service's client pair
for it, its record), an optional PVC for its home, and one pod per start,
``jsb-<id>-<generation>``. The service reaches the agent over TLS on the pod's IP
(both ends pinned by the Secret's pairs); the API server is used to create and
delete objects and to watch pods, never to carry a sandbox's traffic, so running
sandboxes keep working while it is away.

Pooled sandboxes are pods like any other: a pooled one is told from a claimed one by
its record (status "pooled"), not by a label, so claiming it costs no API call.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from ..._config import Settings
from ..._errors import IsolationUnavailable, SandboxError, ServiceUnavailable
from ..._typed import typed
from ...agent.remote import AgentClient
from ..base import Limits, SandboxSpec
from ..tls import SandboxCredentials
from . import agent_sandbox, objects, reaper, status
from .api import Api, ApiError, ApiUnreachable
from .config import KubernetesSettings, api_configuration
from .lease import InstanceLease
from .records import RecordWriter
from .watch import PodWatch

log = logging.getLogger("jupyter_sandbox.service")

AGENT_SOURCES = Path(__file__).resolve().parent.parent.parent / "agent"
HOST_ONLY = ("__init__.py", "remote.py")  # agent/ modules the service alone uses
SYSCALL_FILTER = "the container runtime's RuntimeDefault seccomp profile"
LIMITS_NOTE = (
    "the pids and open-files limits are not enforced per pod (the node's pod pid limit and "
    "the container runtime's file limit apply), and live CPU and memory use is not "
    "measured for pods"
)
PING_TIMEOUT = 10.0  # seconds a ready pod's agent has to answer
GONE_WAIT = 15.0  # seconds halt and stop wait for a deleted pod to be gone
# Seconds a request that found the agent unreachable waits for the watch to tell the pod's
# end: a kubelet notices a container's exit within its 1 s relist and reports it at once.
AGENT_LOST_WAIT = 5.0
READ_TIMEOUT = 60.0  # seconds read_records waits for the API server
REAP_EVERY = 600.0  # seconds between two looks for objects no record accounts for (it lists
# every Secret of the instance: a few MB for a thousand sandboxes)
REAP_GRACE = 60.0  # seconds past the start timeout before such an object is a leftover
RETRY_REMOVAL = 5.0  # seconds between attempts to delete what a stop could not


SECRET_KEYS = ("agent-cert", "agent-key", "service-cert", "service-key")


def secret_keys(pairs: SandboxCredentials) -> dict[str, bytes]:
    """The Secret's keys for the pairs."""
    values = (pairs.agent_cert, pairs.agent_key, pairs.service_cert, pairs.service_key)
    return dict(zip(SECRET_KEYS, values))


def pairs_of(secret: dict) -> SandboxCredentials | None:
    """The pairs a sandbox's Secret holds; None if any is missing."""
    values = [objects.decode(secret, key) for key in SECRET_KEYS]
    return None if any(v is None for v in values) else SandboxCredentials(*values)


@dataclass
class PodRuntime:
    """One start of a sandbox: its pod, where its agent listens, what it was given."""

    sandbox_id: str
    pod: str  # "" for a stand-in: the pod is not known
    generation: int
    directory: str
    home: str  # "emptydir" or "pvc"
    network: str = "none"
    pod_ip: str = ""
    pod_uid: str = ""  # tells the pod started from one its controller made in its place
    memory: int | None = None
    cpus: float | None = None
    disk: int | None = None
    files_only: bool = False
    limits_note: str | None = LIMITS_NOTE
    syscall_filter: str = SYSCALL_FILTER

    @property
    def files_survive_failure(self) -> bool:
        return self.home == "pvc"  # an emptyDir home is gone with the pod

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> PodRuntime:
        return typed(cls, json.loads(text))


class KubernetesBackend:
    """Starts, finds and stops sandbox pods of one instance in one namespace."""

    def __init__(
        self, storage_dir: Path, settings: Settings, kube: KubernetesSettings | None = None
    ) -> None:
        self.storage = storage_dir
        self.settings = settings
        self.kube = kube or KubernetesSettings.from_env()
        self.sandboxes_dir = storage_dir / "sandboxes"
        # One empty file per sandbox whose stop has not deleted everything yet: a service
        # killed meanwhile must not adopt it again from the record its Secret still holds.
        self.removing_dir = storage_dir / "removing"
        self.selector = objects.selector(self.kube.instance)
        # What one start of a sandbox is: a pod, or an agent-sandbox Sandbox making one.
        self.workload = agent_sandbox.RESOURCE if self.kube.mode == "agent-sandbox" else "pods"
        self.unavailable: str | None = None
        self.api: Api | None = None
        self.watch: PodWatch | None = None
        self.records: RecordWriter | None = None
        self.anchor: objects.Anchor | None = None
        self.lease: InstanceLease | None = None
        self.code = ""  # the agent-code ConfigMap's name
        self.pairs: dict[str, SandboxCredentials] = {}  # by sandbox, from their Secrets
        self.secrets: set[str] = set()  # sandboxes whose Secret exists, as far as known
        self.recorded: set[str] = set()  # sandboxes whose Secret held a record at start
        self.starting: set[str] = set()
        self.stopping: set[str] = set()
        self.deleted_pods: set[str] = set()  # pods this service deleted
        self.generations: dict[str, int] = {}  # the last generation started, by sandbox
        self.unremoved: dict[str, list[tuple[str, str]]] = {}  # a stop could not delete
        self._listed_secrets: list[dict] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task] = set()

    # -- setup ---------------------------------------------------------------------------

    async def prepare(self, data_dir: Path | None = None, uid_base: int = 0) -> None:
        """Connect to the API server, make the instance's shared objects, start watching.

        Raises IsolationUnavailable (no configuration, no permission) or
        ServiceUnavailable (the API server cannot be reached): without the API the
        service cannot know its sandboxes, so it must not start.
        """
        from kubernetes_asyncio.config import ConfigException

        self._loop = asyncio.get_running_loop()
        self.sandboxes_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.removing_dir.mkdir(exist_ok=True, mode=0o700)
        try:
            configuration = await api_configuration()
        except ConfigException as e:
            raise IsolationUnavailable(
                f"the kubernetes backend found no cluster to use ({e}): set KUBECONFIG to a "
                "kubeconfig file, or run the service in a pod with its service account"
            ) from None
        self.api = Api(configuration, self.kube.namespace)
        self.records = RecordWriter(self.api)
        try:
            self.anchor = await self._ensure_anchor()
            self.lease = InstanceLease(
                self.api, self.kube.instance, self.anchor, self.kube.lease_seconds, self._lost
            )
            await self.lease.acquire()
            self.code = await self._ensure(
                "configmaps", objects.agent_code(self.kube.instance, agent_sources(), self.anchor)
            )
            await self._ensure("configmaps", objects.accounts(self.kube.instance, self.anchor))
            for policy in (objects.ingress_policy, objects.no_egress_policy):
                await self._ensure("networkpolicies", policy(self.kube.instance, self.anchor))
            if self.workload != "pods":
                await self._check_sandbox_api()
            self.watch = PodWatch(self.api, self.selector)
            await self.watch.start()
        except BaseException as e:
            if self.lease is not None:
                await self.lease.release()
            await self.api.close()
            if isinstance(e, ApiError):
                raise self._error(e, "setting up the sandbox namespace") from None
            raise
        self._spawn(self.lease.keep())
        self._spawn(self._reap_forever())
        log.info(
            "kubernetes backend: namespace %s, instance %s, image %s",
            self.kube.namespace,
            self.kube.instance,
            self.kube.image,
        )

    async def _check_sandbox_api(self) -> None:
        try:
            await self.api.list(self.workload, self.selector)
        except ApiError as e:
            if e.status == 404:
                raise IsolationUnavailable(
                    agent_sandbox.missing(self.kube.namespace, e.message)
                ) from None
            raise

    async def _ensure_anchor(self) -> objects.Anchor:
        name = objects.anchor_name(self.kube.instance)
        try:
            body = await self.api.get("configmaps", name)
        except ApiError as e:
            if e.status != 404:
                raise
            try:
                body = await self.api.create(
                    "configmaps", objects.anchor_config_map(self.kube.instance)
                )
            except ApiError as e:
                if e.status != 409:
                    raise
                body = await self.api.get("configmaps", name)
        return objects.Anchor(name, body["metadata"]["uid"])

    async def _ensure(self, resource: str, body: dict) -> str:
        """Create a shared object unless it exists; its name."""
        try:
            await self.api.create(resource, body)
        except ApiError as e:
            if e.status != 409:
                raise
        return body["metadata"]["name"]

    async def close(self) -> None:
        """Write what records are queued (briefly), stop watching; sandboxes keep running."""
        if self.records is not None:
            left = await self.records.flush(5.0)
            if left:
                log.warning("%d sandbox record(s) were not written to their Secrets", left)
            await self.records.close()
        for task in list(self._tasks):
            task.cancel()
        if self.watch is not None:
            await self.watch.close()
        if self.lease is not None:
            await self.lease.release()
        if self.api is not None:
            await self.api.close()

    def _lost(self, holder: str) -> None:
        """The instance's Lease is another service's now: that one adopts the sandboxes,
        so this one must neither reap nor write another record. It ends at once, as a
        SIGKILL would (which it survives by design), and its Deployment restarts it."""
        log.critical(
            "another service of instance %s (%s) took its lease while this one could not "
            "renew it: exiting. Run one replica per instance (Deployment replicas: 1, strategy "
            "Recreate)",
            self.kube.instance,
            holder,
        )
        logging.shutdown()
        os._exit(3)

    def limits_status(self) -> str:
        return "kubernetes pod resources"

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _error(self, error: ApiError, doing: str) -> SandboxError:
        """The SandboxError for an API failure while `doing` something, with what to do."""
        where = f"namespace {self.kube.namespace}"
        if isinstance(error, ApiUnreachable):
            return ServiceUnavailable(
                f"{doing} failed: {error.message} cannot be reached. Sandboxes that run keep "
                "working; try again once the API server answers"
            )
        if error.status in (401, 403):
            return IsolationUnavailable(
                f"{doing} failed: the Kubernetes API refused the service ({error.status} "
                f"{error.reason}: {error.message}). Give its service account the Role of "
                f"deploy/kubernetes/rbac.yaml in {where}"
            )
        if error.status == 404 and "namespace" in error.message.lower():
            return IsolationUnavailable(
                f"{doing} failed: {where} does not exist ({error.message}): create it, or "
                "set JUPYTER_SANDBOX_K8S_NAMESPACE"
            )
        return SandboxError(
            f"{doing} failed: the Kubernetes API answered {error.status} {error.reason}: "
            f"{error.message}"
        )

    # -- lifecycle -----------------------------------------------------------------------

    async def start(
        self, spec: SandboxSpec, *, resume: bool = False, files_only: bool = False
    ) -> PodRuntime:
        """Create the sandbox's Secret (and PVC) unless resumed, then a pod; return once
        the pod is ready and its agent answers over TLS."""
        self._check_ready()
        sandbox_id = spec.id
        directory = self.sandboxes_dir / sandbox_id
        created: list[tuple[str, str]] = []  # what to delete if this start fails
        self.starting.add(sandbox_id)
        try:
            if not resume:
                await self._create_sandbox(spec, created)
            elif sandbox_id not in self.pairs:
                await self._load_pairs(sandbox_id)
            await asyncio.to_thread(directory.mkdir, mode=0o700, exist_ok=True)
            if resume:
                await self._delete_pods(sandbox_id)
            generation = self._next_generation(sandbox_id)
            body = objects.pod(
                self.kube,
                sandbox_id=sandbox_id,
                generation=generation,
                network=spec.network,
                limits=spec.limits,
                code=self.code,
                anchor=self.anchor,
                files_only=files_only,
            )
            name = body["metadata"]["name"]
            workload = body if self.workload == "pods" else agent_sandbox.sandbox(body)
            await self.api.create(self.workload, workload)
            created.insert(0, (self.workload, name))
            pod = await self._ready(name)
            runtime = PodRuntime(
                sandbox_id=sandbox_id,
                pod=name,
                generation=generation,
                directory=str(directory),
                home=self.kube.home,
                network=spec.network,
                pod_ip=pod["status"]["podIP"],
                pod_uid=pod["metadata"].get("uid", ""),
                memory=spec.limits.memory,
                cpus=spec.limits.cpus,
                disk=spec.limits.disk,
                files_only=files_only,
            )
            try:
                await asyncio.wait_for(self.agent(runtime).call("ping"), PING_TIMEOUT)
            except Exception as e:
                raise IsolationUnavailable(
                    f"the agent of pod {name} ({runtime.pod_ip}) did not answer over TLS: "
                    f"{e or type(e).__name__}. Check that the image {self.kube.image} has "
                    "python3 and that the service's pods may reach sandbox pods on port "
                    f"{objects.AGENT_PORT}"
                ) from None
            return runtime
        except BaseException as e:
            await self._undo(sandbox_id, created, resume)
            if isinstance(e, ApiError):
                raise self._error(e, f"starting sandbox {sandbox_id}") from None
            raise
        finally:
            self.starting.discard(sandbox_id)

    async def _create_sandbox(self, spec: SandboxSpec, created: list[tuple[str, str]]) -> None:
        """The Secret and PVC of a new sandbox, each added to `created` once made."""
        pairs = await asyncio.to_thread(SandboxCredentials.generate, spec.id)
        body = objects.secret(self.kube.instance, spec.id, secret_keys(pairs), self.anchor)
        await self.api.create("secrets", body)
        created.append(("secrets", body["metadata"]["name"]))
        self.pairs[spec.id] = pairs
        self.secrets.add(spec.id)
        if self.kube.home == "pvc":
            size = spec.limits.disk or self.settings.default_disk
            claim = objects.home_claim(self.kube, spec.id, size, self.anchor)
            await self.api.create("persistentvolumeclaims", claim)
            created.append(("persistentvolumeclaims", claim["metadata"]["name"]))

    def _check_ready(self) -> None:
        if self.api is None or self.watch is None:
            raise IsolationUnavailable("the kubernetes backend is not set up (prepare failed)")

    async def _load_pairs(self, sandbox_id: str) -> None:
        body = await self.api.get("secrets", objects.secret_name(sandbox_id))
        pairs = pairs_of(body)
        if pairs is None:
            raise IsolationUnavailable(
                f"the Secret {objects.secret_name(sandbox_id)} lacks the sandbox's TLS pairs: "
                "kill the sandbox and create a new one"
            )
        self.pairs[sandbox_id] = pairs
        self.secrets.add(sandbox_id)

    def _next_generation(self, sandbox_id: str) -> int:
        seen = [objects.generation_of(p) for p in self.watch.of_sandbox(sandbox_id)]
        last = max([g for g in seen if g is not None] + [self.generations.get(sandbox_id, -1)])
        self.generations[sandbox_id] = last + 1
        return last + 1

    async def _ready(self, name: str) -> dict:
        """The pod once ready; IsolationUnavailable saying where it got to if it ends,
        cannot start, or is not ready within the start timeout."""
        seen = False

        def settled(pod: dict | None) -> bool:
            nonlocal seen
            if pod is None:
                return seen
            seen = True
            return status.ready(pod) or status.ended(pod) or status.stuck(pod) is not None

        timeout = self.kube.start_timeout
        try:
            pod = await self.watch.wait(name, settled, timeout)
        except asyncio.TimeoutError:
            raise IsolationUnavailable(
                f"pod {name} was not ready within {timeout:g} s: "
                f"{status.pending(self.watch.pods.get(name))}. Check the cluster's capacity "
                "and the image, or raise JUPYTER_SANDBOX_K8S_START_TIMEOUT"
            ) from None
        if status.ready(pod):
            return pod
        why = status.stuck(pod)
        if why is None:
            why = status.explain(pod, None, self.kube.home, name in self.deleted_pods)
        raise IsolationUnavailable(
            f"pod {name} did not start: {why}. Check JUPYTER_SANDBOX_K8S_IMAGE "
            f"({self.kube.image}) and the pod's events (kubectl describe pod {name})"
        )

    async def _undo(self, sandbox_id: str, created: list[tuple[str, str]], resume: bool) -> None:
        """Delete what a failed start made (a new sandbox leaves nothing behind)."""
        try:
            await self._delete(created)
        except ApiError as e:
            log.warning("could not undo the start of %s (%s): retrying", sandbox_id, e.message)
            self._retry_removal(sandbox_id, created)
        if not resume:
            self.pairs.pop(sandbox_id, None)
            self.secrets.discard(sandbox_id)
            await asyncio.to_thread(
                shutil.rmtree, self.sandboxes_dir / sandbox_id, ignore_errors=True
            )

    async def _delete_pods(self, sandbox_id: str, also: str = "") -> list[str]:
        """Delete every pod of the sandbox (and the pod `also`); their names."""
        names = {p["metadata"]["name"] for p in self.watch.of_sandbox(sandbox_id)}
        names.discard("")
        if also:
            names.add(also)
        await self._delete([(self.workload, name) for name in sorted(names)])
        return sorted(names)

    async def _gone(self, names: list[str]) -> None:
        for name in names:
            with contextlib.suppress(asyncio.TimeoutError):
                await self.watch.wait(name, lambda pod: pod is None, GONE_WAIT)

    async def halt(self, runtime: PodRuntime) -> None:
        """Delete the sandbox's pod (every pod of it); its Secret and PVC stay."""
        self._check_ready()
        try:
            names = await self._delete_pods(runtime.sandbox_id, runtime.pod)
        except ApiError as e:
            raise self._error(e, f"stopping the pod of sandbox {runtime.sandbox_id}") from None
        await self._gone(names)

    async def stop(self, runtime: PodRuntime) -> None:
        """Delete the sandbox's Secret (its record: first, so nothing of it can be adopted
        again), its pods and PVC, and its directory.

        What the API server does not take now is deleted in the background, retried
        until it is gone; a pod or PVC left by a service killed meanwhile has no record
        any more, so the next service's sweep deletes it."""
        self._check_ready()
        sandbox_id = runtime.sandbox_id
        self.stopping.add(sandbox_id)
        self.records.drop(sandbox_id)
        pods = sorted({p["metadata"]["name"] for p in self.watch.of_sandbox(sandbox_id)})
        if runtime.pod and runtime.pod not in pods:
            pods.append(runtime.pod)
        doomed = self._doomed(sandbox_id, pods, runtime.home == "pvc")
        marker = self.removing_dir / sandbox_id
        await asyncio.to_thread(marker.touch)
        try:
            await self._delete(doomed)
        except ApiError as e:
            log.warning(
                "sandbox %s: %s; its objects are deleted once the API server answers",
                sandbox_id,
                self._error(e, "deleting its objects"),
            )
            self._retry_removal(sandbox_id, doomed)
        else:
            marker.unlink(missing_ok=True)
            await self._gone(pods)
            self.deleted_pods.difference_update(pods)
        finally:
            self.pairs.pop(sandbox_id, None)
            self.secrets.discard(sandbox_id)
            self.recorded.discard(sandbox_id)
            self.generations.pop(sandbox_id, None)
            self.stopping.discard(sandbox_id)
        await asyncio.to_thread(shutil.rmtree, runtime.directory, ignore_errors=True)

    def _doomed(self, sandbox_id: str, pods: list[str], pvc: bool) -> list[tuple[str, str]]:
        """What removing a sandbox deletes: its Secret (first: its record), pods, PVC."""
        doomed = [("secrets", objects.secret_name(sandbox_id))]
        doomed += [(self.workload, name) for name in pods]
        if self.kube.home == "pvc" or pvc:
            doomed.append(("persistentvolumeclaims", objects.pvc_name(sandbox_id)))
        return doomed

    async def _delete(self, doomed: list[tuple[str, str]]) -> None:
        for resource, name in doomed:
            if resource == self.workload:
                self.deleted_pods.add(name)
            await self.api.delete(resource, name, grace=0 if resource == "pods" else None)

    def _retry_removal(self, sandbox_id: str, doomed: list[tuple[str, str]]) -> None:
        first = sandbox_id not in self.unremoved
        self.unremoved.setdefault(sandbox_id, [])
        self.unremoved[sandbox_id] += [d for d in doomed if d not in self.unremoved[sandbox_id]]
        if first:
            self._spawn(self._remove_later(sandbox_id))

    async def _remove_later(self, sandbox_id: str) -> None:
        while self.unremoved.get(sandbox_id):
            await asyncio.sleep(RETRY_REMOVAL)
            try:
                await self._delete(self.unremoved[sandbox_id])
            except ApiError:
                continue
            del self.unremoved[sandbox_id]
            (self.removing_dir / sandbox_id).unlink(missing_ok=True)
            log.info("deleted what was left of sandbox %s", sandbox_id)

    # -- what the watch knows ------------------------------------------------------------

    def serving(self, runtime: PodRuntime) -> bool:
        """Its pod is the one started, ready, not being deleted (from the watch)."""
        pod = self.watch.pods.get(runtime.pod) if self.watch and runtime.pod else None
        return status.ready(pod) and _same_pod(pod, runtime)

    async def failure(
        self,
        runtime: PodRuntime,
        memory: int | None = None,
        service_was_down: bool = False,
        agent_lost: bool = False,
    ) -> str | None:
        """Why the sandbox's pod can no longer serve, from the watch; None while it can.

        While the API server cannot be reached the watch keeps what it last knew, and
        sandboxes keep serving. An agent just found unreachable in a pod the watch still
        sees running: the watch gets AGENT_LOST_WAIT seconds to tell the pod's end."""
        if not runtime.pod:
            return "the service does not know its pod"
        pod = self.watch.pods.get(runtime.pod)
        if agent_lost and not status.ended(pod) and _same_pod(pod, runtime):
            with contextlib.suppress(asyncio.TimeoutError):
                pod = await self.watch.wait(runtime.pod, status.ended, AGENT_LOST_WAIT)
        if pod is not None and not status.ended(pod):
            if _same_pod(pod, runtime):
                return None
            return (
                f"its pod {runtime.pod} was replaced by its controller after it ended or was "
                "deleted: its processes are gone"
                + ("" if runtime.home == "pvc" else ", and with them its emptyDir home")
            )
        reason = status.explain(
            pod, memory or runtime.memory, runtime.home, runtime.pod in self.deleted_pods
        )
        return f"{reason} (while the service was down)" if service_was_down else reason

    def usage(self, runtime: PodRuntime) -> dict | None:
        return None  # the metrics API is not used: runtime.limits_note says so

    def set_limits(self, runtime: PodRuntime, limits: Limits) -> bool:
        """A running pod's resources cannot change: True only if they are the same."""
        return (limits.memory, limits.cpus, limits.disk) == (
            runtime.memory,
            runtime.cpus,
            runtime.disk,
        )

    def agent(self, runtime: PodRuntime) -> AgentClient:
        """A TLS client of the sandbox's agent, pinned to its Secret's pairs."""
        pairs = self.pairs.get(runtime.sandbox_id)
        if pairs is None:
            raise SandboxError(
                f"the credentials of sandbox {runtime.sandbox_id} are gone (its Secret "
                f"{objects.secret_name(runtime.sandbox_id)} was deleted): kill the sandbox"
            )
        return AgentClient(pairs.endpoint(runtime.pod_ip or "0.0.0.0", objects.AGENT_PORT))

    # -- after a restart -----------------------------------------------------------------

    def runtime(self, sandbox_id: str, text: str) -> PodRuntime:
        runtime = PodRuntime.from_json(text)
        if runtime.sandbox_id != sandbox_id:
            raise ValueError(f"its runtime names another sandbox, {runtime.sandbox_id!r}")
        if sandbox_id not in self.pairs:
            raise ValueError(f"its Secret {objects.secret_name(sandbox_id)} has no TLS pairs")
        # The directory is this service's scratch space, wherever its storage now is (a
        # new service pod may have a fresh disk).
        runtime.directory = str(self.sandboxes_dir / sandbox_id)
        Path(runtime.directory).mkdir(mode=0o700, exist_ok=True)
        return runtime

    def stand_in(self, sandbox_id: str) -> PodRuntime | None:
        """A runtime with no pod known (halting it deletes every pod of the sandbox)."""
        if sandbox_id not in self.pairs:
            return None
        directory = self.sandboxes_dir / sandbox_id
        directory.mkdir(mode=0o700, exist_ok=True)
        return PodRuntime(sandbox_id, "", -1, str(directory), self.kube.home)

    def exists(self, sandbox_id: str) -> bool:
        return sandbox_id in self.secrets

    def unadopted(self, known: set[str]) -> list[str]:
        return sorted(self.recorded - known)

    async def sweep_orphans(self, known: set[str]) -> list[str]:
        """Delete the objects and directories of sandboxes without a record that `known`
        does not name."""
        try:
            found = await reaper.inventory(
                self.api, self.watch, self._listed_secrets, self._extra_kinds()
            )
        except ApiError as e:
            log.warning("could not look for objects left behind: %s", e.message)
            return []
        self._listed_secrets = None
        keep = known | self.starting
        swept = set(await self._reap(found.unaccounted(keep)))
        # A start killed before its Secret was made leaves its directory alone.
        keep |= found.recorded()
        for directory in await asyncio.to_thread(_subdirectories, self.sandboxes_dir):
            if directory.name not in keep:
                await asyncio.to_thread(shutil.rmtree, directory, ignore_errors=True)
                swept.add(directory.name)
        return sorted(swept)

    def _extra_kinds(self) -> tuple[str, ...]:
        """What the reaper lists besides Secrets and PVCs (pods come from the watch)."""
        return () if self.workload == "pods" else (self.workload,)

    async def _reap(self, leftovers: dict[str, list[tuple[str, str]]]) -> list[str]:
        for sandbox_id, doomed in leftovers.items():
            log.warning(
                "deleting %s of sandbox %s: no record of it exists (a start the service did "
                "not finish)",
                ", ".join(f"{r} {n}" for r, n in doomed),
                sandbox_id,
            )
            try:
                await self._delete(doomed)
            except ApiError:
                self._retry_removal(sandbox_id, doomed)
            await asyncio.to_thread(
                shutil.rmtree, self.sandboxes_dir / sandbox_id, ignore_errors=True
            )
        return sorted(leftovers)

    async def _reap_forever(self) -> None:
        grace = self.kube.start_timeout + REAP_GRACE
        while True:
            await asyncio.sleep(REAP_EVERY)
            # Anything this service runs, starts, stops or still writes is accounted for.
            keep = self.starting | self.stopping | set(self.pairs) | set(self.unremoved)
            keep |= set(self.records.pending)
            try:
                found = await reaper.inventory(self.api, self.watch, None, self._extra_kinds())
                await self._reap(found.unaccounted(keep, older_than=grace))
            except ApiError as e:
                log.info("the look for objects left behind waits: %s", e.message)
            except Exception:
                log.exception("the look for objects left behind failed")

    # -- records -------------------------------------------------------------------------

    def write_record(self, sandbox_id: str, data: bytes) -> None:
        """Queue the record for the sandbox's Secret (on the event loop: never waits)."""
        if sandbox_id not in self.stopping and self.records is not None:
            self.records.put(sandbox_id, data)

    def read_records(self) -> dict[str, bytes]:
        """The records in this instance's Secrets (called in a thread, at start)."""
        future = asyncio.run_coroutine_threadsafe(self._read_records(), self._loop)
        return future.result(READ_TIMEOUT)

    async def _read_records(self) -> dict[str, bytes]:
        try:
            listed = await self.api.list("secrets", self.selector)
        except ApiError as e:
            raise self._error(e, "reading the sandboxes' records") from None
        self._listed_secrets = listed.get("items", [])
        removing = {path.name for path in self.removing_dir.iterdir()}
        for sandbox_id in sorted(removing):
            pods = [p["metadata"]["name"] for p in self.watch.of_sandbox(sandbox_id)]
            log.info("sandbox %s was killed: deleting what is left of it", sandbox_id)
            self._retry_removal(sandbox_id, self._doomed(sandbox_id, pods, False))
        records = {}
        for body in self._listed_secrets:
            sandbox_id = body["metadata"].get("labels", {}).get(objects.SANDBOX)
            if not sandbox_id:
                continue
            if body["metadata"]["name"] != objects.secret_name(sandbox_id):
                # Only the sandbox's own Secret speaks for it: another one with its labels
                # (made by someone else) must not give it other TLS pairs or a record.
                log.warning(
                    "Secret %s claims sandbox %s but is not its Secret %s: ignored (delete "
                    "it, or remove its jupyter-sandbox labels)",
                    body["metadata"]["name"],
                    sandbox_id,
                    objects.secret_name(sandbox_id),
                )
                continue
            if sandbox_id in removing:
                continue
            self.secrets.add(sandbox_id)
            pairs = pairs_of(body)
            if pairs is not None:
                self.pairs[sandbox_id] = pairs
            record = objects.decode(body, objects.RECORD_KEY)
            if record:
                records[sandbox_id] = record
                self.records.written[sandbox_id] = record
        self.recorded = set(records)
        return records

    def keep_record_aside(self, sandbox_id: str) -> str:
        """Copy an unreadable record to the Secret's ``record-unreadable`` key (queued)."""
        data = self.records.written.get(sandbox_id)
        if data is None or self.api is None:
            raise OSError(f"the record of sandbox {sandbox_id} is not known")
        body = {"data": {"record-unreadable": objects.encode(data)}}
        name = objects.secret_name(sandbox_id)
        self._spawn(self._patch_logged(name, body))
        return f"key record-unreadable of Secret {name}"

    async def _patch_logged(self, name: str, body: dict) -> None:
        try:
            await self.api.patch("secrets", name, body)
        except ApiError as e:
            log.warning("could not keep the unreadable record in %s: %s", name, e.message)


def _subdirectories(path: Path) -> list[Path]:
    return [p for p in path.iterdir() if p.is_dir()] if path.is_dir() else []


def _same_pod(pod: dict, runtime: PodRuntime) -> bool:
    """Is `pod` the one `runtime` started (not one made in its place under its name)?"""
    uid = pod["metadata"].get("uid", "")
    return pod["status"].get("podIP") == runtime.pod_ip and uid == (runtime.pod_uid or uid)


def agent_sources() -> dict[str, str]:
    """The agent's modules, by file name, as the pod runs them."""
    return {
        path.name: path.read_text()
        for path in sorted(AGENT_SOURCES.glob("*.py"))
        if path.name not in HOST_ONLY
    }
