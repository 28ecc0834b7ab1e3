"""Per-row seeded sampling for ``generate``: every row draws its tokens from its own generator.

transformers' sampling draws all rows of a batch from the global RNG, so an answer would depend on
which other questions share its batch. ``RowSampler`` is a logits processor that samples each row
itself (temperature, then nucleus filtering, then a draw from the row's own ``torch.Generator``) and
leaves only the drawn token finite; ``generate`` then runs greedy and picks it. Rows without a seed
draw from a generator seeded from torch's global RNG.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import LogitsProcessor


def nucleus(probs: torch.Tensor, top_p: float, candidates: int = 256) -> torch.Tensor:
    """``probs`` (rows x vocab) with every token outside each row's nucleus set to 0: the most likely
    tokens whose mass reaches ``top_p``, always at least the top one, as HF's TopPLogitsWarper.

    A row's nucleus almost always lies among its few hundred likeliest tokens, so those
    ``candidates`` are found with ``topk``; only rows whose candidates hold less than ``top_p`` of
    the mass sort their whole vocabulary. The tokens kept are those of a full sort (sorting a 49k
    vocabulary for 64 rows at every decoding step is costly on a CPU: BENCHMARKS.md)."""
    top, order = probs.topk(min(candidates, probs.shape[-1]), dim=-1)
    kept = torch.zeros_like(probs).scatter(-1, order, _nucleus_of_sorted(top, top_p))
    short = top.sum(-1) < top_p
    if short.any():
        ranked, ranked_order = probs[short].sort(dim=-1, descending=True)
        kept[short] = torch.zeros_like(ranked).scatter(-1, ranked_order, _nucleus_of_sorted(ranked, top_p))
    return kept


def _nucleus_of_sorted(sorted_probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Probabilities sorted high to low, zeroed where the mass before them already reaches ``top_p``."""
    return sorted_probs.masked_fill(sorted_probs.cumsum(-1) - sorted_probs >= top_p, 0.0)


class RowSampler(LogitsProcessor):
    def __init__(self, seeds: Sequence[int | None], temperature: float, top_p: float = 1.0):
        if temperature <= 0:
            raise ValueError("RowSampler samples: temperature must be > 0 (greedy needs no sampler)")
        self.temperature, self.top_p = temperature, top_p
        self.generators = [torch.Generator().manual_seed(int(torch.randint(2**62, ())) if s is None else s) for s in seeds]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if scores.shape[0] != len(self.generators):
            raise ValueError(f"RowSampler has {len(self.generators)} seeds for {scores.shape[0]} rows")
        probs = torch.softmax(scores.float() / self.temperature, dim=-1).cpu()
        if self.top_p < 1.0:
            probs = nucleus(probs, self.top_p)
        drawn = torch.stack([_draw(row, g) for row, g in zip(probs, self.generators)])
        out = torch.full_like(scores, float("-inf"))
        return out.scatter(-1, drawn.to(scores.device), 0.0)


def _draw(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One token id drawn from a row's (unnormalised) probabilities by inverting their cumulative sum
    over the kept tokens with one uniform number. A multinomial draw over the whole vocabulary costs
    a random number per token; one over the kept tokens only would change all its random numbers
    whenever float noise (another batch's padding) lets a token at the nucleus's edge in or out,
    where one uniform number moves the draw only if it lands on that token."""
    support = probs.nonzero().flatten()
    cdf = probs[support].cumsum(0)
    u = torch.rand((), generator=generator, dtype=cdf.dtype) * cdf[-1]
    return support[torch.searchsorted(cdf, u, right=True).clamp(max=len(support) - 1)].view(1)
