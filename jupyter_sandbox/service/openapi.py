"""The OpenAPI 3.1 document of the service's REST API (served at ``GET /v1/openapi.json``).

Every route ``api.make_app`` registers is described here, with the limits the manager
enforces (names, durations, sizes, counts, environment, labels, network) as JSON
Schema, the shapes of the answers, and the error shape ``{"error": <class name>,
"message": ...}`` with the status codes of ``_errors``. The limits that depend on the
host (its memory, CPUs, open-file limit and the disk sandboxes live on) are filled in
from the running service.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass
from typing import Any

from .. import __version__
from .._config import host_cpus, host_memory
from .._durations import MAX_SECONDS
from .._errors import ERRORS
from .._models import AUDIT_STREAM
from ..agent.protocol import COMMAND_WITH_INPUT
from ..ssh import recording
from ..untrusted.messages import FILE_TYPES, LOG_STREAMS, MAX_PID
from .limits import MAX_PIDS, MIN_DISK, MIN_FDS, MIN_MEMORY, MIN_PIDS, disk_size, max_fds, max_pids
from .manager import ENV_KEY_RE, NAME_RE, Manager
from .quotas import KEYS as QUOTA_KEYS

Schema = dict[str, Any]
FRAMES = "application/x-sandbox-frames"
NDJSON = "application/x-ndjson"
MAX_SIGNAL = signal.NSIG - 1
NO_NUL = r"^[^\x00]*$"
SIZE = r"^\s*\d+(\.\d+)?\s*([kmgtKMGT]?)([iI]?[bB]?)\s*$"
DURATION = r"^\s*(\d+(\.\d+)?\s*|(\d+(\.\d+)?\s*(ms|h|m|s)\s*)+)$"


@dataclass(frozen=True)
class Bounds:
    """The host-dependent limits a sandbox may ask for."""

    memory: int
    cpus: float
    fds: int
    disk: int
    pids: int = MAX_PIDS

    @classmethod
    def of(cls, manager: Manager) -> Bounds:
        storage = manager.backend.storage
        return cls(host_memory(), float(host_cpus()), max_fds(), disk_size(storage), max_pids())


# -- schema helpers -------------------------------------------------------------------------


def _object(properties: dict[str, Schema], required: tuple[str, ...] = (), **extra: Any) -> Schema:
    return {"type": "object", "properties": properties, "required": list(required), **extra}


def _body(properties: dict[str, Schema], required: tuple[str, ...] = ()) -> Schema:
    """A JSON request body that takes exactly `properties` (others are refused)."""
    return _object(properties, required, additionalProperties=False)


def _null(schema: Schema) -> Schema:
    return {"anyOf": [schema, {"type": "null"}]}


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _size(low: int, high: int, what: str) -> Schema:
    return {
        "description": f'{what}: bytes, or a size such as "512M", "2G" ({low} to {high} bytes)',
        "anyOf": [
            {"type": "integer", "minimum": low, "maximum": high},
            {"type": "string", "pattern": SIZE},
        ],
    }


def _whole(low: int, high: int, what: str) -> Schema:
    return {"type": "integer", "minimum": low, "maximum": high, "description": what}


STRING = {"type": "string"}
TEXT = {"type": "string", "pattern": NO_NUL}
NUMBER = {"type": "number"}
INTEGER = {"type": "integer"}
SANDBOX_REQUIRED = ("id", "name", "status", "created_at", "timeout", "expires_at", "owner")
SANDBOX_REQUIRED += ("labels", "user", "uid")
BOOLEAN = {"type": "boolean"}
TIME = {"type": "number", "description": "seconds since 1970 (UTC)"}
DURATION_SCHEMA = {
    "description": f'a number of seconds or a duration such as "30s", "5m", "1h30m" '
    f"(more than 0, at most {MAX_SECONDS} s)",
    "anyOf": [
        {"type": "number", "exclusiveMinimum": 0, "maximum": MAX_SECONDS},
        {"type": "string", "pattern": DURATION},
    ],
}
ENV = {
    "type": "object",
    "description": "environment variables: names of letters, digits and '_', values without NUL",
    "propertyNames": {"pattern": f"^{ENV_KEY_RE.pattern}$"},
    "additionalProperties": {"anyOf": [TEXT, NUMBER]},
}


def _schemas(bounds: Bounds) -> dict[str, Schema]:
    limits = _object(
        {
            "memory": _null(INTEGER),
            "cpus": _null(NUMBER),
            "pids": _null(INTEGER),
            "fds": _null(INTEGER),
            "disk": _null(INTEGER),
            "tmpfs": {"type": "object", "additionalProperties": INTEGER},
        }
    )
    sandbox = _object(
        {
            "id": STRING,
            "name": STRING,
            "status": {"enum": ["running", "failed", "ended"]},
            "created_at": TIME,
            "timeout": {"anyOf": [{"const": "session"}, NUMBER]},
            "expires_at": _null(TIME),
            "owner": STRING,
            "user": {**STRING, "description": "the OS user who created it"},
            "uid": {**INTEGER, "description": "that user's uid"},
            "labels": {"type": "object", "additionalProperties": STRING},
            "limits": limits,
            "network": {"enum": ["none", "host"]},
            "ended_at": _null(TIME),
            "end_reason": _null(STRING),
            "failure": _null(STRING),
            "failed_at": _null(TIME),
            "limits_note": _null(STRING),
            "syscall_filter": _null(STRING),
            "hostname": STRING,
            "recording": {
                "type": "boolean",
                "description": "its SSH terminal sessions are recorded (asciicast v2)",
            },
            "files_kept": {
                "type": "boolean",
                "description": "its files outlive a failure of the sandbox: a failed one's "
                "are there until its deadline or a kill (false: a failure loses its home, a "
                "restart starts with an empty one; false once it ended)",
            },
        },
        SANDBOX_REQUIRED,
    )
    usage = _object(
        {
            "available": BOOLEAN,
            "reason": _null(STRING),
            "cpu_percent": _null(NUMBER),
            "cpu_seconds": _null(NUMBER),
            "memory_bytes": _null(INTEGER),
            "pids": _null(INTEGER),
            "time": NUMBER,
        },
        ("available",),
    )
    file_info = _object(
        {
            "name": STRING,
            "path": STRING,
            "type": {"enum": list(FILE_TYPES)},
            "size": {"type": "integer", "minimum": 0},
            "mode": {"type": "integer", "minimum": 0, "maximum": 0o7777},
            "mtime": NUMBER,
            "target": _null(STRING),
        },
        ("name", "path", "type", "size", "mode", "mtime"),
    )
    process = _object(
        {
            "pid": {"type": "integer", "minimum": 1, "maximum": MAX_PID},
            "command": STRING,
            "running": BOOLEAN,
            "exit_code": _null(INTEGER),
            "signal": _null(INTEGER),
        },
        ("pid", "command", "running"),
    )
    return {
        "Error": _object(
            {
                "error": {"type": "string", "description": "the class name of the error"},
                "message": {"type": "string", "description": "what happened, what to do next"},
            },
            ("error", "message"),
        ),
        "Sandbox": sandbox,
        "SandboxInfo": {"allOf": [sandbox, _object({"usage": usage}, ("usage",))]},
        "CreatedSandbox": {
            "allOf": [
                sandbox,
                _object({"lease": _null(STRING), "lease_ttl": NUMBER}, ("lease", "lease_ttl")),
            ]
        },
        "SandboxList": _object(
            {"sandboxes": {"type": "array", "items": _ref("Sandbox")}}, ("sandboxes",)
        ),
        "Status": _object(
            {
                "pid": INTEGER,
                "version": STRING,
                "started_at": TIME,
                "sandboxes": INTEGER,
                "pool": {"type": "array", "items": STRING},
                "ssh": _object({"host": STRING, "port": _null(INTEGER)}, ("host", "port")),
                "isolation": STRING,
                "cgroups": STRING,
            },
            ("pid", "version", "sandboxes", "isolation", "cgroups"),
        ),
        "Usage": _object(
            {
                "user": STRING,
                "uid": INTEGER,
                "instructor": BOOLEAN,
                "mode": {"enum": ["user", "system", "hub"]},
                "quota": _object(
                    {
                        "sandboxes": _null({"type": "integer", "minimum": 0}),
                        "memory": _null({"type": "integer", "minimum": 0}),
                        "cpus": _null({"type": "number", "minimum": 0}),
                        "lifetime": _null({"type": "number", "minimum": 0}),
                    },
                    QUOTA_KEYS,
                    description="each null: unlimited; memory in bytes, lifetime in seconds",
                ),
                "source": _object(
                    {key: _null(STRING) for key in QUOTA_KEYS},
                    QUOTA_KEYS,
                    description='which table sets each quota: "the default quota", '
                    '\'group "students"\', "the quota set for alice"; null: none',
                ),
                "usage": _object(
                    {
                        "sandboxes": {"type": "integer", "minimum": 0},
                        "memory": {"type": "integer", "minimum": 0},
                        "cpus": {"type": "number", "minimum": 0},
                    },
                    ("sandboxes", "memory", "cpus"),
                    description="what the caller's running and failed sandboxes hold",
                ),
            },
            ("user", "uid", "instructor", "mode", "quota", "source", "usage"),
        ),
        "CreateSandbox": _body(
            {
                "name": {
                    "type": "string",
                    "pattern": f"^{NAME_RE.pattern}$",
                    "description": "letters, digits, '.', '_', '-'; up to 63, starting with a "
                    "letter or digit; unique among live sandboxes",
                },
                "timeout": {"anyOf": [{"const": "session"}, DURATION_SCHEMA, {"type": "null"}]},
                "memory": _size(MIN_MEMORY, bounds.memory, "memory limit"),
                "cpus": {"type": "number", "minimum": 0.01, "maximum": bounds.cpus},
                "pids": _whole(MIN_PIDS, bounds.pids, "process limit"),
                "fds": _whole(MIN_FDS, bounds.fds, "open files per process"),
                "disk": _size(MIN_DISK, bounds.disk, "size of the home"),
                "network": {"enum": ["none", "host"], "description": "none: loopback only"},
                "env": ENV,
                "labels": {
                    "type": "object",
                    "additionalProperties": {"anyOf": [STRING, NUMBER]},
                },
                "owner": STRING,
                "record_terminals": {
                    "type": "boolean",
                    "description": "record its SSH terminal sessions; each is told so at login",
                },
            }
        ),
        "Extend": _body({"timeout": DURATION_SCHEMA}, ("timeout",)),
        "Lease": _body({"lease": STRING}, ("lease",)),
        "LeaseRenewed": _object({"lease_expires": _null(TIME)}, ("lease_expires",)),
        "ExposeSsh": _body(
            {
                "ttl": _null(DURATION_SCHEMA),
                "single_use": BOOLEAN,
                "public_key": _null({"type": "string", "description": "an OpenSSH public key"}),
            }
        ),
        "SshAccess": _object(
            {
                "hostname": STRING,
                "port": INTEGER,
                "username": {"type": "string", "description": "the credential: keep it private"},
                "command": STRING,
                "expires_at": _null(TIME),
                "sandbox_id": STRING,
                "host_key_fingerprint": STRING,
                "known_hosts_line": STRING,
            },
            ("hostname", "port", "username", "command", "expires_at", "host_key_fingerprint"),
        ),
        "Revoke": _body({"token": _null(STRING)}),
        "Revoked": _object({"revoked": {"type": "integer", "minimum": 0}}, ("revoked",)),
        "Exec": {
            **_body(
                {
                    "cmd": _null({"type": "string", "minLength": 1, "pattern": NO_NUL}),
                    "argv": _null({"type": "array", "minItems": 1, "items": TEXT}),
                    "cwd": _null(TEXT),
                    "env": _null(ENV),
                    "timeout": _null(
                        {"type": "number", "exclusiveMinimum": 0, "maximum": MAX_SECONDS}
                    ),
                    "input_b64": _null(
                        {"type": "string", "pattern": r"^[A-Za-z0-9+/]*={0,2}$"},
                    ),
                }
            ),
            "anyOf": [
                _object({"cmd": {"type": "string"}}, ("cmd",)),
                _object({"argv": {"type": "array"}}, ("argv",)),
            ],
        },
        "Spawn": {
            **_body(
                {
                    "cmd": _null({"type": "string", "minLength": 1, "pattern": NO_NUL}),
                    "argv": _null({"type": "array", "minItems": 1, "items": TEXT}),
                    "cwd": _null(TEXT),
                    "env": _null(ENV),
                }
            ),
            "anyOf": [
                _object({"cmd": {"type": "string"}}, ("cmd",)),
                _object({"argv": {"type": "array"}}, ("argv",)),
            ],
        },
        "Signal": _body({"signal": _whole(1, MAX_SIGNAL, "signal number (default 15)")}),
        "Process": process,
        "Processes": _object(
            {"processes": {"type": "array", "items": _ref("Process")}}, ("processes",)
        ),
        "AgentSocket": _object({"socket": STRING}, ("socket",)),
        "FileInfo": file_info,
        "Listing": _object({"entries": {"type": "array", "items": _ref("FileInfo")}}, ("entries",)),
        "Unpacked": _object({"files": {"type": "integer", "minimum": 0}}, ("files",)),
        "Empty": {"type": "object"},
        "Path": _body({"path": STRING}, ("path",)),
        "Mkdir": _body(
            {
                "path": STRING,
                "parents": BOOLEAN,
                "exist_ok": BOOLEAN,
                "mode": {"type": "integer", "minimum": 0, "maximum": 0o7777},
            },
            ("path",),
        ),
        "Remove": _body({"path": STRING, "recursive": BOOLEAN}, ("path",)),
        "Rename": _body({"src": STRING, "dst": STRING}, ("src", "dst")),
        "Recordings": {
            "type": "array",
            "items": _object(
                {
                    "name": {"type": "string", "pattern": f"^{recording.NAME.pattern}$"},
                    "started_at": TIME,
                    "size": {"type": "integer", "minimum": 0},
                },
                ("name", "started_at", "size"),
            ),
        },
        "LogEntry": _object(
            {
                "seq": INTEGER,
                "time": TIME,
                "source": STRING,
                "stream": {"enum": [*LOG_STREAMS, AUDIT_STREAM]},
                "text": STRING,
            },
            ("seq", "time", "source", "stream", "text"),
        ),
    }


# -- operations -----------------------------------------------------------------------------

# Errors every operation may answer, and those of the operations on one sandbox.
COMMON = (400, 401, 500, 503)
ON_SANDBOX = (*COMMON, 404, 409, 410, 507)  # 507: its record could not be saved, disk full
ON_FILES = (*ON_SANDBOX, 403)
HTTP_ERRORS = {
    401: "PermissionDenied: a TCP request without the bearer token",
    413: "InvalidRequest: the request body is too large",
}


def _error_names() -> dict[int, list[str]]:
    names: dict[int, list[str]] = {}
    for name, cls in ERRORS.items():
        if cls.__name__ == name and cls.status >= 400:
            names.setdefault(cls.status, []).append(name)
    return names


def _responses(ok: int, content: dict[str, Any] | None, errors: tuple[int, ...]) -> Schema:
    names = _error_names()
    answers: dict[str, Any] = {str(ok): {"description": "done"}}
    if content is not None:
        answers[str(ok)]["content"] = content
    error = {"application/json": {"schema": _ref("Error")}}
    for status in sorted(set(errors)):
        described = ", ".join(names.get(status, [])) or HTTP_ERRORS.get(status)
        if described:  # a status of no error class (yet) is not answered
            answers[str(status)] = {"description": described, "content": error}
    return answers


def _json(name: str) -> dict[str, Any]:
    return {"application/json": {"schema": _ref(name)}}


def _binary(media: str) -> dict[str, Any]:
    return {media: {"schema": {"type": "string", "format": "binary"}}}


def _operation(
    summary: str,
    answer: str | dict[str, Any] | None,
    errors: tuple[int, ...],
    *,
    body: str | dict[str, Any] | None = None,
    body_required: bool = False,
    query: tuple[Schema, ...] = (),
    ok: int = 200,
) -> Schema:
    if body is not None:
        errors = (*errors, 413)  # a JSON body over the size bound
    operation: Schema = {
        "summary": summary,
        "operationId": summary,
        "parameters": list(query),
        "responses": _responses(ok, _json(answer) if isinstance(answer, str) else answer, errors),
    }
    if body is not None:
        content = _json(body) if isinstance(body, str) else body
        operation["requestBody"] = {"required": body_required, "content": content}
    return operation


def _query(name: str, schema: Schema, description: str, required: bool = False) -> Schema:
    return {
        "name": name,
        "in": "query",
        "required": required,
        "schema": schema,
        "description": description,
    }


def _flag(name: str, description: str) -> Schema:
    return _query(name, {"enum": ["0", "1", "false", "true"]}, description)


PATH = _query("path", {"type": "string", "minLength": 1}, "a path in the sandbox", True)
SECONDS = {"type": "number", "minimum": 0, "maximum": MAX_SECONDS}


def _paths() -> dict[str, dict[str, Schema]]:
    one = "/v1/sandboxes/{ref}"
    paths: dict[str, dict[str, Schema]] = {
        "/v1/openapi.json": {
            "get": _operation(
                "openapi", {"application/json": {"schema": {"type": "object"}}}, COMMON
            )
        },
        "/v1/status": {"get": _operation("status", "Status", COMMON)},
        "/v1/usage": {
            "get": _operation(
                "usage",
                "Usage",
                (*COMMON, 403),
                query=(_query("user", STRING, "another user's (instructors only)"),),
            )
        },
        "/v1/events": {
            "get": _operation(
                "events",
                {NDJSON: {"schema": STRING}},
                COMMON,
            )
        },
        "/v1/sandboxes": {
            "get": _operation(
                "list",
                "SandboxList",
                COMMON,
                query=(
                    _flag("all", "include ended sandboxes"),
                    _query("user", STRING, "only the sandboxes of this OS user (login name)"),
                    _flag("mine", "only the caller's own sandboxes (for instructors)"),
                ),
            ),
            "post": _operation(
                "create", "CreatedSandbox", (*COMMON, 403, 409, 507), body="CreateSandbox", ok=201
            ),
        },
        one: {
            "get": _operation("info", "SandboxInfo", ON_SANDBOX),
            "delete": _operation("kill", "Sandbox", ON_SANDBOX),
        },
        f"{one}/restart": {"post": _operation("restart", "Sandbox", ON_SANDBOX)},
        f"{one}/timeout": {
            "post": _operation(
                "extend", "Sandbox", (*ON_SANDBOX, 403), body="Extend", body_required=True
            )
        },
        f"{one}/lease": {
            "post": _operation(
                "renew", "LeaseRenewed", ON_SANDBOX, body="Lease", body_required=True
            )
        },
        f"{one}/ssh": {"post": _operation("expose_ssh", "SshAccess", ON_SANDBOX, body="ExposeSsh")},
        f"{one}/ssh/revoke": {
            "post": _operation("revoke_ssh", "Revoked", ON_SANDBOX, body="Revoke")
        },
        f"{one}/exec": {
            "post": _operation(
                "exec",
                _binary(FRAMES),
                ON_FILES,
                # or: the Exec object (no input_b64) on one line, then the raw input
                body={**_json("Exec"), **_binary(COMMAND_WITH_INPUT)},
                body_required=True,
            )
        },
        f"{one}/spawn": {
            "post": _operation("spawn", "Process", ON_FILES, body="Spawn", body_required=True)
        },
        f"{one}/agent": {"get": _operation("agent_socket", "AgentSocket", (*ON_SANDBOX, 403))},
        f"{one}/procs": {"get": _operation("procs", "Processes", ON_SANDBOX)},
        f"{one}/procs/{{pid}}/wait": {
            "get": _operation(
                "proc_wait",
                "Process",
                ON_SANDBOX,
                query=(_query("timeout", SECONDS, "seconds to wait (default: until it exits)"),),
            )
        },
        f"{one}/procs/{{pid}}/signal": {
            "post": _operation("proc_signal", "Process", ON_SANDBOX, body="Signal")
        },
        f"{one}/logs": {
            "get": _operation(
                "logs",
                {NDJSON: {"schema": STRING}},
                ON_SANDBOX,
                query=(
                    _query(
                        "after",
                        {"type": "integer", "minimum": 0},
                        "the sandbox's entries after this seq (audit entries, stream "
                        '"audit", are numbered apart and all given)',
                    ),
                    _query("tail", {"type": "integer", "minimum": 0}, "only the last N entries"),
                    _query(
                        "pid",
                        {"type": "integer", "minimum": 1, "maximum": MAX_PID},
                        "one pid's entries (no audit entries)",
                    ),
                    _flag("follow", "keep streaming new entries"),
                ),
            )
        },
        f"{one}/recordings": {"get": _operation("recordings", "Recordings", ON_SANDBOX)},
        f"{one}/recordings/{{name}}": {
            "get": _operation("recording", _binary(recording.MEDIA_TYPE), ON_SANDBOX)
        },
        f"{one}/files/read": {
            "get": _operation("read_file", _binary(FRAMES), ON_FILES, query=(PATH,))
        },
        f"{one}/files/write": {
            "put": _operation(
                "write_file",
                "FileInfo",
                ON_FILES,
                body=_binary("application/octet-stream"),
                body_required=True,
                query=(
                    PATH,
                    _query("mode", {"type": "string", "pattern": "^[0-7]{1,4}$"}, "octal bits"),
                ),
            )
        },
        f"{one}/files/tar": {
            "get": _operation("read_tar", _binary(FRAMES), ON_FILES, query=(PATH,)),
            "put": _operation(
                "write_tar",
                "Unpacked",
                ON_FILES,
                body=_binary("application/octet-stream"),  # a tar stream
                body_required=True,
                query=(PATH,),
            ),
        },
    }
    file_ops = {
        "stat": ("FileInfo", "Path"),
        "list": ("Listing", "Path"),
        "mkdir": ("FileInfo", "Mkdir"),
        "remove": ("Empty", "Remove"),
        "rename": ("FileInfo", "Rename"),
    }
    for op, (answer, body) in file_ops.items():
        paths[f"{one}/files/{op}"] = {
            "post": _operation(f"file_{op}", answer, ON_FILES, body=body, body_required=True)
        }
    ref = {"name": "ref", "in": "path", "required": True, "schema": {"type": "string"}}
    pid = {
        "name": "pid",
        "in": "path",
        "required": True,
        "schema": {"type": "integer", "minimum": 1, "maximum": MAX_PID},
    }
    name = {
        "name": "name",
        "in": "path",
        "required": True,
        "schema": {"type": "string", "pattern": f"^{recording.NAME.pattern}$"},
        "description": f"a recording's name, {recording.NAME_PATTERN}",
    }
    for path, operations in paths.items():
        for operation in operations.values():
            if "{ref}" in path:
                operation["parameters"].insert(0, ref)
            if "{pid}" in path:
                operation["parameters"].insert(1, pid)
            if "{name}" in path:
                operation["parameters"].insert(1, name)
    return paths


def document(bounds: Bounds) -> Schema:
    """The OpenAPI document of this service, with `bounds` as the host's limits."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "jupyter-sandbox service",
            "version": __version__,
            "description": "Sandboxes: create, run commands, move files, expose SSH. Over the "
            "Unix socket the filesystem is the authentication; over TCP every request needs "
            "'Authorization: Bearer <token>' (the token is in the runtime file); a service "
            "started with --hub-auth takes a JupyterHub user's token instead, as "
            "'Authorization: token <hub token>'.",
        },
        "paths": _paths(),
        "components": {
            "schemas": _schemas(bounds),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
