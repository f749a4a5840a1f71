"""
SIGHUP: read the operator's files again without dropping a connection.

Each reloadable file has a loader, which raises ValueError in one sentence
naming the file and what is wrong with it, and an apply step that puts the
new content in force.  A file that does not load is refused and its old
content stays in force.
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

    def stopService(self) -> None:
        signal.signal(signal.SIGHUP, self._previous)
        service.Service.stopService(self)

    def _hangup(self, signum: int, frame: FrameType | None) -> None:
        # A signal interrupts the reactor anywhere: reload from its loop.
        self._reactor.callFromThread(self.reload)
