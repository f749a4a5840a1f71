"""
authSign: the HMAC-SHA256 of a userID under a shared secret, which a client
presents as its MQTT password.

    authSign = hex(HMAC-SHA256(secret, userID))
    authSign = "<exp>:" + hex(HMAC-SHA256(secret, userID + ":" + exp))

The second form is refused once the unix time exp has passed.

Run as ``python -m sktalent.authsign --secret-file F USERID [--ttl SECONDS]``
to print a valid authSign.
"""

from __future__ import annotations

import getopt
import hashlib
import hmac
import os
import secrets
import string
import sys
import time
from collections.abc import Sequence
from typing import ClassVar

from twisted.logger import Logger
from twisted.python import usage
from twisted.python.filepath import FilePath

log = Logger()

_DIGEST_LENGTH = 64
_HEX = frozenset(string.hexdigits.lower())
# Far beyond any real unix time; stops int() from parsing arbitrarily long input.
_MAX_EXP_DIGITS = 16
# Keeps the CLI's exp well within _MAX_EXP_DIGITS.
_MAX_TTL = 100 * 365 * 86400


def _digest(secret: bytes, message: str) -> str:
    return hmac.new(secret, message.encode("utf-8"), hashlib.sha256).hexdigest()


def sign(secret: bytes, user_id: str, expires: int | None = None) -> str:
    """
    The authSign of user_id; with expires (unix seconds), one refused after
    that time.
    """
    if expires is None:
        return _digest(secret, user_id)
    return f"{expires}:{_digest(secret, f'{user_id}:{expires}')}"


def verify(secret: bytes, user_id: str, auth_sign: str, now: float) -> bool:
    """
    True when auth_sign is user_id's authSign and, if it carries an expiry,
    now is not past it.  Malformed input is simply refused.
    """
    exp, separator, digest = auth_sign.rpartition(":")
    if separator:
        if not (exp.isascii() and exp.isdigit() and len(exp) <= _MAX_EXP_DIGITS):
            return False
        if now > int(exp):
            return False
        message = f"{user_id}:{exp}"
    else:
        message = user_id
    # compare_digest raises on non-ASCII str, so the shape is checked first.
    if len(digest) != _DIGEST_LENGTH or not _HEX.issuperset(digest):
        return False
    try:
        expected = _digest(secret, message)
    except UnicodeEncodeError:
        return False
    return hmac.compare_digest(digest, expected)


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
        # Imported here: the checkers module itself imports this one.
        from .calltalent.auth import valid_user_id

        if self["secret-file"] is None:
            raise usage.UsageError("--secret-file is required")
        if self["ttl"] is not None and not 0 < self["ttl"] <= _MAX_TTL:
            raise usage.UsageError(f"--ttl must be from 1 to {_MAX_TTL} seconds (100 years)")
        if not valid_user_id(self["user_id"]):
            raise usage.UsageError(f"{self['user_id']!r} is not a valid userID")


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
