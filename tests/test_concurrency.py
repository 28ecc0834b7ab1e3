"""Several `capdpo` processes on one run folder: every id done exactly once, each request sent once
(issue 16, item 1)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import yaml
from test_openai_backend import KEY_ENV, PLANTED_KEY, FakeUpstream
from test_reference import write_run as write_reference_run
from test_sample_shards import write_run

from capdpo.records import Candidate, Judgment, QAItem, RecordFile, Video
from capdpo.rundir import RunPaths

REPO = Path(__file__).resolve().parents[1]
WORKERS = 3


def judge_run(root: Path, base_url: str, videos: int = 4, questions: int = 2, answers: int = 3) -> RunPaths:
    """A run folder with candidates to judge and a config pointing the judge at ``base_url``."""
    paths = RunPaths(root)
    paths.videos.write(Video(id=f"v{v}", video=f"v{v}.mp4", caption=f"A red ball and {v} blue cubes.") for v in range(videos))
    paths.qa.write(QAItem(id=f"v{v}_{q}", video_id=f"v{v}", question=f"Question {q}?", answer="A ball.")
                   for v in range(videos) for q in range(questions))
    paths.candidates.write(Candidate(id=f"v{v}_{q}#{k}", qa_id=f"v{v}_{q}", video_id=f"v{v}", answer=f"Answer {v} {q} {k}.",
                                     model="m", seed=0, temperature=1.0, top_p=1.0)
                           for v in range(videos) for q in range(questions) for k in range(answers))
    paths.config.write_text(yaml.safe_dump({"run_dir": str(root), "judge": {"llm": judge_llm(base_url)}}))
    return paths


def judge_llm(base_url: str) -> dict:
    """The judge LLM config of a fake OpenAI-compatible server at ``base_url``."""
    return {"backend": "openai", "model": "fake-judge", "base_url": base_url + "/v1", "api_key_env": KEY_ENV,
            "timeout_s": 5.0, "concurrency": 2, "batch_size": 2, "backoff_base_s": 0.01}


def start(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "capdpo.cli", *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO), KEY_ENV: PLANTED_KEY, **(env or {})})


def finish(workers: list[subprocess.Popen]) -> list[str]:
    outputs = [w.communicate(timeout=600)[0] for w in workers]
    for w, output in zip(workers, outputs):
        assert w.returncode == 0, output
    return outputs


def test_concurrent_judge_workers_judge_every_answer_once(tmp_path):
    with FakeUpstream(delay_s=0.05) as upstream:
        paths = judge_run(tmp_path / "run", upstream.url)
        expected = {c.id for c in paths.candidates.read()}
        outputs = finish([start("judge", "--run-dir", str(paths.root)) for _ in range(WORKERS)])
        ids = [j.id for j in paths.judgments.read()]
        assert Counter(ids) == Counter(expected), "\n".join(outputs)  # each id exactly once
        assert upstream.requests == len(expected)  # each answer sent once, by one worker
        assert all(j.score is not None for j in paths.judgments.read())

        finish([start("judge", "--run-dir", str(paths.root))])  # a re-run has nothing left to send
        assert upstream.requests == len(expected) and len(paths.judgments.all()) == len(expected)
    # finished workers leave no claims, and the locks stay out of the run folder's listing
    assert not (paths.root / ".locks" / "judgments.jsonl.claims").exists()
    assert not list(paths.root.glob("*.lock")) and not list(paths.root.glob("*.claims"))


def test_rerun_drops_repeated_rows_and_stops_at_a_conflicting_one(tmp_path):
    with FakeUpstream() as upstream:
        paths = judge_run(tmp_path / "run", upstream.url, videos=1, questions=1, answers=3)
        finish([start("judge", "--run-dir", str(paths.root))])
        judged = paths.judgments.all()
        paths.judgments.append(judged)  # what two workers of an older version wrote
        finish([start("judge", "--run-dir", str(paths.root))])
        assert paths.judgments.all() == judged and len(paths.judgments.path.read_text().splitlines()) == 3
        paths.judgments.append(judged[0].model_copy(update={"score": 1.0 if judged[0].score != 1.0 else 2.0}))
        rerun = start("judge", "--run-dir", str(paths.root))
        output = rerun.communicate(timeout=300)[0]
    assert rerun.returncode != 0  # neither judgment is picked silently: which one is right is the user's call
    assert f"{paths.judgments.path}:4: id {judged[0].id!r} is already on line 1 with different content" in output


def test_claims_of_an_ended_worker_lapse(tmp_path):
    out = RecordFile(tmp_path / "j.jsonl", Judgment)
    code = ("import sys; from capdpo.records import RecordFile, Judgment\n"
            f"c = RecordFile({str(out.path)!r}, Judgment).claims()\n"
            "print(c.claim(['a', 'b', 'c'], limit=2), flush=True)\n"
            "sys.stdin.readline()\n")  # holds its claims until told to end
    worker = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    assert worker.stdout.readline().strip() == "['a', 'b']"
    with out.claims() as claims:
        assert claims.claim(["a", "b", "c"]) == ["c"]  # a live worker's claims hold
        worker.communicate("\n", timeout=60)  # it ends without writing a or b (a crash, say)
        assert claims.claim(["a", "b", "c"]) == ["a", "b"]  # ...so they are free again


def test_concurrent_sample_workers_sample_every_question_once(tmp_path, tiny_policy_dir, cache_dir):
    config = write_run(tmp_path / "run", tiny_policy_dir, cache_dir, videos=4, questions=2)
    finish([start("sample", "--config", str(config)) for _ in range(WORKERS)])
    ids = [c.id for c in RunPaths(tmp_path / "run").candidates.read()]
    expected = {f"v{v}_{q}#{k}" for v in range(4) for q in range(2) for k in range(2)}
    assert Counter(ids) == Counter(expected)


def test_concurrent_reference_workers_score_every_pair_once(tmp_path, tiny_policy_dir):
    config = write_reference_run(tmp_path / "run", tiny_policy_dir)
    finish([start("reference", "--config", str(config)) for _ in range(WORKERS)])
    paths = RunPaths(tmp_path / "run")
    assert Counter(r.id for r in paths.reference.read()) == Counter(p.id for p in paths.pairs.read())


def test_concurrent_evaluate_workers_answer_and_judge_every_question_once(tmp_path, tiny_policy_dir, cache_dir):
    config = write_run(tmp_path / "run", tiny_policy_dir, cache_dir, videos=4, questions=2)
    paths = RunPaths(tmp_path / "run")
    paths.qa.write([q.model_copy(update={"split": "test"}) for q in paths.qa.read()])
    expected = {q.id for q in paths.qa.read()}
    with FakeUpstream(delay_s=0.05) as upstream:
        settings = yaml.safe_load(config.read_text())
        settings["judge"] = {"llm": judge_llm(upstream.url)}
        config.write_text(yaml.safe_dump(settings))
        finish([start("evaluate", "--config", str(config), "--tag", "t") for _ in range(WORKERS)])
        assert upstream.requests == len(expected)  # each answer judged once, by one worker
    assert Counter(p.id for p in paths.predictions("t").read()) == Counter(expected)
    assert Counter(j.id for j in paths.eval_judgments("t").read()) == Counter(expected)
    [summary] = paths.eval_summary.all()
    assert summary.judged + summary.failed == len(expected)  # the summary kept is the complete one
