"""The pod agent's TLS channel: request latency and bulk throughput.

    python bench/bench_agent_tls.py [--mib 64] [--pings 200]

Starts one pod-mode agent in a bubblewrap container on a loopback address (as the
channel tests do) and measures, with the service's own ``AgentClient``: a ping
(a new TCP connection, TLS 1.3 handshake with both certificates, one request),
``sh("true")``, and writing then reading a file of ``--mib`` MiB. Prints medians
and MiB/s.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.security.test_agent_channel import Pod, read_file, sh, write_file


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--pings", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        pod = Pod(Path(directory))
        try:
            asyncio.run(measure(pod, args.mib, args.pings))
        finally:
            pod.stop()


async def measure(pod: Pod, mib: int, pings: int) -> None:
    client = pod.client
    latencies = []
    for _ in range(pings):
        started = time.perf_counter()
        await client.call("ping")
        latencies.append(time.perf_counter() - started)
    print(f"ping (connect + TLS handshake + request): median {ms(latencies)}")
    runs = []
    for _ in range(20):
        started = time.perf_counter()
        await sh(client, "true")
        runs.append(time.perf_counter() - started)
    print(f'sh("true"): median {ms(runs)}')
    data = os.urandom(mib << 20)
    started = time.perf_counter()
    await write_file(client, "bench.bin", data)
    wrote = time.perf_counter() - started
    started = time.perf_counter()
    back = await read_file(client, "bench.bin")
    read = time.perf_counter() - started
    assert back == data
    print(f"write {mib} MiB: {mib / wrote:.0f} MiB/s; read: {mib / read:.0f} MiB/s")


def ms(samples: list[float]) -> str:
    return f"{statistics.median(samples) * 1000:.2f} ms"


if __name__ == "__main__":
    main()
