"""A run folder is a sandbox: ids and tags never reach outside it, and nothing is removed that capdpo
did not make (issue 30). No model is loaded: the data and frames stages and the CLI's checks only."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from run_configs import write_config
from typer.testing import CliRunner

from capdpo.cli import app
from capdpo.errors import UnsafePath
from capdpo.evaluation.agreement import agreement, load_scores
from capdpo.evaluation.suites import load_suite
from capdpo.formats import read_paper_qa
from capdpo.ids import MAX_LENGTH, BadId, check_id
from capdpo.media.synthetic import make_synthetic_dataset
from capdpo.records import OWN_MARKER, ForeignFolderError, QAItem, RecordError, RecordFile, Video, atomic_dir
from capdpo.rundir import RunPaths, inside

WIDE = {**os.environ, "COLUMNS": "1000"}  # the CLI's error lines unwrapped
BAD_IDS = {"dotdot": "..", "absolute": "ABSOLUTE", "escape": "../../x", "empty": "", "dot": ".", "long": "v" * 300,
           "nul": "a\x00b", "hash": "a#b", "newline": "a\nb", "space": "a b"}


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> list[Path]:
    return [Path(c.video.video) for c in make_synthetic_dataset(tmp_path_factory.mktemp("clips"), 3, seed=5)]


def _user_run(tmp_path: Path, clips: list[Path], rows: list[dict]) -> tuple[Path, RunPaths]:
    videos = tmp_path / "videos.jsonl"
    videos.write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = write_config(tmp_path / "run.yaml", tmp_path / "run", tmp_path / "no-policy", tmp_path / "cache",
                          data={"synthetic_videos": 0, "videos": str(videos), "test_fraction": 0.0})
    return config, RunPaths(tmp_path / "run")


def _invoke(*args: str):
    return CliRunner().invoke(app, list(args), catch_exceptions=False)


@pytest.mark.parametrize("name", sorted(BAD_IDS))
def test_a_bad_video_id_is_left_out_by_data_naming_its_row_and_frames_stays_in_the_run(tmp_path, clips, caplog, name):
    victim = tmp_path / "victim"  # a folder of the user's, outside the run
    victim.mkdir()
    (victim / "keep.txt").write_text("mine")
    bad = str(victim) if BAD_IDS[name] == "ABSOLUTE" else BAD_IDS[name]
    config, paths = _user_run(tmp_path, clips, [{"id": "good", "video": str(clips[0]), "caption": "A."},
                                                {"id": bad, "video": str(clips[1]), "caption": "B."},
                                                {"id": "good2", "video": str(clips[2]), "caption": "C."}])
    outside_the_run = {p.name for p in tmp_path.iterdir()}
    assert _invoke("data", "--config", str(config)).exit_code == 0
    assert [v.id for v in paths.videos.read()] == ["good", "good2"]  # the other rows go on
    assert "videos.jsonl:2: field 'id': video id" in caplog.text
    assert _invoke("frames", "--config", str(config)).exit_code == 0
    assert sorted(p.name for p in paths.frames.iterdir()) == ["good", "good2"]
    assert paths.videos.exists() and paths.config.exists()  # the run folder was not emptied
    assert [p.name for p in victim.iterdir()] == ["keep.txt"] and (victim / "keep.txt").read_text() == "mine"
    assert {p.name for p in tmp_path.iterdir()} == outside_the_run | {"run"}  # nothing written beside the run


def test_a_hand_edited_video_id_stops_frames_naming_the_line_and_touches_nothing(tmp_path, clips):
    config, paths = _user_run(tmp_path, clips, [{"id": "good", "video": str(clips[0]), "caption": "A."}])
    assert _invoke("data", "--config", str(config)).exit_code == 0
    row = json.loads(paths.videos.path.read_text())
    with paths.videos.path.open("a") as f:
        f.write(json.dumps({**row, "id": ".."}) + "\n")
    proc = subprocess.run([sys.executable, "-m", "capdpo.cli", "frames", "--config", str(config)], capture_output=True,
                          text=True, env=WIDE)
    assert proc.returncode == 2
    assert f"{paths.videos.path}:2: malformed Video row: id: video id '..': starts with '.'" in proc.stderr
    assert paths.videos.exists() and paths.config.exists() and not paths.frames.exists()


def test_frames_refuses_an_id_whose_folder_leads_out_of_the_run_and_goes_on(tmp_path, clips):
    """The path check holds by itself: a frame folder that is a link out of the run is an item error."""
    config, paths = _user_run(tmp_path, clips, [{"id": "linked", "video": str(clips[0]), "caption": "A."},
                                                {"id": "good", "video": str(clips[1]), "caption": "B."}])
    assert _invoke("data", "--config", str(config)).exit_code == 0
    outside = tmp_path / "outside"
    outside.mkdir()
    paths.frames.mkdir()
    (paths.frames / "linked").symlink_to(outside)
    assert _invoke("frames", "--config", str(config)).exit_code == 0
    assert list(outside.iterdir()) == [] and (paths.frames / "good" / "00001.jpg").exists()


@pytest.mark.parametrize("name", ["", ".", "..", "../x", "/etc", "a/b", "a\x00b", "n" * 256])
def test_inside_refuses_every_name_that_is_not_one_child(tmp_path, name):
    with pytest.raises(UnsafePath, match="cannot name a file or folder inside"):
        inside(tmp_path, name)
    assert inside(tmp_path, "clip_1.v2") == tmp_path / "clip_1.v2"


def test_evaluate_refuses_a_tag_outside_the_run_before_loading_a_model(tmp_path, clips):
    config, paths = _user_run(tmp_path, clips, [{"id": "good", "video": str(clips[0]), "caption": "A."}])
    assert _invoke("data", "--config", str(config)).exit_code == 0
    paths.qa.write([QAItem(id="good_0", video_id="good", question="Q?", answer="A.", split="test")])
    # policy.model names no checkpoint: had the model been loaded, the error would be about it
    proc = subprocess.run([sys.executable, "-m", "capdpo.cli", "evaluate", "--config", str(config), "--tag", "../../x"],
                          capture_output=True, text=True, env=WIDE)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: tag '../../x': starts with '.' (never '.', '..' or a hidden name)"]
    assert not list(tmp_path.glob("x_*")) and not (paths.root / "eval").exists()


@pytest.mark.parametrize("tag", ["../../x", "a/b", "/tmp/x", ""])
def test_every_path_from_a_tag_or_a_dataset_is_checked(tmp_path, tag):
    paths = RunPaths(tmp_path / "run")
    for make in (paths.predictions, paths.eval_judgments):
        with pytest.raises(BadId, match="tag"):
            make(tag)
    with pytest.raises(UnsafePath):
        paths.eval_dir("../../x")
    assert paths.predictions("after", "msvd_qa").path == tmp_path / "run" / "eval" / "msvd_qa" / "after_predictions.jsonl"


def test_atomic_dir_never_removes_a_folder_capdpo_did_not_make(tmp_path):
    user = tmp_path / "user"
    user.mkdir()
    (user / "thesis.tex").write_text("years of work")
    with pytest.raises(ForeignFolderError, match=f"^{user}: capdpo did not make this"), atomic_dir(user) as tmp:
        (tmp / "frame.jpg").write_text("x")
    assert [p.name for p in user.iterdir()] == ["thesis.tex"] and sorted(p.name for p in tmp_path.iterdir()) == ["user"]
    afile = tmp_path / "file"
    afile.write_text("mine")
    with pytest.raises(ForeignFolderError), atomic_dir(afile):
        pass
    assert afile.read_text() == "mine"
    with atomic_dir(tmp_path / "made") as tmp:  # capdpo's own folder is replaced, an empty one too
        (tmp / "a").write_text("1")
    with atomic_dir(tmp_path / "made") as tmp:
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in (tmp_path / "made").iterdir()) == sorted([OWN_MARKER, "b"])
    (tmp_path / "empty").mkdir()
    with atomic_dir(tmp_path / "empty") as tmp:
        (tmp / "c").write_text("3")
    assert (tmp_path / "empty" / "c").exists()


@pytest.mark.parametrize("field,value", [("id", "a#b"), ("id", "../x"), ("video_id", "..")])
def test_a_hand_edited_question_record_is_refused_with_file_and_line(tmp_path, field, value):
    good = QAItem(id="v_0", video_id="v", question="Q?", answer="A.")
    path = tmp_path / "qa.jsonl"
    path.write_text(good.model_dump_json() + "\n" + json.dumps({**good.model_dump(), field: value}) + "\n")
    with pytest.raises(RecordError, match=rf"qa.jsonl:2: malformed QAItem row: {field}: "):
        RecordFile(path, QAItem).all()


def test_importers_and_suites_refuse_bad_ids_naming_the_row(tmp_path):
    qa = tmp_path / "qa.jsonl"
    qa.write_text(json.dumps({"id": "q/1", "video": "v.mp4", "conversations": [{"value": "Q"}, {"value": "A"}]}) + "\n")
    with pytest.raises(RecordError, match=r"qa.jsonl:1: field 'id': question id 'q/1': has '/'"):
        list(read_paper_qa(qa))
    suite = tmp_path / "tgif.qa.official.jsonl"
    suite.write_text(json.dumps({"id": "a#1", "video": "v", "question": "Q?", "answer": "A."}) + "\n")
    with pytest.raises(RecordError, match=r"tgif.qa.official.jsonl:1: question id 'a#1': has '#'"):
        load_suite("tgif_qa", suite)


def test_id_lengths_leave_room_for_derived_ids_and_file_names():
    video = check_id("v" * MAX_LENGTH["video id"], "video id")
    question = check_id(f"{video}_1234", "question id")
    check_id(f"{question}#grpo100000.15", "answer id")
    tag = "t" * MAX_LENGTH["tag"]  # the longest names capdpo makes from an id or a tag, temp and lock names included
    assert max(len(f".{video}.4194304.tmp"), len(f".{tag}_predictions.jsonl.4194304.tmp"),
               len(f"{tag}_predictions.jsonl.claims"), len(f"{tag}_predictions.jsonl.lock")) <= 255
    with pytest.raises(BadId, match=r"video id 'v+'\.\.\. \(129 characters\): is too long; a video id has at most 128 characters"):
        check_id("v" * 129, "video id")
    assert Video(id="clip-1.v2:a+b_c", video="x", caption="c").id == "clip-1.v2:a+b_c"


def test_judge_agree_groups_answers_by_question_even_with_hash_in_their_ids(tmp_path):
    """Two judges that rank each question's answers alike agree 100%, also when another tool's
    question ids hold a '#' (the answer's number is after the last one)."""
    a = {"v#1_0#0": 1, "v#1_0#1": 2, "v#1_1#0": 3, "v#1_1#1": 4}
    b = {"v#1_0#0": 3, "v#1_0#1": 4, "v#1_1#0": 1, "v#1_1#1": 2}
    files = []
    for name, scores in (("a", a), ("b", b)):
        files.append(tmp_path / f"{name}.jsonl")
        files[-1].write_text("".join(json.dumps({"id": k, "score": v}) + "\n" for k, v in scores.items()))
    report = agreement(load_scores(files[0]), load_scores(files[1]))
    assert report.n_pairs == 2 and report.pairwise_agreement_strict == 1.0
