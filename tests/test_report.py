"""The static HTML report, on a tiny fake run folder written through RecordFile.

One video is an mp4 made with PyAV (thumbnails decoded from it), the other a frame folder of
JPEGs under frames/ (thumbnails taken from there). Further tests add a second DPO round, a
benchmark suite's evaluation and a judge-agreement study."""

from __future__ import annotations

import json
import re
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from capdpo.config import RunConfig
from capdpo.records import Candidate, EvalSummary, Judgment, Prediction, PreferencePair, QAItem, Video
from capdpo.report import write_report
from capdpo.rundir import RunPaths

EVIL = "<script>alert(1)</script>"
JUDGE = {"judge_backend": "hf", "judge_model": "judge-llm", "template": "caption_reward", "template_hash": "abc123", "prompt_hash": "p"}


def make_mp4(path: Path, n: int = 6) -> None:
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=5)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(n):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 30 * i, np.uint8), format="rgb24")
            out.mux(stream.encode(frame))
        out.mux(stream.encode())


def make_frame_folder(folder: Path, n: int = 5) -> None:
    folder.mkdir(parents=True)
    for i in range(n):
        Image.new("RGB", (64, 48), (40 * i, 100, 200)).save(folder / f"{i + 1:05d}.jpg")


def judgment(target: str, qa_id: str, score: float | None, reply: str) -> Judgment:
    failure = None if score is not None else "no valid score 1-5 in reply after 2 attempt(s)"
    return Judgment(id=target, target_id=target, qa_id=qa_id, score=score, failure=failure, raw_reply=reply, **JUDGE)


@pytest.fixture
def run(tmp_path: Path) -> RunPaths:
    paths = RunPaths(tmp_path / "run")
    make_mp4(tmp_path / "clip.mp4")
    make_frame_folder(paths.frames / "v1")
    paths.videos.write([Video(id="v0", video=str(tmp_path / "clip.mp4"), caption="a ball rolls", split="train"),
                        Video(id="v1", video=str(tmp_path / "missing.mp4"), caption="a cat sits", split="test")])
    paths.qa.write([QAItem(id="v0_0", video_id="v0", question="What rolls?", answer="a ball"),
                    QAItem(id="v1_0", video_id="v1", question="What sits?", answer="a cat", split="test")])
    cands = [Candidate(id=f"v0_0#{k}", qa_id="v0_0", video_id="v0", answer=a, model="pol", seed=k, temperature=1.0, top_p=0.95)
             for k, a in enumerate(["a ball", EVIL, "nothing"])]
    paths.candidates.write(cands)
    paths.judgments.write([judgment("v0_0#0", "v0_0", 5, "Score: 5. Matches the caption exactly."),
                           judgment("v0_0#1", "v0_0", 1, "Score: 1. Not a ball & wrong."),
                           judgment("v0_0#2", "v0_0", None, "I cannot decide")])
    paths.pairs.write([PreferencePair(id="v0_0", qa_id="v0_0", video_id="v0", video=str(tmp_path / "clip.mp4"),
                                      prompt="What rolls?", answer="a ball", chosen="a ball", rejected=EVIL,
                                      chosen_score=5, rejected_score=1, chosen_id="v0_0#0", rejected_id="v0_0#1")])
    paths.train.mkdir()
    steps = [{"step": s, "epoch": s / 4, "lr": 1e-5, "loss": 0.69 - 0.1 * s, "rewards/chosen": 0.1 * s,
              "rewards/rejected": -0.1 * s, "rewards/accuracies": min(1.0, 0.5 + 0.2 * s), "rewards/margins": 0.2 * s,
              "logps/chosen": -10.0, "logps/rejected": -12.0, "grad_norm": 1.0} for s in range(1, 5)]
    (paths.train / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in steps) + '{"step": 5, "lo')
    for tag, ans, score in (("before", "a dog", 2), ("after", "a cat", 4)):
        paths.predictions(tag).write([Prediction(id="v1_0", qa_id="v1_0", video_id="v1", answer=f"{tag}: {ans}", model=tag)])
        paths.eval_judgments(tag).write([judgment("v1_0", "v1_0", score, f"Score: {score}. {tag} reply")])
    paths.eval_summary.write([
        EvalSummary(id="before", model="base", questions=1, judged=1, failed=0, accuracy=0.0, mean_score=2.0, pass_score=3.0,
                    **{k: v for k, v in JUDGE.items() if k != "prompt_hash"}),
        EvalSummary(id="after", model="dpo", questions=1, judged=1, failed=0, accuracy=1.0, mean_score=4.0, pass_score=3.0,
                    **{k: v for k, v in JUDGE.items() if k != "prompt_hash"})])
    return paths


