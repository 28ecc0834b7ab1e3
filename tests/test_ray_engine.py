"""The ray engine (issue 32): each data-side stage as one Ray Data job writes what the local engine
writes, by id; a killed driver run again does only what is missing; a bad video or a failed judge
call is a record or a recorded error, never a failed job.

One local Ray serves the whole module (4 logical CPUs whatever the machine: two actors and the
reads must fit, or a job waits silently), every test runs under a time limit, and the Ray is shut
down when the module ends.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml
from test_concurrency import judge_llm, judge_run
from test_openai_backend import KEY_ENV, PLANTED_KEY, FakeUpstream
from test_reference import write_run as write_reference_run
from test_sample_shards import invoke, write_run

from capdpo.config import FramesConfig, PolicyConfig, RayConfig, SampleConfig, load_config
from capdpo.errors import BudgetExceeded
from capdpo.frames import frames_on_ray
from capdpo.models.load import load_policy
from capdpo.pipeline import Run
from capdpo.records import Video
from capdpo.rundir import RunPaths
from capdpo.sample import run_sample, sample_on_ray

ray = pytest.importorskip("ray")

REPO = Path(__file__).resolve().parents[1]
LIMIT_S = 900  # far above a test's time here (seconds to a minute; minutes on a machine shared by other jobs): a limit on hangs
RAY = {"actors": 2, "batch_size": 2}


@contextlib.contextmanager
def time_limit(seconds: int):
    """Fail instead of hanging: a Ray job whose tasks cannot be scheduled waits without a word."""
    def expire(*_):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(autouse=True)
def limited():
    with time_limit(LIMIT_S):
        yield


@pytest.fixture(scope="module", autouse=True)
def cluster():
    """The module's Ray; its address lets a driver in another process join it. The judge's API key
    is in the environment before Ray starts, so that every worker process inherits it."""
    before = os.environ.get(KEY_ENV)
    os.environ[KEY_ENV] = PLANTED_KEY
    with time_limit(LIMIT_S):
        ray.init(num_cpus=4, include_dashboard=False, logging_level=logging.WARNING)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()
    if before is None:
        del os.environ[KEY_ENV]
    else:
        os.environ[KEY_ENV] = before


def corrupt_video(root: Path, video_id: str = "vbad") -> Video:
    path = root / "media" / f"{video_id}.mp4"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 20_000, dtype=np.uint8).tobytes())
    return Video(id=video_id, video=str(path), caption="Nothing readable.")


def run_dir_with_a_corrupt_video(root: Path, policy_dir: Path, cache_dir: Path) -> RunPaths:
    write_run(root, policy_dir, cache_dir, videos=3, questions=2)
    paths = RunPaths(root)
    bad = corrupt_video(root)
    paths.videos.append(bad)
    paths.qa.append(paths.qa.all()[0].model_copy(update={"id": "vbad_0", "video_id": "vbad"}))
    return paths


@pytest.mark.slow
def test_sample_on_ray_writes_the_local_answers_whatever_the_batches(tmp_path, tiny_policy_dir, cache_dir):
    frames, policy = FramesConfig(num_frames=4), PolicyConfig(model=str(tiny_policy_dir), device="cpu")
    runs = {name: run_dir_with_a_corrupt_video(tmp_path / name, tiny_policy_dir, cache_dir) for name in ("local", "ray1", "ray3")}

    local = runs["local"]
    errors = run_sample(local.videos, local.qa, local.candidates, load_policy(str(tiny_policy_dir), cache_dir, device="cpu"),
                        SampleConfig(n=2, max_new_tokens=4, batch_size=4), frames)
    assert [item for item, _ in errors.errors] == ["vbad"]
    # one video per actor call and one question per generate call; then three videos and four questions
    for name, (rows, questions) in {"ray1": (1, 1), "ray3": (3, 4)}.items():
        paths = runs[name]
        errors = sample_on_ray(paths.videos, paths.qa, paths.candidates, policy, str(cache_dir),
                               SampleConfig(n=2, max_new_tokens=4, batch_size=questions), frames,
                               RayConfig(actors=2, batch_size=rows))
        assert [item for item, _ in errors.errors] == ["vbad"] and "vbad.mp4" in errors.errors[0][1]  # a record of why, the job went on

    expected = {c.id: c for c in local.candidates.all()}
    assert len(expected) == 3 * 2 * 2
    for name in ("ray1", "ray3"):
        written = [c.id for c in runs[name].candidates.read()]
        assert Counter(written) == Counter(list(expected))  # every id once
        assert {c.id: c for c in runs[name].candidates.all()} == expected  # answers, seeds, frames: equal by id


def test_a_rerun_on_ray_honours_a_local_run_and_samples_only_what_is_missing(tmp_path, tiny_policy_dir, cache_dir):
    config = write_run(tmp_path, tiny_policy_dir, cache_dir, videos=2, questions=2)
    paths = RunPaths(tmp_path)
    invoke("sample", "--config", str(config))
    local = {c.id: c for c in paths.candidates.all()}
    kept = [c for c in local.values() if c.video_id == "v0"]
    paths.candidates.write(kept)  # as if the local run had stopped after video v0
    invoke("sample", "--config", str(config), "--engine", "ray", "--set", "ray.actors=1")
    assert [c.id for c in paths.candidates.read()][: len(kept)] == [c.id for c in kept]  # v0's rows left as they were
    assert {c.id: c for c in paths.candidates.all()} == local and len(paths.candidates.path.read_text().splitlines()) == len(local)
    assert yaml.safe_load(paths.config.read_text())["engine"] == "ray"  # the run's config says which engine ran last


class RecordingUpstream(FakeUpstream):
    """The fake judge endpoint, keeping every prompt in arrival order."""

    def __init__(self, delay_s: float = 0.0):
        super().__init__(delay_s)
        self.prompts: list[str] = []

    def respond(self, body: bytes, auth: str):
        import json

        with self._lock:
            self.prompts.append(json.loads(body)["messages"][-1]["content"])
        return super().respond(body, auth)


def failing_answers(paths: RunPaths, every: int = 4) -> set[str]:
    """Make every ``every``-th candidate's answer one the fake endpoint refuses (HTTP 400, not retried)."""
    candidates = paths.candidates.all()
    failing = {c.id for c in candidates[::every]}
    paths.candidates.write(c.model_copy(update={"answer": c.answer + " STATUS=400"}) if c.id in failing else c for c in candidates)
    return failing


