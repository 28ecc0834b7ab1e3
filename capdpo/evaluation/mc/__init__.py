"""Multiple-choice video benchmarks, scored offline by rules (docs/evaluation.md, "Multiple-choice benchmarks").

- ``items``: the files users download (Video-MME's parquet, MVBench's task jsons, TempCompass's
  question jsons, NExT-QA's csv, PerceptionTest's rows) read into typed :class:`~capdpo.evaluation.mc.items.MCItem`,
  and each item's video found under a video root;
- ``prompts``: each benchmark's official prompt (or, where it has none, lmms-eval 0.7.3's);
- ``extract``: the answer extractors, pure functions: each benchmark's official one and lmms-eval
  0.7.3's, switched by name (``official`` | ``lmms-eval``);
- ``score``: scoring answers, TempCompass's judge fallback, accuracy with bootstrap intervals per
  category, the summary record;
- ``synthetic``: multiple-choice versions of the synthetic clips' questions (the miniature's suite);
- ``lmms_eval_task``: a benchmark written as an lmms-eval 0.7.3 task folder whose prompt and
  extractor are these (``capdpo export lmms-eval-task``).

Nothing here loads a model or imports torch: the lmms-eval hand-off reuses the loaders and extractors.
"""
