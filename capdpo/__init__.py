"""capdpo: align video LMMs with DPO from a caption-grounded language-model reward.

    data -> frames -> qa -> sample -> judge -> pairs -> reference -> train -> evaluate -> report

One module per stage; the machinery the stages share lives below them (docs/architecture.md).
"""
