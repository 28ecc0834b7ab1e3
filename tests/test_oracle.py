"""The exact oracle: hand-written verdicts for every question kind, every reference answer right, other
scenes' answers wrong, and scoring a run's candidates into a file `judge agree` reads."""

from __future__ import annotations

import json
import random

import pytest
from typer.testing import CliRunner

from capdpo.cli import app
from capdpo.evaluation.agreement import agreement, load_scores
from capdpo.media.synthetic import QUESTION_KINDS, random_scene, scene_questions
from capdpo.oracle import JUDGES, Answer, Unscorable, find_question, judge_answer, oracle_scores, parse_answer
from capdpo.records import Candidate, QAItem, RecordFile

RED = {"colour": "red", "later_colour": None}
RED_THEN_WHITE = {"colour": "red", "later_colour": "white"}
CIRCLE = {"shape": "circle"}
THREE_SHAPES = {"count": 3, "noun": "shape"}
TWO_CIRCLES = {"count": 2, "noun": "circle"}
ONE_SQUARE = {"count": 1, "noun": "square"}
WHICH_WAY_LEFT = {"direction": "left", "asks": "direction"}
MOVES_LEFT = {"direction": "left", "asks": "yes_no"}
STILL = {"direction": "none", "asks": "yes_no"}
RED_CIRCLE, BLUE_SQUARE, GREEN_TRIANGLE = ({"kind": k, "colour": c} for k, c in
                                          (("circle", "red"), ("square", "blue"), ("triangle", "green")))
FIRST_OF_TWO = {"position": "first", "answer": RED_CIRCLE, "options": [BLUE_SQUARE, RED_CIRCLE]}
FIRST_OF_THREE = {"position": "first", "answer": RED_CIRCLE, "options": [RED_CIRCLE, BLUE_SQUARE, GREEN_TRIANGLE]}
LAST_OF_THREE = {"position": "last", "answer": GREEN_TRIANGLE, "options": [RED_CIRCLE, BLUE_SQUARE, GREEN_TRIANGLE]}
RED_TO_WHITE = {"changed": True, "from": "red", "to": "white", "shape": "circle", "asks": "what"}
ANY_CHANGE = {"changed": False, "asks": "yes_no", "yes_means_change": True}  # "Does any shape change colour?"
ALL_KEEP = {"changed": False, "asks": "yes_no", "yes_means_change": False}  # "Does every shape keep its colour?"
# "What does the red circle do during the video?": reference "It moves steadily to the left."
LEFT_THEN_GREEN = {"shape": "circle", "colour": "red", "size": "small", "direction": "left", "change_to": "green"}
# "What does the blue square do during the video?": reference "It stays still the whole time."
STILL_BLUE = {"shape": "square", "colour": "blue", "size": "large", "direction": "none", "change_to": None}

