"""Shared fixtures: a private sandbox service per test session, and leak checks.

Every test session gets its own Jupyter runtime and data directories and its
own sandbox storage, so tests never touch a real user's service. After each
test, the fixtures check that no sandbox process, directory or cgroup outlives
the sandboxes the service still lists; after the session, that nothing at all
is left.

The service runs on the local backend unless a test module opts in to more with
``pytestmark = pytest.mark.backends("local", "kubernetes")`` (a test narrows that with
its own ``backends`` mark); such tests run once per backend, ``[local]`` and
``[kubernetes]`` in their ids; ``--backend NAME`` leaves out the other backend's. The
kubernetes half uses the fake cluster of tests/kube, or a real one (tests/backend_fixtures.py
says when); its leak checks look at the cluster's objects and the pods' processes.
"""

from __future__ import annotations

import contextlib
import grp
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from jupyter_sandbox import Sandbox
from jupyter_sandbox.backends.cgroups import Controller
from jupyter_sandbox.client._async import shared_transport
from jupyter_sandbox.client._sync import portal
from tests.backend_fixtures import (
    BACKENDS,
    Cluster,
    PodProcesses,
    RealCluster,
    kubernetes_settings,
    pod_sandbox,
    real_cluster_wanted,
)
from tests.kube.conftest import running_fake_cluster

ROOT = Path(__file__).resolve().parent.parent
# No test's client may find a system service of this machine (auto mode looks there
# first); tests of system mode point their own service and clients elsewhere.
os.environ["JUPYTER_SANDBOX_SYSTEM_RUN"] = "/nonexistent/jupyter-sandbox-tests/run"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("jupyter-sandbox")
    group.addoption(
        "--backend",
        action="append",
        choices=BACKENDS,
        help="run the service's tests on this backend only (repeatable)",
    )
    group.addoption(
        "--cluster",
        action="store_true",
        help="run the kubernetes half on the real cluster of KUBECONFIG, not the fake one",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "backends(*names): the backends a test's service runs on (default: local)"
    )
    config.addinivalue_line(
        "markers",
        "cluster: runs on the kubernetes backend; with -m cluster or --cluster on the real "
        "cluster of KUBECONFIG (skipped without it)",
    )
    config.addinivalue_line(
        "markers",
        "xfail_on(backend, reason, strict=True): a known bug of that backend (an xfail "
        "there only; strict unless the bug is a race that fails only sometimes)",
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Every test of the session's service (or of a `backend`'s sandbox) runs once per
    backend it opts in to."""
    if "service_env" not in metafunc.fixturenames and "backend" not in metafunc.fixturenames:
        return
    marker = metafunc.definition.get_closest_marker("backends")
    names = marker.args if marker else ("local",)
    unknown = set(names) - set(BACKENDS)
    if unknown:
        raise pytest.UsageError(f"{metafunc.definition.nodeid}: unknown backends {unknown}")
    params = [
        pytest.param(name, marks=[pytest.mark.cluster] if name == "kubernetes" else [])
        for name in names
    ]
    metafunc.parametrize("backend", params, indirect=True, scope="session")


@pytest.hookimpl(trylast=True)  # after pytest has grouped the tests by backend
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`--backend` deselects the other backends' tests; `xfail_on` marks known bugs; the
    kubernetes half runs last: while its service runs, the environment names the cluster,
    and a test that starts a service of its own from that environment must not be
    among them."""
    chosen = config.getoption("backend")
    keep, drop = [], []
    for item in items:
        backend = _backend_of(item)
        for bug in item.iter_markers("xfail_on"):
            if bug.args[0] == backend:
                strict = bug.kwargs.get("strict", True)  # False only for a race's bug
                item.add_marker(pytest.mark.xfail(strict=strict, reason=bug.kwargs["reason"]))
        (drop if chosen and backend is not None and backend not in chosen else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
    items[:] = sorted(keep, key=lambda item: _backend_of(item) == "kubernetes")


def _backend_of(item: pytest.Item) -> str | None:
    callspec = getattr(item, "callspec", None)
    return callspec.params.get("backend") if callspec else None


def wait_for(
    predicate: Callable[[], object],
    timeout: float = 15.0,
    interval: float = 0.05,
    message: str = "condition",
) -> object:
    """Poll `predicate` until it returns something truthy, or fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {message}")
        time.sleep(interval)


def sandbox_cli(
    env: dict[str, str],
    *args: str,
    check: bool = True,
    timeout: float = 60,
    input: str | None = None,
) -> subprocess.CompletedProcess:
    """The jupyter-sandbox CLI run with `args`, `env` added to this process's environment;
    its output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "jupyter_sandbox", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=check,
        input=input,
    )


