"""Where sandboxes run: the backend the service uses, chosen by `Settings.backend`.

``local`` runs each sandbox as a bubblewrap container on this host; ``kubernetes`` as
a pod of a cluster (the ``kubernetes`` extra). Both implement ``base.Backend``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .._config import BACKENDS, Settings

if TYPE_CHECKING:
    from .base import Backend


class UnknownBackend(ValueError):
    """`Settings.backend` names no backend, or one that cannot be loaded here."""


def make_backend(settings: Settings, storage_dir: Path) -> Backend:
    """The backend `settings.backend` names, for the storage in `storage_dir`.

    UnknownBackend names the choices for a name that is none of them, and the package to
    install for the kubernetes backend when its client library is missing.
    """
    if settings.backend == "local":
        from .local import LocalBackend

        return LocalBackend(storage_dir)
    if settings.backend == "kubernetes":
        try:
            from .kubernetes import KubernetesBackend
        except ModuleNotFoundError as e:
            if not (e.name or "").startswith("kubernetes_asyncio"):
                raise
            raise UnknownBackend(
                "the kubernetes backend needs the kubernetes_asyncio package, which is not "
                "installed: pip install jupyter-sandbox[kubernetes] (or choose "
                "JUPYTER_SANDBOX_BACKEND=local)"
            ) from None
        return KubernetesBackend(storage_dir, settings)
    raise UnknownBackend(
        f"unknown backend {settings.backend!r}: expected one of {', '.join(BACKENDS)} "
        "(set JUPYTER_SANDBOX_BACKEND or serve --backend)"
    )
