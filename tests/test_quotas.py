"""Quotas of the config file, enforced by a real service at create and extend.

Each test here starts a service of its own (per-user mode, this test's OS user) whose
config file it writes; what a user reads (the error message, ``usage()``, the CLI) is
checked against what was created. The resolution of user, group and default tables is
checked on the tables alone too, with groups a real user can have.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jupyter_sandbox import (
    AsyncSandbox,
    InvalidRequest,
    PermissionDenied,
    QuotaExceeded,
    Sandbox,
    SandboxFailed,
    Usage,
)
from jupyter_sandbox._config import host_cpus, host_memory
from jupyter_sandbox._durations import format_size_down
from jupyter_sandbox.client._sync import portal
from jupyter_sandbox.service.identity import group_names, user_name
from jupyter_sandbox.service.quotas import KEYS, QuotaConfigError, Quotas, Use, check_create
from tests.conftest import (
    sandbox_cli,
    sandbox_mounts,
    sandbox_pids,
    sandbox_processes,
    storage_parent,
    wait_for,
)
from tests.security.test_service_collisions import _forget_uid_claims

pytestmark = pytest.mark.unprivileged

ME = user_name(os.getuid())
MY_GROUP = sorted(group_names(os.getuid()))[0]
GiB = 1 << 30


class QuotaService:
    """A service of this user with a config file of the test's own."""

    def __init__(self, base: Path, storage: Path) -> None:
        self.config = base / "config.toml"
        self.stderr = base / "service.err"
        self.storage = storage
        self.env = {
            "JUPYTER_RUNTIME_DIR": str(base / "rt"),
            "JUPYTER_DATA_DIR": str(base / "data"),
            "JUPYTER_SANDBOX_DIR": str(storage),
            "JUPYTER_SANDBOX_CONFIG": str(self.config),
            "JUPYTER_SANDBOX_SSH_PORT": "0",
            "JUPYTER_SANDBOX_POOL": "0",  # every create starts a sandbox: a wide race window
        }
        self.process: subprocess.Popen | None = None

    @property
    def runtime_file(self) -> Path:
        return Path(self.env["JUPYTER_RUNTIME_DIR"]) / "jupyter-sandbox.json"

    def serve(self, check: bool = True) -> subprocess.Popen:
        """`jupyter-sandbox serve` in this environment; waits until it listens if `check`."""
        with open(self.stderr, "ab") as err:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "jupyter_sandbox", "serve"],
                env={**os.environ, **self.env},
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
        if check:
            wait_for(
                lambda: self.runtime_file.exists() or self.process.poll() is not None,
                30,
                message="the service to listen",
            )
            assert self.process.poll() is None, self.log()
        return self.process

    @property
    def pid(self) -> int:
        return json.loads(self.runtime_file.read_text())["pid"]

    def log(self) -> str:
        return self.stderr.read_text() if self.stderr.exists() else ""

    def reload(self, text: str) -> None:
        """Write a new config file and tell the service (SIGHUP) to read it again."""
        before = self.log()
        self.config.write_text(text)
        os.kill(self.pid, signal.SIGHUP)
        wait_for(lambda: len(self.log()) > len(before), 10, message="the reload's log line")

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return sandbox_cli(self.env, *args, check=check)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(30)


