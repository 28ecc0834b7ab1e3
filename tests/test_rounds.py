"""Iterative DPO: a two-round run on the tiny random policy with a scripted judge (no judge model),
evaluated on the held-out questions and on a benchmark suite, then compared and resumed."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import pytest
import run_configs
from PIL import Image
from typer.testing import CliRunner

from capdpo.cli import app
from capdpo.config import load_config
from capdpo.judge.judge import CaptionJudge
from capdpo.llm import Reply
from capdpo.llm.cache import CachedLLM, LLMCache
from capdpo.pipeline import Run
from capdpo.rundir import RunPaths

SCRIPTED_JUDGE = {"judge": {"mode": "generate", "llm": {"backend": "openai", "model": "scripted-judge", "batch_size": 8}}}


def write_config(path: Path, run_dir: Path, policy: Path, cache_dir: Path, **sections) -> Path:
    """The pipeline tests' small run, judged by a scripted LLM."""
    return run_configs.write_config(path, run_dir, policy, cache_dir, **{**SCRIPTED_JUDGE, **sections})


class ScriptedJudgeLLM:
    """Replies from a hash of the prompt: 'Score: 1-5' for the caption reward, a Video-ChatGPT dict
    for official QA. Deterministic across processes; counts the prompts it was sent."""

    backend = "scripted"
    model_id = "scripted-judge"

    def __init__(self):
        self.prompts = 0

    def chat(self, prompts, **_):
        self.prompts += len(prompts)
        return [Reply(self.reply(p), 0.0) for p in prompts]

    @staticmethod
    def reply(prompt: str) -> str:
        h = zlib.crc32(prompt.encode())
        if "Predicted Answer" in prompt:  # the video_chatgpt template
            return f"{{'pred': '{'yes' if h % 2 else 'no'}', 'score': {h % 6}}}"
        return f"Explanation: scripted.\nScore: {1 + h % 5}"


def scripted_run(config: Path) -> tuple[Run, ScriptedJudgeLLM]:
    """A Run whose judge is the scripted LLM behind the run's reply cache, as Run.judge would
    wrap a loaded model (judge.cache)."""
    run = Run(load_config(config))
    llm = ScriptedJudgeLLM()
    cached = CachedLLM(llm, LLMCache(run.paths.llm_cache))
    run.__dict__["judge"] = CaptionJudge(run.cfg.judge, run.cfg.cache_dir, llm=cached)
    return run, llm


def official_suite(folder: Path) -> Path:
    """A two-question MSVD-QA file in LLaVA-Hound's official format; one video is missing."""
    (folder / "videos" / "clip").mkdir(parents=True)
    for i in range(4):
        Image.new("RGB", (64, 48), (50 * i, 120, 200)).save(folder / "videos" / "clip" / f"{i:03d}.jpg")
    rows = [{"id": "clip_0", "video": "clip", "conversations": [{"from": "human", "value": "<video>\nWhat color is it?"},
                                                               {"from": "gpt", "value": "blue"}]},
            {"id": "gone_0", "video": "gone.avi", "conversations": [{"from": "human", "value": "<video>\nWho?"},
                                                                   {"from": "gpt", "value": "a man"}]}]
    path = folder / "msvd.qa.official.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.slow
def test_two_rounds_resume_report_and_compare(tmp_path, tiny_policy_dir, cache_dir):
    suite = {"name": "msvd_qa", "data": str(official_suite(tmp_path / "msvd")), "video_root": str(tmp_path / "msvd" / "videos"),
             "skip_missing": True}
    config = write_config(tmp_path / "run.yaml", tmp_path / "run", tiny_policy_dir, cache_dir, rounds=2,
                          evaluate={"max_new_tokens": 6, "suites": [suite]})
    run, llm = scripted_run(config)
    run.run_all()

    top, r2 = RunPaths(tmp_path / "run"), RunPaths(tmp_path / "run").round(2)
    assert r2.root == top.root / "round-2" and [p.root for p in top.rounds()] == [top.root, r2.root]
    for paths in (top, r2):  # each round has its own records, checkpoint and evaluation
        assert paths.candidates.all() and paths.judgments.all() and paths.pairs.all()
        assert (paths.train / "policy" / "model.safetensors").exists()
    assert {c.qa_id for c in r2.candidates.all()} == {c.qa_id for c in top.candidates.all()}  # the same training questions
    # round 2 sampled from round 1's trained checkpoint, not from the starting policy
    assert {c.model for c in top.candidates.all()} == {str(tiny_policy_dir)}
    assert {c.model for c in r2.candidates.all()} == {str(top.train / "policy")}

    first = {s.id: s for s in top.eval_summary.all()}
    second = {s.id: s for s in r2.eval_summary.all()}
    assert set(first) == {"before", "after", "msvd_qa/before", "msvd_qa/after"} and set(second) == {"after", "msvd_qa/after"}
    assert all(s.round == 2 for s in second.values()) and all(s.round == 1 for s in first.values())
    msvd = second["msvd_qa/after"]
    assert (msvd.protocol, msvd.questions, msvd.skipped, msvd.template) == ("video_chatgpt", 1, 1, "video_chatgpt")
    assert first["after"].protocol == "caption_reward" and first["after"].judge_model == "scripted-judge"
    assert second["after"].model == str(r2.train / "policy")

    page = top.report.read_text()
    assert "<th>round 1</th><th>round 2</th>" in page and "round 2 after" in page and "MSVD-QA" in page
    assert not (r2.root / "report.html").exists()

    result = CliRunner().invoke(app, ["compare", f"SFT={top.root}@before", f"R1={top.root}@round-1/after",
                                      f"R2={top.root}@round-2/after", "--resamples", "100"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "| model | held-out | MSVD-QA | mean acc | judge · template hash |" in result.output
    assert "| R2 | " in result.output and "(p)" in result.output  # same questions in every evaluation: paired

    # a second run finds everything done: nothing is sampled, judged or trained again
    sent = llm.prompts
    done = [p for pattern in ("candidates.jsonl", "judgments.jsonl", "*_predictions.jsonl", "*_judgments.jsonl", "metrics.jsonl")
            for p in top.root.rglob(pattern)]
    assert len(done) == 2 * 3 + 6 + 6  # per round: candidates, judgments, metrics; 3 evaluations x 2 datasets x 2 files
    stamps = {f: f.stat().st_mtime_ns for f in done}
    rerun, rerun_llm = scripted_run(config)
    rerun.run_all()
    assert rerun_llm.prompts == 0 and llm.prompts == sent
    assert {f: f.stat().st_mtime_ns for f in stamps} == stamps

    # evaluations share the judge's cached LLM: judging the same predictions again sends nothing
    assert top.llm_cache == top.root / "llm_cache.sqlite" and top.llm_cache.exists()
    r2.eval_judgments("after").path.unlink()
    again, again_llm = scripted_run(config)
    again.enter_round(2)
    assert again.evaluate("after") == second["after"]
    assert again_llm.prompts == 0
