"""Real Jupyter kernels for the notebook integration tests.

Kernels inherit the test session's private service environment (``service_env``
from conftest sets it in ``os.environ``) and load the extension; every cell's
outputs are recorded with the time they arrived.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from jupyter_client.manager import KernelManager

LOAD = "%load_ext jupyter_sandbox.kernel"


@dataclass
class Output:
    """One IOPub output of a cell: a stream chunk, a display, or an error."""

    at: float  # seconds since the request was sent
    kind: str  # "stdout", "stderr", "display", "update", "result", "error"
    text: str
    content: dict[str, Any] = field(repr=False, default_factory=dict)


@dataclass
class Reply:
    status: str
    elapsed: float
    outputs: list[Output]
    content: dict[str, Any] = field(repr=False, default_factory=dict)

    @property
    def stdout(self) -> str:
        return "".join(o.text for o in self.outputs if o.kind == "stdout")

    @property
    def stderr(self) -> str:
        return "".join(o.text for o in self.outputs if o.kind == "stderr")

    @property
    def error(self) -> Output | None:
        return next((o for o in self.outputs if o.kind == "error"), None)


_KINDS = {"display_data": "display", "update_display_data": "update", "execute_result": "result"}


class Kernel:
    """A running IPython kernel with the extension loaded."""

    def __init__(self, env: dict[str, str] | None = None) -> None:
        runtime = Path(os.environ["JUPYTER_RUNTIME_DIR"])
        runtime.mkdir(parents=True, exist_ok=True)
        self.id = str(uuid.uuid4())
        self.manager = KernelManager(connection_file=str(runtime / f"kernel-{self.id}.json"))
        self.manager.start_kernel(env={**os.environ, **(env or {})})
        self.client = self.manager.client()
        self.client.start_channels()
        self.client.wait_for_ready(timeout=60)
        assert self.run(LOAD).status == "ok"

    @property
    def pid(self) -> int:
        return self.manager.provisioner.process.pid

    def run(
        self, code: str, timeout: float = 60, on_output: Callable[[Output], None] | None = None
    ) -> Reply:
        """Execute `code`; `on_output` sees each output as it arrives."""
        outputs: list[Output] = []
        start = time.monotonic()

        def hook(msg: dict[str, Any]) -> None:
            kind, content = msg["msg_type"], msg["content"]
            if kind == "stream":
                out = Output(time.monotonic() - start, content["name"], content["text"], content)
            elif kind in _KINDS:
                text = content.get("data", {}).get("text/plain", "")
                out = Output(time.monotonic() - start, _KINDS[kind], text, content)
            elif kind == "error":
                out = Output(
                    time.monotonic() - start,
                    "error",
                    f"{content['ename']}: {content['evalue']}",
                    content,
                )
            else:
                return
            outputs.append(out)
            if on_output is not None:
                on_output(out)

        reply = self.client.execute_interactive(code, output_hook=hook, timeout=timeout)
        content = reply["content"]
        return Reply(content["status"], time.monotonic() - start, outputs, content)

    def ok(self, code: str, **kwargs: Any) -> Reply:
        """Execute `code` and require success."""
        reply = self.run(code, **kwargs)
        assert reply.status == "ok", reply.outputs
        return reply

    def custom_message(
        self, model_id: str, content: dict[str, Any], answer_type: str, timeout: float = 10
    ) -> dict[str, Any]:
        """Send a widget a custom message, as a front end does; return its answer."""
        self.client.shell_channel.send(
            self.client.session.msg(
                "comm_msg", {"comm_id": model_id, "data": {"method": "custom", "content": content}}
            )
        )
        deadline = time.monotonic() + timeout
        while True:
            msg = self.client.get_iopub_msg(timeout=max(0.0, deadline - time.monotonic()))
            data = msg["content"].get("data", {})
            if (
                msg["msg_type"] == "comm_msg"
                and msg["content"]["comm_id"] == model_id
                and data.get("method") == "custom"
                and data["content"].get("type") == answer_type
            ):
                return data["content"]

    def shutdown(self) -> None:
        if self.manager.has_kernel:
            self.manager.shutdown_kernel(now=False)
        self.client.stop_channels()


@pytest.fixture
def start_kernel(service_env: Any) -> Iterator[Callable[..., Kernel]]:
    """Start kernels on demand (``start_kernel(env={...})``); all are shut down afterwards."""
    kernels: list[Kernel] = []

    def start(env: dict[str, str] | None = None) -> Kernel:
        kernels.append(Kernel(env))
        return kernels[-1]

    yield start
    for kernel in kernels:
        kernel.shutdown()


@pytest.fixture
def kernel(start_kernel: Callable[..., Kernel]) -> Kernel:
    return start_kernel()
