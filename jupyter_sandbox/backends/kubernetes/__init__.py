"""The kubernetes backend: each sandbox is a pod of a cluster running the same agent.

Needs the ``kubernetes`` extra (kubernetes_asyncio; make_backend names it when it is
missing). See ``backend`` for the objects a sandbox is made of and ``config`` for the
settings.
"""

from .backend import KubernetesBackend

__all__ = ["KubernetesBackend"]
