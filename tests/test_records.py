"""RecordFile: append/read round trip, malformed rows, crash-safe tail, atomic write; read_jsonl errors."""

from __future__ import annotations

import json
import re

import pytest
from pydantic import ValidationError

from capdpo.records import (
    OWN_MARKER,
    Candidate,
    Judgment,
    QAItem,
    RecordError,
    RecordFile,
    TeacherLabel,
    Video,
    atomic_dir,
    atomic_path,
    atomic_write_text,
    json_line,
    read_jsonl,
    write_jsonl,
)


def _video(i: int) -> Video:
    return Video(id=f"v{i}", video=f"/data/v{i}.mp4", caption=f"caption {i}")


def _cand(i: int) -> Candidate:
    return Candidate(id=f"q_0#{i}", qa_id="q_0", video_id="q", answer=f"answer {i}", model="m", seed=i,
                     temperature=1.0, top_p=0.95)


def test_append_read_ids_by_id_round_trip(tmp_path):
    f = RecordFile(tmp_path / "sub" / "videos.jsonl", Video)
    assert not f.exists() and f.all() == [] and f.ids() == set()
    f.append(_video(0))  # a single record
    f.append([_video(1), _video(2)])  # an iterable
    f.append([])  # nothing: no-op
    assert f.exists()
    assert f.all() == [_video(0), _video(1), _video(2)]
    assert f.ids() == {"v0", "v1", "v2"}
    assert f.by_id()["v1"] == _video(1)
    assert f.path.read_text().count("\n") == 3


def test_append_accepts_a_generator(tmp_path):
    f = RecordFile(tmp_path / "c.jsonl", Candidate)
    f.append(_cand(i) for i in range(3))
    assert [c.seed for c in f.read()] == [0, 1, 2]


def test_malformed_row_names_file_and_line(tmp_path):
    path = tmp_path / "videos.jsonl"
    f = RecordFile(path, Video)
    f.append([_video(0), _video(1)])
    with path.open("a") as fh:
        fh.write('{"id": "v2", "caption": "no video field"}\n')  # line 3
        fh.write("\n")  # blank lines are skipped
        fh.write("this is not json\n")  # line 5
    f.append(_video(6))
    with pytest.raises(RecordError) as e:
        f.all()
    assert f"{path}:3:" in str(e.value) and "video" in str(e.value)
    # strict=False logs and skips every bad row, keeping the good ones in order
    assert [v.id for v in f.read(strict=False)] == ["v0", "v1", "v6"]
    assert f.ids() == {"v0", "v1", "v6"}  # ids() never raises: resuming must not die on one bad row
    path.write_text(_video(0).model_dump_json() + "\n" + "not json\n")
    with pytest.raises(RecordError, match=rf"{re.escape(str(path))}:2:"):
        f.all()


def test_one_rule_for_an_id_seen_twice(tmp_path):
    """The same record again (a resumed worker's) is read once; a different record under the same id
    is an error naming both lines for every reader - none of them picks one."""
    path = tmp_path / "videos.jsonl"
    f = RecordFile(path, Video)
    f.append([_video(0), _video(1), _video(0)])
    assert f.all() == [_video(0), _video(1)] and f.by_id() == {"v0": _video(0), "v1": _video(1)}
    assert f.drop_duplicates() == 1 and path.read_text().count("\n") == 2
    f.append(_video(0).model_copy(update={"caption": "edited"}))
    expected = rf"{re.escape(str(path))}:3: id 'v0' is already on line 1 with different content"
    for reader in (f.all, f.by_id, lambda: f.all(strict=False), f.drop_duplicates):
        with pytest.raises(RecordError, match=expected):
            reader()
    assert f.ids() == {"v0", "v1"}  # the ids are the same whichever line is right: resuming goes on


JUDGED = {"target_id": "q#0", "qa_id": "q", "judge_backend": "b", "judge_model": "m", "template": "t",
          "template_hash": "h", "prompt_hash": "p"}