CASES = [
    # colour
    ("colour", RED, "It is red.", True),
    ("colour", RED, "red", True),
    ("colour", RED, "The circle is RED!", True),
    ("colour", RED, "It is a bright red colour.", True),
    ("colour", RED, "It is a red circle on a gray background.", True),  # the background is not the shape's colour
    ("colour", RED, "It is red, not blue.", True),  # a denied other value is harmless
    ("colour", {"colour": "gray", "later_colour": None}, "It is grey.", True),
    ("colour", RED_THEN_WHITE, "It is red at first, then it turns white.", True),
    ("colour", RED_THEN_WHITE, "It is white.", False),
    ("colour", RED, "It's red or blue.", False),  # a hedge
    ("colour", RED, "It is not red, it is blue.", False),  # the expected value denied
    ("colour", RED, "It isn't red.", False),
    ("colour", RED, "Blue.", False),
    ("colour", RED, "", False),
    ("colour", RED, "The circle moves left.", False),  # off topic
    # shape
    ("shape", CIRCLE, "It is a circle.", True),
    ("shape", CIRCLE, "A round disc.", True),
    ("shape", CIRCLE, "It is not a square but a circle.", True),
    ("shape", {"shape": "square"}, "A small box.", True),
    ("shape", CIRCLE, "It's a square.", False),
    ("shape", CIRCLE, "Circle or triangle.", False),
    ("shape", CIRCLE, "It is not a circle.", False),
    ("shape", CIRCLE, "It is red.", False),
    # count
    ("count", THREE_SHAPES, "Three.", True),
    ("count", THREE_SHAPES, "3", True),
    ("count", THREE_SHAPES, "There are 3 shapes.", True),
    ("count", THREE_SHAPES, "There are three shapes: two circles and one square.", True),  # sub-counts are no claim
    ("count", THREE_SHAPES, "There are not two but three shapes.", True),
    ("count", THREE_SHAPES, "Three shapes appear, the red one first.", True),  # "the red one" is a pronoun
    ("count", THREE_SHAPES, "Two or three shapes.", False),
    ("count", THREE_SHAPES, "Four shapes appear.", False),
    ("count", THREE_SHAPES, "Many shapes.", False),
    ("count", TWO_CIRCLES, "There are two circles among three shapes.", True),
    ("count", TWO_CIRCLES, "Two.", True),
    ("count", TWO_CIRCLES, "There is one circle.", False),
    ("count", ONE_SQUARE, "There is a single square.", True),
    ("count", ONE_SQUARE, "There is a square.", True),
    ("count", ONE_SQUARE, "There are no squares.", False),
    # motion: which direction
    ("motion", WHICH_WAY_LEFT, "It moves to the left.", True),
    ("motion", WHICH_WAY_LEFT, "Leftward.", True),
    ("motion", WHICH_WAY_LEFT, "It moves from right to left.", True),
    ("motion", WHICH_WAY_LEFT, "The circle in the lower right moves left.", True),  # a region is not a direction
    ("motion", WHICH_WAY_LEFT, "It moves from left to right.", False),
    ("motion", WHICH_WAY_LEFT, "It moves left or right.", False),
    ("motion", WHICH_WAY_LEFT, "It moves up.", False),
    ("motion", WHICH_WAY_LEFT, "It doesn't move.", False),
    ("motion", WHICH_WAY_LEFT, "It does not move to the left, it moves right.", False),
    # motion: does it move (it does)
    ("motion", MOVES_LEFT, "Yes.", True),
    ("motion", MOVES_LEFT, "Yes, it moves left.", True),
    ("motion", MOVES_LEFT, "It slides leftwards.", True),
    ("motion", MOVES_LEFT, "Yes, it moves to the right.", False),
    ("motion", MOVES_LEFT, "No, it stays still.", False),
    # motion: does it move (it does not)
    ("motion", STILL, "No.", True),
    ("motion", STILL, "No, it stays still the whole time.", True),
    ("motion", STILL, "It doesn't move.", True),
    ("motion", STILL, "It is static.", True),
    ("motion", STILL, "It stays in place.", True),
    ("motion", STILL, "There is no movement.", True),
    ("motion", STILL, "Yes, it moves down.", False),
    ("motion", STILL, "It moves slowly.", False),
    ("motion", STILL, "No, it moves left.", False),  # contradicts itself
    ("motion", STILL, "", False),
    # order
    ("order", FIRST_OF_TWO, "The red circle appears first.", True),
    ("order", FIRST_OF_TWO, "The red circle.", True),
    ("order", FIRST_OF_TWO, "The red one.", True),
    ("order", FIRST_OF_TWO, "The circle.", True),  # names one of the two options
    ("order", FIRST_OF_TWO, "The red circle appears before the blue square.", True),
    ("order", FIRST_OF_TWO, "The blue square appears after the red circle.", True),
    ("order", FIRST_OF_TWO, "The red circle appears first, then the blue square.", True),
    ("order", FIRST_OF_TWO, "The blue square appears first.", False),
    ("order", FIRST_OF_TWO, "The blue square appears before the red circle.", False),
    ("order", FIRST_OF_TWO, "The red circle or the blue square.", False),
    ("order", FIRST_OF_TWO, "The red circle does not appear first.", False),
    ("order", FIRST_OF_TWO, "The blue square appears later.", False),  # true, but does not name the answer
    ("order", FIRST_OF_TWO, "The green triangle.", False),
    ("order", FIRST_OF_THREE, "The red circle is there from the start.", True),
    ("order", FIRST_OF_THREE, "The red circle appears before the blue square.", False),  # earlier is not first of three
    ("order", LAST_OF_THREE, "The green triangle appears last.", True),
    ("order", LAST_OF_THREE, "The triangle is the last to appear.", True),
    ("order", LAST_OF_THREE, "The red circle appears first and the green triangle appears last.", True),
    ("order", LAST_OF_THREE, "The blue square appears last.", False),
    # change: a shape changes
    ("change", RED_TO_WHITE, "The circle changes colour from red to white.", True),
    ("change", RED_TO_WHITE, "The red circle turns white.", True),
    ("change", RED_TO_WHITE, "It becomes white.", True),
    ("change", RED_TO_WHITE, "The red circle next to the blue square turns white.", True),  # "next to" is no change
    ("change", RED_TO_WHITE, "It changes from red to white and stays white until the end.", True),
    ("change", RED_TO_WHITE, "The white circle turns red.", False),  # reversed
    ("change", RED_TO_WHITE, "It turns white or blue.", False),
    ("change", RED_TO_WHITE, "It changes from blue to white.", False),
    ("change", RED_TO_WHITE, "It does not turn white.", False),
    ("change", RED_TO_WHITE, "The circle changes colour.", False),  # no new colour
    ("change", RED_TO_WHITE, "Nothing changes.", False),
    ("change", RED_TO_WHITE, "The circle moves left.", False),
    # change: nothing changes
    ("change", ANY_CHANGE, "No.", True),
    ("change", ANY_CHANGE, "No, every shape keeps its colour throughout.", True),
    ("change", ANY_CHANGE, "No shape changes colour.", True),  # "no" as a determiner, not an answer word
    ("change", ANY_CHANGE, "None of the shapes change colour.", True),
    ("change", ANY_CHANGE, "The colours stay the same.", True),
    ("change", ANY_CHANGE, "Yes.", False),
    ("change", ANY_CHANGE, "Yes, the circle turns blue.", False),
    ("change", ANY_CHANGE, "The red circle turns blue.", False),
    ("change", ALL_KEEP, "Yes.", True),
    ("change", ALL_KEEP, "Yes, no shape changes colour.", True),
    ("change", ALL_KEEP, "No shape changes colour.", True),
    ("change", ALL_KEEP, "No.", False),
    ("change", ALL_KEEP, "No, the square turns green.", False),
    ("change", ALL_KEEP, "Maybe.", False),
    # detail: the motion is needed; extra details may be given, and must be true
    ("detail", LEFT_THEN_GREEN, "It moves steadily to the left.", True),
    ("detail", LEFT_THEN_GREEN, "It slides leftwards.", True),
    ("detail", LEFT_THEN_GREEN, "The small red circle moves left, and late in the video it changes colour to green.", True),
    ("detail", LEFT_THEN_GREEN, "The tiny round shape moves left, then it turns green.", True),  # true extra details
    ("detail", LEFT_THEN_GREEN, "It moves left and is green at the end.", True),  # the colour it changes to
    ("detail", LEFT_THEN_GREEN, "It changes from red to green while moving left.", True),
    ("detail", LEFT_THEN_GREEN, "It moves left at a constant speed.", True),  # "constant" is about the speed
    ("detail", LEFT_THEN_GREEN, "It moves a little to the left.", True),  # "a little" is an amount, not a size
    ("detail", LEFT_THEN_GREEN, "It moves left; it is not large.", True),  # a denied other value is harmless
    ("detail", LEFT_THEN_GREEN, "No, it moves to the left.", True),  # the question is open: yes/no is ignored
    ("detail", LEFT_THEN_GREEN, "The large red circle moves left.", False),  # wrong size
    ("detail", LEFT_THEN_GREEN, "The big circle moves left.", False),
    ("detail", LEFT_THEN_GREEN, "It moves left; it is not small.", False),  # its size denied
    ("detail", LEFT_THEN_GREEN, "The red square moves left.", False),  # wrong kind
    ("detail", LEFT_THEN_GREEN, "It moves left and keeps its colour the whole time.", False),  # it changes
    ("detail", LEFT_THEN_GREEN, "It moves left and does not change colour.", False),
    ("detail", LEFT_THEN_GREEN, "It moves left and does not turn green.", False),
    ("detail", LEFT_THEN_GREEN, "It moves left, then it turns blue.", False),  # wrong new colour
    ("detail", LEFT_THEN_GREEN, "It moves left and changes colour from yellow to green.", False),  # wrong old colour
    ("detail", LEFT_THEN_GREEN, "The purple circle moves left.", False),  # a colour it never has
    ("detail", LEFT_THEN_GREEN, "It moves to the right.", False),  # wrong direction
    ("detail", LEFT_THEN_GREEN, "It moves left or right.", False),
    ("detail", LEFT_THEN_GREEN, "It stays still.", False),  # says still when it moves
    ("detail", LEFT_THEN_GREEN, "The small red circle turns green.", False),  # no motion
    ("detail", STILL_BLUE, "It stays still the whole time.", True),
    ("detail", STILL_BLUE, "The large blue square stays still, and it keeps its colour the whole time.", True),
    ("detail", STILL_BLUE, "It does not move, and it does not change.", True),
    ("detail", STILL_BLUE, "The big blue box is motionless.", True),
    ("detail", STILL_BLUE, "It stays in place, blue and not red.", True),
    ("detail", STILL_BLUE, "It stays still and then turns red.", False),  # a false change
    ("detail", STILL_BLUE, "It stays still, but it changes colour.", False),
    ("detail", STILL_BLUE, "The small blue square stays still.", False),  # wrong size
    ("detail", STILL_BLUE, "It stays still; it is not blue.", False),  # its colour denied
    ("detail", STILL_BLUE, "It moves slowly.", False),  # says it moves when it stays still
    ("detail", STILL_BLUE, "It stays still, then moves up.", False),
    ("detail", STILL_BLUE, "The large blue square.", False),  # no motion
]


