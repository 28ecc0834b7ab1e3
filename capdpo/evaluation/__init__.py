"""Evaluation: everything that measures a policy, in one place (docs/evaluation.md).

- ``stage``: the ``evaluate`` stage - greedy answers to the run's held-out questions or a
  benchmark suite, judged by the suite's protocol, or a multiple-choice benchmark scored by rules;
- ``suites``: the open-ended benchmark suites (LLaVA-Hound's files, ActivityNet-QA) read into
  videos and questions;
- ``mc``: the multiple-choice benchmarks (Video-MME, MVBench, TempCompass, NExT-QA, PerceptionTest
  and the synthetic clips' MC questions): loaders of the published files, official prompts, the
  official and lmms-eval 0.7.3 answer extractors, and their scoring;
- ``compare``: runs side by side with bootstrap intervals (``capdpo evaluate compare``);
- ``agreement``: how two judges (or a judge and an oracle) agree.

Only ``stage`` is a stage; the others are analyses, importable without a model (the lmms-eval
hand-off reuses ``mc``'s loaders and extractors).
"""
