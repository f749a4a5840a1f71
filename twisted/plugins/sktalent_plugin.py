from twisted.application.service import ServiceMaker
from twisted.python import usage


class _SktalentMaker(ServiceMaker):
    @property
    def options(self) -> type[usage.Options]:
        # twistd asks for the options first, before importing the server:
        # from here on a SIGHUP (systemctl reload right after start) must
        # not end a server still starting.
        from sktalent.reload import hold_hangups

        hold_hangups()
        return super().options


sktalent = _SktalentMaker(
    "sktalent",
    "sktalent.tap",
    "CallTalent messaging server: MQTT 3.1.1, durable chat, offline push",
    "sktalent",
)
