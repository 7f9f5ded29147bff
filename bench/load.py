"""A bounded load run on loopback against a private sandbox service.

    python bench/load.py [--duration SECONDS] [--short]

Starts its own service (own runtime, data and storage directories) and repeats
rounds until the duration is spent (at least one round): 100 sandboxes created at
once; 1,000 concurrent ``sh`` among them; 200 uploads, each checked by downloading
it again; 50 interactive ``ssh -tt`` sessions whose lines must come back; 150
simultaneous logins; then every sandbox killed at once. It prints errors per kind,
latency p50/p95/p99 per operation and the service's memory (RSS/PSS) before, at
its peak and after; then stops the service and checks that nothing is left (no
sandbox process, mount, cgroup or directory). The exit status is 1 on any error or
leftover, else 0. ``--short`` is one round (about a minute).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import hashlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from jupyter_sandbox import AsyncSandbox  # noqa: E402
from jupyter_sandbox._ssh_config import HOST_ALIAS, write_ssh_config  # noqa: E402
from jupyter_sandbox.backends.cgroups import Controller  # noqa: E402

MiB = 1 << 20
ROUND_DEADLINE = 600.0  # seconds one round may take before the run counts as hung
SSH_OPTIONS = ["-o", "BatchMode=yes", "-o", "ConnectTimeout=60"]
FAILED = object()  # what a timed operation gives back when it raised


@dataclass
class Sizes:
    sandboxes: int = 100
    commands: int = 1000
    uploads: int = 200
    upload_bytes: int = 1 * MiB
    sessions: int = 50
    session_lines: int = 20
    logins: int = 150


@dataclass
class Record:
    """Latencies and errors per operation."""

    latencies: dict[str, list[float]] = field(default_factory=lambda: collections.defaultdict(list))
    errors: dict[str, collections.Counter] = field(
        default_factory=lambda: collections.defaultdict(collections.Counter)
    )
    samples: dict[tuple[str, str], str] = field(default_factory=dict)
    secrets: set[str] = field(default_factory=set)  # SSH tokens, kept out of what is printed

    async def timed(self, op: str, work: Awaitable[object]) -> object:
        """`work`'s result, its time recorded under `op`; FAILED (and the error counted)
        if it raised."""
        started = time.perf_counter()
        try:
            result = await work
        except Exception as e:  # every failure is counted, by kind
            self.error(op, type(e).__name__, str(e))
            return FAILED
        self.latencies[op].append((time.perf_counter() - started) * 1000)
        return result

    def error(self, op: str, kind: str, detail: str) -> None:
        self.errors[op][kind] += 1
        for secret in self.secrets:
            detail = detail.replace(secret, "<token>")
        self.samples.setdefault((op, kind), detail[:300])

    @property
    def failures(self) -> int:
        return sum(sum(c.values()) for c in self.errors.values())


# -- the private service -------------------------------------------------------------


class PrivateService:
    """A service of our own: started by the first call, stopped and checked at the end."""

    def __init__(self) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="jsb-load-"))
        parent = "/var/tmp" if os.geteuid() == 0 else None
        self.storage = Path(tempfile.mkdtemp(prefix="jsb-load-", dir=parent))
        os.chmod(self.storage, 0o711)
        os.environ.update(
            {
                "JUPYTER_RUNTIME_DIR": str(self.base / "rt"),
                "JUPYTER_DATA_DIR": str(self.base / "data"),
                "JUPYTER_SANDBOX_DIR": str(self.storage),
                "JUPYTER_SANDBOX_SSH_PORT": "0",
            }
        )
        self.sandbox_ids: set[str] = set()

    @property
    def pid(self) -> int | None:
        try:
            return json.loads((self.base / "rt" / "jupyter-sandbox.json").read_text())["pid"]
        except (OSError, ValueError, KeyError):
            return None

    def memory(self) -> tuple[int, int]:
        """The service's RSS and PSS in KiB."""
        values = {}
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{self.pid}/smaps_rollup").read_text().splitlines():
                name, _, rest = line.partition(":")
                if name in ("Rss", "Pss"):
                    values[name] = int(rest.split()[0])
        return values.get("Rss", 0), values.get("Pss", 0)

    def stop(self) -> None:
        pid = self.pid
        if pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 60
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _alive(pid):
            raise RuntimeError(f"the service (pid {pid}) did not stop within 60 s of SIGTERM")

    def leftovers(self) -> list[str]:
        """What outlives the service: sandbox processes, mounts, cgroups, directories."""
        found = []
        marker = str(self.storage).encode()
        for entry in os.listdir("/proc"):
            with contextlib.suppress(OSError):
                if entry.isdigit() and marker in Path(f"/proc/{entry}/cmdline").read_bytes():
                    found.append(f"process {entry}")
        with open("/proc/self/mountinfo") as f:
            found += [f"mount {p}" for p in (line.split()[4] for line in f) if marker.decode() in p]
        for base in Controller().bases.values():
            with contextlib.suppress(OSError):
                found += [f"cgroup {c}" for c in base.iterdir() if c.name in self.sandbox_ids]
        sandboxes = self.storage / "sandboxes"
        if sandboxes.exists():
            found += [f"directory {d}" for d in sandboxes.iterdir()]
        return found

    def keep_log(self) -> Path | None:
        """A copy of the service's log that outlives `remove`."""
        source = self.base / "data" / "sandbox" / "service.log"
        if not source.exists():
            return None
        kept = Path(tempfile.gettempdir()) / f"jsb-load-{os.getpid()}-service.log"
        shutil.copy(source, kept)
        return kept

    def remove(self) -> None:
        shutil.rmtree(self.base, ignore_errors=True)
        shutil.rmtree(self.storage, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


# -- one round ------------------------------------------------------------------------


class Round:
    def __init__(self, sizes: Sizes, record: Record, service: PrivateService, work: Path):
        self.sizes, self.record, self.service, self.work = sizes, record, service, work
        self.sandboxes: list[AsyncSandbox] = []
        self.configs: list[Path] = []

    async def run(self) -> None:
        try:
            await self.create()
            if not self.sandboxes:
                return  # every create failed: counted, nothing more to try
            await self.commands()
            await self.uploads()
            await self.ssh_access()
            if self.configs:
                await self.sessions()
                await self.logins()
        finally:
            await self.kill()

    async def create(self) -> None:
        made = await _all(
            self.record.timed("create", AsyncSandbox.create()) for _ in range(self.sizes.sandboxes)
        )
        self.sandboxes = [sb for sb in made if sb is not FAILED]
        self.service.sandbox_ids.update(sb.id for sb in self.sandboxes)

    async def commands(self) -> None:
        async def one(i: int) -> None:
            sandbox = self.sandboxes[i % len(self.sandboxes)]
            result = await self.record.timed("sh", sandbox.sh(f"echo {i}; echo err >&2"))
            if result is not FAILED and (result.stdout, result.stderr) != (f"{i}\n", "err\n"):
                self.record.error("sh", "WrongOutput", f"{result.stdout!r} {result.stderr!r}")

        await _all(one(i) for i in range(self.sizes.commands))

    async def uploads(self) -> None:
        async def one(i: int) -> None:
            sandbox = self.sandboxes[i % len(self.sandboxes)]
            source, back = self.work / f"up-{i}", self.work / f"down-{i}"
            digest = await asyncio.to_thread(_random_file, source, self.sizes.upload_bytes)
            try:
                sent = await self.record.timed("upload", sandbox.fs.upload(source, f"f{i}"))
                if sent is FAILED:
                    return
                got = await self.record.timed("download", sandbox.fs.download(f"f{i}", back))
                if got is not FAILED and await asyncio.to_thread(_digest, back) != digest:
                    self.record.error("download", "ChecksumMismatch", f"f{i} in {sandbox.id}")
            finally:
                source.unlink(missing_ok=True)
                back.unlink(missing_ok=True)

        await _all(one(i) for i in range(self.sizes.uploads))

    async def ssh_access(self) -> None:
        """An SSH credential and a private client config for each sandbox."""
        wanted = self.sandboxes[: max(self.sizes.sessions, self.sizes.logins)]
        accesses = await _all(self.record.timed("expose_ssh", sb.expose_ssh()) for sb in wanted)
        for i, access in enumerate(accesses):
            if access is FAILED:
                continue
            self.record.secrets.add(access.username)
            known_hosts = self.work / f"known_hosts-{i}"
            known_hosts.write_text(access.known_hosts_line + "\n")
            config = self.work / f"ssh-config-{i}"
            config.unlink(missing_ok=True)
            write_ssh_config(config, access.hostname, access.port, access.username, known_hosts)
            self.configs.append(config)

    async def sessions(self) -> None:
        """Interactive sessions on a pty: every line typed comes back, in order."""

        async def one(config: Path) -> None:
            proc = await _ssh(
                config, "stty -echo; echo ready; cat", "-tt", stdin=asyncio.subprocess.PIPE
            )
            try:
                await self.record.timed("ssh_session", self._converse(proc))
            finally:
                if proc.returncode is None:
                    proc.kill()
                await proc.wait()

        await _all(one(self.configs[i % len(self.configs)]) for i in range(self.sizes.sessions))

    async def _converse(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdin is not None and proc.stdout is not None
        greeting = await asyncio.wait_for(proc.stdout.readline(), 60)
        if greeting.strip() != b"ready":  # the terminal echoes no more from here on
            raise RuntimeError(f"the session began with {greeting!r}{await _stderr(proc)}")
        for n in range(self.sizes.session_lines):
            line = f"line {n} of a session"
            started = time.perf_counter()
            proc.stdin.write(line.encode() + b"\n")
            await proc.stdin.drain()
            echoed = await asyncio.wait_for(proc.stdout.readline(), 60)
            if echoed.strip() != line.encode():
                raise RuntimeError(f"typed {line!r}, got {echoed!r} back{await _stderr(proc)}")
            self.record.latencies["ssh_line"].append((time.perf_counter() - started) * 1000)
        proc.stdin.write(b"\x04")  # Ctrl-D: cat ends, and the session with it
        await proc.stdin.drain()
        code = await asyncio.wait_for(proc.wait(), 60)
        if code != 0:
            raise RuntimeError(f"ssh exited with {code}")

    async def logins(self) -> None:
        """Every login at the same instant, each running `true` with stdin at EOF."""

        async def one(config: Path) -> None:
            proc = await _ssh(config, "echo in")
            out, err = await proc.communicate()
            if (proc.returncode, out) != (0, b"in\n"):
                raise RuntimeError(f"exit {proc.returncode}, {out!r}, {err[-200:]!r}")

        configs = self.configs
        await _all(
            self.record.timed("login", one(configs[i % len(configs)]))
            for i in range(self.sizes.logins)
        )

    async def kill(self) -> None:
        """Every sandbox at once; one that is no longer running before that is an error."""
        ours = {sb.id for sb in self.sandboxes}
        for info in await AsyncSandbox.list(include_ended=True):
            if info.id in ours and info.status != "running":
                reason = info.failure or info.end_reason
                self.record.error("lifetime", "EndedEarly", f"{info.id} {info.status}: {reason}")
        await _all(self.record.timed("kill", sb.kill()) for sb in self.sandboxes)
        for config in self.configs:
            config.unlink(missing_ok=True)


async def _ssh(
    config: Path, command: str, *flags: str, stdin: int = asyncio.subprocess.DEVNULL
) -> asyncio.subprocess.Process:
    """OpenSSH running `command` in the sandbox that `config` names, output piped."""
    return await asyncio.create_subprocess_exec(
        "ssh",
        *flags,
        "-F",
        str(config),
        *SSH_OPTIONS,
        HOST_ALIAS,
        command,
        stdin=stdin,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def _stderr(proc: asyncio.subprocess.Process) -> str:
    """What an ended ssh said on stderr, for an error message."""
    assert proc.stderr is not None
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(proc.wait(), 5)
        return f"; exit {proc.returncode}, {(await proc.stderr.read())[-300:]!r}"
    return ""


async def _all(works) -> list:
    return await asyncio.gather(*works)


def _random_file(path: Path, size: int) -> str:
    """Write `size` random bytes to `path`; their SHA-256."""
    data = os.urandom(size)
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def _digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


# -- the run --------------------------------------------------------------------------


async def run(duration: float, sizes: Sizes, record: Record, service: PrivateService) -> dict:
    memory: dict[str, tuple[int, int]] = {}
    await AsyncSandbox.list()  # starts the service
    pid = service.pid
    memory["before"] = service.memory()
    peak = [memory["before"]]

    async def sample() -> None:
        while True:
            rss, pss = service.memory()
            peak[0] = (max(peak[0][0], rss), max(peak[0][1], pss))
            await asyncio.sleep(0.5)

    sampler = asyncio.ensure_future(sample())
    started, rounds = time.monotonic(), 0
    with tempfile.TemporaryDirectory(prefix="jsb-load-files-") as work:
        while rounds == 0 or time.monotonic() - started < duration:
            round_ = Round(sizes, record, service, Path(work))
            try:
                await asyncio.wait_for(round_.run(), ROUND_DEADLINE)
            except asyncio.TimeoutError:
                record.error("round", "Hung", f"round {rounds + 1} took over {ROUND_DEADLINE} s")
                break
            rounds += 1
            print(f"round {rounds}: {time.monotonic() - started:.0f} s", flush=True)
    sampler.cancel()
    if service.pid != pid:
        record.error("service", "Restarted", f"the service was pid {pid}, is {service.pid}")
    left = [s.id for s in await AsyncSandbox.list()]
    if left:
        record.error("end", "SandboxesLeft", ", ".join(left))
    memory["peak"], memory["after"] = peak[0], service.memory()
    return {"rounds": rounds, "seconds": time.monotonic() - started, "memory": memory}


def report(summary: dict, record: Record, leftovers: list[str]) -> None:
    print(f"\n{summary['rounds']} round(s) in {summary['seconds']:.0f} s")
    print("\n| operation | count | p50 ms | p95 ms | p99 ms | errors |")
    print("|---|---:|---:|---:|---:|---|")
    for op in sorted(set(record.latencies) | set(record.errors)):
        values = sorted(record.latencies.get(op, []))
        errors = ", ".join(f"{k} {n}" for k, n in record.errors.get(op, {}).items()) or "0"
        cells = [f"{_percentile(values, q):.1f}" if values else "-" for q in (0.5, 0.95, 0.99)]
        print(f"| {op} | {len(values)} | {' | '.join(cells)} | {errors} |")
    print("\n| service memory | RSS MiB | PSS MiB |\n|---|---:|---:|")
    for when, (rss, pss) in summary["memory"].items():
        print(f"| {when} | {rss / 1024:.1f} | {pss / 1024:.1f} |")
    for (op, kind), sample in record.samples.items():
        print(f"first {kind} in {op}: {sample}")
    print(f"\nerrors: {record.failures}; left after the end: {len(leftovers)}")
    for item in leftovers:
        print(f"  {item}")


def _percentile(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=300.0, help="seconds (default 300)")
    parser.add_argument("--short", action="store_true", help="one round, about a minute")
    args = parser.parse_args()
    for tool in ("ssh",):
        if shutil.which(tool) is None:
            parser.error(f"needs {tool} (apt-get install openssh-client)")
    service = PrivateService()
    record = Record()
    try:
        summary = asyncio.run(run(0 if args.short else args.duration, Sizes(), record, service))
        service.stop()
        leftovers = service.leftovers()
    finally:
        with contextlib.suppress(RuntimeError):
            service.stop()
        kept = service.keep_log() if record.failures else None
        service.remove()
    report(summary, record, leftovers)
    if kept is not None:
        print(f"the service's log is kept in {kept}")
    return 1 if record.failures or leftovers else 0


if __name__ == "__main__":
    sys.exit(main())
