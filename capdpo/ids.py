"""The one rule for ids: what a video id, a question id, an answer id or an evaluation tag may be.

Ids become names in a run folder (``frames/<video id>/``, ``eval/<tag>_predictions.jsonl``) and
parts of other ids (a question ``<video id>_<i>``, an answer ``<question id>#<k>``), so they are
checked where records enter - the data stage, the importers, the suites, teacher and label files,
and every Video and QAItem read back from a record file - and a path is never made from one
without :func:`capdpo.rundir.inside`, which proves the path lies inside its folder. The rule:

- ASCII letters, digits and ``_ - . : +`` only (one name on every file system, in a URL and in an
  HTML id): no space, no path separator, no NUL, no newline;
- not starting with ``.``: never ``.`` or ``..``, and never a hidden name beside capdpo's own
  temp and lock files;
- ``#`` only in answer ids, where it separates the question id from the answer's number;
- at most 128 characters for a video id or a tag, 160 for a question id (it may be a video id plus
  ``_<i>``) and 200 for an answer id (a question id plus ``#<k>``): a folder or file named after
  one stays under the file system's 255-byte limit with capdpo's suffixes and temp names.
"""

from __future__ import annotations

import string
from typing import Literal

IdKind = Literal["video id", "question id", "answer id", "tag"]
ALLOWED = "ASCII letters, digits and _ - . : +"
MAX_LENGTH: dict[str, int] = {"video id": 128, "tag": 128, "question id": 160, "answer id": 200}
_CHARS = frozenset(string.ascii_letters + string.digits + "_-.:+")
SHOWN = 40  # characters of a bad id quoted in an error; the rest is counted


class BadId(ValueError):
    """An id or a tag that breaks the id rule; the message quotes it and says which part of the rule."""


def _problem(value: object, kind: IdKind) -> str | None:
    """What is wrong with ``value`` as a ``kind`` (None when it follows the rule)."""
    if not isinstance(value, str):
        return f"should be a string, got {type(value).__name__}"
    if not value:
        return "is empty"
    if len(value) > MAX_LENGTH[kind]:
        return f"is too long; a {kind} has at most {MAX_LENGTH[kind]} characters"
    if value.startswith("."):
        return "starts with '.' (never '.', '..' or a hidden name)"
    bad = next((c for c in value if c not in _CHARS and not (c == "#" and kind == "answer id")), None)
    if bad == "#":
        return "has '#', which only an answer id may have (it separates the question id from the answer's number)"
    if bad is not None:
        return f"has {bad!r}; an id may use only {ALLOWED}"
    return None


def check_id(value: object, kind: IdKind = "video id") -> str:
    """``value`` when it follows the id rule (the module's docstring) as a ``kind``; else
    :class:`BadId` quoting it and naming what is wrong."""
    problem = _problem(value, kind)
    if problem is not None:
        raise BadId(f"{kind} {shown(value)}: {problem}")
    return value


def shown(value: object) -> str:
    """``value`` quoted for an error message: control characters escaped, a long one cut."""
    if isinstance(value, str) and len(value) > SHOWN:
        return f"{value[:SHOWN]!r}... ({len(value)} characters)"
    return repr(value)
