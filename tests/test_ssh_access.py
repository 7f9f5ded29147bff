"""``expose_ssh()`` through the real service: credentials, their lifetime, the CLI."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from jupyter_sandbox import InvalidRequest, Sandbox, SshAccess
from tests.conftest import ServiceEnv, wait_for

pytestmark = [pytest.mark.unprivileged, pytest.mark.backends("local", "kubernetes")]


def pinned(access: SshAccess, known_hosts: Path) -> list[str]:
    """The ssh command line a careful user runs: the gateway's host key pinned."""
    known_hosts.write_text(access.known_hosts_line + "\n")
    return [
        "ssh",
        "-o",
        f"UserKnownHostsFile={known_hosts}",
        "-o",
        "StrictHostKeyChecking=yes",
        "-o",
        "BatchMode=yes",
        "-p",
        str(access.port),
        f"{access.username}@{access.hostname}",
    ]


def ssh(
    access: SshAccess,
    known_hosts: Path,
    *command: str,
    key: Path | None = None,
    timeout: float = 30,
) -> subprocess.CompletedProcess:
    """Run the stock OpenSSH client once."""
    identity = ["-o", "IdentitiesOnly=yes"]
    identity += ["-i", str(key)] if key else ["-o", "IdentityFile=/dev/null"]
    argv = pinned(access, known_hosts)
    return subprocess.run(
        [*argv[:1], *identity, *argv[1:], *command], capture_output=True, text=True, timeout=timeout
    )


