"""parse_reward on real-looking judge replies: a score is only ever what the judge clearly said."""

from __future__ import annotations

import pytest

from capdpo.judge.judge import truncate_words
from capdpo.judge.parse import parse_reward

CASES = [
    # --- accepted ---
    ("plain", "Score: 4", 4),
    ("template format", "Explanation: The answer matches the caption and the reference.\nScore: 5", 5),
    ("multi-line explanation then score",
     "Explanation: The model says the child wears glasses,\nwhich the caption confirms. It omits the frame colour,\n"
     "so it is slightly incomplete.\n\nScore: 4", 4),
    ("explanation mentions other numbers",
     "Explanation: It names 3 objects but the caption lists 2, a high score is not deserved.\nScore: 2", 2),
    ("markdown bold label", "**Explanation:** Accurate.\n**Score:** 5", 5),
    ("markdown bold label outside colon", "**Score**: 3", 3),
    ("markdown bold number", "Score: **4**", 4),
    ("whole line bold", "**Score: 1**", 1),
    ("lower case, no space", "score:2", 2),
    ("upper case", "SCORE: 3", 3),
    ("slash five", "Score: 4/5", 4),
    ("slash five spaced", "Score: 4 / 5", 4),
    ("out of five", "Score: 3 out of 5", 3),
    ("rating out of five", "Rating: 3 out of 5", 3),
    ("final score", "Final score: 2", 2),
    ("equals", "score = 5", 5),
    ("trailing period", "Score: 5.", 5),
    ("integer-valued float", "Score: 4.0", 4),
    ("scale in parentheses", "Score (1-5): 4", 4),
    ("score first then explanation", "Score: 2\nExplanation: The colour is wrong.", 2),
    ("same score repeated", "Score: 4\n\nTo summarise, the answer is mostly right. Score: 4", 4),
    ("JSON", '{"score": 3, "explanation": "Partially correct."}', 3),
    ("JSON in json fences", 'Here is my evaluation:\n```json\n{\n  "explanation": "Correct colour.",\n  "score": 5\n}\n```', 5),
    ("JSON float integer", '{"score": 2.0}', 2),
    ("JSON capitalised key", '{"Score": 1, "Explanation": "Wrong object."}', 1),
    ("python dict", "{'score': 2}", 2),
    ("python dict video-chatgpt style", "{'pred': 'no', 'score': 2}", 2),
    ("JSON and line agree", 'Score: 4\n{"score": 4}', 4),
    # --- rejected: no score stated ---
    ("empty", "", None),
    ("whitespace", "   \n\t ", None),
    ("prose without score", "The answer is accurate and complete, it matches the caption well.", None),
    ("echoes the template", "Explanation: <one or two sentences>\nScore: <one integer from 1 (wrong) to 5 (right)>", None),
    ("bare number", "4", None),
    ("JSON without score key", '{"pred": "yes"}', None),
    # --- rejected: invalid score ---
    ("above range", "Score: 6", None),
    ("zero", "Score: 0", None),
    ("negative", "Score: -1", None),
    ("fractional above range", "Score: 6.2", None),
    ("half point", "Score: 4.5", None),
    ("ten-point scale bare", "7/10", None),
    ("ten-point scale", "Score: 7/10", None),
    ("ten-point in range", "Score: 4/10", None),
    ("out of ten", "Rating: 4 out of 10", None),
    ("other scale in parentheses", "Score (1-10): 4", None),
    ("range hedge", "Score: 4-5", None),
    ("range hedge words", "Score: 3 to 4", None),
    ("JSON out of range", '{"score": 9}', None),
    ("JSON fractional", '{"score": 3.5}', None),
    ("JSON non-number", '{"score": "high"}', None),
    # --- rejected: conflicting ---
    ("two conflicting lines", "Score: 3\nScore: 4", None),
    ("revised score", "Score: 2\nOn reflection the answer is fine. Final score: 4", None),
    ("JSON conflicts with line", 'Explanation: fine.\nScore: 4\n{"score": 2}', None),
    ("valid and invalid", "Score: 4\nScore: 6", None),
]


@pytest.mark.parametrize("reply,expected", [(r, e) for _, r, e in CASES], ids=[n for n, _, _ in CASES])
def test_parse_reward(reply, expected):
    got = parse_reward(reply)
    assert got == expected
    assert got is None or type(got) is int


def test_parse_reward_custom_range():
    # the Video-ChatGPT protocol scores 0-5
    assert parse_reward("{'pred': 'yes', 'score': 0}", low=0, high=5) == 0
    assert parse_reward("Score: 0", low=0, high=5) == 0
    assert parse_reward("Score: 8/10", low=1, high=10) == 8
    assert parse_reward("Score: 4/5", low=1, high=10) is None


def test_parse_reward_of_none_is_none():
    assert parse_reward(None) is None  # type: ignore[arg-type]


def test_truncate_words():
    text = "one two  three\nfour five"
    assert truncate_words(text, 10) == text  # short text untouched, whitespace kept
    assert truncate_words(text, 5) == text
    assert truncate_words(text, 3) == "one two three"
    assert truncate_words(text, 0) == ""
    assert truncate_words("", 5) == ""
    long = " ".join(f"w{i}" for i in range(300))
    cut = truncate_words(long, 256)
    assert len(cut.split()) == 256 and cut.split()[-1] == "w255"