@pytest.fixture
def quota_service(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[QuotaService]:
    """A quota service (not started: write its config first), this process's client
    pointed at it; afterwards its sandboxes are killed and nothing of them is left."""
    storage = Path(tempfile.mkdtemp(prefix="jsb-", dir=storage_parent()))
    os.chmod(storage, 0o711)
    service = QuotaService(tmp_path, storage)
    for key, value in service.env.items():
        monkeypatch.setenv(key, value)
    try:
        yield service
        if service.process is not None and service.process.poll() is None:
            left = Sandbox.list()
            for info in left:
                Sandbox.connect(info.id).kill()
            assert not left, f"test left sandboxes running: {[s.id for s in left]}"
    finally:
        service.stop()
        leftovers = sandbox_processes(storage)
        mounted = sandbox_mounts(storage)
        sandboxes = storage / "sandboxes"
        remaining = list(sandboxes.iterdir()) if sandboxes.exists() else []
        _forget_uid_claims(storage)
        subprocess.run(["rm", "-rf", str(storage)], check=False)
    assert not leftovers and not mounted and not remaining, (leftovers, mounted, remaining)


def started(service: QuotaService, config: str) -> QuotaService:
    service.config.write_text(config)
    service.serve()
    return service


def create(**options) -> Sandbox:
    return Sandbox.create(timeout=options.pop("timeout", "10m"), **options)


# -- the tables alone --------------------------------------------------------------------------

TABLES = """
[quota.default]
sandboxes = 3
memory = "4G"
cpus = 4
lifetime = "8h"

[quota.group.students]
sandboxes = 2
cpus = 1

[quota.group.assistants]
sandboxes = 5
lifetime = "unlimited"

[quota.user.alice]
memory = "8G"
sandboxes = 1
"""


def parsed(text: str, path: str = "/etc/jupyter-sandbox/config.toml") -> Quotas:
    import tomllib

    return Quotas.parse(tomllib.loads(text), Path(path), administered=True)


def test_a_users_table_wins_then_the_most_generous_group_then_the_default():
    quotas = parsed(TABLES)
    alice = quotas.of("alice", {"students", "assistants"})
    assert alice.as_json() == {"sandboxes": 1, "memory": 8 * GiB, "cpus": 1.0, "lifetime": None}
    assert alice.sources() == {
        "sandboxes": "the quota set for alice",
        "memory": "the quota set for alice",
        "cpus": 'group "students"',
        "lifetime": 'group "assistants"',
    }
    bob = quotas.of("bob", {"students", "assistants"})  # per key, the larger of his groups
    assert bob.as_json() == {"sandboxes": 5, "memory": 4 * GiB, "cpus": 1.0, "lifetime": None}
    carol = quotas.of("carol", {"staff"})  # no table of hers: the default
    assert carol.as_json() == {"sandboxes": 3, "memory": 4 * GiB, "cpus": 4.0, "lifetime": 28800}
    assert set(carol.sources().values()) == {"the default quota"}
    nobody = Quotas().of("dave", {"students"})
    assert nobody.as_json() == dict.fromkeys(KEYS) and nobody.sources() == dict.fromkeys(KEYS)


def test_a_group_can_be_less_generous_than_the_default_and_still_apply():
    """A group's table overrides the default even when it grants less."""
    assert parsed(TABLES).of("erin", {"students"}).value("cpus") == 1.0


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[quota.default]\nsandboxes = -1", "[quota.default]: sandboxes = -1 is not valid: "),
        ("[quota.default]\nsandboxes = 1.5", "expected a whole number of sandboxes"),
        ('[quota.default]\nmemory = "lots"', 'memory = "lots" is not valid: expected a size'),
        ("[quota.default]\nmemory = true", "memory = true is not valid"),
        ("[quota.default]\ncpus = 0", "cpus = 0 is not valid: expected a number of CPUs"),
        ('[quota.default]\nlifetime = "session"', 'lifetime = "session" is not valid'),
        ('[quota.default]\nlifetime = "2 weeks"', "expected a duration such as"),
        ("[quota.default]\nmemroy = 3", "unknown key 'memroy'; a quota table takes sandboxes,"),
        ("[quota.group.students]\nsandbox = 3", "[quota.group.students]: unknown key 'sandbox'"),
        ("[quota.user]\nalice = 3", "[quota.user.alice] must be a table of sandboxes,"),
        ("[quota.people.alice]\nsandboxes = 3", "unknown table [quota.people]: quota tables"),
        ("quota = 3", "quota must be a table"),
    ],
)
def test_bad_tables_name_the_table_the_key_and_what_is_allowed(text, message):
    with pytest.raises(QuotaConfigError) as refused:
        parsed(text, "/srv/course.toml")
    assert str(refused.value).startswith("/srv/course.toml: ")
    assert message in str(refused.value)


