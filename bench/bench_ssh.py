"""SSH gateway benchmarks, side by side with OpenSSH's sshd in the same kind of sandbox.

    python bench/bench_ssh.py [--runs 50] [--mib 256] [--forward-mib 1024] [--concurrent 50]

Runs as root on a Debian-like host with openssh-client, openssh-server and
openssh-sftp-server installed. It starts a private jupyter-sandbox service and
a private sshd on 127.0.0.1 (its own host key, client key and config, all in a
temporary directory). sshd's ForceCommand runs every session in a fresh bwrap
sandbox built like the service's (same namespaces, /usr overlay, /etc files,
unprivileged host uid), so both sides pay for isolation. Both are driven by the
stock `ssh` and `sftp` binaries; the script prints a Markdown table and removes
everything it started or created.

SFTP runs twice on each side: with OpenSSH's sftp-server and with the built-in server
(agent/sftp_server.py), a second service with JUPYTER_SANDBOX_SFTP=builtin for the
gateway and a session variable that sshd's ForceCommand reads for sshd. A second table
shows the four.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import filecmp
import os
import py_compile
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_sandbox import MiB, percentile, private_service, timed

from jupyter_sandbox.agent import sftp_server
from jupyter_sandbox.backends.local import install_bwrap, sandbox_argv, write_etc

SSHD = "/usr/sbin/sshd"
SFTP_SERVER = "/usr/lib/openssh/sftp-server"
SESSION_UID = 65534  # host uid of sshd's sandboxes: unprivileged, as the service's are
BUILTIN_ENV = "JSB_BENCH_SFTP"  # sshd sessions with this set to "builtin" get the built-in server
BUILTIN_IN_SSHD = ".sftp_server.pyc"  # in the home of sshd's sandboxes
TIMEOUT = 600

# Sink/source server used through `ssh -L`: a 32-byte header "get N" (send N bytes)
# or "put N" (read to EOF, answer with the count). Prints "ready <port>" once listening.
STREAM_SERVER = r"""
import socket, sys, threading
CHUNK = memoryview(bytes(range(256)) * 4096)
def serve(conn):
    with conn:
        head = b""
        while len(head) < 32:
            part = conn.recv(32 - len(head))
            if not part:
                return
            head += part
        verb, count = head.split()
        count = int(count)
        if verb == b"get":
            while count > 0:
                sent = conn.send(CHUNK[: min(count, len(CHUNK))])
                count -= sent
        else:
            buf, total = bytearray(len(CHUNK)), 0
            while n := conn.recv_into(buf):
                total += n
            conn.sendall(str(total).encode())
srv = socket.create_server(("127.0.0.1", int(sys.argv[1])))
print("ready", srv.getsockname()[1], flush=True)
while True:
    conn, _ = srv.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"""


@dataclass
class Target:
    """One SSH server as the stock client sees it."""

    label: str
    host: str
    port: int
    user: str
    known_hosts: Path
    identity: Path | None = None
    stream_port: int = 0  # the sink/source server, as seen from where forwarding connects
    notes: list[str] = field(default_factory=list)
    session_env: dict[str, str] = field(default_factory=dict)  # sent with SetEnv

    def options(self) -> list[str]:
        """Client options shared by ssh and sftp: no user config, pinned host key."""
        opts = {
            "BatchMode": "yes",
            "ControlMaster": "no",
            "ControlPath": "none",
            "StrictHostKeyChecking": "yes",
            "UserKnownHostsFile": str(self.known_hosts),
            "GlobalKnownHostsFile": "/dev/null",
            "IdentitiesOnly": "yes",
            "IdentityFile": str(self.identity) if self.identity else "none",
            "LogLevel": "ERROR",
            # the gateway has no post-quantum kex without liboqs, and sshd would pick
            # sntrup761x25519 (about 75 ms more here): both get the same exchange
            "KexAlgorithms": "curve25519-sha256",
        }
        if self.session_env:
            opts["SetEnv"] = " ".join(f"{k}={v}" for k, v in self.session_env.items())
        return ["-F", "/dev/null", *(f"-o{key}={value}" for key, value in opts.items())]

    def ssh(self, *args: str) -> list[str]:
        return ["ssh", "-p", str(self.port), *self.options(), f"{self.user}@{self.host}", *args]

    def sftp(self, batch: Path) -> list[str]:
        return [
            "sftp",
            "-q",
            "-P",
            str(self.port),
            *self.options(),
            "-b",
            str(batch),
            f"{self.user}@{self.host}",
        ]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen | None = None, timeout: float = 20) -> None:
    """Until something accepts on 127.0.0.1:port (or `proc` died)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- OpenSSH's sshd, sessions forced into bwrap ------------------------------------------


