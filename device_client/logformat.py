"""Log lines for a terminal or for journald: :func:`log_handler` writes to stderr with a timestamp,
or, when stderr is the journal (``$JOURNAL_STREAM`` names it), without one (journald adds its own)
and with the level as a ``<N>`` syslog priority prefix journald reads (``<3>`` error, ``<4>``
warning, ``<6>`` info, ``<7>`` debug)."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping

TERMINAL_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
JOURNAL_FORMAT = "%(name)s: %(message)s"


def syslog_priority(levelno: int) -> int:
    """The syslog priority of a logging level (CRITICAL 2, ERROR 3, WARNING 4, INFO 6, DEBUG 7)."""
    if levelno >= logging.CRITICAL:
        return 2
    if levelno >= logging.ERROR:
        return 3
    if levelno >= logging.WARNING:
        return 4
    if levelno >= logging.INFO:
        return 6
    return 7


class JournalFormatter(logging.Formatter):
    """Each line of a record (tracebacks included) prefixed with its ``<N>`` priority, so that
    journald files every line at the record's level."""

    def __init__(self) -> None:
        super().__init__(JOURNAL_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{syslog_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).split("\n"))


def stderr_is_journal(env: Mapping[str, str] | None = None) -> bool:
    """Whether stderr is the journal stream systemd named in ``$JOURNAL_STREAM`` (``dev:inode``)."""
    value = (os.environ if env is None else env).get("JOURNAL_STREAM", "")
    dev, sep, ino = value.partition(":")
    if not sep:
        return False
    try:
        st = os.fstat(sys.stderr.fileno())
        return (st.st_dev, st.st_ino) == (int(dev), int(ino))
    except (OSError, ValueError, AttributeError):
        return False


def log_handler() -> logging.Handler:
    """A stderr handler with the journal's format under systemd, the terminal's otherwise."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JournalFormatter() if stderr_is_journal() else logging.Formatter(TERMINAL_FORMAT))
    return handler
