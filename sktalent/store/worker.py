"""
One thread that runs a store's blocking calls in the order given, each
result handed back to the reactor thread.

Twisted's thread pool does the same through its team, its coordinator and a
logging context per call, which cost both threads more than a commit's own
Python work when commits are small (a paced chat is a commit of two or
three chats): here a call is one queue put and one callFromThread.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from queue import SimpleQueue
from typing import Any, TypeVar

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFromThreads
from twisted.python.failure import Failure

_T = TypeVar("_T")

_Call = tuple[Deferred[Any], Callable[..., Any], tuple[object, ...]]


@attrs.define(eq=False)
class Worker:
    """
    Calls run one at a time on the worker thread, in the order made; each
    call's Deferred fires on the reactor thread.  stop() runs what was called
    before it, then ends the thread and waits for it.
    """

    _reactor: IReactorFromThreads
    _name: str
    _calls: SimpleQueue[_Call | None] = attrs.Factory(SimpleQueue)
    _thread: threading.Thread | None = None

    @property
    def started(self) -> bool:
        return self._thread is not None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._work, name=self._name)
        self._thread.start()

    def stop(self) -> None:
        thread, self._thread = self._thread, None
        if thread is not None:
            self._calls.put(None)
            thread.join()

    def call(self, f: Callable[..., _T], *args: object) -> Deferred[_T]:
        """f(*args) on the worker thread; its result or failure on the reactor's."""
        done: Deferred[_T] = Deferred()
        self._calls.put((done, f, args))
        return done

    def _work(self) -> None:
        reactor = self._reactor
        while (call := self._calls.get()) is not None:
            done, f, args = call
            try:
                result = f(*args)
            except BaseException:  # noqa: BLE001 - every failure goes to the caller
                reactor.callFromThread(done.errback, Failure())
            else:
                reactor.callFromThread(done.callback, result)
