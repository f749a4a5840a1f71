"""
Tests for sktalent.authsign: the authSign HMAC, the secret file and the
command line.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import stat
import subprocess
import sys
import time
import unicodedata
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase

import sktalent
from sktalent.authsign import (
    load_or_create_secret,
    read_secret,
    sign,
    valid_user_id,
    verify,
)

SECRET = b"correct horse battery staple"
EXP = 1_700_000_000


def reference(key: bytes, message: str) -> str:
    """The HMAC-SHA256 of message, computed here independently of the module."""
    return hmac.new(key, message.encode("utf-8"), hashlib.sha256).hexdigest()


def expiring_key(secret: bytes) -> bytes:
    """K, the expiring form's key, as INTERFACE section 3 defines it."""
    return hmac.new(secret, b"sktalent expiring authSign", hashlib.sha256).digest()


def expiring(secret: bytes, user_id: str, exp: int) -> str:
    """The expiring form, computed independently of the module."""
    return f"{exp}:{reference(expiring_key(secret), f'{user_id}:{exp}')}"


# Usable userIDs, ASCII-heavy so that near misses of one another come up.
user_ids = st.text(
    st.sampled_from("abc01$-_.é用") | st.characters(exclude_categories=["Cs", "Cc"]),
    min_size=1,
    max_size=128,
).filter(valid_user_id)
exps = st.integers(0, 10**16 - 1)
secrets_ = st.binary(min_size=1, max_size=64)


class ValidUserIdTests(SynchronousTestCase):
    @given(
        st.text("abcxyzSYTEM019-_.", max_size=12),
        st.sampled_from(["", "system", "SyStEm", "SYSTEM"]),
    )
    def test_ascii_reserved(self, around: str, middle: str) -> None:
        """
        An ASCII userID is refused as reserved exactly when its NFKC case
        fold is "system": the ASCII shortcut agrees with the Unicode rule.
        """
        for user_id in {around + middle, middle + around, middle} - {""}:
            folded = unicodedata.normalize("NFKC", user_id.casefold())
            self.assertEqual(valid_user_id(user_id), folded != "system", user_id)

    def test_accepted(self) -> None:
        """
        Ordinary, non-ASCII, 1- and 128-character userIDs are usable, and so
        are those that only resemble "system".
        """
        for user_id in [
            "alice",
            "5f1b2c3d4e5f60718293a4b5",
            "用户",
            "a",
            "a" * 128,
            "$x",
            "a b",
            "😀",
            "systems",
            "mysystem",
            "sys tem",
            "syst\u00e9m",
            "\ufeffalice",
        ]:
            with self.subTest(user_id=user_id):
                self.assertTrue(valid_user_id(user_id))

    def test_refused(self) -> None:
        """
        Empty, overlong, topic-splitting or ":"-holding userIDs, control
        characters (C0, DEL, C1), lone surrogates and "system" are unusable.
        """
        for user_id in [
            "",
            "a" * 129,
            "a/b",
            "/",
            "a+",
            "#",
            "alice:4102444800",
            ":",
            "a\0b",
            "a\nb",
            "\x1f",
            "\x7f",
            "a\x85",
            "\x9f",
            "\udc80",
            "a\ud800b",
            "system",
        ]:
            with self.subTest(user_id=user_id):
                self.assertFalse(valid_user_id(user_id))

    def test_reserved_lookalikes(self) -> None:
        """
        A userID that reads as "system" once case, compatibility forms
        (fullwidth, the long s) and invisible characters are set aside is
        reserved too.
        """
        for user_id in [
            "System",
            "SYSTEM",
            "\uff53\uff59\uff53\uff54\uff45\uff4d",
            "system\u200b",
            "\ufeffsystem",
            "sy\u00adstem",
            "s\u034fystem",
            "\u017fystem",
            "system\U000e0041",
            "\u2060S\u200dYSTEM\ufe0f",
        ]:
            with self.subTest(user_id=user_id):
                self.assertFalse(valid_user_id(user_id))

    @given(
        st.sampled_from(["s", "S", "\uff53", "\uff33", "\u017f"]),
        st.lists(st.sampled_from(["\u200b", "\u200d", "\u2060", "\ufeff", "\u00ad"])),
        st.randoms(use_true_random=False),
    )
    def test_reserved_in_any_guise(self, first: str, invisible: list[str], rng: Any) -> None:
        """
        "system" with each letter in either case or fullwidth and invisible
        characters anywhere is never a usable userID.
        """
        letters = [first] + [
            rng.choice([c, c.upper(), chr(ord(c) - ord("a") + 0xFF41)]) for c in "ystem"
        ]
        for mark in invisible:
            letters.insert(rng.randrange(len(letters) + 1), mark)
        self.assertFalse(valid_user_id("".join(letters)))


