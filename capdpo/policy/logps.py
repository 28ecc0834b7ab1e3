"""A preference pair's tokens and its answers' log-probs: the one definition the trainer and the
reference pass share, so the reference numbers are the trainer's by construction.

    tokenized = tokenize_pair(policy, pair, encoded.layout, max_response_tokens)
    chosen, rejected, chosen_tokens, rejected_tokens = pair_logps(policy, [encoded], [tokenized], shared_prefix)
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from capdpo.policy.base import EncodedVideo, PairLogprobs, VideoLayout, VideoPolicy
from capdpo.records import PreferencePair


@dataclass(frozen=True)
class TokenizedPair:
    """A pair with its token ids: the prompt holds the video's expanded tokens, never truncated."""

    pair: PreferencePair
    prompt: list[int]
    chosen: list[int]
    rejected: list[int]

    @property
    def tokens(self) -> int:
        return len(self.prompt) + len(self.chosen) + len(self.rejected)


def tokenize_pair(policy: VideoPolicy, pair: PreferencePair, layout: VideoLayout, max_response_tokens: int) -> TokenizedPair:
    """The pair's token ids for a video of ``layout``. Answers are cut to ``max_response_tokens``
    (end-of-turn kept); the prompt, with its visual tokens, is never cut."""
    return TokenizedPair(pair, policy.prompt_ids(pair.prompt, layout), policy.response_ids(pair.chosen, max_response_tokens),
                         policy.response_ids(pair.rejected, max_response_tokens))


def pair_logps(policy: VideoPolicy, videos: Sequence[EncodedVideo], batch: Sequence[TokenizedPair],
               shared_prefix: bool) -> PairLogprobs:
    """Summed log-probs and token counts of each pair's chosen and rejected answers given its
    prompt and video: one packed row per pair behind a shared prompt (``train.shared_prefix``),
    else chosen and rejected as two rows."""
    prompts = [t.prompt for t in batch]
    chosen, rejected = [t.chosen for t in batch], [t.rejected for t in batch]
    if shared_prefix:
        return policy.pair_logps(videos, prompts, chosen, rejected)
    logps, counts = policy.sequence_logps([*videos, *videos], prompts + prompts, chosen + rejected)
    n = len(prompts)
    return PairLogprobs(logps[:n], logps[n:], counts[:n], counts[n:])


def by_video(pairs: Iterable[PreferencePair]) -> dict[str, list[PreferencePair]]:
    """Pairs grouped by video, videos in order of first appearance."""
    groups: dict[str, list[PreferencePair]] = {}
    for p in pairs:
        groups.setdefault(p.video_id, []).append(p)
    return groups
