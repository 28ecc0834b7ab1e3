"""A batch of preference pairs packed one pair per row: the prompt once, both answers behind it.

A pair is one row, right-padded, whose rejected branch restarts where the chosen one started (P
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
``VideoPolicy.pair_logps`` runs the packed rows through the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Attention implementations that apply a custom 4D mask as given (transformers' create_causal_mask
# returns a 4D mask untouched), and the form each expects: sdpa a boolean "may attend" mask, eager
# an additive one. Others (flash attention) take no such mask: pair_logps then runs two rows a pair.
TREE_MASK_ATTENTION = ("sdpa", "eager")

PROMPT, CHOSEN, REJECTED, PADDING = 0, 1, 2, -1  # a token's segment


@dataclass(frozen=True)
class PackedPairs:
    """The rows of ``n`` packed pairs and where each answer token's log-prob is read.

    ``row``, ``position``, ``target`` and ``slot`` have one entry per answer token: the hidden state
    at (row, position) predicts ``target``, summed into ``slot`` (chosen of pair i: i, rejected: n + i)."""

    ids: torch.Tensor  # (n, width) token ids, right-padded
    real: torch.Tensor  # (n, width) 1 for a token, 0 for padding
    segment: torch.Tensor  # (n, width) PROMPT, CHOSEN, REJECTED or PADDING
    source: torch.Tensor  # (n, width) the linear-row offset whose position each token takes
    row: torch.Tensor
    position: torch.Tensor
    target: torch.Tensor
    slot: torch.Tensor


def pack_pairs(prompts: list[list[int]], chosen: list[list[int]], rejected: list[list[int]], pad: int,
               device: torch.device) -> PackedPairs:
    """Pair i as the row ``prompts[i] + chosen[i] + rejected[i]``, right-padded with ``pad``."""
    n = len(prompts)
    rows = [p + c + r for p, c, r in zip(prompts, chosen, rejected)]
    width = max(map(len, rows))
    ids = torch.tensor([row + [pad] * (width - len(row)) for row in rows], device=device)
    real = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows], device=device)
    segment = torch.tensor([[PROMPT] * len(p) + [CHOSEN] * len(c) + [REJECTED] * len(r) + [PADDING] * (width - len(row))
                            for p, c, r, row in zip(prompts, chosen, rejected, rows)], device=device)
    # rejected token j takes the position of chosen token j
    source = torch.tensor([[*range(len(p) + len(c)), *range(len(p), len(p) + len(r)), *range(len(row), width)]
                           for p, c, r, row in zip(prompts, chosen, rejected, rows)], device=device)
    # (row, predicting position, target, output slot): chosen answers fill slots 0..n-1, rejected n..2n-1
    picks = []
    for i, (p, c, r) in enumerate(zip(prompts, chosen, rejected)):
        last_prompt, rejected_start = len(p) - 1, len(p) + len(c)
        picks += [(i, last_prompt + j, t, i) for j, t in enumerate(c)]
        picks += [(i, last_prompt if j == 0 else rejected_start + j - 1, t, n + i) for j, t in enumerate(r)]
    row, position, target, slot = torch.tensor(picks, dtype=torch.long, device=device).reshape(-1, 4).unbind(1)
    return PackedPairs(ids, real, segment, source, row, position, target, slot)


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