def test_full_report(run: RunPaths) -> None:
    out = write_report(run, RunConfig(run_dir=str(run.root)))
    assert out == run.report and out.exists()
    page = out.read_text()
    for title in ("Records per stage", "Judge scores", "Preference pairs", "DPO training", "Evaluation before vs after DPO",
                  "Judge agreement", "Preference pairs browser", "Example evaluation answers"):
        assert title in page
    assert "not run yet" not in page  # every stage has data
    assert "no judge-agreement study" in page  # optional: said so, not "not run yet"
    assert "<td>videos (train)</td><td>1</td>" in page and "<td>videos (test)</td><td>1</td>" in page
    assert "<td>candidates</td><td>3</td>" in page
    assert "<td>judgments scored</td><td>2</td>" in page and "<td>judgments failed</td><td>1</td>" in page
    assert "<td>preference pairs</td><td>1</td>" in page
    assert "judge-llm" in page and "abc123" in page and str(run.root) in page
    # record text is escaped, never injected
    assert EVIL not in page and html_escaped(EVIL) in page
    assert "Not a ball &amp; wrong." in page and "Matches the caption exactly." in page
    # the one pair's video (an mp4, no frame folder) gives 4 decoded thumbnails
    assert page.count("data:image/jpeg;base64,") == 4
    assert page.count("data:image/png;base64,") >= 5  # counts, scores, pairs, training, eval charts
    assert "before: a dog" in page and "after: a cat" in page and "after reply" in page
    # after minus before on the held-out question, with its paired bootstrap interval
    assert "After minus before" in page
    row = "<td>0.0%</td><td>100.0%</td><td>+100.0 [+100.0, +100.0]</td><td>+2.00 [+2.00, +2.00]</td><td>paired</td>"
    # shown twice: at a glance under the header, and in the evaluation section
    assert page.count(row) == 2 and page.index('id="result"') < page.index(row) < page.index("Records per stage")
    assert "<tr><td>4</td><td>1</td><td>0.29</td>" in page  # 4 steps: the torn last metrics line is skipped
    assert not re.search(r"https?://", page)


def test_synthetic_clips_held_out_answers_are_graded_by_the_oracle_after_minus_before(run: RunPaths) -> None:
    from capdpo.media.synthetic import random_scene, scene_questions
    from capdpo.oracle import run_scenes_path
    from capdpo.records import write_jsonl

    scene = random_scene(5)
    asked = [q for q in scene_questions(scene) if q.kind in ("colour", "shape", "count")]
    write_jsonl(run_scenes_path(run.root), [{"id": "s0", "video": "s0.mp4", "scene": scene.to_dict()}])
    synthetic = [QAItem(id=f"s0_{i}", video_id="s0", question=q.question, answer=q.answer, split="test") for i, q in enumerate(asked)]
    run.qa.write(run.qa.all() + synthetic)
    for tag, answer in (("before", lambda q: "I cannot tell."), ("after", lambda q: q.answer)):
        rows = run.predictions(tag).all() + [Prediction(id=item.id, qa_id=item.id, video_id="s0", answer=answer(q), model=tag)
                                             for item, q in zip(synthetic, asked)]
        run.predictions(tag).write(rows)
    page = write_report(run, RunConfig(run_dir=str(run.root))).read_text()
    row = (f"<td>held-out, graded by the oracle (synthetic clips)</td><td>after vs before</td><td>{len(asked)}</td>"
           "<td>0.0%</td><td>100.0%</td><td>+100.0 [+100.0, +100.0]</td>")
    assert row in page, "only the synthetic clips' questions, each right after and wrong before"


