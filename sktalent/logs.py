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

from twisted.logger import FileLogObserver, ILogObserver, LogEvent, formatEvent

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
