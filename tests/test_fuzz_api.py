"""Property-based tests over the real service: whatever a client sends, the answer is a
typed error (4xx with ``{"error", "message"}``) or a success, never a 500 or a hang, and
the service keeps serving another sandbox.

Hypothesis drives payloads, durations and sizes, magic arguments and file paths;
schemathesis drives every operation of the service's own OpenAPI document. Examples
are bounded so the whole file runs in about two minutes on two cores.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterator

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from IPython.core.error import UsageError
from schemathesis.checks import not_a_server_error
from schemathesis.config import SchemathesisConfig
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from jupyter_sandbox import Sandbox
from jupyter_sandbox._durations import (
    MAX_BYTES,
    MAX_SECONDS,
    format_relative,
    format_size,
    parse_duration,
    parse_size,
    parse_timeout,
)
from jupyter_sandbox._errors import ERRORS, InvalidRequest, SandboxError
from jupyter_sandbox.kernel import magics
from jupyter_sandbox.untrusted.messages import MAX_MESSAGE
from tests.conftest import ServiceEnv

pytestmark = pytest.mark.unprivileged

# FUZZ_EXAMPLES raises the bound for a longer hunt (the default keeps the file well within 2 min).
FUZZ = settings(
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", 30)),
    deadline=None,
    database=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.function_scoped_fixture,
        HealthCheck.filter_too_much,
    ],
)
QUICK = settings(FUZZ, max_examples=300)  # pure functions: cheap examples
ANSWER_TIMEOUT = httpx.Timeout(30.0, connect=5.0)  # any answer slower than this is a hang
STREAM_TIMEOUT = httpx.Timeout(30.0, connect=5.0, read=3.0)  # events stream until we leave

# JSON values of every shape, including huge numbers and deep nesting.
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner),
    max_leaves=10,
)
odd_text = st.lists(
    st.characters(codec="utf-8") | st.sampled_from(["\x00", "/", "..", "\u202e", "\ufeff", " "]),
    max_size=40,
).map("".join)


# -- the service, raw ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def api(service_env: ServiceEnv) -> Iterator[httpx.Client]:
    """An HTTP client on the service's Unix socket, sending whatever a test gives it."""
    Sandbox.list()  # starts the service if it is not running yet
    socket = json.loads(service_env.runtime_file.read_text())["socket"]
    with httpx.Client(
        transport=httpx.HTTPTransport(uds=socket),
        base_url="http://sandbox-service",
        timeout=ANSWER_TIMEOUT,
    ) as client:
        yield client


@pytest.fixture(scope="module")
def bystander(service_env: ServiceEnv) -> Iterator[Sandbox]:
    """A sandbox no fuzzed request touches: it must keep working throughout."""
    with Sandbox.create(timeout="10m") as sb:
        yield sb


class Targets:
    """Sandboxes for fuzzed requests to go to: a new one whenever a request ended the last
    (a DELETE, a deadline of 1 ms), so that every example reaches a running sandbox."""

    def __init__(self, api: httpx.Client) -> None:
        self.api = api
        self.made: list[Sandbox] = []

    def live(self) -> Sandbox:
        if (
            not self.made
            or self.api.get(f"/v1/sandboxes/{self.made[-1].id}").json().get("status") != "running"
        ):
            self.made.append(Sandbox.create(timeout="10m"))
        return self.made[-1]

    def close(self) -> None:
        for sandbox in self.made:
            with contextlib.suppress(SandboxError):
                sandbox.kill()


@pytest.fixture
def target(api: httpx.Client, bystander: Sandbox) -> Iterator[Targets]:
    """Where a test's requests go; afterwards the bystander still works."""
    targets = Targets(api)
    try:
        yield targets
    finally:
        targets.close()
    assert bystander.sh("echo still serving").stdout == "still serving\n"


def assert_typed(response: httpx.Response) -> None:
    """A success, or a 4xx whose body is the error shape naming a known error class."""
    request = response.request
    sent = f"{request.method} {str(request.url)[:300]} {request.content[:300]!r}"
    assert response.status_code < 500, (sent, response.status_code, response.text[:500])
    if response.status_code >= 400:
        try:
            body = response.json()
        except ValueError:
            raise AssertionError(f"{sent}: not the error shape: {response.text[:300]!r}") from None
        assert set(body) == {"error", "message"}, (sent, body)
        assert body["error"] in ERRORS, (sent, body)
        assert 0 < len(body["message"]) <= MAX_MESSAGE + 100, (sent, body)


def post(api: httpx.Client, url: str, body: object) -> httpx.Response:
    """POST `body` as JSON with escapes, so that even lone surrogates can be sent."""
    return api.post(url, content=json.dumps(body), headers={"Content-Type": "application/json"})


