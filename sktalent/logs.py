"""
Log formats.  ``text`` is twistd's own lines; ``json`` is one JSON object a
line, for journald and log shippers: time, level, namespace, message, and the
event's own fields (client, code, msgid, ...).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import IO, Any
from urllib.parse import urlsplit, urlunsplit

import attrs
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import FileLogObserver, ILogObserver, LogEvent, Logger, formatEvent

FORMATS = ("text", "json")

# Keys of twisted.python.log events, which Twisted adds to every event when a
# legacy observer is about: their text and the log_* keys say it all.  An
# event field must not use these names (Twisted itself would drop it).
_LEGACY = frozenset({"message", "time", "system", "isError", "format", "failure", "printed"})
# What a record has besides; an event field of the same name is field_NAME.
_RESERVED = frozenset({"level", "namespace", "traceback"})


def _plain(value: object) -> object:
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    return str(value)


def event_as_json(event: LogEvent) -> str:
    """One event as a line of JSON."""
    when = datetime.fromtimestamp(event.get("log_time", 0.0), UTC)
    level = event.get("log_level")
    record: dict[str, object] = {
        "time": when.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "level": "info" if level is None else level.name,
        "namespace": event.get("log_namespace", "-"),
        "message": formatEvent(event),
    }
    system = event.get("log_system")
    if system is not None and system != "-":
        record["system"] = _plain(system)
    failure = event.get("log_failure")
    if failure is not None:
        record["traceback"] = failure.getTraceback()
    for key, value in event.items():
        if key.startswith("log_") or key in _LEGACY:
            continue
        record["field_" + key if key in _RESERVED else key] = _plain(value)
    return json.dumps(record, ensure_ascii=False) + "\n"


def json_file_observer(out: IO[str]) -> ILogObserver:
    """An observer writing each event to out as a line of JSON."""
    return FileLogObserver(out, event_as_json)


def check_twistd_options(twistd: Mapping[str, Any]) -> None:
    """
    Raise ValueError when twistd's own logging options leave JSON nowhere to
    go: it is written to a file or to stdout, never to syslog.
    """
    if twistd.get("syslog"):
        raise ValueError("--log-format json writes to --logfile or stdout, not to --syslog")
    if twistd.get("logfile") == "-" and not twistd.get("nodaemon"):
        raise ValueError("--log-format json with --logfile=- needs -n: a daemon has no stdout")


def without_credentials(url: str) -> str:
    """url to be logged: any user:password@ before its host cut out."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "(an unreadable URL)"
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc="***@" + parts.netloc.rpartition("@")[2]))


@attrs.define(eq=False)
class ThrottledLog:
    """
    Info lines of one kind that a client can cause at will: at most
    ``lines`` of them are logged in a window of ``every`` seconds, and the
    window's others are summed up in one line at its end (``summary``, a
    format with ``{count}`` and ``{seconds}``), so that a flood of them
    cannot flood the log.
    """

    _log: Logger
    _clock: IReactorTime
    _summary: str
    lines: int = 5
    every: float = 1.0
    _window: float = -math.inf
    _written: int = 0
    _held: int = 0
    _summing: IDelayedCall | None = None

    def info(self, format: str, **fields: object) -> None:
        now = self._clock.seconds()
        if now - self._window >= self.every:
            self._window, self._written = now, 0
        if self._written < self.lines:
            self._written += 1
            self._log.info(format, **fields)
            return
        self._held += 1
        if self._summing is None:
            self._summing = self._clock.callLater(self._window + self.every - now, self._sum_up)

    def stop(self) -> None:
        """Sum up at once what is held: no line is left pending."""
        if self._summing is not None:
            self._summing.cancel()
            self._sum_up()

    def _sum_up(self) -> None:
        self._summing = None
        held, self._held = self._held, 0
        self._log.info(self._summary, count=held, seconds=self.every)
