"""
Operators' bans: a client's CONNECTs refused (CONNACK 5) until a time.

A ban is kept in the store, so that it outlives a restart, and read from it
when the client connects: memory holds none but those set by this process
that are still in force, whatever the number of bans stored.  A client
connected here needs no read: it was not banned when it connected, and a ban
set since is one of those.
"""

from __future__ import annotations

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime

from ..store.interfaces import IStore, SetBan
from .interfaces import IBroker
from .plan import Plan


@attrs.define(eq=False)
class Bans:
    _store: IStore
    _broker: IBroker
    _clock: IReactorTime
    # client id -> when its ban ends (milliseconds since the epoch), for the
    # bans set here and not ended: a CONNECT whose read of the store was
    # under way when one was set, or that takes over a connection being
    # closed for one, still finds it.
    _set_here: dict[str, int] = attrs.Factory(dict)

    def set(self, plan: Plan, client_id: str, seconds: float) -> None:
        """
        Add to plan: the client's CONNECTs are refused for seconds from now,
        replacing its ban; 0 lifts it.  In force once plan is durable.
        """
        until = self._now() + round(seconds * 1000) if seconds > 0 else None
        plan.add(SetBan(client_id, until), lambda _: self._remember(client_id, until))

    def banned(self, client_id: str) -> Deferred[bool]:
        """Whether the client's CONNECTs are refused now; fails when the store does."""
        if self._in_force_here(client_id):
            return succeed(True)
        if self._broker.is_online(client_id):
            return succeed(False)
        return Deferred.fromCoroutine(self._read(client_id))

    async def _read(self, client_id: str) -> bool:
        until = await self._store.get_ban(client_id)
        return (until is not None and until > self._now()) or self._in_force_here(client_id)

    def _remember(self, client_id: str, until: int | None) -> None:
        now = self._now()
        # Ended bans go whenever one is set, so the table stays small.
        self._set_here = {c: end for c, end in self._set_here.items() if end > now}
        if until is None:
            self._set_here.pop(client_id, None)
        else:
            self._set_here[client_id] = until

    def _in_force_here(self, client_id: str) -> bool:
        end = self._set_here.get(client_id)
        return end is not None and end > self._now()

    def _now(self) -> int:
        return int(self._clock.seconds() * 1000)
