"""Hub authentication: what checking a caller's JupyterHub token costs a request.

    python bench/bench_hub_auth.py [--requests 400] [--users 50]

Starts the tests' real JupyterHub and a `serve --tcp --hub-auth` service (as
tests/hub/test_hub_token_auth.py does) and measures GET /v1/usage over TCP: with a token
the service has cached (median latency, and requests per second from 8 threads), with a
token it has not seen (one question to the hub), and with the service's own Unix socket
(no hub at all) for comparison; then how many questions the hub got for `--users` users
making `--requests` requests each burst, read from the hub's log.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.hub.token_hub import hub_auth_service, start_token_hub


def median_ms(call, count: int) -> float:
    times = []
    for _ in range(count):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--users", type=int, default=50)
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="jsb-bench-hub-"))
    hub = start_token_hub(base)
    try:
        names = [f"bench{i}" for i in range(args.users)]
        hub.api("POST", "users", json={"usernames": names})
        with hub_auth_service(hub) as service:
            token = hub.token("alice")
            with httpx.Client(base_url=service.url, timeout=30) as client:
                headers = {"Authorization": f"token {token}"}
                client.get("/v1/usage", headers=headers).raise_for_status()
                cached = median_ms(lambda: client.get("/v1/usage", headers=headers), 200)
                fresh = [hub.new_token("bob")[0] for _ in range(20)]
                new = median_ms(
                    lambda: client.get(
                        "/v1/usage", headers={"Authorization": f"token {fresh.pop()}"}
                    ),
                    20,
                )
                local = httpx.HTTPTransport(uds=str(service.socket))
                with httpx.Client(transport=local, base_url="http://sandbox") as over_unix:
                    unix = median_ms(lambda: over_unix.get("/v1/usage"), 200)

                def burst(_: int) -> None:
                    client.get("/v1/usage", headers=headers)

                start = time.perf_counter()
                with ThreadPoolExecutor(8) as pool:
                    list(pool.map(burst, range(args.requests)))
                rate = args.requests / (time.perf_counter() - start)
            tokens = {name: hub.token(name) for name in names}
            before = hub.log.count("GET /hub/api/user (")

            def user_burst(name: str) -> None:
                with httpx.Client(base_url=service.url, timeout=30) as own:
                    for _ in range(args.requests // args.users):
                        own.get("/v1/usage", headers={"Authorization": f"token {tokens[name]}"})

            start = time.perf_counter()
            with ThreadPoolExecutor(16) as pool:
                list(pool.map(user_burst, names))
            spent = time.perf_counter() - start
            time.sleep(1)  # the hub's log is written after its answers
            asked = hub.log.count("GET /hub/api/user (") - before
    finally:
        hub.stop()
        shutil.rmtree(base, ignore_errors=True)
    print(f"GET /v1/usage, cached token:      {cached:6.2f} ms median")
    print(f"GET /v1/usage, new token (hub):   {new:6.2f} ms median")
    print(f"GET /v1/usage, Unix socket:       {unix:6.2f} ms median")
    print(f"cached token, 8 threads:          {rate:6.0f} requests/s")
    per = args.requests // args.users
    print(f"{args.users} users x {per} requests: {asked} questions to the hub in {spent:.1f} s")


if __name__ == "__main__":
    main()