def write_session_files(work: Path) -> Path:
    """Home (with the built-in SFTP server), /etc files and the ForceCommand script."""
    (work / "home").mkdir(mode=0o700)
    builtin = work / "home" / BUILTIN_IN_SSHD
    py_compile.compile(sftp_server.__file__, cfile=str(builtin), doraise=True)
    os.chmod(builtin, 0o644)
    os.chown(work / "home", SESSION_UID, SESSION_UID)
    write_etc(work / "etc", "sshd-bench")
    drop = ["setpriv", f"--reuid={SESSION_UID}", f"--regid={SESSION_UID}", "--clear-groups"]
    sandbox = shlex.join([*drop, *sandbox_argv(install_bwrap(work), "sshd-bench", work)])
    script = work / "force-command"
    # A subsystem request reaches ForceCommand with SSH_ORIGINAL_COMMAND set to the
    # Subsystem's command, so sftp-server also runs inside the sandbox.
    builtin = f"/usr/bin/python3 -E -s -S -B {BUILTIN_IN_SSHD}"
    script.write_text(
        "#!/bin/sh\n"
        f'case "$SSH_ORIGINAL_COMMAND${BUILTIN_ENV}" in\n'
        f"  {SFTP_SERVER}builtin) set -- {builtin} ;;\n"
        f"  {SFTP_SERVER}) set -- {SFTP_SERVER} ;;\n"
        '  "") set -- /bin/bash -l ;;\n'
        '  *) set -- /bin/sh -c "$SSH_ORIGINAL_COMMAND" ;;\n'
        "esac\n"
        f'exec {sandbox} "$@"\n'
    )
    script.chmod(0o755)
    return script


@contextlib.contextmanager
def openssh_server(work: Path) -> Iterator[Target]:
    """sshd -D on a free loopback port whose sessions all run in bwrap; stopped afterwards."""
    work.chmod(0o711)
    keygen = ["ssh-keygen", "-q", "-t", "ed25519", "-N", ""]
    subprocess.run([*keygen, "-f", str(work / "host_key")], check=True)
    subprocess.run([*keygen, "-f", str(work / "client_key")], check=True)
    shutil.copyfile(work / "client_key.pub", work / "authorized_keys")
    port = free_port()
    config = work / "sshd_config"
    config.write_text(
        f"""ListenAddress 127.0.0.1:{port}
HostKey {work / "host_key"}
PidFile {work / "sshd.pid"}
AuthorizedKeysFile {work / "authorized_keys"}
StrictModes no
UsePAM no
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
AllowTcpForwarding local
X11Forwarding no
AllowAgentForwarding no
PrintMotd no
PrintLastLog no
UseDNS no
# the default 10:30:100 drops connections beyond 10 unauthenticated ones
MaxStartups 200
# root's bash would source ~/.bashrc (Debian's SSH_SOURCE_BASHRC): keep the host's
# dotfiles out of sshd's numbers
SetEnv SHLVL=1
AcceptEnv {BUILTIN_ENV}
Subsystem sftp {SFTP_SERVER}
ForceCommand {write_session_files(work)}
"""
    )
    host_key = (work / "host_key.pub").read_text().split()
    (work / "known_hosts").write_text(f"[127.0.0.1]:{port} {host_key[0]} {host_key[1]}\n")
    made_run_dir = not os.path.exists("/run/sshd")
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
    log = open(work / "sshd.log", "wb")  # noqa: SIM115 (closed in finally)
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stderr=log)
    try:
        try:
            wait_for_port(port, proc)
        except Exception:
            sys.stderr.write((work / "sshd.log").read_text()[-3000:])
            raise
        yield Target(
            "OpenSSH sshd",
            "127.0.0.1",
            port,
            "root",
            work / "known_hosts",
            identity=work / "client_key",
        )
    finally:
        stop(proc)
        log.close()
        if made_run_dir:
            with contextlib.suppress(OSError):
                os.rmdir("/run/sshd")


