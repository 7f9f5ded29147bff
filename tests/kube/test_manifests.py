"""The Kubernetes install under deploy/kubernetes, checked the way a reviewer would before
applying it: every file parses, kustomize renders the set, the Role grants exactly what
the backend needs in its own namespace and nothing cluster-wide.

No cluster runs here: these tests read the manifests and render them with `kubectl
kustomize` (which needs no API server). The fake API server (tests/kube/fake_api.py)
enforces the same rbac.yaml on the backend's real calls.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from jupyter_sandbox import Sandbox
from tests.conftest import storage_parent, wait_for

pytestmark = pytest.mark.unprivileged

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy" / "kubernetes"
# Files in deploy/kubernetes that are not Kubernetes objects applied by kustomize.
NOT_APPLIED = {"kustomization.yaml", "z2jh-values.yaml"}

# Everything the service may do, per (API group, resource): the backend's pods, their
# Secrets, ConfigMaps, PVC homes and NetworkPolicies, and the agent-sandbox mode's
# Sandboxes. A rule granting anything else, or another verb, fails the test.
ALLOWED = {
    ("", "pods"): {"list", "watch", "create", "delete"},
    ("", "secrets"): {"get", "list", "create", "patch", "delete"},
    ("", "configmaps"): {"get", "create"},
    ("", "persistentvolumeclaims"): {"list", "create", "delete"},
    ("networking.k8s.io", "networkpolicies"): {"create"},
    ("coordination.k8s.io", "leases"): {"get", "create", "update"},
    ("agents.x-k8s.io", "sandboxes"): {"list", "create", "delete"},
}
# Kinds that reach beyond one namespace: none of them may be part of the install.
CLUSTER_KINDS = {
    "ClusterRole",
    "ClusterRoleBinding",
    "Namespace",
    "CustomResourceDefinition",
    "PersistentVolume",
    "StorageClass",
    "RuntimeClass",
    "PriorityClass",
    "MutatingWebhookConfiguration",
    "ValidatingWebhookConfiguration",
}


def load(name: str) -> list[dict[str, Any]]:
    """The YAML documents of deploy/kubernetes/`name`, empty ones left out."""
    text = (DEPLOY / name).read_text()
    return [doc for doc in yaml.safe_load_all(text) if doc is not None]


def kustomization() -> dict[str, Any]:
    (doc,) = load("kustomization.yaml")
    return doc


def applied() -> list[dict[str, Any]]:
    """The objects of every file the kustomization lists, as written."""
    return [doc for name in kustomization()["resources"] for doc in load(name)]


def one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (found,) = (o for o in objects if o["kind"] == kind)
    return found


@pytest.fixture(scope="module")
def rendered() -> list[dict[str, Any]]:
    """What `kubectl kustomize deploy/kubernetes` outputs, parsed."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed (Debian: apt-get install kubernetes-client)")
    done = subprocess.run(
        [kubectl, "kustomize", str(DEPLOY)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, f"kubectl kustomize failed:\n{done.stderr}"
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc is not None]


def test_every_yaml_file_parses_into_named_objects() -> None:
    files = sorted(DEPLOY.glob("*.yaml"))
    assert {f.name for f in files} >= {"kustomization.yaml", "rbac.yaml", "serviceaccount.yaml"}
    for path in files:
        docs = load(path.name)
        assert docs, f"{path.name} holds no YAML document"
        if path.name in NOT_APPLIED:
            continue
        for doc in docs:
            assert doc.get("apiVersion") and doc.get("kind"), f"{path.name}: {doc}"
            assert doc["metadata"].get("name"), f"{path.name}: a {doc['kind']} with no name"
            assert "namespace" not in doc["metadata"], (
                f"{path.name}: {doc['kind']} {doc['metadata']['name']} names a namespace; "
                "the kustomization sets it for every object"
            )


def test_kustomization_lists_every_manifest() -> None:
    manifests = {p.name for p in DEPLOY.glob("*.yaml")} - NOT_APPLIED
    listed = kustomization()["resources"]
    assert sorted(listed) == sorted(manifests)
    assert len(listed) == len(set(listed))


def test_kustomize_renders_every_object_into_the_namespace(rendered) -> None:
    namespace = kustomization()["namespace"]
    written = sorted((o["kind"], o["metadata"]["name"]) for o in applied())
    assert sorted((o["kind"], o["metadata"]["name"]) for o in rendered) == written
    for obj in rendered:
        assert obj["metadata"]["namespace"] == namespace, obj["metadata"]
    binding = one(rendered, "RoleBinding")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "jupyter-sandbox", "namespace": namespace}
    ]