def kill_created(api: httpx.Client, response: httpx.Response) -> None:
    if response.status_code == 201:
        assert api.delete(f"/v1/sandboxes/{response.json()['id']}").status_code == 200


# -- durations and sizes -----------------------------------------------------------------------


@QUICK
@given(st.one_of(json_values, odd_text, st.floats(), st.integers()))
def test_durations_are_seconds_in_range_or_invalid_request(value):
    seconds = parsed_or_refused(parse_duration, value)
    assert seconds is None or (0 < seconds <= MAX_SECONDS and not math.isnan(seconds))


@QUICK
@given(
    st.lists(
        st.tuples(st.integers(0, 10**4), st.sampled_from(["h", "m", "s", "ms"])),
        min_size=1,
        max_size=4,
    ),
    st.sampled_from(["", " "]),
)
def test_durations_add_up_their_parts(parts, gap):
    text = gap.join(f"{n}{unit}" for n, unit in parts)
    expected = sum(n * {"h": 3600, "m": 60, "s": 1, "ms": 0.001}[u] for n, u in parts)
    if 0 < expected <= MAX_SECONDS:
        assert parse_timeout(text) == pytest.approx(expected)
    else:
        with pytest.raises(InvalidRequest, match=r"at most a year|more than 0"):
            parse_timeout(text)


@QUICK
@given(st.one_of(json_values, odd_text, st.floats(), st.integers(min_value=-(10**400))))
def test_sizes_are_bytes_in_range_or_invalid_request(value):
    size = parsed_or_refused(parse_size, value)
    assert size is None or (isinstance(size, int) and 4 << 20 <= size < MAX_BYTES)


def parsed_or_refused(parse, value):
    """What `parse` makes of `value`, or None if it refused it with a short InvalidRequest."""
    try:
        return parse(value)
    except InvalidRequest as e:
        assert len(str(e)) < 300
        return None


@QUICK
@given(st.integers(4, 10**6), st.sampled_from(["M", "MiB", "m", "G", "Gi", "gb"]))
def test_sizes_in_binary_units(number, unit):
    power = 2 if unit[0] in "Mm" else 3
    assert parse_size(f"{number}{unit}") == number * 1024**power


@QUICK
@given(st.floats(allow_nan=False, allow_infinity=False, min_value=-1e12, max_value=1e12))
def test_relative_times_and_sizes_always_render(value):
    text = format_relative(value)
    assert text.startswith("in ") or text.endswith(" ago")
    assert format_size(abs(value)).split()[-1] in ("byte", "bytes", "KiB", "MiB", "GiB", "TiB")


# -- magic arguments ---------------------------------------------------------------------------

MAGIC_OPTIONS = ["--timeout", "--memory", "--cpus", "--network", "--env", "--image", "--bg"]
MAGIC_OPTIONS += ["--ttl", "--single-use", "--tail", "--follow", "--sandbox", "--all", "-h"]
MAGIC_WORDS = ["list", "kill", "connect", "extend", "logs", "upload", "download", "info", "get"]
MAGIC_VALUES = ["box", "5m", "session", "nan", "inf", "-inf", "-1", "0", "1e400", "9" * 400]
MAGIC_VALUES += ["512M", "0.5", "host", "K=V", "=V", "'", '"', "\\", "--", "-x"]
magic_lines = st.lists(
    st.sampled_from(MAGIC_WORDS)
    | st.tuples(st.sampled_from(MAGIC_OPTIONS), st.sampled_from(MAGIC_VALUES) | odd_text).map(
        " ".join
    )
    | odd_text,
    max_size=5,
).map(" ".join)


@QUICK
@pytest.mark.parametrize("parser", ["CELL_PARSER", "LINE_PARSER", "SSH_PARSER"])
@given(line=magic_lines)
def test_magic_arguments_parse_or_give_a_usage_error(parser, line):
    """Never a traceback: every line parses to valid options or is a UsageError."""
    try:
        args = getattr(magics, parser).parse(line)
    except UsageError as e:
        assert "usage:" in str(e) and "error:" in str(e)
        return
    except magics._HelpShown:
        return
    for name in ("timeout", "ttl"):
        value = getattr(args, name, None)
        if isinstance(value, str):
            parse_timeout(value)
    if getattr(args, "memory", None) is not None:
        parse_size(args.memory)
    cpus = getattr(args, "cpus", None)
    assert cpus is None or 0 < cpus < math.inf
    tail = getattr(args, "tail", 0)
    assert tail is None or tail >= 0


# -- API payloads ------------------------------------------------------------------------------

