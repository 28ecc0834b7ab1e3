"""The ``sft`` stage: mixtures by ratio, the held-out split, answer-only loss, phases with their own
parts and learning rates, exact resume, the saved checkpoint, bad rows, and a second family."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import capdpo.models.sft as sft_phases
import capdpo.sft as sft
from capdpo.config import FramesConfig, SFTConfig, SFTPhase, SFTSource
from capdpo.errors import ItemErrors
from capdpo.models.load import load_policy
from capdpo.models.sft import Example
from capdpo.policy.embed_cache import EmbeddingCache
from capdpo.records import QAItem, RecordError, RecordFile, Video
from capdpo.training import DONE, MixtureSampler, latest_checkpoint, mixture_quotas, parameter_groups, set_trainable
from test_families import FAMILIES

FRAMES = FramesConfig(num_frames=4)


def phases(**instruct) -> SFTConfig:
    """Projector alone on captions, then projector + LoRA on captions and QA, each at its own rate."""
    return SFTConfig(phases=[
        SFTPhase(name="align", sources=[SFTSource(kind="captions")], lr={"projector": 1e-2}, batch_size=2),
        SFTPhase(name="instruct", sources=[SFTSource(kind="captions", ratio=0.3), SFTSource(kind="qa", ratio=0.7)],
                 lr={"projector": 1e-3, "llm": 1e-2}, lora_r=4, lora_alpha=8, batch_size=4, examples_per_epoch=8, epochs=2,
                 **instruct)],
        save_every=1, max_response_tokens=24)


@pytest.fixture(scope="module")
def run_files(tmp_path_factory):
    """Four synthetic clips, the last one held out, with their captions and exact QA."""
    from capdpo.media.synthetic import make_synthetic_dataset

    root = tmp_path_factory.mktemp("sft-run")
    clips = make_synthetic_dataset(root / "clips", 4, seed=5)
    split = {c.video.id: "test" if i == 3 else "train" for i, c in enumerate(clips)}
    videos = RecordFile(root / "videos.jsonl", Video)
    videos.write(c.video.model_copy(update={"split": split[c.video.id]}) for c in clips)
    qa = RecordFile(root / "qa.jsonl", QAItem)
    qa.write(QAItem(id=f"{c.video.id}_{i}", video_id=c.video.id, question=q, answer=a, split=split[c.video.id],
                    source=f"scene:{kind}") for c in clips for i, (q, a, kind) in enumerate(c.qa))
    return videos, qa


def sft_once(run_files, policy_dir, cache_dir, out: Path, cfg: SFTConfig | None = None, **kwargs) -> Path:
    videos, qa = run_files
    policy = load_policy(str(policy_dir), cache_dir, "cpu", "float32")
    return sft.run_sft(policy, cfg or phases(), FRAMES, out, videos_file=videos, qa_file=qa,
                       embed_cache=EmbeddingCache(out.parent / "cache"), **kwargs)


@pytest.fixture(scope="module")
def whole_run(run_files, tiny_policy_dir, cache_dir, tmp_path_factory) -> Path:
    return sft_once(run_files, tiny_policy_dir, cache_dir, tmp_path_factory.mktemp("whole") / "sft")


def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_file(checkpoint / "model.safetensors")


def changed_parts(cache_dir, before: Path, after: Path) -> set[str]:
    """The parts (vision, projector, llm) whose weights differ between two checkpoints, as loaded."""
    old, new = (load_policy(str(c), cache_dir, "cpu", "float32") for c in (before, after))
    a, b = dict(old.model.named_parameters()), dict(new.model.named_parameters())
    assert a.keys() == b.keys(), "a plain checkpoint: LoRA merged back"
    return {old.parts.part_of(k) for k in a if not torch.equal(a[k], b[k])}


def metrics(phase_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (phase_dir / "metrics.jsonl").read_text().splitlines()]


def test_each_source_gives_its_share_drawn_without_replacement_until_used_up():
    assert mixture_quotas([0.3, 0.7], 50) == [15, 35] and mixture_quotas([1, 1, 1], 10) == [4, 3, 3]
    video_ids = [f"v{i // 3}" for i in range(100)]  # three items a video
    sampler = MixtureSampler([10, 90], [0.3, 0.7], 50, video_ids, seed=1)
    epochs = []
    for epoch in range(4):
        sampler.set_epoch(epoch)
        epochs.append(list(sampler))
    assert all(len(e) == 50 and Counter(i < 10 for i in e) == {True: 15, False: 35} for e in epochs)
    small = [i for e in epochs for i in e if i < 10]
    assert Counter(small) == {i: 6 for i in range(10)}, "60 draws of 10 captions: each 6 times"
    draws = [sampler.epoch_items(e) for e in range(4)]
    first_pass = [i for d in draws for i in d if i < 10][:10]
    assert sorted(first_pass) == list(range(10)), "no caption repeats before every one was drawn"
    large = [i for d in draws[:2] for i in d if i >= 10]
    assert len(large) == len(set(large)) == 70, "no QA row repeats within its first pass"
    for order in epochs:  # a video's items come together
        runs = [video_ids[i] for j, i in enumerate(order) if j == 0 or video_ids[order[j - 1]] != video_ids[i]]
        assert len(runs) == len(set(runs))
    again = MixtureSampler([10, 90], [0.3, 0.7], 50, video_ids, seed=1)
    again.set_epoch(2)
    assert list(again) == epochs[2] and epochs[2] != epochs[1], "the draw depends on seed and epoch only"


def test_held_out_videos_and_questions_are_never_examples(run_files, tmp_path):
    videos, qa = run_files
    records = sft_phases.RunRecords.read(videos, qa)
    test_video = next(v for v in records.videos.values() if v.split == "test")
    train_video = next(v for v in records.videos.values() if v.split == "train")
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"id": f"r{i}", "video": v.video, "conversations": [
        {"from": "human", "value": "<video>\nWhat is shown?"}, {"from": "gpt", "value": v.caption}]}) + "\n"
        for i, v in enumerate([train_video, test_video])))
    errors = ItemErrors("sft", fail_fast=True)
    captions = sft.source_examples(SFTSource(kind="captions"), records, 0, errors)
    questions = sft.source_examples(SFTSource(kind="qa"), records, 0, errors)
    conversations = sft.source_examples(SFTSource(kind="conversations", path=str(rows)), records, 0, errors)
    assert {e.video.id for e in captions} == {v.id for v in records.videos.values() if v.split == "train"}
    assert {e.prompt for e in captions} <= set(sft_phases.DESCRIBE_PROMPTS)
    assert len(questions) == sum(q.split == "train" for q in records.questions) > 0
    assert test_video.id not in {e.video.id for e in questions}
    assert [e.video.video for e in conversations] == [train_video.video], "the held-out video's row is left out"
    counts = sft.source_examples(SFTSource(kind="qa", question_kinds=["count"]), records, 0, errors)
    count_questions = {(q.video_id, q.question) for q in records.questions if q.source == "scene:count" and q.split == "train"}
    assert counts and {(e.video.id, e.prompt) for e in counts} == count_questions


def test_the_loss_is_on_answer_tokens_only_with_a_video_s_examples_in_one_row(run_files, tiny_policy_dir, cache_dir):
    videos, qa = run_files
    policy = load_policy(str(tiny_policy_dir), cache_dir, "cpu", "float32")
    records = sft_phases.RunRecords.read(videos, qa)
    a, b = [v for v in records.videos.values() if v.split == "train"][:2]
    examples = [Example(a, "How many shapes are there?", "Two.", "x"), Example(b, "Describe it.", "A red circle.", "y"),
                Example(a, "What colour is it?", "Blue and green.", "z")]
    prepare = sft_phases.video_holder(policy, FRAMES, None, {"projector"}, set())
    phase = SFTPhase(name="p", sources=[SFTSource(kind="captions")], lr={"projector": 1e-3})
    prepared, [pool] = sft_phases.prepare_examples(policy, phase, [examples], prepare, 16, ItemErrors("sft", True))
    with torch.no_grad():
        logps, counts = sft_phases.AnswerScorer(policy)([prepared[t.example.video.id] for t in pool], pool)
        encoded = {k: policy.embeddings(v) for k, v in prepared.items()}
        alone = [policy.sequence_logps([encoded[t.example.video.id]], [t.prompt], [t.response]) for t in pool]
    assert counts.tolist() == [len(policy.response_ids(e.response, 16)) for e in examples], "only answer tokens are scored"
    torch.testing.assert_close(logps, torch.cat([lp for lp, _ in alone]), atol=1e-4, rtol=0)
    assert all(t.prompt.count(policy.video_token_id) == encoded[t.example.video.id].layout.n_visual for t in pool)


def test_a_phase_after_the_projector_trained_encodes_with_the_new_projector(run_files, tiny_policy_dir, cache_dir, tmp_path):
    """The embedding cache hashes a model's weights once per model object: a phase that freezes the
    encoder after one that trained the projector must not read the old projector's embeddings."""
    from capdpo.policy.video import plan_video

    policy = load_policy(str(tiny_policy_dir), cache_dir, "cpu", "float32")
    video = next(v for v in run_files[0].read() if v.split == "train")
    cache = EmbeddingCache(tmp_path / "cache")
    before = sft_phases.video_holder(policy, FRAMES, cache, {"llm"}, set())(video, ["What is shown?"], 8)
    with torch.no_grad():  # what a projector phase does to the model in memory
        for name, p in policy.model.named_parameters():
            if policy.parts.part_of(name) == "projector":
                p.add_(0.05)
    after = sft_phases.video_holder(policy, FRAMES, cache, {"llm"}, {"projector"})(video, ["What is shown?"], 8)
    with torch.no_grad():
        expected = policy.encode(policy.preprocess(*plan_video(policy, video, FRAMES)))
    assert not torch.equal(before.embeds, after.embeds)
    torch.testing.assert_close(after.embeds, expected.embeds, atol=1e-5, rtol=0)


