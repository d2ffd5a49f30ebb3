"""Studies of the user's own, described in a TOML file instead of the library (``ablate --study-file FILE``).

::

    name = "my-study"
    question = "Does a narrower dense layer cost accuracy?"
    [baseline]              # optional: overrides of the seed's recipe shared by every arm
    epochs = 15
    [arms.narrow_dense]     # the baseline arm is always `baseline`
    dense_units = 128

``studies.study_from_definition`` checks the definition (and docs/studies.md describes it); this module reads
the file and turns a problem into one line naming the file, the line and key, and the fix.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from .errors import StudyError
from .studies import DefinitionError, Study, study_from_definition

_HEADER = re.compile(r"\s*\[\s*([^\[\]]+?)\s*\]")
_KEY = re.compile(r"\s*(\"[^\"]*\"|'[^']*'|[A-Za-z0-9_-]+)\s*=")


class StudyFileError(StudyError):
    """A study file that cannot be read or used."""


def _parts(dotted: str) -> tuple[str, ...]:
    return tuple(part.strip().strip("\"'") for part in dotted.split("."))


def line_of(text: str, key: tuple[str, ...]) -> int | None:
    """The line (1-based) of ``key`` in a TOML text: a table header or a ``name = value`` line under its table."""
    table: tuple[str, ...] = ()
    for number, line in enumerate(text.splitlines(), 1):
        header = _HEADER.match(line)
        if header:
            table = _parts(header.group(1))
            if table == key:
                return number
            continue
        match = _KEY.match(line)
        if match and (*table, _parts(match.group(1))[0]) == key:
            return number
    return None


def load_study_file(path: str | Path) -> Study:
    """The study a TOML file defines, checked before anything runs; StudyFileError says what to fix, and where."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise StudyFileError(f"cannot read the study file {str(path)!r}: {error.strerror or error}. Pass the path "
                             "of a TOML file (docs/studies.md has an example).") from None
    except UnicodeDecodeError:
        raise StudyFileError(f"{path}: not a UTF-8 text file; a study file is TOML (docs/studies.md).") from None
    try:
        definition = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise StudyFileError(f"{path}: not valid TOML: {error}. Fix the TOML there: a table is [arms.NAME], each "
                             "name once; a value is FIELD = VALUE, strings in quotes.") from None
    try:
        return study_from_definition(definition)
    except DefinitionError as error:
        line = line_of(text, error.key)
        where = ", ".join(filter(None, [f"line {line}" if line else "", f"key {'.'.join(error.key)}" if error.key
                                        else ""]))
        raise StudyFileError(f"{path}{', ' + where if where else ''}: {error}") from None