def without_timings(judgments) -> dict:
    return {j.id: j.model_dump(exclude={"latency_s"}) for j in judgments}


def test_judge_on_ray_writes_the_local_judgments_and_a_failed_call_is_a_record(tmp_path):
    with FakeUpstream() as upstream:
        local, on_ray = (judge_run(tmp_path / name, upstream.url) for name in ("local", "ray"))
        failing = failing_answers(local)
        assert failing_answers(on_ray) == failing
        invoke("judge", "--run-dir", str(local.root))
        sent_locally = upstream.requests
        invoke("judge", "--run-dir", str(on_ray.root), "--engine", "ray", "--set", "ray.batch_size=2", "--set", "ray.actors=2")
        assert upstream.requests == 2 * sent_locally  # each answer sent once (a refused one: once, not retried)
        invoke("judge", "--run-dir", str(on_ray.root), "--engine", "ray", "--retry-failed")
        assert upstream.requests == 2 * sent_locally + len(failing)  # the failed ones asked again, nothing else

    expected = without_timings(local.judgments.all())
    assert Counter(j.id for j in on_ray.judgments.read()) == Counter(list(expected))
    assert without_timings(on_ray.judgments.all()) == expected
    failed = {j.id: j.failure for j in on_ray.judgments.all() if j.failure}
    assert failed.keys() == failing and all("HTTP 400" in why for why in failed.values())


@pytest.mark.slow
def test_the_judge_budget_holds_for_all_actors_together(tmp_path):
    with FakeUpstream() as upstream:
        paths = judge_run(tmp_path / "run", upstream.url, videos=2, questions=2, answers=3)
        cfg = load_config(paths.config, ["engine=ray", "ray.actors=2", "ray.batch_size=2", "judge.max_requests=4"])
        with pytest.raises(BudgetExceeded, match="judge.max_requests=4"):
            Run(cfg).judge_candidates()
        judged = len(paths.judgments.all())
        # each actor checks the pooled spend before its batch: together they may pass it by one batch each
        assert 1 <= judged == upstream.requests <= 4 + (2 - 1) * 2
        Run(load_config(paths.config, ["judge.max_requests=null"])).judge_candidates()  # no ceiling: the rest
        assert Counter(j.id for j in paths.judgments.read()) == Counter(c.id for c in paths.candidates.read())
        assert upstream.requests == 12  # nothing judged twice