def test_each_phase_trains_its_own_parts_at_its_own_rates(whole_run, tiny_policy_dir, cache_dir):
    out = whole_run
    aligned = out.parent / "align" / "policy"
    assert changed_parts(cache_dir, tiny_policy_dir, aligned) == {"projector"}, "phase 1: the projector alone, the LLM frozen"
    assert changed_parts(cache_dir, aligned, out) == {"projector", "llm"}, "phase 2: projector and LoRA (merged), tower frozen"
    align, instruct = metrics(out.parent / "align"), metrics(out.parent / "instruct")
    assert [m["step"] for m in align] == [1, 2] and [m["step"] for m in instruct] == [1, 2, 3, 4]
    assert {m["phase"] for m in align} == {"align"} and {m["phase"] for m in instruct} == {"instruct"}
    assert all(m["loss"] > 0 and m["answer_tokens"] > 0 for m in align + instruct)
    # each optimizer group's rate after step 1 of a linear decay over the phase's steps (no warm-up step at 3%)
    assert "lr/llm" not in align[0] and align[0]["lr/projector"] == pytest.approx(1e-2 * (1 - 1 / 2))
    assert instruct[0]["lr/projector"] == pytest.approx(1e-3 * (1 - 1 / 4))
    assert instruct[0]["lr/llm"] == pytest.approx(1e-2 * (1 - 1 / 4))
    assert not (out.parent / "instruct" / "policy").exists() and not (out.parent / "align" / "checkpoints").exists()

    cfg = phases()
    policy = load_policy(str(tiny_policy_dir), cache_dir, "cpu", "float32")
    set_trainable(policy, sft_phases.phase_settings(cfg, cfg.phases[1]), cfg.phases[1].lora_modules)
    groups = parameter_groups(policy, cfg.phases[1].lr)
    assert [(g["name"], g["lr"]) for g in groups] == [("projector", 1e-3), ("llm", 1e-2)]
    assert len(groups[1]["params"]) == 2 * 2 * 7, "LoRA A and B on the 7 linear layers of both decoder layers, nothing else"