@pytest.mark.parametrize("kind, facts, answer, correct", CASES, ids=[f"{k}:{a or '<empty>'}" for k, _, a, _ in CASES])
def test_hand_written_answers(kind, facts, answer, correct):
    verdict = judge_answer(facts, kind, answer)
    assert verdict.correct is correct, verdict.reason
    assert verdict.reason


def test_cases_cover_every_kind_both_ways():
    assert {(k, c) for k, _, _, c in CASES} == {(k, c) for k in QUESTION_KINDS for c in (True, False)}


def test_parse_answer_marks_negation_per_clause_and_takes_the_leading_yes_no():
    parsed = parse_answer("No, it isn't red but it's blue; not green.")
    assert parsed.polarity == "no"
    assert [[(w.text, w.negated) for w in c if w.text in ("red", "blue", "green")] for c in parsed.clauses] == [
        [("red", True)], [("blue", False)], [("green", True)]]
    assert parse_answer("No shape changes.").polarity is None  # a determiner
    assert parse_answer("Yeah it does").polarity == "yes"


def test_unknown_kind_is_an_error():
    with pytest.raises(ValueError, match="unknown question kind"):
        judge_answer({}, "size", "small")


def test_every_kind_has_a_judge():
    assert set(JUDGES) == set(QUESTION_KINDS)


