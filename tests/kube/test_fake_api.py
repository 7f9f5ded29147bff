"""The fake Kubernetes API server, driven by the official async client (kubernetes_asyncio).

The server is a test fake (no real one can run here); these tests pin down the real API
behaviour the Kubernetes backend relies on, as the client sees it: Status errors, lists
and selectors, optimistic concurrency, watches (resume, selector moves, timeoutSeconds,
410 Expired), outages, deletion and garbage collection, RBAC.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from pathlib import Path

import aiohttp
import pytest
from kubernetes_asyncio import client, watch
from kubernetes_asyncio.client.rest import ApiException

from tests.conftest import wait_for
from tests.kube.conftest import FakeCluster, run, running_fake_cluster

pytestmark = pytest.mark.unprivileged


def status_of(error: ApiException) -> dict:
    return json.loads(error.body)


def configmap(name: str, labels: dict | None = None, owners: list | None = None) -> dict:
    meta: dict = {"name": name, "labels": labels or {}}
    if owners:
        meta["ownerReferences"] = owners
    return {"metadata": meta, "data": {"key": name}}


def owner_ref(obj) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "name": obj.metadata.name,
        "uid": obj.metadata.uid,
    }


def test_create_conflicts_and_not_found_are_real_status_objects(fake_cluster: FakeCluster) -> None:
    ns = fake_cluster.namespace

    async def scenario(v1: client.CoreV1Api) -> None:
        made = await v1.create_namespaced_config_map(ns, configmap("api-one"))
        assert made.metadata.uid and made.metadata.creation_timestamp
        assert int(made.metadata.resource_version) > 0
        with pytest.raises(ApiException) as caught:
            await v1.create_namespaced_config_map(ns, configmap("api-one"))
        assert caught.value.status == 409
        assert status_of(caught.value) == {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": 'configmaps "api-one" already exists',
            "reason": "AlreadyExists",
            "details": {"name": "api-one", "kind": "configmaps"},
            "code": 409,
        }
        with pytest.raises(ApiException) as caught:
            await v1.read_namespaced_secret("api-missing", ns)
        assert caught.value.status == 404
        assert status_of(caught.value)["reason"] == "NotFound"
        assert status_of(caught.value)["message"] == 'secrets "api-missing" not found'
        with pytest.raises(ApiException) as caught:
            await v1.create_namespaced_config_map(ns, configmap("Not_Valid"))
        assert caught.value.status == 422
        assert status_of(caught.value)["details"]["causes"][0]["field"] == "metadata.name"
        with pytest.raises(ApiException) as caught:
            await v1.create_namespaced_config_map(ns, configmap("api-two", {"ok": "not ok!"}))
        cause = status_of(caught.value)["details"]["causes"][0]
        assert cause["field"] == "metadata.labels" and cause["reason"] == "FieldValueInvalid"
        assert cause["message"].startswith('Invalid value: "not ok!": a valid label must be')
        await v1.delete_namespaced_config_map("api-one", ns)

    run(fake_cluster, scenario)


def test_list_selects_by_label_and_field(fake_cluster: FakeCluster) -> None:
    ns = fake_cluster.namespace
    labels = {
        "sel-a": {"app": "x", "tier": "web"},
        "sel-b": {"app": "x", "tier": "db"},
        "sel-c": {"app": "y"},
    }

    async def scenario(v1: client.CoreV1Api) -> dict[str, list[str]]:
        for name, these in labels.items():
            await v1.create_namespaced_config_map(ns, configmap(name, these))
        found = {}
        for selector in ("app=x", "app==x,tier!=db", "tier in (db, cache)", "tier notin (db)",
                         "tier", "!tier,app"):  # fmt: skip
            listed = await v1.list_namespaced_config_map(ns, label_selector=selector)
            found[selector] = sorted(
                i.metadata.name for i in listed.items if i.metadata.name in labels
            )
            assert listed.kind == "ConfigMapList" and int(listed.metadata.resource_version) > 0
        by_name = await v1.list_namespaced_config_map(ns, field_selector="metadata.name=sel-b")
        found["name"] = [i.metadata.name for i in by_name.items]
        with pytest.raises(ApiException) as caught:
            await v1.list_namespaced_config_map(ns, label_selector="app in x")
        assert caught.value.status == 400
        for name in labels:
            await v1.delete_namespaced_config_map(name, ns)
        return found

    assert run(fake_cluster, scenario) == {
        "app=x": ["sel-a", "sel-b"],
        "app==x,tier!=db": ["sel-a"],
        "tier in (db, cache)": ["sel-b"],
        "tier notin (db)": ["sel-a", "sel-c"],
        "tier": ["sel-a", "sel-b"],
        "!tier,app": ["sel-c"],
        "name": ["sel-b"],
    }


def test_list_pages_with_limit_and_continue(fake_cluster: FakeCluster) -> None:
    ns = fake_cluster.namespace
    names = [f"page-{i}" for i in range(5)]

    async def scenario(v1: client.CoreV1Api) -> list[list[str]]:
        for name in names:
            await v1.create_namespaced_config_map(ns, configmap(name, {"paged": "yes"}))
        pages, token = [], None
        while True:
            listed = await v1.list_namespaced_config_map(
                ns, label_selector="paged", limit=2, _continue=token
            )
            pages.append([i.metadata.name for i in listed.items])
            token = listed.metadata._continue
            if not token:
                break
            assert listed.metadata.remaining_item_count == 5 - sum(map(len, pages))
        raw = await v1.api_client.call_api(
            f"/api/v1/namespaces/{ns}/configmaps", "GET", query_params=[("limit", "1")],
            auth_settings=["BearerToken"], _preload_content=False,
        )  # fmt: skip
        item = json.loads(await raw.read())["items"][0]
        assert "kind" not in item and "apiVersion" not in item  # as the real server lists
        for name in names:
            await v1.delete_namespaced_config_map(name, ns)
        return pages

    assert run(fake_cluster, scenario) == [names[0:2], names[2:4], names[4:]]


def test_replace_on_a_stale_version_conflicts_and_patches_merge(fake_cluster: FakeCluster) -> None:
    ns = fake_cluster.namespace

    async def scenario(v1: client.CoreV1Api) -> None:
        first = await v1.create_namespaced_secret(
            ns, {"metadata": {"name": "api-record"}, "stringData": {"record": "one"}}
        )
        assert first.data == {"record": "b25l"} and first.type == "Opaque"
        first.data = {"record": "dHdv"}
        second = await v1.replace_namespaced_secret("api-record", ns, first)
        assert int(second.metadata.resource_version) > int(first.metadata.resource_version)
        first.data = {"record": "dGhyZWU="}
        with pytest.raises(ApiException) as caught:
            await v1.replace_namespaced_secret("api-record", ns, first)  # its version is old
        assert caught.value.status == 409
        assert status_of(caught.value)["reason"] == "Conflict"
        assert "the object has been modified" in status_of(caught.value)["message"]
        patched = await v1.patch_namespaced_secret(
            "api-record", ns, {"metadata": {"labels": {"a": "1", "b": "2"}}}
        )
        assert patched.metadata.labels == {"a": "1", "b": "2"} and patched.data == {
            "record": "dHdv"
        }
        patched = await v1.patch_namespaced_secret(
            "api-record", ns, {"metadata": {"labels": {"a": None}}}
        )
        assert patched.metadata.labels == {"b": "2"}
        patched = await v1.patch_namespaced_secret(
            "api-record", ns, [{"op": "replace", "path": "/data/record", "value": "Zm91cg=="}]
        )
        assert patched.data == {"record": "Zm91cg=="}
        stale = {"metadata": {"resourceVersion": second.metadata.resource_version}}
        with pytest.raises(ApiException) as caught:
            await v1.patch_namespaced_secret("api-record", ns, stale)
        assert caught.value.status == 409
        gone = await v1.delete_namespaced_secret("api-record", ns)
        assert gone.status == "Success" and gone.details.uid == first.metadata.uid

    run(fake_cluster, scenario)


def test_strategic_merge_patches_merge_lists_by_key_and_merge_patches_replace_them(
    fake_cluster: FakeCluster,
) -> None:
    ns = fake_cluster.namespace

    async def scenario(v1: client.CoreV1Api) -> None:
        owner = await v1.create_namespaced_config_map(ns, configmap("smp-owner"))
        ref = owner_ref(owner)
        body = configmap("smp-one") | {"metadata": {"name": "smp-one", "finalizers": ["a/one"]}}
        await v1.create_namespaced_config_map(ns, body)
        # The client's default for a dict is a strategic merge patch: finalizers add up,
        # ownerReferences merge by uid.
        patched = await v1.patch_namespaced_config_map(
            "smp-one", ns, {"metadata": {"finalizers": ["a/two"], "ownerReferences": [ref]}}
        )
        assert patched.metadata.finalizers == ["a/one", "a/two"]
        again = dict(ref, blockOwnerDeletion=True)
        patched = await v1.patch_namespaced_config_map(
            "smp-one", ns, {"metadata": {"ownerReferences": [again]}}
        )
        assert [(r.uid, r.block_owner_deletion) for r in patched.metadata.owner_references] == [
            (owner.metadata.uid, True)
        ]
        patched = await v1.patch_namespaced_config_map(
            "smp-one", ns, {"metadata": {"$deleteFromPrimitiveList/finalizers": ["a/one"]}}
        )
        assert patched.metadata.finalizers == ["a/two"]
        # A JSON merge patch replaces the list.
        patched = await v1.patch_namespaced_config_map(
            "smp-one", ns, {"metadata": {"finalizers": None}},
            _content_type="application/merge-patch+json",
        )  # fmt: skip
        assert not patched.metadata.finalizers
        for name in ("smp-one", "smp-owner"):
            await v1.delete_namespaced_config_map(name, ns)

    run(fake_cluster, scenario)


def test_watch_resumes_from_a_version_and_follows_the_selector(fake_cluster: FakeCluster) -> None:
    ns = fake_cluster.namespace

    async def scenario(v1: client.CoreV1Api) -> list[tuple[str, str]]:
        start = await v1.list_namespaced_config_map(ns)
        version = start.metadata.resource_version
        made = await v1.create_namespaced_config_map(ns, configmap("w-one", {"watched": "yes"}))
        await v1.create_namespaced_config_map(ns, configmap("w-other", {"watched": "no"}))
        await v1.patch_namespaced_config_map("w-one", ns, {"data": {"key": "changed"}})
        await v1.patch_namespaced_config_map(
            "w-other", ns, {"metadata": {"labels": {"watched": "yes"}}}
        )
        await v1.patch_namespaced_config_map(
            "w-one", ns, {"metadata": {"labels": {"watched": None}}}
        )
        await v1.delete_namespaced_config_map("w-other", ns)
        await v1.delete_namespaced_config_map("w-one", ns)
        seen = []
        stream = watch.Watch().stream(
            v1.list_namespaced_config_map,
            ns,
            label_selector="watched=yes",
            resource_version=version,
            timeout_seconds=1,
        )
        async with stream as events:
            async for event in events:
                seen.append((event["type"], event["object"].metadata.name))
        assert made.metadata.uid
        return seen

    assert run(fake_cluster, scenario) == [
        ("ADDED", "w-one"),
        ("MODIFIED", "w-one"),
        ("ADDED", "w-other"),  # its label moved it into the selection
        ("DELETED", "w-one"),  # and this one out of it
        ("DELETED", "w-other"),
    ]


def test_watch_ends_at_its_timeout_with_bookmarks_that_carry_a_version(tmp_path: Path) -> None:
    async def scenario(v1: client.CoreV1Api) -> tuple[float, list[str]]:
        began = time.monotonic()
        types = []
        stream = watch.Watch().stream(
            v1.list_namespaced_pod, "jupyter-sandbox", timeout_seconds=2, allow_watch_bookmarks=True
        )
        async with stream as events:
            async for event in events:
                types.append(event["type"])
                assert int(event["raw_object"]["metadata"]["resourceVersion"]) > 0
        return time.monotonic() - began, types

    with running_fake_cluster(tmp_path, bookmark_interval=0.5) as cluster:
        took, types = run(cluster, scenario)
    assert 2 <= took < 4
    assert types and set(types) == {"BOOKMARK"}


def test_expired_watch_raises_410_and_old_versions_stay_compacted(
    fake_cluster: FakeCluster,
) -> None:
    ns = fake_cluster.namespace

    async def scenario(v1: client.CoreV1Api) -> None:
        old = (await v1.list_namespaced_config_map(ns)).metadata.resource_version
        await v1.create_namespaced_config_map(ns, configmap("exp-one"))
        loop = asyncio.get_running_loop()

        def expire() -> int:
            wait_for(lambda: fake_cluster.stats()["open_watches"], message="the watch")
            return fake_cluster.expire_watches()

        expirer = loop.run_in_executor(None, expire)
        stream = watch.Watch().stream(
            v1.list_namespaced_config_map, ns, resource_version=old, timeout_seconds=30
        )
        names = []
        with pytest.raises(ApiException) as caught:
            async with stream as events:
                async for event in events:
                    names.append(event["object"].metadata.name)
        assert caught.value.status == 410 and "Expired" in caught.value.reason
        assert names == ["exp-one"]
        assert await expirer == 1
        # Watching from before the compaction is refused, even retried once (no timeout).
        with pytest.raises(ApiException) as caught:
            async with watch.Watch().stream(
                v1.list_namespaced_config_map, ns, resource_version=old
            ) as events:
                async for _ in events:
                    pass
        assert caught.value.status == 410
        await v1.delete_namespaced_config_map("exp-one", ns)

    run(fake_cluster, scenario)


def test_a_version_from_the_future_is_refused_after_a_wait(fake_cluster: FakeCluster) -> None:
    async def scenario(v1: client.CoreV1Api) -> None:
        current = int(
            (await v1.list_namespaced_pod(fake_cluster.namespace)).metadata.resource_version
        )
        began = time.monotonic()
        with pytest.raises(ApiException) as caught:
            await v1.list_namespaced_pod(
                fake_cluster.namespace, resource_version=str(current + 10**6)
            )
        assert time.monotonic() - began >= 2.9
        assert caught.value.status == 504
        status = status_of(caught.value)
        assert status["reason"] == "Timeout" and status["message"].startswith("Too large resource")

    run(fake_cluster, scenario)


def test_outage_refuses_connections_and_cuts_watches(fake_cluster: FakeCluster) -> None:
    ns = fake_cluster.namespace

    async def scenario(v1: client.CoreV1Api) -> None:
        await v1.list_namespaced_pod(ns)  # a pooled connection the outage must cut too
        events = watch.Watch().stream(v1.list_namespaced_pod, ns, timeout_seconds=60)
        reader = asyncio.ensure_future(events.__anext__())
        await asyncio.sleep(0.2)  # the watch's request reaches the server
        began = time.monotonic()
        await asyncio.get_running_loop().run_in_executor(None, fake_cluster.outage, 1.5)
        with pytest.raises((StopAsyncIteration, aiohttp.ClientError)):
            await asyncio.wait_for(reader, 5)
        with pytest.raises(aiohttp.ClientConnectorError):
            await v1.list_namespaced_pod(ns)
        while True:
            try:
                await v1.list_namespaced_pod(ns)
                break
            except aiohttp.ClientError:
                await asyncio.sleep(0.1)
        assert 1.4 <= time.monotonic() - began < 5
        await events.close()

    run(fake_cluster, scenario)


def test_a_hanging_outage_answers_nothing_until_it_ends(fake_cluster: FakeCluster) -> None:
    ns = fake_cluster.namespace

    async def scenario(v1: client.CoreV1Api) -> None:
        version = (await v1.list_namespaced_config_map(ns)).metadata.resource_version
        stream = watch.Watch().stream(
            v1.list_namespaced_config_map, ns, resource_version=version, timeout_seconds=20
        )
        async with stream as events:
            await asyncio.to_thread(fake_cluster.outage, 1.5, "hang")
            began = time.monotonic()
            with pytest.raises(asyncio.TimeoutError):
                await v1.list_namespaced_config_map(ns, _request_timeout=0.5)
            made = asyncio.ensure_future(v1.create_namespaced_config_map(ns, configmap("hang-1")))
            event = await events.__anext__()  # sent only once the partition heals
            assert time.monotonic() - began >= 1.4
            assert (event["type"], event["object"].metadata.name) == ("ADDED", "hang-1")
            await made
        await v1.delete_namespaced_config_map("hang-1", ns)

    run(fake_cluster, scenario)


def test_garbage_collection_follows_owner_references(fake_cluster: FakeCluster) -> None:
    ns = fake_cluster.namespace

    async def scenario(v1: client.CoreV1Api) -> None:
        anchor = await v1.create_namespaced_config_map(ns, configmap("gc-anchor"))
        ref = owner_ref(anchor)
        await v1.create_namespaced_secret(
            ns, {"metadata": {"name": "gc-owned", "ownerReferences": [ref]}}
        )
        missing = dict(ref, name="gc-never", uid="0d2a8a7e-0000-4000-8000-000000000000")
        await v1.create_namespaced_config_map(ns, configmap("gc-orphan", owners=[missing]))
        await v1.create_namespaced_config_map(ns, configmap("gc-both", owners=[ref, missing]))
        await asyncio.to_thread(
            wait_for, lambda: "gc-orphan" not in fake_cluster.names("configmaps"), 5, 0.05, "GC"
        )
        both = await v1.read_namespaced_config_map("gc-both", ns)
        assert [r.uid for r in both.metadata.owner_references] == [anchor.metadata.uid]
        await v1.delete_namespaced_config_map("gc-anchor", ns)  # background propagation

        def collected() -> bool:
            left = fake_cluster.names("secrets") | fake_cluster.names("configmaps")
            return not {"gc-owned", "gc-both"} & left

        await asyncio.to_thread(wait_for, collected, 5, 0.05, "dependents collected")
        # Orphan: the owner goes, its dependents stay without the reference.
        anchor = await v1.create_namespaced_config_map(ns, configmap("gc-anchor2"))
        await v1.create_namespaced_config_map(ns, configmap("gc-kept", owners=[owner_ref(anchor)]))
        await v1.delete_namespaced_config_map(
            "gc-anchor2", ns, body=client.V1DeleteOptions(propagation_policy="Orphan")
        )
        await asyncio.to_thread(
            wait_for,
            lambda: "gc-anchor2" not in fake_cluster.names("configmaps"),
            5,
            0.05,
            "orphaning",
        )
        kept = await v1.read_namespaced_config_map("gc-kept", ns)
        assert not kept.metadata.owner_references
        # Foreground: the owner waits, with a deletionTimestamp, until its dependents are gone.
        anchor = await v1.create_namespaced_config_map(
            ns,
            configmap("gc-anchor3")
            | {"metadata": {"name": "gc-anchor3", "finalizers": ["test/hold"]}},
        )
        await v1.create_namespaced_config_map(ns, configmap("gc-dep", owners=[owner_ref(anchor)]))
        await v1.delete_namespaced_config_map(
            "gc-anchor3", ns, body=client.V1DeleteOptions(propagation_policy="Foreground")
        )

        def only_held() -> bool:
            found = {o["metadata"]["name"]: o for o in fake_cluster.objects("configmaps", ns)}
            anchor = found["gc-anchor3"]["metadata"]
            return "gc-dep" not in found and anchor["finalizers"] == ["test/hold"]

        await asyncio.to_thread(wait_for, only_held, 5, 0.05, "foreground deletion")
        held = await v1.read_namespaced_config_map("gc-anchor3", ns)
        assert held.metadata.deletion_timestamp and held.metadata.finalizers == ["test/hold"]
        await v1.patch_namespaced_config_map("gc-anchor3", ns, {"metadata": {"finalizers": None}})
        with pytest.raises(ApiException) as caught:
            await v1.read_namespaced_config_map("gc-anchor3", ns)
        assert caught.value.status == 404
        await v1.delete_namespaced_config_map("gc-kept", ns)

    run(fake_cluster, scenario)


ROLE = """
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {name: test-role}
rules:
  - apiGroups: [""]
    resources: [configmaps]
    verbs: [get, list, create]
  - apiGroups: [""]
    resources: [secrets]
    verbs: [get]
    resourceNames: [allowed]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: test-role}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: test-role}