@pytest.mark.parametrize(("fields", "why"), [
    ({"score": 7.0}, "score: 7.0 is outside the caption_reward scale 1-5"),
    ({"score": 0.0}, "score: 0.0 is outside the caption_reward scale 1-5"),
    ({"score": 6.0, "params": {"protocol": "video_chatgpt"}}, "score: 6.0 is outside the video_chatgpt scale 0-5"),
    ({"score": 4.0, "score_samples": [4.0, 9.0]}, "score_samples.1: 9.0 is outside the caption_reward scale 1-5"),
    ({"score": 3.0, "judge_scores": {"a:m": 3.0, "b:m": -1.0}}, "judge_scores.b:m: -1.0 is outside the caption_reward scale 1-5"),
    ({"score": "NaN"}, "score: nan is outside the caption_reward scale 1-5"),
    ({"score": 3.0, "params": {"protocol": "stars"}}, "params.protocol: unknown judge protocol 'stars'"),
])
def test_a_judgment_score_off_its_protocols_scale_is_refused_with_file_and_line(tmp_path, fields, why):
    path = tmp_path / "judgments.jsonl"
    ok = Judgment(id="q#1", **{**JUDGED, "target_id": "q#1"}, score=5.0)
    path.write_text(ok.model_dump_json() + "\n" + json.dumps({"id": "q#0", **JUDGED, **fields}) + "\n")
    with pytest.raises(RecordError) as e:
        RecordFile(path, Judgment).all()
    assert str(e.value).startswith(f"{path}:2: malformed Judgment row: {why}")


def test_video_chatgpt_scores_zero_and_failures_need_no_score():
    assert Judgment(id="q#0", **JUDGED, score=0.0, params={"protocol": "video_chatgpt"}).score == 0.0
    assert Judgment(id="q#0", **JUDGED, failure="no valid score").score is None


@pytest.mark.parametrize(("score", "scale"), [(7.0, "1-5"), (0.0, "1-5"), (7.0, "0-1"), (-0.5, "0-1")])
def test_a_teacher_label_off_its_scale_is_refused_with_file_and_line(tmp_path, score, scale):
    label = {"id": "q#0", "qa_id": "q", "video_id": "v", "caption": "c", "question": "Q?", "reference": "R.",
             "answer": "A.", "score": score, "scale": scale}
    path = tmp_path / "labels.jsonl"
    path.write_text(json.dumps({**label, "score": 1.0}) + "\n" + json.dumps({**label, "id": "q#1"}) + "\n")
    with pytest.raises(RecordError, match=rf"{re.escape(str(path))}:2: .*score: {score} is outside the label's scale {scale}"):
        RecordFile(path, TeacherLabel).all()


def test_non_finite_numbers_are_written_as_null_never_as_bare_nan(tmp_path):
    row = {"loss": float("nan"), "grad_norm": float("inf"), "nested": [1.0, float("-inf")], "name": "x"}
    assert json.loads(json_line(row)) == {"loss": None, "grad_norm": None, "nested": [1.0, None], "name": "x"}
    write_jsonl(tmp_path / "rows.jsonl", [row])
    strict = json.loads((tmp_path / "rows.jsonl").read_text(), parse_constant=lambda name: pytest.fail(f"bare {name}"))
    assert strict["loss"] is None


def test_extra_fields_are_rejected(tmp_path):
    with pytest.raises(ValidationError):
        Video(id="v", video="x.mp4", caption="c", captoin="typo")
    path = tmp_path / "qa.jsonl"
    row = {"id": "v_0", "video_id": "v", "question": "Q?", "answer": "A.", "answr": "typo"}
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(RecordError, match=rf"{re.escape(str(path))}:1:.*answr"):
        RecordFile(path, QAItem).all()


