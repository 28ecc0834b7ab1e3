"""Rows packed as trees: a shared prefix once, several branches behind it (``pack_branches``).

A preference pair is one row, right-padded, whose rejected branch restarts where the chosen one started (P
prompt, C chosen, R rejected tokens; Qwen's multimodal positions likewise reuse those of the
linear row at offset P + j):

    tokens     p0 .. pP-1 | c0 .. cC-1  | r0 .. rR-1  | pad
    positions  0  .. P-1  | P  .. P+C-1 | P  .. P+R-1 | (any)

and a tree-shaped mask (query rows, key columns): the prompt is causal, an answer sees the prompt
and its own earlier tokens, never the other answer; padding sees itself only.

         p p p c c r r r
    p    x
    p    x x
    p    x x x
    c    x x x x
    c    x x x x x
    r    x x x     x
    r    x x x     x x
    r    x x x     x x x

c0 and r0 are both predicted from the hidden state of pP-1, cj from cj-1 and rj from rj-1.
Any number of branches packs the same way (the answers to one question for a distilled judge,
``capdpo.distill``), and a branch may begin with tokens that are run but not scored (the rest of
its own question, behind a prefix shared by several questions of one video).
``VideoPolicy.branch_logps`` (and ``pair_logps`` on it) runs packed rows through the model.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

# Attention implementations that apply a custom 4D mask as given (transformers' create_causal_mask
# returns a 4D mask untouched), and the form each expects: sdpa a boolean "may attend" mask, eager
# an additive one. Others (flash attention) take no such mask: pair_logps then runs two rows a pair.
TREE_MASK_ATTENTION = ("sdpa", "eager")

PROMPT, PADDING = 0, -1  # a token's segment; branch k of a row is segment k


@dataclass(frozen=True)
class PackedRows:
    """Packed rows and where each scored token's log-prob is read.

    ``row``, ``position``, ``target`` and ``slot`` have one entry per scored token: the hidden state
    at (row, position) predicts ``target``, summed into ``slot`` (its branch's number)."""

    ids: torch.Tensor  # (rows, width) token ids, right-padded
    real: torch.Tensor  # (rows, width) 1 for a token, 0 for padding
    segment: torch.Tensor  # (rows, width) PROMPT, branch k (1, 2, ...: a pair's chosen and rejected) or PADDING
    source: torch.Tensor  # (n, width) the linear-row offset whose position each token takes
    row: torch.Tensor
    position: torch.Tensor
    target: torch.Tensor
    slot: torch.Tensor


@dataclass(frozen=True)
class Branch:
    """Tokens that follow a row's shared prefix; log-probs are read for ``tokens[scored_from:]``
    (an answer after, say, the rest of its own question)."""

    tokens: list[int]
    scored_from: int = 0


def pack_branches(rows: Sequence[tuple[list[int], Sequence[Branch]]], pad: int, device: torch.device | str) -> PackedRows:
    """Each ``(prefix, branches)`` as one right-padded row: the prefix once, then every branch
    restarting at the prefix's end (its tokens take positions ``len(prefix) + j``), seeing the
    prefix and itself only (``tree_mask``). The branches are numbered in order over all rows:
    a scored token's ``slot`` is its branch's number."""
    ids, real, segment, source, picks = [], [], [], [], []
    slot = 0
    for i, (prefix, branches) in enumerate(rows):
        toks, seg, src = list(prefix), [PROMPT] * len(prefix), list(range(len(prefix)))
        for k, branch in enumerate(branches, start=1):
            start = len(toks)
            toks += branch.tokens
            seg += [k] * len(branch.tokens)
            src += range(len(prefix), len(prefix) + len(branch.tokens))
            # token j is predicted from the hidden state before it: the prefix's last token for j = 0
            picks += [(i, start + j - 1 if j else len(prefix) - 1, branch.tokens[j], slot)
                      for j in range(branch.scored_from, len(branch.tokens))]
            slot += 1
        ids.append(toks), real.append([1] * len(toks)), segment.append(seg), source.append(src)
    width = max(map(len, ids))
    for i in range(len(ids)):
        fill = width - len(ids[i])
        ids[i] += [pad] * fill
        real[i] += [0] * fill
        segment[i] += [PADDING] * fill
        source[i] += range(width - fill, width)
    row, position, target, slots = torch.tensor(picks, dtype=torch.long, device=device).reshape(-1, 4).unbind(1)
    return PackedRows(*(torch.tensor(x, device=device) for x in (ids, real, segment, source)), row, position, target, slots)


def common_prefix_length(seqs: Sequence[Sequence[int]], max_len: int | None = None) -> int:
    """Length of the longest common start of ``seqs`` (at most ``max_len``)."""
    limit = min(map(len, seqs)) if max_len is None else min(max_len, *map(len, seqs))
    n = 0
    while n < limit and all(s[n] == seqs[0][n] for s in seqs):
        n += 1
    return n


def behind_shared_prefix(prompts: Sequence[list[int]], answers: Sequence[Sequence[list[int]]]
                         ) -> tuple[list[int], list[Branch]]:
    """One row for prompts that share a start (the questions of one video): the common prefix, then
    per prompt and per answer of it a branch of the prompt's rest (run, not scored) and the answer."""
    shared = common_prefix_length(prompts)
    branches = [Branch(p[shared:] + a, len(p) - shared) for p, group in zip(prompts, answers) for a in group]
    return list(prompts[0][:shared]), branches


def branch_matrix(flat: torch.Tensor, slot: torch.Tensor, branches: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token values of packed branches (``VideoPolicy.branch_token_logps``: branch after branch,
    in order) as a right-padded ``(branches, longest)`` matrix and its 0/1 mask."""
    counts = torch.bincount(slot, minlength=branches)
    matrix = flat.new_zeros(branches, int(counts.max()) if branches else 0)
    mask = torch.arange(matrix.shape[1], device=flat.device)[None, :] < counts[:, None]
    return matrix.masked_scatter(mask, flat), mask.to(flat.dtype)


def video_grouped_order(video_keys: Sequence[str], seed: int) -> list[int]:
    """Item indices with each video's items together: videos in a seeded random order, a video's
    items in a random order of their own. Batches cut from it hold whole videos, whose items then
    share one packed row."""
    rng = random.Random(seed)
    groups: dict[str, list[int]] = {}
    for i, key in enumerate(video_keys):
        groups.setdefault(key, []).append(i)
    keys = list(groups)
    rng.shuffle(keys)
    order = []
    for key in keys:
        rng.shuffle(groups[key])
        order += groups[key]
    return order


def tree_mask(segment: torch.Tensor, attn_implementation: str, dtype: torch.dtype) -> torch.Tensor:
    """``(rows, 1, length, length)`` attention mask of packed pairs from each position's segment,
    in the form ``attn_implementation`` takes (one of TREE_MASK_ATTENTION)."""
    query, key = segment[:, :, None], segment[:, None, :]
    offsets = torch.arange(segment.shape[1], device=segment.device)
    causal = offsets[:, None] >= offsets[None, :]
    allowed = causal & (query != PADDING) & ((key == PROMPT) | (key == query))
    # a padding query attends to itself alone: no empty softmax row, so no NaN
    allowed |= (query == PADDING) & (offsets[:, None] == offsets[None, :])
    allowed = allowed.unsqueeze(1)
    if attn_implementation == "sdpa":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)
