"""
What stands in for push when no push service is configured.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs
from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer

from ..metrics import Metrics
from .interfaces import IPusher, PushNotice, Wanted


@implementer(IPusher)
@attrs.define
class DisabledPusher:
    """
    Counts each push it cannot send (the start-up log says why, once); with
    push off, each is settled at once.
    """

    _metrics: Metrics

    def push_to_users(
        self, user_ids: Sequence[str], notice: PushNotice, wanted: Wanted | None = None
    ) -> Deferred[bool]:
        self._metrics.pushes.labels("disabled").inc(len(user_ids))
        return succeed(True)

    def push_to_tag(self, tag: str, notice: PushNotice) -> None:
        self._metrics.pushes.labels("disabled").inc()

    def stop(self) -> None:
        pass
