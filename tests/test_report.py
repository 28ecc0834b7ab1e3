"""The static HTML report, on a tiny fake run folder written through RecordFile.

One video is an mp4 made with PyAV (thumbnails decoded from it), the other a frame folder of
JPEGs under frames/ (thumbnails taken from there)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from capdpo.config import RunConfig
from capdpo.pipeline import RunPaths
from capdpo.records import Candidate, EvalSummary, Judgment, PreferencePair, Prediction, QAItem, Video
from capdpo.report import write_report

EVIL = "<script>alert(1)</script>"
JUDGE = dict(judge_backend="hf", judge_model="judge-llm", template="caption_reward", template_hash="abc123", prompt_hash="p")


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
                  "Example preference pairs", "Example evaluation answers"):
        assert title in page
    assert "not run yet" not in page  # every stage has data
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
    assert "<tr><td>4</td><td>1</td><td>0.29</td>" in page  # 4 steps: the torn last metrics line is skipped
    assert not re.search(r"https?://", page)


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
