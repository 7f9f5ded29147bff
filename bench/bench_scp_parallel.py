"""Parallel scp: a class copying files at once, through the gateway and through sshd.

    python bench/bench_scp_parallel.py [--streams 8] [--mib 64] [--repeats 3] [--workers 1,2]

Runs as root on a Debian-like host with openssh-client, openssh-server and
openssh-sftp-server. `--streams` stock `scp` processes copy a `--mib` MiB file at
the same moment, up (put) and then back down (get, checked byte for byte), to:

* the gateway of a private jupyter-sandbox service, one sandbox per stream (one per
  student), once for every count in `--workers` (JUPYTER_SANDBOX_SSH_WORKERS);
* a private OpenSSH sshd on a free port whose sessions each run in a fresh bwrap
  sandbox (bench_ssh.openssh_server), so both sides pay for isolation.

Prints a Markdown table of aggregate MiB/s (all bytes moved / wall time of the batch,
median of `--repeats`) side by side, and removes everything it started or created.
"""

from __future__ import annotations

import argparse
import contextlib
import filecmp
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_sandbox import MiB, private_service
from bench_ssh import (
    SFTP_SERVER,
    SSHD,
    TIMEOUT,
    Target,
    negotiated,
    openssh_server,
    service_setting,
)

WORKERS_ENV = "JUPYTER_SANDBOX_SSH_WORKERS"


@contextlib.contextmanager
def gateway_targets(work: Path, streams: int, workers: int) -> Iterator[list[Target]]:
    """`streams` sandboxes of a private service with `workers` gateway processes, each
    reachable with a token of its own; all killed afterwards."""
    from jupyter_sandbox import Sandbox

    with private_service(0), service_setting(WORKERS_ENV, str(workers)):
        sandboxes = []
        try:
            targets = []
            for n in range(streams):
                sb = Sandbox.create(timeout="10m")
                sandboxes.append(sb)
                access = sb.expose_ssh()
                known_hosts = work / f"known_hosts-{n}"
                known_hosts.write_text(access.known_hosts_line + "\n")
                label = f"gateway, {workers} worker{'s' * (workers > 1)}"
                targets.append(
                    Target(label, access.hostname, access.port, access.username, known_hosts)
                )
            yield targets
        finally:
            for sb in sandboxes:
                sb.kill()


def scp(target: Target, source: str, destination: str) -> list[str]:
    """Stock scp with the target's options; `host:` marks the remote side."""
    remote = f"{target.user}@{target.host}:"

    def place(path: str) -> str:
        return path.replace("host:", remote)

    return [
        "scp",
        "-q",
        "-P",
        str(target.port),
        *target.options(),
        place(source),
        place(destination),
    ]


def batch(commands: list[list[str]]) -> float:
    """Seconds until every command, all started at once, has finished (each must pass)."""
    started = time.perf_counter()
    procs = [
        subprocess.Popen(c, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for c in commands
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=TIMEOUT)
        if proc.returncode:
            raise RuntimeError(f"scp failed ({proc.returncode}): {err.decode()[-500:]}")
    return time.perf_counter() - started


def rates(targets: list[Target], source: Path, work: Path, mib: int, repeats: int) -> dict:
    """Median aggregate MiB/s up and down for `targets` copying at once."""
    up, down = [], []
    total = mib * len(targets)
    for _ in range(repeats):
        puts = [scp(t, str(source), f"host:blob-{n}") for n, t in enumerate(targets)]
        up.append(total / batch(puts))
        backs = [work / f"back-{n}" for n in range(len(targets))]
        gets = [scp(t, f"host:blob-{n}", str(b)) for n, (t, b) in enumerate(zip(targets, backs))]
        down.append(total / batch(gets))
        for back in backs:
            if not filecmp.cmp(source, back, shallow=False):
                raise RuntimeError(f"{targets[0].label}: a copy came back changed")
            back.unlink()
    return {"up": statistics.median(up), "down": statistics.median(down)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=8, help="scp processes at once")
    parser.add_argument("--mib", type=int, default=64, help="size of each stream's file")
    parser.add_argument("--repeats", type=int, default=3, help="batches per direction")
    cpus = len(os.sched_getaffinity(0))
    parser.add_argument(
        "--workers", default=f"1,{cpus}", help="gateway worker counts to measure, comma-separated"
    )
    args = parser.parse_args()
    if os.geteuid() != 0 or not all(os.access(p, os.X_OK) for p in (SSHD, SFTP_SERVER)):
        sys.exit("needs root and Debian's openssh-server and openssh-sftp-server")
    work = Path(tempfile.mkdtemp(prefix="jsb-bench-scp-", dir="/var/tmp"))
    work.chmod(0o711)  # the sandboxes' unprivileged uids reach their files below it
    rows = []
    try:
        source = work / "blob"
        with open(source, "wb") as f:
            for _ in range(args.mib):
                f.write(os.urandom(MiB))
        (work / "sshd").mkdir()
        with openssh_server(work / "sshd") as sshd:
            ciphers = {sshd.label: negotiated(sshd)}
            for count in dict.fromkeys(int(n) for n in args.workers.split(",")):
                with gateway_targets(work, args.streams, count) as targets:
                    ours = targets[0].label
                    ciphers[ours] = negotiated(targets[0])
                    mine = rates(targets, source, work, args.mib, args.repeats)
                    theirs = rates([sshd] * args.streams, source, work, args.mib, args.repeats)
                    rows.append((ours, mine, theirs))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(
        f"{args.streams} parallel scp streams of {args.mib} MiB each, {cpus} CPUs, aggregate "
        f"MiB/s (median of {args.repeats}); sshd measured right after each gateway\n"
    )
    print("| gateway | put: gateway / sshd | get: gateway / sshd | kex, cipher |")
    print("|---|---|---|---|")
    for label, mine, theirs in rows:
        cells = [
            f"{mine[way]:.0f} / {theirs[way]:.0f} MiB/s ({mine[way] / theirs[way]:.2f}x)"
            for way in ("up", "down")
        ]
        print(f"| {label} | {cells[0]} | {cells[1]} | {ciphers[label]} |")
    print(f"\nsshd negotiated {ciphers[sshd.label]}")


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # run the cleanups on SIGTERM too
    main()
