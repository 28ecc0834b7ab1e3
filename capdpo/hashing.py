"""Content hashes that name cache entries and records: one canonical JSON, one file digest."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

_file_hashes: dict[tuple[str, int, int], str] = {}


def sha256_json(value) -> str:
    """sha256 hex of the canonical JSON of ``value`` (sorted keys, no spaces): equal values, equal hashes."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def file_hash(path: Path) -> str:
    """sha256 of a file's bytes, streamed; memoised per (path, size, mtime_ns)."""
    st = path.stat()
    memo_key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if memo_key not in _file_hashes:
        h = hashlib.sha256()
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        _file_hashes[memo_key] = h.hexdigest()
    return _file_hashes[memo_key]


def split_test_ids(video_ids: list[str], fraction: float, seed: int) -> set[str]:
    """The held-out videos: the ``round(fraction * n)`` ids first in a seeded hash order.
    Deterministic for a given set of ids; adding videos can move one across, so a run folder
    keeps one data set (pairs also skip held-out questions, so nothing leaks either way)."""
    ranked = sorted(video_ids, key=lambda v: hashlib.sha256(f"{seed}:{v}".encode()).hexdigest())
    return set(ranked[: round(fraction * len(ranked))])
