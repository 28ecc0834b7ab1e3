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
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence

from tqdm import tqdm

from capdpo.config import FramesConfig, TrainConfig
from capdpo.errors import ITEM_ERRORS, ItemErrors
from capdpo.policy.base import EncodedVideo, VideoPolicy
from capdpo.policy.embed_cache import EmbeddingCache
from capdpo.policy.logps import TokenizedPair, by_video, tokenize_pair
from capdpo.policy.reference_logps import append_reference, list_ids, pairs_to_score, reference_fingerprint
from capdpo.policy.video import VideoEncoder
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
                group = mine
                try:
                    if video_id not in videos:
                        raise FileNotFoundError(f"{video_id}: pairs name a video that is not in the run's videos")
                    encoded = encoder.encode(videos[video_id], prompts[video_id], cfg.max_response_tokens)
                except ITEM_ERRORS as e:
                    errors.record(video_id, e)
                    bar.update(len(group))
                    continue
                for p in group:
                    yield tokenize_pair(policy, p, encoded.layout, cfg.max_response_tokens), encoded

        append_reference(out, policy, cfg, fingerprint, encoded_pairs(), batch_size or cfg.batch_size, bar)
    return errors


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