def stop_process(proc: subprocess.Popen, grace: float) -> None:
    """SIGTERM `proc` and give it `grace` seconds to exit, then SIGKILL it; it is reaped."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


CHROMIUM = "/usr/bin/chromium"  # Debian's; browser tests skip where it is missing


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """A headless chromium under Playwright, shared by one module's tests."""
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield chromium
        chromium.close()


# For tests whose subject is not host key pinning (sandboxes come and go per test).
UNPINNED_SSH = [
    "-o",
    "StrictHostKeyChecking=no",
    "-o",
    "UserKnownHostsFile=/dev/null",
    "-o",
    "BatchMode=yes",
    "-o",
    "LogLevel=ERROR",
]


def unnamed_id() -> int:
    """An id that no user in the passwd database and no group has."""
    return next(
        n
        for n in range(60_000, 65_000)
        if not _named(pwd.getpwuid, n) and not _named(grp.getgrgid, n)
    )


def _named(lookup: Callable[[int], object], number: int) -> bool:
    try:
        lookup(number)
    except KeyError:
        return False
    return True


def storage_parent() -> str:
    """Sandboxes of a root service run as other uids: their storage must be searchable."""
    return "/var/tmp" if os.geteuid() == 0 else tempfile.gettempdir()


class ServiceEnv:
    """The environment of this test session's sandbox service: on the local backend,
    or, given a `cluster`, on the kubernetes backend as objects of its own instance."""

    def __init__(self, base: Path, storage: Path, cluster: Cluster | None = None) -> None:
        self.base = base
        self.storage = storage
        self.cluster = cluster
        self.kube = None  # the kubernetes instance's objects and processes
        self.pods = PodProcesses(cluster) if cluster else None
        self.env = {
            "JUPYTER_RUNTIME_DIR": str(base / "rt"),
            "JUPYTER_DATA_DIR": str(base / "data"),
            "JUPYTER_SANDBOX_DIR": str(storage),
            "JUPYTER_SANDBOX_LEASE_TTL": "4",
            # Short, so a service whose test run was killed before its teardown still
            # goes away by itself (its sandboxes' leases lapse and get reaped first).
            "JUPYTER_SANDBOX_IDLE_TIMEOUT": "120",
            # Tests fail logins on purpose, all from 127.0.0.1; the limit itself is
            # tested against the gateway directly.
            "JUPYTER_SANDBOX_SSH_MAX_FAILURES": "100000",
            "JUPYTER_SANDBOX_BACKEND": "local",
        }
        if cluster:
            from tests.kube_fixtures import KubeService  # it imports this module

            self.kube = KubeService(cluster, base, {})
            self.kube.storage = storage
            self.env.update(kubernetes_settings(self.kube, isinstance(cluster, RealCluster)))

    @property
    def runtime_file(self) -> Path:
        return Path(self.env["JUPYTER_RUNTIME_DIR"]) / "jupyter-sandbox.json"

    @property
    def log_file(self) -> Path:
        return Path(self.env["JUPYTER_DATA_DIR"]) / "sandbox" / "service.log"

    def service_pid(self) -> int | None:
        try:
            pid = json.loads(self.runtime_file.read_text())["pid"]
        except (OSError, ValueError, KeyError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        return pid

    def stop_service(self, sig: int = signal.SIGTERM) -> None:
        pid = self.service_pid()
        if pid is None:
            return
        os.kill(pid, sig)
        wait_for(lambda: not _alive(pid), 20, message=f"service {pid} to exit")

    def run_cli(
        self, *args: str, check: bool = True, timeout: float = 60, input: str | None = None
    ) -> subprocess.CompletedProcess:
        return sandbox_cli(self.env, *args, check=check, timeout=timeout, input=input)

    def run_python(self, code: str, **kwargs) -> subprocess.Popen:
        """A separate Python process in this service environment."""
        return subprocess.Popen(
            [sys.executable, "-c", code],
            env={**os.environ, **self.env},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            **kwargs,
        )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def sandbox_processes(storage: Path) -> list[int]:
    """Host pids of processes belonging to sandboxes under `storage` (bwrap and agents)."""
    pids = []
    marker = str(storage).encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if marker in cmdline:
            pids.append(int(entry))
    return pids


def sandbox_pids(storage: Path, sandbox_id: str) -> dict[str, int]:
    """Host pids of a sandbox's outer bwrap, its init (bwrap's child) and its agent."""
    marker = f"/sandboxes/{sandbox_id}/"
    bwraps = [p for p in sandbox_processes(storage) if marker in _cmdline(p)]
    init = next(p for p in bwraps if _parent(p) in bwraps)
    agent = next(p for p in _children(init) if "main.pyc" in _cmdline(p))
    return {"outer": _parent(init), "init": init, "agent": agent}


def kill_agent(env: ServiceEnv, sandbox_id: str, sig: int = signal.SIGKILL) -> None:
    """Kill a sandbox's agent behind the service's back: the local sandbox's agent
    process, or the command (pid 1) of the sandbox pod's container."""
    if env.kube is None:
        os.kill(sandbox_pids(env.storage, sandbox_id)["agent"], sig)
        return
    if isinstance(env.cluster, RealCluster):
        pytest.skip("the processes of a real cluster's pods are not on this machine")
    pod = env.kube.pod(sandbox_id)["metadata"]["name"]
    os.kill(env.cluster.command_pids()[f"{env.cluster.namespace}/{pod}"], sig)


def agent_killed(env: ServiceEnv) -> str:
    """The reason a sandbox failed after `kill_agent` (SIGKILL), as the service words it."""
    if env.kube is None:
        return "its agent was killed by signal 9 (SIGKILL); files kept"
    return (
        "its agent was killed (SIGKILL, exit status 137); "
        "its home is kept on its PersistentVolumeClaim"
    )


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _parent(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def sandbox_mounts(storage: Path) -> set[str]:
    """Ids of sandboxes under `storage` with something mounted in their directory."""
    prefix = f"{storage}/sandboxes/"
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    return {p[len(prefix) :].split("/", 1)[0] for p in points if p.startswith(prefix)}


def cgroup_dirs() -> list[str]:
    """Sandbox cgroup directories that exist now (where this process would create them)."""
    found = []
    for base in Controller().bases.values():
        with contextlib.suppress(OSError):
            found += [str(c) for c in base.iterdir() if c.is_dir() and c.name.startswith("sb-")]
    return found


@pytest.fixture(scope="session")
def backend(request: pytest.FixtureRequest) -> str:
    """The backend of the session's service for this test (a session-scoped parameter)."""
    return getattr(request, "param", "local")


@pytest.fixture(scope="session")
def kube_cluster(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    """The cluster of the kubernetes half: the fake one, or the real one of KUBECONFIG."""
    if not real_cluster_wanted(request.config):
        with running_fake_cluster(tmp_path_factory.mktemp("fake-cluster")) as cluster:
            yield cluster
        return
    kubeconfig = os.environ.get("KUBECONFIG")
    if not kubeconfig:
        pytest.skip("tests on a real cluster need KUBECONFIG naming it (docs/kubernetes.md)")
    yield RealCluster(kubeconfig, os.environ.get("JUPYTER_SANDBOX_K8S_NAMESPACE", "default"))


@pytest.fixture(scope="session")
def service_env(request: pytest.FixtureRequest, backend: str) -> Iterator[ServiceEnv]:
    cluster = request.getfixturevalue("kube_cluster") if backend == "kubernetes" else None
    base = Path(tempfile.mkdtemp(prefix="jsb-test-"))
    storage = Path(tempfile.mkdtemp(prefix="jsb-", dir=storage_parent()))
    os.chmod(storage, 0o711)
    env = ServiceEnv(base, storage, cluster)
    saved = {k: os.environ.get(k) for k in env.env}
    os.environ.update(env.env)
    yield env
    for info in Sandbox.list():
        Sandbox.connect(info.id).kill()
    env.stop_service()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    leftovers = {pid: _sandbox_of(pid, storage) for pid in sandbox_processes(storage)}
    mounted = sandbox_mounts(storage)
    unclean = _kube_unclean(env)
    orphans = _pod_orphans(env)
    if env.kube:  # the instance's own objects (its anchor owns them) go with it
        cluster.delete("configmaps", f"jupyter-sandbox-{env.kube.instance}")
    remaining = list((storage / "sandboxes").iterdir()) if (storage / "sandboxes").exists() else []
    if env.log_file.exists():  # kept for a post-mortem of the last session
        suffix = "" if backend == "local" else f"-{backend}"
        kept = Path(tempfile.gettempdir()) / f"jupyter-sandbox-tests-{os.getuid()}{suffix}.log"
        shutil.copy(env.log_file, kept)
    shutil.rmtree(base, ignore_errors=True)
    shutil.rmtree(storage, ignore_errors=True)
    assert not leftovers, f"sandbox processes left after the session: {leftovers}"
    assert not remaining, f"sandbox directories left after the session: {remaining}"
    assert not mounted, f"sandbox homes still mounted after the session: {mounted}"
    assert not unclean, f"after the session: {unclean}"
    assert not orphans, f"pod processes left after the session: {orphans}"


def _kube_unclean(env: ServiceEnv) -> str:
    """On kubernetes: what of the instance is left in the cluster ("" when nothing)."""
    if env.kube is None:
        return ""
    try:
        env.kube.check_clean()
    except AssertionError as e:
        return str(e)
    return ""


@pytest.fixture(autouse=True)
def no_leaks(request: pytest.FixtureRequest) -> Iterator[None]:
    """After each test that used the service: nothing outlives the listed sandboxes."""
    if "service_env" not in request.fixturenames:
        yield
        return
    env: ServiceEnv = request.getfixturevalue("service_env")
    before = {s.id for s in Sandbox.list()} if env.service_pid() else set()
    if env.pods:
        env.pods.look()
    yield
    if env.service_pid() is None:
        return
    created = {s.id for s in Sandbox.list()} - before
    for sandbox_id in created:  # report, then clean up so later tests start clean
        Sandbox.connect(sandbox_id).kill()
    assert not created, f"test left sandboxes running: {sorted(created)}"
    # What exists is looked at before asking what is live or pooled: the pool refills in
    # the background, and a sandbox it starts after this look is in neither set.
    sandboxes_dir = env.storage / "sandboxes"
    dirs = {p.name for p in sandboxes_dir.iterdir()} if sandboxes_dir.exists() else set()
    owners = {_sandbox_of(pid, env.storage) for pid in sandbox_processes(env.storage)} - {"?"}
    mounted = sandbox_mounts(env.storage)
    objects = env.kube.sandbox_ids() if env.kube else set()
    running = env.kube.pod_processes() if env.kube else {}
    live = {s.id for s in Sandbox.list()}
    known = live | set(service_status()["pool"])
    assert dirs <= known, f"directories of ended sandboxes left: {sorted(dirs - known)}"
    ended = {s.id for s in Sandbox.list(include_ended=True)} - live
    leaked = [d for d in cgroup_dirs() if Path(d).name in ended]
    assert not leaked, f"cgroups of ended sandboxes left: {leaked}"
    assert owners <= known, f"processes of ended sandboxes left: {sorted(owners - known)}"
    assert mounted <= known, f"homes of ended sandboxes still mounted: {sorted(mounted - known)}"
    assert objects <= known, f"cluster objects of ended sandboxes left: {sorted(objects - known)}"
    in_pods = {pod_sandbox(pod) for pod in running}
    assert in_pods <= known, f"processes of ended sandboxes left: {sorted(in_pods - known)}"
    orphans = _pod_orphans(env)
    assert not orphans, f"processes of deleted pods left: {orphans}"


def _pod_orphans(env: ServiceEnv) -> dict[int, str]:
    """On kubernetes: live processes of pods that are gone (given a few seconds to be
    reaped, as the kernel kills a pid namespace's processes after its init)."""
    if env.pods is None:
        return {}
    orphans = env.pods.orphans(_alive)
    with contextlib.suppress(AssertionError):
        wait_for(lambda: not any(_alive(pid) for pid in orphans), 5, message="pods' processes")
    return {pid: pod for pid, pod in orphans.items() if _alive(pid)}


def _sandbox_of(pid: int, storage: Path) -> str:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return "?"
    prefix = f"{storage}/sandboxes/"
    return cmdline.split(prefix, 1)[1].split("/", 1)[0] if prefix in cmdline else "?"


def service_status() -> dict:
    async def status() -> dict:
        return await shared_transport().request("GET", "/v1/status")

    return portal().call(status())


@pytest.fixture
def separate_service_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    """The environment of a second, separate service (its own dirs, any free SSH port)."""
    storage = Path(tempfile.mkdtemp(prefix="jsb-", dir=storage_parent()))
    os.chmod(storage, 0o711)
    yield {
        **os.environ,
        "JUPYTER_RUNTIME_DIR": str(tmp_path / "rt"),
        "JUPYTER_DATA_DIR": str(tmp_path / "data"),
        "JUPYTER_SANDBOX_DIR": str(storage),
        "JUPYTER_SANDBOX_SSH_PORT": "0",
    }
    shutil.rmtree(storage, ignore_errors=True)


@pytest.fixture
def tcp_service(separate_service_env: dict[str, str]) -> Iterator[dict]:
    """A separate service that also listens on TCP (`serve --tcp`): its environment
    (``env``) and what its runtime file says (``url``, ``token``, ...)."""
    env = {**separate_service_env, "JUPYTER_SANDBOX_POOL": "0"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyter_sandbox", "serve", "--tcp", "127.0.0.1:0"],
        env=env,
        stderr=subprocess.DEVNULL,
    )
    try:
        runtime_file = Path(env["JUPYTER_RUNTIME_DIR"]) / "jupyter-sandbox.json"
        wait_for(runtime_file.exists, 30, message="the service to listen")
        yield {"env": env, "runtime_file": runtime_file, **json.loads(runtime_file.read_text())}
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.fixture
def sandbox(service_env: ServiceEnv) -> Iterator[Sandbox]:
    """A fresh session sandbox, killed after the test."""
    with Sandbox.create() as sb:
        yield sb