CREATE_KEYS = ["name", "timeout", "memory", "cpus", "pids", "fds", "disk", "network"]
CREATE_KEYS += ["env", "labels", "owner", "bogus"]
good_values = {
    "name": st.from_regex(r"[a-z][a-z0-9-]{0,8}", fullmatch=True),
    "timeout": st.sampled_from(["session", "30s", "5m", 60, 0.5]),
    "memory": st.sampled_from(["256M", 128 << 20, "1G"]),
    "cpus": st.sampled_from([0.5, 1, "1"]),
    "env": st.dictionaries(st.from_regex(r"[A-Z_]{1,5}", fullmatch=True), st.text(max_size=5)),
}
create_bodies = st.dictionaries(
    st.sampled_from(CREATE_KEYS),
    json_values | odd_text | st.sampled_from([0, -1, 10**400, 1e308, "9" * 400, "host"]),
    max_size=4,
) | st.fixed_dictionaries({}, optional={k: v for k, v in good_values.items()})
raw_bodies = st.sampled_from(
    [
        *(b"{", b"[]", b'"x"', b"null", b"NaN", b'{"cpus": NaN}', b'{"timeout": Infinity}'),
        *(b"[" * 100_000 + b"]" * 100_000, b'{"a": ' * 50_000 + b"1" + b"}" * 50_000),
        *('{"name": "\udcff"}'.encode("utf-8", "surrogatepass"), b"\xff\xfe", b"1" * 5000),
    ]
)


@FUZZ
@given(body=create_bodies | raw_bodies)
def test_create_payloads_get_a_typed_answer(api, target, body):
    if isinstance(body, bytes):
        response = api.post("/v1/sandboxes", content=body)
    else:
        response = api.post("/v1/sandboxes", content=json.dumps(body, allow_nan=True))
    kill_created(api, response)
    assert_typed(response)
    if isinstance(body, bytes) or "bogus" in body:
        assert response.status_code == 400, response.text  # no valid request was sent


OPERATIONS = {
    "timeout": ["timeout"],
    "lease": ["lease"],
    "ssh": ["ttl", "single_use", "public_key"],
    "ssh/revoke": ["token"],
    "exec": ["cmd", "argv", "cwd", "env", "timeout", "input_b64"],
    "spawn": ["cmd", "argv", "cwd", "env"],
    "procs/1/signal": ["signal"],
    "files/stat": ["path"],
    "files/list": ["path"],
    "files/mkdir": ["path", "parents", "exist_ok", "mode"],
    "files/remove": ["path", "recursive"],
    "files/rename": ["src", "dst"],
}
operation_requests = st.sampled_from(sorted(OPERATIONS)).flatmap(
    lambda op: st.tuples(
        st.just(op),
        st.dictionaries(
            st.sampled_from([*OPERATIONS[op], "extra"]),
            json_values | odd_text | st.sampled_from(["/", "..", "sh", "true", 2**31, -1, 0]),
            max_size=3,
        )
        | raw_bodies,
    )
)


@FUZZ
@given(request=operation_requests)
def test_operation_payloads_get_a_typed_answer(api, target, request):
    op, body = request
    content = body if isinstance(body, bytes) else json.dumps(body)
    response = api.post(f"/v1/sandboxes/{target.live().id}/{op}", content=content)
    assert_typed(response)
    if isinstance(body, bytes) or "extra" in body:
        assert response.status_code == 400, response.text


QUERIES = {
    "": ["all"],
    "/{id}/logs": ["after", "tail", "pid", "follow"],
    "/{id}/procs/{pid}/wait": ["timeout"],
    "/{id}/files/read": ["path"],
    "/{id}/files/tar": ["path"],
}
query_values = odd_text.filter(lambda t: "\x00" not in t) | st.sampled_from(
    ["1", "true", "yes", "TRUE", "-1", "nan", "inf", "1e999", "9" * 400, "0x10", " 5", "\u0665"]
)


@FUZZ
@given(
    where=st.sampled_from(sorted(QUERIES)),
    pid=st.sampled_from(["1", "0", "-1", "abc", "99999999999", "1.5"]),
    query=st.dictionaries(
        st.sampled_from(["all", "after", "tail", "pid", "timeout"]), query_values
    ),
)
def test_query_parameters_get_a_typed_answer(api, target, where, pid, query):
    path = "/v1/sandboxes" + where.format(id=target.live().id, pid=pid)
    if "logs" in where:
        query["follow"] = "0"  # following streams until the client leaves
    if "wait" in where and query.get("timeout", "").replace(".", "", 1).isdigit():
        query["timeout"] = "0.1"  # a valid wait lasts as long as it says
    response = api.get(path, params=query)
    assert_typed(response)


# -- file paths --------------------------------------------------------------------------------

path_parts = st.sampled_from(
    [
        *("..", ".", "", "/", "~", "\x00", "a" * 256, "b" * 4000, "\u202e", "\ufeff", "é"),
        *("e\u0301", "\U0001f600", "\ud800", "dir/", "-rf", "$HOME", "*", "\n", "con", "\\"),
    ]
) | st.text(st.characters(codec="utf-8"), min_size=1, max_size=20)
paths = st.lists(path_parts, min_size=1, max_size=6).map("/".join)


