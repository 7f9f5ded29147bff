"""A fake Kubernetes API server, for tests: no real one can run on this machine.

It serves the REST API the way kube-apiserver does for the resources the Kubernetes
backend uses, in the real JSON shapes: objects with metadata (uid, resourceVersion,
creationTimestamp, generation, deletionTimestamp, deletionGracePeriodSeconds,
finalizers, ownerReferences), lists, newline-delimited watch events (with bookmarks,
timeoutSeconds, and a 410 Expired ERROR event for a compacted resourceVersion), label
and field selectors, create/replace/patch/delete with the real Status errors (404
NotFound, 409 AlreadyExists/Conflict, 410 Expired, 422 Invalid, 403 Forbidden, 401),
graceful deletion, the garbage collector (ownerReferences, propagationPolicy) and the
PVC binder with pvc-protection. With a Role manifest it enforces that Role's rules.
The kubelet (tests/kube/kubelet.py) is the other fake part; everything that talks to
this server (the official client, the backend, the service) is real.

Left out, knowingly: managedFields and server-side apply, strategic merge patch beyond
the common list fields (MERGE_KEYS) and its main directives, admission beyond the checks
below, API discovery beyond the groups served, and the watch cache's 5-minute window
(history is kept until `compact()` or HISTORY_LIMIT events).
"""

from __future__ import annotations

import asyncio
import base64
import calendar
import copy
import json
import logging
import random
import re
import string
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web

log = logging.getLogger(__name__)

HISTORY_LIMIT = 10_000  # watch events kept for resuming watches; older ones are compacted
TOO_LARGE_WAIT = 3.0  # seconds a request for a future resourceVersion waits before 504
DEFAULT_WATCH_TIMEOUT = 1800.0  # the server ends a watch without timeoutSeconds after this
MAX_OBJECT_BYTES = 1024 * 1024  # ConfigMap and Secret data limit
NAMESPACES = ("default", "kube-system", "jupyter-sandbox")


@dataclass(frozen=True)
class Resource:
    """One served resource type."""

    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool = True
    generation: bool = False  # metadata.generation counts spec changes
    status_subresource: bool = False  # the main endpoint ignores status changes
    returns_object: bool = False  # DELETE answers the object rather than a Status
    custom: bool = False  # a custom resource (its list items keep kind and apiVersion)

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def list_kind(self) -> str:
        return f"{self.kind}List"


RESOURCES = (
    Resource(
        "", "v1", "pods", "Pod", generation=True, status_subresource=True, returns_object=True,
    ),
    Resource("", "v1", "secrets", "Secret"),
    Resource("", "v1", "configmaps", "ConfigMap"),
    Resource("", "v1", "persistentvolumeclaims", "PersistentVolumeClaim", status_subresource=True),
    Resource("", "v1", "services", "Service", status_subresource=True, returns_object=True),
    Resource("", "v1", "serviceaccounts", "ServiceAccount"),
    Resource("", "v1", "events", "Event"),
    Resource("", "v1", "namespaces", "Namespace", namespaced=False, status_subresource=True),
    Resource("networking.k8s.io", "v1", "networkpolicies", "NetworkPolicy", generation=True),
    Resource("coordination.k8s.io", "v1", "leases", "Lease"),
    Resource(
        "agents.x-k8s.io", "v1beta1", "sandboxes", "Sandbox", generation=True,
        status_subresource=True, custom=True,
    ),
    Resource(
        "extensions.agents.x-k8s.io", "v1beta1", "sandboxwarmpools", "SandboxWarmPool",
        generation=True, status_subresource=True, custom=True,
    ),
)  # fmt: skip
BY_PATH = {(r.group, r.version, r.plural): r for r in RESOURCES}
BY_PLURAL = {r.plural: r for r in RESOURCES}
BY_KIND = {(r.api_version, r.kind): r for r in RESOURCES}
DISCOVERY_PATHS = {"/api", "/apis", "/api/v1"} | {
    f"/apis/{r.api_version}" for r in RESOURCES if r.group
}


def resource_named(name: str) -> Resource:
    """A resource by its plural ("pods") or kind ("Pod")."""
    for r in RESOURCES:
        if name in (r.plural, r.kind, r.kind.lower()):
            return r
    raise KeyError(f"unknown resource {name!r}; served: {', '.join(BY_PLURAL)}")


def now_rfc3339(at: float | None = None) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() if at is None else at))


def parse_rfc3339(text: str) -> float:
    return calendar.timegm(time.strptime(text, "%Y-%m-%dT%H:%M:%SZ"))


class ApiError(Exception):
    """An error answered as a Kubernetes Status object."""

    def __init__(self, code: int, reason: str, message: str, details: dict | None = None):
        super().__init__(message)
        self.code, self.reason, self.message, self.details = code, reason, message, details

    def status(self) -> dict:
        body = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }
        if self.details is not None:
            body["details"] = self.details
        return body


def not_found(resource: Resource, name: str) -> ApiError:
    details = {"name": name, "kind": resource.plural}
    if resource.group:
        details["group"] = resource.group
    return ApiError(404, "NotFound", f'{resource.plural} "{name}" not found', details)


def conflict(resource: Resource, name: str, why: str) -> ApiError:
    return ApiError(
        409,
        "Conflict",
        f'Operation cannot be fulfilled on {resource.plural} "{name}": {why}',
        {"name": name, "kind": resource.plural},
    )


def expired(message: str) -> ApiError:
    return ApiError(410, "Expired", message)


def bad_request(message: str) -> ApiError:
    return ApiError(400, "BadRequest", message)


def invalid(resource: Resource, name: str, causes: list[tuple[str, str, str]]) -> ApiError:
    """422 Invalid; causes are (field, reason, message)."""
    text = ", ".join(f"{f}: {m}" for f, _, m in causes)
    return ApiError(
        422,
        "Invalid",
        f'{resource.kind} "{name}" is invalid: {text}',
        {
            "name": name,
            "kind": resource.kind,
            "causes": [{"reason": r, "message": m, "field": f} for f, r, m in causes],
        },
    )


# ---- selectors ---------------------------------------------------------------------

_REQUIREMENT = re.compile(
    r"^\s*(?P<neg>!)?\s*(?P<key>[A-Za-z0-9._/-]+)\s*"
    r"(?:(?P<op>==|=|!=)\s*(?P<value>[A-Za-z0-9._-]*)"
    r"|\s(?P<setop>in|notin)\s*\((?P<values>[^)]*)\))?\s*$"
)


def _split_top(text: str) -> list[str]:
    """Split on commas outside parentheses."""
    parts, depth, current = [], 0, ""
    for ch in text:
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    parts.append(current)
    return [p for p in parts if p.strip()]


def label_selector(text: str | None) -> Callable[[dict], bool]:
    """A predicate on labels for a labelSelector (=, ==, !=, in, notin, exists, !exists)."""
    checks: list[Callable[[dict], bool]] = []
    for part in _split_top(text or ""):
        m = _REQUIREMENT.match(part)
        if not m or (m["neg"] and (m["op"] or m["setop"])):
            raise bad_request(f"unable to parse requirement: {part.strip()!r}: invalid selector")
        key = m["key"]
        if m["neg"]:
            checks.append(lambda labels, k=key: k not in labels)
        elif m["op"] in ("=", "=="):
            checks.append(lambda labels, k=key, v=m["value"]: labels.get(k) == v)
        elif m["op"] == "!=":
            checks.append(lambda labels, k=key, v=m["value"]: labels.get(k) != v)
        elif m["setop"]:
            values = {v.strip() for v in m["values"].split(",") if v.strip()}
            if m["setop"] == "in":
                checks.append(lambda labels, k=key, vs=values: labels.get(k) in vs)
            else:
                checks.append(lambda labels, k=key, vs=values: labels.get(k) not in vs)
        else:
            checks.append(lambda labels, k=key: k in labels)
    return lambda labels: all(check(labels) for check in checks)


