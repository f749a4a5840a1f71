"""
The ``--umeng-config`` file: which Umeng apps to push through, and how
patiently.
"""

from __future__ import annotations

from collections.abc import Mapping

import attrs

from ..jsonfile import load_json_file

UMENG_ENDPOINT = "https://msgapi.umeng.com/api/send"


@attrs.frozen
class UmengApp:
    """One Umeng app: the iOS or the Android build of the client."""

    platform: str  # "ios" or "android"
    appkey: str
    app_master_secret: str
    # Android only: the activity a notification opens (seed 6.2, go_activity).
    activity: str | None = None


@attrs.frozen
class DeliveryPolicy:
    """How pushes wait, and how hard they are retried."""

    queue_size: int = 10_000
    concurrency: int = 4
    max_attempts: int = 6
    # Seconds: full jitter over min(backoff_cap, backoff_base * 2 ** (n - 1)).
    backoff_base: float = 1.0
    backoff_cap: float = 60.0
    timeout: float = 10.0


@attrs.frozen
class UmengConfig:
    ios: UmengApp
    android: UmengApp
    endpoint: str = UMENG_ENDPOINT
    production_mode: bool = True
    alias_type: str = "calltalent"
    delivery: DeliveryPolicy = DeliveryPolicy()

    @property
    def apps(self) -> tuple[UmengApp, UmengApp]:
        return (self.ios, self.android)


_TOP_KEYS = {"endpoint", "production_mode", "alias_type", "ios", "android", "delivery"}
_POLICY_KEYS = {f.name for f in attrs.fields(DeliveryPolicy)}


def load_config(path: str) -> UmengConfig:
    """
    Read and check the JSON file at path; any problem is a ValueError whose
    message is one sentence naming it.
    """
    return load_json_file(path, "Umeng config", parse_config)


def parse_config(data: object) -> UmengConfig:
    """Check a decoded config; ValueError names the first wrong field."""
    top = _object(data, "the top level")
    _no_unknown(top, _TOP_KEYS, "")
    endpoint = _text(top, "endpoint", UMENG_ENDPOINT)
    if not endpoint.startswith(("https://", "http://")):
        raise ValueError("endpoint must be an http:// or https:// URL.")
    return UmengConfig(
        ios=_app(top, "ios"),
        android=_app(top, "android"),
        endpoint=endpoint,
        production_mode=_flag(top, "production_mode", True),
        alias_type=_text(top, "alias_type", "calltalent"),
        delivery=_policy(top.get("delivery", {})),
    )


def _object(value: object, where: str) -> Mapping[str, object]:
    if isinstance(value, dict):
        return value
    raise ValueError(f"{where} must be a JSON object.")


def _flag(obj: Mapping[str, object], key: str, default: bool) -> bool:
    value = obj.get(key, default)
    if isinstance(value, bool):
        return value
    raise ValueError(f"{key} must be true or false.")


def _no_unknown(obj: Mapping[str, object], known: set[str], prefix: str) -> None:
    unknown = sorted(set(obj) - known)
    if unknown:
        raise ValueError(f"unknown field {prefix}{unknown[0]}.")


def _text(obj: Mapping[str, object], key: str, default: str | None, prefix: str = "") -> str:
    value = obj.get(key, default)
    if not isinstance(value, str) or not value:
        raise ValueError(f"{prefix}{key} must be a non-empty string.")
    return value


def _app(top: Mapping[str, object], platform: str) -> UmengApp:
    if platform not in top:
        raise ValueError(f"{platform} is missing.")
    app = _object(top[platform], platform)
    prefix = f"{platform}."
    known = {"appkey", "app_master_secret"}
    if platform == "android":
        known.add("activity")
    _no_unknown(app, known, prefix)
    return UmengApp(
        platform=platform,
        appkey=_text(app, "appkey", None, prefix),
        app_master_secret=_text(app, "app_master_secret", None, prefix),
        activity=_text(app, "activity", None, prefix) if platform == "android" else None,
    )


def _policy(value: object) -> DeliveryPolicy:
    given = _object(value, "delivery")
    _no_unknown(given, _POLICY_KEYS, "delivery.")
    d = DeliveryPolicy()
    policy = DeliveryPolicy(
        queue_size=int(_positive(given, "queue_size", d.queue_size, whole=True)),
        concurrency=int(_positive(given, "concurrency", d.concurrency, whole=True)),
        max_attempts=int(_positive(given, "max_attempts", d.max_attempts, whole=True)),
        backoff_base=_positive(given, "backoff_base", d.backoff_base),
        backoff_cap=_positive(given, "backoff_cap", d.backoff_cap),
        timeout=_positive(given, "timeout", d.timeout),
    )
    if policy.backoff_cap < policy.backoff_base:
        raise ValueError("delivery.backoff_cap must not be below delivery.backoff_base.")
    return policy


def _positive(obj: Mapping[str, object], key: str, default: float, whole: bool = False) -> float:
    value = obj.get(key, default)
    # bool is an int to Python, never a sensible count or duration here.
    if (
        isinstance(value, bool)
        or not isinstance(value, int if whole else (int, float))
        or value <= 0
    ):
        kind = "a positive whole number" if whole else "a positive number"
        raise ValueError(f"delivery.{key} must be {kind}.")
    return value
