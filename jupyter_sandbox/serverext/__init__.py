"""The Jupyter server extension behind the "Sandboxes" panel.

It serves the panel's REST and websocket endpoints under the server's base_url,
talks to the user's sandbox service, and ends a kernel's "session" sandboxes
when that kernel shuts down or restarts.
"""

from __future__ import annotations

import getpass
import shutil
import socket
from pathlib import Path
from typing import Any

from jupyter_core.paths import jupyter_runtime_dir
from jupyter_server.extension.application import ExtensionApp
from tornado.ioloop import PeriodicCallback
from traitlets import Float

from .handlers import handlers
from .hub import SandboxHub
from .reaper import KERNEL_ACTIONS, KernelReaper
from .saving import keep_widget_text


class SandboxExtension(ExtensionApp):
    """Sandboxes panel backend and kernel sandbox reaper."""

    name = "jupyter_sandbox"
    load_other_extensions = True

    reconcile_interval = Float(
        30.0,
        config=True,
        help="Seconds between checks for kernels that vanished without a shutdown event.",
    )
    usage_interval = Float(
        2.0, config=True, help="Seconds between CPU and memory samples pushed to the panels."
    )

    def initialize_settings(self) -> None:
        self.ssh_dir = Path(jupyter_runtime_dir()) / f"jupyter-sandbox-ssh-{self.serverapp.port}"
        self.hub = SandboxHub(
            self.serverapp.session_manager.list_sessions,
            owner=f"JupyterLab ({getpass.getuser()}@{socket.gethostname()})",
            usage_interval=self.usage_interval,
            log=self.log,
        )
        self.reaper = KernelReaper(self.serverapp.kernel_manager.list_kernel_ids, self.log)
        self.serverapp.event_logger.add_listener(
            schema_id=KERNEL_ACTIONS, listener=self.reaper.on_kernel_action
        )
        self.reconciler = PeriodicCallback(self.reaper.tick, self.reconcile_interval * 1000)
        self.reconciler.start()
        self.serverapp.contents_manager.register_pre_save_hook(keep_widget_text)

    def initialize_handlers(self) -> None:
        self.handlers.extend(handlers(self.hub, self.ssh_dir))

    async def stop_extension(self) -> None:
        self.reconciler.stop()
        await self.hub.close()
        shutil.rmtree(self.ssh_dir, ignore_errors=True)


def _jupyter_server_extension_points() -> list[dict[str, Any]]:
    return [{"module": "jupyter_sandbox.serverext", "app": SandboxExtension}]