def test_nothing_in_the_install_reaches_beyond_its_namespace(rendered) -> None:
    kinds = {o["kind"] for o in rendered}
    assert not kinds & CLUSTER_KINDS, f"cluster-scoped objects: {kinds & CLUSTER_KINDS}"
    role = one(rendered, "Role")
    binding = one(rendered, "RoleBinding")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }


def test_role_grants_exactly_what_the_backend_needs() -> None:
    role = one(applied(), "Role")
    granted: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        assert set(rule) <= {"apiGroups", "resources", "verbs"}, (
            f"a rule with {sorted(set(rule) - {'apiGroups', 'resources', 'verbs'})}: {rule}"
        )
        for field in ("apiGroups", "resources", "verbs"):
            assert "*" not in rule[field], f"a wildcard in {field}: {rule}"
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                granted.setdefault((group, resource), set()).update(rule["verbs"])
    for key, verbs in granted.items():
        assert key in ALLOWED, f"the Role grants {key}, which the backend does not use"
        assert verbs <= ALLOWED[key], f"{key}: more verbs than needed: {verbs - ALLOWED[key]}"
    assert set(granted) == set(ALLOWED), f"missing from the Role: {set(ALLOWED) - set(granted)}"
    # No way into a running pod through the API server: the agent has its own channel.
    assert not {r for _, r in granted} & {"pods/exec", "pods/attach", "pods/portforward"}


# -- the service's Deployment against the code it runs ------------------------------------

SETTING = re.compile(r"\b(?:JUPYTER_SANDBOX|JUPYTERHUB)_[A-Z0-9_]*[A-Z0-9]\b")


def service_container() -> dict[str, Any]:
    (container,) = one(applied(), "Deployment")["spec"]["template"]["spec"]["containers"]
    return container


def pod_labels() -> dict[str, str]:
    return one(applied(), "Deployment")["spec"]["template"]["metadata"]["labels"]


def deployment_env(namespace: str = "jhub") -> dict[str, str]:
    """The service container's environment as the kubelet would set it: literal values,
    the pod's namespace for its fieldRef; Secret references left out."""
    env = {}
    for var in service_container()["env"]:
        if "value" in var:
            env[var["name"]] = var["value"]
        elif var["valueFrom"].get("fieldRef", {}).get("fieldPath") == "metadata.namespace":
            env[var["name"]] = namespace
    return env


def package_source() -> str:
    return "\n".join(p.read_text() for p in (ROOT / "jupyter_sandbox").rglob("*.py"))


def test_every_setting_the_install_names_is_one_the_code_reads() -> None:
    """A setting renamed in the code, or misspelt in a manifest, a comment of one, the Helm
    values or the guide, fails here instead of being silently ignored in a cluster."""
    source = package_source()
    texts = {p.name: p.read_text() for p in DEPLOY.iterdir() if p.is_file()}
    texts["docs/kubernetes.md"] = (ROOT / "docs" / "kubernetes.md").read_text()
    named = {(name, where) for where, text in texts.items() for name in SETTING.findall(text)}
    assert {name for name, _ in named} >= set(filter(SETTING.fullmatch, deployment_env()))
    unknown = sorted((name, where) for name, where in named if name not in source)
    assert not unknown, f"settings no module of jupyter_sandbox mentions: {unknown}"


