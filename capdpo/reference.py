"""Reference log-probs, computed once before DPO and kept on disk.

DPO compares the policy's log-probs of each pair's answers with those of the reference model, the
policy as it was before training. The reference never changes, so its numbers take one pass over
the pairs before the first step, and training holds no reference model: no frozen copy of the LLM
(full fine-tuning) and no second forward per step (LoRA with adapters off).

    fingerprint = reference_fingerprint(policy, cfg, frames)      # the policy before training
    precompute_reference(pairs, videos, policy, cfg, frames, RecordFile(path, ReferenceLogps), embed_cache=cache)
    reference = load_reference(path, pairs, fingerprint, cfg.max_response_tokens)  # {pair id: ReferenceLogps}

The numbers are the trainer's: the same prompt and answer tokens (answers cut to
``train.max_response_tokens``), the same video embeddings (planned with all of the video's
prompts, through the EmbeddingCache), the same forward (``reference_logps``) and precision.

Every row carries two hashes. ``fingerprint`` names what computed it: every weight of the model,
the tokenizer, the frame settings, the token budget and the precision. ``pair_hash`` names what
it was computed for: the pair's video id, prompt, answers and ``max_response_tokens``. A resumed
pass skips the rows whose hashes both match and redoes pairs changed since; rows of another
fingerprint stop it with an error naming the file, unless ``recompute`` replaces them.

Sharding mirrors ``sample``: shard ``(i, n)`` takes the pairs whose id hashes to ``i``
(``sample.shard_of``) into ``reference.shard-i-of-n.jsonl``; ``merge_reference_shards`` joins them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence

import torch
from tqdm import tqdm

from capdpo.config import FramesConfig, TrainConfig
from capdpo.errors import ITEM_ERRORS, ItemErrors
from capdpo.hashing import sha256_json
from capdpo.policy.base import EncodedVideo, PairLogprobs, VideoPolicy
from capdpo.policy.embed_cache import EmbeddingCache, encoder_fingerprint, weights_hash
from capdpo.policy.video import encode_video
from capdpo.records import PreferencePair, RecordFile, ReferenceLogps, Video
from capdpo.shards import read_shards, shard_file, shard_of

log = logging.getLogger("capdpo")

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}  # train.mixed_precision -> autocast dtype
LISTED_IDS = 10  # pair ids an error message names before "and N more"


class ReferenceMismatch(ValueError):
    """Cached reference log-probs that do not cover the pairs; the message names file and pairs."""


# -- identities ------------------------------------------------------------------------------------
def reference_fingerprint(policy: VideoPolicy, cfg: TrainConfig, frames: FramesConfig) -> str:
    """What decides a pair's reference log-probs besides the pair: every weight of the model
    (memoised per model object: take it before training moves them), the tokenizer, the
    preprocessing and frame settings, the token budget and the precision."""
    tokenizer = policy.tokenizer
    return sha256_json({
        "encoder": encoder_fingerprint(policy),
        "weights": weights_hash(policy),
        "tokenizer": {"class": type(tokenizer).__name__, "vocab": sha256_json(sorted(tokenizer.get_vocab().items())),
                      "chat_template": tokenizer.chat_template, "eos": tokenizer.eos_token_id, "pad": tokenizer.pad_token_id},
        "frames": frames.model_dump(include={"num_frames", "image_size", "fps", "on_over_budget"}),
        "max_tokens": policy.max_tokens,
        "mixed_precision": cfg.mixed_precision,
    })


def pair_hash(pair: PreferencePair, max_response_tokens: int) -> str:
    return sha256_json([pair.video_id, pair.prompt, pair.chosen, pair.rejected, max_response_tokens])


# -- the forward ---------------------------------------------------------------------------------------
def reference_logps(policy: VideoPolicy, videos: Sequence[EncodedVideo], prompts: list[list[int]],
                    chosen: list[list[int]], rejected: list[list[int]], shared_prefix: bool) -> PairLogprobs:
    """The reference forward of a batch of pairs, as the trainer scores them: one packed row per
    pair behind a shared prompt (``train.shared_prefix``), else chosen and rejected as two rows."""
    if shared_prefix:
        return policy.pair_logps(videos, prompts, chosen, rejected)
    logps, counts = policy.sequence_logps([*videos, *videos], prompts + prompts, chosen + rejected)
    n = len(prompts)
    return PairLogprobs(logps[:n], logps[n:], counts[:n], counts[n:])


# -- the pass ------------------------------------------------------------------------------------------
def precompute_reference(pairs: Sequence[PreferencePair], videos: Mapping[str, Video], policy: VideoPolicy,
                         cfg: TrainConfig, frames: FramesConfig, out: RecordFile[ReferenceLogps], *,
                         embed_cache: EmbeddingCache | None = None, shard: tuple[int, int] | None = None,
                         batch_size: int | None = None, fail_fast: bool = False, recompute: bool = False) -> ItemErrors:
    """Append to ``out`` the reference log-probs of every pair (of ``shard``, when given) that it
    lacks, ``batch_size`` pairs per forward (default ``cfg.batch_size``). ``policy`` is the
    reference: the policy before training. Videos come from ``embed_cache`` when given. A bad
    video is recorded (or raised with ``fail_fast``) and its pairs skipped."""
    fingerprint = reference_fingerprint(policy, cfg, frames)
    hashes = {p.id: pair_hash(p, cfg.max_response_tokens) for p in pairs
              if shard is None or shard_of(p.id, shard[1]) == shard[0]}
    done = _valid_rows(out, fingerprint, hashes, recompute)
    todo = [p for p in pairs if p.id in hashes and p.id not in done]
    errors = ItemErrors("reference", fail_fast)
    if not todo:
        return errors
    # a video is planned for all its prompts, as the trainer plans it, whichever of them are left
    prompts: dict[str, list[str]] = {}
    for p in pairs:
        prompts.setdefault(p.video_id, []).append(p.prompt)
    by_video: dict[str, list[PreferencePair]] = {}
    for p in todo:
        by_video.setdefault(p.video_id, []).append(p)
    batch_size = batch_size or cfg.batch_size

    with tqdm(total=len(todo), desc="reference", unit="pair") as bar:
        batch: list[tuple[PreferencePair, EncodedVideo]] = []

        def flush() -> None:
            if batch:
                out.append(_score(policy, cfg, fingerprint, hashes, batch))
                bar.update(len(batch))
                batch.clear()

        for video_id, video_todo in by_video.items():
            try:
                if video_id not in videos:
                    raise FileNotFoundError(f"{video_id}: pairs name a video that is not in the run's videos")
                video = videos[video_id]
                encoded = (embed_cache.get_or_encode(policy, video, frames, prompts[video_id], cfg.max_response_tokens)
                           if embed_cache is not None else
                           encode_video(policy, video, frames, prompts[video_id], cfg.max_response_tokens))
            except ITEM_ERRORS as e:
                errors.record(video_id, e)
                bar.update(len(video_todo))
                continue
            for p in video_todo:
                batch.append((p, encoded))
                if len(batch) == batch_size:
                    flush()
        flush()
    return errors


def _score(policy: VideoPolicy, cfg: TrainConfig, fingerprint: str, hashes: Mapping[str, str],
           batch: list[tuple[PreferencePair, EncodedVideo]]) -> list[ReferenceLogps]:
    """One forward over a batch of pairs, as records."""
    videos = [encoded for _, encoded in batch]
    prompts = [policy.prompt_ids(p.prompt, encoded.layout) for p, encoded in batch]
    chosen = [policy.response_ids(p.chosen, cfg.max_response_tokens) for p, _ in batch]
    rejected = [policy.response_ids(p.rejected, cfg.max_response_tokens) for p, _ in batch]
    autocast = torch.autocast(policy.device.type, dtype=AUTOCAST_DTYPES.get(cfg.mixed_precision),
                              enabled=cfg.mixed_precision in AUTOCAST_DTYPES)
    with torch.inference_mode(), autocast:
        result = reference_logps(policy, videos, prompts, chosen, rejected, cfg.shared_prefix)
    return [ReferenceLogps(id=p.id, fingerprint=fingerprint, pair_hash=hashes[p.id],
                           chosen_logp=result.chosen[i].item(), rejected_logp=result.rejected[i].item(),
                           chosen_tokens=int(result.chosen_tokens[i]), rejected_tokens=int(result.rejected_tokens[i]))
            for i, (p, _) in enumerate(batch)]


def _valid_rows(out: RecordFile[ReferenceLogps], fingerprint: str, hashes: Mapping[str, str], recompute: bool) -> set[str]:
    """Ids of ``out`` that need no work. Rows of changed pairs (and with ``recompute``, of another
    fingerprint) are dropped from the file; rows of another fingerprint otherwise raise."""
    rows = out.all()
    foreign = [r for r in rows if r.fingerprint != fingerprint]
    if foreign and not recompute:
        raise ReferenceMismatch(
            f"{out.path}: {len(foreign)} row(s) were computed by another reference model or settings (fingerprint "
            f"{foreign[0].fingerprint[:12]}, now {fingerprint[:12]}); delete the file or recompute them "
            "(`capdpo reference --recompute`)")
    kept = [r for r in rows if r.fingerprint == fingerprint and hashes.get(r.id, r.pair_hash) == r.pair_hash]
    if len(kept) < len(rows):
        log.info("reference: %s: recomputing %d row(s) of changed pairs or another model", out.path, len(rows) - len(kept))
        out.write(kept)
    return {r.id for r in kept}


# -- shards and reading back -----------------------------------------------------------------------------
def merge_reference_shards(out: RecordFile[ReferenceLogps], shards: int, pairs: Sequence[PreferencePair]) -> dict[str, int]:
    """Join the ``shards`` shard files of ``out`` into ``out`` (replacing it), in pair order.

    Verifies that every shard file exists, that each row sits in its pair's shard, that all rows
    share one fingerprint and that an id seen twice (two processes on one shard) was computed for
    the same pair; such duplicates are dropped. Pairs without a row (skipped videos, an unfinished
    shard) are logged by id and counted as ``missing``."""
    parts = [shard_file(out, (i, shards)) for i in range(shards)]
    absent = [str(p.path) for p in parts if not p.exists()]
    if absent:
        raise FileNotFoundError(f"missing shard file(s): {', '.join(absent)}")
    merged, duplicates = read_shards(list(enumerate(parts)), shards, lambda r: r.id,
                                     lambda a, b: (a.fingerprint, a.pair_hash) == (b.fingerprint, b.pair_hash))
    fingerprints = sorted({r.fingerprint[:12] for r in merged.values()})
    if len(fingerprints) > 1:
        raise ValueError(f"{out.path}: shards computed by different reference models or settings ({', '.join(fingerprints)})")
    missing = [p.id for p in pairs if p.id not in merged]
    if missing:
        log.warning("reference merge: no reference log-probs for %d pair(s): %s", len(missing), list_ids(missing))
    order = {p.id: i for i, p in enumerate(pairs)}
    out.write(sorted(merged.values(), key=lambda r: (order.get(r.id, len(order)), r.id)))
    return {"shards": shards, "pairs": len(merged), "missing": len(missing), "duplicates_dropped": duplicates}


def load_reference(source: RecordFile[ReferenceLogps] | str | os.PathLike, pairs: Sequence[PreferencePair],
                   fingerprint: str, max_response_tokens: int) -> dict[str, ReferenceLogps]:
    """``{pair id: ReferenceLogps}`` for every pair, each computed by ``fingerprint`` for the pair as
    it is now; else ReferenceMismatch naming the file and the missing or stale pairs."""
    file = source if isinstance(source, RecordFile) else RecordFile(source, ReferenceLogps)
    rows = file.by_id()
    missing, foreign, changed = [], [], []
    for p in pairs:
        row = rows.get(p.id)
        if row is None:
            missing.append(p.id)
        elif row.fingerprint != fingerprint:
            foreign.append(p.id)
        elif row.pair_hash != pair_hash(p, max_response_tokens):
            changed.append(p.id)
    problems = [f"{what} for {len(ids)} pair(s): {list_ids(ids)}" for what, ids in
                (("missing", missing), ("computed by another reference model or settings", foreign),
                 ("computed before the pair (or max_response_tokens) changed", changed)) if ids]
    if problems:
        raise ReferenceMismatch(f"{file.path}: reference log-probs {'; '.join(problems)}. Run `capdpo reference` "
                                "(--recompute replaces another model's rows)")
    return {p.id: rows[p.id] for p in pairs}


def list_ids(ids: Sequence[str]) -> str:
    shown = ", ".join(ids[:LISTED_IDS])
    return shown if len(ids) <= LISTED_IDS else f"{shown} and {len(ids) - LISTED_IDS} more"
