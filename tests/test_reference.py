"""Precomputed reference log-probs: the trainer's numbers, resumable, shardable, and checked when read."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from capdpo.cli import app
from capdpo.config import FramesConfig, TrainConfig
from capdpo.models.load import load_policy
from capdpo.policy import reference_logps
from capdpo.policy.base import VideoPolicy
from capdpo.policy.embed_cache import EmbeddingCache
from capdpo.policy.reference_logps import ReferenceMismatch, load_reference, pair_hash, reference_fingerprint
from capdpo.policy.video import VideoEncoder
from capdpo.records import PreferencePair, RecordFile, ReferenceLogps, Video
from capdpo.reference import merge_reference_shards, precompute_reference
from capdpo.rundir import RunPaths
from capdpo.shards import shard_file, shard_of

FRAMES = FramesConfig(num_frames=4)
CFG = TrainConfig(batch_size=2, max_response_tokens=8)


@pytest.fixture(scope="module")
def policy(tiny_policy_dir, cache_dir) -> VideoPolicy:
    return load_policy(str(tiny_policy_dir), cache_dir, device="cpu")


def write_data(root: Path, videos: int = 3, per_video: int = 2) -> tuple[dict[str, Video], list[PreferencePair]]:
    """Frame-folder videos and ``per_video`` pairs on each, also saved as a run folder's records."""
    rng = np.random.default_rng(0)
    rows, pairs = {}, []
    for v in range(videos):
        folder = root / "media" / f"v{v}"
        folder.mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
        rows[f"v{v}"] = Video(id=f"v{v}", video=str(folder), caption="Noise.")
        for q in range(per_video):
            pairs.append(PreferencePair(
                id=f"v{v}_{q}", qa_id=f"v{v}_{q}", video_id=f"v{v}", video=str(folder), prompt=f"What is in clip {v}, part {q}?",
                answer="Noise.", chosen="Coloured noise" + " everywhere" * q, rejected=f"A red circle number {v}{q}, moving left quickly",
                chosen_score=5, rejected_score=1, chosen_id=f"v{v}_{q}#0", rejected_id=f"v{v}_{q}#1"))
    RunPaths(root).videos.write(rows.values())
    RunPaths(root).pairs.write(pairs)
    return rows, pairs


def values(rows) -> dict[tuple[str, str], float]:
    """Every number of every row, flat (pytest.approx compares flat mappings)."""
    fields = ("chosen_logp", "rejected_logp", "chosen_tokens", "rejected_tokens")
    return {(r.id, f): getattr(r, f) for r in rows for f in fields}


def test_precomputed_values_equal_the_trainer_reference(policy, tmp_path):
    videos, pairs = write_data(tmp_path)
    out = RecordFile(tmp_path / "reference.jsonl", ReferenceLogps)
    errors = precompute_reference(pairs, videos, policy, CFG, FRAMES, out, embed_cache=EmbeddingCache(tmp_path / "emb"))
    assert not errors.errors
    rows = load_reference(out, pairs, reference_fingerprint(policy, CFG, FRAMES), CFG.max_response_tokens)
    assert list(rows) == [p.id for p in pairs]

    prompts = {v: [p.prompt for p in pairs if p.video_id == v] for v in videos}
    for p in pairs:  # the reference as the trainer computes it on the fly: two rows per pair, a fresh encode
        video = VideoEncoder(policy, FRAMES).encode(videos[p.video_id], prompts[p.video_id], CFG.max_response_tokens)
        prompt = policy.prompt_ids(p.prompt, video.layout)
        answers = [policy.response_ids(a, CFG.max_response_tokens) for a in (p.chosen, p.rejected)]
        with torch.inference_mode():
            logps, counts = policy.sequence_logps([video, video], [prompt, prompt], answers)
        row = rows[p.id]
        assert row.chosen_logp == pytest.approx(logps[0].item(), abs=1e-5)
        assert row.rejected_logp == pytest.approx(logps[1].item(), abs=1e-5)
        assert (row.chosen_tokens, row.rejected_tokens) == (counts[0].item(), counts[1].item())
    assert max(r.rejected_tokens for r in rows.values()) == CFG.max_response_tokens  # answers cut as in training


def test_interrupted_pass_resumes_without_recomputing_done_pairs(policy, tmp_path, monkeypatch):
    videos, pairs = write_data(tmp_path)
    out = RecordFile(tmp_path / "reference.jsonl", ReferenceLogps)
    whole = RecordFile(tmp_path / "whole.jsonl", ReferenceLogps)
    precompute_reference(pairs, videos, policy, CFG, FRAMES, whole, batch_size=1)

    scored: list[str] = []
    forward = reference_logps.pair_logps

    def counting(policy, videos, batch, shared_prefix):
        if len(scored) == limit:
            raise KeyboardInterrupt
        scored.append(policy.tokenizer.decode(batch[0].chosen))
        return forward(policy, videos, batch, shared_prefix)

    monkeypatch.setattr(reference_logps, "pair_logps", counting)
    limit = 2
    with pytest.raises(KeyboardInterrupt):
        precompute_reference(pairs, videos, policy, CFG, FRAMES, out, batch_size=1)
    assert len(out.all()) == 2
    limit = None
    precompute_reference(pairs, videos, policy, CFG, FRAMES, out, batch_size=1)
    assert len(scored) == len(pairs)  # 2 before the kill, the other 4 after: none twice
    assert values(out.all()) == pytest.approx(values(whole.all()))
    precompute_reference(pairs, videos, policy, CFG, FRAMES, out, batch_size=1)
    assert len(scored) == len(pairs)  # all done: nothing runs

    # a changed pair is recomputed; rows of another model stop the pass unless recomputed
    changed = [pairs[0].model_copy(update={"chosen": "Something else"}), *pairs[1:]]
    precompute_reference(changed, videos, policy, CFG, FRAMES, out, batch_size=1)
    assert len(scored) == len(pairs) + 1 and len(out.all()) == len(pairs)
    out.write([r.model_copy(update={"fingerprint": "another model"}) if r.id == pairs[1].id else r for r in out.all()])
    with pytest.raises(ReferenceMismatch, match=str(out.path)):
        precompute_reference(changed, videos, policy, CFG, FRAMES, out, batch_size=1)
    precompute_reference(changed, videos, policy, CFG, FRAMES, out, batch_size=1, recompute=True)
    assert len(scored) == len(pairs) + 2
    load_reference(out, changed, reference_fingerprint(policy, CFG, FRAMES), CFG.max_response_tokens)


