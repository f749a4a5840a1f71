"""
authSign: the HMAC-SHA256 of a userID under a shared secret, which a client
presents as its MQTT password.

    authSign = hex(HMAC-SHA256(secret, userID))
    authSign = "<exp>:" + hex(HMAC-SHA256(K, userID + ":" + exp))
        where K = HMAC-SHA256(secret, "sktalent expiring authSign")

The second form is refused once the unix time exp has passed.  Each form has
a key of its own, so that no sign of one form is valid in the other.  The
exact format, with worked examples, is in docs/authsign.md.

Run as ``python -m sktalent.authsign --secret-file F USERID [--ttl SECONDS]``
to print a valid authSign.
"""

from __future__ import annotations

import getopt
import hashlib
import hmac
import os
import re
import secrets
import string
import sys
import time
import unicodedata
from collections.abc import Sequence
from typing import ClassVar

from twisted.logger import Logger
from twisted.python import usage
from twisted.python.filepath import FilePath

log = Logger()

MAX_USER_ID_LENGTH = 128
# The sender of notifications: no client may be it.
RESERVED_USER_ID = "system"
# A userID becomes a topic level, so none of what splits or matches topic
# levels; no ":", which separates an expiring sign's parts; no control
# character (C0, DEL, C1) and no lone surrogate, which UTF-8 cannot carry.
_USABLE_USER_ID = re.compile(rf"[^/+#:\x00-\x1f\x7f-\x9f\ud800-\udfff]{{1,{MAX_USER_ID_LENGTH}}}")
USER_ID_RULE = (
    f"1 to {MAX_USER_ID_LENGTH} characters, none of them '/', '+', '#', ':',"
    f" a control character or a lone surrogate, and not {RESERVED_USER_ID!r}"
    " in any case, width or with invisible characters"
)
# Unicode's Default_Ignorable_Code_Point characters (DerivedCoreProperties):
# invisible, so that "system\u200b" would look like "system".
_IGNORABLE = re.compile(
    "[\u00ad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180b-\u180f\u200b-\u200f"
    "\u202a-\u202e\u2060-\u206f\u3164\ufe00-\ufe0f\ufeff\uffa0\ufff0-\ufff8"
    "\U0001bca0-\U0001bca3\U0001d173-\U0001d17a\U000e0000-\U000e0fff]"
)

_DIGEST_LENGTH = 64
_HEX = frozenset(string.hexdigits.lower())
# Far beyond any real unix time; stops int() from parsing arbitrarily long input.
_MAX_EXP_DIGITS = 16
# Keeps the CLI's exp well within _MAX_EXP_DIGITS.
_MAX_TTL = 100 * 365 * 86400
# Derives the expiring form's key from the secret.
_EXPIRING_KEY_LABEL = b"sktalent expiring authSign"


def _looks_reserved(user_id: str) -> bool:
    """
    Whether user_id reads as the reserved userID: the same once compatibility
    forms (fullwidth letters), case and invisible (format and default
    ignorable) characters are set aside.
    """
    if user_id.isascii():
        # NFKC keeps ASCII as it is, and it holds nothing invisible.
        return user_id.lower() == RESERVED_USER_ID
    folded = unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", user_id).casefold())
    visible = "".join(
        c for c in folded if unicodedata.category(c) != "Cf" and not _IGNORABLE.match(c)
    )
    return visible == RESERVED_USER_ID


def valid_user_id(user_id: str) -> bool:
    """True when user_id can name a client (INTERFACE section 2)."""
    return _USABLE_USER_ID.fullmatch(user_id) is not None and not _looks_reserved(user_id)


def _digest(key: bytes, message: str) -> str:
    return hmac.new(key, message.encode("utf-8"), hashlib.sha256).hexdigest()


def _expiring_key(secret: bytes) -> bytes:
    return hmac.new(secret, _EXPIRING_KEY_LABEL, hashlib.sha256).digest()


def sign(secret: bytes, user_id: str, expires: int | None = None) -> str:
    """
    The authSign of user_id; with expires (unix seconds), one refused after
    that time.

    @raise ValueError: user_id is not a usable userID.
    """
    if not valid_user_id(user_id):
        raise ValueError(f"{user_id!r} is not a usable userID: {USER_ID_RULE}")
    if expires is None:
        return _digest(secret, user_id)
    if expires < 0:
        raise ValueError(f"the expiry must be a unix time, not {expires}")
    return f"{expires}:{_digest(_expiring_key(secret), f'{user_id}:{expires}')}"


