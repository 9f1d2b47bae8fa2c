"""The one logger setup: every process logs through `logging`, one line per event, to its
stderr with a timestamp and optionally to syslog ([log] in the configuration).

Lines look like Postfix's so the habits of administrators carry over:
`2026-12-01T05:37:41.123+00:00 mailpool/smtp-server/3[4711]: connect from [192.0.2.1]`.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys
from datetime import datetime

from mailpool.config import LogConfig

# The message vocabulary shared by every process, so one grep finds an event wherever it
# happened (the formats follow Postfix's smtpd, smtp and local).
CONNECT = "connect from [%s]:%d on %s"
DISCONNECT = "disconnect from [%s] messages=%d rejected=%d"
REJECT = "%s: reject: %s from [%s]: %s; from=<%s> to=<%s> helo=<%s>"
ACCEPTED = "%s: client=[%s], from=<%s>, nrcpt=%d, size=%d, message-id=<%s>"
DELIVERY = "%s: to=<%s>, relay=%s, delay=%.2f, status=%s (%s)"


class _Formatter(logging.Formatter):
    """ISO 8601 local time with milliseconds and offset; the part up to the second is
    formatted once a second (a busy job logs several lines per message)."""

    _second: int = -1
    _prefix: str = ""
    _offset: str = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        second = int(record.created)
        if second != self._second:
            stamp = datetime.fromtimestamp(second).astimezone().isoformat()
            self._prefix, self._offset = stamp[:19], stamp[19:]
            self._second = second
        millis = int((record.created - second) * 1000)
        return f"{self._prefix}.{millis:03d}{self._offset}"


def _syslog_handler(cfg: LogConfig, ident: str) -> logging.Handler:
    address: str | tuple[str, int] = cfg.syslog_address
    host, sep, port = cfg.syslog_address.rpartition(":")
    if sep and port.isdigit() and not cfg.syslog_address.startswith("/"):
        address = (host, int(port))
    facility = logging.handlers.SysLogHandler.facility_names[cfg.syslog_facility]
    handler = logging.handlers.SysLogHandler(address=address, facility=facility)
    handler.ident = f"{ident}[{os.getpid()}]: "
    handler.setFormatter(logging.Formatter("%(message)s"))
    return handler


def setup(name: str = "mailpool", cfg: LogConfig | None = None) -> None:
    """Route the `mailpool` logger: stderr always (the supervisor's goes to the terminal or
    the service manager; each job's to the same stderr it inherited), syslog when asked.
    Called again after a configuration is loaded or reloaded."""
    cfg = cfg or LogConfig()
    # The lines name the pid themselves: no getpid() and thread lookup per record.
    logging.logProcesses = logging.logThreads = logging.logMultiprocessing = False
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter(f"%(asctime)s {name}[{os.getpid()}]: %(message)s"))
    handlers: list[logging.Handler] = [handler]
    problem = None
    if cfg.syslog:
        try:
            handlers.append(_syslog_handler(cfg, name))
        except OSError as exc:
            problem = f"syslog at {cfg.syslog_address}: {exc} (logging to stderr only)"
    root = logging.getLogger("mailpool")
    for old in root.handlers:
        old.close()
    root.handlers[:] = handlers
    root.setLevel(cfg.level.upper())
    root.propagate = False
    if problem:
        root.error("%s", problem)