@contextlib.contextmanager
def host_stream_server() -> Iterator[int]:
    """The sink/source server on the host's loopback (where sshd's forwarding connects)."""
    proc = subprocess.Popen(
        ["/usr/bin/python3", "-c", STREAM_SERVER, "0"], stdout=subprocess.PIPE, text=True
    )
    try:
        yield int(proc.stdout.readline().split()[1])
    finally:
        stop(proc)


# -- the jupyter-sandbox gateway -----------------------------------------------------------


@contextlib.contextmanager
def gateway(work: Path, sftp: str = "openssh") -> Iterator[Target]:
    """A sandbox of a private service, reachable over its SSH gateway; killed afterwards.

    `sftp` is the service's JUPYTER_SANDBOX_SFTP.
    """
    from jupyter_sandbox import Sandbox

    with private_service(1), service_setting("JUPYTER_SANDBOX_SFTP", sftp):
        sb = Sandbox.create(timeout="10m")
        try:
            access = sb.expose_ssh()
            server = sb.spawn(f"python3 -c {shlex.quote(STREAM_SERVER)} 0")
            with server.output() as lines:
                port = next(int(line.text.split()[1]) for line in lines if "ready" in line.text)
            (work / "known_hosts").write_text(access.known_hosts_line + "\n")
            yield Target(
                "jupyter-sandbox gateway" + ("" if sftp == "openssh" else f" ({sftp} SFTP)"),
                access.hostname,
                access.port,
                access.username,
                work / "known_hosts",
                stream_port=port,
            )
        finally:
            sb.kill()


@contextlib.contextmanager
def service_setting(name: str, value: str) -> Iterator[None]:
    """Environment variable `name` for the service started meanwhile (read at its start)."""
    saved = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(name)
        else:
            os.environ[name] = saved


# -- measurements ---------------------------------------------------------------------------


