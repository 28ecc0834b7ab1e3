"""The whole pipeline on a tiny random policy through the CLI: with a tiny random judge end to end
(SmolLM2 would be over half its time), with the packaged SmolLM2 judge on the real clips."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from run_configs import write_config
from typer.testing import CliRunner

from capdpo.cli import app
from capdpo.rundir import RunPaths


def test_run_end_to_end_and_rerun_skips(tmp_path, tiny_policy_dir, tiny_llm, cache_dir):
    config = write_config(tmp_path / "run.yaml", tmp_path / "run", tiny_policy_dir, cache_dir,
                          judge={"llm": {"model": str(tiny_llm), "batch_size": 4}})
    result = CliRunner().invoke(app, ["run", str(config)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    paths = RunPaths(tmp_path / "run")
    videos, qa, candidates = paths.videos.all(), paths.qa.all(), paths.candidates.all()
    assert len(videos) == 4 and {v.split for v in videos} == {"train", "test"}
    train_q = [q for q in qa if q.split == "train"]
    assert len(candidates) == 3 * len(train_q)
    assert len({c.id for c in candidates}) == len(candidates)
    judgments = paths.judgments.all()
    assert {j.target_id for j in judgments} == {c.id for c in candidates}
    assert all(j.template_hash and j.judge_model == str(tiny_llm) for j in judgments)
    pairs = paths.pairs.all()
    assert pairs, "a 1-5 judge's expected scores over 3 samples per question should produce some strict preference"
    for name in ("pairs_trl.jsonl", "pairs_paper.jsonl"):
        rows = [json.loads(line) for line in (paths.root / name).read_text().splitlines()]
        assert len(rows) == len(pairs)
    summaries = {s.id: s for s in paths.eval_summary.all()}
    assert set(summaries) == {"before", "after"}
    assert summaries["before"].questions == len(qa) - len(train_q)
    assert (paths.train / "policy" / "model.safetensors").exists()
    metrics = [json.loads(line) for line in (paths.train / "metrics.jsonl").read_text().splitlines()]
    assert {"loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"} <= set(metrics[0])
    assert paths.report.exists()

    # a second run finds everything done: no record is written twice
    before = {f: f.stat().st_mtime_ns for f in paths.root.glob("*.jsonl") if f.name not in ("pairs.jsonl", "pairs_trl.jsonl", "pairs_paper.jsonl", "videos.jsonl", "qa_given.jsonl")}
    result = CliRunner().invoke(app, ["run", str(config)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert {f: f.stat().st_mtime_ns for f in before} == before
    assert len(paths.candidates.all()) == len(candidates)


def test_stages_run_alone_on_real_clips(tmp_path, tiny_policy_dir, cache_dir, shared_data):
    """frames, sample and judge (the packaged SmolLM2) on the shared real clips with their human
    captions and QA."""
    config = write_config(tmp_path / "real.yaml", tmp_path / "real", tiny_policy_dir, cache_dir,
                          data={"synthetic_videos": 0, "videos": str(shared_data / "real_videos.jsonl"), "test_fraction": 0.0},
                          sample={"n": 2})
    runner = CliRunner()
    for stage in ("data", "frames", "qa", "sample", "judge"):
        result = runner.invoke(app, [stage, "--config", str(config)], catch_exceptions=False)
        assert result.exit_code == 0, (stage, result.output)
    paths = RunPaths(tmp_path / "real")
    ids = [v.id for v in paths.videos.all()]
    assert len(ids) == 5 and all(len(list((paths.frames / i).glob("*.jpg"))) > 0 for i in ids)
    assert len(paths.judgments.all()) == len(paths.candidates.all()) == 2 * len(paths.qa.all())
    assert {j.judge_model for j in paths.judgments.all()} == {"builtin:smollm2"}


def test_corrupt_video_is_named_and_others_go_on(tmp_path, tiny_policy_dir, cache_dir):
    from capdpo.media.synthetic import make_synthetic_dataset

    clips = make_synthetic_dataset(tmp_path / "media", 2, seed=3)
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(os.urandom(2048))
    rows = [{"id": c.video.id, "video": c.video.video, "caption": c.video.caption, "qa": [{"q": q, "a": a} for q, a, _ in c.qa[:2]]}
            for c in clips]
    rows.append({"id": "broken", "video": str(bad), "caption": "A broken file.", "qa": [{"q": "What?", "a": "Nothing."}]})
    (tmp_path / "videos.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = write_config(tmp_path / "c.yaml", tmp_path / "run", tiny_policy_dir, cache_dir,
                          data={"synthetic_videos": 0, "videos": str(tmp_path / "videos.jsonl"), "test_fraction": 0.0},
                          sample={"n": 2})
    runner = CliRunner()
    for stage in ("data", "qa", "sample"):
        result = runner.invoke(app, [stage, "--config", str(config)], catch_exceptions=False)
        assert result.exit_code == 0, result.output
    candidates = RunPaths(tmp_path / "run").candidates.all()
    assert {c.video_id for c in candidates} == {c.video.id for c in clips}

    result = runner.invoke(app, ["sample", "--config", str(config), "--fail-fast"])
    assert result.exit_code != 0 and "broken.mp4" in str(result.exception)


def test_malformed_row_is_named(tmp_path, tiny_policy_dir, cache_dir):
    (tmp_path / "videos.jsonl").write_text('{"id": "a", "video": "a.mp4", "caption": "x"}\n{"id": "b", "video": 3}\n')
    config = write_config(tmp_path / "c.yaml", tmp_path / "run", tiny_policy_dir, cache_dir,
                          data={"synthetic_videos": 0, "videos": str(tmp_path / "videos.jsonl")})
    proc = subprocess.run([sys.executable, "-m", "capdpo.cli", "data", "--config", str(config)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "videos.jsonl:2" in proc.stderr and "video" in proc.stderr


@pytest.mark.slow
def test_sigkill_during_judge_resumes_to_the_same_judgments(tmp_path, tiny_policy_dir, cache_dir):
    # free-form judging is slow enough on CPU to be killed mid-stage: 4 answers in two batches of 2,
    # killed once the first is written, while the second is being judged (retries 0: the tiny
    # budget's replies rarely parse, and asking each again would double every judge run)
    config = write_config(tmp_path / "k.yaml", tmp_path / "run", tiny_policy_dir, cache_dir,
                          data={"synthetic_videos": 1, "synthetic_questions": 2, "test_fraction": 0.0}, sample={"n": 2},
                          judge={"mode": "generate", "retries": 0, "llm": {"batch_size": 2, "max_new_tokens": 24}})
    runner = CliRunner()
    for stage in ("data", "qa", "sample"):
        assert runner.invoke(app, [stage, "--config", str(config)], catch_exceptions=False).exit_code == 0
    paths = RunPaths(tmp_path / "run")
    expected = {c.id for c in paths.candidates.all()}
    assert len(expected) == 4, "1 clip x 2 questions x 2 answers"
    reference = tmp_path / "uninterrupted"
    shutil.copytree(paths.root, reference)

    cmd = [sys.executable, "-m", "capdpo.cli", "judge", "--config", str(config)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if paths.judgments.exists() and len(paths.judgments.ids()) >= 2:
            break
        time.sleep(0.2)
    assert proc.poll() is None, "judge finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = paths.judgments.ids()
    assert 0 < len(partial) < len(expected)

    assert subprocess.run(cmd, capture_output=True).returncode == 0
    resumed = [j.id for j in paths.judgments.all()]
    assert len(resumed) == len(set(resumed)), "no judgment is written twice"
    assert subprocess.run(cmd[:-2] + ["--run-dir", str(reference)], capture_output=True).returncode == 0
    uninterrupted = RunPaths(reference).judgments.ids()
    assert set(resumed) == uninterrupted == expected