def test_the_service_reads_the_deployment_env_as_its_comments_say(monkeypatch) -> None:
    from jupyter_sandbox._config import Settings
    from jupyter_sandbox._durations import parse_size
    from jupyter_sandbox.backends.kubernetes.config import KubernetesSettings
    from jupyter_sandbox.service.hub_auth import HubSettings
    from jupyter_sandbox.service.ssh_port import configured_address
    from jupyter_sandbox.ssh.workers import worker_count

    env = deployment_env(namespace="jhub")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = Settings.from_env()
    assert settings.backend == "kubernetes"
    assert settings.default_memory == parse_size(env["JUPYTER_SANDBOX_DEFAULT_MEMORY"])
    assert settings.default_disk == parse_size(env["JUPYTER_SANDBOX_DEFAULT_DISK"])
    assert settings.default_cpus == float(env["JUPYTER_SANDBOX_DEFAULT_CPUS"])
    assert settings.pool_size == int(env["JUPYTER_SANDBOX_POOL"])
    kube = KubernetesSettings.from_env(env)
    assert (kube.namespace, kube.instance, kube.home) == ("jhub", "default", "emptydir")
    assert kube.mode == "pods"
    assert kube.image == env["JUPYTER_SANDBOX_K8S_IMAGE"] == KubernetesSettings.image
    # Every address of the pod, on the port the container and the Service declare.
    assert configured_address() == ("", 2222)
    ports = {p["name"]: p["containerPort"] for p in service_container()["ports"]}
    assert ports == {"api": 8080, "ssh": 2222}
    assert worker_count() == 2 == int(float(service_container()["resources"]["limits"]["cpu"]))
    hub = HubSettings.from_env()
    assert hub.api_url == "http://hub:8081/hub/api"
    assert [hub.service_name] == list(load("z2jh-values.yaml")[0]["hub"]["services"])