subjects: [{kind: ServiceAccount, name: tester}]
"""


def test_rbac_answers_forbidden_for_what_the_role_does_not_allow(tmp_path: Path) -> None:
    role = tmp_path / "role.yaml"
    role.write_text(ROLE)

    async def scenario(v1: client.CoreV1Api) -> None:
        ns = "jupyter-sandbox"
        await v1.create_namespaced_config_map(ns, configmap("rbac-one"))
        assert len((await v1.list_namespaced_config_map(ns)).items) == 1
        refused = [
            v1.delete_namespaced_config_map("rbac-one", ns),
            v1.patch_namespaced_config_map("rbac-one", ns, {"data": {"k": "v"}}),
            v1.list_namespaced_pod(ns),
            v1.list_namespaced_config_map("default"),
            v1.read_namespaced_secret("other", ns),
        ]
        statuses = []
        for call in refused:
            with pytest.raises(ApiException) as caught:
                await call
            statuses.append(status_of(caught.value))
        assert {s["code"] for s in statuses} == {403}
        assert {s["reason"] for s in statuses} == {"Forbidden"}
        assert statuses[0]["message"] == (
            'configmaps "rbac-one" is forbidden: User "system:serviceaccount:jupyter-sandbox:'
            'tester" cannot delete resource "configmaps" in API group "" in the namespace '
            '"jupyter-sandbox"'
        )
        with pytest.raises(ApiException) as caught:
            await v1.read_namespaced_secret("allowed", ns)
        assert caught.value.status == 404  # allowed by name; it just does not exist

    with running_fake_cluster(tmp_path / "cluster", rbac=role) as cluster:
        run(cluster, scenario)


def test_a_wrong_token_is_unauthorized_and_none_is_anonymous(
    fake_cluster: FakeCluster, tmp_path: Path
) -> None:
    settings = json.loads(Path(fake_cluster.kubeconfig).read_text())
    settings["users"][0]["user"]["token"] = "wrong"
    wrong = tmp_path / "kubeconfig"
    wrong.write_text(json.dumps(settings))

    async def scenario(v1: client.CoreV1Api) -> None:
        with pytest.raises(ApiException) as caught:
            await v1.list_namespaced_pod(fake_cluster.namespace)
        assert caught.value.status == 401 and status_of(caught.value)["reason"] == "Unauthorized"

    run(dataclasses.replace(fake_cluster, kubeconfig=str(wrong)), scenario)
    del settings["users"][0]["user"]["token"]
    wrong.write_text(json.dumps(settings))

    async def anonymous(v1: client.CoreV1Api) -> None:
        with pytest.raises(ApiException) as caught:
            await v1.list_namespaced_pod(fake_cluster.namespace)
        assert caught.value.status == 403
        assert 'User "system:anonymous" cannot list' in status_of(caught.value)["message"]

    run(dataclasses.replace(fake_cluster, kubeconfig=str(wrong)), anonymous)


def test_stats_count_requests_per_verb_and_resource(fake_cluster: FakeCluster) -> None:
    fake_cluster.reset_stats()

    async def scenario(v1: client.CoreV1Api) -> None:
        await v1.create_namespaced_config_map(fake_cluster.namespace, configmap("stat-one"))
        await v1.read_namespaced_config_map("stat-one", fake_cluster.namespace)
        await v1.list_namespaced_config_map(fake_cluster.namespace)
        await v1.delete_namespaced_config_map("stat-one", fake_cluster.namespace)

    run(fake_cluster, scenario)
    counts = fake_cluster.stats()["requests"]
    assert counts == {
        "create configmaps": 1,
        "get configmaps": 1,
        "list configmaps": 1,
        "delete configmaps": 1,
    }
