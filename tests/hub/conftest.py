"""The real hub, its users and the system service, shared by the tests of this package."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.conftest import sandbox_mounts, sandbox_processes, wait_for
from tests.hub_fixtures import (  # noqa: F401  (fixtures)
    Hub,
    as_root,
    hub,
    hub_users,
    system_sandboxes,
    system_service,
)
from tests.system_fixtures import shared_venv  # noqa: F401  (fixture)


@pytest.fixture(autouse=True)
def no_sandbox_left(request: pytest.FixtureRequest) -> Iterator[None]:
    """After each hub test: every sandbox it made has ended, and nothing of them is left."""
    yield
    if "hub" not in request.fixturenames:
        return
    service = request.getfixturevalue("system_service")
    live = system_sandboxes(service)
    for sandbox in live:  # report, then clean up so later tests start clean
        as_root(service, "DELETE", f"/v1/sandboxes/{sandbox['id']}")
    assert not live, f"test left sandboxes: {[(s['user'], s['id']) for s in live]}"
    storage = service.storage
    wait_for(lambda: not sandbox_processes(storage), 20, message="sandbox processes to end")
    assert not sandbox_mounts(storage)
    left = list((storage / "sandboxes").iterdir()) if (storage / "sandboxes").exists() else []
    assert not left, f"directories of ended sandboxes left: {left}"
