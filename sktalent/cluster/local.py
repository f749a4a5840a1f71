"""
The server a cluster node runs in, as ILocalNode: the broker's sessions, the
application's rate limits and the push delivery.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import attrs
from twisted.internet.defer import Deferred

from ..calltalent.app import CallTalent
from ..calltalent.delivery import PushDelivery
from ..mqtt.broker import Broker
from .carried import uncarry


@attrs.define(eq=False)
class LocalServer:
    _broker: Broker
    _app: CallTalent
    _delivery: PushDelivery

    def connected(self) -> Iterable[tuple[str, int]]:
        return [(user, int(since * 1000)) for user, since in self._broker.connected()]

    def is_connected(self, user: str) -> bool:
        return self._broker.is_online(user)

    def wake(
        self, user: str, carried: Sequence[Mapping[str, Any]] | None = None, routed: bool = False
    ) -> None:
        if carried:
            outs = [uncarry(doc) for doc in carried]
            self._broker.arrived(user, outs)
            self._delivery.woken(user, [o.seq for o in outs if o.notice is not None])
            return
        self._broker.wake(user)
        if routed:
            # What it was is not known here: whatever was queued until now.
            self._delivery.woken(user)

    def release(self, user: str) -> Deferred[None]:
        return self._broker.release(user)

    def disconnect(self, user: str) -> None:
        self._broker.disconnect(user)

    def push_unpushed(self, user: str) -> None:
        self._delivery.push_unpushed(user)

    def rate_state(self, user: str) -> str | None:
        return self._app.rate_state(user)

    def seed_rate(self, user: str, state: str) -> None:
        self._app.seed_rate(user, state)