def run(argv: list[str], timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if proc.returncode:
        raise RuntimeError(f"{shlex.join(argv[:1])} failed ({proc.returncode}): {proc.stderr}")
    return proc


def negotiated(target: Target) -> str:
    """Key exchange and cipher the stock client ends up with."""
    argv = target.ssh("true")
    verbose = run([argv[0], "-v", *argv[1:]]).stderr
    kex = re.search(r"kex: algorithm: (\S+)", verbose)
    cipher = re.search(r"kex: server->client cipher: (\S+)", verbose)
    return f"{kex and kex[1]}, {cipher and cipher[1]}"


def latency(targets: list[Target], runs: int) -> dict[str, list[float]]:
    """Milliseconds per `ssh host true` (set-up and teardown included), servers alternating."""
    out: dict[str, list[float]] = {t.label: [] for t in targets}
    for t in targets:
        run(t.ssh("true"))  # warm caches outside the measurement
    for _ in range(runs):
        for t in targets:
            out[t.label] += timed(lambda t=t: run(t.ssh("true")), 1)
    return out


def sftp_times(
    targets: list[Target], source: Path, work: Path, repeats: int
) -> dict[str, dict[str, float]]:
    """Median ms of `sftp -b` sessions that put `source`, get it back or only connect.

    The copy back is verified every time. "connect" (a session running `pwd`) is the
    set-up and teardown cost inside the other two.
    """
    back = work / "back"
    batches = {"put": f"put {source} blob\n", "get": f"get blob {back}\n", "connect": "pwd\n"}
    for name, text in batches.items():
        (work / f"{name}.batch").write_text(text)
    times = {t.label: {name: [] for name in batches} for t in targets}
    for _ in range(repeats):
        for t in targets:
            for name in batches:
                batch = work / f"{name}.batch"
                times[t.label][name] += timed(lambda t=t, b=batch: run(t.sftp(b)), 1)
            if not filecmp.cmp(source, back, shallow=False):
                raise RuntimeError(f"{t.label}: the SFTP round trip changed the file")
            back.unlink()
    return {
        label: {name: statistics.median(ms) for name, ms in by_name.items()}
        for label, by_name in times.items()
    }


def stream(port: int, verb: str, count: int) -> float:
    """Seconds to move `count` bytes through 127.0.0.1:port ('get' down, 'put' up)."""
    buf = memoryview(bytearray(MiB))
    start = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(f"{verb} {count}".ljust(32).encode())
        if verb == "get":
            total = 0
            while n := s.recv_into(buf):
                total += n
        else:
            left = count
            while left > 0:
                left -= s.send(buf[: min(left, MiB)])
            s.shutdown(socket.SHUT_WR)
            total = int(b"".join(iter(lambda: s.recv(64), b"")) or 0)
    if total != count:
        raise RuntimeError(f"{verb} through the forward moved {total} of {count} bytes")
    return time.perf_counter() - start


def forward_rates(target: Target, mib: int) -> tuple[float, float]:
    """MiB/s down (server → client) and up through `ssh -N -L` to the sink/source server."""
    local = free_port()
    proc = subprocess.Popen(
        target.ssh("-N", "-oExitOnForwardFailure=yes", f"-L{local}:127.0.0.1:{target.stream_port}")
    )
    try:
        wait_for_port(local, proc)
        stream(local, "get", MiB)  # first channel outside the measurement
        count = mib * MiB
        return mib / stream(local, "get", count), mib / stream(local, "put", count)
    finally:
        stop(proc)


def concurrent(target: Target, sessions: int) -> tuple[int, float, str]:
    """Failures, wall seconds and first error of `sessions` simultaneous `ssh host cmd`."""
    results: list[tuple[int, str, str]] = []
    lock = threading.Lock()

    def one() -> None:
        try:
            p = subprocess.run(
                target.ssh("echo $((1+1))"), capture_output=True, text=True, timeout=120
            )
            outcome = (p.returncode, p.stdout.strip(), p.stderr.strip())
        except subprocess.TimeoutExpired:
            outcome = (-1, "", "timed out")
        with lock:
            results.append(outcome)

    start = time.perf_counter()
    threads = [threading.Thread(target=one) for _ in range(sessions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    failed = [r for r in results if r[0] != 0 or r[1] != "2"]
    return len(failed), elapsed, (failed[0][2] or f"rc {failed[0][0]}") if failed else ""


# -- report -----------------------------------------------------------------------------------


def measure(
    targets: list[Target], sftp_targets: list[Target], args: argparse.Namespace, work: Path
) -> dict[str, dict]:
    """Every measurement for every target, the servers taking turns within each.

    SFTP is measured for `sftp_targets` as well, all taking turns.
    """
    source = work / "blob"
    with open(source, "wb") as f:
        for _ in range(args.mib):
            f.write(os.urandom(MiB))
    out: dict[str, dict] = {t.label: {"algorithms": negotiated(t)} for t in targets}
    out.update({t.label: {} for t in sftp_targets})
    for label, ms in latency(targets, args.runs).items():
        out[label]["latency"] = ms
    for label, ms in sftp_times(targets + sftp_targets, source, work, args.repeats).items():
        for name in ("put", "get"):  # MiB/s without and with the session's set-up
            out[label][name] = (
                args.mib / ((ms[name] - ms["connect"]) / 1000),
                args.mib / (ms[name] / 1000),
            )
    for t in targets:
        out[t.label]["down"], out[t.label]["up"] = forward_rates(t, args.forward_mib)
    for t in targets:
        out[t.label]["concurrent"] = concurrent(t, args.concurrent)
    return out


def table(ours: dict, theirs: dict, args: argparse.Namespace) -> list[str]:
    """The Markdown table: ours, sshd, ratio, target."""

    def lat(d: dict) -> str:
        p50, p95 = (percentile(d["latency"], q) for q in (0.5, 0.95))
        return f"p50 {p50:.1f} ms, p95 {p95:.1f} ms"

    def conc(d: dict) -> str:
        failed, elapsed, error = d["concurrent"]
        return f"{failed} failed, {elapsed:.1f} s" + (f" ({error[:60]})" if error else "")

    p50 = percentile(ours["latency"], 0.5) / percentile(theirs["latency"], 0.5)
    rows = [
        "| measurement | jupyter-sandbox gateway | OpenSSH sshd | ratio | target |",
        "|---|---|---|---|---|",
        f"| `ssh host true` ({args.runs} runs) | {lat(ours)} | {lat(theirs)} | {p50:.2f}x "
        "| p50 ≤ 0.5x |",
    ]
    for key, what in (("put", "SFTP put"), ("get", "SFTP get")):
        (net, gross), (their_net, their_gross) = ours[key], theirs[key]
        rows.append(
            f"| {what} {args.mib} MiB: transfer (whole session) | {net:.0f} MiB/s ({gross:.0f}) "
            f"| {their_net:.0f} MiB/s ({their_gross:.0f}) | {net / their_net:.2f}x "
            f"({gross / their_gross:.2f}x) | ≥ 0.7x |"
        )
    for key, what in (("down", "`-L` download"), ("up", "`-L` upload")):
        rows.append(
            f"| {what} {args.forward_mib} MiB | {ours[key]:.0f} MiB/s | {theirs[key]:.0f} MiB/s "
            f"| {ours[key] / theirs[key]:.2f}x | ≥ 0.7x |"
        )
    rows.append(
        f"| {args.concurrent} concurrent `ssh host 'echo $((1+1))'` | {conc(ours)} "
        f"| {conc(theirs)} | | 0 failures |"
    )
    rows.append(f"| kex, cipher negotiated | {ours['algorithms']} | {theirs['algorithms']} | | |")
    return rows


def sftp_table(results: dict[str, dict], labels: dict[str, str], args: argparse.Namespace) -> list:
    """SFTP MiB/s transfer (whole session) by SFTP server (rows) and SSH server (columns)."""
    rows = [
        f"| SFTP server, {args.mib} MiB | gateway put | gateway get | sshd put | sshd get |",
        "|---|---|---|---|---|",
    ]
    for server, (ours, theirs) in labels.items():
        cells = [
            f"{results[label][key][0]:.0f} ({results[label][key][1]:.0f})"
            for label in (ours, theirs)
            for key in ("put", "get")
        ]
        rows.append(f"| {server} | " + " | ".join(cells) + " |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=50, help="`ssh host true` runs per server")
    parser.add_argument("--mib", type=int, default=256, help="SFTP file size")
    parser.add_argument("--repeats", type=int, default=3, help="SFTP transfers per direction")
    parser.add_argument("--forward-mib", type=int, default=1024, help="MiB through -L each way")
    parser.add_argument("--concurrent", type=int, default=50, help="simultaneous sessions")
    args = parser.parse_args()
    if os.geteuid() != 0 or not all(os.access(p, os.X_OK) for p in (SSHD, SFTP_SERVER)):
        sys.exit("needs root and Debian's openssh-server and openssh-sftp-server")
    work = Path(tempfile.mkdtemp(prefix="jsb-bench-ssh-", dir="/var/tmp"))
    work.chmod(0o711)  # the sandboxes' unprivileged uids reach their files below it
    try:
        with contextlib.ExitStack() as stack:
            (work / "sshd").mkdir()
            (work / "gateway").mkdir()
            (work / "gateway-builtin").mkdir()
            sshd = stack.enter_context(openssh_server(work / "sshd"))
            sshd.stream_port = stack.enter_context(host_stream_server())
            ours = stack.enter_context(gateway(work / "gateway"))
            ours_builtin = stack.enter_context(gateway(work / "gateway-builtin", "builtin"))
            sshd_builtin = dataclasses.replace(
                sshd, label="OpenSSH sshd (builtin SFTP)", session_env={BUILTIN_ENV: "builtin"}
            )
            results = measure([ours, sshd], [ours_builtin, sshd_builtin], args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("\n".join(table(results[ours.label], results[sshd.label], args)))
    print()
    labels = {
        "OpenSSH sftp-server": (ours.label, sshd.label),
        "built-in (agent/sftp_server.py)": (ours_builtin.label, sshd_builtin.label),
    }
    print("\n".join(sftp_table(results, labels, args)))


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # run the cleanups on SIGTERM too
    main()
