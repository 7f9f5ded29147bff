"""Keep tokens out of logs: asyncssh logs the SSH username, which is the token here."""

from __future__ import annotations

import logging

REDACTED = "<redacted>"
ASYNCSSH_LOGGERS = ("asyncssh", "asyncssh.sftp")


class RedactUsernames(logging.Filter):
    """Blanks the arguments of every asyncssh record that mentions a user, and the packet
    dumps of debug level 3 (a userauth request carries the username)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "packet", None) and isinstance(record.msg, str):
            record.msg = record.msg.split("\n", 1)[0] + f" {REDACTED}"
            record.packet = b""
        if isinstance(record.msg, str) and "user" in record.msg.lower() and record.args:
            count = len(record.args) if isinstance(record.args, tuple) else 1
            record.args = (REDACTED,) * count
        return True


def quiet_asyncssh() -> None:
    """Filter asyncssh's loggers (once) and lower them to WARNING unless configured."""
    for name in ASYNCSSH_LOGGERS:
        log = logging.getLogger(name)
        if not any(isinstance(f, RedactUsernames) for f in log.filters):
            log.addFilter(RedactUsernames())
    root = logging.getLogger(ASYNCSSH_LOGGERS[0])
    if root.level == logging.NOTSET:
        root.setLevel(logging.WARNING)