SCENES = [random_scene(seed, max_shapes=4) for seed in range(200)]


def test_every_reference_answer_is_correct():
    kinds = set()
    for scene in SCENES:
        for q in scene_questions(scene):
            verdict = judge_answer(q.facts, q.kind, q.answer)
            assert verdict.correct, (scene.seed, q, verdict)
            kinds.add(q.kind)
    assert kinds == set(QUESTION_KINDS)


def test_every_full_answer_is_correct():
    full = [q for scene in SCENES for q in scene_questions(scene) if q.full_answer is not None]
    assert {q.kind for q in full} == {"detail"} and len(full) == len(SCENES)
    for q in full:
        verdict = judge_answer(q.facts, q.kind, q.full_answer)
        assert verdict.correct, (q, verdict)


def test_full_answer_of_another_shape_is_wrong():
    """Another scene's full answer with any other fact (size, kind, colour, motion, change) is wrong:
    every detail a full answer gives is checked."""
    details = [q for scene in SCENES for q in scene_questions(scene) if q.kind == "detail"]
    checked = 0
    for q in details:
        for other in details:
            if other.facts != q.facts:
                verdict = judge_answer(q.facts, "detail", other.full_answer)
                assert not verdict.correct, (q.facts, other.full_answer, verdict)
                checked += 1
    assert checked > 30_000


def _truth(q) -> object:
    """The value a question's answer must state, to find another question with a different one."""
    f = q.facts
    return {"colour": lambda: f["colour"], "shape": lambda: f["shape"], "count": lambda: f["count"],
            "motion": lambda: f["direction"], "order": lambda: (f["answer"]["colour"], f["answer"]["kind"]),
            "change": lambda: (f["changed"], f.get("to")), "detail": lambda: f["direction"]}[q.kind]()


