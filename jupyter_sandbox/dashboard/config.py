"""The dashboard's settings: who counts as an instructor, where it listens and is mounted.

Kept apart from the handlers: the hub passes its part through the environment
(``JUPYTERHUB_SERVICE_PREFIX``, ``JUPYTERHUB_SERVICE_URL``), the deployment its part on
the command line (``--instructor-group``, ``--instructor-role``).
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from urllib.parse import urlsplit

DEFAULT_PREFIX = "/services/sandboxes/"
DEFAULT_URL = "http://127.0.0.1:10101"
DEFAULT_GROUP = "instructors"


@dataclass(frozen=True)
class DashboardConfig:
    """What the dashboard needs to start."""

    prefix: str
    host: str
    port: int
    instructor_groups: frozenset[str]
    instructor_roles: frozenset[str]
    usage_interval: float = 2.0

    @classmethod
    def from_args(cls, argv: list[str] | None = None) -> DashboardConfig:
        args = parser().parse_args(argv)
        url = urlsplit(os.environ.get("JUPYTERHUB_SERVICE_URL") or DEFAULT_URL)
        prefix = os.environ.get("JUPYTERHUB_SERVICE_PREFIX") or DEFAULT_PREFIX
        return cls(
            prefix=prefix if prefix.endswith("/") else prefix + "/",
            host=url.hostname or "127.0.0.1",
            port=url.port or 80,
            instructor_groups=frozenset(args.instructor_group or [DEFAULT_GROUP]),
            instructor_roles=frozenset(args.instructor_role or []),
            usage_interval=args.usage_interval,
        )


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m jupyter_sandbox.dashboard",
        description="The instructor dashboard, run by JupyterHub as a service.",
    )
    p.add_argument(
        "--instructor-group",
        action="append",
        metavar="GROUP",
        help=f"a hub group whose members may use the dashboard (repeatable; default "
        f"{DEFAULT_GROUP!r}); hub admins always may",
    )
    p.add_argument(
        "--instructor-role",
        action="append",
        metavar="ROLE",
        help="a hub role whose holders may use the dashboard (repeatable; the service "
        "then needs the read:roles:users scope)",
    )
    p.add_argument(
        "--usage-interval",
        type=float,
        default=2.0,
        metavar="SECONDS",
        help="how often the page refreshes the table and its live usage (default 2)",
    )
    return p
