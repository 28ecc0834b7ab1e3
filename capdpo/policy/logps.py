"""A preference pair's tokens and its answers' log-probs: the one definition the trainer and the
reference pass share, so the reference numbers are the trainer's by construction.

    tokenized = tokenize_pair(policy, pair, encoded.layout, max_response_tokens)
    chosen, rejected, chosen_tokens, rejected_tokens = pair_logps(policy, [encoded], [tokenized], shared_prefix)
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from capdpo.policy.base import EncodedVideo, PairLogprobs, VideoLayout, VideoPolicy
from capdpo.policy.packing import behind_shared_prefix, branch_matrix
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


def answer_logps(policy: VideoPolicy, videos: Sequence[EncodedVideo], prompts: Sequence[list[int]],
                 responses: Sequence[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs and token counts of each response given its prompt and video, in the
    order given; only response tokens are scored (SFT's loss on answers only). The entries
    holding the same video object share one packed row: the video tokens and the prompts' common
    start run once, each prompt's rest (run, not scored) and its response behind them. Without a
    4D-mask attention (``shares_prompt_prefix`` false) every entry is a row of its own."""
    if not policy.shares_prompt_prefix:
        return policy.sequence_logps(list(videos), list(prompts), list(responses))
    groups: dict[int, list[int]] = {}
    for i, video in enumerate(videos):
        groups.setdefault(id(video), []).append(i)
    rows = [behind_shared_prefix([prompts[i] for i in members], [[responses[i]] for i in members]) for members in groups.values()]
    logps, counts = policy.branch_logps([videos[members[0]] for members in groups.values()], rows)
    packed_order = torch.tensor([i for members in groups.values() for i in members], device=logps.device)
    slot = torch.empty_like(packed_order)
    slot[packed_order] = torch.arange(len(packed_order), device=logps.device)  # entry i's branch
    return logps[slot], counts[slot]


def group_token_logps(policy: VideoPolicy, videos: Sequence[EncodedVideo], prompts: Sequence[list[int]],
                      answers: Sequence[Sequence[list[int]]], shared_prefix: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs of every answer of every group (``answers[i]`` answer ``prompts[i]`` about
    ``videos[i]``), flattened group after group, as a right-padded ``(answers, longest)`` matrix and its
    0/1 mask. With ``shared_prefix`` the groups of one video (consecutive entries holding the same
    video object) share one packed row: the video and the prompts' common start run once, each
    answer behind them (GRPO's fast path); else every answer is a row of its own, video included."""
    if not (shared_prefix and policy.shares_prompt_prefix):
        rows = [(v, p, a) for v, p, group in zip(videos, prompts, answers) for a in group]
        per_answer = policy.token_logps([v for v, _, _ in rows], [p for _, p, _ in rows], [a for _, _, a in rows])
        matrix = torch.nn.utils.rnn.pad_sequence(per_answer, batch_first=True)
        lengths = torch.tensor([len(t) for t in per_answer], device=matrix.device)
        return matrix, (torch.arange(matrix.shape[1], device=matrix.device)[None] < lengths[:, None]).to(matrix.dtype)
    row_videos, rows, start = [], [], 0
    while start < len(videos):
        end = start
        while end < len(videos) and videos[end] is videos[start]:
            end += 1
        row_videos.append(videos[start])
        rows.append(behind_shared_prefix(prompts[start:end], answers[start:end]))
        start = end
    flat, slot = policy.branch_token_logps(row_videos, rows)
    return branch_matrix(flat, slot, sum(len(group) for group in answers))


def by_video(pairs: Iterable[PreferencePair]) -> dict[str, list[PreferencePair]]:
    """Pairs grouped by video, videos in order of first appearance."""
    groups: dict[str, list[PreferencePair]] = {}
    for p in pairs:
        groups.setdefault(p.video_id, []).append(p)
    return groups
