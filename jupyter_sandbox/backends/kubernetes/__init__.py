"""The kubernetes backend: each sandbox is a pod of a cluster running the same agent.

Needs the ``kubernetes`` extra (kubernetes_asyncio). See ``backend`` for the objects a
sandbox is made of and ``config`` for the settings.
"""

import kubernetes_asyncio  # noqa: F401  (a missing extra is reported by make_backend)

from .backend import KubernetesBackend

__all__ = ["KubernetesBackend"]
