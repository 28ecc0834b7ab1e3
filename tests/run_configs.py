"""The small run config the pipeline tests share (a helper module, not a test file)."""

from __future__ import annotations

from pathlib import Path

import yaml


def write_config(path: Path, run_dir: Path, policy: Path, cache_dir: Path, **sections) -> Path:
    """Four synthetic clips, a tiny policy, short answers; ``sections`` override (dict sections
    are merged one level deep, other values replaced)."""
    cfg = {
        "run_dir": str(run_dir), "cache_dir": str(cache_dir),
        "data": {"synthetic_videos": 4, "test_fraction": 0.25},
        "policy": {"model": str(policy)},
        "sample": {"n": 3, "max_new_tokens": 6},
        "judge": {"mode": "expected", "llm": {"batch_size": 4}},
        # a random policy's answers are all poor: accept any strict preference
        "pairs": {"min_gap": 0.0, "min_chosen": 1, "max_rejected": 5},
        "train": {"epochs": 1, "batch_size": 2, "lr": 1e-3},
        "evaluate": {"max_new_tokens": 6},
    }
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    path.write_text(yaml.safe_dump(cfg))
    return path
