"""Which objects the kubernetes backend's reaper takes for leftovers (pure logic: the
deletions themselves are tested on the fake cluster in test_backend_service.py)."""

from __future__ import annotations

import time

import pytest

from jupyter_sandbox.backends.kubernetes import objects, reaper

pytestmark = pytest.mark.unprivileged


def body(name: str, sandbox_id: str, age: float = 3600.0, record: bytes | None = None) -> dict:
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - age))
    meta = {"name": name, "labels": {objects.SANDBOX: sandbox_id}, "creationTimestamp": created}
    data = {objects.RECORD_KEY: objects.encode(record)} if record is not None else {}
    return {"metadata": meta, "data": data}


def test_only_sandboxes_without_a_record_nor_a_reason_to_keep_them_are_leftovers():
    found = reaper.Inventory()
    found.add(
        "pods", [body("jsb-sb-a-0", "sb-a"), body("jsb-sb-b-0", "sb-b"), body("jsb-sb-c-1", "sb-c")]
    )
    found.add(
        "secrets",
        [
            body("jsb-sb-a", "sb-a", record=b"{}"),  # recorded: adopted, never reaped
            body("jsb-sb-b", "sb-b"),  # a start killed before its record
            body("jsb-sb-d", "sb-d", record=b""),  # an empty record is none
        ],
    )
    found.add("persistentvolumeclaims", [body("jsb-sb-b-home", "sb-b")])
    assert found.recorded() == {"sb-a"}
    assert found.unaccounted(keep=set()) == {
        "sb-b": [("pods", "jsb-sb-b-0"), ("secrets", "jsb-sb-b"),
                 ("persistentvolumeclaims", "jsb-sb-b-home")],
        "sb-c": [("pods", "jsb-sb-c-1")],
        "sb-d": [("secrets", "jsb-sb-d")],
    }  # fmt: skip
    assert set(found.unaccounted(keep={"sb-b", "sb-c"})) == {"sb-d"}


def test_a_recent_object_may_be_a_start_under_way_and_is_left_alone():
    found = reaper.Inventory()
    found.add("pods", [body("jsb-sb-e-0", "sb-e", age=5)])
    found.add("secrets", [body("jsb-sb-e", "sb-e", age=3600), body("jsb-sb-f", "sb-f", age=3600)])
    assert set(found.unaccounted(keep=set(), older_than=180)) == {"sb-f"}
    assert set(found.unaccounted(keep=set())) == {"sb-e", "sb-f"}
    assert reaper.age({"metadata": {}}) == 0.0