def test_reference_answer_of_another_scene_with_another_value_is_wrong():
    questions = [q for scene in SCENES for q in scene_questions(scene)]
    rng = random.Random(0)
    checked = dict.fromkeys(QUESTION_KINDS, 0)
    for q in questions:
        for other in rng.sample(questions, 30):
            if other.kind == q.kind and _truth(other) != _truth(q):
                verdict = judge_answer(q.facts, q.kind, other.answer)
                assert not verdict.correct, (q, other.answer, verdict)
                checked[q.kind] += 1
    assert min(checked.values()) > 100, checked


# ---------------------------------------------------------------------------------------- scoring a run


def _candidate(qa_id: str, k: int, answer: str) -> Candidate:
    return Candidate(id=f"{qa_id}#{k}", qa_id=qa_id, video_id=qa_id.rsplit("_", 1)[0], answer=answer, model="m",
                     seed=k, temperature=1.0, top_p=1.0)


def test_oracle_scores_a_run_and_agree_reads_them(tmp_path):
    run_dir = tmp_path / "run"
    runner = CliRunner()
    for stage in ("data", "qa"):
        result = runner.invoke(app, [stage, "--run-dir", str(run_dir), "--set", "data.synthetic_videos=3"],
                               catch_exceptions=False)
        assert result.exit_code == 0, result.output
    qa = RecordFile(run_dir / "qa.jsonl", QAItem)
    items = qa.all()
    # an LLM-written question about a synthetic clip: no truth, so skipped
    qa.append(QAItem(id="synth_0000_99", video_id="synth_0000", question="Is it pretty?", answer="Yes.", source="llm:x"))
    assert len({i.video_id for i in items}) == 3
    candidates = [_candidate(q.id, 0, q.answer) for q in items]  # the reference: right
    candidates += [_candidate(q.id, 1, "I am not sure.") for q in items]  # states nothing: wrong
    candidates += [_candidate("synth_0000_99", 0, "Yes."), _candidate("nope_0", 0, "Red.")]
    RecordFile(run_dir / "candidates.jsonl", Candidate).write(candidates)

    out = tmp_path / "oracle.jsonl"
    result = runner.invoke(app, ["judge", "oracle", "--run-dir", str(run_dir), "--out", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert f"{2 * len(items)} answers scored" in result.output
    assert "1 skipped: unknown qa id (e.g. nope_0#0)" in result.output
    assert "1 skipped: question is not one the scene generator asks" in result.output
    scores = load_scores(out)
    assert scores == {**{f"{q.id}#0": 1.0 for q in items}, **{f"{q.id}#1": 0.0 for q in items}}
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert {r["kind"] for r in rows} >= {"colour", "shape", "count", "motion", "change"} and all(r["reason"] for r in rows)
    report = agreement(scores, scores)
    assert report.b_is_binary and report.auroc == 1.0


def test_a_run_without_synthetic_scenes_is_an_error(tmp_path):
    RecordFile(tmp_path / "qa.jsonl", QAItem).write([QAItem(id="v_0", video_id="v", question="Q?", answer="A.")])
    RecordFile(tmp_path / "candidates.jsonl", Candidate).write([_candidate("v_0", 0, "A.")])
    result = CliRunner().invoke(app, ["judge", "oracle", "--run-dir", str(tmp_path), "--out", str(tmp_path / "o.jsonl")])
    assert result.exit_code != 0 and "no synthetic scenes" in str(result.exception)


def test_find_question_matches_text_not_index():
    scene = random_scene(5)
    questions = scene_questions(scene)
    q = questions[2]
    item = QAItem(id="synth_0000_7", video_id="synth_0000", question=q.question, answer=q.answer)  # index is wrong
    assert find_question(item, {"synth_0000": scene}) == q
    with pytest.raises(Unscorable, match="not one the scene generator asks"):
        find_question(item.model_copy(update={"answer": "Edited."}), {"synth_0000": scene})
    with pytest.raises(Unscorable, match="no synthetic scene"):
        find_question(item, {})
    scored = oracle_scores([Answer("synth_0000_7#0", "synth_0000_7", q.answer)], {"synth_0000_7": item}, {})
    assert not scored.rows and scored.skipped == {"video has no synthetic scene": 1}
