"""SSH tokens stay secret: never in a process's argv or environment, never in a log.

Every local user can read every process's argv (``ps``), and the service log
used to be world-readable. An attacker who is just another local user looks in
all of them while the project's own ``ssh`` processes run.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import stat
import subprocess
import sys
from pathlib import Path

import asyncssh
import pytest
from serverext_fixtures import JupyterProcess

from jupyter_sandbox import Sandbox
from jupyter_sandbox._ssh_config import HOST_ALIAS, write_ssh_config
from jupyter_sandbox.serverext.handlers import ssh_script
from jupyter_sandbox.ssh import generate_token
from tests.conftest import UNPINNED_SSH, ServiceEnv, wait_for
from tests.test_ssh_gateway import Gw, Loop
from tests.test_tunnel import server  # noqa: F401

pytestmark = pytest.mark.unprivileged
CLI = [sys.executable, "-m", "jupyter_sandbox"]
TOKEN_IN_CONFIG = re.compile(r'^\s*User "?([a-z0-9]+)"?$', re.MULTILINE)


def processes_showing(secret: str, *, besides: int | None = None) -> list[str]:
    """Every process (but `besides`) whose argv or environment, as far as we may read
    them, holds `secret`."""
    found = []
    needle = secret.encode()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        if pid == str(besides):
            continue
        for part in ("cmdline", "environ"):
            try:
                data = Path(f"/proc/{pid}/{part}").read_bytes()
            except OSError:
                continue
            if needle in data:
                found.append(f"{pid}/{part}: {data[:200]!r}")
    return found


def ssh_children(pid: int) -> list[list[str]]:
    """The argv of each `ssh` process started by `pid`."""
    found = []
    for child in filter(str.isdigit, os.listdir("/proc")):
        try:
            status = Path(f"/proc/{child}/status").read_text()
            argv = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")[:-1]
        except OSError:
            continue
        if f"\nPPid:\t{pid}\n" in status and argv[:1] == [b"ssh"]:
            found.append([a.decode() for a in argv])
    return found


def token_of(config: Path) -> str:
    """The user (the token) a private ssh config logs in as; its mode must be 0600."""
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    match = TOKEN_IN_CONFIG.search(config.read_text())
    assert match, config.read_text()
    return match.group(1)


def test_ssh_connect_keeps_the_token_out_of_every_argv_and_environ(
    service_env: ServiceEnv, sandbox: Sandbox
) -> None:
    """Attack: a local user scans /proc/*/cmdline and /proc/*/environ while
    `jupyter-sandbox ssh --connect` runs (`ssh TOKEN@host` showed it before)."""
    cli = subprocess.Popen(
        [*CLI, "ssh", sandbox.id, "--connect", "--", "echo ready; read line; echo bye $line"],
        env={**os.environ, **service_env.env},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert cli.stdout.readline() == "ready\n"
        (argv,) = ssh_children(cli.pid)
        config = Path(argv[argv.index("-F") + 1])
        token = token_of(config)
        assert len(token) >= 25  # a real token, logged in with just now
        assert processes_showing(token) == []
        out, err = cli.communicate("done\n", timeout=30)
    finally:
        cli.kill()
        cli.wait()
    assert (cli.returncode, out) == (0, "bye done\n"), err
    assert not config.exists() and not config.parent.exists()


def test_terminal_ssh_keeps_the_token_out_of_every_argv_and_environ(
    service_env: ServiceEnv, sandbox: Sandbox, tmp_path: Path
) -> None:
    """Attack: the same scan while a JupyterLab terminal's `ssh` into a sandbox runs (its
    config file used to be named after the token's first characters)."""
    access = sandbox.expose_ssh(single_use=True)
    script, config = ssh_script(access, (access.hostname, access.port), tmp_path / "ssh")
    assert access.username not in script + config
    assert token_of(Path(config)) == access.username
    shell = subprocess.Popen(
        ["sh", "-c", script, config],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        shell.stdin.write("echo ready\n")
        shell.stdin.flush()
        assert shell.stdout.readline() == "ready\n"
        assert processes_showing(access.username) == []
        _, err = shell.communicate("exit\n", timeout=30)
    finally:
        shell.kill()
        shell.wait()
    assert shell.returncode == 0, err
    assert list((tmp_path / "ssh").iterdir()) == []  # config and known_hosts removed


def test_ssh_through_the_jupyter_tunnel_can_keep_both_tokens_out_of_argv(
    server: JupyterProcess,  # noqa: F811
    sandbox: Sandbox,
    tmp_path: Path,
) -> None:
    """Attack: the same scan while ssh runs through `jupyter-sandbox tunnel` as a
    ProxyCommand, set up with a private ssh config and `--token-file`: neither the SSH
    token nor the Jupyter token (which grants the whole Jupyter server) shows."""
    access = sandbox.expose_ssh()
    token_file = tmp_path / "jupyter-token"
    token_file.write_text(server.token + "\n")
    token_file.chmod(0o600)
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(f"{sandbox.id} {access.known_hosts_line.split(maxsplit=1)[1]}\n")
    config = tmp_path / "ssh_config"
    write_ssh_config(config, sandbox.id, 22, access.username, known_hosts)
    proxy = f"{sys.executable} -m jupyter_sandbox.cli.tunnel --url {server.url.replace('%', '%%')}"
    with open(config, "a") as f:
        f.write(f"  ProxyCommand {proxy} --token-file {token_file} %h\n")
    ssh = subprocess.Popen(
        ["ssh", "-F", str(config), HOST_ALIAS, "echo ready; read line; echo bye $line"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert ssh.stdout.readline() == "ready\n"
        assert processes_showing(access.username) == []
        # The test's Jupyter server got its token on its command line; nothing else has it.
        assert processes_showing(server.token, besides=server.proc.pid) == []
        out, err = ssh.communicate("done\n", timeout=30)
    finally:
        ssh.kill()
        ssh.wait()
    assert (ssh.returncode, out) == (0, "bye done\n"), err


def test_service_log_is_private_and_never_holds_a_token(
    service_env: ServiceEnv, sandbox: Sandbox, tmp_path: Path
) -> None:
    """Attack: read service.log as another local user, or find tokens in it after valid
    and failed logins."""
    access = sandbox.expose_ssh()
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(access.known_hosts_line + "\n")
    unknown = generate_token()
    for user in (access.username, unknown, access.username[:-1]):
        subprocess.run(
            ["ssh", *UNPINNED_SSH, "-p", str(access.port), f"{user}@{access.hostname}", "true"],
            capture_output=True,
            timeout=30,
        )
    assert stat.S_IMODE(service_env.log_file.stat().st_mode) == 0o600
    log = service_env.log_file.read_text()
    assert "SSH gateway on" in log  # the log is the service's
    assert access.username[:-1] not in log and unknown not in log


def test_asyncssh_debug_logs_and_packet_dumps_hold_no_token(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Attack: read the gateway's log with asyncssh at its most verbose (debug level 3
    dumps every packet, and a userauth request carries the username, the token)."""
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="asyncssh")
    asyncssh.set_debug_level(3)
    loop = Loop()
    gateway = Gw(loop, tmp_path)
    token = generate_token()
    try:
        result = subprocess.run(gateway.ssh(token, "true"), capture_output=True, timeout=60)
    finally:
        gateway.close()
        loop.stop()
        asyncssh.set_debug_level(1)
    assert result.returncode == 255 and b"Permission denied" in result.stderr
    assert "MSG_USERAUTH_REQUEST" in caplog.text  # the packet records were captured ...
    pieces = {token[i : i + 8] for i in range(len(token) - 7)}
    assert not [p for p in pieces if p in caplog.text]  # ... nor any piece of the token


@pytest.mark.parametrize("started_by", ["client", "hand"])
def test_an_existing_readable_service_log_is_made_private(
    separate_service_env: dict[str, str], tmp_path: Path, started_by: str
) -> None:
    """Attack: read a service.log that an older version, or a shell redirect, created
    world-readable. The service makes it 0600 when it starts, whoever started it."""
    env = {**separate_service_env, "JUPYTER_SANDBOX_POOL": "0"}
    log_file = tmp_path / "data" / "sandbox" / "service.log"
    log_file.parent.mkdir(parents=True)
    log_file.write_text("older entries\n")
    log_file.chmod(0o644)
    runtime_file = tmp_path / "rt" / "jupyter-sandbox.json"
    by_hand = None
    if started_by == "client":
        code = "from jupyter_sandbox import Sandbox; Sandbox.list()"
        subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=60)
    else:
        with open(log_file, "ab") as log:
            by_hand = subprocess.Popen(
                [sys.executable, "-m", "jupyter_sandbox", "serve"], env=env, stdout=log, stderr=log
            )
    pid = wait_for(lambda: runtime_file.exists() and json.loads(runtime_file.read_text())["pid"])
    try:
        assert stat.S_IMODE(log_file.stat().st_mode) == 0o600
        assert log_file.read_text().startswith("older entries\n")
    finally:
        os.kill(pid, signal.SIGTERM)
        wait_for(lambda: not runtime_file.exists(), message="the service to stop")
        if by_hand is not None:
            by_hand.wait(30)
