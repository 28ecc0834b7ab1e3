"""Reading judge replies: a score, a Video-ChatGPT verdict or a pairwise verdict is only ever
what a reply clearly said. A reply that does not parse gives None - "ask again or record a
failure", never a guess. :data:`PROTOCOLS` says, per judging protocol, how its replies are read
and how a bad one is asked again.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Callable
from dataclasses import dataclass

from capdpo.records import JUDGE_SCALES

SCORE_RANGE = JUDGE_SCALES["caption_reward"]
REASK = ("\n\nYour previous reply was:\n{reply}\n\nIt did not end with a valid score. "
         "Reply with exactly one line: Score: <one integer from 1 to 5>")
VIDEO_CHATGPT_REASK = ("\n\nYour previous reply was:\n{reply}\n\nIt was not a valid Python dictionary. "
                       "Reply with only the dictionary: {{'pred': 'yes' or 'no', 'score': <one integer from 0 to 5>}}")

# "Score: 4", "**Score:** 4", "score = 4/5", "Rating: 4 out of 5", "Score (1-5): 4". The number is
# captured with any decimal part or sign so that "4.5", "6" or "-1" are seen - and then rejected,
# not rounded; a range such as "4-5" is no single score (and "(1-5)" is the scale, not a score).
# A number that goes on as a decimal comma or a list ("4,5") or an exponent ("1e1") is no score.
_SCORE_LINE = re.compile(r"(?:score|rating)(?:\s*\(\s*(?:\d+\s*(?:-|–|to)\s*(\d+)|out of\s*(\d+))\s*\))?"
                         r"\W{0,6}?(?:is\s*)?[:=]?\s*\**\s*(-?\d+(?:\.\d+)?)(?!\.?\d|\s*(?:-|–|to)\s*\d|\s*,\s*\d|[eE][+-]?\d)"
                         r"\s*(?:/\s*(\d+)|out of\s*(\d+))?",
                         re.IGNORECASE)
_MAPPING = re.compile(r"\{[^{}]*\}", re.DOTALL)
# "Better: 1", "**Better:** Answer 2", "better = tie"; a hedge such as "1 or 2" is no verdict.
_BETTER = re.compile(r"better\W{0,6}?(?:is\s*)?[:=]?\s*\**\s*(?:answer\s*)?(1|2|tie)\b"
                     r"(?!\s*(?:or|/|,|and)\s*(?:answer\s*)?(?:1|2|tie)\b)", re.IGNORECASE)


# -- reading replies -------------------------------------------------------------------------

def parse_reward(text: str, low: int = SCORE_RANGE[0], high: int = SCORE_RANGE[1]) -> int | None:
    """The integer score a judge reply states, or None when it states no single valid one.

    Accepts a JSON or Python-dict object with a ``score`` key, or a ``Score: N`` line (markdown
    emphasis, ``N/5`` and ``N out of 5`` allowed). Rejects out-of-range, fractional and
    conflicting scores: None means "ask again or record a failure", never "guess".
    """
    if not text or not text.strip():
        return None
    found = set()  # every score stated, in a mapping or a line; more than one value is a conflict
    for blob in _MAPPING.findall(text):
        obj = _load_mapping(blob)
        if obj is not None:
            for key, value in obj.items():
                if str(key).lower() in ("score", "rating"):
                    found.add(_valid(value, low, high))
    for m in _SCORE_LINE.finditer(text):
        number, scales = m.group(3), [s for s in m.group(1, 2, 4, 5) if s is not None]
        if any(int(s) != high for s in scales):
            return None  # "3/10" is on another scale; rescaling would invent precision
        found.add(_valid(number, low, high))
    if len(found) == 1:
        return found.pop()
    return None


def parse_video_chatgpt(text: str) -> tuple[str, int] | None:
    """``(pred, score)`` of a Video-ChatGPT judge reply - ``pred`` 'yes' or 'no', ``score`` an
    integer 0-5 - or None when the reply holds no single valid ``{'pred': .., 'score': ..}``.

    The dict may be JSON or a Python literal, alone or inside prose/fences; keys and the yes/no
    are case-insensitive. A missing key, another word than yes/no, a fractional or out-of-range
    score, or two dicts that disagree all give None.
    """
    found = set()
    for blob in _MAPPING.findall(text or ""):
        obj = _load_mapping(blob)
        if obj is None:
            continue
        fields = {str(k).strip().lower(): v for k, v in obj.items()}
        if "pred" not in fields and "score" not in fields:
            continue  # some other mapping, not an attempt at the verdict
        pred = fields.get("pred")
        pred = pred.strip().lower() if isinstance(pred, str) else None
        score = _valid(fields.get("score"), *JUDGE_SCALES["video_chatgpt"]) if not isinstance(fields.get("score"), bool) else None
        found.add((pred, score) if pred in ("yes", "no") and score is not None else None)
    if len(found) == 1:
        return found.pop()
    return None


def parse_pairwise(text: str) -> str | None:
    """The verdict of a pairwise reply: ``'1'``, ``'2'`` or ``'tie'`` from its ``Better: ...``
    line, or None when it states none or several different ones."""
    found = {m.group(1).lower() for m in _BETTER.finditer(text or "")}
    return found.pop() if len(found) == 1 else None


def _load_mapping(blob: str) -> dict | None:
    for loader in (json.loads, ast.literal_eval):
        try:
            obj = loader(blob)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            continue
        if isinstance(obj, dict):
            return obj
    return None


_NUMBER = re.compile(r"[+-]?\d+(?:\.\d+)?")  # plain decimal: float() would also take "1e1", "4_0", "inf"


def _valid(value: object, low: int, high: int) -> int | None:
    text = str(value).strip()
    if isinstance(value, bool) or not _NUMBER.fullmatch(text):
        return None
    number = float(text)
    if not number.is_integer() or not low <= number <= high:
        return None
    return int(number)


# -- protocols -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Vote:
    """What one valid reply said: its score and, for video_chatgpt, its yes/no."""

    score: int
    verdict: str | None = None


def _caption_reward_vote(text: str) -> Vote | None:
    score = parse_reward(text)
    return None if score is None else Vote(score)


def _video_chatgpt_vote(text: str) -> Vote | None:
    parsed = parse_video_chatgpt(text)
    return None if parsed is None else Vote(parsed[1], parsed[0])


@dataclass(frozen=True)
class Protocol:
    """How one judging protocol reads replies and asks again."""

    template: str  # default template (caption evidence)
    parse: Callable[[str], Vote | None]
    reask: str
    reask_tokens: int  # room for the corrected reply alone
    expects: str  # what a valid reply states, for failure messages


PROTOCOLS = {
    "caption_reward": Protocol("caption_reward", _caption_reward_vote, REASK, 16, "valid score 1-5"),
    "video_chatgpt": Protocol("video_chatgpt", _video_chatgpt_vote, VIDEO_CHATGPT_REASK, 32,
                              "valid {'pred': yes/no, 'score': 0-5} dict"),
}
