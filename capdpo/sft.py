"""Stage 4 of method.md: caption pretraining and instruction tuning of the policy (``capdpo sft``).

The paper's policy is trained in three steps: caption pretraining, instruction tuning, then DPO on
the instruction-tuned model's answers. This stage is the first two, as phases run in order, each
from the weights the previous one left (``sft.phases``; the defaults are LLaVA's two stages):

    align     the projector learns on detailed captions, the LLM frozen (lr 1e-3)
    instruct  QA and captions; the projector at a small learning rate, LoRA (or the whole LLM) at its own

A phase, for any family behind ``VideoPolicy`` (``capdpo.models.sft.run_phases``):

  1. its examples, from its sources (``SFTSource``): the run's train videos' captions, each asked
     with one of the detailed-description prompts (a seeded choice per video); the run's train
     questions (``qa.jsonl``); the turns of a file of ``{id, video, conversations}`` rows
     (ShareGPTVideo caption rows, the paper's QA and SFT rows). Held-out videos (the run's test
     split) and their questions are never trained on, whichever source names them.
  2. each video once, as the phase needs it: the frozen tower's features when the projector
     trains (kept in the embedding cache), the embeddings (from the cache) when the whole encoder
     is frozen, pixels when the vision tower trains.
  3. each epoch a seeded mixture: every source gives its ratio's share of the epoch's examples
     (``examples_per_epoch``, default all the sources hold), drawn without replacement until the
     source is used up, then from a fresh permutation (``capdpo.training.MixtureSampler``); a
     video's examples kept together.
  4. per step: a batch's examples of one video share one packed row (the video and the prompts'
     common start run once, ``capdpo.policy.logps.answer_logps``), and the loss is the mean
     negative log-likelihood of the answer tokens only; the prompt and the video carry none.

Engines, checkpoints, resume, metrics and the saved policy are the ``train`` stage's
(``capdpo.training``): one CPU, DDP, DeepSpeed or FSDP; a run killed at any point (inside a phase or
between two) resumes to the weights of an uninterrupted run. A bad row is reported with its
``file:line`` (a missing video with the first row that names it) and the other rows go on. The run folder:

    sft/<phase>/checkpoints/step-N/   the running phase's resumable state, removed when it ends
    sft/<phase>/metrics.jsonl         one line per step: phase, step, loss, lr/<part>, grad_norm ...
    sft/<phase>/policy/               the phase's weights (LoRA merged): the next phase starts there
    sft/policy/                       the last phase's: the stage's result, a plain checkpoint
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from capdpo.config import FramesConfig, SFTConfig, SFTSource
from capdpo.errors import ItemErrors
from capdpo.formats import read_conversations
from capdpo.models.sft import Example, RunRecords, run_examples, run_phases
from capdpo.policy.base import VideoPolicy
from capdpo.policy.embed_cache import EmbeddingCache
from capdpo.records import QAItem, RecordFile, Video

log = logging.getLogger(__name__)


def run_sft(policy: VideoPolicy, cfg: SFTConfig, frames: FramesConfig, out_dir: Path, *,
            videos_file: RecordFile[Video] | None = None, qa_file: RecordFile[QAItem] | None = None,
            embed_cache: EmbeddingCache | None = None, fail_fast: bool = False) -> Path:
    """The ``sft`` stage: every phase of ``cfg`` in order on ``policy`` (trained in place); returns
    ``out_dir/policy``. A finished stage or phase is not redone; an interrupted phase resumes.

    ``videos_file`` and ``qa_file`` are the run's records (the captions and qa sources, and the
    held-out split); ``embed_cache`` keeps the frozen parts' outputs on disk (None: in memory)."""
    records = RunRecords.read(videos_file, qa_file)
    errors = ItemErrors("sft", fail_fast)
    return run_phases(policy, cfg, frames, out_dir, lambda source: source_examples(source, records, cfg.seed, errors),
                      embed_cache=embed_cache, errors=errors)


def source_examples(source: SFTSource, records: RunRecords, seed: int, errors: ItemErrors) -> list[Example]:
    """A source's examples, never one of a held-out video. A bad conversations row is recorded
    in ``errors`` naming its file and line, and the other rows go on."""
    if source.kind != "conversations":
        return run_examples(source, records, seed, errors)
    examples, held_out = [], 0
    for row in read_conversations(source.path, source.video_root, errors):
        if records.held_out(row.video):
            held_out += 1
            continue
        video = Video(id=row_video_id(row.video), video=row.video, caption="", source="conversations")
        examples += [Example(video, human, gpt, row.where) for human, gpt in row.turns]
    if held_out:
        log.info("sft: %s: %d rows of held-out videos left out", source.path, held_out)
    return examples


def row_video_id(path: str) -> str:
    """The key a conversations row's video goes by (its examples share the prepared video): one per file path."""
    return "rows-" + hashlib.sha256(str(path).encode()).hexdigest()[:20]
