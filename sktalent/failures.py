"""
Errbacks that log: Deferreds nobody waits on must still report failures.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure


def logged(log: Logger, what: str, **fields: object) -> Callable[[Failure], None]:
    """An errback that logs the failure as what (a format string over fields)."""

    def errback(failure: Failure) -> None:
        log.failure(what, failure, LogLevel.critical, **fields)

    return errback


def every(
    clock: IReactorTime,
    interval: float,
    call: Callable[[], object],
    log: Logger,
    what: str,
    now: bool = True,
) -> LoopingCall:
    """
    Call now (unless not now), then every interval seconds; a loop that
    ends by failing is logged as what.  stop() it when it is running.
    """
    loop = LoopingCall(call)
    loop.clock = clock
    loop.start(interval, now=now).addErrback(logged(log, what))
    return loop


class StartFailure(Exception):
    """
    Something the operator must fix before the server can start, said in one
    line that names the option or file: logged without a traceback.
    """
