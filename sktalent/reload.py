"""
SIGHUP: read the operator's files again without dropping a connection.

Each reloadable file has a loader, which raises ValueError in one sentence
naming the file and what is wrong with it, and an apply step that puts the
new content in force.  A file that does not load is refused and its old
content stays in force.

SIGHUP's default action ends the process: from the moment the server's code
first runs (hold_hangups) until the Reloader is up, a SIGHUP is only noted,
and the Reloader reloads once as it starts if one came.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any, Generic, TypeVar

import attrs
from twisted.application import service
from twisted.internet.interfaces import IReactorFromThreads
from twisted.logger import Logger

log = Logger()

T = TypeVar("T")


@attrs.define
class _Held:
    """The SIGHUP handler while the server starts: counts, nothing more."""

    count: int = 0

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        self.count += 1


_HELD = _Held()


def hold_hangups() -> None:
    """Until a Reloader starts, a SIGHUP is held, not fatal."""
    signal.signal(signal.SIGHUP, _HELD)


@attrs.frozen
class Reloadable(Generic[T]):
    """One file that SIGHUP reloads, named in the log by its option."""

    option: str
    path: str
    load: Callable[[str], T]
    apply: Callable[[T], None]

    def reload(self) -> bool:
        """Load the file and apply it, or refuse it; one log line either way."""
        try:
            value = self.load(self.path)
        except (OSError, ValueError) as e:
            log.error(
                "Reload: refused {option} {path}, the old one stays in force: {why}",
                option=self.option,
                path=self.path,
                why=e,
            )
            return False
        self.apply(value)
        log.info("Reload: {option} {path} reloaded", option=self.option, path=self.path)
        return True


@attrs.define(eq=False, repr=False)
class Reloader(service.Service):
    """Reloads its files on SIGHUP while it runs."""

    _reactor: IReactorFromThreads
    _files: Sequence[Reloadable[Any]]
    _previous: Any = None

    def reload(self) -> None:
        if not self._files:
            log.info("Reload: no file to reload")
        for file in self._files:
            file.reload()

    def startService(self) -> None:
        service.Service.startService(self)
        self._previous = signal.signal(signal.SIGHUP, self._hangup)
        if self._previous is _HELD and _HELD.count:
            log.info(
                "Reload: {count} SIGHUP came while the server was starting; reloading now",
                count=_HELD.count,
            )
            _HELD.count = 0
            self._reactor.callFromThread(self.reload)

    def stopService(self) -> None:
        signal.signal(signal.SIGHUP, self._previous)
        service.Service.stopService(self)

    def _hangup(self, signum: int, frame: FrameType | None) -> None:
        # A signal interrupts the reactor anywhere: reload from its loop.
        self._reactor.callFromThread(self.reload)