toml_values = st.recursive(
    st.one_of(
        st.booleans(),
        st.integers(),
        st.floats(),
        st.text(max_size=12),
        st.sampled_from(["unlimited", "4G", "1h30m", "session", "0", "-1G", "1e309"]),
    ),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=6,
)
tables = st.dictionaries(st.sampled_from([*KEYS, "memroy", ""]), toml_values, max_size=5)


@settings(max_examples=300, deadline=None)
@given(
    default=toml_values | tables,
    groups=toml_values | st.dictionaries(st.text(max_size=8), toml_values | tables, max_size=3),
    users=st.dictionaries(st.text(max_size=8), tables, max_size=3),
)
def test_any_quota_tables_parse_or_give_a_config_error(default, groups, users):
    """Whatever the file holds, the service gets quotas or an error naming the table."""
    config = {"quota": {"default": default, "group": groups, "user": users}}
    try:
        quotas = Quotas.parse(config, Path("/etc/q.toml"))
    except QuotaConfigError as e:
        assert str(e).startswith("/etc/q.toml: ") and "[quota" in str(e)
        return
    for name in [*users, "someone"]:
        resolved = quotas.of(name, set(groups) if isinstance(groups, dict) else set())
        for key, value in resolved.as_json().items():
            assert value is None or (math.isfinite(value) and value >= 0), (key, value)


def test_the_messages_say_which_quota_the_limit_the_use_where_and_what_to_do():
    quota = parsed(TABLES).of("alice", {"students"})
    with pytest.raises(QuotaExceeded) as refused:
        check_create(quota, Use(sandboxes=1), GiB, 1.0, None)
    assert str(refused.value) == (
        "quota exceeded: user alice may have 1 sandbox at once (the quota set for alice), "
        "and has 1. Kill one (jupyter-sandbox kill ID) or ask an administrator to raise "
        '"sandboxes" in /etc/jupyter-sandbox/config.toml.'
    )
    with pytest.raises(QuotaExceeded) as refused:
        check_create(parsed(TABLES).of("bob", {"staff"}), Use(1, 3 * GiB, 1.0), 2 * GiB, 1, None)
    assert str(refused.value) == (
        "quota exceeded: user bob may have 4 GiB of memory across their sandboxes at once "
        "(the default quota), has 3 GiB and this sandbox asks for 2 GiB. Ask for at most "
        "1 GiB of memory, kill one (jupyter-sandbox kill ID) or ask an administrator to "
        'raise "memory" in /etc/jupyter-sandbox/config.toml.'
    )
    with pytest.raises(QuotaExceeded) as refused:
        check_create(parsed(TABLES).of("bob", {"staff"}), Use(), GiB, 1, 10 * 3600)
    assert str(refused.value) == (
        "quota exceeded: user bob may give a sandbox at most 8h to live from now (the default "
        'quota), and this sandbox asks for 10h. Ask for at most 8h, use timeout "session" (the '
        "sandbox then lives as long as the notebook or script that made it) or ask an "
        'administrator to raise "lifetime" in /etc/jupyter-sandbox/config.toml.'
    )


# -- a running service -------------------------------------------------------------------------


def test_no_config_file_means_no_quota_and_usage_still_answers(quota_service):
    quota_service.serve()  # its config file does not exist
    usage = Sandbox.usage()
    assert isinstance(usage, Usage)
    assert (usage.user, usage.uid, usage.instructor, usage.mode) == (ME, os.getuid(), False, "user")
    assert usage.quota == dict.fromkeys(KEYS)
    assert usage.usage == {"sandboxes": 0, "memory": 0, "cpus": 0.0}
    assert Sandbox.usage(ME) == usage  # naming oneself is one's own
    with pytest.raises(PermissionDenied, match="only an instructor may see another user's"):
        Sandbox.usage("someone-else")