FIELDS: dict[str, Callable[[dict], Any]] = {
    "metadata.name": lambda o: o["metadata"].get("name", ""),
    "metadata.namespace": lambda o: o["metadata"].get("namespace", ""),
}
POD_FIELDS: dict[str, Callable[[dict], Any]] = {
    "status.phase": lambda o: o.get("status", {}).get("phase", ""),
    "status.podIP": lambda o: o.get("status", {}).get("podIP", ""),
    "spec.nodeName": lambda o: o.get("spec", {}).get("nodeName", ""),
    "spec.restartPolicy": lambda o: o.get("spec", {}).get("restartPolicy", ""),
    "spec.serviceAccountName": lambda o: o.get("spec", {}).get("serviceAccountName", ""),
}


def field_selector(resource: Resource, text: str | None) -> Callable[[dict], bool]:
    """A predicate on objects for a fieldSelector (metadata.name/namespace; pod fields)."""
    fields = dict(FIELDS, **(POD_FIELDS if resource.plural == "pods" else {}))
    if resource.plural == "secrets":
        fields["type"] = lambda o: o.get("type", "")
    checks = []
    for part in _split_top(text or ""):
        m = re.match(r"^\s*([A-Za-z.]+)\s*(==|=|!=)\s*(.*?)\s*$", part)
        if not m:
            raise bad_request(f"invalid field selector: {part!r}")
        name, op, value = m.groups()
        if name not in fields:
            raise bad_request(f'field label not supported: {name}"')
        getter = fields[name]
        if op == "!=":
            checks.append(lambda o, g=getter, v=value: str(g(o)) != v)
        else:
            checks.append(lambda o, g=getter, v=value: str(g(o)) == v)
    return lambda obj: all(check(obj) for check in checks)


# ---- patches -----------------------------------------------------------------------


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


# Lists a strategic merge patch merges element by element (by this key) rather than
# replacing, as the built-in types' patchMergeKey tags say; finalizers merge as a set.
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "ephemeralContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "imagePullSecrets": "name",
    "ownerReferences": "uid",
    "conditions": "type",
}
SET_LISTS = ("finalizers",)


def _merge_key(path: tuple[str, ...]) -> str | None:
    if path[-1] == "ports":  # a container's ports by containerPort, a service's by port
        return "containerPort" if {"containers", "initContainers"} & set(path) else "port"
    return MERGE_KEYS.get(path[-1])


def strategic_merge_patch(target: Any, patch: Any, path: tuple[str, ...] = ()) -> Any:
    """A strategic merge patch of a built-in type: a JSON merge patch, except that the
    lists above merge by key (or as a set), with the $patch, $deleteFromPrimitiveList and
    $setElementOrder directives."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    if patch.get("$patch") == "replace":
        return {k: copy.deepcopy(v) for k, v in patch.items() if k != "$patch"}
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if key.startswith("$deleteFromPrimitiveList/"):
            field_name = key.split("/", 1)[1]
            result[field_name] = [x for x in result.get(field_name) or [] if x not in value]
        elif key.startswith(("$setElementOrder/", "$retainKeys", "$patch")):
            continue
        elif value is None:
            result.pop(key, None)
        elif isinstance(value, list) and key in SET_LISTS:
            existing = list(result.get(key) or [])
            result[key] = existing + [v for v in value if v not in existing]
        elif isinstance(value, list) and (merge_key := _merge_key((*path, key))):
            result[key] = _merge_list(result.get(key) or [], value, merge_key, (*path, key))
        elif isinstance(value, dict) and value.get("$patch") == "delete":
            result.pop(key, None)
        elif isinstance(value, dict):
            result[key] = strategic_merge_patch(result.get(key), value, (*path, key))
        else:
            result[key] = copy.deepcopy(value)
    return result


def _merge_list(current: list, patch: list, merge_key: str, path: tuple[str, ...]) -> list:
    if any(isinstance(item, dict) and item.get("$patch") == "replace" for item in patch):
        return [copy.deepcopy(i) for i in patch if not (isinstance(i, dict) and "$patch" in i)]
    result = [copy.deepcopy(item) for item in current]
    for item in patch:
        if not isinstance(item, dict) or merge_key not in item:
            raise bad_request(f"map: {item} does not contain declared merge key: {merge_key}")
        index = next(
            (
                i
                for i, old in enumerate(result)
                if isinstance(old, dict) and old.get(merge_key) == item[merge_key]
            ),
            None,
        )
        if item.get("$patch") == "delete":
            if index is not None:
                result.pop(index)
        elif index is None:
            result.append(strategic_merge_patch({}, item, path))
        else:
            result[index] = strategic_merge_patch(result[index], item, path)
    return result


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise bad_request(f"json patch path {path!r} must start with /")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def json_patch(doc: Any, ops: list) -> Any:
    """RFC 6902 JSON patch (add, remove, replace, move, copy, test)."""
    doc = copy.deepcopy(doc)

    def parent(path: str) -> tuple[Any, str]:
        parts = _pointer(path)
        if not parts:
            raise bad_request("json patch on the whole document is not supported")
        node = doc
        for part in parts[:-1]:
            node = node[int(part)] if isinstance(node, list) else node[part]
        return node, parts[-1]

    def get(path: str) -> Any:
        node = doc
        for part in _pointer(path):
            node = node[int(part)] if isinstance(node, list) else node[part]
        return node

    for op in ops:
        try:
            kind, path = op["op"], op["path"]
            if kind in ("add", "replace", "remove"):
                node, key = parent(path)
                if isinstance(node, list):
                    index = len(node) if key == "-" else int(key)
                    if kind == "remove":
                        node.pop(index)
                    elif kind == "replace":
                        node[index] = op["value"]
                    else:
                        node.insert(index, op["value"])
                else:
                    if kind != "add" and key not in node:
                        raise bad_request(f"json patch {kind}: {path} does not exist")
                    if kind == "remove":
                        del node[key]
                    else:
                        node[key] = op["value"]
            elif kind in ("move", "copy"):
                value = copy.deepcopy(get(op["from"]))
                if kind == "move":
                    json_patch_ops = [{"op": "remove", "path": op["from"]}]
                    doc = json_patch(doc, json_patch_ops)
                doc = json_patch(doc, [{"op": "add", "path": path, "value": value}])
            elif kind == "test":
                if get(path) != op["value"]:
                    raise ApiError(422, "Invalid", f"json patch test failed at {path}")
            else:
                raise bad_request(f"json patch: unknown op {kind!r}")
        except (KeyError, IndexError, ValueError, TypeError) as exc:
            raise ApiError(422, "Invalid", f"the server rejected our request: {exc}") from exc
    return doc


# ---- validation --------------------------------------------------------------------

_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_DATA_KEY = re.compile(r"^[-._a-zA-Z0-9]+$")
# What a pod update may change in spec (the rest is immutable).
POD_MUTABLE_SPEC = ("activeDeadlineSeconds", "tolerations", "terminationGracePeriodSeconds")


def validate(resource: Resource, obj: dict, old: dict | None) -> None:
    """The checks of kube-apiserver's validation the backend can run into."""
    meta = obj["metadata"]
    name = meta.get("name", "")
    causes = []
    if len(name) > 253 or not _DNS_SUBDOMAIN.match(name):
        causes.append(
            (
                "metadata.name",
                "FieldValueInvalid",
                f'Invalid value: "{name}": a lowercase RFC 1123 subdomain must consist of '
                "lower case alphanumeric characters, '-' or '.', and must start and end "
                "with an alphanumeric character",
            )
        )
    for key, value in (meta.get("labels") or {}).items():
        label_name = key.rsplit("/", 1)[-1]
        shown = json.dumps(value)
        if not isinstance(value, str) or not _LABEL_VALUE.match(value):
            why = (
                "a valid label must be an empty string or consist of alphanumeric characters, "
                "'-', '_' or '.', and must start and end with an alphanumeric character (e.g. "
                "'MyValue',  or 'my_value',  or '12345', regex used for validation is "
                "'(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?')"
            )
            causes.append(
                ("metadata.labels", "FieldValueInvalid", f"Invalid value: {shown}: {why}")
            )
        elif len(value) > 63:
            causes.append(
                (
                    "metadata.labels",
                    "FieldValueInvalid",
                    f"Invalid value: {shown}: must be no more than 63 characters",
                )
            )
        if len(label_name) > 63 or not _LABEL_NAME.match(label_name):
            why = (
                "name part must consist of alphanumeric characters, '-', '_' or '.', and must "
                "start and end with an alphanumeric character (e.g. 'MyName',  or 'my.name',  "
                "or '123-abc', regex used for validation is "
                "'([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]')"
            )
            causes.append(
                ("metadata.labels", "FieldValueInvalid", f'Invalid value: "{key}": {why}')
            )
    if resource.plural in ("configmaps", "secrets"):
        size = 0
        for section in ("data", "binaryData"):
            for key, value in (obj.get(section) or {}).items():
                if not _DATA_KEY.match(key) or len(key) > 253:
                    causes.append(
                        (
                            f"{section}[{key}]",
                            "FieldValueInvalid",
                            f'Invalid value: "{key}": a valid config key must consist of '
                            "alphanumeric characters, '-', '_' or '.'",
                        )
                    )
                size += len(value) * 3 // 4 if resource.plural == "secrets" else len(value)
        if size > MAX_OBJECT_BYTES:
            causes.append(
                (
                    "data",
                    "FieldValueTooLong",
                    f"Too long: must have at most {MAX_OBJECT_BYTES} bytes",
                )
            )
        if old is not None and old.get("immutable") and obj.get("data") != old.get("data"):
            causes.append(
                (
                    "data",
                    "FieldValueForbidden",
                    "Forbidden: field is immutable when `immutable` is set",
                )
            )
    if resource.plural == "pods":
        containers = (obj.get("spec") or {}).get("containers") or []
        if not containers:
            causes.append(("spec.containers", "FieldValueRequired", "Required value"))
        for i, c in enumerate(containers):
            if not c.get("name"):
                causes.append(
                    (f"spec.containers[{i}].name", "FieldValueRequired", "Required value")
                )
        if old is not None:
            frozen = copy.deepcopy(
                {k: v for k, v in obj["spec"].items() if k not in POD_MUTABLE_SPEC}
            )
            was = {k: v for k, v in old["spec"].items() if k not in POD_MUTABLE_SPEC}
            for spec, before in zip(frozen.get("containers", []), was.get("containers", [])):
                spec["image"] = before.get("image")
            if frozen != was:
                causes.append(
                    (
                        "spec",
                        "FieldValueForbidden",
                        "Forbidden: pod updates may not change fields other than "
                        "`spec.containers[*].image`, `spec.initContainers[*].image`, "
                        "`spec.activeDeadlineSeconds`, `spec.tolerations` (only additions to "
                        "existing tolerations) or `spec.terminationGracePeriodSeconds`",
                    )
                )
    if causes:
        raise invalid(resource, name, causes)


