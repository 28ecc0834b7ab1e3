"""parse_qa: exactly n numbered pairs or nothing (the paper drops replies that do not parse)."""

from __future__ import annotations

import pytest

from capdpo.qa import parse_qa

THREE = """Q1: What colour is the ball?
A1: The ball is red.
Q2: How many people appear?
A2: Two people appear.
Q3: What happens first?
A3: The man throws the ball."""

EXPECTED = [("What colour is the ball?", "The ball is red."), ("How many people appear?", "Two people appear."),
            ("What happens first?", "The man throws the ball.")]


def test_exact_three_pairs():
    assert parse_qa(THREE, 3) == EXPECTED


def test_preamble_and_blank_lines_are_ignored():
    text = "Here are three question-answer pairs:\n\n" + THREE.replace("\nQ", "\n\nQ")
    assert parse_qa(text, 3) == EXPECTED


@pytest.mark.parametrize("style", [
    lambda k, i, t: f"**{k}{i}:** {t}",
    lambda k, i, t: f"**{k}{i}**: {t}",
    lambda k, i, t: f"{k}{i}. {t}",
    lambda k, i, t: f"{k}{i}) {t}",
    lambda k, i, t: f"  {k.lower()}{i}: {t}",
])
def test_markdown_and_numbering_variants(style):
    lines = []
    for i, (q, a) in enumerate(EXPECTED, start=1):
        lines += [style("Q", i, q), style("A", i, a)]
    assert parse_qa("\n".join(lines), 3) == EXPECTED


def test_two_pairs_when_three_wanted():
    two = "\n".join(THREE.splitlines()[:4])
    assert parse_qa(two, 3) is None
    assert parse_qa(two, 2) == EXPECTED[:2]


def test_more_pairs_than_wanted():
    four = THREE + "\nQ4: Where is it?\nA4: In a park."
    assert parse_qa(four, 3) is None


def test_duplicated_item_is_rejected():
    assert parse_qa("Q1: First?\n" + THREE, 3) is None
    assert parse_qa(THREE + "\nA3: Another answer.", 3) is None


def test_missing_answer_or_empty_item():
    assert parse_qa(THREE.replace("A2: Two people appear.", ""), 3) is None
    assert parse_qa(THREE.replace("A2: Two people appear.", "A2:"), 3) is None
    assert parse_qa(THREE.replace("Q2: How many people appear?", "Q5: How many people appear?"), 3) is None


def test_multi_line_answers_are_joined():
    text = THREE.replace("A3: The man throws the ball.", "A3: The man throws the ball\n  and the dog\n\n chases it.")
    assert parse_qa(text, 3)[2] == ("What happens first?", "The man throws the ball and the dog chases it.")
    text = THREE.replace("A1: The ball is red.", "A1:\nThe ball is red.")
    assert parse_qa(text, 3)[0] == EXPECTED[0]


def test_empty_reply():
    assert parse_qa("", 3) is None
    assert parse_qa("I cannot help with that.", 3) is None