class SignTests(SynchronousTestCase):
    def test_plain(self) -> None:
        """
        Without an expiry the sign is the lowercase hex HMAC-SHA256 of the
        userID under the secret.
        """
        expected = reference(SECRET, "alice")
        self.assertEqual(sign(SECRET, "alice"), expected)
        self.assertEqual(len(expected), 64)

    def test_expiring(self) -> None:
        """
        With an expiry the sign is "<exp>:" and the HMAC of "userID:exp"
        under K = HMAC-SHA256(secret, "sktalent expiring authSign").
        """
        self.assertEqual(sign(SECRET, "alice", EXP), expiring(SECRET, "alice", EXP))
        self.assertNotEqual(
            sign(SECRET, "alice", EXP), f"{EXP}:{reference(SECRET, f'alice:{EXP}')}"
        )

    def test_utf8_user_id(self) -> None:
        """
        A userID outside ASCII is signed as its UTF-8 bytes.
        """
        self.assertEqual(sign(SECRET, "用户"), reference(SECRET, "用户"))

    def test_unusable_user_id(self) -> None:
        """
        No sign, of either form, is made for an unusable userID: a
        ValueError says why.
        """
        for user_id in ["system", "alice:4102444800", "a/b", "", "\udc80"]:
            for expires in (None, EXP):
                with self.subTest(user_id=user_id, expires=expires):
                    e = self.assertRaises(ValueError, sign, SECRET, user_id, expires)
                    self.assertIn("not a usable userID", str(e))

    def test_negative_expiry(self) -> None:
        """
        An expiry before the epoch is no unix time: refused.
        """
        self.assertRaises(ValueError, sign, SECRET, "alice", -1)


