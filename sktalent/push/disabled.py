"""
What stands in for push when no push service is configured.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs
from twisted.logger import Logger
from zope.interface import implementer

from ..metrics import Metrics
from .interfaces import IPusher, PushNotice

log = Logger()


@implementer(IPusher)
@attrs.define
class DisabledPusher:
    """Counts each push it cannot send; says so in the log once."""

    _metrics: Metrics
    _told: bool = False

    def _skip(self, count: int) -> None:
        self._metrics.pushes.labels("disabled").inc(count)
        if not self._told:
            self._told = True
            log.warn("An offline user could not be pushed: offline push is off")

    def push_to_users(self, user_ids: Sequence[str], notice: PushNotice) -> None:
        self._skip(len(user_ids))

    def push_to_tag(self, tag: str, notice: PushNotice) -> None:
        self._skip(1)

    def stop(self) -> None:
        pass
