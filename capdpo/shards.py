"""Shards of a stage's work: ``--shard i/n`` takes the items whose id hashes to ``i``.

A shard writes ``<file>.shard-i-of-n.jsonl`` beside the stage's record file; merging joins them
back, checking that each row sits in its shard and that an id seen twice holds the same row.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from typing import TypeVar

from capdpo.records import RecordFile

R = TypeVar("R")


def shard_of(qa_id: str, shards: int) -> int:
    """Stable shard of a question: the same on every machine and run, whatever the question order."""
    return zlib.crc32(f"shard:{qa_id}".encode()) % shards


def read_shards(parts: Sequence[tuple[int | None, RecordFile[R]]], shards: int, shard_key: Callable[[R], str],
                same: Callable[[R, R], bool]) -> tuple[dict[str, R], int]:
    """The rows of shard files by id, and how many repeated rows were dropped. ``parts`` pairs each
    file with the shard index its rows must belong to (``shard_of(shard_key(row), shards)``; None =
    any). An id seen in two files must be the ``same`` row (a re-run shard repeats itself exactly);
    within one file, the record files' own rule holds (:meth:`RecordFile.read`)."""
    merged: dict[str, R] = {}
    duplicates = 0
    for i, part in parts:
        duplicates += part.repeats()
        for row in part.read():
            if i is not None and shard_of(shard_key(row), shards) != i:
                raise ValueError(f"{part.path}: {row.id} belongs to shard {shard_of(shard_key(row), shards)}, not {i}")
            if row.id in merged:
                if not same(merged[row.id], row):
                    raise ValueError(f"{part.path}: {row.id} appears twice with different content")
                duplicates += 1
                continue
            merged[row.id] = row
    return merged, duplicates


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` -> ``(i, n)`` with ``0 <= i < n``."""
    i, sep, n = text.partition("/")
    if not (sep and i.strip().isdigit() and n.strip().isdigit()) or not 0 <= int(i) < int(n):
        raise ValueError(f"--shard {text!r}: expected i/n with 0 <= i < n, e.g. 0/4")
    return int(i), int(n)


def shard_file(out: RecordFile[R], shard: tuple[int, int]) -> RecordFile[R]:
    """Shard ``(i, n)``'s file beside ``out``: ``<stem>.shard-i-of-n.jsonl``."""
    path = out.path
    return RecordFile(path.with_name(f"{path.stem}.shard-{shard[0]}-of-{shard[1]}{path.suffix}"), out.kind)
