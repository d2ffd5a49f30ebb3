"""Credentials never leave the process, and names from the store print as text: what goes out is made safe here.

Every URI, command line, error text or traceback that is printed, logged to MLflow (``environment.json``,
``study.json``, ``ensemble.json``, tags, ``failure_reason``), written into a report or answered by the
explorer goes through ``redact``. It finds passwords by parsing URLs (the user info of
``scheme://user:password@host``, whatever characters the password holds, and secret query parameters such
as ``password=`` or ``sslpassword=``) and also hides every secret ``remember_secrets`` was shown, wherever it
appears (an error message quoting a password on its own). Names read from the store (arm tags, labels) go
through ``printable`` before they reach a terminal.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import parse_qsl, quote, unquote, urlsplit

MASK = "***"
# Query parameters whose value is a credential (SQLAlchemy/libpq, MLflow, cloud URLs); also any name ending so.
SECRET_PARAMETERS = frozenset({"password", "passwd", "pwd", "pass", "sslpassword", "token", "access_token",
                               "refresh_token", "id_token", "auth_token", "api_key", "apikey", "secret",
                               "client_secret", "sig", "signature", "x-amz-signature", "x-amz-security-token"})
_SECRET_SUFFIXES = ("password", "passwd", "secret", "token")
MIN_REMEMBERED_LENGTH = 4  # shorter secrets are masked inside URLs only (masking "ab" everywhere would garble text)

_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://")
_QUERY = re.compile(r"(?P<head>[?&;](?P<name>[A-Za-z0-9_.\-]+)=)(?P<value>[^&#\s'\"<>]*)")
_remembered: set[str] = set()


def is_secret_parameter(name: str) -> bool:
    name = name.lower()
    return name in SECRET_PARAMETERS or name.endswith(_SECRET_SUFFIXES)


def _mask_user_info(text: str) -> str:
    """Each ``scheme://user:password@`` with the password masked; the password may hold any character.

    Parsers disagree on where a password ends: ``urllib`` (requests, MLflow) takes the last ``@`` before the
    first ``/``, ``?`` or ``#``, SQLAlchemy the first ``@`` after the colon. The later of the two is masked up
    to, so ``'``, ``"``, spaces, ``/`` and ``@`` in a password are covered whichever library read it. Text
    after a URL may then be masked too: more than the password, never less.
    """
    pieces, position = [], 0
    for match in _SCHEME.finditer(text):
        start = match.end()
        if start < position:
            continue
        line_end = text.find("\n", start)
        line_end = len(text) if line_end == -1 else line_end
        following = _SCHEME.search(text, start, line_end)
        if following is not None:
            line_end = following.start()
        colon = text.find(":", start, line_end)
        if colon == -1 or any(c in "/@?#" or c.isspace() for c in text[start:colon]):
            continue  # no user:password here (a URL without user info, or a host:port)
        authority_end = min([line_end] + [i for i in (text.find(c, start, line_end) for c in "/?#") if i != -1])
        at = max(text.find("@", colon, line_end), text.rfind("@", colon, authority_end))
        if at == -1:
            continue
        pieces.append(text[position:colon + 1] + MASK)
        position = at
    return "".join(pieces) + text[position:]


def redact(text: str) -> str:
    """``text`` with every password in a URL (user info or secret query parameter), and every remembered
    secret, replaced by ``***``."""
    if not isinstance(text, str):
        return text
    for secret in sorted(_remembered, key=len, reverse=True):
        text = text.replace(secret, MASK)
    text = _mask_user_info(text)
    return _QUERY.sub(lambda m: m["head"] + MASK if is_secret_parameter(m["name"]) and m["value"] else m[0], text)


def redact_argv(argv: Iterable[str]) -> list[str]:
    """A command line (list of arguments) with credentials in any argument hidden."""
    return [redact(str(argument)) for argument in argv]


def secrets_of(uri: str) -> set[str]:
    """The credentials a URI carries: the password of its user info and its secret query parameters' values,
    as written and percent-decoded."""
    try:
        parts = urlsplit(uri)
        password = parts.password
    except ValueError:  # not a URL (a bad port, say): nothing to find
        return set()
    found = set()
    if password:
        found |= {password, unquote(password)}
    for name, value in parse_qsl(parts.query, keep_blank_values=False):
        if is_secret_parameter(name):
            found |= {value, quote(value, safe="")}
    return found


def remember_secret(secret: str | None) -> None:
    """Hide ``secret`` (a password) from every later ``redact``, wherever it appears."""
    if secret and len(secret) >= MIN_REMEMBERED_LENGTH:
        _remembered.update({secret, quote(secret, safe="")})


def remember_secrets(*texts: str | None) -> None:
    """Hide the credentials of these URIs (or command-line arguments holding them) from every later ``redact``."""
    for text in texts:
        for match in _SCHEME.finditer(text or ""):
            for secret in secrets_of(text[match.start():]):
                remember_secret(secret)


def printable(text: object, lines: bool = False) -> str:
    """``text`` with control characters (terminal escape sequences, newlines) written as escapes, so a name
    read from the store prints as the text it is and cannot move the cursor, recolour or clear a terminal.

    ``lines``: keep the line breaks of a multi-line text (a table) and escape within each line.
    """
    if lines:
        return "\n".join(printable(line) for line in str(text).split("\n"))
    return "".join(character if character.isprintable() else character.encode("unicode_escape").decode("ascii")
                   for character in str(text))