class VerifyTests(SynchronousTestCase):
    def test_plain_accepted(self) -> None:
        """
        A sign without expiry is accepted at any time.
        """
        auth_sign = reference(SECRET, "alice")
        self.assertTrue(verify(SECRET, "alice", auth_sign, now=0))
        self.assertTrue(verify(SECRET, "alice", auth_sign, now=4e9))

    def test_expiry_boundary(self) -> None:
        """
        An expiring sign is accepted until and including its exp second and
        refused as soon as that second has passed.
        """
        auth_sign = expiring(SECRET, "alice", EXP)
        self.assertTrue(verify(SECRET, "alice", auth_sign, now=EXP - 1000))
        self.assertTrue(verify(SECRET, "alice", auth_sign, now=EXP))
        self.assertFalse(verify(SECRET, "alice", auth_sign, now=EXP + 0.001))
        self.assertFalse(verify(SECRET, "alice", auth_sign, now=EXP + 1))

    def test_tampered(self) -> None:
        """
        A sign for another user, under another secret, with one digit
        changed, or with its expiry moved is refused.
        """
        plain = reference(SECRET, "alice")
        flipped = ("0" if plain[0] != "0" else "1") + plain[1:]
        digest = expiring(SECRET, "alice", EXP).partition(":")[2]
        for user_id, auth_sign in [
            ("bob", plain),
            ("alice", reference(b"other secret", "alice")),
            ("alice", flipped),
            ("alice", f"{EXP + 1000}:{digest}"),
            # A plain sign does not become valid with an expiry prefixed.
            ("alice", f"{EXP}:{plain}"),
            # Nor an expiring digest without its expiry.
            ("alice", digest),
        ]:
            with self.subTest(user_id=user_id, auth_sign=auth_sign):
                self.assertFalse(verify(SECRET, user_id, auth_sign, now=EXP))

    def test_forms_not_swappable(self) -> None:
        """
        The plain sign of the userID "alice:4102444800", which the old
        scheme made alice's sign expiring then, is not alice's; nor is
        alice's expiring digest the plain sign of "alice:4102444800", which
        is no usable userID anyway.
        """
        exp = 4102444800
        swapped = f"{exp}:{reference(SECRET, f'alice:{exp}')}"
        self.assertFalse(verify(SECRET, "alice", swapped, now=0))
        digest = sign(SECRET, "alice", exp).partition(":")[2]
        self.assertFalse(verify(SECRET, f"alice:{exp}", digest, now=0))
        self.assertFalse(verify(SECRET, f"alice:{exp}", reference(SECRET, f"alice:{exp}"), 0))

    def test_reserved_user_id(self) -> None:
        """
        Even a correct HMAC for "system" is refused: no client may be it.
        """
        self.assertFalse(verify(SECRET, "system", reference(SECRET, "system"), now=0))
        self.assertFalse(verify(SECRET, "system", expiring(SECRET, "system", EXP), now=0))

    def test_malformed(self) -> None:
        """
        Malformed signs are refused without raising.
        """
        digest = expiring(SECRET, "alice", EXP).partition(":")[2]
        plain = reference(SECRET, "alice")
        for auth_sign in [
            "",
            ":",
            plain[:-1],
            plain + "0",
            plain.upper(),
            "g" * 64,
            "é" * 64,
            f":{digest}",
            f"x{EXP}:{digest}",
            f"-{EXP}:{digest}",
            f"+{EXP}:{digest}",
            f" {EXP}:{digest}",
            f"{EXP}.5:{digest}",
            # Arabic-Indic digits pass str.isdigit but are no unix time.
            f"١٧٠٠٠٠٠٠٠٠:{digest}",
            "9" * 5000 + f":{digest}",
            f"{EXP}:{digest}:",
        ]:
            with self.subTest(auth_sign=auth_sign[:80]):
                self.assertFalse(verify(SECRET, "alice", auth_sign, now=0))

    def test_unencodable_user_id(self) -> None:
        """
        A userID that has no UTF-8 form (a lone surrogate) is refused
        without raising.
        """
        self.assertFalse(verify(SECRET, "\udc80", "0" * 64, now=0))

    @given(secrets_, user_ids, st.none() | exps)
    def test_round_trip(self, secret: bytes, user_id: str, expires: int | None) -> None:
        """
        Every sign made is verified before its expiry.
        """
        self.assertTrue(verify(secret, user_id, sign(secret, user_id, expires), 0))

    @given(st.text(), st.text(), st.floats(allow_nan=False))
    def test_never_raises(self, user_id: str, auth_sign: str, now: float) -> None:
        """
        verify answers a bool for any text, and a random text is refused.
        """
        self.assertFalse(verify(SECRET, user_id, auth_sign, now))


