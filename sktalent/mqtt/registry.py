"""
Who has a session, and who is connected (who may not connect: bans.py).
"""

from __future__ import annotations

from collections.abc import Iterable

import attrs
from twisted.internet.interfaces import IReactorTime

from ..metrics import Metrics
from ..store.interfaces import DropSession, SessionRecord
from .interfaces import IAuthorizer, IConnection
from .plan import Plan
from .router import Router
from .session import Queues, Session


@attrs.define(eq=False)
class Registry:
    """
    The sessions by client id, and their connections.

    Invariants:

    - At most one session per client id.  A session is routed to exactly
      while it is registered, and leaves only by being discarded, which also
      stops anything more landing in its queue.
    - At most one connection per session: a new CONNECT takes the session
      over, and the old connection is told (take_over) and let go first, so
      its end cannot detach the new one.
    - A clean session lives as long as its connection; a persistent one until
      it is removed, replaced by a clean one, or expired as idle.
    """

    _router: Router
    _queues: Queues
    _authorizer: IAuthorizer
    _metrics: Metrics
    _clock: IReactorTime
    _sessions: dict[str, Session] = attrs.Factory(dict)

    def get(self, client_id: str) -> Session | None:
        return self._sessions.get(client_id)

    def sessions(self) -> list[Session]:
        """Every registered session, as of now."""
        return list(self._sessions.values())

    @property
    def count(self) -> int:
        return len(self._sessions)

    def oldest_queued_at(self) -> float | None:
        """
        When the oldest message still queued or in flight to any client was
        queued, in clock seconds; None when none is.  A scan of the sessions:
        for scrapes.
        """
        heads = (s.oldest_queued_at for s in self._sessions.values())
        oldest = min((at for at in heads if at is not None), default=None)
        return None if oldest is None else oldest / 1000

    def is_online(self, client_id: str) -> bool:
        session = self._sessions.get(client_id)
        return session is not None and session.connection is not None

    def restore(self, records: Iterable[SessionRecord]) -> None:
        """Register the persistent sessions the store kept."""
        for record in records:
            session = Session.restored(record, self._queues)
            self._register(session)
            session.handed_over()
        sessions = self._sessions.values()
        self._metrics.sessions.set(len(sessions))
        self._metrics.queued.set(sum(s.held for s in sessions))
        self._metrics.queued_bytes.set(sum(s.held_bytes for s in sessions))

    def ensure(self, plan: Plan, client_id: str) -> Session:
        """
        The client's session, created persistent with the default
        subscriptions when it has none.
        """
        session = self._sessions.get(client_id)
        if session is None:
            session = self._new(client_id, persistent=True)
            plan.add(session.subscription_record())
        return session

    def _new(self, client_id: str, persistent: bool) -> Session:
        session = Session(client_id, persistent, self._queues)
        session.subscriptions = dict(self._authorizer.default_subscriptions(client_id))
        self._register(session)
        self._metrics.sessions.set(len(self._sessions))
        return session

    def _register(self, session: Session) -> None:
        self._router.add(session)
        self._sessions[session.client_id] = session

    def connect(
        self, plan: Plan, client_id: str, clean: bool, connection: IConnection
    ) -> tuple[Session, bool]:
        """
        Attach connection to the client's session, taking it over from any
        other connection, with what the store must keep of it in plan; answer
        the session and whether it was present.
        """
        old = self._sessions.get(client_id)
        if old is not None and old.connection is not None:
            old.connection.take_over()
            old.connection = None
        if old is not None and (clean or not old.persistent):
            self.discard(plan, old)
            old = None
        if clean:
            session = self._new(client_id, persistent=False)
        else:
            session = self.ensure(plan, client_id)
            if not session.has_connected:
                session.has_connected = True
                plan.add(session.subscription_record())
        session.connection = connection
        session.connected_since = self._clock.seconds()
        return session, old is not None

    def disconnected(self, session: Session, connection: IConnection) -> None:
        """The connection of session went away."""
        if session.connection is not connection:
            return  # Taken over already.
        session.detach()
        if not session.persistent:
            self.discard(None, session)

    def discard(self, plan: Plan | None, session: Session) -> None:
        """
        Forget session, and with plan (if any) drop it from the store too.
        """
        self._router.forget(session)
        if self._sessions.get(session.client_id) is session:
            del self._sessions[session.client_id]
        self._metrics.sessions.set(len(self._sessions))
        session.forget()
        if session.persistent and plan is not None:
            plan.add(DropSession(session.client_id))

    # -- operators -----------------------------------------------------------

    def disconnect(self, client_id: str) -> bool:
        """See IBroker.disconnect."""
        session = self._sessions.get(client_id)
        if session is None:
            return False
        if session.connection is not None:
            session.connection.end("disconnected by an operator")
        return True

    def remove(self, plan: Plan, client_id: str) -> None:
        """See IBroker.remove."""
        plan.add(DropSession(client_id))
        session = self._sessions.get(client_id)
        if session is None:
            return
        # Detached first, so that closing the connection pushes nothing.
        connection, session.connection = session.connection, None
        self.discard(None, session)
        if connection is not None:
            connection.end("the account was deleted")
