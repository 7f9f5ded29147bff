"""Saving notebooks: the SSH widget's output is kept as its masked text only.

A widget's view needs its model, which lives in the kernel (or in widget state
the front end saves only when asked to). A notebook opened later without it would
show "Error displaying widget: model not found" where the SSH widget was; this
pre-save hook keeps just the text forms of outputs the widget marks as such
(``SshWidget.OUTPUT_METADATA``), so they are what shows, token masked. The live
view in the page that saved is not touched.
"""

from __future__ import annotations

from typing import Any

WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
MARK = "jupyter_sandbox"
TEXT_FORMS = ("text/plain", "text/html")


def keep_widget_text(model: dict[str, Any], **_: Any) -> None:
    """Pre-save hook: drop the widget view from marked outputs of a notebook `model`."""
    if model.get("type") != "notebook" or not isinstance(model.get("content"), dict):
        return
    for cell in model["content"].get("cells", []):
        for output in cell.get("outputs", []) if cell.get("cell_type") == "code" else []:
            data = output.get("data") or {}
            marked = (output.get("metadata") or {}).get(MARK, {}).get("saved_as") == "text"
            if marked and WIDGET_VIEW in data and any(form in data for form in TEXT_FORMS):
                output["data"] = {form: data[form] for form in TEXT_FORMS if form in data}
                output["metadata"] = {
                    k: v for k, v in output["metadata"].items() if k not in (WIDGET_VIEW, MARK)
                }