class NoCrossingTests(SynchronousTestCase):
    """
    Property tests: a sign is good for the one userID and the one form it was
    made for.
    """

    @given(secrets_, user_ids, user_ids, exps, exps)
    def test_not_for_another_user(
        self, secret: bytes, user_id: str, other: str, exp: int, other_exp: int
    ) -> None:
        """
        No sign minted for one userID, in either form, is accepted for
        another userID, whatever the expiry it is presented with.
        """
        if user_id == other:
            other = user_id + "x" if len(user_id) < 128 else user_id[:-1]
        plain, timed = sign(secret, user_id), sign(secret, user_id, exp)
        digest = timed.partition(":")[2]
        for auth_sign in [plain, timed, f"{other_exp}:{digest}", f"{other_exp}:{plain}", digest]:
            self.assertFalse(verify(secret, other, auth_sign, now=0), auth_sign)

    @given(secrets_, user_ids, exps, st.text(max_size=140))
    def test_not_in_the_other_form(
        self, secret: bytes, user_id: str, exp: int, message: str
    ) -> None:
        """
        No plain sign, of any text, is an expiring sign: in particular not
        that of "userID:exp", the old scheme's expiring message.  And no
        expiring sign's digest is a plain sign, for the same userID or any.
        """
        for signed in (message, f"{user_id}:{exp}"):
            forged = f"{exp}:{reference(secret, signed)}"
            self.assertFalse(verify(secret, user_id, forged, now=0), signed)
        digest = sign(secret, user_id, exp).partition(":")[2]
        self.assertFalse(verify(secret, user_id, digest, now=0))
        if valid_user_id(message):
            self.assertFalse(verify(secret, message, digest, now=0))


class SecretFileTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = FilePath(self.mktemp())
        self.dir.makedirs()
        self.path = self.dir.child("sktalent.secret")

    def test_created_private_and_random(self) -> None:
        """
        A missing secret file is created with mode 0600 holding 64 random hex
        digits and a newline; the secret is the digits.
        """
        secret = load_or_create_secret(self.path)
        self.assertEqual(stat.S_IMODE(os.stat(self.path.path).st_mode), 0o600)
        content = self.path.getContent()
        self.assertEqual(content, secret + b"\n")
        self.assertRegex(secret.decode("ascii"), r"\A[0-9a-f]{64}\Z")
        other = self.dir.child("other.secret")
        self.assertNotEqual(load_or_create_secret(other.path), secret)

    def test_created_despite_permissive_umask(self) -> None:
        """
        The mode is 0600 even when the umask would allow more.
        """
        previous = os.umask(0)
        self.addCleanup(os.umask, previous)
        load_or_create_secret(self.path.path)
        self.assertEqual(stat.S_IMODE(os.stat(self.path.path).st_mode), 0o600)

    def test_reused(self) -> None:
        """
        An existing secret is read back unchanged, from a FilePath or a str.
        """
        first = load_or_create_secret(self.path)
        self.assertEqual(load_or_create_secret(self.path.path), first)
        self.assertEqual(self.path.getContent(), first + b"\n")

    def test_one_trailing_newline_stripped(self) -> None:
        """
        Exactly one trailing LF or CRLF is left out of the secret.
        """
        for content, secret in [
            (b"s3cret", b"s3cret"),
            (b"s3cret\n", b"s3cret"),
            (b"s3cret\r\n", b"s3cret"),
            (b"s3cret\n\n", b"s3cret\n"),
            (b" s3cret \r", b" s3cret \r"),
        ]:
            with self.subTest(content=content):
                self.path.setContent(content)
                self.assertEqual(load_or_create_secret(self.path), secret)
                self.assertEqual(read_secret(self.path), secret)

    def test_empty(self) -> None:
        """
        An empty secret is refused with a message naming the file.
        """
        for content in [b"", b"\n", b"\r\n"]:
            with self.subTest(content=content):
                self.path.setContent(content)
                e = self.assertRaises(ValueError, load_or_create_secret, self.path)
                self.assertIn(self.path.path, str(e))
                self.assertIn("empty", str(e))

    def test_unreadable(self) -> None:
        """
        A path that cannot be read as a file is refused with a ValueError.
        """
        self.path.makedirs()
        e = self.assertRaises(ValueError, load_or_create_secret, self.path)
        self.assertIn(f"cannot read the auth secret file {self.path.path}", str(e))

    def test_uncreatable(self) -> None:
        """
        A missing file that cannot be created is refused with a ValueError.
        """
        path = self.dir.child("missing").child("sktalent.secret")
        e = self.assertRaises(ValueError, load_or_create_secret, path)
        self.assertIn(f"cannot create the auth secret file {path.path}", str(e))
        self.assertFalse(path.exists())

    def test_read_secret_never_creates(self) -> None:
        """
        read_secret refuses a missing file and leaves it missing.
        """
        e = self.assertRaises(ValueError, read_secret, self.path)
        self.assertIn("No such file", str(e))
        self.assertFalse(self.path.exists())


class CommandLineTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.secret_file = FilePath(self.mktemp())
        self.secret_file.setContent(SECRET + b"\n")

    def run_cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run python -m sktalent.authsign with args, this checkout first on the path."""
        root = os.path.dirname(os.path.dirname(os.path.abspath(sktalent.__file__)))
        env = dict(os.environ, PYTHONPATH=root)
        return subprocess.run(
            [sys.executable, "-m", "sktalent.authsign", *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )

    def test_plain(self) -> None:
        """
        The command prints the userID's plain authSign and exits 0.
        """
        done = self.run_cli("--secret-file", self.secret_file.path, "alice")
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertEqual(done.stdout, reference(SECRET, "alice") + "\n")

    def test_ttl(self) -> None:
        """
        With --ttl (after the userID, as documented) the sign expires ttl
        seconds from now.
        """
        before = int(time.time())
        done = self.run_cli("--secret-file", self.secret_file.path, "alice", "--ttl", "600")
        after = int(time.time())
        self.assertEqual(done.returncode, 0, done.stderr)
        exp_text, _, digest = done.stdout.strip().partition(":")
        exp = int(exp_text)
        self.assertGreaterEqual(exp, before + 600)
        self.assertLessEqual(exp, after + 600)
        self.assertEqual(f"{exp}:{digest}", expiring(SECRET, "alice", exp))

    def test_missing_secret_file(self) -> None:
        """
        A missing secret file is an error, exit status 1, and is not created.
        """
        missing = FilePath(self.mktemp())
        done = self.run_cli("--secret-file", missing.path, "alice")
        self.assertEqual(done.returncode, 1)
        self.assertEqual(done.stdout, "")
        self.assertIn(missing.path, done.stderr)
        self.assertFalse(missing.exists())

    def test_bad_arguments(self) -> None:
        """
        Bad arguments print the usage and an error and exit with status 2.
        """
        secret = self.secret_file.path
        for args, message in [
            ((), "Wrong number of arguments"),
            (("alice",), "--secret-file is required"),
            (("--secret-file", secret), "Wrong number of arguments"),
            (("--secret-file", secret, "alice", "bob"), "Wrong number of arguments"),
            (("--secret-file", secret, "alice", "--ttl", "soon"), "ttl"),
            (("--secret-file", secret, "alice", "--ttl", "0"), "--ttl must be from 1"),
            (("--secret-file", secret, "alice", "--ttl", "9" * 20), "--ttl must be from 1"),
            (("--secret-file", secret, "alice", "--bogus"), "--bogus"),
            (("--secret-file", secret, "a/b"), "'a/b' is not a usable userID"),
            (("--secret-file", secret, "system"), "'system' is not a usable userID"),
            (("--secret-file", secret, "System"), "'System' is not a usable userID"),
            (("--secret-file", secret, "system\u200b"), "is not a usable userID"),
            (("--secret-file", secret, "alice:4102444800"), "not a usable userID"),
            (("--secret-file", secret, "a\tb", "--ttl", "60"), "not a usable userID"),
            (("--secret-file", secret, "x" * 129), "not a usable userID"),
        ]:
            with self.subTest(args=args):
                done = self.run_cli(*args)
                self.assertEqual(done.returncode, 2)
                self.assertEqual(done.stdout, "")
                self.assertIn("Usage: python -m sktalent.authsign", done.stderr)
                self.assertIn(message, done.stderr)


DOCS = FilePath(os.path.abspath(sktalent.__file__)).parent().parent().child("docs")


def fenced(markdown: str, language: str) -> list[str]:
    """The bodies of markdown's fenced code blocks in language."""
    return re.findall(rf"^```{language}\n(.*?)^```$", markdown, re.MULTILINE | re.DOTALL)