def verify(secret: bytes, user_id: str, auth_sign: str, now: float) -> bool:
    """
    True when auth_sign is user_id's authSign and, if it carries an expiry,
    now is not past it.  Malformed input, and any sign for an unusable
    userID, is simply refused.
    """
    if not valid_user_id(user_id):
        return False
    exp, separator, digest = auth_sign.rpartition(":")
    if separator:
        if not (exp.isascii() and exp.isdigit() and len(exp) <= _MAX_EXP_DIGITS):
            return False
        if now > int(exp):
            return False
        key, message = _expiring_key(secret), f"{user_id}:{exp}"
    else:
        key, message = secret, user_id
    # compare_digest raises on non-ASCII str, so the shape is checked first.
    if len(digest) != _DIGEST_LENGTH or not _HEX.issuperset(digest):
        return False
    return hmac.compare_digest(digest, _digest(key, message))


def _as_filepath(path: FilePath[str] | str) -> FilePath[str]:
    return path if isinstance(path, FilePath) else FilePath(path)


def read_secret(path: FilePath[str] | str) -> bytes:
    """
    The secret held in the file at path, without its trailing newline.

    @raise ValueError: the file cannot be read or holds no secret.
    """
    fp = _as_filepath(path)
    try:
        content = fp.getContent()
    except OSError as e:
        raise ValueError(f"cannot read the auth secret file {fp.path}: {e.strerror}") from e
    for newline in (b"\r\n", b"\n"):
        if content.endswith(newline):
            content = content[: -len(newline)]
            break
    if not content:
        raise ValueError(f"the auth secret file {fp.path} is empty")
    return content


def load_or_create_secret(path: FilePath[str] | str) -> bytes:
    """
    The secret in the file at path; a missing file is first created, readable
    by its owner only, with a fresh random secret.

    @raise ValueError: the file cannot be created or read, or is empty.
    """
    fp = _as_filepath(path)
    try:
        # O_EXCL: two servers starting at once never overwrite each other's secret.
        fd = os.open(fp.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    except OSError as e:
        raise ValueError(f"cannot create the auth secret file {fp.path}: {e.strerror}") from e
    else:
        try:
            with os.fdopen(fd, "w", encoding="ascii") as f:
                # 0600 whatever the umask, which may have taken the owner's bits.
                os.fchmod(f.fileno(), 0o600)
                f.write(secrets.token_hex(32) + "\n")
        except OSError as e:
            # A half-written secret would be reused silently on the next start.
            fp.remove()
            raise ValueError(f"cannot write the auth secret file {fp.path}: {e.strerror}") from e
        log.info("Created a new authSign secret in {path}", path=os.path.abspath(fp.path))
    return read_secret(fp)


class Options(usage.Options):
    synopsis = "Usage: python -m sktalent.authsign --secret-file FILE USERID [--ttl SECONDS]"
    longdesc = "Print the authSign a client presents as its MQTT password."

    optParameters: ClassVar[list[list[object]]] = [
        ["secret-file", None, None, "The file holding the shared secret (required)."],
        ["ttl", None, None, "Seconds the sign stays valid (default: forever).", int],
    ]

    def parseOptions(self, options: Sequence[str] | None = None) -> None:
        # getopt stops at the first argument, but --ttl comes after USERID:
        # gnu_getopt puts the options first, then usage parses as ever.
        argv = sys.argv[1:] if options is None else list(options)
        try:
            opts, args = getopt.gnu_getopt(argv, self.shortOpt, self.longOpt)
        except getopt.GetoptError as e:
            raise usage.UsageError(str(e)) from e
        ordered = [
            f"{name}={value}" if f"{name[2:]}=" in self.longOpt else name for name, value in opts
        ]
        super().parseOptions([*ordered, "--", *args])

    def parseArgs(self, user_id: str) -> None:  # type: ignore[override]
        self["user_id"] = user_id

    def postOptions(self) -> None:
        if self["secret-file"] is None:
            raise usage.UsageError("--secret-file is required")
        if self["ttl"] is not None and not 0 < self["ttl"] <= _MAX_TTL:
            raise usage.UsageError(f"--ttl must be from 1 to {_MAX_TTL} seconds (100 years)")
        if not valid_user_id(self["user_id"]):
            raise usage.UsageError(f"{self['user_id']!r} is not a usable userID: {USER_ID_RULE}")


def main(argv: Sequence[str], now: float) -> int:
    """
    Print the authSign the command line asks for; the exit status: 0, 1 for a
    secret that cannot be read, 2 for bad arguments.
    """
    options = Options()
    try:
        options.parseOptions(list(argv))
    except usage.UsageError as e:
        print(f"{options}\nerror: {e}", file=sys.stderr)
        return 2
    try:
        secret = read_secret(options["secret-file"])
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    ttl = options["ttl"]
    expires = None if ttl is None else int(now) + ttl
    print(sign(secret, options["user_id"], expires))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], time.time()))
