"""The notebooks in notebooks/ run top to bottom with nbclient, and save no secrets."""

from __future__ import annotations

import json
import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from jupyter_sandbox import Sandbox

pytestmark = pytest.mark.backends("local", "kubernetes")

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def execute(name: str, workdir: Path) -> nbformat.NotebookNode:
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    NotebookClient(
        nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(workdir)}}
    ).execute()
    nbformat.write(nb, workdir / name)
    return nb


def code_cells(nb: nbformat.NotebookNode) -> list[nbformat.NotebookNode]:
    return [c for c in nb.cells if c.cell_type == "code"]


def text_of(cell: nbformat.NotebookNode) -> str:
    return "".join(
        o.get("text", "") or o.get("data", {}).get("text/plain", "") for o in cell.outputs
    )


# Its "no network, as expected" needs egress blocked: a sandbox pod's is blocked by a
# NetworkPolicy, which the fake cluster does not enforce (its pods share the host's network).
@pytest.mark.backends("local")
def test_teaching_notebook(service_env, tmp_path: Path) -> None:
    nb = execute("teaching.ipynb", tmp_path)
    check = next(c for c in code_cells(nb) if c.source.startswith("%%sandbox lab\nawk"))
    assert "correct: " in text_of(check)
    safety = next(c for c in code_cells(nb) if "no network" in c.source)
    assert "no network, as expected" in text_of(safety)
    assert not [s for s in Sandbox.list() if s.name.startswith("lab-")]


@pytest.mark.timeout(300)
def test_quickstart_notebook(service_env, tmp_path: Path) -> None:
    nb = execute("quickstart.ipynb", tmp_path)
    connect = next(c for c in code_cells(nb) if "expose_ssh" in c.source)
    assert "Hello from a sandbox" in text_of(connect)
    logs = next(c for c in code_cells(nb) if c.source.startswith("%sandbox logs"))
    assert "GET / HTTP" in text_of(logs)
    widget = next(c for c in code_cells(nb) if c.source.startswith("%sandbox_ssh"))
    assert "application/vnd.jupyter.widget-view+json" in widget.outputs[0]["data"]
    saved = (tmp_path / "quickstart.ipynb").read_text()
    state = json.loads(saved)["metadata"]["widgets"]["application/vnd.jupyter.widget-state+json"][
        "state"
    ]
    masked = [
        s["state"]["masked_command"] for s in state.values() if "masked_command" in s["state"]
    ]
    assert masked and all("…" in m for m in masked)
    assert not re.search(r"[\w-]{16,}@127\.0\.0\.1", saved), "an SSH token was saved"
    assert not [s for s in Sandbox.list() if s.name.startswith("default-")]
