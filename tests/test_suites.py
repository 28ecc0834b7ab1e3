"""Benchmark suites: loaders for the paper's test files, media lookup, missing media, and the two
judge protocols' accuracy rules (with a scripted judge, no model)."""

from __future__ import annotations

import json
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from capdpo.config import JudgeConfig, LLMConfig
from capdpo.evaluation.stage import accuracy_of, format_summary, summarize
from capdpo.evaluation.suites import SUITES, MissingMediaError, load_suite, resolve_video
from capdpo.judge.judge import CaptionJudge
from capdpo.llm import Reply
from capdpo.records import Judgment, RecordError


class FunctionLLM:
    """A judge LLM whose reply is ``reply(prompt)``; records every prompt it was sent."""

    backend = "scripted"
    model_id = "scripted-judge"

    def __init__(self, reply):
        self.reply, self.prompts = reply, []

    def chat(self, prompts, **_):
        self.prompts += prompts
        return [Reply(self.reply(p), 0.0) for p in prompts]


def frame_folder(folder: Path, n: int = 3) -> None:
    folder.mkdir(parents=True)
    for i in range(n):
        Image.new("RGB", (32, 24), (60 * i, 90, 120)).save(folder / f"{i:03d}.jpg")


def mp4(path: Path, n: int = 4) -> None:
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=4)
        stream.width, stream.height, stream.pix_fmt = 32, 24, "yuv420p"
        for i in range(n):
            out.mux(stream.encode(av.VideoFrame.from_ndarray(np.full((24, 32, 3), 40 * i, np.uint8), format="rgb24")))
        out.mux(stream.encode())


def sharegpt(id_: str, video: str, question: str, answer: str, **extra) -> dict:
    return {"id": id_, "video": video, "conversations": [{"from": "human", "value": f"<video>\n{question}"},
                                                        {"from": "gpt", "value": answer}], **extra}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def media(tmp_path) -> Path:
    """Videos as LLaVA-Hound ships them (frame folders) and as files."""
    root = tmp_path / "video_data"
    frame_folder(root / "vid1")  # named 'vid1' in the rows: a frame folder
    frame_folder(root / "vid4")  # named 'vid4.avi' in the rows: frames extracted from the file
    root.mkdir(exist_ok=True)
    mp4(root / "vid2.mp4")  # named 'vid2.mp4'
    mp4(root / "vid3.mp4")  # named 'vid3': the suffix is found
    return root


def test_caption_suite_reads_rows_captions_and_media(tmp_path, media):
    data = write_jsonl(tmp_path / "test" / "webvid.qa.jsonl", [
        sharegpt("vid1_0", "vid1", "What moves?", "A ball.", caption="A red ball rolls left."),
        sharegpt("vid1_1", "vid1", "What color?", "Red."),
        {"idx": "vid2_0", "video": "vid2.mp4", "question": "Who waves?", "answer": "A man."},  # flat row, 'idx'
        sharegpt("vid3_0", "vid3", "Where?", "In a park."),
        sharegpt("vid4_0", "vid4.avi", "When?", "At night."),
    ])
    write_jsonl(tmp_path / "test" / "webvid.caption.jsonl", [  # found beside the QA file by name
        {"video": "vid2", "caption": "A man waves at the camera."},
        {"id": "vid3", "video": "/elsewhere/vid3.mp4", "caption": "Children play in a park."},
        {"id": "vid4", "conversations": [{"from": "human", "value": "<video>\nDescribe."}, {"from": "gpt", "value": "A dark street."}]},
    ])
    bench = load_suite("webvid", tmp_path / "test", video_root=media)  # a folder: the suite's file name is looked up
    assert bench.source == data and bench.skipped == 0 and bench.suite.protocol == "caption_reward"
    assert [q.id for q in bench.questions] == ["vid1_0", "vid1_1", "vid2_0", "vid3_0", "vid4_0"]
    assert all(q.split == "test" for q in bench.questions)
    assert bench.questions[0].question == "What moves?" and bench.questions[0].answer == "A ball."
    v = bench.videos
    assert v["vid1"].video == str(media / "vid1") and v["vid1"].caption == "A red ball rolls left."
    assert v["vid2"].video == str(media / "vid2.mp4") and v["vid2"].caption == "A man waves at the camera."
    assert v["vid3"].video == str(media / "vid3.mp4") and v["vid3"].caption == "Children play in a park."
    assert v["vid4"].video == str(media / "vid4") and v["vid4"].caption == "A dark street."


