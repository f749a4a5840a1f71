"""
Whose session is in memory, who is connected, and the order in which each
client's session is opened, closed and discarded (who may not connect:
bans.py).
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Mapping
from typing import Any, TypeVar

import attrs
from twisted.internet.defer import Deferred

from .router import Router
from .session import Session

T = TypeVar("T")


def _after(d: Deferred[None]) -> Deferred[None]:
    """A Deferred that fires when d does, and whose cancelling leaves d alone."""
    waiter: Deferred[None] = Deferred()

    def fire(result: object) -> object:
        if not waiter.called:
            waiter.callback(None)
        return result

    d.addBoth(fire)
    return waiter


@attrs.define(eq=False)
class Registry:
    """
    The sessions in memory by client id, their routes, and one queue of
    steps per client.

    Invariants:

    - A session is in memory exactly while its client is connected here
      (from the end of its opening until its connection ends), at most one
      per client id.  Everyone else's session is in the store alone.
    - At most one connection per session: a new CONNECT takes the session
      over, and the old connection is told (take_over) and let go first, so
      its end cannot detach the new one.
    - The router routes to the subscriptions of the sessions in memory and,
      when ``route_offline`` (a plain broker), to those of every stored
      persistent session too: ``_standing`` holds the latter's while they
      are not in memory, loaded once at start.
    - Steps on one client's session (open, discard) run one at a time, in
      the order they were asked for (``serial``), so a CONNECT never reads a
      session that a discard under way is still changing.
    """

    _router: Router
    route_offline: bool = True
    _sessions: dict[str, Session] = attrs.Factory(dict)
    # client id -> subscriptions of a stored persistent session not in memory.
    _standing: dict[str, dict[str, int]] = attrs.Factory(dict)
    # client id -> fires once the last step asked for on it is done.
    _serial: dict[str, Deferred[None]] = attrs.Factory(dict)

    def get(self, client_id: str) -> Session | None:
        return self._sessions.get(client_id)

    def sessions(self) -> list[Session]:
        """Every session in memory, as of now."""
        return list(self._sessions.values())

    def is_online(self, client_id: str) -> bool:
        session = self._sessions.get(client_id)
        return session is not None and session.connection is not None

    def stand(self, client_id: str, subscriptions: Mapping[str, int]) -> None:
        """Route to a stored persistent session that is not in memory (a plain broker)."""
        if self.route_offline and subscriptions:
            self._standing[client_id] = dict(subscriptions)
            self._router.add(client_id, subscriptions)

    def register(self, session: Session) -> None:
        """session is in memory now, routed to by its subscriptions."""
        standing = self._standing.pop(session.client_id, {})
        if standing != session.subscriptions:
            self._router.forget(session.client_id, standing)
            self._router.add(session.client_id, session.subscriptions)
        self._sessions[session.client_id] = session

    def unload(self, session: Session) -> None:
        """session leaves memory; a persistent one is still routed to if route_offline."""
        if self._sessions.get(session.client_id) is session:
            del self._sessions[session.client_id]
        session.leave()
        if self.route_offline and session.persistent and session.subscriptions:
            self._standing[session.client_id] = dict(session.subscriptions)
        else:
            self._router.forget(session.client_id, session.subscriptions)

    def drop_standing(self, client_id: str) -> None:
        """The stored session of client_id is gone or discarded: route nothing more to it."""
        self._router.forget(client_id, self._standing.pop(client_id, {}))

    def serial(self, client_id: str, work: Callable[[], Coroutine[Any, Any, T]]) -> Deferred[T]:
        """
        Run work once every step asked for before on client_id is done.
        Cancelling the answer cancels work, and the next step still waits
        for the steps before it.
        """
        previous = self._serial.get(client_id)
        done: Deferred[None] = Deferred()
        self._serial[client_id] = done

        def finished(result: object) -> object:
            if self._serial.get(client_id) is done:
                del self._serial[client_id]
            done.callback(None)
            return result

        async def run() -> T:
            if previous is not None:
                await _after(previous)
            return await work()

        def settle(result: object) -> object:
            if previous is None:
                finished(None)
            else:
                previous.addBoth(finished)
            return result

        return Deferred.fromCoroutine(run()).addBoth(settle)