class DocumentationTests(SynchronousTestCase):
    """
    docs/authsign.md is what the login service builds from: its examples and
    its code are recomputed here, so that the page cannot drift from the
    server.
    """

    def setUp(self) -> None:
        self.page = DOCS.child("authsign.md").getContent().decode("utf-8")
        self.examples = [
            dict(re.findall(r"^(\w+) += (\S+)$", block, re.MULTILINE))
            for block in fenced(self.page, "text")
        ]

    def test_worked_examples(self) -> None:
        """
        Each worked example's sign is the server's for its secret, userID and
        exp, and so is K; there is one of each form.
        """
        forms = set()
        for example in self.examples:
            with self.subTest(example=example):
                secret, user_id = example["secret"].encode(), example["userID"]
                exp = int(example["exp"]) if "exp" in example else None
                self.assertEqual(example["authSign"], sign(secret, user_id, exp))
                self.assertTrue(verify(secret, user_id, example["authSign"], now=0))
                if exp is None:
                    self.assertEqual(example["authSign"], reference(secret, user_id))
                else:
                    self.assertEqual(example["authSign"], expiring(secret, user_id, exp))
                if "K" in example:
                    self.assertEqual(example["K"], expiring_key(secret).hex())
                forms.add(exp is None)
        self.assertEqual(forms, {True, False})

    def test_python_recipe(self) -> None:
        """
        The page's Python code computes every worked example's sign.
        """
        [code] = fenced(self.page, "python")
        namespace: dict[str, Any] = {}
        exec(code, namespace)
        for example in self.examples:
            exp = int(example["exp"]) if "exp" in example else None
            computed = namespace["auth_sign"](example["secret"].encode(), example["userID"], exp)
            self.assertEqual(computed, example["authSign"])

    def test_reserved_examples(self) -> None:
        """
        The userIDs the page gives as reserved are refused, those it gives as
        not reserved are usable (with their invisible characters as named).
        """
        section = self.page.split("## userID", 1)[1].split("\n## ", 1)[0]
        reserved, _, rest = " ".join(section.split()).partition(" are all reserved;")
        usable = rest.partition(" are not.")[0]
        reserved = reserved.rpartition(". ")[2]
        found = 0
        for text, expected in ((reserved, False), (usable, True)):
            for user_id in re.findall(r"`([^`]+)`", text):
                self.assertEqual(valid_user_id(user_id), expected, user_id)
                found += 1
        self.assertGreaterEqual(found, 7)
        for name, character in [("zero-width space (U+200B)", "\u200b"), ("(U+00AD)", "\u00ad")]:
            self.assertIn(name, reserved)
            self.assertFalse(valid_user_id("sys" + character + "tem"))

    def test_secret_is_the_text(self) -> None:
        """
        A secret file holding the example's hex digits and a newline gives
        those digits as the secret, not the bytes they would decode to.
        """
        path = FilePath(self.mktemp())
        text = self.examples[0]["secret"]
        path.setContent(text.encode("ascii") + b"\n")
        self.assertEqual(read_secret(path), text.encode("ascii"))

    def test_linked(self) -> None:
        """
        The README and the app developers' guide link to the page.
        """
        readme = DOCS.parent().child("README.md").getContent().decode("utf-8")
        self.assertTrue("(docs/authsign.md)" in readme, "README.md has no link")
        protocol = DOCS.child("protocol.md").getContent().decode("utf-8")
        self.assertTrue("(authsign.md)" in protocol, "docs/protocol.md has no link")