def test_missing_videos_are_listed_or_skipped(tmp_path, media):
    rows = [sharegpt("vid1_0", "vid1", "Q?", "A.")] + [sharegpt(f"gone{i}_0", f"gone{i}", "Q?", "A.") for i in range(7)]
    data = write_jsonl(tmp_path / "msvd.qa.official.jsonl", rows)
    with pytest.raises(MissingMediaError) as err:
        load_suite("msvd_qa", data, video_root=media)
    message = str(err.value)
    assert "7 of 8 videos not found" in message and str(media) in message and "gone0, gone1, gone2, gone3, gone4" in message
    assert "and 2 more" in message and "gone6" not in message and "--skip-missing" in message

    bench = load_suite("msvd_qa", data, video_root=media, skip_missing=True)
    assert bench.skipped == 7 and [q.id for q in bench.questions] == ["vid1_0"]
    assert bench.videos["vid1"].caption == ""  # official QA: no caption needed


def test_caption_suite_needs_captions(tmp_path, media):
    data = write_jsonl(tmp_path / "msrvtt.qa.jsonl", [sharegpt("vid1_0", "vid1", "Q?", "A.", caption="Cap."),
                                                      sharegpt("vid2_0", "vid2.mp4", "Q?", "A.")])
    with pytest.raises(MissingMediaError, match=r"1 of 2 videos without a caption.*vid2.*--captions"):
        load_suite("msrvtt", data, video_root=media)
    captions = write_jsonl(tmp_path / "caps.jsonl", [{"id": "vid2", "caption": "Given apart."}])
    assert load_suite("msrvtt", data, video_root=media, captions=captions).videos["vid2"].caption == "Given apart."
    assert load_suite("msrvtt", data, video_root=media, skip_missing=True).skipped == 1


def test_activitynet_qa_video_chatgpt_format(tmp_path, media):
    (media / "v_abc.mp4").write_bytes((media / "vid2.mp4").read_bytes())  # Video-ChatGPT's v_ prefix
    folder = tmp_path / "activitynet_qa"
    folder.mkdir()
    (folder / "test_q.json").write_text(json.dumps([
        {"video_name": "abc", "question": "what is the man doing", "question_id": "v_abc_1"},
        {"video_name": "vid1", "question": "is it indoors", "question_id": "vid1_2"}]))
    (folder / "test_a.json").write_text(json.dumps([
        {"answer": "yes", "type": 3, "question_id": "vid1_2"},
        {"answer": "dancing", "type": 0, "question_id": "v_abc_1"}]))
    bench = load_suite("activitynet_qa", folder, video_root=media)
    assert bench.suite.protocol == "video_chatgpt"
    assert [(q.id, q.video_id, q.answer, q.source) for q in bench.questions] == [
        ("v_abc_1", "abc", "dancing", "type:0"), ("vid1_2", "vid1", "yes", "type:3")]
    assert bench.videos["abc"].video == str(media / "v_abc.mp4") and bench.videos["vid1"].video == str(media / "vid1")

    (folder / "test_a.json").write_text(json.dumps([{"answer": "yes", "type": 3, "question_id": "vid1_2"}]))
    with pytest.raises(RecordError, match=r"test_q.json\[0\].*v_abc_1 has no answer"):
        load_suite("activitynet_qa", folder, video_root=media)


def test_bad_rows_are_named(tmp_path, media):
    bad = tmp_path / "tgif.qa.official.jsonl"
    bad.write_text(json.dumps(sharegpt("a", "vid1", "Q?", "A.")) + "\n" + json.dumps({"id": "b", "video": "vid1"}) + "\n")
    with pytest.raises(RecordError, match=r"tgif.qa.official.jsonl:2: field 'question'"):
        load_suite("tgif_qa", bad, video_root=media)
    write_jsonl(bad, [sharegpt("a", "vid1", "Q?", "A."), sharegpt("a", "vid2.mp4", "Q2?", "A2.")])
    with pytest.raises(RecordError, match=r":2: question id 'a' already used at .*:1"):
        load_suite("tgif_qa", bad, video_root=media)
    with pytest.raises(ValueError, match="unknown suite 'nope'.*msvd_qa"):
        load_suite("nope", bad)
    with pytest.raises(FileNotFoundError, match="none of tgif.qa.official.jsonl"):
        load_suite("tgif_qa", tmp_path / "video_data")


def test_max_questions_and_default_video_root(tmp_path):
    frame_folder(tmp_path / "clips" / "x")
    data = write_jsonl(tmp_path / "tgif.qa.official.jsonl", [sharegpt(f"x_{i}", "clips/x", f"Q{i}?", "A.") for i in range(5)]
                       + [sharegpt("y_0", "clips/missing", "Q?", "A.")])
    bench = load_suite("tgif_qa", data, max_questions=3)  # videos relative to the data file; the missing one is past the limit
    # the video's id is its name without the folders before it: a safe name (capdpo.ids)
    assert [q.id for q in bench.questions] == ["x_0", "x_1", "x_2"] and bench.videos["x"].video == str(tmp_path / "clips" / "x")