@pytest.mark.parametrize("dies_at", [3, 4], ids=["between-phases", "inside-phase-2"])
def test_a_killed_run_resumes_to_the_weights_of_an_uninterrupted_one(dies_at, whole_run, run_files, tiny_policy_dir, cache_dir,
                                                                     tmp_path, monkeypatch):
    """Phase 1 takes 2 steps: the 3rd is phase 2's first (nothing of phase 2 saved), the 4th its second."""
    step, calls = sft_phases.sft_step, []

    def killed(*args, **kwargs):
        calls.append(1)
        if len(calls) == dies_at:
            raise KeyboardInterrupt("killed")
        return step(*args, **kwargs)

    monkeypatch.setattr(sft_phases, "sft_step", killed)
    with pytest.raises(KeyboardInterrupt):
        sft_once(run_files, tiny_policy_dir, cache_dir, tmp_path / "sft")
    assert (tmp_path / "sft" / "align" / "policy" / DONE).exists()
    checkpoint = latest_checkpoint(tmp_path / "sft" / "instruct" / "checkpoints")
    assert (checkpoint and checkpoint.name) == {3: None, 4: "step-1"}[dies_at]
    monkeypatch.setattr(sft_phases, "sft_step", step)
    resumed = sft_once(run_files, tiny_policy_dir, cache_dir, tmp_path / "sft")

    a, b = weights(whole_run), weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run's"
    losses = [[m["loss"] for m in metrics(run / "instruct")] for run in (whole_run.parent, tmp_path / "sft")]
    assert losses[0] == losses[1]


