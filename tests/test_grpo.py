"""Online GRPO (train.algorithm: grpo): rule rewards, group advantages, and the stage on the tiny policy with a
scripted judge - exact resume after a kill, the TRL metrics, the judge budget guard, the pipeline's GRPO round."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_rounds import ScriptedJudgeLLM, scripted_run, write_config

from capdpo import grpo, training
from capdpo.config import FramesConfig, JudgeConfig, LLMConfig, TrainConfig
from capdpo.errors import BudgetExceeded, RewardsMissing
from capdpo.grpo_loss import group_advantages, grpo_loss
from capdpo.judge.judge import CaptionJudge
from capdpo.llm import Reply
from capdpo.models.load import load_policy
from capdpo.policy.video import VideoEncoder
from capdpo.records import QAItem, RecordFile, Video
from capdpo.rewards import exact_match, first_number, numeric
from capdpo.rundir import RunPaths

FRAMES = FramesConfig(num_frames=4)
GRPO = {"num_generations": 3, "questions_per_step": 2, "max_completion_length": 8, "beta": 0.04,
        "rewards": [{"name": "caption_judge"}, {"name": "numeric", "weight": 0.5}]}


def test_rule_rewards():
    assert exact_match("The cat.", "cat") == 1.0 and exact_match("a dog", "cat") == 0.0
    assert numeric("There are three shapes.", "3 shapes") == 1.0
    assert numeric("Two.", "There are 3.") == 0.0 and numeric("I cannot tell.", "3") == 0.0
    assert math.isnan(numeric("red", "It is a red ball."))  # no number in the reference: does not apply
    assert first_number("no number here") is None and first_number("about 2.5 seconds") == 2.5


def test_a_group_of_equal_rewards_teaches_nothing_and_an_unscorable_answer_gets_no_advantage():
    rewards = torch.tensor([[1.0], [1.0], [1.0], [1.0], [1.0], [0.0], [math.nan], [0.0]])
    scored = group_advantages(rewards, torch.tensor([1.0]), 4, ["r"])
    assert scored.advantages[:4].abs().max() == 0 and scored.advantages[6] == 0
    assert scored.advantages[4] > 0 > scored.advantages[5]
    assert scored.metrics["frac_reward_zero_std"] == 0.5
    logps = torch.randn(8, 3, requires_grad=True)
    loss, _ = grpo_loss(logps, torch.zeros(8), torch.ones(8, 3))
    assert loss.item() == 0.0


@pytest.fixture(scope="module")
def grpo_data(tmp_path_factory) -> tuple[RecordFile[QAItem], RecordFile[Video]]:
    """Three synthetic clips and two exact train questions each: the count question (numeric reward) and one other."""
    from capdpo.media.synthetic import make_synthetic_dataset

    root = tmp_path_factory.mktemp("grpo-data")
    clips = make_synthetic_dataset(root / "clips", 3, seed=3)
    videos, qa = RecordFile(root / "videos.jsonl", Video), RecordFile(root / "qa.jsonl", QAItem)
    videos.write(c.video for c in clips)
    items = []
    for c in clips:
        count = next(x for x in c.qa if x[2] == "count")
        other = next(x for x in c.qa if x[2] != "count")
        items += [QAItem(id=f"{c.video.id}_{i}", video_id=c.video.id, question=q, answer=a) for i, (q, a, _) in enumerate([count, other])]
    qa.write(items)
    return qa, videos


def judge(tmp_path: Path, **limits) -> tuple[CaptionJudge, ScriptedJudgeLLM]:
    llm = ScriptedJudgeLLM()
    cfg = JudgeConfig(mode="generate", llm=LLMConfig(backend="openai", model="scripted-judge"), **limits)
    return CaptionJudge(cfg, tmp_path, llm=llm), llm


def grpo_once(grpo_data, policy_dir, cache_dir, out: Path, judge_: CaptionJudge, **overrides) -> Path:
    questions, videos = grpo_data
    settings = {"algorithm": "grpo", "epochs": 1, "lr": 1e-3, "lora": False, "save_every": 1, "grpo": GRPO}
    cfg = TrainConfig(**{**settings, **overrides})
    policy = load_policy(str(policy_dir), cache_dir, "cpu", "float32")
    return grpo.run_grpo(questions, videos, policy, cfg, FRAMES, out, judge=judge_)


def strict_json(line: str) -> dict:
    """A line parsed as JSON proper: a bare NaN or Infinity (which json.loads would take) fails the test."""
    return json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} in a metrics line: not JSON"))


def metrics(out: Path) -> list[dict]:
    return [strict_json(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_killed_grpo_resumes_to_the_same_weights_and_logs_trl_metrics(grpo_data, tiny_policy_dir, cache_dir,
                                                                      tmp_path, monkeypatch):
    whole = grpo_once(grpo_data, tiny_policy_dir, cache_dir, tmp_path / "whole", judge(tmp_path / "j1")[0])
    rows = metrics(tmp_path / "whole")
    assert [r["step"] for r in rows] == [1, 2, 3]  # 6 questions, 2 a step
    for name in ("loss", "reward", "reward_std", "rewards/caption_judge/mean", "rewards/numeric/std", "kl",
                 "clip_ratio/region_mean", "completions/mean_length", "completions/clipped_ratio", "frac_reward_zero_std",
                 "grad_norm", "step_time_s"):
        assert all(math.isfinite(r[name]) for r in rows), name
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # the first step's policy is the reference

    step, calls = grpo.grpo_step, []

    def dies_at_the_third_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt("killed")
        return step(*args, **kwargs)

    monkeypatch.setattr(grpo, "grpo_step", dies_at_the_third_step)
    with pytest.raises(KeyboardInterrupt):
        grpo_once(grpo_data, tiny_policy_dir, cache_dir, tmp_path / "resumed", judge(tmp_path / "j2")[0])
    assert training.latest_checkpoint(tmp_path / "resumed" / "checkpoints").name == "step-2"
    monkeypatch.setattr(grpo, "grpo_step", step)
    resumed = grpo_once(grpo_data, tiny_policy_dir, cache_dir, tmp_path / "resumed", judge(tmp_path / "j3")[0])

    a, b = load_file(whole / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run's"
    assert metrics(tmp_path / "resumed")[-1]["reward"] == pytest.approx(rows[-1]["reward"])


def test_lora_grpo_with_its_adapters_off_as_reference(grpo_data, tiny_policy_dir, cache_dir, tmp_path):
    before = load_file(tiny_policy_dir / "model.safetensors")
    out = grpo_once(grpo_data, tiny_policy_dir, cache_dir, tmp_path / "lora", judge(tmp_path)[0],
                    lora=True, lr=5e-2, max_steps=2, grpo={"num_generations": 4, "questions_per_step": 3, "beta": 0.1,
                                                           "max_completion_length": 6, "loss_type": "grpo",
                                                           "rewards": [{"name": "caption_judge"}]})
    after = load_file(out / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before if "language_model" in k)  # merged adapters moved the LLM
    assert all(torch.equal(before[k], after[k]) for k in before if "vision_tower" in k)
    assert len(metrics(tmp_path / "lora")) == 2


def test_the_judge_budget_stops_grpo_with_a_checkpoint_to_resume_from(grpo_data, tiny_policy_dir, cache_dir,
                                                                      tmp_path):
    limited, llm = judge(tmp_path, max_requests=8)  # one step's 6 answers fit, the second's do not
    with pytest.raises(BudgetExceeded, match="GRPO stopped at step 1"):
        grpo_once(grpo_data, tiny_policy_dir, cache_dir, tmp_path / "out", limited)
    assert llm.prompts == 6
    assert training.latest_checkpoint(tmp_path / "out" / "checkpoints").name == "step-1"


class JudgeDown(ScriptedJudgeLLM):
    """A remote judge whose endpoint is down for the requests numbered in ``down`` (from 0; one
    request per GRPO step): they come back failed, as the openai backend returns them after its retries."""

    backend = "openai"

    def __init__(self, down: set[int] | range):
        super().__init__()
        self.down, self.requests = down, 0

    def chat(self, prompts, **kwargs):
        self.requests += 1
        if self.requests - 1 in self.down:
            return [Reply("", 0.0, error="Connection refused (http://127.0.0.1:8000/v1)") for _ in prompts]
        return super().chat(prompts, **kwargs)


def test_grpo_with_its_judge_down_takes_no_step_stops_with_a_checkpoint_and_resumes_when_it_is_back(
        grpo_data, tiny_policy_dir, cache_dir, tmp_path):
    """It used to train every step on NaN rewards (loss 0, grad norm 0), exit 0 and save a "trained" policy."""
    cfg = JudgeConfig(mode="generate", llm=LLMConfig(backend="openai", model="scripted-judge"))
    out, settings = tmp_path / "out", {"grpo": {**GRPO, "max_failed_steps": 2}}
    down = CaptionJudge(cfg, tmp_path / "j1", llm=JudgeDown(range(100)))
    with pytest.raises(RewardsMissing, match=r"2 steps in a row had nothing to learn from \(the judge scored none of its "
                                             r"answers: judge backend failed.*Connection refused.*0 of 3 steps are trained"):
        grpo_once(grpo_data, tiny_policy_dir, cache_dir, out, down, **settings)
    assert not (out / "policy").exists()  # nothing saved as trained
    assert training.latest_checkpoint(out / "checkpoints").name == "step-0"  # where the first rewardless step began
    assert metrics(out) == []  # no step taken, none logged

    # the judge is back, but for one step: that step is not taken, the others train, the policy is saved
    flaky = JudgeDown({1})
    final = grpo_once(grpo_data, tiny_policy_dir, cache_dir, out, CaptionJudge(cfg, tmp_path / "j2", llm=flaky), **settings)
    assert flaky.requests == 3 and (final / training.DONE).exists()
    rows = metrics(out)  # every line strict JSON
    assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["reward"]) and r["grad_norm"] > 0 for r in rows)


def test_a_metric_without_a_value_is_written_as_null(tmp_path):
    from types import SimpleNamespace

    path = tmp_path / "metrics.jsonl"
    training.write_metrics(SimpleNamespace(is_main_process=True), TrainConfig(), path, training.Progress(step=1, batch=1), 1,
                           1e-3, {"loss": 0.5, "grad_norm": float("nan"), "rewards/numeric/std": float("inf")})
    assert strict_json(path.read_text()) == {"step": 1, "epoch": 1.0, "lr": 1e-3, "loss": 0.5, "grad_norm": None,
                                             "rewards/numeric/std": None}


class WaitsForThePolicy(ScriptedJudgeLLM):
    """A remote judge whose replies come once the policy has scored the step's answers: with the
    overlap it is asked on a worker thread and waits; asked before the scoring, it would wait in vain."""

    backend = "openai"

    def __init__(self, scored: threading.Event):
        super().__init__()
        self.scored, self.calls = scored, []

    def chat(self, prompts, **kwargs):
        waited = self.scored.wait(timeout=30)
        self.scored.clear()
        self.calls.append((threading.current_thread() is threading.main_thread(), waited))
        return super().chat(prompts, **kwargs)


def test_a_remote_judge_works_while_the_policy_scores_the_answers(grpo_data, tiny_policy_dir, cache_dir, tmp_path,
                                                                  monkeypatch):
    scored = threading.Event()
    forward = grpo.GroupScorer.forward

    def scores_then_signals(self, *args, sampling=None):
        out = forward(self, *args, sampling=sampling)
        if sampling is None:  # the answers' log-probs, not their sampling
            scored.set()
        return out

    monkeypatch.setattr(grpo.GroupScorer, "forward", scores_then_signals)
    overlapped = WaitsForThePolicy(scored)
    cfg = JudgeConfig(mode="generate", llm=LLMConfig(backend="openai", model="scripted-judge"))
    grpo_once(grpo_data, tiny_policy_dir, cache_dir, tmp_path / "overlap", CaptionJudge(cfg, tmp_path, llm=overlapped))
    assert overlapped.calls == [(False, True)] * 3  # each step: asked on the worker, answered after the scoring

    monkeypatch.setattr(grpo.GroupScorer, "forward", forward)
    in_turn = ScriptedJudgeLLM()
    grpo_once(grpo_data, tiny_policy_dir, cache_dir, tmp_path / "in-turn", CaptionJudge(cfg, tmp_path / "j", llm=in_turn),
              grpo={**GRPO, "judge_overlap": "off"})
    same = ("reward", "rewards/caption_judge/mean", "loss", "kl")
    assert [{k: r[k] for k in same} for r in metrics(tmp_path / "overlap")] == \
        [{k: r[k] for k in same} for r in metrics(tmp_path / "in-turn")]


def test_a_grpo_round_in_the_pipeline_skips_sampling_and_pairs(tiny_policy_dir, cache_dir, tmp_path):
    config = write_config(tmp_path / "c.yaml", tmp_path / "run", tiny_policy_dir, cache_dir,
                          train={"algorithm": "grpo", "epochs": 1, "lr": 1e-3, "lora": False,
                                 "grpo": {"num_generations": 2, "questions_per_step": 4, "max_completion_length": 6}})
    run, _ = scripted_run(config)
    run.run_all()
    paths = RunPaths(tmp_path / "run")
    assert not paths.candidates.exists() and not paths.pairs.exists()
    assert (paths.train / "policy" / training.DONE).exists()
    assert {s.tag or s.id for s in paths.eval_summary.read()} == {"before", "after"}
    assert "rewards/caption_judge/mean" in (paths.train / "metrics.jsonl").read_text()
    page = paths.report.read_text()
    assert "GRPO training" in page and "last reward" in page and "After minus before" in page


@pytest.mark.slow
def test_grpo_trains_the_mini_policy_end_to_end(grpo_data, cache_dir, tmp_path):
    """The built-in architecture at its real size (DINOv2-S, 8 frames, SmolLM2-135M with LoRA): two
    GRPO steps with the caption reward and the numeric rule, a policy saved that loads and answers."""
    from capdpo.models.mini import SPEC, assemble_mini

    questions, videos = grpo_data
    cfg = TrainConfig(algorithm="grpo", epochs=1, max_steps=2, lr=1e-3, lora=True, save_every=0,
                      grpo={"num_generations": 4, "questions_per_step": 2, "max_completion_length": 12, "beta": 0.04,
                            "rewards": [{"name": "caption_judge"}, {"name": "numeric"}]})
    start = assemble_mini(cache_dir)
    before = {k: v.clone() for k, v in start.model.state_dict().items()}
    out = grpo.run_grpo(questions, videos, start, cfg, FramesConfig(num_frames=SPEC.num_frames),
                        tmp_path / "mini", judge=judge(tmp_path)[0])
    rows = metrics(tmp_path / "mini")
    assert [r["step"] for r in rows] == [1, 2]
    assert all(math.isfinite(r[k]) for r in rows for k in ("loss", "reward", "kl", "grad_norm", "completions/mean_length"))
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    policy = load_policy(str(out), cache_dir, "cpu", "float32")
    after = policy.model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if "language_model" in k)  # the merged adapters
    assert all(torch.equal(before[k], after[k]) for k in before if "vision_tower" in k)
    q = questions.all()[0]
    encoded = VideoEncoder(policy, FramesConfig(num_frames=SPEC.num_frames)).encode(videos.by_id()[q.video_id], [q.question], 8)
    assert len(policy.generate(encoded, q.question, max_new_tokens=8)) == 1


def test_two_processes_on_gloo_share_the_questions_and_gather_metrics(grpo_data, tiny_policy_dir, cache_dir, tmp_path):
    """GRPO through accelerate with DDP (tests/ddp_grpo.py): each process samples for its own questions."""
    questions, videos = grpo_data
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true", "CAPDPO_CACHE": str(cache_dir)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29611",
           str(Path(__file__).with_name("ddp_grpo.py")), str(questions.path), str(videos.path), str(tiny_policy_dir),
           str(tmp_path / "out"), str(cache_dir), str(log_dir)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    ranks = [json.loads((log_dir / f"rank-{r}.json").read_text()) for r in (0, 1)]
    seen = [set(r["seen"]) for r in ranks]
    assert seen[0] and seen[1] and not seen[0] & seen[1], "each process samples for its own share of the questions"
    assert seen[0] | seen[1] == {q.id for q in questions.all()}
    assert ranks[0]["logged"] == ranks[1]["logged"], "metrics are gathered: every process logs the same values"
    assert [r["step"] for r in metrics(tmp_path / "out")] == [1, 2, 3], "6 questions, 1 per process a step"
    assert (tmp_path / "out" / "policy" / training.DONE).exists()