def test_the_service_refuses_to_start_with_a_bad_quota_table(quota_service):
    quota_service.config.write_text('[quota.default]\nmemory = "lots"\n')
    process = quota_service.serve(check=False)
    assert process.wait(60) != 0
    log = quota_service.log()
    assert f'{quota_service.config}: [quota.default]: memory = "lots" is not valid' in log
    assert not quota_service.runtime_file.exists()


def test_the_count_quota_at_create_with_the_message_a_user_reads(quota_service):
    started(
        quota_service, f"[quota.default]\nsandboxes = 3\n[quota.group.{MY_GROUP}]\nsandboxes = 1\n"
    )
    with create() as first:
        with pytest.raises(QuotaExceeded) as refused:
            create()
        assert str(refused.value) == (
            f'quota exceeded: user {ME} may have 1 sandbox at once (group "{MY_GROUP}"), and has '
            f'1. Kill one (jupyter-sandbox kill ID) or raise "sandboxes" in '
            f"{quota_service.config} and reload the service (kill -HUP the pid "
            "jupyter-sandbox status shows)."
        )
        assert [s.id for s in Sandbox.list()] == [first.id]  # nothing was started
        refused = quota_service.cli("create", check=False)
        assert refused.returncode == 1 and "quota exceeded: user" in refused.stderr
    with create():  # one ended: there is room again
        pass


def test_memory_and_cpus_quotas_count_every_sandbox_of_the_user(quota_service):
    cpus = min(2.0, float(host_cpus()))
    started(quota_service, f'[quota.default]\nmemory = "1G"\ncpus = {cpus}\n')
    with create(memory="768M", cpus=cpus / 2) as first:
        with pytest.raises(QuotaExceeded, match=r"has 768 MiB and this sandbox asks for 512 MiB"):
            create(memory="512M", cpus=0.1)
        message = f"has {cpus / 2:g} CPU"
        with pytest.raises(QuotaExceeded, match=message):
            create(memory="128M", cpus=cpus)
        with create(memory="256M", cpus=cpus / 2) as second:  # exactly the rest fits
            usage = Sandbox.usage()
            assert usage.usage == {"sandboxes": 2, "memory": GiB, "cpus": cpus}
            assert usage.left("memory") == 0 and usage.left("cpus") == 0
            with pytest.raises(QuotaExceeded, match="memory across their sandboxes"):
                create(memory="64M", cpus=0.01)
            second.kill()
        assert Sandbox.usage().usage == {"sandboxes": 1, "memory": 768 << 20, "cpus": cpus / 2}
        first.kill()


def test_the_lifetime_quota_at_create_and_at_extend(quota_service):
    started(quota_service, '[quota.default]\nlifetime = "1h"\n')
    with pytest.raises(QuotaExceeded, match=r"at most 1h to live from now \(the default quota\)"):
        create(timeout="1h1s")
    with Sandbox.create() as session:  # "session" is always allowed: it has no deadline
        assert session.info().expires_at is None
    with create(timeout="59m") as sb:
        before = sb.info().expires_at
        with pytest.raises(QuotaExceeded) as refused:
            sb.extend_timeout("2h")
        assert "and extending this sandbox would end it in 2h. Extend it to at most 1h" in str(
            refused.value
        )
        assert sb.info().expires_at == before  # the refused extend changed nothing
        deadline = sb.extend_timeout("1h").expires_at
        assert deadline is not None and deadline - time.time() <= 3600


def test_extending_in_small_steps_never_passes_the_lifetime(quota_service):
    """An attack: many small extends, as if each added to the deadline."""
    started(quota_service, '[quota.default]\nlifetime = "2m"\n')
    with create(timeout="1m") as sb:
        for _ in range(20):
            try:
                sb.extend_timeout("30s")
            except QuotaExceeded:
                pass
            assert sb.info().expires_at - time.time() <= 120
        with pytest.raises(QuotaExceeded):
            sb.extend_timeout("121s")
        assert sb.info().expires_at - time.time() <= 120