def test_partial_last_line_is_ignored_then_cut_before_next_append(tmp_path):
    """A process killed mid-write (kill -9) leaves an unterminated last line."""
    path = tmp_path / "candidates.jsonl"
    f = RecordFile(path, Candidate)
    f.append([_cand(0), _cand(1)])
    full = _cand(2).model_dump_json() + "\n"
    with path.open("a") as fh:
        fh.write(full[: len(full) // 2])  # half a record, no newline
    assert [c.id for c in f.read()] == ["q_0#0", "q_0#1"]  # strict read does not choke on it
    assert f.ids() == {"q_0#0", "q_0#1"}  # so the resumed stage redoes record 2
    f.append(_cand(2))
    f.append(_cand(3))
    text = path.read_text()
    assert text.endswith("\n")
    lines = text.splitlines()
    assert len(lines) == 4 and all(json.loads(line) for line in lines)  # every line is a complete record
    assert [c.id for c in f.read()] == ["q_0#0", "q_0#1", "q_0#2", "q_0#3"]  # no duplicates, no fragment


def test_complete_json_without_newline_is_also_redone_once(tmp_path):
    """Killed between the record's bytes and its newline: still counted as unfinished, written once."""
    path = tmp_path / "candidates.jsonl"
    f = RecordFile(path, Candidate)
    f.append(_cand(0))
    with path.open("a") as fh:
        fh.write(_cand(1).model_dump_json())
    assert f.ids() == {"q_0#0"}
    f.append(_cand(1))
    assert [c.id for c in f.read()] == ["q_0#0", "q_0#1"]


def test_partial_only_line_is_cut_to_empty(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"id": "q_0#0", "qa_')
    f = RecordFile(path, Candidate)
    assert f.all() == []
    f.append(_cand(5))
    assert path.read_text() == _cand(5).model_dump_json() + "\n"


def test_write_replaces_content(tmp_path):
    path = tmp_path / "v.jsonl"
    f = RecordFile(path, Video)
    f.append([_video(i) for i in range(5)])
    f.write([_video(7), _video(8)])
    assert [v.id for v in f.read()] == ["v7", "v8"]
    f.write([])
    assert f.all() == [] and path.exists()


def test_write_is_atomic_when_interrupted(tmp_path):
    path = tmp_path / "v.jsonl"
    f = RecordFile(path, Video)
    f.write([_video(0), _video(1)])
    before = path.read_bytes()

    def records():
        yield _video(2)
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        f.write(records())
    assert path.read_bytes() == before  # the old content is untouched until the rename
    assert [v.id for v in f.read()] == ["v0", "v1"]


def test_read_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"a": 1}\n\n{"b": 2}\n')
    assert list(read_jsonl(path)) == [(1, {"a": 1}), (3, {"b": 2})]
    path.write_text('{"a": 1}\n{"a": \n')
    with pytest.raises(RecordError, match=rf"{re.escape(str(path))}:2: not valid JSON"):
        list(read_jsonl(path))
    path.write_text('{"a": 1}\n{"a": 2}\n[1, 2]\n')
    with pytest.raises(RecordError, match=rf"{re.escape(str(path))}:3: expected a JSON object, got list"):
        list(read_jsonl(path))
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        list(read_jsonl(tmp_path / "missing.jsonl"))


def test_write_jsonl_round_trip(tmp_path):
    rows = [{"id": "a", "text": "caf\u00e9"}, {"id": "b", "n": [1, 2]}]
    path = tmp_path / "out" / "rows.jsonl"
    assert write_jsonl(path, rows) == 2
    assert [row for _, row in read_jsonl(path)] == rows
    assert "caf\u00e9" in path.read_text(encoding="utf-8")


# -- atomic writes ---------------------------------------------------------------------------------

def test_atomic_path_replaces_on_success_and_leaves_the_old_file_on_failure(tmp_path):
    target = tmp_path / "sub" / "out.txt"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert target.read_text() == "old" and sorted(p.name for p in target.parent.iterdir()) == ["out.txt"]
    with atomic_path(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new" and sorted(p.name for p in target.parent.iterdir()) == ["out.txt"]


def test_atomic_dir_replaces_the_folder_or_keeps_an_existing_one(tmp_path):
    target = tmp_path / "model"
    with atomic_dir(target) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "b").write_text("2")
        raise RuntimeError("killed")
    made = lambda *names: sorted([OWN_MARKER, *names])  # noqa: E731  every folder it makes carries capdpo's marker
    assert sorted(p.name for p in target.iterdir()) == made("a") and [p.name for p in tmp_path.iterdir()] == ["model"]
    with atomic_dir(target) as tmp:
        (tmp / "c").write_text("3")
    assert sorted(p.name for p in target.iterdir()) == made("c")
    with atomic_dir(target, keep_existing=True) as tmp:  # another process finished first: theirs stays
        (tmp / "d").write_text("4")
    assert sorted(p.name for p in target.iterdir()) == made("c") and [p.name for p in tmp_path.iterdir()] == ["model"]
