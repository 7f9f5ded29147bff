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

from jupyter_core.paths import jupyter_config_dir

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

CONFIG_ENV = "JUPYTER_SANDBOX_CONFIG"
DEFAULT_PATH = Path("/etc/jupyter-sandbox/config.toml")
USER_FILE = "jupyter_sandbox.toml"  # a per-user service's, in the Jupyter config dir


class ConfigError(ValueError):
    """The config file cannot be used; the message names it, the place and the reason."""


def path(system: bool = True) -> Path:
    """Where the config file is: $JUPYTER_SANDBOX_CONFIG, else the system service's
    /etc/jupyter-sandbox/config.toml, or a per-user service's
    <jupyter config dir>/jupyter_sandbox.toml (~/.jupyter/jupyter_sandbox.toml)."""
    named = os.environ.get(CONFIG_ENV)
    if named:
        return Path(named)
    return DEFAULT_PATH if system else Path(jupyter_config_dir()) / USER_FILE


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
