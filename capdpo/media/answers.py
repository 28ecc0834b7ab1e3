"""Free-form answers to scene questions, right and wrong, for teaching and testing judges.

A judge learns nothing from answers that are all right. :func:`answer_variants` makes the answers a
weak video LMM writes about a synthetic clip - the reference answer with one or two facts
swapped: another colour, shape, number, direction, size, yes for no, a colour change that did not
happen - without running any model. Whether a variant is right is not decided here: a swap can
land on the truth (another shape's colour that happens to be this one's later colour), so every
variant is graded by the oracle (``capdpo.oracle.judge_answer``) before it is used.
"""

from __future__ import annotations

import random
import re

from capdpo.media.synthetic import KINDS, PALETTE, SceneQuestion

_NUMBERS = ("no", "one", "two", "three", "four")
_WAYS = ("to the left", "to the right", "upward", "downward")
# Each swappable word class: its words, and the alternatives a swap draws from (same class).
_CLASSES: tuple[tuple[str, ...], ...] = (
    tuple(PALETTE),
    KINDS,
    tuple(f"{k}s" for k in KINDS),
    _NUMBERS[1:],
    ("small", "large"),
    ("first", "last"),
    ("early", "late"),
    ("Yes", "No"),
)
_WORD = re.compile(r"[A-Za-z]+")
_WAY = re.compile("|".join(_WAYS))
_STILL = re.compile(r"stays still( the whole time)?")
_KEEPS = re.compile(r"keeps its colour the whole time|keeps its colour throughout|no shape changes colour")


def _swap_word(text: str, rng: random.Random) -> str | None:
    """``text`` with one word of a swappable class replaced by another of its class, or None."""
    spots = [(m, cls) for m in _WORD.finditer(text) for cls in _CLASSES if m.group() in cls]
    if not spots:
        return None
    m, cls = rng.choice(spots)
    new = rng.choice([w for w in cls if w != m.group()])
    return text[: m.start()] + new + text[m.end():]


def _swap_motion(text: str, rng: random.Random) -> str | None:
    """Another direction, or moving for still and still for moving."""
    if m := _WAY.search(text):
        if rng.random() < 0.25:
            return text[: m.start()].replace("moves steadily", "stays still").replace("moves", "stays still") \
                .removesuffix(" ") + text[m.end():]
        return text[: m.start()] + rng.choice([w for w in _WAYS if w != m.group()]) + text[m.end():]
    if m := _STILL.search(text):
        return text[: m.start()] + f"moves steadily {rng.choice(_WAYS)}" + text[m.end():]
    return None


def _swap_change(text: str, rng: random.Random) -> str | None:
    """A colour change where there is none, or none where there is one."""
    if m := _KEEPS.search(text):
        return text[: m.start()] + f"changes colour to {rng.choice(tuple(PALETTE))} {rng.choice(('early', 'late'))} " \
            "in the video" + text[m.end():]
    if m := re.search(r"(late|early|in the middle of the video)[^,.]*changes colour (from \w+ )?to \w+", text):
        return text[: m.start()] + "keeps its colour the whole time" + text[m.end():]
    if m := re.search(r"changes colour (from \w+ )?to \w+[^.]*", text):
        return text[: m.start()] + "keeps its colour the whole time" + text[m.end():]
    return None


_SWAPS = (_swap_word, _swap_motion, _swap_change)


def answer_variants(question: SceneQuestion, n: int, rng: random.Random) -> list[str]:
    """Up to ``n`` distinct answers to ``question``: its reference answer, its full answer when it
    has one, and answers with one or two facts swapped (ungraded: grade them with the oracle)."""
    seeds = [question.answer] + ([question.full_answer] if getattr(question, "full_answer", None) else [])
    out = list(dict.fromkeys(seeds))
    for _ in range(8 * n):
        if len(out) >= n:
            break
        text = rng.choice(seeds)
        for _ in range(1 + (rng.random() < 0.3)):
            swapped = rng.choice(_SWAPS)(text, rng)
            text = swapped if swapped is not None else text
        if text not in out:
            out.append(text)
    return out[:n]


def detail_variants(question: SceneQuestion, n: int, rng: random.Random) -> list[str]:
    """Up to ``n`` distinct answers to a ``detail`` question that all state its motion right and
    differ only in the extra details they add - some of the shape's size, colour and colour change,
    each kept or swapped (ungraded: grade them with the oracle). Only the caption decides these, so a
    judge taught on them must read it; :func:`answer_variants` gives each question at most a few."""
    head, _, tail = question.full_answer.rstrip(".").partition(", and ")
    facts = question.facts
    out: list[str] = []
    for _ in range(8 * n):
        if len(out) >= n:
            break
        text = head
        if rng.random() < 0.5:
            text = text.replace(f" {facts['size']} ", " ", 1)
        if rng.random() < 0.5:
            text = text.replace(f" {facts['colour']} ", " ", 1)
        if rng.random() < 0.6:
            text = f"{text}, and {tail}"
        if rng.random() < 0.5:  # one extra detail made wrong (or, rarely, another true one)
            swap = rng.choice((_swap_word, _swap_change))
            text = swap(text, rng) or text
        text += "."
        if text not in out and text != question.full_answer:
            out.append(text)
    return out