@FUZZ
@given(path=paths, other=paths, data=st.binary(max_size=64))
def test_file_paths_get_a_typed_answer_and_files_read_back(api, target, path, other, data):
    sandbox = target.live()
    base = f"/v1/sandboxes/{sandbox.id}/files"
    query_safe = "\ud800" not in path  # a lone surrogate has no UTF-8 form for a URL
    answers = [post(api, f"{base}/stat", {"path": path})]
    answers.append(post(api, f"{base}/mkdir", {"path": path, "parents": True}))
    answers.append(post(api, f"{base}/list", {"path": path}))
    if query_safe:
        written = api.put(f"{base}/write", params={"path": path}, content=data)
        answers.append(written)
        read = api.get(f"{base}/read", params={"path": path})
        answers += [read, api.get(f"{base}/tar", params={"path": path})]
        if written.status_code == 200:
            assert read.status_code == 200 and data in read.content
    answers.append(post(api, f"{base}/rename", {"src": path, "dst": other}))
    answers.append(post(api, f"{base}/remove", {"path": other, "recursive": True}))
    for response in answers:
        assert_typed(response)
    assert sandbox.sh("echo ok").stdout == "ok\n"


# -- schemathesis over the OpenAPI document -----------------------------------------------------

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    negative_data_rejection,
]
STREAMS = ("/v1/events",)  # they stream until the client leaves: read what comes in 3 s
COMMAND_TIMEOUT = 10  # a fuzzed command's own timeout, at most


@pytest.fixture(scope="module")
def openapi_schema(api: httpx.Client):
    """The document the running service serves, for its own operations."""
    document = api.get("/v1/openapi.json").json()
    config = SchemathesisConfig.from_dict(
        {
            "generation": {"mode": "all", "max-examples": FUZZ.max_examples},
            "phases": {"coverage": {"enabled": False}, "stateful": {"enabled": False}},
            "checks": {
                # A sandbox a fuzzed request ended (DELETE, a deadline of 1 ms) is gone (410).
                "negative_data_rejection": {"expected-statuses": ["400", "404", "405", "410"]}
            },
        }
    )
    return schemathesis.openapi.from_dict(document, config=config)


schema = schemathesis.pytest.from_fixture("openapi_schema")


def bounded(case) -> None:
    """Keep a valid request from lasting long: follow, waits and command timeouts."""
    query = case.query if isinstance(case.query, dict) else {}
    if case.path.endswith("/logs") and query.get("follow") in ("1", "true"):
        query["follow"] = "0"  # following streams until the client leaves
    if case.path.endswith("/wait") and isinstance(query.get("timeout"), (int, float)):
        query["timeout"] = min(query["timeout"], 0.1)
    body = case.body
    if case.path.endswith("/exec") and isinstance(body, dict):
        timeout = body.get("timeout")
        if timeout is None or (isinstance(timeout, (int, float)) and timeout > COMMAND_TIMEOUT):
            body["timeout"] = COMMAND_TIMEOUT


def send(api: httpx.Client, case) -> httpx.Response:
    """The case as httpx sends it over the Unix socket; streams read for a few seconds."""
    data = case.as_transport_kwargs(base_url=str(api.base_url).rstrip("/"))
    # JSON with escapes: a lone surrogate in a generated string must still be sent.
    content = json.dumps(data.pop("json")).encode() if "json" in data else data.pop("data", None)
    request = api.build_request(
        data["method"],
        data["url"],
        params=data.get("params"),
        headers=data.get("headers"),
        content=content.encode() if isinstance(content, str) else content,
        timeout=STREAM_TIMEOUT if case.path in STREAMS else ANSWER_TIMEOUT,
    )
    response = api.send(request, stream=True)
    chunks = []
    try:
        chunks += response.iter_raw()
    except httpx.ReadTimeout:
        assert case.path in STREAMS, f"{request.method} {request.url}: no answer in time"
    finally:
        response.close()
    answer = httpx.Response(
        response.status_code, headers=response.headers, content=b"".join(chunks), request=request
    )
    answer.elapsed = response.elapsed  # the checks look at how long it took
    return answer


@schema.parametrize()
@pytest.mark.usefixtures("bystander", "target")  # set up before the leak check looks
@FUZZ
def test_every_operation_answers_as_its_document_says(case, api, target):
    if "ref" in (case.path_parameters or {}):
        case.path_parameters["ref"] = target.live().id
    bounded(case)
    response = send(api, case)
    if case.path == "/v1/sandboxes" and case.method == "POST":
        kill_created(api, response)
    assert_typed(response)
    case.validate_response(response, checks=CHECKS)
