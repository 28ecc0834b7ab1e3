"""Rewards of online GRPO: the caption-grounded judge score and rule rewards, one column each.

A reward is a float per answer, or NaN where the function does not apply (a numeric reward on a
question whose reference holds no number, a judgment that failed): ``capdpo.grpo_loss.group_advantages``
leaves NaN out of the sum and gives an answer no function applies to an advantage of 0, as TRL does
with ``None``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence

from capdpo.judge.parse import SCORE_RANGE
from capdpo.records import Judgment

ARTICLES = {"a", "an", "the"}
NUMBER_WORDS = {w: i for i, w in enumerate(
    ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty"])}
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?|[a-z]+")


def normalise(text: str) -> str:
    """Lower case, punctuation and articles dropped, single spaces: "The cat." and "cat" are equal."""
    words = re.sub(r"[^\w\s]", " ", text.lower()).split()
    return " ".join(w for w in words if w not in ARTICLES)


def exact_match(answer: str, reference: str) -> float:
    """1 when the answer is the reference (``normalise``d), else 0: for short-answer and multiple-choice questions."""
    return float(normalise(answer) == normalise(reference))


def first_number(text: str) -> float | None:
    """The first number a text states, in digits or as a word up to twenty; None if it states none."""
    for token in _NUMBER.findall(text.lower()):
        if token in NUMBER_WORDS:
            return float(NUMBER_WORDS[token])
        if token[-1].isdigit():
            return float(token)
    return None


def numeric(answer: str, reference: str) -> float:
    """1 when the answer's first number equals the reference's, 0 when it differs or is missing;
    NaN when the reference states no number (the reward does not apply)."""
    expected = first_number(reference)
    if expected is None:
        return math.nan
    return float(first_number(answer) == expected)


RULES: dict[str, Callable[[str, str], float]] = {"exact_match": exact_match, "numeric": numeric}


def judge_rewards(judgments: Sequence[Judgment]) -> list[float]:
    """The judge's scores mapped from its 1-5 scale to 0-1 (NaN for a failed judgment)."""
    low, high = SCORE_RANGE
    return [math.nan if j.score is None else (j.score - low) / (high - low) for j in judgments]
