from twisted.application.service import ServiceMaker

sktalent = ServiceMaker(
    "sktalent",
    "sktalent.tap",
    "CallTalent messaging server: MQTT 3.1.1, durable chat, offline push",
    "sktalent",
)
