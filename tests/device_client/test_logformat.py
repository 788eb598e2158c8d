"""Log lines for journald: ``<N>`` priority prefixes on every line and no timestamp, only when
stderr is the stream ``$JOURNAL_STREAM`` names."""

from __future__ import annotations

import logging
import os
import sys

from device_client.logformat import JournalFormatter, stderr_is_journal


def record(level: int, msg: str) -> logging.LogRecord:
    return logging.LogRecord("device_client.x", level, __file__, 1, msg, None, None)


def test_levels_become_syslog_priorities_on_every_line():
    fmt = JournalFormatter()
    assert fmt.format(record(logging.ERROR, "bad")) == "<3>device_client.x: bad"
    assert fmt.format(record(logging.WARNING, "hm")) == "<4>device_client.x: hm"
    assert fmt.format(record(logging.INFO, "a\nb")) == "<6>device_client.x: a\n<6>b"
    assert fmt.format(record(logging.DEBUG, "d")) == "<7>device_client.x: d"
    assert fmt.format(record(logging.CRITICAL, "c")) == "<2>device_client.x: c"


def test_journal_stream_must_name_stderr(tmp_path, monkeypatch):
    st = os.fstat(sys.stderr.fileno())
    assert stderr_is_journal({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
    assert not stderr_is_journal({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"})
    assert not stderr_is_journal({"JOURNAL_STREAM": "junk"})
    assert not stderr_is_journal({})
