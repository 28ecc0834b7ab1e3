"""Reference log-probs of preference pairs: identities, the forward, the resumable pass, reading back.

DPO compares the policy's log-probs of each pair's answers with those of the reference, the policy
before training. This module is what the ``reference`` stage (sharded, over a run's pairs) and the
``train`` stage (over the pairs and encodings it has prepared) both build on:

    fingerprint = reference_fingerprint(policy, cfg, frames)          # take it before training
    todo = pairs_to_score(out, fingerprint, pairs, cfg.max_response_tokens, recompute=False)
    append_reference(out, policy, cfg, fingerprint, [(tokenized, encoded), ...], batch_size, bar)
    reference = load_reference(out, pairs, fingerprint, cfg.max_response_tokens)  # {pair id: ReferenceLogps}

The numbers are the trainer's: the same ``TokenizedPair`` and the same forward (``pair_logps``),
under the trainer's precision.

Every row carries two hashes. ``fingerprint`` names what computed it: every weight of the model,
the tokenizer, the frame settings, the token budget and the precision. ``pair_hash`` names what
it was computed for: the pair's video id, prompt, answers and ``max_response_tokens``. A resumed
pass skips the rows whose hashes both match and redoes pairs changed since; rows of another
fingerprint stop it with an error naming the file, unless ``recompute`` replaces them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence

import torch
from tqdm import tqdm

from capdpo.config import FramesConfig, TrainConfig
from capdpo.hashing import sha256_json
from capdpo.policy.base import EncodedVideo, VideoPolicy
from capdpo.policy.embed_cache import encoder_fingerprint, weights_hash
from capdpo.policy.logps import TokenizedPair, pair_logps
from capdpo.records import PreferencePair, RecordFile, ReferenceLogps

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


# -- the pass ----------------------------------------------------------------------------------------
def reference_rows(policy: VideoPolicy, cfg: TrainConfig, fingerprint: str,
                   batch: Sequence[tuple[TokenizedPair, EncodedVideo]]) -> list[ReferenceLogps]:
    """One forward over a batch of pairs, without gradients and in the trainer's precision, as records."""
    autocast = torch.autocast(policy.device.type, dtype=AUTOCAST_DTYPES.get(cfg.mixed_precision),
                              enabled=cfg.mixed_precision in AUTOCAST_DTYPES)
    with torch.inference_mode(), autocast:
        result = pair_logps(policy, [encoded for _, encoded in batch], [t for t, _ in batch], cfg.shared_prefix)
    return [ReferenceLogps(id=t.pair.id, fingerprint=fingerprint, pair_hash=pair_hash(t.pair, cfg.max_response_tokens),
                           chosen_logp=result.chosen[i].item(), rejected_logp=result.rejected[i].item(),
                           chosen_tokens=int(result.chosen_tokens[i]), rejected_tokens=int(result.rejected_tokens[i]))
            for i, (t, _) in enumerate(batch)]


def append_reference(out: RecordFile[ReferenceLogps], policy: VideoPolicy, cfg: TrainConfig, fingerprint: str,
                     items: Iterable[tuple[TokenizedPair, EncodedVideo]], batch_size: int, bar: tqdm) -> None:
    """Append to ``out`` the rows of ``items`` (pairs with their videos, a video's pairs together),
    ``batch_size`` pairs per forward, advancing ``bar`` by the pairs done."""
    batch: list[tuple[TokenizedPair, EncodedVideo]] = []
    for item in items:
        batch.append(item)
        if len(batch) == batch_size:
            out.append(reference_rows(policy, cfg, fingerprint, batch))
            bar.update(len(batch))
            batch = []
    if batch:
        out.append(reference_rows(policy, cfg, fingerprint, batch))
        bar.update(len(batch))


def pairs_to_score(out: RecordFile[ReferenceLogps], fingerprint: str, pairs: Sequence[PreferencePair],
                   max_response_tokens: int, recompute: bool) -> list[PreferencePair]:
    """The pairs ``out`` holds no valid row for. Rows of changed pairs (and with ``recompute``, of
    another fingerprint) are dropped from the file; rows of another fingerprint otherwise raise."""
    hashes = {p.id: pair_hash(p, max_response_tokens) for p in pairs}
    with out.lock():  # a concurrent worker's rows appended between this read and the rewrite would be lost
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
    done = {r.id for r in kept}
    return [p for p in pairs if p.id not in done]


# -- reading back --------------------------------------------------------------------------------------
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