def live_session(access: SshAccess, known_hosts: Path) -> subprocess.Popen:
    """An open SSH session that prints a line once it is in, then waits."""
    proc = subprocess.Popen(
        [*pinned(access, known_hosts), "echo in; exec sleep 600"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline() == "in\n"
    return proc


def test_expose_ssh_lands_in_the_sandbox(sandbox, tmp_path):
    access = sandbox.expose_ssh()
    assert len(access.username) >= 22 and access.username.isalnum()
    assert access.command == f"ssh -p {access.port} {access.username}@127.0.0.1"
    assert access.host_key_fingerprint.startswith("SHA256:")
    assert access.username not in repr(access)
    result = ssh(access, tmp_path / "kh", "whoami; pwd; hostname; exit 5")
    assert result.stdout.split() == ["sandbox", "/home/sandbox", sandbox.id]
    assert result.returncode == 5
    events = [e.text for e in sandbox.logs() if e.source == "ssh"]
    assert events[0].startswith("SSH connection from 127.0.0.1 port ")


def test_each_call_gives_a_fresh_token(sandbox):
    assert sandbox.expose_ssh().username != sandbox.expose_ssh().username


@pytest.mark.parametrize("end", ["revoke", "kill", "ttl"])
def test_ending_access_closes_live_sessions_within_a_second(service_env, tmp_path, end):
    sb = Sandbox.create()
    try:
        access = sb.expose_ssh(ttl="3s" if end == "ttl" else None)
        session = live_session(access, tmp_path / "kh")
        started = time.monotonic()
        if end == "revoke":
            assert sb.revoke_ssh() == 1
        elif end == "kill":
            sb.kill()
        session.wait(timeout=10 if end == "ttl" else 5)
        elapsed = time.monotonic() - started
        assert elapsed < (4.5 if end == "ttl" else 1.0)
        later = ssh(access, tmp_path / "kh", "true")
        assert later.returncode == 255 and "Permission denied" in later.stderr
    finally:
        sb.kill()


def test_revoke_one_token_keeps_the_others(sandbox, tmp_path):
    first, second = sandbox.expose_ssh(), sandbox.expose_ssh()
    assert sandbox.revoke_ssh(first) == 1
    assert "Permission denied" in ssh(first, tmp_path / "kh", "true").stderr
    assert ssh(second, tmp_path / "kh", "echo ok").stdout == "ok\n"


def test_single_use_allows_exactly_one_connection(sandbox, tmp_path):
    access = sandbox.expose_ssh(single_use=True)
    assert ssh(access, tmp_path / "kh", "echo once").stdout == "once\n"
    again = ssh(access, tmp_path / "kh", "echo twice")
    assert again.returncode == 255 and "Permission denied" in again.stderr


def test_public_key_is_required_as_well(sandbox, tmp_path):
    key = tmp_path / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    access = sandbox.expose_ssh(public_key=Path(f"{key}.pub").read_text())
    assert "Permission denied" in ssh(access, tmp_path / "kh", "true").stderr
    assert ssh(access, tmp_path / "kh", "echo keyed", key=key).stdout == "keyed\n"
    with pytest.raises(InvalidRequest):
        sandbox.expose_ssh(public_key="ssh-ed25519 not-a-key")


def keypair(path: Path) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    return path


def test_a_wrong_key_does_not_use_up_a_single_use_token(sandbox, tmp_path):
    """Attack: whoever saw a single-use, key-bound token (but not the key) presents it with
    another key, and with none, to burn it. The key's holder still gets in, once."""
    key, wrong = keypair(tmp_path / "right"), keypair(tmp_path / "wrong")
    access = sandbox.expose_ssh(single_use=True, public_key=Path(f"{key}.pub").read_text())
    for attempt in (wrong, None):
        denied = ssh(access, tmp_path / "kh", "echo in", key=attempt)
        assert (denied.returncode, denied.stdout) == (255, ""), denied
    assert ssh(access, tmp_path / "kh", "echo in", key=key).stdout == "in\n"
    again = ssh(access, tmp_path / "kh", "echo in", key=key)
    assert (again.returncode, again.stdout) == (255, ""), again


@pytest.mark.parametrize("keyed", [False, True], ids=["token-only", "token-and-key"])
def test_racing_logins_with_a_single_use_token_let_exactly_one_in(sandbox, tmp_path, keyed):
    """Attack: several correct logins with one single-use token at the same instant, to
    get more than one session out of it. Exactly one gets in."""
    key = keypair(tmp_path / "key") if keyed else None
    public_key = Path(f"{key}.pub").read_text() if key else None
    access = sandbox.expose_ssh(single_use=True, public_key=public_key)
    pinned(access, tmp_path / "kh")
    identity = ["-o", "IdentitiesOnly=yes", "-i", str(key) if key else "/dev/null"]
    argv = pinned(access, tmp_path / "kh")
    procs = [
        subprocess.Popen(
            [*argv[:1], *identity, *argv[1:], "echo in"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        for _ in range(6)
    ]
    outputs = [proc.communicate(timeout=60)[0] for proc in procs]
    assert sorted(outputs) == [""] * 5 + ["in\n"], outputs


def test_unknown_expired_and_revoked_tokens_look_the_same(sandbox, tmp_path):
    revoked = sandbox.expose_ssh()
    sandbox.revoke_ssh()
    expired = sandbox.expose_ssh(ttl="200ms")
    wait_for(
        lambda: ssh(expired, tmp_path / "kh", "true").returncode == 255,
        10,
        message="the short-lived token to expire",
    )
    unknown = SshAccess(
        revoked.hostname,
        revoked.port,
        "a" * 25,
        "",
        None,
        revoked.host_key_fingerprint,
        revoked.known_hosts_line,
    )
    errors = {
        ssh(a, tmp_path / "kh", "true").stderr.strip().splitlines()[-1].split("@", 1)[1]
        for a in (revoked, expired, unknown)
    }
    assert errors == {"127.0.0.1: Permission denied (publickey)."}


def test_host_key_persists_and_tokens_never_reach_the_log(service_env: ServiceEnv, tmp_path):
    with Sandbox.create(timeout="2m") as sb:
        before = sb.expose_ssh()
        assert ssh(before, tmp_path / "kh", "true").returncode == 0
        service_env.stop_service()
        after = Sandbox.connect(sb.id).expose_ssh()  # starts the service again
        assert after.known_hosts_line == before.known_hosts_line
        assert ssh(after, tmp_path / "kh", "echo pinned").stdout == "pinned\n"
        assert ssh(before, tmp_path / "kh", "echo still").stdout == "still\n"
    log = service_env.log_file.read_text()
    assert "SSH gateway on" in log
    assert before.username not in log and after.username not in log


def test_cli_ssh_prints_command_and_connects(service_env: ServiceEnv, sandbox):
    printed = service_env.run_cli("ssh", sandbox.id).stdout.strip()
    assert printed.startswith("ssh -p ") and printed.endswith("@127.0.0.1")
    connected = service_env.run_cli("ssh", sandbox.id, "--connect", check=False, input="hostname\n")
    assert connected.stdout.strip().endswith(sandbox.id)
    revoked = service_env.run_cli("ssh", sandbox.id, "--revoke").stdout
    assert revoked.startswith(f"revoked 2 credential(s) of {sandbox.id}")