def test_the_container_command_is_one_the_cli_takes() -> None:
    """`jupyter-sandbox serve` accepts every flag the Deployment gives it, and reads them as
    a hub-authenticated service on every address's port 8080."""
    from jupyter_sandbox.cli import build_parser, cmd_serve, tcp_address

    program, *args = service_container()["args"]
    assert program == "jupyter-sandbox"
    parsed = build_parser().parse_args(args)
    assert parsed.func is cmd_serve
    assert parsed.hub_auth and parsed.no_supervisor and not parsed.system
    assert tcp_address(parsed.tcp) == ("0.0.0.0", 8080)
    shown = subprocess.run(
        [sys.executable, "-m", "jupyter_sandbox", *args[:1], "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert shown.returncode == 0, shown.stderr
    for flag in (a for a in args if a.startswith("--")):
        assert flag in shown.stdout, f"`serve --help` does not list {flag}"


def test_the_service_pod_is_admitted_to_the_agents_and_is_no_sandbox() -> None:
    """The sandbox pods' ingress policy, as the backend makes it, admits the service pod
    (contract: pods labelled jupyter-sandbox.io/role=service), and nothing the backend
    selects as one of its sandboxes, so no reaper ever takes the service for one."""
    from jupyter_sandbox.backends.kubernetes import objects

    labels = pod_labels()
    instance = deployment_env()["JUPYTER_SANDBOX_K8S_INSTANCE"]
    policy = objects.ingress_policy(instance, objects.Anchor("anchor", "uid"))
    (rule,) = policy["spec"]["ingress"]
    (source,) = rule["from"]
    assert source["podSelector"]["matchLabels"].items() <= labels.items()
    assert rule["ports"] == [{"protocol": "TCP", "port": objects.AGENT_PORT}]
    assert not objects.instance_labels(instance).items() <= labels.items()
    # The service pod's own policy selects it by the same label.
    own = one(applied(), "NetworkPolicy")["spec"]["podSelector"]["matchLabels"]
    assert own.items() <= labels.items()


def test_services_and_policies_lead_to_the_ports_the_container_listens_on() -> None:
    ports = {p["name"]: p["containerPort"] for p in service_container()["ports"]}
    labels = pod_labels()
    services = [o for o in applied() if o["kind"] == "Service"]
    assert {s["metadata"]["name"] for s in services} == {"jupyter-sandbox", "jupyter-sandbox-ssh"}
    for service in services:
        assert service["spec"]["selector"].items() <= labels.items()
        for port in service["spec"]["ports"]:
            assert port["port"] == ports[port["targetPort"]], port
    own = one(applied(), "NetworkPolicy")["spec"]
    assert sorted(p["port"] for rule in own["ingress"] for p in rule["ports"]) == [2222, 8080]
    # Notebook servers under Zero to JupyterHub may leave their pod for both ports.
    (egress,) = load("z2jh-values.yaml")[0]["singleuser"]["networkPolicy"]["egress"]
    (target,) = egress["to"]
    assert target["podSelector"]["matchLabels"].items() <= labels.items()
    assert sorted(p["port"] for p in egress["ports"]) == sorted(ports.values())


def test_notebook_servers_use_the_in_cluster_service_with_their_hub_token(monkeypatch) -> None:
    from jupyter_sandbox.client._service import remote_credentials
    from jupyter_sandbox.client._transport import Transport

    extra_env = load("z2jh-values.yaml")[0]["singleuser"]["extraEnv"]
    for name, value in extra_env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("JUPYTER_SANDBOX_TOKEN", raising=False)
    monkeypatch.setenv("JUPYTERHUB_API_TOKEN", "a-server-token")
    api = next(
        o for o in applied() if o["kind"] == "Service" and o["spec"]["ports"][0]["name"] == "api"
    )
    assert (
        Transport().remote == f"http://{api['metadata']['name']}:{api['spec']['ports'][0]['port']}"
    )
    assert remote_credentials()[0] == {"Authorization": "token a-server-token"}
    assert extra_env["JUPYTER_SANDBOX_SSH_HOST"] == "jupyter-sandbox-ssh"


def test_the_config_file_in_the_configmap_is_one_the_service_takes(tmp_path) -> None:
    from jupyter_sandbox.service import config_file
    from jupyter_sandbox.service.quotas import Quotas

    config_map = one(applied(), "ConfigMap")
    mount = next(m for m in service_container()["volumeMounts"] if m["name"] == "config")
    assert deployment_env()["JUPYTER_SANDBOX_CONFIG"] == f"{mount['mountPath']}/config.toml"
    path = tmp_path / "config.toml"
    path.write_text(config_map["data"]["config.toml"])
    tables = config_file.load(path)
    assert config_file.instructor_groups(tables, path) == frozenset()
    Quotas.parse(tables, path, administered=True)


def probe_command() -> list[str]:
    container = service_container()
    commands = [container[p]["exec"]["command"] for p in ("startupProbe", "readinessProbe")]
    assert commands[0] == commands[1] == container["livenessProbe"]["exec"]["command"]
    return commands[0]


def test_the_health_probe_answers_for_a_running_service_only(service_env, tmp_path) -> None:
    """The probes' command, run as the kubelet runs it, succeeds against a real service
    (GET /v1/status on its Unix socket) and fails where no service answers."""
    Sandbox.list()  # the session's service is running
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": service_env.env["JUPYTER_RUNTIME_DIR"]}
    probe = subprocess.run(probe_command(), env=env, capture_output=True, timeout=30)
    assert probe.returncode == 0, probe.stderr.decode()
    env["JUPYTER_RUNTIME_DIR"] = str(tmp_path)
    probe = subprocess.run(probe_command(), env=env, capture_output=True, timeout=30)
    assert probe.returncode != 0


def test_everything_the_service_writes_is_on_a_writable_volume(monkeypatch) -> None:
    """The root filesystem is read-only: the service's state, storage, socket and home
    are on the pod's volumes (its state on the data claim), and nothing else."""
    from jupyter_sandbox._config import Paths

    container = service_container()
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    env = deployment_env()
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    writable = [Path(p) for p, m in mounts.items() if not m.get("readOnly")]
    paths = Paths.default()
    volumes = {
        v["name"]: v for v in one(applied(), "Deployment")["spec"]["template"]["spec"]["volumes"]
    }
    for path in (paths.data_dir, paths.storage_dir, paths.runtime_dir, Path(env["HOME"])):
        (mount,) = (m for m in writable if path.is_relative_to(m))
        assert mount in {Path("/var/lib/jupyter-sandbox"), Path("/run/jupyter-sandbox")}, path
    claim = volumes[mounts["/var/lib/jupyter-sandbox"]["name"]]["persistentVolumeClaim"]
    assert claim["claimName"] == one(applied(), "PersistentVolumeClaim")["metadata"]["name"]
    assert paths.database.is_relative_to("/var/lib/jupyter-sandbox")


def schema_errors(value: Any, type_name: str, where: str) -> list[str]:
    """Where `value` does not fit the Kubernetes API type `type_name` (as the official
    client's models describe it): unknown fields (a misspelt one is silently dropped by
    the API server) and values of the wrong JSON type (such as an unquoted number in
    an env var's value)."""
    from kubernetes_asyncio import client

    if type_name.startswith("list["):
        if not isinstance(value, list):
            return [f"{where}: expected a list"]
        return [
            e
            for i, v in enumerate(value)
            for e in schema_errors(v, type_name[5:-1], f"{where}[{i}]")
        ]
    if type_name.startswith("dict("):
        if not isinstance(value, dict):
            return [f"{where}: expected a mapping"]
        inner = type_name[5:-1].split(", ", 1)[1]
        return [e for k, v in value.items() for e in schema_errors(v, inner, f"{where}.{k}")]
    primitives = {"str": str, "int": int, "bool": bool, "float": (int, float)}
    if type_name in primitives:
        ok = isinstance(value, primitives[type_name]) and not (
            type_name == "int" and isinstance(value, bool)
        )
        return [] if ok else [f"{where}: {value!r} is not a {type_name}"]
    if type_name == "object":  # IntOrString, and free-form fields
        return []
    model = getattr(client, type_name)
    if not isinstance(value, dict):
        return [f"{where}: expected a {type_name} mapping"]
    fields = {json: python for python, json in model.attribute_map.items()}
    errors = [f"{where}.{key}: no such field of {type_name}" for key in value if key not in fields]
    for key, item in value.items():
        if key in fields:
            errors += schema_errors(item, model.openapi_types[fields[key]], f"{where}.{key}")
    return errors


def test_every_object_fits_the_kubernetes_api_schema() -> None:
    for obj in applied():
        group_version = obj["apiVersion"].split("/")[-1].capitalize()
        where = f"{obj['kind']} {obj['metadata']['name']}"
        errors = schema_errors(obj, f"{group_version}{obj['kind']}", where)
        assert not errors, "\n".join(errors)


def start_as_deployed(env: dict[str, str], url: str, log_file: Path) -> subprocess.Popen:
    """The service started with the Deployment's own arguments (its --tcp address made
    `url`, a free local one), once it listens there."""
    args = service_container()["args"][1:]  # after "jupyter-sandbox"
    args[args.index("--tcp") + 1] = url.removeprefix("http://")
    runtime_file = Path(env["JUPYTER_RUNTIME_DIR"]) / "jupyter-sandbox.json"
    runtime_file.unlink(missing_ok=True)
    with open(log_file, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "jupyter_sandbox", *args],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def listening() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"the service exited {proc.returncode}: {log_file.read_text()}")
        return runtime_file.exists() and url in runtime_file.read_text()

    wait_for(listening, 60, message="the service to listen")
    return proc


def server_like_token(hub, user: str) -> str:
    """A token of `user` with the scopes of the "server" role, for the user's default
    server: what the hub gives a notebook server as its JUPYTERHUB_API_TOKEN."""
    scopes = ["users:activity!user", f"access:servers!server={user}/"]
    return hub.api("POST", f"users/{user}/tokens", json={"scopes": scopes})["token"]


def notebook(url: str, token: str, *args: str) -> Any:
    """Run CLIENT as a kernel in a Zero to JupyterHub user pod would: the real client with
    z2jh-values.yaml's environment (the service at `url` standing in for its Service's
    name) and the server's hub token, nothing else of ours."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JUPYTER", "PYTHON"))}
    env |= load("z2jh-values.yaml")[0]["singleuser"]["extraEnv"]
    env |= {"PYTHONPATH": str(ROOT), "JUPYTERHUB_API_TOKEN": token}
    env["JUPYTER_SANDBOX_URL"] = url
    done = subprocess.run(
        [sys.executable, "-c", CLIENT, *args], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def deployed_service_class():
    """tests/hub's hub-auth service, started as the Deployment starts it."""
    from tests.hub import token_hub

    class DeployedService(token_hub.HubAuthService):
        def start(self) -> None:
            self.proc = start_as_deployed(self.env, self.url, self.log_file)

    return DeployedService


def test_the_hub_role_in_the_values_is_all_the_service_needs(monkeypatch, tmp_path) -> None:
    """A real JupyterHub gives the service's token only the scopes of z2jh-values.yaml,
    and callers' tokens no more than a notebook server's; the service runs as the
    Deployment runs it. It still identifies each caller (name, admin flag, groups), and
    an instructor still looks up a user who never called. The service's token can read
    nothing else of the hub."""
    from tests.hub import token_hub

    token_hub.requirements()
    monkeypatch.setattr(token_hub, "HubAuthService", deployed_service_class())
    role = load("z2jh-values.yaml")[0]["hub"]["loadRoles"]["jupyter-sandbox"]
    assert role["services"] == ["jupyter-sandbox"]
    # The test hub's service "sandboxes" is the sandbox service: give it the values' scopes.
    config, found = re.subn(
        r'(\{"name": "sandboxes", "scopes": )\[[^\]]*\]',
        lambda m: m.group(1) + json.dumps(role["scopes"]),
        token_hub.HUB_CONFIG,
    )
    assert found == 1, "tests/hub/token_hub.py no longer has one role for the service"
    monkeypatch.setattr(token_hub, "HUB_CONFIG", config)
    hub = token_hub.start_token_hub(tmp_path)
    try:
        service_auth = {"Authorization": f"token {hub.service_token}"}
        for path in ("users", f"users/{token_hub.INSTRUCTOR}/tokens", "groups"):
            reply = httpx.get(f"{hub.api_url}/{path}", headers=service_auth, timeout=30)
            assert reply.status_code == 403, f"the service's token may read /{path}"

        with token_hub.hub_auth_service(hub) as service:
            student = token_hub.STUDENTS[0]
            mine = service.call("GET", "/v1/usage", server_like_token(hub, student))
            assert mine.status_code == 200, mine.text
            assert (mine.json()["user"], mine.json()["instructor"]) == (student, False)
            admin = server_like_token(hub, token_hub.ADMIN)
            assert service.call("GET", "/v1/usage", admin).json()["instructor"] is True
            # The instructor (by hub group) has never called: only the service's token
            # can tell who they are.
            theirs = service.call("GET", f"/v1/usage?user={token_hub.INSTRUCTOR}", admin)
            assert theirs.status_code == 200, theirs.text
            assert theirs.json()["user"] == token_hub.INSTRUCTOR
            assert theirs.json()["instructor"] is True
    finally:
        hub.stop()


# Where the Deployment's paths land when its container is run on this machine.
POD_PATHS = ("/var/lib/jupyter-sandbox", "/run/jupyter-sandbox", "/etc/jupyter-sandbox")


def as_run_here(env: dict[str, str], base: Path) -> dict[str, str]:
    """The Deployment's environment with the pod's paths moved under `base`."""
    moved = {}
    for name, value in env.items():
        for pod_path in POD_PATHS:
            if value == pod_path or value.startswith(pod_path + "/"):
                value = str(base / value.lstrip("/"))
        moved[name] = value
    return moved


CLIENT = """
import json, sys
from jupyter_sandbox import Sandbox
if sys.argv[1] == "create":
    sb = Sandbox.create(timeout="2m")
    print(json.dumps({"id": sb.id, "out": sb.sh("id -u; hostname").stdout}))
else:
    Sandbox.connect(sys.argv[2]).kill()
    print("{}")
"""


@pytest.mark.parametrize("home", ["emptydir", "pvc"])
def test_the_deployment_runs_here_on_the_fake_cluster_under_its_role(home: str) -> None:
    """The service container, run on this machine as the Deployment runs it (its args, its
    env; only the pod's paths moved, its ports made free ones and KUBECONFIG standing in for
    the pod's service account) against the fake cluster enforcing rbac.yaml and a real
    JupyterHub: its probe passes, and a hub user's notebook client, with only the
    z2jh-values.yaml environment and a server-like token, gets a sandbox pod that runs
    their commands and goes when killed."""
    from tests.hub import token_hub
    from tests.kube.conftest import running_fake_cluster
    from tests.kube_fixtures import KubeService, end_kube_service
    from tests.serverext_fixtures import free_port

    token_hub.requirements()
    url = f"http://127.0.0.1:{free_port()}"

    class DeployedKubeService(KubeService):
        def start(self) -> None:
            self.proc = start_as_deployed({**os.environ, **self.env}, url, self.log_file)

    base = Path(tempfile.mkdtemp(prefix="jsb-deployed-", dir=storage_parent()))
    (base / "hub").mkdir()
    hub = token_hub.start_token_hub(base / "hub")
    try:
        with running_fake_cluster(base / "cluster", rbac=DEPLOY / "rbac.yaml") as cluster:
            env = as_run_here(deployment_env(namespace=cluster.namespace), base)
            config = Path(env["JUPYTER_SANDBOX_CONFIG"])
            config.parent.mkdir(parents=True)
            config.write_text(one(applied(), "ConfigMap")["data"]["config.toml"])
            env |= {
                "JUPYTERHUB_API_URL": hub.api_url,
                "JUPYTERHUB_API_TOKEN": hub.service_token,  # the Secret's, in the pod
                "JUPYTER_SANDBOX_SSH_PORT": "0",  # 2222 may be taken on this machine
                "JUPYTER_SANDBOX_K8S_HOME": home,  # the Deployment's, and the other choice
            }
            service = DeployedKubeService(cluster, base, env)
            service.instance = env["JUPYTER_SANDBOX_K8S_INSTANCE"]
            service.storage = Path(env["JUPYTER_SANDBOX_DIR"])
            service.start()
            try:
                probe = subprocess.run(
                    probe_command(), env={**os.environ, **service.env}, capture_output=True
                )
                assert probe.returncode == 0, probe.stderr.decode()
                token = server_like_token(hub, token_hub.STUDENTS[0])
                made = notebook(url, token, "create")
                assert made["out"] == f"1000\n{made['id']}\n"
                pod = service.pod(made["id"])
                assert pod["metadata"]["labels"]["jupyter-sandbox.io/instance"] == "default"
                claims = service.of_sandbox("persistentvolumeclaims", made["id"])
                homes = [f"jsb-{made['id']}-home"] if home == "pvc" else []
                assert [c["metadata"]["name"] for c in claims] == homes
                assert notebook(url, token, "kill", made["id"]) == {}
                wait_for(
                    lambda: not service.leftovers_of(made["id"]),
                    30,
                    message="the sandbox's objects to go",
                )
            finally:
                end_kube_service(service)  # which drains the pool: nothing may be left
            # Every call the service made fitted the Role (a refused one is logged, then
            # retried or worked around).
            refused = [line for line in service.log().splitlines() if "is forbidden" in line]
            assert not refused, "\n".join(refused)
    finally:
        hub.stop()
        shutil.rmtree(base, ignore_errors=True)


def test_the_image_runs_what_the_deployment_runs() -> None:
    """The Dockerfile's image (not built here: no container engine runs on this machine)
    runs the Deployment's command by default, as the pod's user, on its ports, and
    installs an extra the package has."""
    from jupyter_sandbox.service.config_file import tomllib

    dockerfile = (DEPLOY / "Dockerfile").read_text()
    last: dict[str, str] = {}  # each instruction's last use: the final stage's
    for line in dockerfile.splitlines():
        if line and not line[0].isspace() and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            last[word] = rest
    assert json.loads(last["CMD"]) == service_container()["args"]
    security = one(applied(), "Deployment")["spec"]["template"]["spec"]["securityContext"]
    assert last["USER"] == f"{security['runAsUser']}:{security['runAsGroup']}"
    exposed = sorted(int(p) for p in last["EXPOSE"].split())
    assert exposed == sorted(p["containerPort"] for p in service_container()["ports"])
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    # pip install "jupyter-sandbox[X]" (a release) and "$(ls ...whl)[X]" (the checkout)
    installed = re.findall(r"(?:jupyter-sandbox|\.whl\))\[(\w+)\]", dockerfile)
    assert len(installed) == 2 and set(installed) <= set(extras["optional-dependencies"])