def html_escaped(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def test_thumbnails_from_frame_folder(run: RunPaths) -> None:
    # v1's video file does not exist: its thumbnails must come from frames/v1
    pairs = run.pairs.all()
    run.pairs.write([pairs[0].model_copy(update={"id": "v1_0", "video_id": "v1", "video": "missing.mp4"})])
    page = write_report(run, RunConfig(run_dir=str(run.root))).read_text()
    assert page.count("data:image/jpeg;base64,") == 4


def test_empty_run(tmp_path: Path) -> None:
    paths = RunPaths(tmp_path / "run")
    paths.videos.write([Video(id="v0", video="nowhere.mp4", caption="x")])
    page = write_report(paths, RunConfig(run_dir=str(paths.root))).read_text()
    assert "<td>videos (train)</td><td>1</td>" in page
    assert page.count("not run yet") == 6  # all but the counts
    assert "(not judged yet)" in page
    assert not re.search(r"https?://", page)


def summary(id_: str, tag: str, accuracy: float, **fields) -> EvalSummary:
    base = dict(model="pol", questions=2, judged=2, failed=0, accuracy=accuracy, mean_score=1 + 4 * accuracy, pass_score=3.0,
                **{k: v for k, v in JUDGE.items() if k != "prompt_hash"})
    return EvalSummary(id=id_, tag=tag, **{**base, **fields})


def add_round_two(run: RunPaths) -> RunPaths:
    """A second DPO round: its own candidates, judgments, pairs, metrics and 'after' evaluation."""
    r2 = run.round(2)
    r2.candidates.write([Candidate(id="v0_0#r2", qa_id="v0_0", video_id="v0", answer="a red ball", model="r1", seed=0,
                                   temperature=1.0, top_p=0.95)])
    r2.judgments.write([judgment("v0_0#r2", "v0_0", 4, "Score: 4. round two reply"),
                        judgment("v0_0#r2b", "v0_0", 2, "Score: 2. worse")])
    r2.pairs.write([PreferencePair(id="v0_0", qa_id="v0_0", video_id="v0", video="clip.mp4", prompt="What rolls?",
                                   answer="a ball", chosen="a red ball", rejected="a cube", chosen_score=4, rejected_score=2,
                                   chosen_id="v0_0#r2", rejected_id="v0_0#r2b")])
    r2.train.mkdir(parents=True)
    (r2.train / "metrics.jsonl").write_text(json.dumps({"step": 1, "epoch": 1.0, "loss": 0.5, "rewards/margins": 0.7}) + "\n")
    r2.predictions("after").write([Prediction(id="v1_0", qa_id="v1_0", video_id="v1", answer="round 2: a cat", model="r2")])
    r2.eval_judgments("after").write([judgment("v1_0", "v1_0", 5, "Score: 5. r2 reply")])
    r2.eval_summary.write([summary("after", "after", 1.0, round=2)])
    return r2


def test_rounds_and_suites_in_report(run: RunPaths) -> None:
    add_round_two(run)
    # a benchmark suite evaluated before and after, video_chatgpt protocol, with a skipped question
    run.suite_questions("msvd_qa").write([QAItem(id="m1", video_id="v1", question="Who sits?", answer="a cat", split="test")])
    for tag, acc in (("before", 0.0), ("after", 1.0)):
        run.predictions(tag, "msvd_qa").write([Prediction(id="m1", qa_id="m1", video_id="v1", answer=f"msvd {tag}", model=tag)])
        run.eval_judgments(tag, "msvd_qa").write([judgment("m1", "m1", 4, f"{{'pred': 'yes', 'score': 4}} {tag}")])
    run.eval_summary.write(run.eval_summary.all() + [
        summary(f"msvd_qa/{tag}", tag, acc, dataset="msvd_qa", protocol="video_chatgpt", skipped=1)
        for tag, acc in (("before", 0.0), ("after", 1.0))])

    page = write_report(run.round(2), RunConfig(run_dir=str(run.root), rounds=2)).read_text()  # from round 2's paths too
    assert (run.root / "report.html").exists() and not (run.root / "round-2" / "report.html").exists()
    assert "<th>round 1</th><th>round 2</th>" in page  # records per stage, one column per round
    assert "<td>candidates</td><td>3</td><td>1</td>" in page and "<td>preference pairs</td><td>1</td><td>1</td>" in page
    assert "<td>MSVD-QA</td>" in page and "video_chatgpt" in page and "round 2 after" in page
    assert "round 2: a cat" in page and "r2 reply" in page and "msvd after" in page  # examples of every evaluation
    assert "round two reply" in page  # round 2's pair in the browser, with its judge reply
    assert "<td>round 2 after vs before</td>" in page  # the difference is to the last round's policy
    assert not re.search(r"https?://", page)


def test_multiple_choice_in_report(run: RunPaths) -> None:
    from capdpo.evaluation.mc.items import MCItem
    from capdpo.evaluation.mc.score import summarize_mc
    from capdpo.records import MCPrediction

    items = [MCItem(f"action_sequence_{i}", ("v",), "Q?", ("a", "b"), "A", {"task": "action_sequence"}) for i in range(6)]
    for tag, right in (("before", 5), ("after", 2)):
        rows = {item.id: MCPrediction(id=item.id, answer="(A)", extracted="A" if k < right else "B", correct=k < right,
                                      categories=item.categories, frames=16, pixels=50176) for k, item in enumerate(items)}
        run.mc_predictions(tag, "mvbench").write(rows.values())
        run.eval_summary.upsert(summarize_mc(tag, "mvbench", items, rows, model="pol", categories=["task"], extractor="official",
                                             prompt="mvbench: OpenGVLab/Ask-Anything mvbench.ipynb", prompt_hash="feed", scoring="rules"))
    page = write_report(run, RunConfig(run_dir=str(run.root))).read_text()
    assert "Multiple-choice benchmarks (scored by rules, no judge)" in page
    assert "<td>MVBench</td><td>1</td><td>before</td><td>pol</td><td>6</td><td>6</td><td>0</td><td>83.3% [" in page
    assert "<td>official (rules)</td><td>mvbench: OpenGVLab/Ask-Anything mvbench.ipynb feed</td><td>16</td><td>50176</td>" in page
    assert "<td>MVBench</td><td>after vs before</td><td>6</td><td>83.3%</td><td>33.3%</td><td>-50.0 [" in page
    assert "<td>MVBench</td><td>task</td><td>action_sequence</td><td>6</td><td>83.3%</td><td>33.3%</td>" in page
    assert "judge  / " not in page  # a rule-scored evaluation names no judge in the header


def test_agreement_section(run: RunPaths) -> None:
    from capdpo.evaluation.agreement import agreement, save_agreement

    a = {"q1#0": 5.0, "q1#1": 1.0, "q2#0": 4.0, "q2#1": None}
    b = {"q1#0": 4.0, "q1#1": 2.0, "q2#0": 4.0, "q2#1": 3.0}
    save_agreement(run.agreement, agreement(a, b), "caption judge", "frame judge")
    save_agreement(run.agreement, agreement(a, b), "caption judge", "frame judge")  # same study: replaced, not added
    assert len(json.loads(run.agreement.read_text())) == 1
    page = write_report(run, RunConfig(run_dir=str(run.root))).read_text()
    assert "caption judge vs frame judge" in page and "Pearson r" in page and "<td>answers compared</td><td>3</td>" in page
    assert "no judge-agreement study" not in page


def test_a_distilled_judges_held_out_agreement_is_shown(run: RunPaths, tmp_path: Path) -> None:
    """A run judged by a `capdpo judge distill` folder shows how that student agreed with its
    teacher on held-out videos (its folder's agreement.json)."""
    from capdpo.evaluation.agreement import agreement, save_agreement

    student = tmp_path / "student"
    student.mkdir()
    save_agreement(student / "agreement.json", agreement({"a": 4.8, "b": 1.2}, {"a": 1.0, "b": 0.0}), "student", "oracle")
    page = write_report(run, RunConfig(run_dir=str(run.root), judge={"llm": {"model": str(student)}})).read_text()
    assert f"{html_escaped(str(student))} (student, held-out, at distillation) vs oracle" in page
    assert "AUROC of" in page