@pytest.mark.slow
def test_a_killed_driver_run_again_judges_every_answer_once_and_redoes_nothing(tmp_path, cluster):
    with RecordingUpstream(delay_s=0.3) as upstream:
        paths = judge_run(tmp_path / "run", upstream.url, videos=4, questions=2, answers=2)
        expected = {c.id: c.answer for c in paths.candidates.read()}
        driver = subprocess.Popen([sys.executable, "-m", "capdpo.cli", "judge", "--run-dir", str(paths.root), "--engine", "ray",
                                   "--set", f"ray.address={cluster}", "--set", "ray.batch_size=1"],
                                  cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        while driver.poll() is None and len(paths.judgments.ids()) < 3:
            time.sleep(0.2)
        assert driver.poll() is None, "the driver finished before it could be killed"
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
        finished = paths.judgments.ids()
        assert 3 <= len(finished) < len(expected)
        sent_before = len(upstream.prompts)

        invoke("judge", "--run-dir", str(paths.root), "--engine", "ray")  # this process's Ray, the killed driver's gone
        resent = upstream.prompts[sent_before:]
    assert Counter(j.id for j in paths.judgments.read()) == Counter(list(expected))  # every id once
    redone = [i for i in finished if any(expected[i] in prompt for prompt in resent)]
    assert not redone, f"judged again after the kill: {redone}"


def test_reference_on_ray_writes_the_local_log_probs(tmp_path, tiny_policy_dir):
    configs = {name: write_reference_run(tmp_path / name, tiny_policy_dir) for name in ("local", "ray")}
    invoke("reference", "--config", str(configs["local"]))
    invoke("reference", "--config", str(configs["ray"]), "--engine", "ray")
    local, on_ray = (RunPaths(tmp_path / name).reference for name in ("local", "ray"))
    assert Counter(r.id for r in on_ray.read()) == Counter(r.id for r in local.read())
    expected = {r.id: r for r in local.all()}
    for r in on_ray.all():
        want = expected[r.id]
        assert (r.fingerprint, r.pair_hash, r.chosen_tokens, r.rejected_tokens) == \
            (want.fingerprint, want.pair_hash, want.chosen_tokens, want.rejected_tokens)
        # the same forwards; only the thread count of the matrix products may differ (as between shards)
        assert (r.chosen_logp, r.rejected_logp) == pytest.approx((want.chosen_logp, want.rejected_logp), abs=1e-5)


def test_frames_on_ray_records_a_corrupt_video_and_writes_the_others(tmp_path, shared_data):
    clip = sorted((shared_data / "videos").glob("*.mp4"))[0]
    paths = RunPaths(tmp_path)
    paths.videos.write([Video(id="good", video=str(clip), caption="A clip."), corrupt_video(tmp_path)])
    cfg = FramesConfig(fps=1.0, width=32)
    errors = frames_on_ray(paths.videos, paths.frames, cfg, RayConfig(actors=1))
    assert [item for item, _ in errors.errors] == ["vbad"] and "vbad.mp4" in errors.errors[0][1]
    frame_files = sorted((paths.frames / "good").glob("*.jpg"))
    assert frame_files and not (paths.frames / "vbad").exists()
    made = frame_files[0].stat().st_mtime_ns
    frames_on_ray(paths.videos, paths.frames, cfg, RayConfig(actors=1))  # the finished folder is left as it is
    assert frame_files[0].stat().st_mtime_ns == made


def test_evaluate_on_ray_writes_the_local_answers_judgments_and_summary(tmp_path, tiny_policy_dir, cache_dir):
    with FakeUpstream() as upstream:
        runs = {}
        for name in ("local", "ray"):
            config = write_run(tmp_path / name, tiny_policy_dir, cache_dir, videos=3, questions=2)
            paths = runs[name] = RunPaths(tmp_path / name)
            paths.qa.write([q.model_copy(update={"split": "test"}) for q in paths.qa.read()])
            settings = yaml.safe_load(config.read_text())
            settings["judge"] = {"llm": judge_llm(upstream.url)}
            config.write_text(yaml.safe_dump(settings))
            invoke("evaluate", "--config", str(config), "--tag", "t", *(["--engine", "ray"] if name == "ray" else []))
    local, on_ray = runs["local"], runs["ray"]
    assert {p.id: p for p in on_ray.predictions("t").all()} == {p.id: p for p in local.predictions("t").all()}
    assert Counter(j.id for j in on_ray.eval_judgments("t").read()) == Counter(q.id for q in local.qa.read())
    assert without_timings(on_ray.eval_judgments("t").all()) == without_timings(local.eval_judgments("t").all())
    assert on_ray.eval_summary.all() == local.eval_summary.all()


def test_a_local_ray_leaves_a_cpu_to_read_the_rows():
    from capdpo.ray_engine import local_cpus

    assert local_cpus(RayConfig(actors=8, num_cpus=1.5)) >= 8 * 1.5 + 1  # whatever this machine's count
    assert local_cpus(RayConfig(actors=8, local_cpus=3)) == 3  # the user's word stands