def test_resolve_video_order(tmp_path):
    frame_folder(tmp_path / "a")
    mp4(tmp_path / "a.mp4")
    assert resolve_video(("a",), tmp_path) == tmp_path / "a"  # the name as given wins
    assert resolve_video(("a.mp4",), tmp_path) == tmp_path / "a.mp4"
    assert resolve_video(("nothing", "a"), tmp_path) == tmp_path / "a"  # alternatives in order
    assert resolve_video(("nothing",), tmp_path) is None


def test_every_suite_has_its_protocol():
    official = {"msvd_qa", "msrvtt_qa", "tgif_qa", "activitynet_qa"}
    assert {n for n, s in SUITES.items() if s.protocol == "video_chatgpt"} == official
    assert {n for n, s in SUITES.items() if s.protocol == "caption_reward"} == {"webvid", "vidal", "activitynet", "msrvtt",
                                                                                "msvd", "tgif", "ssv2"}
    assert [SUITES[n].title for n in ("msvd_qa", "msrvtt_qa", "tgif_qa")] == ["MSVD-QA", "MSRVTT-QA", "TGIF-QA"]


# -- the two protocols' numbers ----------------------------------------------------------------

JUDGE = {"judge_backend": "scripted", "judge_model": "scripted-judge", "template": "t", "template_hash": "h", "prompt_hash": "p"}


def judged(i: int, score: float | None, verdict: str | None = None) -> Judgment:
    return Judgment(id=f"q{i}", target_id=f"q{i}", qa_id=f"q{i}", score=score, verdict=verdict,
                    failure=None if score is not None else "no valid reply", **JUDGE)


def test_caption_reward_accuracy_excludes_failures():
    judgments = [judged(0, 5), judged(1, 3), judged(2, 2.5), judged(3, None), judged(4, 1)]
    assert accuracy_of(judgments, "caption_reward", 3.0) == (0.5, 0)  # 2 of the 4 judged; the failure is not a wrong answer
    judge = CaptionJudge(JudgeConfig(llm=LLMConfig(backend="openai", model="scripted-judge")), ".", llm=FunctionLLM(str))
    s = summarize("after", "pol", 6, judgments, judge, 3.0, dataset="msrvtt", skipped=1)
    assert (s.id, s.dataset, s.protocol, s.judged, s.failed, s.skipped, s.accuracy) == ("msrvtt/after", "msrvtt", "caption_reward",
                                                                                         4, 1, 1, 0.5)
    assert s.mean_score == pytest.approx((5 + 3 + 2.5 + 1) / 4)
    line = format_summary(s)
    assert "accuracy 50.0% (score>=3)" in line and "1 failed of 6" in line and "1 skipped" in line
    assert "scripted-judge" in line and judge.template.hash in line


def test_video_chatgpt_accuracy_is_yes_over_yes_and_no():
    judgments = [judged(0, 4, "yes"), judged(1, 1, "no"), judged(2, 5, "yes"), judged(3, None), judged(4, 3, None)]
    assert accuracy_of(judgments, "video_chatgpt", 3.0) == (2 / 3, 1)  # the tied verdict is 'undecided'
    cfg = JudgeConfig(llm=LLMConfig(backend="openai", model="scripted-judge"), protocol="video_chatgpt")
    judge = CaptionJudge(cfg, ".", llm=FunctionLLM(str))
    s = summarize("before", "pol", 5, judgments, judge, 3.0, dataset="msvd_qa")
    assert (s.protocol, s.judged, s.failed, s.undecided, s.template) == ("video_chatgpt", 4, 1, 1, "video_chatgpt")
    assert s.accuracy == pytest.approx(2 / 3) and s.mean_score == pytest.approx(13 / 4)
    assert "yes/(yes+no)" in format_summary(s) and "1 undecided" in format_summary(s)


def test_cli_names_missing_media_before_loading_models(tmp_path):
    from typer.testing import CliRunner

    from capdpo.cli import app

    data = write_jsonl(tmp_path / "msvd.qa.official.jsonl", [sharegpt("gone_0", "gone", "Q?", "A.")])
    runner = CliRunner()
    result = runner.invoke(app, ["evaluate", "--run-dir", str(tmp_path / "run"), "--suite", "msvd_qa"])
    assert result.exit_code != 0 and "--suite and --data go together" in result.output
    result = runner.invoke(app, ["evaluate", "--run-dir", str(tmp_path / "run"), "--suite", "msvd_qa", "--data", str(data)])
    assert isinstance(result.exception, MissingMediaError) and "1 of 1 videos not found" in str(result.exception)
