"""The service's config file (TOML): instructor groups and quotas.

```toml
instructors = ["teachers"]   # groups whose members are instructors
[quota.default]              # see service.quotas
```

Read at start (and again on SIGHUP); a file that cannot be read or parsed stops the
service from starting, with the line and the reason. A missing file is no config.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

CONFIG_ENV = "JUPYTER_SANDBOX_CONFIG"
DEFAULT_PATH = Path("/etc/jupyter-sandbox/config.toml")


class ConfigError(ValueError):
    """The config file cannot be used; the message names it, the place and the reason."""


def path() -> Path:
    """Where the config file is: $JUPYTER_SANDBOX_CONFIG, else /etc/jupyter-sandbox/config.toml."""
    return Path(os.environ.get(CONFIG_ENV) or DEFAULT_PATH)


def load(file: Path) -> dict[str, Any]:
    """The config file's tables, or {} if there is no such file; ConfigError otherwise."""
    try:
        data = file.read_bytes()
    except FileNotFoundError:
        return {}
    except OSError as e:
        raise ConfigError(f"config file {file} cannot be read: {e.strerror}") from None
    try:
        return tomllib.loads(data.decode())
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {file} is not UTF-8 text: {e}") from None
    except tomllib.TOMLDecodeError as e:  # its message says "(at line L, column C)"
        raise ConfigError(
            f"config file {file} is not valid TOML: {e}. Fix it and start the service again"
        ) from None


def instructor_groups(config: dict[str, Any], file: Path) -> frozenset[str]:
    """The `instructors` list of group names (none if the key is absent)."""
    groups = config.get("instructors", [])
    if not isinstance(groups, list) or not all(isinstance(g, str) and g for g in groups):
        raise ConfigError(
            f'config file {file}: "instructors" must be a list of group names, such as '
            f'instructors = ["teachers"], not {groups!r:.80}'
        )
    return frozenset(groups)