# ---- defaults ----------------------------------------------------------------------


def _pod_defaults(obj: dict) -> None:
    spec = obj.setdefault("spec", {})
    for key, value in (
        ("restartPolicy", "Always"),
        ("terminationGracePeriodSeconds", 30),
        ("dnsPolicy", "ClusterFirst"),
        ("schedulerName", "default-scheduler"),
        ("serviceAccountName", "default"),
        ("securityContext", {}),
        ("enableServiceLinks", True),
        ("priority", 0),
        ("preemptionPolicy", "PreemptLowerPriority"),
    ):
        spec.setdefault(key, value)
    spec.setdefault("serviceAccount", spec["serviceAccountName"])
    spec.setdefault(
        "tolerations",
        [
            {"key": f"node.kubernetes.io/{taint}", "operator": "Exists", "effect": "NoExecute",
             "tolerationSeconds": 300}
            for taint in ("not-ready", "unreachable")
        ],
    )  # fmt: skip
    requests = limits = 0
    for c in spec.get("containers") or []:
        image = c.get("image", "")
        tag = image.rsplit(":", 1)[-1] if ":" in image.rsplit("/", 1)[-1] else "latest"
        c.setdefault("imagePullPolicy", "Always" if tag == "latest" else "IfNotPresent")
        c.setdefault("terminationMessagePath", "/dev/termination-log")
        c.setdefault("terminationMessagePolicy", "File")
        c.setdefault("resources", {})
        for port in c.get("ports") or []:
            port.setdefault("protocol", "TCP")
        for probe_name in ("readinessProbe", "livenessProbe", "startupProbe"):
            if probe := c.get(probe_name):
                for key, value in (
                    ("timeoutSeconds", 1),
                    ("periodSeconds", 10),
                    ("successThreshold", 1),
                    ("failureThreshold", 3),
                ):
                    probe.setdefault(key, value)
        resources = c["resources"]
        requests += bool(resources.get("requests"))
        limits += bool(resources.get("limits"))
        if resources.get("limits") and not resources.get("requests"):
            resources["requests"] = dict(resources["limits"])
    containers = spec.get("containers") or []
    guaranteed = containers and all(
        (c["resources"].get("limits") or {}).keys() >= {"cpu", "memory"}
        and c["resources"].get("requests") == c["resources"].get("limits")
        for c in containers
    )
    qos = "Guaranteed" if guaranteed else "Burstable" if requests or limits else "BestEffort"
    obj["status"] = {"phase": "Pending", "qosClass": qos}


def apply_defaults(resource: Resource, obj: dict) -> None:
    """What defaulting and admission add on create."""
    if resource.plural == "pods":
        _pod_defaults(obj)
    elif resource.plural == "secrets":
        obj.setdefault("type", "Opaque")
    elif resource.plural == "persistentvolumeclaims":
        obj.setdefault("spec", {}).setdefault("volumeMode", "Filesystem")
        obj["metadata"].setdefault("finalizers", []).append("kubernetes.io/pvc-protection")
        obj["status"] = {"phase": "Pending"}
    elif resource.plural == "services":
        spec = obj.setdefault("spec", {})
        spec.setdefault("type", "ClusterIP")
        spec.setdefault("sessionAffinity", "None")
        spec.setdefault("clusterIP", f"10.96.{random.randint(1, 254)}.{random.randint(1, 254)}")
        spec.setdefault("clusterIPs", [spec["clusterIP"]])
        obj["status"] = {"loadBalancer": {}}
    elif resource.plural == "namespaces":
        obj["spec"] = {"finalizers": ["kubernetes"]}
        obj["status"] = {"phase": "Active"}


def decode_secret(resource: Resource, obj: dict) -> None:
    """stringData goes into data; data must be base64 (as the JSON decoding of []byte)."""
    if resource.plural != "secrets":
        return
    data = obj.get("data") or {}
    for key, value in (obj.pop("stringData", None) or {}).items():
        data[key] = base64.b64encode(value.encode()).decode()
    for key, value in data.items():
        try:
            base64.b64decode(value, validate=True)
        except (ValueError, TypeError) as exc:
            raise bad_request(
                f'Secret in version "v1" cannot be handled as a Secret: illegal base64 data '
                f"at input byte 0 (key {key!r})"
            ) from exc
    if data:
        obj["data"] = data


# ---- the store ---------------------------------------------------------------------

Key = tuple[str, str, str]  # plural, namespace ("" when cluster-scoped), name


@dataclass
class Event:
    """One change in the store, as a watch reports it."""

    rv: int
    resource: Resource
    type: str  # ADDED, MODIFIED, DELETED
    obj: dict
    old: dict | None