def test_capdpo_sft_trains_the_run_s_policy_and_the_later_stages_start_from_it(tmp_path, tiny_policy_dir, cache_dir):
    from run_configs import write_config
    from typer.testing import CliRunner

    from capdpo.cli import app
    from capdpo.config import load_config
    from capdpo.pipeline import Run
    from capdpo.policy.video import VideoEncoder

    sources = [{"kind": "captions", "ratio": 1.0}, {"kind": "qa", "ratio": 1.0}]
    config = write_config(tmp_path / "run.yaml", tmp_path / "run", tiny_policy_dir, cache_dir,
                          sft={"phases": [{"name": "instruct", "sources": sources, "lr": {"projector": 1e-3, "llm": 1e-3},
                                           "lora_r": 4, "lora_alpha": 8, "max_steps": 2}], "save_every": 0})
    runner = CliRunner()
    for command in (["data", "--config", str(config)], ["qa", "--run-dir", str(tmp_path / "run")],
                    ["sft", "--run-dir", str(tmp_path / "run")]):
        result = runner.invoke(app, command, catch_exceptions=False)
        assert result.exit_code == 0, (command, result.output)
    tuned = tmp_path / "run" / "sft" / "policy"
    assert f"sft: {tuned}" in result.output and (tuned / DONE).exists()

    run = Run(load_config(tmp_path / "run" / "config.yaml"), save=False)
    assert run.cfg.sft.enabled and run.policy_settings().model == str(tuned), "`capdpo sft` leaves the run on its policy"
    policy = run.policy  # loaded through capdpo.models.load, as policy.model
    assert type(policy).__name__ == "LlavaNextVideoPolicy" and policy.path == tuned
    with torch.inference_mode():
        encoded = VideoEncoder(policy, FRAMES).encode(run.paths.videos.all()[0])
        [answer] = policy.generate(encoded, "What is shown?", max_new_tokens=4)
    assert isinstance(answer, str)
    off = run.cfg.model_copy(update={"sft": run.cfg.sft.model_copy(update={"enabled": False})})
    assert Run(off, save=False).policy_settings().model == str(tiny_policy_dir), "sft off: policy.model as configured"


