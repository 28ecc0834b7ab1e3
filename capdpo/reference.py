"""The ``reference`` stage: reference log-probs of a run's pairs, computed once before DPO and kept on disk.

DPO compares the policy's log-probs of each pair's answers with those of the reference model, the
policy as it was before training. The reference never changes, so its numbers take one pass over
the pairs before the first step, and training holds no reference model: no frozen copy of the LLM
(full fine-tuning) and no second forward per step (LoRA with adapters off).

    precompute_reference(pairs, videos, policy, cfg, frames, RecordFile(path, ReferenceLogps), embed_cache=cache)

The identities, the forward and the resumable pass are ``capdpo.policy.reference_logps``, shared
with ``train`` (which runs the same pass on the videos and tokens it has prepared). A video is
planned with all of its pairs' prompts, as the trainer plans it, through the one video path
(``VideoEncoder``, with the EmbeddingCache when given).

Several processes may fill one reference file at once: each claims a video's pairs before
scoring them (``RecordFile.claims``), so no pair is computed twice.

Sharding mirrors ``sample``: shard ``(i, n)`` takes the pairs whose id hashes to ``i``
(``shards.shard_of``) into ``reference.shard-i-of-n.jsonl``; ``merge_reference_shards`` joins them.
With ``engine: ray`` (:func:`reference_on_ray`) Ray actors run the local loop's forwards, one per row.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping, Sequence

from tqdm import tqdm

from capdpo.config import FramesConfig, PolicyConfig, RayConfig, TrainConfig
from capdpo.errors import ITEM_ERRORS, ItemErrors
from capdpo.models.load import policy_from_config
from capdpo.policy.base import EncodedVideo, VideoPolicy
from capdpo.policy.embed_cache import EmbeddingCache
from capdpo.policy.logps import TokenizedPair, by_video, tokenize_pair
from capdpo.policy.reference_logps import append_reference, list_ids, pairs_to_score, reference_fingerprint, reference_rows
from capdpo.policy.video import VideoEncoder
from capdpo.ray_engine import ActorErrors, Job, Output, Row, batches, run_job, run_task
from capdpo.records import PreferencePair, RecordFile, ReferenceLogps, Video
from capdpo.shards import read_shards, shard_file, shard_of

log = logging.getLogger("capdpo")


def precompute_reference(pairs: Sequence[PreferencePair], videos: Mapping[str, Video], policy: VideoPolicy,
                         cfg: TrainConfig, frames: FramesConfig, out: RecordFile[ReferenceLogps], *,
                         embed_cache: EmbeddingCache | None = None, shard: tuple[int, int] | None = None,
                         batch_size: int | None = None, fail_fast: bool = False, recompute: bool = False) -> ItemErrors:
    """Append to ``out`` the reference log-probs of every pair (of ``shard``, when given) that it
    lacks, ``batch_size`` pairs per forward (default ``cfg.batch_size``). ``policy`` is the
    reference: the policy before training. Videos come from ``embed_cache`` when given. A bad
    video is recorded (or raised with ``fail_fast``) and its pairs skipped."""
    fingerprint = reference_fingerprint(policy, cfg, frames)
    out.drop_duplicates()  # repeated rows left by older concurrent runs; a conflicting one raises
    mine = [p for p in pairs if shard is None or shard_of(p.id, shard[1]) == shard[0]]
    todo = pairs_to_score(out, fingerprint, mine, cfg.max_response_tokens, recompute)
    errors = ItemErrors("reference", fail_fast)
    if not todo:
        return errors
    # a video is planned for all its prompts, as the trainer plans it, whichever of them are left
    prompts = {video_id: [p.prompt for p in group] for video_id, group in by_video(pairs).items()}
    encoder = VideoEncoder(policy, frames, embed_cache)
    with out.claims() as claims, tqdm(total=len(todo), desc="reference", unit="pair") as bar:

        def encoded_pairs() -> Iterator[tuple[TokenizedPair, EncodedVideo]]:
            for video_id, group in by_video(todo).items():
                mine = claims.take(group)
                bar.update(len(group) - len(mine))  # done, or being done by another worker
                if not mine:
                    continue
                ready = encode_pairs(policy, encoder, cfg, video_id, videos.get(video_id), mine, prompts[video_id], errors)
                bar.update(len(mine) - len(ready))
                yield from ready

        append_reference(out, policy, cfg, fingerprint, encoded_pairs(), batch_size or cfg.batch_size, bar)
    return errors


def reference_on_ray(pairs: Sequence[PreferencePair], videos: Mapping[str, Video], policy: PolicyConfig, cache_dir: str,
                     cfg: TrainConfig, frames: FramesConfig, out: RecordFile[ReferenceLogps], settings: RayConfig, *,
                     embed_cache: EmbeddingCache | None = None, shard: tuple[int, int] | None = None,
                     batch_size: int | None = None, fail_fast: bool = False, recompute: bool = False) -> ItemErrors:
    """:func:`precompute_reference` as one Ray Data job (``engine: ray``). The fingerprint comes from
    one task that loads ``policy``; then a row is one forward batch, the pairs the local loop would
    put in it, with their videos, so both engines run the same forwards."""
    fingerprint = run_task(settings, _fingerprint, policy, cache_dir, cfg, frames, wants_gpu=True)
    out.drop_duplicates()
    mine = [p for p in pairs if shard is None or shard_of(p.id, shard[1]) == shard[0]]
    todo = pairs_to_score(out, fingerprint, mine, cfg.max_response_tokens, recompute)
    errors = ItemErrors("reference", fail_fast)
    prompts = {video_id: [p.prompt for p in group] for video_id, group in by_video(pairs).items()}
    with out.claims() as claims:
        ordered = [p for group in by_video(claims.take(todo)).values() for p in group]
        rows = []
        for batch in batches(ordered, batch_size or cfg.batch_size):
            shown = {p.video_id for p in batch}
            payload = {"pairs": [p.model_dump(mode="json") for p in batch], "prompts": {v: prompts[v] for v in shown},
                       "videos": {v: videos[v].model_dump(mode="json") if v in videos else None for v in shown}}
            rows.append(Row(batch[0].id, json.dumps(payload)))
        cache_root = str(embed_cache.root) if embed_cache is not None else None
        job = Job("reference", rows, ReferenceWorker, (policy, cache_dir, cfg, frames, fingerprint, cache_root), wants_gpu=True)
        run_job(job, settings, errors, out, claims)
    return errors


def encode_pairs(policy: VideoPolicy, encoder: VideoEncoder, cfg: TrainConfig, video_id: str, video: Video | None,
                 pairs: Sequence[PreferencePair], prompts: Sequence[str], errors: ItemErrors) -> list[tuple[TokenizedPair, EncodedVideo]]:
    """A video's ``pairs`` ready for the forward, whichever engine runs it: the video planned for all
    of its pairs' ``prompts``, as the trainer plans it, and encoded once. A video that cannot be read
    is recorded in ``errors`` and its pairs left out."""
    try:
        if video is None:
            raise FileNotFoundError(f"{video_id}: pairs name a video that is not in the run's videos")
        encoded = encoder.encode(video, prompts, cfg.max_response_tokens)
    except ITEM_ERRORS as e:
        errors.record(video_id, e)
        return []
    return [(tokenize_pair(policy, p, encoded.layout, cfg.max_response_tokens), encoded) for p in pairs]


def _fingerprint(policy: PolicyConfig, cache_dir: str, cfg: TrainConfig, frames: FramesConfig) -> str:
    return reference_fingerprint(policy_from_config(policy, cache_dir), cfg, frames)


class ReferenceWorker:
    """The ray engine's reference actor: the reference model loaded once (and checked against the
    driver's fingerprint), then one forward per row."""

    def __init__(self, policy: PolicyConfig, cache_dir: str, cfg: TrainConfig, frames: FramesConfig, fingerprint: str,
                 embed_root: str | None):
        self.policy, self.cfg, self.fingerprint = policy_from_config(policy, cache_dir), cfg, fingerprint
        if reference_fingerprint(self.policy, cfg, frames) != fingerprint:
            raise ValueError(f"reference: the model this node loads for {policy.model} is not the one the driver "
                             "fingerprinted; every node must see the same checkpoint")
        self.encoder = VideoEncoder(self.policy, frames, EmbeddingCache(embed_root) if embed_root else None)

    def __call__(self, rows: list[Row]) -> list[Output]:
        errors, outputs = ActorErrors("reference"), []
        for row in rows:
            payload = json.loads(row.payload)
            ready = []
            for video_id, group in by_video(PreferencePair.model_validate(p) for p in payload["pairs"]).items():
                video = payload["videos"][video_id]
                ready += encode_pairs(self.policy, self.encoder, self.cfg, video_id, video and Video.model_validate(video),
                                      group, payload["prompts"][video_id], errors)
            if ready:
                outputs += [Output(r.id, record=r.model_dump_json())
                            for r in reference_rows(self.policy, self.cfg, self.fingerprint, ready)]
        return outputs + errors.outputs


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
