"""The DPO trainer: configured losses, reference modes, exact resume, and two processes on gloo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import capdpo.train as train
import capdpo.training as training
from capdpo.config import FramesConfig, TrainConfig
from capdpo.models.load import load_policy
from capdpo.policy.base import VideoPolicy
from capdpo.policy.embed_cache import EmbeddingCache

FRAMES = FramesConfig(num_frames=4)


def train_once(pair_files, policy_dir, cache_dir, out: Path, **overrides) -> Path:
    pairs, videos = pair_files
    cfg = TrainConfig(**{"epochs": 2, "batch_size": 2, "lr": 1e-3, "lora": False, "save_every": 1, **overrides})
    policy = load_policy(str(policy_dir), cache_dir, "cpu", "float32")
    return train.run_train(pairs, videos, policy, cfg, FRAMES, out, embed_cache=EmbeddingCache(out / "cache") if cfg.embedding_cache else None)


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def weights(policy_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(policy_dir / "model.safetensors")


def test_killed_run_resumes_to_the_same_weights_and_metrics(pair_files, tiny_policy_dir, cache_dir, tmp_path, monkeypatch):
    whole = train_once(pair_files, tiny_policy_dir, cache_dir, tmp_path / "whole")

    step, calls = train.dpo_step, []

    def dies_at_the_fourth_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt("killed")
        return step(*args, **kwargs)

    monkeypatch.setattr(train, "dpo_step", dies_at_the_fourth_batch)
    with pytest.raises(KeyboardInterrupt):
        train_once(pair_files, tiny_policy_dir, cache_dir, tmp_path / "resumed")
    assert training.latest_checkpoint(tmp_path / "resumed" / "checkpoints").name == "step-3"
    monkeypatch.setattr(train, "dpo_step", step)
    resumed = train_once(pair_files, tiny_policy_dir, cache_dir, tmp_path / "resumed")

    a, b = weights(whole), weights(resumed)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run's"
    ma, mb = metrics(tmp_path / "whole"), metrics(tmp_path / "resumed")
    assert [m["step"] for m in mb] == [1, 2, 3, 4, 5, 6]
    assert [m["loss"] for m in ma] == [m["loss"] for m in mb]
    assert [m["lr"] for m in ma] == [m["lr"] for m in mb]
    assert not (tmp_path / "resumed" / "checkpoints").exists(), "a finished run keeps no checkpoints"


def test_fast_path_matches_the_standard_formulation(pair_files, tiny_policy_dir, cache_dir, tmp_path):
    """Cached reference + shared prefix give the losses of reference-every-step + two rows per pair."""
    fast = train_once(pair_files, tiny_policy_dir, cache_dir, tmp_path / "fast", save_every=0)
    plain = train_once(pair_files, tiny_policy_dir, cache_dir, tmp_path / "plain", save_every=0,
                       reference="model", shared_prefix=False, embedding_cache=False)
    mf, mp = metrics(tmp_path / "fast"), metrics(tmp_path / "plain")
    for a, b in zip(mf, mp):
        for key in ("loss", "rewards/margins", "logps/chosen", "logps/rejected"):
            assert a[key] == pytest.approx(b[key], abs=1e-4), key
    assert (tmp_path / "fast" / "reference.jsonl").exists() and not (tmp_path / "plain" / "reference.jsonl").exists()
    wf, wp = weights(fast), weights(plain)
    assert max((wf[k] - wp[k]).abs().max().item() for k in wf) < 1e-4


def tower_runs(policy: VideoPolicy, runs: list[int]) -> VideoPolicy:
    """``policy``, each run of its vision tower counted in ``runs``."""
    policy.vision_module().register_forward_hook(lambda *_: runs.append(1))
    return policy


def test_embeddings_are_encoded_once_across_runs(pair_files, tiny_policy_dir, cache_dir, tmp_path):
    runs = []
    cache = tmp_path / "shared-cache"
    pairs, videos = pair_files
    for out in ("first", "second"):
        policy = tower_runs(load_policy(str(tiny_policy_dir), cache_dir, "cpu", "float32"), runs)
        train.run_train(pairs, videos, policy, TrainConfig(epochs=2, batch_size=2, lora=False, save_every=0),
                        FRAMES, tmp_path / out, embed_cache=EmbeddingCache(cache))
    assert len(runs) == 3, "each of the 3 videos is encoded once, for both runs, every epoch and the reference"


def test_a_training_projector_starts_from_the_frozen_tower_s_cached_features(pair_files, tiny_policy_dir, cache_dir, tmp_path,
                                                                             monkeypatch):
    """With the projector training, each video's tower runs once for both runs, both epochs and the
    reference, and the run trains as the pixel path does (tower + projector every step)."""
    runs = []
    pairs, videos = pair_files
    settings = TrainConfig(epochs=2, batch_size=2, lora=True, freeze_projector=False, save_every=0)
    for out in ("first", "second"):
        policy = tower_runs(load_policy(str(tiny_policy_dir), cache_dir, "cpu", "float32"), runs)
        train.run_train(pairs, videos, policy, settings, FRAMES, tmp_path / out, embed_cache=EmbeddingCache(tmp_path / "cache"))
    assert len(runs) == 3, "the 3 videos' tower features serve both runs, every step and the reference"

    monkeypatch.setattr(type(policy), "splits_projector", False)  # the pixel path: tower + projector each step
    policy = tower_runs(load_policy(str(tiny_policy_dir), cache_dir, "cpu", "float32"), runs)
    train.run_train(pairs, videos, policy, settings, FRAMES, tmp_path / "pixels", embed_cache=None)
    assert len(runs) > 3 + 6
    for a, b in zip(metrics(tmp_path / "first"), metrics(tmp_path / "pixels"), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
    base, features, pixels = weights(tiny_policy_dir), weights(tmp_path / "first" / "policy"), weights(tmp_path / "pixels" / "policy")
    projector = [k for k in base if "multi_modal_projector" in k]
    assert projector and all(not torch.equal(base[k], features[k]) for k in projector), "the projector trained"
    assert max((features[k] - pixels[k]).abs().max().item() for k in features) < 1e-5


@pytest.mark.parametrize("loss", ["hinge", "ipo", "simpo", [["sigmoid", 0.8], ["sft", 0.2]]])
def test_configured_loss_is_the_one_trained(loss, pair_files, tiny_policy_dir, cache_dir, tmp_path):
    train_once(pair_files, tiny_policy_dir, cache_dir, tmp_path, loss=loss, epochs=1, save_every=0, lora=True)
    rows = metrics(tmp_path)
    assert len(rows) == 3 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    # the policy starts as the reference: every reference-based loss starts at its h = 0 value
    first = rows[0]["loss"]
    expected = {"hinge": 1.0, "ipo": (1 / (2 * 0.1)) ** 2}.get(loss if isinstance(loss, str) else "")
    if expected is not None:
        assert first == pytest.approx(expected, rel=1e-5)
    assert (tmp_path / "reference.jsonl").exists() == (loss != "simpo"), "SimPO needs no reference pass"


def test_lora_reference_and_full_copy_reference_agree_with_the_cache(pair_files, tiny_policy_dir, cache_dir, tmp_path):
    cached = train_once(pair_files, tiny_policy_dir, cache_dir, tmp_path / "cached", lora=True, epochs=1, save_every=0)
    live = train_once(pair_files, tiny_policy_dir, cache_dir, tmp_path / "live", lora=True, epochs=1, save_every=0,
                      reference="model")
    for a, b in zip(metrics(tmp_path / "cached"), metrics(tmp_path / "live")):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
    assert cached.exists() and live.exists()


def test_metrics_go_to_tensorboard_when_asked(pair_files, tiny_policy_dir, cache_dir, tmp_path):
    pytest.importorskip("tensorboard", reason="pip install tensorboard (capdpo[tracking])")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train_once(pair_files, tiny_policy_dir, cache_dir, tmp_path, epochs=1, save_every=0, report_to=["tensorboard"])
    runs = [EventAccumulator(str(p.parent)) for p in tmp_path.rglob("events.out.tfevents.*")]
    [scalars] = [run for run in runs if "loss" in run.Reload().Tags()["scalars"]]
    losses = [e.value for e in scalars.Scalars("loss")]
    assert losses == pytest.approx([m["loss"] for m in metrics(tmp_path)])


def test_nothing_to_train_is_a_clear_error(pair_files, tiny_policy_dir, cache_dir, tmp_path):
    with pytest.raises(ValueError, match="nothing to train"):
        train_once(pair_files, tiny_policy_dir, cache_dir, tmp_path, lora=False, freeze_llm=True)


def test_two_processes_on_gloo_shard_the_data_and_gather_metrics(pair_files, tiny_policy_dir, cache_dir, tmp_path):
    pairs, videos = pair_files
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true", "CAPDPO_CACHE": str(cache_dir)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29571",
           str(Path(__file__).with_name("ddp_train.py")), str(pairs.path), str(videos.path), str(tiny_policy_dir),
           str(tmp_path / "out"), str(cache_dir), str(log_dir)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    ranks = [json.loads((log_dir / f"rank-{r}.json").read_text()) for r in (0, 1)]
    seen = [set(r["seen"]) for r in ranks]
    assert seen[0] and seen[1] and not seen[0] & seen[1], "each process trains on its own share of the pairs"
    assert seen[0] | seen[1] == {p.id for p in pairs.all()}
    assert ranks[0]["logged"] == ranks[1]["logged"], "metrics are gathered: every process logs the same values"
    assert len(metrics(tmp_path / "out")) == 3, "6 pairs, batch 1 per process, 2 processes: 3 optimizer steps"
    assert (tmp_path / "out" / "policy" / training.DONE).exists()


def test_video_grouped_sampler_keeps_each_video_together_in_a_seeded_order():
    videos = ["a", "b", "a", "c", "b", "a", "c"]
    sampler = training.VideoGroupedSampler(videos, seed=3)
    first = list(sampler)
    assert sorted(first) == list(range(len(videos))) and len(sampler) == len(videos)
    runs = [videos[i] for i in first]
    assert [v for k, v in enumerate(runs) if k == 0 or runs[k - 1] != v] == sorted(set(videos), key=runs.index), \
        "each video's pairs come in one run"
    assert list(training.VideoGroupedSampler(videos, seed=3)) == first, "the order depends on the seed only"
    sampler.set_epoch(1)
    orders = {tuple(first)} | {tuple(sampler)}
    for epoch in range(2, 6):
        sampler.set_epoch(epoch)
        orders.add(tuple(sampler))
    assert len(orders) > 1, "each epoch reshuffles"
