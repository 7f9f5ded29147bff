"""The kubernetes backend's costs per sandbox, on the fake cluster, beside the local backend.

    python bench/bench_kube.py [--quick]

No Kubernetes API server can run on this machine: the fake cluster of the tests
(`python3 -m tests.kube.fake_cluster`: a fake API server, and a fake kubelet that runs
each pod's agent in bubblewrap on a loopback pod IP) stands in for one. The service
(`serve` with JUPYTER_SANDBOX_BACKEND=kubernetes, started as tests/kube_fixtures.py
starts it), the official Kubernetes client in it, the agents, the SSH gateway, the
jupyter_sandbox client and the stock `ssh` are real. It measures:

* API requests per sandbox lifecycle (create, one `sh`, kill) by verb and resource, and
  the watch events they cause, from the fake's request counters; warm pool off and on;
* API requests per minute per idle running sandbox whose lease the client renews
  (a lease renewal must not be an API write);
* the service's resident memory with 0, 10, 25, 50 and 100 running sandboxes;
* create → first `sh('true')` latency, pooled and cold, beside the local backend's;
* logins per second through the SSH gateway into a pod's sandbox and a local one.

The fake answers from memory and its kubelet starts a process, so nothing here includes
a scheduler, an image pull, a CNI or a real kubelet's latency (docs/scale.md says what
that changes). `--quick`: fewer sandboxes and runs. Everything started is stopped, and
the script fails if a pod process or sandbox object is left.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_sandbox import percentile, private_service, timed  # noqa: E402

from jupyter_sandbox import Sandbox  # noqa: E402
from jupyter_sandbox._config import Paths  # noqa: E402
from jupyter_sandbox._ssh_config import HOST_ALIAS, write_ssh_config  # noqa: E402
from tests.conftest import storage_parent, wait_for  # noqa: E402
from tests.kube.conftest import FakeCluster, running_fake_cluster  # noqa: E402
from tests.kube_fixtures import KubeService, end_kube_service, start_kube_service  # noqa: E402

WRITES = ("create", "update", "patch", "delete", "deletecollection")
LEASE_TTL = 10.0  # the default: the client renews every third of it
POOL = 2  # the default warm pool
GiB = 1 << 30


@dataclass(frozen=True)
class Sizes:
    levels: tuple[int, ...]  # running sandboxes at which the service's memory is read
    lifecycles: int  # create → sh → kill rounds counted, per pool setting
    runs: int  # creates timed, per backend and pool setting
    baseline: float  # seconds of API traffic counted with no sandbox
    idle: float  # seconds of API traffic counted with the most sandboxes idle
    logins: int  # ssh logins timed, per backend
    parallel: int  # of which at once


FULL = Sizes((0, 10, 25, 50, 100), 3, 20, 60.0, 60.0, 40, 8)
QUICK = Sizes((0, 5, 10), 1, 5, 5.0, 15.0, 8, 4)


# -- environment and counters --------------------------------------------------------------


@contextlib.contextmanager
def client_of(service: KubeService) -> Iterator[None]:
    """Point this process's client at `service` (its runtime and data directories)."""
    env = {k: v for k, v in service.env.items() if k != "PYTHONPATH"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def counts(cluster: FakeCluster) -> tuple[Counter, Counter]:
    """The fake API server's request counts ("verb resource") and watch events sent."""
    stats = cluster.stats()
    return Counter(stats["requests"]), Counter(stats["watch_events"])


def quiet(cluster: FakeCluster, still: float = 1.5, timeout: float = 60) -> None:
    """Wait until the API server has had no request and sent no event for `still` s."""
    last, since = None, time.monotonic()
    deadline = since + timeout
    while time.monotonic() < deadline:
        stats = cluster.stats()
        now = (stats["requests_total"], stats["watch_events_total"])
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= still:
            return
        time.sleep(0.25)


def service_status() -> dict:
    """GET /v1/status of the service the environment names."""
    transport = httpx.HTTPTransport(uds=str(Paths.default().socket))
    with httpx.Client(transport=transport, base_url="http://sandbox", timeout=30) as client:
        return client.get("/v1/status").raise_for_status().json()


def pool_ready(service: KubeService) -> bool:
    """The warm pool is full: each of its sandboxes started and recorded as pooled."""
    ids = service_status()["pool"]
    if len(ids) < POOL:
        return False
    for sandbox_id in ids:
        try:
            record = service.secret_key(sandbox_id, "record")
        except ValueError:  # no Secret yet
            return False
        if record is None or json.loads(record)["record"].get("status") != "pooled":
            return False
    return True


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def children(pid: int) -> list[int]:
    """The direct child processes of `pid` (the service's SSH gateway workers)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                stat = Path(f"/proc/{entry}/stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry))
    return found


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of a process so far (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def available_bytes() -> int:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))


def create_many(count: int) -> list[Sandbox]:
    """`count` sandboxes, 8 creates at a time, each having run one command."""

    def one(_: int) -> Sandbox:
        sb = Sandbox.create()
        sb.sh("true")
        return sb

    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(one, range(count)))


def kill_all(sandboxes: list[Sandbox]) -> None:
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda sb: sb.kill(), sandboxes))


def object_kib(service: KubeService, kind: str) -> float:
    """The mean size, as JSON, of the service's objects of `kind` in the cluster."""
    found = service.objects(kind)
    return statistics.mean(len(json.dumps(o)) for o in found) / 1024 if found else 0.0


def fit(points: list[tuple[int, int]]) -> tuple[float, float]:
    """Least-squares line through (sandboxes, KiB): its intercept and slope."""
    slope, intercept = statistics.linear_regression(*zip(*points, strict=True))
    return intercept, slope


def by_key(counter: Counter, per: float) -> str:
    return ", ".join(f"{key} {n / per:.1f}" for key, n in sorted(counter.items()) if n) or "none"


# -- measurements --------------------------------------------------------------------------


def lifecycles(service: KubeService, rounds: int, pooled: bool) -> tuple[Counter, Counter]:
    """Requests and watch events per create → sh → kill, the pool's refill included."""
    requests, events = Counter(), Counter()
    for _ in range(rounds):
        if pooled:
            wait_for(lambda: pool_ready(service), 60, 0.2, "the warm pool to fill")
        quiet(service.cluster)
        before = counts(service.cluster)
        sb = Sandbox.create()
        sb.sh("true")
        sb.kill()
        wait_for(
            lambda sandbox_id=sb.id: not service.leftovers_of(sandbox_id),
            60,
            0.2,
            "the sandbox's objects to go",
        )
        if pooled:
            wait_for(lambda: pool_ready(service), 60, 0.2, "the warm pool to fill again")
        quiet(service.cluster)
        after = counts(service.cluster)
        requests += after[0] - before[0]
        events += after[1] - before[1]
    return requests, events


def create_latency(runs: int, pool_ready_now: Callable[[], bool] | None) -> list[float]:
    """create → first `sh('true')` result, ms; the pool full again before each create."""
    latencies = []
    for _ in range(runs):
        if pool_ready_now is not None:
            wait_for(pool_ready_now, 60, 0.1, "the warm pool to fill")
        start = time.perf_counter()
        sb = Sandbox.create()
        sb.sh("true")
        latencies.append((time.perf_counter() - start) * 1000)
        sb.kill()
    return latencies


@dataclass
class Logins:
    p50_ms: float  # one at a time
    rate: float  # per second, `parallel` at a time
    failed: int
    gateway_cpu_ms: float  # CPU of the gateway workers per login
    service_cpu_ms: float  # CPU of the service per login (it resolves each token)


def ssh_argv(sb: Sandbox, work: Path) -> list[str]:
    """`ssh sandbox true` into `sb` with the stock client, a fresh credential for it."""
    access = sb.expose_ssh()
    known_hosts = work / f"known_hosts-{sb.id}"
    known_hosts.write_text(access.known_hosts_line + "\n")
    config = work / f"ssh-config-{sb.id}"
    write_ssh_config(config, access.hostname, access.port, access.username, known_hosts)
    return ["ssh", "-F", str(config), "-o", "BatchMode=yes", HOST_ALIAS, "true"]


def logins(sandboxes: list[Sandbox], service_pid: int, work: Path, sizes: Sizes) -> Logins:
    """Logins through the gateway: one at a time into one sandbox, then `sizes.parallel`
    at a time, each into a sandbox of its own (as students do)."""
    argvs = [ssh_argv(sb, work) for sb in sandboxes[: sizes.parallel]]

    def login(index: int = 0) -> int:
        argv = argvs[index % len(argvs)]
        return subprocess.run(argv, capture_output=True, timeout=120).returncode

    for index in range(len(argvs)):
        login(index)  # the first login to each opens what later ones reuse
    one_at_a_time = timed(login, max(3, sizes.logins // 4))
    workers = children(service_pid)
    gateway_before, service_before = sum(map(cpu_seconds, workers)), cpu_seconds(service_pid)
    start = time.perf_counter()
    with ThreadPoolExecutor(sizes.parallel) as pool:
        codes = list(pool.map(login, range(sizes.logins)))
    rate = sizes.logins / (time.perf_counter() - start)
    gateway = sum(map(cpu_seconds, workers)) - gateway_before
    service = cpu_seconds(service_pid) - service_before
    for sb in sandboxes[: sizes.parallel]:
        sb.revoke_ssh()
    return Logins(
        percentile(one_at_a_time, 0.5),
        rate,
        sum(1 for c in codes if c != 0),
        gateway * 1000 / sizes.logins,
        service * 1000 / sizes.logins,
    )


@dataclass
class Results:
    rows: list[tuple[str, str, str]]
    notes: list[str]

    def row(self, what: str, kube: str, instead: str = "") -> None:
        self.rows.append((what, kube, instead))


def kube_service(cluster: FakeCluster, pool: int) -> KubeService:
    base = Path(tempfile.mkdtemp(prefix="jsb-bench-kube-", dir=storage_parent()))
    return start_kube_service(
        cluster, base, JUPYTER_SANDBOX_LEASE_TTL=str(LEASE_TTL), JUPYTER_SANDBOX_POOL=str(pool)
    )


def end_service(service: KubeService) -> None:
    """Kill its sandboxes, stop it, check nothing of it is left, remove its files."""
    try:
        end_kube_service(service)
    finally:
        shutil.rmtree(service.base, ignore_errors=True)


def ramp(
    service: KubeService, sizes: Sizes, out: Results
) -> tuple[list[Sandbox], list[tuple[int, int, int]]]:
    """Sandboxes created up to each level; the service's and gateway's RSS (KiB) at each,
    and what each create cost the service in CPU and the API in requests."""
    pid = service.proc.pid
    running: list[Sandbox] = []
    memory: list[tuple[int, int, int]] = []
    cpu, spent, before = cpu_seconds(pid), 0.0, counts(service.cluster)[0]
    for level in sizes.levels:
        wanted = level - len(running)
        if wanted > 0 and available_bytes() < 4 * GiB + wanted * (64 << 20):
            out.notes.append(f"stopped at {len(running)} sandboxes: the machine's memory was short")
            break
        start = time.perf_counter()
        running += create_many(wanted)
        spent += time.perf_counter() - start
        quiet(service.cluster)
        workers = sum(rss_kib(p) for p in children(pid))
        memory.append((len(running), rss_kib(pid), workers))
    made = max(1, len(running))
    requests = counts(service.cluster)[0] - before
    out.row(
        f"{len(running)} creates, 8 at a time (each with one `sh`)",
        f"{made / spent:.1f} sandboxes/s; service CPU {(cpu_seconds(pid) - cpu) * 1000 / made:.0f}"
        f" ms per sandbox; {requests.total() / made:.1f} API requests per sandbox",
        f"objects' JSON: Secret {object_kib(service, 'secrets'):.1f} KiB, pod (what a watch "
        f"event carries) {object_kib(service, 'pods'):.1f} KiB",
    )
    return running, memory


def bench_cold_service(
    cluster: FakeCluster, sizes: Sizes, work: Path, out: Results
) -> tuple[list[float], Logins]:
    """Pool off: idle traffic, memory by running sandboxes, logins, lifecycles, latency."""
    service = kube_service(cluster, pool=0)
    try:
        pid = service.proc.pid
        with client_of(service):
            service_status()
            quiet(cluster)
            before = counts(cluster)
            time.sleep(sizes.baseline)  # the traffic of a service with no sandbox
            baseline = (counts(cluster)[0] - before[0]).total() * 60 / sizes.baseline
            running, memory = ramp(service, sizes, out)
            before, cpu = counts(cluster), cpu_seconds(pid)
            time.sleep(sizes.idle)  # the sandboxes idle; the client renews their leases
            requests, events = (after - was for after, was in zip(counts(cluster), before))
            idle_cpu = cpu_seconds(pid) - cpu
            before = counts(cluster)[0]
            kube_logins = logins(running, pid, work, sizes)
            quiet(cluster)
            login_requests = counts(cluster)[0] - before
            kill_all(running)
            wait_for(lambda: not service.leftovers(), 120, 0.5, "the sandboxes' objects to go")
            cold = lifecycles(service, sizes.lifecycles, pooled=False)
            latency = create_latency(sizes.runs, None)
    finally:
        end_service(service)
    n, minutes = len(running), sizes.idle / 60
    per_minute = requests.total() / minutes
    # The instance's Lease is renewed every 5 s whatever runs: the service's, not a sandbox's.
    writes = Counter(
        {k: v for k, v in requests.items() if k.split()[0] in WRITES and k != "update leases"}
    )
    out.row(
        f"API requests per minute, {n} idle sandboxes (≈{n * sizes.idle / (LEASE_TTL / 3):.0f}"
        f" lease renewals in {sizes.idle:.0f} s)",
        f"{per_minute:.1f} ({by_key(requests, minutes)}); with no sandbox: {baseline:.1f}; "
        f"per idle sandbox: {(per_minute - baseline) / n:.2f}; watch events: "
        f"{by_key(events, minutes)}",
        "writes: " + (by_key(writes, minutes) if writes else "none"),
    )
    if writes:
        out.notes.append(
            f"API writes while sandboxes were idle (a bug: renewals must not write): {dict(writes)}"
        )
    out.row(
        f"service CPU, {n} idle sandboxes",
        f"{idle_cpu / sizes.idle:.1%} of a core; {idle_cpu * 1000 / sizes.idle / n:.2f} ms/s "
        "per idle sandbox",
        "",
    )
    intercept, slope = fit([(count, rss) for count, rss, _ in memory])
    shown = ", ".join(f"{c}: {rss / 1024:.0f}" for c, rss, _ in memory)
    out.row(
        "service RSS by running sandboxes (MiB)",
        f"{shown}; +{slope:.0f} KiB per sandbox (least squares); extrapolated to 1,000: "
        f"{(intercept + 1000 * slope) / 1024:.0f} MiB",
        f"SSH gateway workers (all): {memory[0][2] / 1024:.0f} → {memory[-1][2] / 1024:.0f} MiB",
    )
    out.row(
        f"API requests for {sizes.parallel} SSH credentials and {sizes.logins + sizes.parallel}"
        f" + {max(3, sizes.logins // 4)} logins",
        by_key(login_requests, 1),
        "each credential made or revoked is a record write",
    )
    out.row("API requests per lifecycle, pool off", by_key(cold[0], sizes.lifecycles), "")
    out.row("watch events per lifecycle, pool off", by_key(cold[1], sizes.lifecycles), "")
    return latency, kube_logins


def bench_pooled_service(cluster: FakeCluster, sizes: Sizes, out: Results) -> list[float]:
    """Pool on: lifecycles and create latency, the pool full again before each create."""
    service = kube_service(cluster, pool=POOL)
    try:
        with client_of(service):
            pooled = lifecycles(service, sizes.lifecycles, pooled=True)
            latency = create_latency(sizes.runs, lambda: pool_ready(service))
    finally:
        end_service(service)
    out.row("API requests per lifecycle, pool on", by_key(pooled[0], sizes.lifecycles), "")
    out.row("watch events per lifecycle, pool on", by_key(pooled[1], sizes.lifecycles), "")
    return latency


def bench_local(sizes: Sizes, work: Path) -> tuple[list[float], list[float], Logins]:
    """The same creates and logins on the local backend (a private service each)."""
    with private_service(POOL):
        Sandbox.list()  # the service starts outside the measurement
        wait_for(lambda: len(service_status()["pool"]) >= POOL, 60, 0.1, "the pool")
        time.sleep(1)  # the pool's last start finishes, as bench_sandbox.py lets it
        pooled = []
        for _ in range(sizes.runs):
            pooled += create_latency(1, None)
            time.sleep(0.3)  # the pool refills: a local start takes ~100 ms
    with private_service(0):
        Sandbox.list()
        cold = create_latency(sizes.runs, None)
        pid = service_status()["pid"]
        sandboxes = create_many(sizes.parallel)
        try:
            local_logins = logins(sandboxes, pid, work, sizes)
        finally:
            kill_all(sandboxes)
    return pooled, cold, local_logins


def described(result: Logins) -> str:
    return (
        f"p50 {result.p50_ms:.0f} ms; {result.rate:.1f} logins/s, {result.failed} failed; "
        f"CPU per login: gateway {result.gateway_cpu_ms:.1f} ms, service "
        f"{result.service_cpu_ms:.1f} ms"
    )


def p50_p95(values: list[float]) -> str:
    return f"p50 {percentile(values, 0.5):.0f} ms, p95 {percentile(values, 0.95):.0f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer sandboxes and runs")
    args = parser.parse_args()
    sizes = QUICK if args.quick else FULL
    out = Results([], [])
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="jsb-bench-kube-work-"))
    try:
        with running_fake_cluster(work / "cluster") as cluster:
            kube_cold, kube_logins = bench_cold_service(cluster, sizes, work, out)
            kube_pooled = bench_pooled_service(cluster, sizes, out)
            left = {key: pids for key, pids in cluster.pod_pids().items() if pids}
        if left:
            raise SystemExit(f"pod processes were left: {left}")
        local_pooled, local_cold, local_logins = bench_local(sizes, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out.row(
        f"create → first `sh('true')`, warm pool ({sizes.runs} runs)",
        p50_p95(kube_pooled),
        f"local backend: {p50_p95(local_pooled)}",
    )
    out.row(
        f"create → first `sh('true')`, cold ({sizes.runs} runs)",
        p50_p95(kube_cold),
        f"local backend: {p50_p95(local_cold)}",
    )
    out.row(
        f"`ssh sandbox true` through the gateway: one at a time; {sizes.logins}, "
        f"{sizes.parallel} at a time into {sizes.parallel} sandboxes",
        described(kube_logins),
        f"local backend: {described(local_logins)}",
    )
    print("| measurement (fake cluster) | kubernetes backend | instead |")
    print("|---|---|---|")
    for row in out.rows:
        print("| " + " | ".join(row) + " |")
    for note in out.notes:
        print(f"note: {note}")
    print(f"({time.monotonic() - started:.0f} s, load average {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
