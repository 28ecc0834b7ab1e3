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
            # keep the most likely tokens whose mass reaches top_p (always at least the top one), as HF's TopPLogitsWarper
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            outside = sorted_probs.cumsum(-1) - sorted_probs >= self.top_p
            probs = probs.scatter(-1, order, sorted_probs.masked_fill(outside, 0.0))
        drawn = torch.stack([torch.multinomial(row, 1, generator=g) for row, g in zip(probs, self.generators)])
        out = torch.full_like(scores, float("-inf"))
        return out.scatter(-1, drawn.to(scores.device), 0.0)
