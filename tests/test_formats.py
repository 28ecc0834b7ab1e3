"""Row formats: capdpo video rows, ShareGPT captions, the paper's QA/DPO rows, TRL rows."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from capdpo.formats import (
    DESCRIBE_PROMPT,
    VIDEO_TAG,
    paper_dpo_rows,
    paper_qa_rows,
    read_capdpo_videos,
    read_paper_dpo,
    read_paper_qa,
    read_sharegpt_captions,
    sharegpt_caption_rows,
    trl_rows,
)
from capdpo.records import PreferencePair, QAItem, RecordError, Video, write_jsonl

REAL_VIDEOS = Path(__file__).resolve().parents[2] / "shared" / "data" / "real_videos.jsonl"


def _write(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _err(path: Path, line: int) -> str:
    return re.escape(f"{path}:{line}:")


def test_read_capdpo_videos_resolves_paths_and_builds_qa_ids(tmp_path):
    path = _write(tmp_path / "data" / "videos.jsonl", [
        {"id": "cat", "video": "clips/cat.mp4", "caption": "A cat sleeps.",
         "qa": [{"q": "What sleeps?", "a": "A cat."}, {"question": "Where?", "answer": "On a sofa."}]},
        {"id": "dog", "video": "/abs/dog", "caption": "A dog runs.", "source": "mine"},
    ])
    (cat, cat_qa), (dog, dog_qa) = list(read_capdpo_videos(path))
    assert cat == Video(id="cat", video=str((tmp_path / "data" / "clips" / "cat.mp4").resolve()), caption="A cat sleeps.",
                        source="videos")
    assert dog.video == "/abs/dog" and dog.source == "mine" and dog_qa == []
    assert [q.id for q in cat_qa] == ["cat_0", "cat_1"]
    assert cat_qa[1] == QAItem(id="cat_1", video_id="cat", question="Where?", answer="On a sofa.", source="given")
    # relative to the file, not the working directory
    cwd = os.getcwd()
    try:
        os.chdir(tmp_path)
        assert next(read_capdpo_videos(Path("data/videos.jsonl")))[0].video == cat.video
    finally:
        os.chdir(cwd)


@pytest.mark.parametrize("row,field", [
    ({"video": "a.mp4", "caption": "c"}, "'id'"),
    ({"id": "a", "caption": "c"}, "'video'"),
    ({"id": "a", "video": "a.mp4"}, "'caption'"),
    ({"id": 7, "video": "a.mp4", "caption": "c"}, "'id'"),
    ({"id": "a", "video": "a.mp4", "caption": "c", "qa": [{"q": "Q?"}]}, r"qa\[0\]"),
    ({"id": "a", "video": "a.mp4", "caption": "c", "qa": ["Q? A."]}, r"qa\[0\]"),
    ({"id": "a", "video": "a.mp4", "caption": "c", "qa": "Q? A."}, "'qa'"),
])
def test_read_capdpo_videos_errors_name_file_line_and_field(tmp_path, row, field):
    good = {"id": "ok", "video": "ok.mp4", "caption": "fine"}
    path = _write(tmp_path / "videos.jsonl", [good, row])
    with pytest.raises(RecordError, match=_err(path, 2) + ".*" + field):
        list(read_capdpo_videos(path))


def test_sharegpt_caption_round_trip(tmp_path):
    videos = [Video(id="v1", video="/data/v1.mp4", caption="First caption."),
              Video(id="v2", video="/data/v2", caption="Second caption.\nTwo lines.")]
    rows = list(sharegpt_caption_rows(videos))
    assert rows[0]["conversations"][0] == {"from": "human", "value": f"{VIDEO_TAG}\n{DESCRIBE_PROMPT}"}
    assert rows[0]["conversations"][1] == {"from": "gpt", "value": "First caption."}
    path = tmp_path / "captions.jsonl"
    write_jsonl(path, rows)
    back = list(read_sharegpt_captions(path))
    assert [(v.id, v.video, v.caption) for v in back] == [(v.id, v.video, v.caption) for v in videos]
    assert all(v.source == "sharegpt" for v in back)


def test_sharegpt_relative_videos_use_video_root(tmp_path):
    path = _write(tmp_path / "c.jsonl", [{"id": "v", "video": "v.mp4", "conversations": [
        {"from": "human", "value": "<video>\nDescribe."}, {"from": "gpt", "value": "Cap."}]}])
    assert next(read_sharegpt_captions(path)).video == str((tmp_path / "v.mp4").resolve())
    assert next(read_sharegpt_captions(path, video_root="/videos")).video == "/videos/v.mp4"


def test_paper_qa_round_trip(tmp_path):
    videos = {"clip1": Video(id="clip1", video="/data/clip1.mp4", caption="c")}
    qa = [QAItem(id="clip1_0", video_id="clip1", question="What colour is the car?", answer="Red."),
          QAItem(id="clip1_1", video_id="clip1", question="Who drives?", answer="A woman.")]
    rows = list(paper_qa_rows(qa, videos))
    assert rows[0] == {"id": "clip1_0", "video": "/data/clip1.mp4", "conversations": [
        {"from": "human", "value": f"{VIDEO_TAG}\nWhat colour is the car?"}, {"from": "gpt", "value": "Red."}]}
    path = tmp_path / "qa.jsonl"
    write_jsonl(path, rows)
    back = list(read_paper_qa(path, split="test"))
    # the video id is read back from the video file name (stem), which here is the id
    assert [(q.id, q.video_id, q.question, q.answer, q.split, q.source) for q in back] == [
        (q.id, q.video_id, q.question, q.answer, "test", "paper") for q in qa]


def test_paper_qa_bad_conversations_name_file_and_line(tmp_path):
    path = _write(tmp_path / "qa.jsonl", [
        {"id": "a_0", "video": "a.mp4", "conversations": [{"from": "human", "value": "<video>\nQ?"}, {"from": "gpt", "value": "A."}]},
        {"id": "a_1", "video": "a.mp4", "conversations": [{"from": "human", "value": "<video>\nQ?"}]},
    ])
    with pytest.raises(RecordError, match=_err(path, 2) + ".*human turn and a gpt turn"):
        list(read_paper_qa(path))
    path = _write(tmp_path / "qa2.jsonl", [{"id": "a_0", "video": "a.mp4"}])
    with pytest.raises(RecordError, match=_err(path, 1) + ".*'conversations'"):
        list(read_paper_qa(path))


def _pair(i: int, **kw) -> PreferencePair:
    base = dict(id=f"clip{i}_0", qa_id=f"clip{i}_0", video_id=f"clip{i}", video=f"/data/clip{i}.mp4", prompt="What happens?",
                answer="A car drives by.", chosen="A red car drives past.", rejected="A dog sleeps.", chosen_score=5.0,
                rejected_score=1.0, chosen_id=f"clip{i}_0#chosen", rejected_id=f"clip{i}_0#rejected")
    return PreferencePair(**{**base, **kw})


def test_paper_dpo_round_trip(tmp_path):
    pairs = [_pair(1), _pair(2, chosen_score=4.0, rejected_score=2.0)]
    rows = list(paper_dpo_rows(pairs))
    assert set(rows[0]) == {"id", "prompt", "answer", "video", "chosen", "rejected", "chosen_score", "rejected_score"}
    path = tmp_path / "dpo.jsonl"
    write_jsonl(path, rows)
    assert list(read_paper_dpo(path)) == pairs


def test_paper_dpo_released_row_shape(tmp_path):
    path = _write(tmp_path / "dpo.jsonl", [{"id": "v_3", "prompt": "<video>\nWhat is shown?", "answer": "A cat.",
                                            "video": "v", "chosen": "A cat.", "rejected": "A dog.",
                                            "chosen_score": 5, "rejected_score": 2}])
    [p] = read_paper_dpo(path)
    assert p.prompt == "What is shown?" and p.video_id == "v" and p.chosen_score == 5.0 and p.rejected_score == 2.0
    assert isinstance(p.chosen_score, float)


@pytest.mark.parametrize("change,field", [
    ({"chosen_score": "5"}, "'chosen_score'"),
    ({"rejected": None}, "'rejected'"),
    ({"prompt": None}, "'prompt'"),
])
def test_paper_dpo_errors_name_file_line_and_field(tmp_path, change, field):
    row = dict(next(paper_dpo_rows([_pair(1)])))
    row.update(change)
    row = {k: v for k, v in row.items() if v is not None}
    path = _write(tmp_path / "dpo.jsonl", [next(paper_dpo_rows([_pair(0)])), row])
    with pytest.raises(RecordError, match=_err(path, 2) + ".*" + field):
        list(read_paper_dpo(path))


def test_trl_rows_shape():
    [row] = trl_rows([_pair(1)])
    assert row["id"] == "clip1_0" and row["video"] == "/data/clip1.mp4"
    [user] = row["prompt"]
    assert user["role"] == "user"
    assert {"type": "video"} in user["content"]
    assert [c["text"] for c in user["content"] if c["type"] == "text"] == ["What happens?"]
    for key, text in (("chosen", "A red car drives past."), ("rejected", "A dog sleeps.")):
        [msg] = row[key]
        assert msg == {"role": "assistant", "content": [{"type": "text", "text": text}]}
    json.dumps(row)  # serialisable


def test_real_videos_file_reads_and_every_video_exists():
    if not REAL_VIDEOS.exists():
        pytest.skip(f"shared data not found at {REAL_VIDEOS} (the shared/ folder sits beside the repository)")
    rows = list(read_capdpo_videos(REAL_VIDEOS))
    assert rows, "real_videos.jsonl is empty"
    ids = [v.id for v, _ in rows]
    assert len(ids) == len(set(ids))
    for video, qa in rows:
        assert Path(video.video).is_absolute()
        assert Path(video.video).exists(), f"{video.id}: {video.video} does not exist"
        assert video.caption.strip()
        assert all(q.id == f"{video.id}_{i}" and q.question.strip() and q.answer.strip() for i, q in enumerate(qa))


# -- `capdpo export` refuses what would lose a run's files ------------------------------------------

def _export(*args: str):
    from typer.testing import CliRunner

    from capdpo.cli import app

    return CliRunner().invoke(app, ["export", *args])


def _run_with_pairs(root: Path) -> Path:
    from capdpo.records import RecordFile

    RecordFile(root / "pairs.jsonl", PreferencePair).write([_pair(1)])
    return root


def test_export_of_a_missing_run_folder_is_an_error_and_writes_nothing(tmp_path):
    out = tmp_path / "trl.jsonl"
    result = _export("trl", str(out), "--run-dir", str(tmp_path / "no-such-run"))
    assert isinstance(result.exception, ValueError) and "no-such-run: no such run folder" in str(result.exception)
    assert not out.exists()
    empty_run = tmp_path / "empty-run"
    empty_run.mkdir()
    result = _export("trl", str(out), "--run-dir", str(empty_run))  # a run without pairs yet
    assert "pairs.jsonl not found; run `capdpo pairs` first" in str(result.exception) and not out.exists()


@pytest.mark.parametrize("target", ["pairs.jsonl", "pairs_trl.jsonl", "config.yaml", "../run/./pairs.jsonl",
                                    "notes.txt", "train/reference.jsonl"])
def test_export_onto_the_runs_own_files_is_refused(tmp_path, target):
    run = _run_with_pairs(tmp_path / "run")
    (run / "notes.txt").write_text("the user's own")
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    result = _export("trl", str(run / target), "--run-dir", str(run))
    assert isinstance(result.exception, ValueError) and "the run's own file" in str(result.exception), result.output
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_export_into_a_new_file_goes_on(tmp_path):
    run = _run_with_pairs(tmp_path / "run")
    for out in (tmp_path / "trl.jsonl", run / "exports" / "trl.jsonl"):
        result = _export("trl", str(out), "--run-dir", str(run))
        assert result.exit_code == 0, result.output
        assert json.loads(out.read_text())["id"] == _pair(1).id
