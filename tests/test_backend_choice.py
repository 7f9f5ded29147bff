"""Choosing the backend at `serve`: a name that is none, or one whose library is missing,
stops the service at its start with one line saying what to do. Real CLI processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SERVE_TIMEOUT = 60


def serve(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    """`jupyter-sandbox serve ARGS` (with its supervisor), run to its end."""
    return subprocess.run(
        [sys.executable, "-m", "jupyter_sandbox", "serve", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=SERVE_TIMEOUT,
    )


def assert_stopped_at_start(env: dict[str, str], done: subprocess.CompletedProcess) -> str:
    """The service ended with exit status 1 and claimed nothing; its one error line."""
    assert done.returncode == 1, (done.returncode, done.stderr)
    assert "Traceback" not in done.stderr, done.stderr
    assert not (Path(env["JUPYTER_RUNTIME_DIR"]) / "jupyter-sandbox.json").exists()
    assert not any(Path(env["JUPYTER_SANDBOX_DIR"]).iterdir())  # no claim, no sandbox
    errors = [line for line in done.stderr.splitlines() if "could not start" in line]
    assert errors, done.stderr
    return errors[0]


@pytest.mark.unprivileged
@pytest.mark.parametrize("how", ["environment", "option"])
def test_an_unknown_backend_stops_serve_naming_the_choices(
    separate_service_env: dict[str, str], how: str
) -> None:
    env = dict(separate_service_env)
    if how == "environment":
        env["JUPYTER_SANDBOX_BACKEND"] = "bogus"
        done = serve(env)
    else:
        env.pop("JUPYTER_SANDBOX_BACKEND", None)
        done = serve(env, "--backend", "bogus")
    line = assert_stopped_at_start(env, done)
    assert "unknown backend 'bogus': expected one of local, kubernetes" in line
    assert "JUPYTER_SANDBOX_BACKEND" in line and "serve --backend" in line


@pytest.mark.unprivileged
def test_the_kubernetes_backend_without_its_library_says_what_to_install(
    separate_service_env: dict[str, str], tmp_path: Path
) -> None:
    """kubernetes_asyncio is installed here: a sitecustomize in the service's processes
    (supervisor and service) makes importing it fail as a missing package does."""
    blocker = tmp_path / "no-kubernetes"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(
        "import sys\nsys.modules['kubernetes_asyncio'] = None  # import fails: not installed\n"
    )
    env = dict(separate_service_env)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(blocker), env.get("PYTHONPATH")]))
    env["JUPYTER_SANDBOX_BACKEND"] = "kubernetes"
    blocked = subprocess.run(
        [sys.executable, "-c", "import kubernetes_asyncio"], env=env, capture_output=True
    )
    assert blocked.returncode != 0 and b"ModuleNotFoundError" in blocked.stderr
    line = assert_stopped_at_start(env, serve(env))
    assert "needs the kubernetes_asyncio package" in line
    assert "pip install jupyter-sandbox[kubernetes]" in line


def backend_classes() -> list[type]:
    from jupyter_sandbox.backends.local import LocalBackend

    try:
        from jupyter_sandbox.backends.kubernetes import KubernetesBackend
    except ModuleNotFoundError:  # the extra is optional: the local backend is checked alone
        return [LocalBackend]
    return [LocalBackend, KubernetesBackend]


def protocol_members(protocol: type) -> dict[str, object]:
    """The methods and attributes `protocol` declares, its bases' included."""
    members: dict[str, object] = {}
    for klass in reversed(protocol.__mro__):
        if klass is object or klass.__module__ == "typing":
            continue
        members |= dict.fromkeys(getattr(klass, "__annotations__", {}))
        members |= {n: v for n, v in vars(klass).items() if callable(v) and n[0] != "_"}
    return members


@pytest.mark.unprivileged
@pytest.mark.parametrize("backend_class", backend_classes(), ids=lambda c: c.__name__)
def test_every_backend_has_what_the_service_uses(backend_class: type, tmp_path: Path) -> None:
    """What base.Backend declares, each backend has: the same methods, async where it is,
    with the same parameters; the attributes, once built as make_backend builds it."""
    import inspect

    from jupyter_sandbox._config import Settings
    from jupyter_sandbox.backends import base, make_backend

    name = "local" if backend_class.__name__ == "LocalBackend" else "kubernetes"
    backend = make_backend(Settings(backend=name), tmp_path / "storage")
    assert type(backend) is backend_class
    for member, declared in protocol_members(base.Backend).items():
        if declared is None:  # an attribute
            assert hasattr(backend, member), member
            continue
        method = getattr(backend_class, member, None)
        assert callable(method), member
        assert inspect.iscoroutinefunction(method) == inspect.iscoroutinefunction(declared), member
        assert list(inspect.signature(method).parameters) == list(
            inspect.signature(declared).parameters
        ), member


def runtime_classes() -> list[type]:
    from jupyter_sandbox.backends.local import Runtime

    try:
        from jupyter_sandbox.backends.kubernetes.backend import PodRuntime
    except ModuleNotFoundError:
        return [Runtime]
    return [Runtime, PodRuntime]


@pytest.mark.unprivileged
@pytest.mark.parametrize("runtime_class", runtime_classes(), ids=lambda c: c.__name__)
def test_every_runtime_has_what_the_service_reads(runtime_class: type) -> None:
    """What base.Runtime declares (e.g. whether its files survive a failure), each backend's
    runtime has: as a field or a property, and to_json."""
    import dataclasses

    from jupyter_sandbox.backends import base

    fields = {f.name for f in dataclasses.fields(runtime_class)}
    for member in protocol_members(base.Runtime):
        assert member in fields or hasattr(runtime_class, member), member