def invoke(*args: str) -> str:
    result = CliRunner().invoke(app, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def write_run(root: Path, policy_dir: Path) -> Path:
    write_data(root)
    config = root / "run.yaml"
    config.write_text(yaml.safe_dump({"run_dir": str(root), "cache_dir": str(root / "cache"), "policy": {"model": str(policy_dir)},
                                      "frames": FRAMES.model_dump(), "train": {"batch_size": 2, "max_response_tokens": 8}}))
    return config


def test_cli_two_shards_merge_to_the_unsharded_pass(tiny_policy_dir, tmp_path):
    whole, split = write_run(tmp_path / "whole", tiny_policy_dir), write_run(tmp_path / "split", tiny_policy_dir)
    invoke("reference", "--config", str(whole))
    invoke("reference", "--config", str(split), "--shard", "0/2")
    invoke("reference", "--config", str(split), "--shard", "1/2")
    out = RunPaths(tmp_path / "split").reference
    shards = [shard_file(out, (i, 2)).all() for i in range(2)]
    assert all(shards) and not {r.id for r in shards[0]} & {r.id for r in shards[1]}
    assert "'pairs': 6, 'missing': 0" in invoke("reference", "merge", "--shards", "2", "--config", str(split))

    expected = RunPaths(tmp_path / "whole").reference.all()
    assert [r.id for r in out.all()] == [p.id for p in RunPaths(tmp_path / "split").pairs.all()]
    assert values(out.all()) == pytest.approx(values(expected), abs=1e-5)
    assert {r.fingerprint for r in out.all()} == {r.fingerprint for r in expected}
    # each of the 3 videos encoded once over both shards: its embeddings and its tower features
    assert len(list((tmp_path / "split" / "cache" / "embeddings").rglob("*.safetensors"))) == 3 * 2


def row(pair: PreferencePair, fingerprint: str = "fp", max_response_tokens: int = 8) -> ReferenceLogps:
    return ReferenceLogps(id=pair.id, fingerprint=fingerprint, pair_hash=pair_hash(pair, max_response_tokens),
                          chosen_logp=-1.0, rejected_logp=-2.0, chosen_tokens=3, rejected_tokens=4)


def test_load_reference_names_missing_and_stale_pairs(tmp_path):
    _, pairs = write_data(tmp_path, videos=2)
    out = RecordFile(tmp_path / "reference.jsonl", ReferenceLogps)
    out.write([row(pairs[0]), row(pairs[1], fingerprint="old"), row(pairs[2], max_response_tokens=16)])
    with pytest.raises(ReferenceMismatch) as e:
        load_reference(out.path, pairs, "fp", 8)
    message = str(e.value)
    assert str(out.path) in message and pairs[0].id not in message
    assert f"missing for 1 pair(s): {pairs[3].id}" in message
    assert f"another reference model or settings for 1 pair(s): {pairs[1].id}" in message
    assert f"changed for 1 pair(s): {pairs[2].id}" in message
    assert load_reference(out.path, pairs[:1], "fp", 8) == {pairs[0].id: row(pairs[0])}


def test_merge_verifies_its_shards(tmp_path):
    _, pairs = write_data(tmp_path, videos=3)
    out = RecordFile(tmp_path / "reference.jsonl", ReferenceLogps)
    with pytest.raises(FileNotFoundError, match="shard-0-of-2"):
        merge_reference_shards(out, 2, pairs)
    for i in range(2):
        shard_file(out, (i, 2)).write([row(p) for p in pairs[1:] if shard_of(p.id, 2) == i])
    first = next(p for p in pairs[1:] if shard_of(p.id, 2) == 0)
    shard_file(out, (0, 2)).append(row(first))  # two processes ran the same shard
    assert merge_reference_shards(out, 2, pairs) == {"shards": 2, "pairs": 5, "missing": 1, "duplicates_dropped": 1}
    assert [r.id for r in out.all()] == [p.id for p in pairs[1:]]

    shard_file(out, (0, 2)).append(row(first, fingerprint="other"))
    with pytest.raises(ValueError, match="with different content"):
        merge_reference_shards(out, 2, pairs)
    wrong = next(p for p in pairs if shard_of(p.id, 2) == 1)
    shard_file(out, (0, 2)).write([row(wrong)])
    with pytest.raises(ValueError, match="belongs to shard 1"):
        merge_reference_shards(out, 2, pairs)
