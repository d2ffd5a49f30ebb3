"""Credentials never leave the process: one helper hides passwords in URIs and command lines.

Every URI or command line that is printed, logged to MLflow (``environment.json``, ``study.json``,
``ensemble.json``, tags) or written into a report goes through ``redact``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

MASK = "***"
# scheme://user:password@host -> scheme://user:***@host (SQLAlchemy, MLflow and HTTP URLs alike).
_USERINFO = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[^:/@\s'\"]*):(?P<secret>[^@\s'\"]*)@")
# ...?password=secret&... and token-like query parameters.
_QUERY = re.compile(r"(?P<head>[?&](?:password|passwd|pwd|token|access_token|secret)=)(?P<secret>[^&\s'\"]*)",
                    re.IGNORECASE)


def redact(text: str) -> str:
    """``text`` with every password in a URL (user info or query parameter) replaced by ``***``."""
    if not isinstance(text, str):
        return text
    text = _USERINFO.sub(lambda m: f"{m['head']}:{MASK}@", text)
    return _QUERY.sub(lambda m: f"{m['head']}{MASK}", text)


def redact_argv(argv: Iterable[str]) -> list[str]:
    """A command line (list of arguments) with credentials in any argument hidden."""
    return [redact(str(argument)) for argument in argv]
