"""The LLM judge: it grades answers from the video's caption (or frames) and a reference answer.

- ``parse``: reading replies (a score, a Video-ChatGPT verdict, a pairwise verdict) and the
  protocol table;
- ``budget``: requests, tokens and cost, spent or planned, and their ceilings;
- ``judge``: :class:`~capdpo.judge.judge.CaptionJudge` (scores, pairwise preferences) and the
  resumable :func:`~capdpo.judge.judge.judge_items` used by every stage that judges;
- ``stage``: the ``judge`` stage over the sampled candidates, and its dry run.
"""
