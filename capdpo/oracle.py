"""Exact 0/1 correctness of free-form answers about synthetic clips, decided from the scene itself.

Claim 1 of the paper is that a caption-grounded text judge scores answers in line with the truth.
Measuring that needs the truth: for a synthetic clip, :func:`capdpo.media.synthetic.scene_questions`
gives every question machine-readable ``facts`` (the expected colour, shape, count, direction...),
and :func:`judge_answer` checks an answer against them with fixed, documented rules
(``docs/oracle.md``). There is no model in the loop, so the oracle cannot share a judge's blind
spots; its rules are strict on purpose (a hedge such as "red or blue" is wrong).

The rule in one line: an answer is correct iff it states the expected value and states no other
value of the same category. How a value is "stated":

* text is lower-cased, ``n't`` becomes ``not``, punctuation and the words ``but``, ``and``,
  ``while``... cut it into clauses; region names ("upper left") are not directions;
* a word after a negation (``not``, ``no``, ``never``, ``none``...) in its clause is negated. A
  negated *other* value is harmless ("red, not blue"); a negated *expected* value makes the answer
  wrong ("not red" when red is expected), whatever else it says;
* a leading ``yes`` / ``no`` answers a yes/no question; statements ("it stays still", "every
  shape keeps its colour") answer it too, and all of them must agree with the truth.

A detail question's reference answer gives only one shape's motion, so there the rule is wider:
the answer must state the motion, and every other detail it gives about the shape (size, kind,
colour, colour change) must be true as well; leaving details out is fine.

Scoring a run: an answer's ``qa_id`` names its QA item (``qa.jsonl``), whose ``video_id`` names a
scene (``<run>/media/synthetic/scenes.jsonl``); the scene's questions are generated again and the
one with the same question and reference answer text carries the facts (:func:`find_question`).
Answers whose question is not one of them (an LLM-written question, a real video) are skipped and
counted, never scored.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from capdpo.media.synthetic import BACKGROUNDS, KINDS, PALETTE, Scene, SceneQuestion, scene_questions
from capdpo.records import QAItem, RecordError, read_jsonl, write_jsonl

# ---------------------------------------------------------------------------------------- vocabulary

# Every colour word maps to its canonical name. Palette and background colours can be expected or
# conflicting; the others are only ever conflicting values.
_COLOUR_SYNONYMS = {"grey": "gray", "violet": "purple"}
_OTHER_COLOURS = ("pink", "cyan", "magenta", "teal", "turquoise", "beige", "tan", "gold", "silver", "maroon",
                  "lime", "indigo", "cream")
COLOUR_WORDS: dict[str, str] = {
    **{c: c for c in (*PALETTE, *BACKGROUNDS, *_OTHER_COLOURS)},
    **_COLOUR_SYNONYMS,
}
# The generator draws circles, squares and triangles only, so each synonym names one kind.
KIND_WORDS: dict[str, str] = {
    **dict.fromkeys(("circle", "circles", "circular", "round", "disc", "discs", "disk", "disks", "dot", "dots",
                     "ball", "balls"), "circle"),
    **dict.fromkeys(("square", "squares", "rectangle", "rectangles", "rectangular", "box", "boxes", "block",
                     "blocks"), "square"),
    **dict.fromkeys(("triangle", "triangles", "triangular"), "triangle"),
}
assert set(KIND_WORDS.values()) == set(KINDS)
GENERIC_SHAPE_NOUNS = frozenset({"shape", "shapes", "object", "objects", "item", "items", "thing", "things",
                                 "figure", "figures"})
NUMBER_WORDS: dict[str, int] = {
    "zero": 0, "none": 0, "one": 1, "single": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6,
    "seven": 7, "eight": 8, "nine": 9, "ten": 10, "eleven": 11, "twelve": 12,
}
DIRECTION_WORDS: dict[str, str] = {
    **dict.fromkeys(("left", "leftward", "leftwards"), "left"),
    **dict.fromkeys(("right", "rightward", "rightwards"), "right"),
    **dict.fromkeys(("up", "upward", "upwards", "rises", "rising", "rose", "ascends", "ascending", "climbs"), "up"),
    **dict.fromkeys(("down", "downward", "downwards", "falls", "falling", "fell", "descends", "descending", "sinks",
                     "sinking"), "down"),
}
SHAPE_SIZE_WORDS: dict[str, str] = {**dict.fromkeys(("small", "little", "tiny"), "small"),
                                    **dict.fromkeys(("large", "big"), "large")}
STATIC_WORDS = frozenset({"still", "stationary", "static", "motionless", "immobile", "unmoving"})
MOVE_WORDS = frozenset({"move", "moves", "moving", "moved", "movement", "motion", "travel", "travels", "travelling",
                        "traveling", "travelled", "traveled", "slide", "slides", "sliding", "drift", "drifts",
                        "drifting", "glide", "glides", "gliding"})
CHANGE_WORDS = frozenset({"change", "changes", "changed", "changing", "turn", "turns", "turned", "turning", "become",
                          "becomes", "became", "becoming", "switch", "switches", "switched", "switching"})
KEEP_WORDS = frozenset({"keep", "keeps", "kept", "keeping", "same", "unchanged", "constant", "retain", "retains",
                        "maintain", "maintains"})
NEGATIONS = frozenset({"not", "never", "no", "none", "nothing", "neither", "nor", "without", "instead", "rather",
                       "nobody"})
YES_WORDS = frozenset({"yes", "yeah", "yep", "yup"})
NO_WORDS = frozenset({"no", "nope"})
# Words that end a clause: negation does not reach past them, order roles are read per clause.
CLAUSE_WORDS = frozenset({"but", "however", "although", "though", "whereas", "while", "yet", "and"})
_PUNCTUATION = frozenset(".,;:!?()")
# After a leading "no", these show it answers the question ("No, it ..."); "no shape ..." is a determiner.
_AFTER_ANSWER_NO = frozenset({"it", "they", "there", "the", "that", "this", "its", "i", "we", "not", "a", "an", "he",
                              "she", "none", "nothing", "every", "each", "all"})
_SIZE_WORDS = frozenset({"small", "large", "big", "little", "tiny", "bright", "dark", "light", "pale", "deep"})
_ARTICLES_AND_SIZES = frozenset({"a", "an", "the", "colour"}) | _SIZE_WORDS
# Counting: words skipped between a number and its noun, nouns a number may count that are no shapes,
# and the words after which "one" is a pronoun ("the red one").
_COUNT_ADJECTIVES = frozenset(COLOUR_WORDS) | _SIZE_WORDS | {"different", "distinct", "flat", "coloured", "separate",
                                                             "simple", "moving", "visible", "individual", "total",
                                                             "more", "other"}
_UNIT_NOUNS = frozenset({"second", "seconds", "frame", "frames", "time", "times", "direction", "directions", "colour",
                         "colours", "corner", "corners", "quadrant", "quadrants", "side", "sides", "minute", "minutes",
                         "region", "regions"})
_BEFORE_PRONOUN_ONE = _COUNT_ADJECTIVES | {"the", "this", "that", "each", "every", "which", "any", "another", "no"}
# Order questions: which appears earlier / later. A pivot word splits a clause into subject and object.
_PIVOTS_SUBJECT_EARLIER = frozenset({"before", "then", "followed", "until"})
_PIVOTS_SUBJECT_LATER = frozenset({"after", "preceded"})
_POSITION_WORDS = {
    **dict.fromkeys(("first", "earliest", "beginning", "start", "starts", "begins", "initially", "already",
                     "opening"), "first"),
    **dict.fromkeys(("earlier", "sooner"), "earlier"),
    **dict.fromkeys(("last", "latest", "final", "finally", "end"), "last"),
    **dict.fromkeys(("later", "second", "third", "fourth", "afterwards", "next"), "later"),
}

# ---------------------------------------------------------------------------------------- parsing


class Word(NamedTuple):
    text: str
    negated: bool  # a negation word comes before it in its clause


@dataclass
class ParsedAnswer:
    """An answer cut into clauses of words, with the leading yes/no (if any) taken off."""

    polarity: str | None  # "yes" | "no" | None
    clauses: list[list[Word]]

    def words(self) -> Iterable[tuple[int, int, Word]]:
        for c, clause in enumerate(self.clauses):
            for i, w in enumerate(clause):
                yield c, i, w


_REWRITES: tuple[tuple[str, str], ...] = (
    (r"[’`]", "'"),
    (r"n't\b", " not"),
    (r"(\d)[.,](\d)", r"\1_\2"),  # 2.5 and 1,000 stay one (non-count) token
    (r"\bcolor", "colour"),
    # "from left to right" is one direction: the destination.
    (r"\b(?:from\s+(?:the\s+)?)?(?:left|right|top|bottom)\s+to(?:wards?)?\s+(?:the\s+)?(left|right|top|bottom)\b",
     r" towards \1 "),
    (r"\bto(?:wards?)?\s+(?:the\s+)?top\b", " up "),
    (r"\bto(?:wards?)?\s+(?:the\s+)?bottom\b", " down "),
    # Places are not directions: "the circle in the upper left moves down".
    (r"\b(?:upper|lower|top|bottom)[\s-]+(?:left|right)\b", " region "),
    (r"\b(?:left|right)[\s-]+(?:hand[\s-]+)?(?:side|half|corner|quadrant|part|edge)\b", " region "),
    (r"\b(show|shows|showed|shown|showing|end|ends|ended|ending|pop|pops|popped)\s+up\b", r"\1"),
    (r"\b(?:in\s+place|stays?\s+put|same\s+(?:place|position|spot|location)|where\s+it\s+is)\b", " still "),
    (r"-", " "),
)


def parse_answer(answer: str) -> ParsedAnswer:
    """Lower-case, normalise and cut into clauses; mark negated words; take off a leading yes/no."""
    text = answer.lower()
    for pattern, repl in _REWRITES:
        text = re.sub(pattern, repl, text)
    clauses: list[list[str]] = [[]]
    for token in re.findall(r"[a-z0-9_]+|[^\sa-z0-9_]", text):
        if token in _PUNCTUATION or token in CLAUSE_WORDS:
            clauses.append([])
        elif re.fullmatch(r"[a-z0-9_]+", token):
            clauses[-1].append(token)
    clauses = [c for c in clauses if c]
    polarity = None
    if clauses and clauses[0][0] in YES_WORDS:
        polarity = "yes"
    elif clauses and clauses[0][0] in NO_WORDS and (len(clauses[0]) == 1 or clauses[0][1] in _AFTER_ANSWER_NO):
        polarity = "no"
    if polarity:
        clauses[0] = clauses[0][1:]
        clauses = [c for c in clauses if c]
    marked = []
    for clause in clauses:
        words, negated = [], False
        for token in clause:
            words.append(Word(token, negated))
            negated = negated or token in NEGATIONS
        marked.append(words)
    return ParsedAnswer(polarity, marked)


class Mention(NamedTuple):
    value: Any
    negated: bool


def _previous(clause: list[Word], i: int, skip: frozenset[str]) -> str | None:
    """The closest word before ``clause[i]`` that is not in ``skip``."""
    for w in reversed(clause[:i]):
        if w.text not in skip:
            return w.text
    return None


def _is_background(clause: list[Word], i: int) -> bool:
    """``clause[i]`` (a colour) describes the background: "on a gray (coloured) background"."""
    rest = [w.text for w in clause[i + 1:i + 3] if w.text not in ("coloured", "colour")]
    return bool(rest) and rest[0] in ("background", "backdrop", "backgrounds")


def colour_mentions(parsed: ParsedAnswer) -> list[Mention]:
    return [Mention(COLOUR_WORDS[w.text], w.negated) for c, i, w in parsed.words()
            if w.text in COLOUR_WORDS and not _is_background(parsed.clauses[c], i)]


def kind_mentions(parsed: ParsedAnswer) -> list[Mention]:
    return [Mention(KIND_WORDS[w.text], w.negated) for _, _, w in parsed.words() if w.text in KIND_WORDS]


def direction_mentions(parsed: ParsedAnswer) -> list[Mention]:
    return [Mention(DIRECTION_WORDS[w.text], w.negated) for _, _, w in parsed.words() if w.text in DIRECTION_WORDS]


def size_mentions(parsed: ParsedAnswer) -> list[Mention]:
    """Size words; "a little" counts only before a colour or shape word ("a little red circle"),
    since "moves a little to the left" is an amount, not a size."""
    names = COLOUR_WORDS.keys() | KIND_WORDS.keys() | GENERIC_SHAPE_NOUNS
    out = []
    for c, i, w in parsed.words():
        clause = parsed.clauses[c]
        nxt = clause[i + 1].text if i + 1 < len(clause) else None
        if w.text == "little" and i and clause[i - 1].text == "a" and nxt not in names:
            continue
        if w.text in SHAPE_SIZE_WORDS:
            out.append(Mention(SHAPE_SIZE_WORDS[w.text], w.negated))
    return out


# ---------------------------------------------------------------------------------------- verdicts


@dataclass(frozen=True)
class Verdict:
    """Whether an answer is correct, and the rule that decided it."""

    correct: bool
    reason: str


def _right(reason: str = "states the expected value and no other") -> Verdict:
    return Verdict(True, reason)


def _wrong(reason: str) -> Verdict:
    return Verdict(False, reason)


def _one_value(expected: Any, mentions: list[Mention], what: str, tolerated: frozenset = frozenset()) -> Verdict:
    """Correct iff ``expected`` is stated, not denied, and no other value is stated (a value in
    ``tolerated`` neither helps nor hurts)."""
    if any(m.negated and m.value == expected for m in mentions):
        return _wrong(f"denies the expected {what} {expected}")
    stated = {m.value for m in mentions if not m.negated}
    if expected not in stated:
        return _wrong(f"does not state the {what} {expected}")
    if others := sorted(str(v) for v in stated - {expected} - tolerated):
        return _wrong(f"also states {what} {', '.join(others)}")
    return _right()


def judge_colour(facts: Mapping[str, Any], parsed: ParsedAnswer) -> Verdict:
    """The shape's colour when it appears; its later colour is tolerated beside a change word
    ("red at first, then it turns white")."""
    later = facts.get("later_colour")
    mentions_change = any(w.text in CHANGE_WORDS or w.text in ("then", "later", "afterwards") for _, _, w in parsed.words())
    tolerated = frozenset({later}) if later and mentions_change else frozenset()
    return _one_value(facts["colour"], colour_mentions(parsed), "colour", tolerated)


def judge_shape(facts: Mapping[str, Any], parsed: ParsedAnswer) -> Verdict:
    return _one_value(facts["shape"], kind_mentions(parsed), "shape")


def count_claims(parsed: ParsedAnswer, noun: str) -> list[Mention]:
    """Numbers the answer gives as the count of ``noun`` ("shape" or a kind).

    A number counts when followed (past colour and size words) by the counted noun, or by no noun
    at all ("there are three", "3 in total"). A number of something else ("two circles" when
    counting shapes, "2 seconds") is not a claim. "one" after a determiner is a pronoun ("the red
    one"); "a circle" claims 1 and "no circles" claims 0.
    """
    counted = GENERIC_SHAPE_NOUNS if noun == "shape" else {w for w, k in KIND_WORDS.items() if k == noun}
    not_counted = (GENERIC_SHAPE_NOUNS | set(KIND_WORDS) | _UNIT_NOUNS) - counted
    claims = []
    for c, i, w in parsed.words():
        clause = parsed.clauses[c]
        nxt = next((x.text for x in clause[i + 1:] if x.text not in _COUNT_ADJECTIVES), None)
        if w.text.isdigit():
            value = int(w.text)
        elif w.text in NUMBER_WORDS:
            value = NUMBER_WORDS[w.text]
            if w.text == "one" and i and clause[i - 1].text in _BEFORE_PRONOUN_ONE:
                continue
        elif w.text in ("a", "an", "no") and nxt in counted:
            if w.text != "no" and nxt.endswith("s"):  # "a" before a plural ("a few circles") is no count
                continue
            value = 0 if w.text == "no" else 1
        else:
            continue
        if nxt not in not_counted:
            claims.append(Mention(value, w.negated))
    return claims


def judge_count(facts: Mapping[str, Any], parsed: ParsedAnswer) -> Verdict:
    return _one_value(facts["count"], count_claims(parsed, facts["noun"]), "count")


def _motion_claims(parsed: ParsedAnswer) -> tuple[list[Mention], int, int]:
    """(direction mentions, statements that it moves, statements that it stays still).

    "moves" (not negated) says it moves; "still", "static", "in place"... say it does not, and so
    does a negated movement word ("does not move", "no movement") unless a direction follows it in
    the clause ("it does not move left" only denies a direction).
    """
    moves = still = 0
    for c, i, w in parsed.words():
        if w.text in STATIC_WORDS and not w.negated:
            still += 1
        elif w.text in MOVE_WORDS:
            if not w.negated:
                moves += 1
            elif not any(x.text in DIRECTION_WORDS for x in parsed.clauses[c][i + 1:]):
                still += 1
    return direction_mentions(parsed), moves, still


def judge_motion(facts: Mapping[str, Any], parsed: ParsedAnswer) -> Verdict:
    """Which-direction questions need the direction; does-it-move questions need yes/no (or a
    statement) agreeing with the truth, and any stated direction must be the right one."""
    direction = facts["direction"]
    directions, moves, still = _motion_claims(parsed)
    stated = {m.value for m in directions if not m.negated}
    if facts["asks"] == "direction":
        if still or parsed.polarity == "no":
            return _wrong("says it does not move")
        return _one_value(direction, directions, "direction")
    says_moves = moves + len(stated) + (parsed.polarity == "yes")
    says_still = still + (parsed.polarity == "no")
    if direction == "none":
        if says_moves:
            return _wrong("says it moves" + (f" ({', '.join(sorted(stated))})" if stated else ""))
        return _right("says it does not move") if says_still else _wrong("does not say whether it moves")
    if says_still:
        return _wrong("says it does not move")
    if any(m.negated and m.value == direction for m in directions):
        return _wrong(f"denies the expected direction {direction}")
    if others := sorted(stated - {direction}):
        return _wrong(f"states direction {', '.join(others)}")
    if not says_moves:
        return _wrong("does not say whether it moves")
    return _right("says it moves" + (f" {direction}" if stated else ""))


def _order_mentions(clause: list[Word]) -> list[tuple[int, str | None, str | None, bool]]:
    """Shapes named in a clause: (position, colour, kind, negated). "red circle", "red one",
    "red", "circle". A colour after a change word ("turns white") describes a change, not a name."""
    out, i = [], 0
    while i < len(clause):
        w = clause[i]
        if w.text in COLOUR_WORDS and not _is_background(clause, i):
            if _previous(clause, i, _ARTICLES_AND_SIZES) in CHANGE_WORDS | {"to", "into"}:
                i += 1
                continue
            j = i + 1
            while j < len(clause) and clause[j].text in _SIZE_WORDS:
                j += 1
            nxt = clause[j].text if j < len(clause) else None
            if nxt in KIND_WORDS:
                out.append((i, COLOUR_WORDS[w.text], KIND_WORDS[nxt], w.negated))
                i = j + 1
                continue
            out.append((i, COLOUR_WORDS[w.text], None, w.negated))
            i = j + 1 if nxt in GENERIC_SHAPE_NOUNS or nxt == "one" else i + 1
            continue
        if w.text in KIND_WORDS:
            out.append((i, None, KIND_WORDS[w.text], w.negated))
        i += 1
    return out


def _clause_roles(clause: list[Word]) -> tuple[int, str | None, str | None]:
    """(pivot index, role of the shapes before it, role of the shapes after it).

    Roles are first, earlier, last, later, or None when the clause says nothing about time. A pivot
    relates two shapes: "A appears before B" / "A, then B" / "A is followed by B" make A earlier and
    B later, "A appears after B" the reverse, "A appears earlier (later) than B" likewise. Without
    a pivot the clause's first position word ("first", "last", "later"...) is every shape's role.
    """
    texts = [w.text for w in clause]
    for p, t in enumerate(texts):
        if t in _PIVOTS_SUBJECT_EARLIER:
            return p, "earlier", "later"
        if t in _PIVOTS_SUBJECT_LATER:
            return p, "later", "earlier"
        if t == "than":
            said = {_POSITION_WORDS.get(x) for x in texts[:p]}
            if said & {"first", "earlier"}:
                return p, "earlier", "later"
            if said & {"last", "later"}:
                return p, "later", "earlier"
            return p, None, None
    return len(texts), next((_POSITION_WORDS[t] for t in texts if t in _POSITION_WORDS), None), None


def _stance(role: str | None, target: str, n_options: int) -> bool | None:
    """Does a shape with ``role`` come in the ``target`` position (first / last)? True, False, or
    None when the role does not tell (among three shapes, "earlier" is not "first")."""
    if n_options == 2:  # of two shapes, the earlier one is the first and the later one the last
        role = {"earlier": "first", "later": "last"}.get(role, role)
    if role == target:
        return True
    opposite = ("first", "earlier") if target == "last" else ("last", "later")
    return False if role in opposite else None


def judge_order(facts: Mapping[str, Any], parsed: ParsedAnswer) -> Verdict:
    """Correct iff the answer puts exactly the expected shape (among the question's options) in the
    asked position, puts no other shape there, and does not put the expected shape elsewhere ("it
    appears later", "does not appear first"). Shapes named in a clause without any time word
    ("The red circle.") count as put there only when no clause of the answer has one."""
    target, expected, options = facts["position"], facts["answer"], facts["options"]
    clauses = [(_clause_roles(clause), _order_mentions(clause)) for clause in parsed.clauses]
    timed = any(subject is not None for (_, subject, _), _ in clauses)
    support, conflicts = 0, []
    for clause, ((pivot, subject_role, object_role), mentions) in zip(parsed.clauses, clauses):
        # A negation anywhere in the subject part negates its verb: "the red circle does not appear first".
        subject_negated = any(w.text in NEGATIONS for w in clause[:pivot])
        for i, colour, kind, negated in mentions:
            role = subject_role if i < pivot else object_role
            negated = negated or (i < pivot and subject_negated)
            if role is None and (timed or i > pivot):
                continue
            stance = True if role is None else _stance(role, target, len(options))
            if stance is None:
                continue
            stance ^= negated
            fits = [o for o in options if colour in (None, o["colour"]) and kind in (None, o["kind"])]
            name = " ".join(x for x in (colour, kind) if x)
            if stance and fits == [expected]:
                support += 1
            elif stance and expected not in fits:
                conflicts.append(f"puts the {name} {target}")
            elif not stance and fits == [expected]:
                conflicts.append(f"says the {name} does not come {target}")
    if conflicts:
        return _wrong(conflicts[0])
    name = f"{expected['colour']} {expected['kind']}"
    return _right(f"names the {name}") if support else _wrong(f"does not name the {name}")


def _change_claims(parsed: ParsedAnswer) -> tuple[list[Mention], list[Mention], int, int]:
    """(new colours, old colours, statements that a colour changes, statements that none does).

    A colour right after a change word or "then" / "now" is a new colour ("turns white"), and after
    "to" / "into" too when "from" or a change word comes earlier in the clause ("from red to
    white", "changes colour to white"; not "next to the blue square"). A colour after "from" is an
    old colour. A colour after "or" takes the role of the colour before it ("turns white or blue").
    """
    skip = frozenset({"a", "an", "the", "colour", "colours", "its", "their", "completely", "entirely", *_SIZE_WORDS})
    new, old = [], []
    changes = keeps = 0
    for clause in parsed.clauses:
        last_role = None
        for i, w in enumerate(clause):
            # "does not change" and "keeps its colour" both say nothing changes; "does not keep" says it does.
            if w.text in CHANGE_WORDS or w.text in KEEP_WORDS:
                if (w.text in CHANGE_WORDS) != w.negated:
                    changes += 1
                else:
                    keeps += 1
            if w.text not in COLOUR_WORDS:
                continue
            prev = _previous(clause, i, skip)
            earlier = {x.text for x in clause[:i]}
            after_change = prev in CHANGE_WORDS or prev in ("then", "now")
            after_to = prev in ("to", "into") and bool(earlier & CHANGE_WORDS or "from" in earlier)
            if after_change or after_to:
                role = "new"
            elif prev == "from":
                role = "old"
            elif prev == "or":
                role = last_role
            else:
                role = None
            if role == "new":
                new.append(Mention(COLOUR_WORDS[w.text], w.negated))
            elif role == "old":
                old.append(Mention(COLOUR_WORDS[w.text], w.negated))
            last_role = role
    return new, old, changes, keeps


def judge_change(facts: Mapping[str, Any], parsed: ParsedAnswer) -> Verdict:
    """A change: the answer must give the new colour as the colour it changes to, and no other new
    or old colour. No change: yes/no and statements must all say that no colour changes."""
    new, old, changes, keeps = _change_claims(parsed)
    if facts["changed"]:
        to, from_ = facts["to"], facts["from"]
        if any(m.negated and m.value == to for m in new):
            return _wrong(f"denies the change to {to}")
        stated_new = {m.value for m in new if not m.negated}
        if to not in stated_new:
            return _wrong(f"does not say it changes to {to}")
        if others := sorted(stated_new - {to}):
            return _wrong(f"also says it changes to {', '.join(others)}")
        if others := sorted({m.value for m in old if not m.negated} - {from_}):
            return _wrong(f"says it changes from {', '.join(others)}")
        return _right(f"says it changes to {to}")
    yes_means_change = facts["yes_means_change"]
    says_change = changes + sum(not m.negated for m in new)
    says_keep = keeps
    if parsed.polarity:
        if (parsed.polarity == "yes") == yes_means_change:
            says_change += 1
        else:
            says_keep += 1
    if says_change:
        return _wrong("says a colour changes")
    return _right("says no colour changes") if says_keep else _wrong("does not say whether a colour changes")


def _only_value(expected: Any, mentions: list[Mention], what: str) -> Verdict:
    """Correct unless ``expected`` is denied or another value is stated; stating none is fine."""
    if any(m.negated and m.value == expected for m in mentions):
        return _wrong(f"denies the {what} {expected}")
    if others := sorted(str(m.value) for m in mentions if not m.negated and m.value != expected):
        return _wrong(f"says the {what} is {', '.join(others)}, not {expected}")
    return _right()


def _detail_motion(direction: str, parsed: ParsedAnswer) -> Verdict:
    """The motion must be stated: the direction (and no other, and not "still"), or that it stays still."""
    directions, moves, still = _motion_claims(parsed)
    if direction == "none":
        stated = sorted({m.value for m in directions if not m.negated})
        if moves or stated:
            return _wrong("says it moves" + (f" ({', '.join(stated)})" if stated else "") + "; it stays still")
        return _right() if still else _wrong("does not say it stays still")
    if still:
        return _wrong(f"says it does not move; it moves {direction}")
    return _one_value(direction, directions, "direction")


# Clauses about motion often hold keep or change words that say nothing about colour ("at a constant
# speed", "turns left"); there such words are no colour statement unless the clause names a colour.
_MOTION_TOPIC = MOVE_WORDS | STATIC_WORDS | DIRECTION_WORDS.keys() | {"speed", "pace", "rate", "velocity",
                                                                    "direction", "directions", "position"}


def _about_colour(clause: list[Word]) -> bool:
    return (any(w.text in COLOUR_WORDS or w.text in ("colour", "colours") for w in clause)
            or not any(w.text in _MOTION_TOPIC for w in clause))


def _detail_colour(first: str, change_to: str | None, parsed: ParsedAnswer) -> Verdict:
    """Colour claims must be true: a change only to ``change_to`` (none when it is None), no "keeps its
    colour" when it changes, "from" only its first colour, and any colour it names is one it has."""
    new, old, changes, keeps = [], [], 0, 0
    for clause in parsed.clauses:
        n, o, c, k = _change_claims(ParsedAnswer(None, [clause]))
        new, old = new + n, old + o
        if _about_colour(clause):
            changes, keeps = changes + c, keeps + k
    stated_new = sorted({m.value for m in new if not m.negated})
    if change_to is None and (changes or stated_new):
        return _wrong("says it changes colour" + (f" to {', '.join(stated_new)}" if stated_new else "")
                      + "; it keeps its colour")
    if change_to is not None:
        if keeps:
            return _wrong(f"says it keeps its colour; it changes to {change_to}")
        if any(m.negated and m.value == change_to for m in new):
            return _wrong(f"denies the change to {change_to}")
        if others := [c for c in stated_new if c != change_to]:
            return _wrong(f"says it changes to {', '.join(others)}; it changes to {change_to}")
    if others := sorted({m.value for m in old if not m.negated} - {first}):
        return _wrong(f"says it changes from {', '.join(others)}; it starts {first}")
    mentions = colour_mentions(parsed)
    if others := sorted({m.value for m in mentions if not m.negated} - {first, change_to}):
        return _wrong(f"states colour {', '.join(others)}, which the shape never has")
    if change_to is None and any(m.negated and m.value == first for m in mentions):
        return _wrong(f"denies its colour {first}")
    return _right()


def judge_detail(facts: Mapping[str, Any], parsed: ParsedAnswer) -> Verdict:
    """Correct iff the answer states the shape's motion and every other claim it makes about the
    shape (size, kind, colour, colour change) is true; a leading yes/no is ignored (the question is open)."""
    verdicts = (_detail_motion(facts["direction"], parsed),
                _only_value(facts["size"], size_mentions(parsed), "size"),
                _only_value(facts["shape"], kind_mentions(parsed), "shape"),
                _detail_colour(facts["colour"], facts["change_to"], parsed))
    return next((v for v in verdicts if not v.correct), _right("states the motion, and every other detail it gives is true"))


JUDGES = {"colour": judge_colour, "shape": judge_shape, "count": judge_count, "motion": judge_motion,
          "order": judge_order, "change": judge_change, "detail": judge_detail}


def judge_answer(facts: Mapping[str, Any], kind: str, answer: str) -> Verdict:
    """Whether ``answer`` is correct for a question of ``kind`` with truth ``facts``
    (:class:`~capdpo.media.synthetic.SceneQuestion`); the rules are in ``docs/oracle.md``."""
    if kind not in JUDGES:
        raise ValueError(f"unknown question kind {kind!r}; expected one of {', '.join(JUDGES)}")
    return JUDGES[kind](facts, parse_answer(answer))


# ---------------------------------------------------------------------------------------- scoring files


class Answer(NamedTuple):
    """An answer to score: a Candidate (``id`` = ``<qa_id>#<k>``) or a Prediction (``id`` = qa_id)."""

    id: str
    qa_id: str
    answer: str


def load_answers(path: str | os.PathLike) -> list[Answer]:
    """The ``id``, ``qa_id`` and ``answer`` of every row of a candidates or predictions JSONL."""
    answers = []
    for lineno, row in read_jsonl(path):
        if not all(isinstance(row.get(k), str) for k in Answer._fields):
            raise RecordError(f"{path}:{lineno}: an answer row needs string 'id', 'qa_id' and 'answer'")
        answers.append(Answer(row["id"], row["qa_id"], row["answer"]))
    return answers


class Unscorable(Exception):
    """The answer's question has no known truth; the message says why."""


def find_question(item: QAItem, scenes: Mapping[str, Scene]) -> SceneQuestion:
    """The scene question (with facts) behind a QA item of the run.

    Matched by question and reference-answer text rather than by the ``_<i>`` of the QA id, so a
    QA item that was not written by ``scene_questions`` from this very scene (an LLM-written
    question, an edited ``scenes.jsonl``, another generator version) is never given wrong facts.
    """
    scene = scenes.get(item.video_id)
    if scene is None:
        raise Unscorable("video has no synthetic scene")
    for question in scene_questions(scene):
        if question.question == item.question and question.answer == item.answer:
            return question
    raise Unscorable("question is not one the scene generator asks (e.g. LLM-written)")


@dataclass
class Scored:
    """Score rows ``{id, score, qa_id, ...}`` and the answers that could not be scored, by reason."""

    rows: list[dict]
    skipped: Counter = field(default_factory=Counter)
    skipped_example: dict[str, str] = field(default_factory=dict)  # reason -> first answer id

    def skip(self, answer_id: str, reason: str) -> None:
        self.skipped[reason] += 1
        self.skipped_example.setdefault(reason, answer_id)

    def summary(self) -> str:
        lines = [f"{len(self.rows)} answers scored"]
        lines += [f"{n} skipped: {reason} (e.g. {self.skipped_example[reason]})" for reason, n in self.skipped.items()]
        return "\n".join(lines)

    def write(self, path: str | os.PathLike) -> int:
        """Write the rows as JSONL, readable by :func:`capdpo.evaluation.agreement.load_scores`."""
        return write_jsonl(path, self.rows)


def oracle_scores(answers: Iterable[Answer], questions: Mapping[str, QAItem], scenes: Mapping[str, Scene]) -> Scored:
    """0/1 oracle score of each answer: ``{id, score, qa_id, kind, reason}``."""
    out = Scored(rows=[])
    found: dict[str, SceneQuestion | Unscorable] = {}
    for a in answers:
        item = questions.get(a.qa_id)
        if item is None:
            out.skip(a.id, "unknown qa id")
            continue
        if a.qa_id not in found:
            try:
                found[a.qa_id] = find_question(item, scenes)
            except Unscorable as e:
                found[a.qa_id] = e
        question = found[a.qa_id]
        if isinstance(question, Unscorable):
            out.skip(a.id, str(question))
            continue
        verdict = judge_answer(question.facts, question.kind, a.answer)
        out.rows.append({"id": a.id, "score": int(verdict.correct), "qa_id": a.qa_id, "kind": question.kind,
                         "reason": verdict.reason})
    return out


def run_scenes_path(run_dir: str | os.PathLike) -> Path:
    """Where the data stage of a run keeps its synthetic scenes (``media/synthetic/scenes.jsonl``)."""
    return Path(run_dir) / "media" / "synthetic" / "scenes.jsonl"
