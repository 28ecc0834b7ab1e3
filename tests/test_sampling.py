"""The sampler's nucleus filter keeps exactly the tokens a full sort (and HF's top-p warper) keeps."""

import torch
from transformers import TopPLogitsWarper

from capdpo.policy.sampling import nucleus


def full_sort_nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p
    return probs.scatter(-1, order, sorted_probs.masked_fill(outside, 0.0))


def rows_peaked_and_flat(vocab: int = 500) -> torch.Tensor:
    """Peaked rows (the nucleus among a few tokens) and flat ones (it spans most of the vocabulary)."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, vocab, generator=g)
    logits[:3] *= 8.0
    logits[3:] *= 0.1
    return logits.softmax(-1)


def test_nucleus_matches_a_full_sort_on_both_paths():
    probs = rows_peaked_and_flat()
    for top_p in (0.5, 0.9, 0.95):
        expected = full_sort_nucleus(probs, top_p)
        kept = nucleus(probs, top_p, candidates=16)  # the flat rows' nucleus lies past 16 candidates
        assert torch.equal(kept, expected)
        assert ((kept > 0).sum(-1)[3:] > 16).all(), "the flat rows must take the full-sort path"
        assert ((kept > 0).sum(-1)[:3] <= 16).all()


def test_nucleus_keeps_what_hf_top_p_keeps():
    probs = rows_peaked_and_flat()
    for top_p in (0.3, 0.9):
        hf = TopPLogitsWarper(top_p)(None, probs.log())
        assert torch.equal(nucleus(probs, top_p, candidates=16) > 0, hf.isfinite())


def test_nucleus_keeps_the_top_token_when_it_alone_exceeds_top_p():
    probs = torch.tensor([[0.97, 0.02, 0.01]])
    assert torch.equal(nucleus(probs, 0.5, candidates=2), torch.tensor([[0.97, 0.0, 0.0]]))


def test_row_sampler_draws_inside_the_nucleus_in_proportion():
    from capdpo.policy.sampling import RowSampler

    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])  # top_p 0.9 keeps the first three
    sampler = RowSampler(list(range(4000)), temperature=1.0, top_p=0.9)
    out = sampler(None, probs.log().expand(4000, -1).clone())
    drawn = out.argmax(-1)
    assert out.isfinite().sum(-1).eq(1).all()
    counts = torch.bincount(drawn, minlength=4).float() / 4000
    assert counts[3] == 0
    assert torch.allclose(counts[:3], torch.tensor([0.5, 0.3, 0.15]) / 0.95, atol=0.03)
    again = RowSampler(list(range(4000)), temperature=1.0, top_p=0.9)(None, probs.log().expand(4000, -1).clone())
    assert torch.equal(again.argmax(-1), drawn)  # each row's draw depends on its own seed only
