"""DeepSpeed ZeRO-2 / ZeRO-3 and torch FSDP2 with the shipped configs, proven on the CPU: two gloo
processes run capdpo's DPO step (PairScorer on packed shared-prefix rows, the cached reference, the
configured loss), with the vision tower frozen (cached embeddings) and trained (pixels encoded in
every step through the sharded encoder), and must match one process on the same batch; the gathered full checkpoint must
load as a plain HF checkpoint, and a run resumed from the step-1 checkpoint must continue identically.
GRPO under ZeRO-3 and FSDP2: each process samples its group from the sharded model and the two steps
match one process (``engine_grpo.py``).

The engines are built directly by ``cpu_engines.py`` (accelerate refuses both on the CPU), from the
settings in ``configs/accelerate/*.yaml``. The comparison runs in fp32 (the configs' bf16 is a GPU setting).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "accelerate"
LOSS_TOL = 1e-5  # fp32, one pair per process vs the mean over both in one process
GRAD_TOL = 1e-5
WEIGHT_TOL = 1e-5  # after two AdamW steps at lr 1e-3


def test_shipped_engine_configs_are_the_tested_ones():
    zero2, zero3, fsdp = (yaml.safe_load((CONFIGS / f"{n}.yaml").read_text()) for n in ("zero2", "zero3", "fsdp"))
    assert zero2["deepspeed_config"]["zero_stage"] == 2 and zero3["deepspeed_config"]["zero_stage"] == 3
    for ds in (zero2["deepspeed_config"], zero3["deepspeed_config"]):
        assert ds["offload_optimizer_device"] == ds["offload_param_device"] == "none"
        assert not ds["zero3_init_flag"], "the policy is loaded whole, then sharded (what engine_train.py does)"
    assert zero3["deepspeed_config"]["zero3_save_16bit_model"], "the saved policy must hold the gathered weights"
    fsdp_cfg = fsdp["fsdp_config"]
    assert (fsdp_cfg["fsdp_version"], fsdp_cfg["fsdp_auto_wrap_policy"], fsdp_cfg["fsdp_state_dict_type"]) == \
        (2, "TRANSFORMER_BASED_WRAP", "FULL_STATE_DICT")


@pytest.mark.slow
@pytest.mark.parametrize("engine, encoder", [("zero2", "frozen"), ("zero3", "frozen"), ("fsdp", "frozen"),
                                             ("zero3", "trained"), ("fsdp", "trained")])
def test_engine_matches_one_process_saves_and_resumes(engine, encoder, pair_files, tiny_policy_dir, cache_dir, tmp_path):
    if engine != "fsdp":
        pytest.importorskip("deepspeed", reason="pip install capdpo[deepspeed] (make setup installs it)")
    pairs, videos = pair_files
    result = tmp_path / "result.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true", "DS_ACCELERATOR": "cpu",
           "CAPDPO_CACHE": str(cache_dir)}
    port = str({"zero2": 29581, "zero3": 29582, "fsdp": 29583}[engine] + 10 * (encoder == "trained"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
           str(Path(__file__).with_name("engine_train.py")), engine, encoder, str(pairs.path), str(videos.path),
           str(tiny_policy_dir), str(tmp_path / "out"), str(cache_dir), str(result)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    (tmp_path / "stderr.txt").write_text(done.stderr)
    assert done.returncode == 0, done.stderr[-6000:]
    r = json.loads(result.read_text())
    assert r["sharded"], "each process holds only its shard"
    assert r["trainable"] > 0 and r["changed"] > 1e-4, "the step moved the weights"
    assert r["losses"] == pytest.approx(r["lone_losses"], abs=LOSS_TOL)
    assert r["grad_ratio"] == pytest.approx(1.0, abs=1e-4), "gradients averaged over the processes, not summed"
    assert r["grad_diff"] < GRAD_TOL
    assert r["weight_diff"] < WEIGHT_TOL, "two steps of the engine = two steps of one process"
    assert r["reloaded_diff"] == 0 and r["plain_diff"] == 0, "the saved policy is the full trained weights"
    assert r["resumed_loss"] == pytest.approx(r["losses"][1], abs=1e-6)
    assert r["resumed_diff"] < 1e-6, "a run resumed from the step-1 checkpoint continues identically"


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["zero2", "zero3", "fsdp"])
def test_grpo_samples_and_trains_a_sharded_model_as_one_process_would(engine, tiny_policy_dir, cache_dir, tmp_path):
    """GRPO under ZeRO-2 / ZeRO-3 / FSDP2 (tests/engine_grpo.py): each process generates its question's group from a
    model it holds only a shard of, and the two steps match one process on the whole batch."""
    if engine != "fsdp":
        pytest.importorskip("deepspeed", reason="pip install capdpo[deepspeed] (make setup installs it)")
    from capdpo.media.synthetic import make_synthetic_dataset
    from capdpo.records import QAItem, RecordFile, Video

    clips = make_synthetic_dataset(tmp_path / "clips", 2, seed=5)
    videos, qa = RecordFile(tmp_path / "videos.jsonl", Video), RecordFile(tmp_path / "qa.jsonl", QAItem)
    videos.write(c.video for c in clips)
    qa.write(QAItem(id=f"{c.video.id}_{i}", video_id=c.video.id, question=q, answer=a)
             for c in clips for i, (q, a, _) in enumerate(c.qa[:2]))  # 4 questions: 2 steps x 2 processes
    result = tmp_path / "result.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true", "DS_ACCELERATOR": "cpu",
           "CAPDPO_CACHE": str(cache_dir)}
    port = str({"zero2": 29600, "zero3": 29601, "fsdp": 29602}[engine])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
           str(Path(__file__).with_name("engine_grpo.py")), engine, str(qa.path), str(videos.path), str(tiny_policy_dir),
           str(tmp_path / "out"), str(cache_dir), str(result)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, check=False)
    (tmp_path / "stderr.txt").write_text(done.stderr)
    assert done.returncode == 0, done.stderr[-6000:]
    r = json.loads(result.read_text())
    assert r["sharded"], "each process holds only its shard (ZeRO-2: of the optimizer state)"
    assert r["lengths"] == r["lone_lengths"], "the sharded model sampled the answers one process samples"
    assert r["grad_norm"] > 0 and r["changed"] > 1e-4, "the rewards differed within groups: the step moved the weights"
    assert r["losses"] == pytest.approx(r["lone_losses"], abs=LOSS_TOL)
    assert r["grad_diff"] < GRAD_TOL
    assert r["weight_diff"] < WEIGHT_TOL, "two steps of the engine = two steps of one process"