class Store:
    """Objects, resourceVersions and the history watches resume from."""

    def __init__(self) -> None:
        self.objects: dict[Key, dict] = {}
        self.rv = 1000
        self.history: deque[Event] = deque()
        self.compacted = self.rv  # no event at or before this rv can be replayed
        self.listeners: list[Callable[[Event], None]] = []
        for name in NAMESPACES:
            self.create(BY_PLURAL["namespaces"], "", {"metadata": {"name": name}})

    # reads
    def get(self, resource: Resource, namespace: str, name: str) -> dict:
        obj = self.objects.get((resource.plural, namespace, name))
        if obj is None:
            raise not_found(resource, name)
        return copy.deepcopy(obj)

    def find(self, resource: Resource, namespace: str, name: str) -> dict | None:
        return self.objects.get((resource.plural, namespace, name))

    def items(self, resource: Resource, namespace: str | None = None) -> list[dict]:
        """Objects of `resource` (in `namespace`, or all), sorted as etcd keys are."""
        found = [
            obj
            for (plural, ns, _), obj in self.objects.items()
            if plural == resource.plural and (namespace is None or ns == namespace)
        ]
        return sorted(
            found, key=lambda o: (o["metadata"].get("namespace", ""), o["metadata"]["name"])
        )

    # writes
    def _commit(self, resource: Resource, kind: str, obj: dict, old: dict | None) -> dict:
        self.rv += 1
        obj["metadata"]["resourceVersion"] = str(self.rv)
        meta = obj["metadata"]
        key = (resource.plural, meta.get("namespace", ""), meta["name"])
        if kind == "DELETED":
            self.objects.pop(key, None)
        else:
            self.objects[key] = obj
        event = Event(self.rv, resource, kind, copy.deepcopy(obj), old)
        self.history.append(event)
        while len(self.history) > HISTORY_LIMIT:
            self.compacted = self.history.popleft().rv
        for listener in list(self.listeners):
            listener(event)
        return copy.deepcopy(obj)

    def compact(self) -> None:
        """Forget the history up to now: watches from older versions get 410."""
        self.history.clear()
        self.compacted = self.rv

    def create(self, resource: Resource, namespace: str, body: dict) -> dict:
        obj = copy.deepcopy(body)
        meta = obj.setdefault("metadata", {})
        if not isinstance(meta, dict):
            raise bad_request("metadata must be an object")
        if resource.namespaced:
            if meta.get("namespace") not in (None, "", namespace):
                raise bad_request(
                    "the namespace of the provided object does not match the namespace sent "
                    "on the request"
                )
            if (BY_PLURAL["namespaces"].plural, "", namespace) not in self.objects:
                raise not_found(BY_PLURAL["namespaces"], namespace)
            meta["namespace"] = namespace
        if meta.get("resourceVersion"):
            raise bad_request("resourceVersion should not be set on objects to be created")
        if not meta.get("name") and meta.get("generateName"):
            alphabet = "bcdfghjklmnpqrstvwxz2456789"
            meta["name"] = meta["generateName"] + "".join(random.choices(alphabet, k=5))
        if not meta.get("name"):
            raise invalid(
                resource,
                "",
                [
                    (
                        "metadata.name",
                        "FieldValueRequired",
                        "Required value: name or generateName is required",
                    )
                ],
            )
        if (resource.plural, meta.get("namespace", ""), meta["name"]) in self.objects:
            raise ApiError(
                409,
                "AlreadyExists",
                f'{resource.plural} "{meta["name"]}" already exists',
                {"name": meta["name"], "kind": resource.plural},
            )
        for key in ("deletionTimestamp", "deletionGracePeriodSeconds", "managedFields"):
            meta.pop(key, None)
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = now_rfc3339()
        if resource.generation:
            meta["generation"] = 1
        else:
            meta.pop("generation", None)
        obj["apiVersion"], obj["kind"] = resource.api_version, resource.kind
        decode_secret(resource, obj)
        apply_defaults(resource, obj)
        validate(resource, obj, None)
        return self._commit(resource, "ADDED", obj, None)

    def replace(
        self,
        resource: Resource,
        namespace: str,
        name: str,
        body: dict,
        subresource: str | None = None,
    ) -> dict:
        current = self.find(resource, namespace, name)
        if current is None:
            raise not_found(resource, name)
        obj = copy.deepcopy(body)
        meta = obj.setdefault("metadata", {})
        if meta.get("name", name) != name:
            raise bad_request(
                f"the name of the object ({meta['name']}) does not match the name on the URL "
                f"({name})"
            )
        rv = meta.get("resourceVersion")
        if rv and rv != current["metadata"]["resourceVersion"]:
            raise conflict(
                resource,
                name,
                "the object has been modified; please apply your changes to the latest "
                "version and try again",
            )
        if meta.get("uid") and meta["uid"] != current["metadata"]["uid"]:
            raise conflict(
                resource,
                name,
                f"Precondition failed: UID in precondition: {meta['uid']}, UID in object meta: "
                f"{current['metadata']['uid']}",
            )
        if subresource == "status":
            new = copy.deepcopy(current)
            new["status"] = obj.get("status", {})
        else:
            new = obj
            new["apiVersion"], new["kind"] = resource.api_version, resource.kind
            if resource.status_subresource:
                new["status"] = copy.deepcopy(current.get("status", {}))
            kept = (
                "uid",
                "creationTimestamp",
                "deletionTimestamp",
                "deletionGracePeriodSeconds",
                "namespace",
                "generation",
            )
            for key in kept:
                if key in current["metadata"]:
                    new["metadata"][key] = current["metadata"][key]
                else:
                    new["metadata"].pop(key, None)
            new["metadata"]["name"] = name
            decode_secret(resource, new)
            if resource.generation and new.get("spec") != current.get("spec"):
                new["metadata"]["generation"] = current["metadata"]["generation"] + 1
        if current["metadata"].get("deletionTimestamp"):
            added = set(new["metadata"].get("finalizers") or []) - set(
                current["metadata"].get("finalizers") or []
            )
            if added:
                raise ApiError(
                    422, "Invalid",
                    f'{resource.kind} "{name}" is invalid: metadata.finalizers: Forbidden: no new '
                    "finalizers can be added if the object is being deleted",
                )  # fmt: skip
        validate(resource, new, current)
        new["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
        if new == current:
            return copy.deepcopy(current)  # a no-op update writes nothing
        meta = new["metadata"]
        if (
            meta.get("deletionTimestamp")
            and not meta.get("finalizers")
            and meta.get("deletionGracePeriodSeconds") == 0
        ):
            return self._commit(resource, "DELETED", new, current)
        return self._commit(resource, "MODIFIED", new, current)

    def patch(
        self,
        resource: Resource,
        namespace: str,
        name: str,
        body: Any,
        content_type: str,
        subresource: str | None = None,
    ) -> dict:
        current = self.find(resource, namespace, name)
        if current is None:
            raise not_found(resource, name)
        if content_type.startswith("application/json-patch+json"):
            if not isinstance(body, list):
                raise bad_request("a json patch must be a list of operations")
            patched = json_patch(current, body)
        elif content_type.startswith(
            ("application/merge-patch+json", "application/strategic-merge-patch+json")
        ):
            if not isinstance(body, dict):
                raise bad_request("a merge patch must be a JSON object")
            if content_type.startswith("application/merge-patch+json"):
                patched = merge_patch(current, body)
            elif resource.custom:
                raise ApiError(
                    415,
                    "UnsupportedMediaType",
                    "the body of the request was in an unknown format - accepted media types "
                    "include: application/json-patch+json, application/merge-patch+json, "
                    "application/apply-patch+yaml",
                )
            else:
                patched = strategic_merge_patch(current, body)
            if not (body.get("metadata") or {}).get("resourceVersion"):
                patched["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
        else:
            raise ApiError(
                415,
                "UnsupportedMediaType",
                f"the body of the request was in an unknown format ({content_type}) - accepted "
                "media types include: application/json-patch+json, "
                "application/merge-patch+json, application/strategic-merge-patch+json",
            )
        if subresource != "status" and resource.status_subresource:
            patched["status"] = copy.deepcopy(current.get("status", {}))
        return self.replace(resource, namespace, name, patched, subresource)

    def delete(
        self,
        resource: Resource,
        namespace: str,
        name: str,
        grace: int | None = None,
        propagation: str | None = None,
        preconditions: dict | None = None,
    ) -> tuple[dict, bool]:
        """Delete (or start deleting) an object; returns it and whether it is gone."""
        current = self.find(resource, namespace, name)
        if current is None:
            raise not_found(resource, name)
        meta = current["metadata"]
        for key, mine in (("uid", meta["uid"]), ("resourceVersion", meta["resourceVersion"])):
            wanted = (preconditions or {}).get(key)
            if wanted and wanted != mine:
                label = "UID" if key == "uid" else "ResourceVersion"
                raise conflict(
                    resource,
                    name,
                    f"Precondition failed: {label} in precondition: {wanted}, {label} in "
                    f"object meta: {mine}",
                )
        if propagation not in (None, "Orphan", "Background", "Foreground"):
            raise bad_request(
                f"propagationPolicy {propagation!r} is not one of Orphan, Background, Foreground"
            )
        new = copy.deepcopy(current)
        meta = new["metadata"]
        finalizers = meta.setdefault("finalizers", [])
        if propagation == "Foreground" and "foregroundDeletion" not in finalizers:
            finalizers.append("foregroundDeletion")
        if propagation == "Orphan" and "orphan" not in finalizers:
            finalizers.append("orphan")
        if not finalizers:
            del meta["finalizers"]
        if resource.plural == "pods":
            spec, status = new["spec"], new.get("status", {})
            if grace is None:
                grace = spec.get("terminationGracePeriodSeconds", 30)
            if not spec.get("nodeName") or status.get("phase") in ("Succeeded", "Failed"):
                grace = 0
        else:
            grace = 0
        grace = max(0, int(grace))
        if meta.get("deletionTimestamp") and grace > 0:
            ends = parse_rfc3339(meta["deletionTimestamp"])
            if time.time() + grace >= ends:  # only a shorter grace moves the deadline
                if new == current:
                    return copy.deepcopy(current), False
                return self._commit(resource, "MODIFIED", new, current), False
        if grace == 0 and not meta.get("finalizers"):
            meta.setdefault("deletionTimestamp", now_rfc3339())
            meta["deletionGracePeriodSeconds"] = 0
            return self._commit(resource, "DELETED", new, current), True
        meta["deletionTimestamp"] = now_rfc3339(time.time() + grace)
        meta["deletionGracePeriodSeconds"] = grace
        if resource.generation:
            meta["generation"] = meta.get("generation", 0) + 1
        return self._commit(resource, "MODIFIED", new, current), False

    def write_status(
        self, resource: Resource, namespace: str, name: str, status: dict
    ) -> dict | None:
        """A controller's or the kubelet's status write (None if the object is gone)."""
        current = self.find(resource, namespace, name)
        if current is None:
            return None
        if current.get("status") == status:
            return copy.deepcopy(current)
        new = copy.deepcopy(current)
        new["status"] = copy.deepcopy(status)
        return self._commit(resource, "MODIFIED", new, current)

    def write(self, resource: Resource, obj: dict) -> dict | None:
        """A controller's write of a whole object it just read (None if it is gone)."""
        meta = obj["metadata"]
        current = self.find(resource, meta.get("namespace", ""), meta["name"])
        if current is None or current["metadata"]["uid"] != meta["uid"]:
            return None
        if obj == current:
            return copy.deepcopy(current)
        if (
            meta.get("deletionTimestamp")
            and not meta.get("finalizers")
            and meta.get("deletionGracePeriodSeconds") == 0
        ):
            return self._commit(resource, "DELETED", copy.deepcopy(obj), current)
        return self._commit(resource, "MODIFIED", copy.deepcopy(obj), current)


# ---- controllers -------------------------------------------------------------------


class Controllers:
    """The garbage collector, the PVC binder and the PVC protection controller.

    They run after every change (the real ones react to watch events too, a little later).
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        self.wake = asyncio.Event()
        store.listeners.append(lambda event: self.wake.set())
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self.task:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            await self.wake.wait()
            await asyncio.sleep(0.02)  # let a burst of changes settle, as informers do
            self.wake.clear()
            try:
                self.sweep()
            except Exception:
                log.exception("controller sweep failed")

    def _owner_alive(self, namespace: str, ref: dict) -> bool | None:
        """True/False: the referenced owner exists; None: a kind this server does not know."""
        resource = BY_KIND.get((ref.get("apiVersion", ""), ref.get("kind", "")))
        if resource is None:
            return None
        owner = self.store.find(
            resource, namespace if resource.namespaced else "", ref.get("name", "")
        )
        return owner is not None and owner["metadata"]["uid"] == ref.get("uid")

    def sweep(self) -> None:
        store = self.store
        by_owner: dict[str, list[tuple[Resource, dict]]] = {}
        for (plural, _, _), obj in list(store.objects.items()):
            for ref in obj["metadata"].get("ownerReferences") or []:
                by_owner.setdefault(ref.get("uid", ""), []).append((BY_PLURAL[plural], obj))
        for plural, ns, name in list(store.objects):
            obj = store.objects.get((plural, ns, name))
            if obj is None:
                continue  # deleted earlier in this sweep: the snapshot is stale
            resource = BY_PLURAL[plural]
            meta = obj["metadata"]
            refs = meta.get("ownerReferences") or []
            if refs and not meta.get("deletionTimestamp"):
                alive = [self._owner_alive(ns, ref) for ref in refs]
                if not any(alive) and False in alive:
                    self._delete(resource, ns, name)
                elif False in alive:
                    new = copy.deepcopy(obj)
                    new["metadata"]["ownerReferences"] = [
                        r for r, a in zip(refs, alive) if a is not False
                    ]
                    store.write(resource, new)
            finalizers = meta.get("finalizers") or []
            if not meta.get("deletionTimestamp"):
                if plural == "persistentvolumeclaims" and not meta.get("deletionTimestamp"):
                    self._bind(obj)
                continue
            dependents = by_owner.get(meta["uid"], [])
            if "orphan" in finalizers:
                for dep_resource, dep in dependents:
                    new = copy.deepcopy(dep)
                    new["metadata"]["ownerReferences"] = [
                        r for r in new["metadata"]["ownerReferences"] if r.get("uid") != meta["uid"]
                    ]
                    if not new["metadata"]["ownerReferences"]:
                        del new["metadata"]["ownerReferences"]
                    store.write(dep_resource, new)
                self._drop_finalizer(resource, obj, "orphan")
            elif "foregroundDeletion" in finalizers:
                for dep_resource, dep in dependents:
                    if not dep["metadata"].get("deletionTimestamp"):
                        self._delete(
                            dep_resource,
                            dep["metadata"].get("namespace", ""),
                            dep["metadata"]["name"],
                            "Foreground",
                        )
                if not dependents:
                    self._drop_finalizer(resource, obj, "foregroundDeletion")
            if "kubernetes.io/pvc-protection" in finalizers and not self._pvc_in_use(ns, name):
                self._drop_finalizer(resource, obj, "kubernetes.io/pvc-protection")

    def _delete(
        self, resource: Resource, ns: str, name: str, propagation: str = "Background"
    ) -> None:
        try:
            self.store.delete(resource, ns, name, propagation=propagation)
        except ApiError:
            pass  # gone meanwhile

    def _drop_finalizer(self, resource: Resource, obj: dict, finalizer: str) -> None:
        current = self.store.find(
            resource, obj["metadata"].get("namespace", ""), obj["metadata"]["name"]
        )
        if current is None:
            return
        new = copy.deepcopy(current)
        new["metadata"]["finalizers"] = [f for f in new["metadata"]["finalizers"] if f != finalizer]
        if not new["metadata"]["finalizers"]:
            del new["metadata"]["finalizers"]
        self.store.write(resource, new)

    def _pvc_in_use(self, namespace: str, claim: str) -> bool:
        for pod in self.store.items(BY_PLURAL["pods"], namespace):
            if pod.get("status", {}).get("phase") in ("Succeeded", "Failed"):
                continue
            for volume in pod["spec"].get("volumes") or []:
                if (volume.get("persistentVolumeClaim") or {}).get("claimName") == claim:
                    return True
        return False

    def _bind(self, pvc: dict) -> None:
        """Bind a new claim at once, as a provisioner with Immediate binding does."""
        if pvc.get("status", {}).get("phase") != "Pending":
            return
        new = copy.deepcopy(pvc)
        spec = new.setdefault("spec", {})
        spec["volumeName"] = f"pvc-{pvc['metadata']['uid']}"
        spec.setdefault("storageClassName", "standard")
        size = ((spec.get("resources") or {}).get("requests") or {}).get("storage", "1Gi")
        new["status"] = {
            "phase": "Bound",
            "accessModes": spec.get("accessModes", ["ReadWriteOnce"]),
            "capacity": {"storage": size},
        }
        new["metadata"].setdefault("annotations", {})["pv.kubernetes.io/bind-completed"] = "yes"
        self.store.write(BY_PLURAL["persistentvolumeclaims"], new)


# ---- RBAC --------------------------------------------------------------------------

VERBS = ("get", "list", "watch", "create", "update", "patch", "delete", "deletecollection")


@dataclass
class Rbac:
    """The rules of the Role(s) in a manifest: what the service account may do."""

    rules: list[dict]
    namespace: str
    user: str

    @classmethod
    def from_manifest(cls, path: Path, default_namespace: str) -> Rbac:
        rules, namespace, user = [], default_namespace, None
        for doc in yaml.safe_load_all(path.read_text()):
            if not isinstance(doc, dict):
                continue
            if doc.get("kind") in ("Role", "ClusterRole"):
                rules += doc.get("rules") or []
                namespace = (doc.get("metadata") or {}).get("namespace", namespace)
            if doc.get("kind") == "RoleBinding":
                for subject in doc.get("subjects") or []:
                    if subject.get("kind") == "ServiceAccount":
                        ns = subject.get("namespace", namespace)
                        user = f"system:serviceaccount:{ns}:{subject['name']}"
        return cls(rules, namespace, user or f"system:serviceaccount:{namespace}:jupyter-sandbox")

    def allows(
        self,
        verb: str,
        resource: Resource,
        subresource: str | None,
        namespace: str,
        name: str | None,
    ) -> bool:
        if resource.namespaced and namespace != self.namespace:
            return False
        target = f"{resource.plural}/{subresource}" if subresource else resource.plural
        for rule in self.rules:
            if not ({"*", resource.group} & set(rule.get("apiGroups") or [])):
                continue
            if not ({"*", target} & set(rule.get("resources") or [])):
                continue
            if not ({"*", verb} & set(rule.get("verbs") or [])):
                continue
            names = rule.get("resourceNames")
            if names and (name is None or name not in names):
                continue
            return True
        return False

    def forbidden(
        self,
        verb: str,
        resource: Resource,
        subresource: str | None,
        namespace: str,
        name: str | None,
    ) -> ApiError:
        target = f"{resource.plural}/{subresource}" if subresource else resource.plural
        what = f'{target} "{name}"' if name else target
        where = (
            f' in the namespace "{namespace}"' if resource.namespaced else " at the cluster scope"
        )
        details = {"kind": resource.plural}
        if name:
            details["name"] = name
        if resource.group:
            details["group"] = resource.group
        return ApiError(
            403,
            "Forbidden",
            f'{what} is forbidden: User "{self.user}" cannot {verb} resource "{target}" in API '
            f'group "{resource.group}"{where}',
            details,
        )


# ---- the HTTP API ------------------------------------------------------------------


@dataclass
class Request:
    """What a Kubernetes API path names."""

    resource: Resource
    namespace: str  # "" for cluster-scoped or all namespaces
    name: str | None
    subresource: str | None
    watch: bool

    def verb(self, method: str, params: dict) -> str:
        if method == "GET":
            if self.watch or _flag(params, "watch"):
                return "watch"
            return "get" if self.name else "list"
        if method == "DELETE":
            return "delete" if self.name else "deletecollection"
        return {"POST": "create", "PUT": "update", "PATCH": "patch"}.get(method, method.lower())


def parse_path(path: str) -> Request | None:
    """/api/v1/namespaces/NS/pods/NAME/status -> Request; None when not a resource path."""
    parts = [p for p in path.split("/") if p]
    if parts[:2] == ["api", "v1"]:
        group, version, rest = "", "v1", parts[2:]
    elif parts[:1] == ["apis"] and len(parts) >= 3:
        group, version, rest = parts[1], parts[2], parts[3:]
    else:
        return None
    watch = rest[:1] == ["watch"]
    rest = rest[1:] if watch else rest
    namespace = ""
    if len(rest) >= 3 and rest[0] == "namespaces" and (group, version, rest[2]) in BY_PATH:
        namespace, rest = rest[1], rest[2:]
    if not rest or (group, version, rest[0]) not in BY_PATH:
        return None
    resource = BY_PATH[(group, version, rest[0])]
    if resource.namespaced is False and namespace:
        return None
    name = rest[1] if len(rest) > 1 else None
    subresource = rest[2] if len(rest) > 2 else None
    if len(rest) > 3:
        return None
    return Request(resource, namespace, name, subresource, watch)


def _flag(params: dict, key: str) -> bool:
    return params.get(key, "").lower() in ("true", "1")


def _int_param(params: dict, key: str) -> int | None:
    value = params.get(key)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError as exc:
        raise bad_request(f"{key}: invalid value {value!r}: not an integer") from exc


@dataclass(eq=False)
class Watch:
    """One open watch: its filter and its queue of events to send."""

    resource: Resource
    namespace: str
    labels: Callable[[dict], bool]
    fields: Callable[[dict], bool]
    version: int  # the last resourceVersion it sent (or started from)
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)

    def matches(self, obj: dict | None) -> bool:
        if obj is None:
            return False
        if self.namespace and obj["metadata"].get("namespace") != self.namespace:
            return False
        return self.labels(obj["metadata"].get("labels") or {}) and self.fields(obj)

    def translate(self, event: Event) -> tuple[str, dict] | None:
        """The event as this watch sees it: a change in or out of its selector is an
        ADDED or DELETED event, as kube-apiserver sends."""
        if event.resource is not self.resource:
            return None
        now, before = self.matches(event.obj), self.matches(event.old)
        if event.type == "MODIFIED":
            if now and not before:
                return "ADDED", event.obj
            if before and not now:
                return "DELETED", event.obj
        return (event.type, event.obj) if now else None


class ApiServer:
    """The fake kube-apiserver: an aiohttp app over a Store, with fault controls."""

    def __init__(
        self, store: Store, token: str, rbac: Rbac | None = None, bookmark_interval: float = 60.0
    ):
        self.store = store
        self.token = token
        self.rbac = rbac
        self.bookmark_interval = bookmark_interval
        self.watches: set[Watch] = set()
        self.requests: Counter[str] = Counter()
        self.watch_events: Counter[str] = Counter()
        self.host, self.port = "127.0.0.1", 0
        self.runner: web.AppRunner | None = None
        self.site: web.TCPSite | None = None
        self.down_until = 0.0
        self.frozen_until = 0.0
        self._reopen: asyncio.Task | None = None
        self.log_reader: Callable[[str, str], str] | None = None  # the kubelet sets it
        store.listeners.append(self._fan_out)
        app = web.Application(client_max_size=8 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.app = app

    # lifecycle
    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.runner = web.AppRunner(self.app, handler_cancellation=True, access_log=None)
        await self.runner.setup()
        self.host = host
        await self._open(port)

    async def _open(self, port: int) -> None:
        self.site = web.TCPSite(self.runner, self.host, port, reuse_address=True)
        await self.site.start()
        self.port = self.site._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._reopen:
            self._reopen.cancel()
        self._cut_watches()
        if self.runner:
            await self.runner.cleanup()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    # faults
    async def outage(self, seconds: float, mode: str = "refuse") -> None:
        """The API is away for `seconds`. mode "refuse": the listener closes, every
        connection and open watch is cut, then the same port listens again. mode "hang"
        (a network partition): connections open but nothing is answered or sent, not even
        on open watches, until the time is up; then everything goes on (client timeouts
        are the client's)."""
        if mode == "hang":
            self.frozen_until = max(self.frozen_until, time.monotonic() + seconds)
            return
        if mode != "refuse":
            raise ValueError(f"outage mode {mode!r} is not refuse or hang")
        if self.site is not None:
            await self.site.stop()
            self.site = None
        self._cut_watches()
        for handler in self.runner.server.connections:
            handler.force_close()
            if handler.transport is not None:
                handler.transport.close()
        self.down_until = max(self.down_until, time.monotonic() + seconds)
        if self._reopen is None or self._reopen.done():
            self._reopen = asyncio.get_running_loop().create_task(self._reopen_later())

    async def _reopen_later(self) -> None:
        while (delay := self.down_until - time.monotonic()) > 0:
            await asyncio.sleep(delay)
        for _ in range(50):
            try:
                await self._open(self.port)
                return
            except OSError:
                await asyncio.sleep(0.1)
        log.error("could not listen on port %d again after the outage", self.port)

    def expire_watches(self) -> int:
        """Compact the history and send every open watch a 410 Expired ERROR event."""
        self.store.compact()
        count = len(self.watches)
        for watch in list(self.watches):
            message = f"too old resource version: {watch.version} ({self.store.compacted})"
            watch.queue.put_nowait(("ERROR", expired(message)))
        return count

    def _cut_watches(self) -> None:
        for watch in list(self.watches):
            watch.queue.put_nowait(None)

    def stats(self) -> dict:
        return {
            "requests": dict(sorted(self.requests.items())),
            "requests_total": sum(self.requests.values()),
            "watch_events": dict(sorted(self.watch_events.items())),
            "watch_events_total": sum(self.watch_events.values()),
            "open_watches": len(self.watches),
            "objects": dict(Counter(plural for plural, _, _ in self.store.objects)),
            "resource_version": self.store.rv,
        }

    def _fan_out(self, event: Event) -> None:
        for watch in self.watches:
            if (seen := watch.translate(event)) is not None:
                watch.queue.put_nowait(seen)

    # requests
    async def _frozen(self) -> None:
        """Wait out a "hang" outage."""
        while (delay := self.frozen_until - time.monotonic()) > 0:
            await asyncio.sleep(delay)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        await self._frozen()
        try:
            return await self._handle(request)
        except ApiError as error:
            return web.json_response(error.status(), status=error.code)
        except Exception as exc:  # a bug here: answer as the real server does, and log it
            log.exception("fake API server: %s %s failed", request.method, request.path)
            error = ApiError(500, "InternalError", f"Internal error occurred: {exc!r}")
            return web.json_response(error.status(), status=500)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        credentials = request.headers.get("Authorization")
        if credentials is not None and credentials != f"Bearer {self.token}":
            raise ApiError(401, "Unauthorized", "Unauthorized")
        path = request.path
        if path in ("/healthz", "/readyz", "/livez"):
            return web.Response(text="ok")
        if path == "/version":
            return web.json_response(
                {
                    "major": "1",
                    "minor": "34",
                    "gitVersion": "v1.34.0-fake",
                    "platform": "linux/amd64",
                }
            )
        if path.rstrip("/") in DISCOVERY_PATHS:
            return web.json_response(self._discovery(path))
        req = parse_path(path)
        if req is None:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        params = dict(request.query)
        verb = req.verb(request.method, params)
        if credentials is None:  # anonymous: allowed to ask the version and health only
            anonymous = Rbac([], "", "system:anonymous")
            raise anonymous.forbidden(verb, req.resource, req.subresource, req.namespace, req.name)
        self.requests[
            f"{verb} {req.resource.plural}{'/' + req.subresource if req.subresource else ''}"
        ] += 1
        if self.rbac and not self.rbac.allows(
            verb, req.resource, req.subresource, req.namespace, req.name
        ):
            raise self.rbac.forbidden(verb, req.resource, req.subresource, req.namespace, req.name)
        if req.resource.namespaced and req.name is not None and not req.namespace:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        body = await self._body(request)
        store, r, ns, name = self.store, req.resource, req.namespace, req.name
        if verb in ("watch", "list"):
            await self._catch_up(params.get("resourceVersion"))
        if verb == "watch":
            return await self._watch(request, req, params)
        if verb == "list":
            return web.json_response(self._list(req, params))
        if verb == "get":
            if req.subresource == "log" and r.plural == "pods":
                return web.Response(text=self.pod_log(ns, name, params), content_type="text/plain")
            return web.json_response(store.get(r, ns, name))
        if verb == "create":
            if name is not None:
                raise ApiError(
                    405,
                    "MethodNotAllowed",
                    "the server does not allow this method on the requested resource",
                )
            return web.json_response(store.create(r, ns, self._object_body(body)), status=201)
        if verb == "update":
            return web.json_response(store.replace(r, ns, name, body, req.subresource))
        if verb == "patch":
            kind = request.headers.get("Content-Type", "")
            return web.json_response(store.patch(r, ns, name, body, kind, req.subresource))
        if verb in ("delete", "deletecollection"):
            options = body if isinstance(body, dict) else {}
            grace = _int_param(params, "gracePeriodSeconds")
            if grace is None:
                grace = options.get("gracePeriodSeconds")
            propagation = params.get("propagationPolicy") or options.get("propagationPolicy")
            if options.get("orphanDependents") is True and propagation is None:
                propagation = "Orphan"
            if verb == "deletecollection":
                listed = self._list(req, params)
                for item in listed["items"]:
                    store.delete(
                        r,
                        item["metadata"].get("namespace", ""),
                        item["metadata"]["name"],
                        grace,
                        propagation,
                    )
                return web.json_response(listed)
            obj, gone = store.delete(r, ns, name, grace, propagation, options.get("preconditions"))
            if r.returns_object or not gone:
                # 202 only for the old orphanDependents=false, as kube-apiserver does; a
                # graceful or finalizer-held deletion answers 200 and the object.
                held = not gone and options.get("orphanDependents") is False
                return web.json_response(obj, status=202 if held else 200)
            details = {"name": name, "kind": r.plural, "uid": obj["metadata"]["uid"]}
            if r.group:
                details["group"] = r.group
            return web.json_response(
                {
                    "kind": "Status",
                    "apiVersion": "v1",
                    "metadata": {},
                    "status": "Success",
                    "details": details,
                }
            )
        raise ApiError(
            405,
            "MethodNotAllowed",
            "the server does not allow this method on the requested resource",
        )

    @staticmethod
    def _object_body(body: Any) -> dict:
        if not isinstance(body, dict):
            raise bad_request("the body of the request must be a JSON object")
        return body

    async def _body(self, request: web.Request) -> Any:
        if request.method in ("GET", "HEAD") or not request.can_read_body:
            return {}
        raw = await request.read()
        if not raw.strip():
            return {}
        try:
            return json.loads(raw)
        except ValueError as exc:
            raise bad_request(
                f"the body of the request could not be decoded as JSON: {exc}"
            ) from exc

    def _discovery(self, path: str) -> dict:
        if path == "/api":
            return {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []}
        groups: dict[str, list[str]] = {}
        for r in RESOURCES:
            if r.group:
                groups.setdefault(r.group, []).append(r.version)
        if path == "/apis":
            return {
                "kind": "APIGroupList",
                "apiVersion": "v1",
                "groups": [
                    {
                        "name": g,
                        "versions": [
                            {"groupVersion": f"{g}/{v}", "version": v} for v in sorted(set(vs))
                        ],
                        "preferredVersion": {"groupVersion": f"{g}/{vs[0]}", "version": vs[0]},
                    }
                    for g, vs in groups.items()
                ],
            }
        group_version = path.removeprefix("/api/").removeprefix("/apis/").strip("/")
        served = [r for r in RESOURCES if r.api_version == group_version]
        if not served:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        return {
            "kind": "APIResourceList",
            "apiVersion": "v1",
            "groupVersion": group_version,
            "resources": [
                {
                    "name": r.plural,
                    "singularName": r.kind.lower(),
                    "namespaced": r.namespaced,
                    "kind": r.kind,
                    "verbs": list(VERBS),
                }
                for r in served
            ],
        }

    def _select(self, req: Request, params: dict) -> list[dict]:
        labels = label_selector(params.get("labelSelector"))
        fields = field_selector(req.resource, params.get("fieldSelector"))
        return [
            obj
            for obj in self.store.items(req.resource, req.namespace or None)
            if labels(obj["metadata"].get("labels") or {}) and fields(obj)
        ]

    async def _catch_up(self, version: str | None) -> None:
        """A version from the future (e.g. of another server): wait up to TOO_LARGE_WAIT
        for the store to reach it, then refuse with 504 as kube-apiserver does."""
        if version in (None, "", "0"):
            return
        try:
            wanted = int(version)
        except ValueError as exc:
            raise bad_request(f"resourceVersion: invalid value {version!r}") from exc
        deadline = time.monotonic() + TOO_LARGE_WAIT
        while wanted > self.store.rv:
            if time.monotonic() > deadline:
                raise ApiError(
                    504,
                    "Timeout",
                    f"Too large resource version: {wanted}, current: {self.store.rv}",
                    {
                        "causes": [
                            {
                                "reason": "ResourceVersionTooLarge",
                                "message": "Too large resource version",
                            }
                        ],
                        "retryAfterSeconds": 1,
                    },
                )
            await asyncio.sleep(0.05)

    def _list(self, req: Request, params: dict) -> dict:
        rv = params.get("resourceVersion")
        exact = params.get("resourceVersionMatch") == "Exact"
        if rv and exact and int(rv) != self.store.rv and int(rv) <= self.store.compacted:
            raise expired(f"too old resource version: {rv} ({self.store.compacted})")
        items = self._select(req, params)
        limit = _int_param(params, "limit")
        meta: dict[str, Any] = {"resourceVersion": str(self.store.rv)}
        start = 0
        if token := params.get("continue"):
            try:
                state = json.loads(base64.urlsafe_b64decode(token))
                after, list_rv = state["start"], state["rv"]
            except (ValueError, KeyError) as exc:
                raise bad_request(f"continue key is not valid: {exc}") from exc
            if list_rv <= self.store.compacted and list_rv != self.store.rv:
                raise expired(
                    "The provided continue parameter is too old to display a consistent list "
                    "result. You can start a new list without the continue parameter."
                )
            meta["resourceVersion"] = str(list_rv)
            keys = [(o["metadata"].get("namespace", ""), o["metadata"]["name"]) for o in items]
            start = next((i for i, k in enumerate(keys) if list(k) > after), len(items))
        page = items[start:]
        if limit and len(page) > limit:
            last = page[limit - 1]["metadata"]
            token = {
                "start": [last.get("namespace", ""), last["name"]],
                "rv": int(meta["resourceVersion"]),
            }
            meta["continue"] = base64.urlsafe_b64encode(json.dumps(token).encode()).decode()
            meta["remainingItemCount"] = len(page) - limit
            page = page[:limit]
        return {
            "kind": req.resource.list_kind,
            "apiVersion": req.resource.api_version,
            "metadata": meta,
            "items": [self._list_item(req.resource, o) for o in page],
        }

    @staticmethod
    def _list_item(resource: Resource, obj: dict) -> dict:
        """A list's item: built-in types carry no kind and apiVersion there (custom
        resources do), as kube-apiserver encodes them."""
        item = copy.deepcopy(obj)
        if not resource.custom:
            item.pop("kind", None)
            item.pop("apiVersion", None)
        return item

    async def _watch(self, request: web.Request, req: Request, params: dict) -> web.StreamResponse:
        watch = Watch(
            req.resource,
            req.namespace,
            label_selector(params.get("labelSelector")),
            field_selector(req.resource, params.get("fieldSelector")),
            self.store.rv,
        )
        rv = params.get("resourceVersion")
        timeout = _int_param(params, "timeoutSeconds")
        bookmarks = _flag(params, "allowWatchBookmarks")
        backlog: list[tuple[str, Any]] = []
        if rv in (None, "", "0"):
            backlog = [("ADDED", copy.deepcopy(o)) for o in self._select(req, params)]
        else:
            try:
                since = int(rv)
            except ValueError as exc:
                raise bad_request(f"resourceVersion: invalid value {rv!r}") from exc
            watch.version = since
            if since < self.store.compacted:
                backlog = [
                    (
                        "ERROR",
                        expired(f"too old resource version: {since} ({self.store.compacted})"),
                    )
                ]
            else:
                for event in self.store.history:
                    if event.rv > since and (seen := watch.translate(event)) is not None:
                        backlog.append(seen)
        self.watches.add(watch)  # no await since the backlog was taken: nothing is missed
        for item in backlog:
            watch.queue.put_nowait(item)
        response = web.StreamResponse(
            headers={"Content-Type": "application/json", "Transfer-Encoding": "chunked"}
        )
        try:
            await response.prepare(request)
            deadline = time.monotonic() + (
                timeout if timeout is not None else DEFAULT_WATCH_TIMEOUT
            )
            while (left := deadline - time.monotonic()) > 0:
                try:
                    item = await asyncio.wait_for(
                        watch.queue.get(), min(left, self.bookmark_interval)
                    )
                except TimeoutError:
                    if bookmarks and deadline - time.monotonic() > 0:
                        bookmark = self._bookmark(req.resource)
                        await self._send(response, req.resource, "BOOKMARK", bookmark)
                        watch.version = self.store.rv
                    continue
                if item is None:  # cut by an outage
                    break
                kind, obj = item
                if kind == "ERROR":
                    await self._send(response, req.resource, "ERROR", obj.status())
                    break
                await self._send(response, req.resource, kind, obj)
                watch.version = int(obj["metadata"]["resourceVersion"])
            await response.write_eof()
        except ConnectionResetError:  # the client went away
            pass
        finally:
            self.watches.discard(watch)
        return response

    def _bookmark(self, resource: Resource) -> dict:
        return {
            "kind": resource.kind,
            "apiVersion": resource.api_version,
            "metadata": {"resourceVersion": str(self.store.rv)},
        }

    async def _send(
        self, response: web.StreamResponse, resource: Resource, kind: str, obj: dict
    ) -> None:
        await self._frozen()
        self.watch_events[f"{kind} {resource.plural}"] += 1
        await response.write(json.dumps({"type": kind, "object": obj}).encode() + b"\n")

    def pod_log(self, namespace: str, name: str, params: dict) -> str:
        """The pod's output, from the kubelet (set by it); empty without one."""
        self.store.get(BY_PLURAL["pods"], namespace, name)
        return self.log_reader(namespace, name) if self.log_reader else ""


def kubeconfig(server: str, token: str, namespace: str) -> dict:
    """A kubeconfig for the fake server, as kubectl config would write it."""
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "fake", "cluster": {"server": server}}],
        "users": [{"name": "jupyter-sandbox", "user": {"token": token}}],
        "contexts": [
            {
                "name": "fake",
                "context": {"cluster": "fake", "user": "jupyter-sandbox", "namespace": namespace},
            }
        ],
        "current-context": "fake",
        "preferences": {},
    }


def new_token() -> str:
    return "".join(random.SystemRandom().choices(string.ascii_letters + string.digits, k=40))