def test_bad_rows_are_named_by_file_and_line_and_the_others_go_on(run_files, tiny_policy_dir, cache_dir, tmp_path, caplog):
    videos, _ = run_files
    video = next(v for v in videos.read() if v.split == "train")
    turn = [{"from": "human", "value": "<video>\nDescribe the video."}, {"from": "gpt", "value": video.caption}]
    rows = tmp_path / "rows.jsonl"
    rows.write_text("\n".join([json.dumps({"id": "good", "video": video.video, "conversations": turn}),
                               json.dumps({"id": "no-answer", "video": video.video, "conversations": turn[:1]}),
                               "{not json",
                               json.dumps({"id": "gone", "video": "missing.mp4", "conversations": turn})]) + "\n")
    cfg = SFTConfig(phases=[SFTPhase(name="captions", sources=[SFTSource(kind="conversations", path=str(rows))],
                                     lr={"projector": 1e-3}, max_steps=1)], save_every=0)
    with caplog.at_level(logging.ERROR):
        out = sft_once(run_files, tiny_policy_dir, cache_dir, tmp_path / "sft", cfg)
    assert (out / DONE).exists(), "the good row trained"
    skipped = [r.getMessage() for r in caplog.records if "sft: skipped" in r.getMessage()]
    assert len(skipped) == 3
    assert f"{rows}:2: conversations" in skipped[0] and f"{rows}:3: not valid JSON" in skipped[1]
    assert skipped[2].startswith(f"sft: skipped {rows}:4:") and "missing.mp4" in skipped[2]
    with pytest.raises(RecordError, match=f"{rows}:2"):
        sft_once(run_files, tiny_policy_dir, cache_dir, tmp_path / "fail-fast", cfg, fail_fast=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_takes_sft_steps_training_projector_and_lora_then_merging(family, run_files, smollm2, cache_dir,
                                                                               tmp_path):
    """The phases on a tiny random checkpoint of each family: the projector and the LLM change (LoRA
    merged back: a plain checkpoint), the vision tower does not, and each step is logged."""
    from test_families import build

    model_dir = build(family, tmp_path / family, smollm2)
    cfg = SFTConfig(phases=[SFTPhase(name="instruct", sources=[SFTSource(kind="qa")], lr={"projector": 1e-3, "llm": 1e-2},
                                     lora_r=4, lora_alpha=8, batch_size=4, max_steps=2)], save_every=0, max_response_tokens=16)
    out = sft_once(run_files, model_dir, cache_dir, tmp_path / "sft", cfg)
    assert changed_parts(cache_dir, model_dir, out) == {"projector", "llm"}
    assert [m["step"] for m in metrics(tmp_path / "sft" / "instruct")] == [1, 2]


def test_the_example_recipe_is_a_valid_config():
    from capdpo.config import load_config

    cfg = load_config(Path(__file__).parents[1] / "configs" / "sft-mini.yaml").sft
    align, instruct = cfg.phases
    assert (align.name, align.lr, [s.kind for s in align.sources]) == ("align", {"projector": 1e-3}, ["captions", "qa"])
    assert (instruct.lr, instruct.lora_r, instruct.lora_modules) == ({"projector": 2e-4, "llm": 5e-4}, 16, None)


@pytest.mark.parametrize(("phases", "says"), [
    ('[{name: a, sources: [{kind: conversations}], lr: {projector: 0.001}}]', "sources.path: a conversations source needs"),
    ('[{name: a, sources: [{kind: qa, question_kinds: [size]}], lr: {llm: 0.001}}]', "unknown question kind ['size']"),
    ('[{name: a, sources: [{kind: qa}], lr: {decoder: 0.001}}]', "lr.decoder"),
    ('[{name: a, sources: [{kind: qa}], lr: {llm: 0.1}}, {name: a, sources: [{kind: qa}], lr: {llm: 0.1}}]', "given twice"),
])
def test_a_bad_sft_section_fails_at_load_naming_the_field(phases, says):
    from capdpo.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="sft.phases") as e:
        load_config(None, [f"sft.phases={phases}"])
    assert says in str(e.value)
