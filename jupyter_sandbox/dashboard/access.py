"""Who may use the dashboard: hub admins, members of an instructor group, holders of an
instructor role. Everyone else is refused."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import httpx

from .config import DashboardConfig

HUB_TIMEOUT = 10.0


async def is_instructor(user: dict[str, Any], config: DashboardConfig, hub_auth: Any) -> bool:
    """Does the hub user `user` (the model HubOAuth identified) count as an instructor?

    Admin and groups come with the login; roles are asked of the hub with the service's
    own token, and only when instructor roles are configured.
    """
    if user.get("kind", "user") != "user":
        return False
    if user.get("admin") or config.instructor_groups & set(user.get("groups") or ()):
        return True
    if not config.instructor_roles:
        return False
    return bool(config.instructor_roles & await _roles(user["name"], hub_auth))


async def _roles(name: str, hub_auth: Any) -> set[str]:
    url = f"{hub_auth.api_url.rstrip('/')}/users/{quote(name, safe='')}"
    async with httpx.AsyncClient(timeout=HUB_TIMEOUT) as client:
        response = await client.get(url, headers={"Authorization": f"token {hub_auth.api_token}"})
    if response.status_code != 200:
        return set()
    return set(response.json().get("roles") or ())