def test_concurrent_creates_cannot_both_pass_a_count_of_one(quota_service):
    """An attack: eight creates at the same moment (each starts a sandbox, which takes a
    while, so all are in flight together); exactly one gets through."""
    started(quota_service, "[quota.default]\nsandboxes = 1\n")

    async def race() -> list[object]:
        creates = [AsyncSandbox.create(timeout="5m") for _ in range(8)]
        return await asyncio.gather(*creates, return_exceptions=True)

    results = portal().call(race())
    made = [r for r in results if isinstance(r, AsyncSandbox)]
    refused = [r for r in results if isinstance(r, QuotaExceeded)]
    try:
        assert (len(made), len(refused)) == (1, 7), results
        assert [s.id for s in Sandbox.list()] == [made[0].id]
    finally:
        for sandbox in made:
            Sandbox.connect(sandbox.id).kill()


def test_creates_from_separate_processes_at_once_stay_within_the_count(quota_service):
    """The same race from four separate client processes."""
    started(quota_service, "[quota.default]\nsandboxes = 2\n")
    code = (
        "import sys\n"
        "from jupyter_sandbox import Sandbox, QuotaExceeded\n"
        "sys.stdin.read()\n"  # all start at the same moment: when stdin closes
        "try:\n"
        "    print(Sandbox.create(timeout='5m').id)\n"
        "except QuotaExceeded:\n"
        "    print('refused')\n"
    )
    env = {**os.environ, **quota_service.env}
    clients = [
        subprocess.Popen(
            [sys.executable, "-c", code],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    for client in clients:
        client.stdin.close()
    for client in clients:
        client.wait(120)
    answers = sorted(client.stdout.read().strip() for client in clients)
    made = [a for a in answers if a.startswith("sb-")]
    try:
        assert answers.count("refused") == 2 and len(made) == 2, answers
        assert sorted(s.id for s in Sandbox.list()) == sorted(made)
    finally:
        for sandbox_id in made:
            Sandbox.connect(sandbox_id).kill()


def test_a_failed_sandbox_counts_and_its_restart_does_not_add_one(quota_service):
    """An attack: let a sandbox fail, create another in its place, restart the failed
    one. Failed sandboxes count (their files are kept), so the second create is refused."""
    started(quota_service, "[quota.default]\nsandboxes = 1\n")
    with create() as sb:
        os.kill(sandbox_pids(quota_service.storage, sb.id)["agent"], signal.SIGKILL)
        wait_for(lambda: sb.info().status == "failed", 20, message="the sandbox to fail")
        with pytest.raises(SandboxFailed):
            sb.sh("true")
        with pytest.raises(QuotaExceeded, match="may have 1 sandbox at once"):
            create()
        assert Sandbox.usage().usage["sandboxes"] == 1
        assert sb.restart().status == "running"
        assert sb.sh("echo back").stdout == "back\n"
        with pytest.raises(QuotaExceeded):
            create()
        assert [s.id for s in Sandbox.list()] == [sb.id]


def test_sighup_reads_the_file_again_and_a_bad_file_keeps_the_old_quotas(quota_service):
    started(quota_service, "[quota.default]\nsandboxes = 1\n")
    assert Sandbox.usage().quota["sandboxes"] == 1
    quota_service.reload('[quota.default]\nsandboxes = 2\nmemory = "2G"\n')
    usage = Sandbox.usage()
    assert (usage.quota["sandboxes"], usage.quota["memory"]) == (2, 2 * GiB)
    with (
        create(memory="1G"),
        create(memory="1G"),
        pytest.raises(QuotaExceeded, match="may have 2 sandboxes at once"),
    ):
        create(memory="64M")
    quota_service.reload("[quota.default]\nsandboxes = 2\ncpus = -1\n")
    line = [line for line in quota_service.log().splitlines() if "cpus = -1" in line]
    assert len(line) == 1 and "keeping" in line[0], quota_service.log()
    usage = Sandbox.usage()  # the old quotas still hold
    assert (usage.quota["sandboxes"], usage.quota["memory"], usage.quota["cpus"]) == (
        2,
        2 * GiB,
        None,
    )
    quota_service.reload("[quota.default\n")  # not even TOML
    assert "is not valid TOML" in quota_service.log().splitlines()[-1]
    assert Sandbox.usage().quota["memory"] == 2 * GiB
    quota_service.config.unlink()
    # No file at all: no quotas. A SIGHUP to the supervisor reaches the service too.
    supervisor = quota_service.process
    assert supervisor.pid != quota_service.pid
    os.kill(supervisor.pid, signal.SIGHUP)
    wait_for(lambda: Sandbox.usage().quota == dict.fromkeys(KEYS), 10, message="no quotas")
    assert supervisor.poll() is None


def test_usage_and_the_cli_show_what_was_created_against_the_quota(quota_service):
    started(
        quota_service,
        f'[quota.default]\nsandboxes = 3\nmemory = "2G"\nlifetime = "8h"\n'
        f"[quota.user.{ME}]\ncpus = 1.5\n",
    )
    with create(memory="512M", cpus=0.5), create(memory="256M", cpus=0.25):
        usage = Sandbox.usage()
        assert usage.quota == {"sandboxes": 3, "memory": 2 * GiB, "cpus": 1.5, "lifetime": 28800}
        assert usage.usage == {"sandboxes": 2, "memory": 768 << 20, "cpus": 0.75}
        assert usage.source == {
            "sandboxes": "the default quota",
            "memory": "the default quota",
            "cpus": f"the quota set for {ME}",
            "lifetime": "the default quota",
        }
        assert (usage.left("sandboxes"), usage.left("memory")) == (1, 2 * GiB - (768 << 20))
        as_json = json.loads(quota_service.cli("usage", "--json").stdout)
        assert as_json["quota"] == usage.quota and as_json["usage"] == usage.usage
        assert (as_json["user"], as_json["mode"]) == (ME, "user")
        text = quota_service.cli("usage").stdout.splitlines()
        assert text[0] == f"user {ME} (uid {os.getuid()}), on your own service"
        assert [" ".join(line.split()) for line in text[2:]] == [
            "sandboxes 2 3 1 the default quota",
            "memory 768 MiB 2 GiB 1.2 GiB the default quota",
            f"cpus 0.75 1.5 0.75 the quota set for {ME}",
            "lifetime - 8h from now - the default quota",
        ]


# -- limits no host can give -------------------------------------------------------------------


def test_absurd_limits_name_the_hosts_figure(quota_service):
    quota_service.serve()
    ram = format_size_down(host_memory())
    with pytest.raises(InvalidRequest) as refused:
        create(memory="100T")
    assert str(refused.value) == (
        f"memory 100 TiB is more than this host's {ram} of RAM; ask for at most {ram}"
    )
    with pytest.raises(InvalidRequest) as refused:
        create(cpus=host_cpus() * 64)
    assert str(refused.value) == (
        f"cpus {host_cpus() * 64} is more than this host's {host_cpus()} CPUs; "
        f"ask for at most {host_cpus()}"
    )
    with pytest.raises(InvalidRequest, match=r"filesystem of .* can ever hold; ask for at most"):
        create(disk="1000T")
    with pytest.raises(InvalidRequest, match="processes and threads this host's kernel"):
        create(pids=1 << 30)
    assert Sandbox.list() == []
    # The largest a host gives is accepted (a limit, not a reservation).
    with create(memory=host_memory(), cpus=host_cpus()) as sb:
        assert (sb.info().limits["memory"], sb.info().limits["cpus"]) == (
            host_memory(),
            host_cpus(),
        )
