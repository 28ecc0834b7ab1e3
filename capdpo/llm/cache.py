"""A persistent cache of LLM replies, shared by every process and thread of a machine.

    llm = CachedLLM(load_llm(cfg, cache_dir), LLMCache("runs/demo/llm_cache.sqlite"))
    llm.chat(prompts)  # sends only the prompts whose exact request was never answered

A request is identified by the sha256 of a canonical JSON of everything that decides its reply:
backend, model, kind (``chat`` or ``choose``), the rendered prompt and the sampling parameters
(plus ``assistant_prefix`` and ``choices`` for ``choose``). Never the API key. Only successful
replies are stored, so a re-run retries what failed.

SQLite in WAL mode lets readers proceed while one writer commits; ``busy_timeout`` makes
concurrent writers wait instead of failing; ``INSERT OR IGNORE`` makes two processes that answer
the same request at once harmless (the replies are interchangeable).
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from capdpo.hashing import sha256_json
from capdpo.llm.backends import Reply
from capdpo.records import WriteError, writing

SCHEMA = """CREATE TABLE IF NOT EXISTS replies (
    key TEXT PRIMARY KEY,          -- sha256 of the canonical request
    kind TEXT NOT NULL,            -- chat | choose
    backend TEXT NOT NULL,
    model TEXT NOT NULL,
    value TEXT NOT NULL,           -- JSON: the reply text (chat) or {choice: probability} (choose)
    prompt_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL          -- unix time
)"""

# SQLite limits the number of ? in one statement (999 in old builds)
_CHUNK = 500
# SQLite's words for a file it cannot write where it lives (read-only folder or file, full disk)
_STORAGE_FAILURES = ("readonly database", "disk is full", "unable to open database file")

T = TypeVar("T")


def request_key(backend: str, model: str, kind: str, prompt: str | list[dict], params: dict) -> str:
    """sha256 of the canonical JSON of one request (``prompt``: the rendered text, or the whole
    conversation for ``chat_messages``): equal requests, equal keys, across runs."""
    return sha256_json({"backend": backend, "model": model, "kind": kind, "prompt": prompt, "params": params})


@dataclass(frozen=True)
class CacheEntry:
    """One stored reply: ``value`` is the text (chat) or the choice probabilities (choose)."""

    kind: str
    backend: str
    model: str
    value: str | dict[str, float]
    prompt_tokens: int = 0
    completion_tokens: int = 0


class LLMCache:
    """The SQLite file of replies. Each thread and each process opens its own connection (a
    sqlite3 connection must not be shared between threads nor survive a fork)."""

    def __init__(self, path: str | os.PathLike, busy_timeout_s: float = 60.0):
        self.path = Path(path)
        self.busy_timeout_s = busy_timeout_s
        self._local = threading.local()
        with writing(self.path):
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn()  # create the file now, so a bad path fails at start-up, not mid-run

    def __repr__(self) -> str:
        return f"LLMCache({str(self.path)!r})"

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None or self._local.pid != os.getpid():  # a forked child must not reuse its parent's
            with self._storing():
                conn = sqlite3.connect(self.path, timeout=self.busy_timeout_s, isolation_level=None)
                conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_s * 1000)}")
                conn.execute("PRAGMA journal_mode = WAL")
                conn.execute("PRAGMA synchronous = NORMAL")  # durable enough in WAL mode: a crash loses at most the last commits
                conn.execute(SCHEMA)
            self._local.conn, self._local.pid = conn, os.getpid()
        return conn

    @contextmanager
    def _storing(self) -> Iterator[None]:
        """SQLite's read-only and disk-full errors as a :class:`WriteError` naming the file."""
        try:
            yield
        except sqlite3.OperationalError as e:
            if not any(words in str(e) for words in _STORAGE_FAILURES):
                raise
            raise WriteError(f"{self.path}: cannot write: {e}") from e

    def get(self, keys: list[str]) -> dict[str, CacheEntry]:
        """The stored entries among ``keys`` (missing keys are simply absent)."""
        found = {}
        unique = list(dict.fromkeys(keys))
        for start in range(0, len(unique), _CHUNK):
            chunk = unique[start : start + _CHUNK]
            rows = self._conn().execute(
                "SELECT key, kind, backend, model, value, prompt_tokens, completion_tokens FROM replies "
                f"WHERE key IN ({','.join('?' * len(chunk))})", chunk)
            for key, kind, backend, model, value, pt, ct in rows:
                found[key] = CacheEntry(kind, backend, model, json.loads(value), pt, ct)
        return found

    def put(self, entries: dict[str, CacheEntry]) -> None:
        """Store entries in one transaction; keys already stored keep their first reply."""
        if not entries:
            return
        now = time.time()
        rows = [(k, e.kind, e.backend, e.model, json.dumps(e.value, ensure_ascii=False), e.prompt_tokens,
                 e.completion_tokens, now) for k, e in entries.items()]
        conn = self._conn()
        # IMMEDIATE takes the write lock up front, where busy_timeout applies; a deferred
        # transaction that later upgrades to a writer can fail with "database is locked" at once.
        with self._storing():
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.executemany("INSERT OR IGNORE INTO replies VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def delete(self, keys: list[str]) -> None:
        """Remove entries (replies found unusable after they were stored)."""
        unique = list(dict.fromkeys(keys))
        conn = self._conn()
        with self._storing():
            conn.execute("BEGIN IMMEDIATE")
            try:
                for start in range(0, len(unique), _CHUNK):
                    chunk = unique[start : start + _CHUNK]
                    conn.execute(f"DELETE FROM replies WHERE key IN ({','.join('?' * len(chunk))})", chunk)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def __len__(self) -> int:
        return self._conn().execute("SELECT COUNT(*) FROM replies").fetchone()[0]

    def close(self) -> None:
        """Close this thread's connection (others close when their thread's objects are freed)."""
        conn = getattr(self._local, "conn", None)
        if conn is not None and self._local.pid == os.getpid():
            conn.close()
        self._local.conn = None


class CachedLLM:
    """A chat LLM behind an :class:`LLMCache`: same ``chat``/``choose``/``backend``/``model_id``
    (and ``chat_messages`` when the backend has it); only requests the cache cannot answer reach
    the backend. ``calls`` counts prompts sent to the
    backend, ``hits`` prompts answered without it (from the cache, or a duplicate in the batch)."""

    def __init__(self, llm, cache: LLMCache):
        self.llm = llm
        self.cache = cache
        self.calls = 0
        self.hits = 0

    @property
    def backend(self) -> str:
        return self.llm.backend

    @property
    def model_id(self) -> str:
        return self.llm.model_id

    def chat(self, prompts: list[str], *, temperature: float = 0.0, top_p: float = 1.0,
             max_new_tokens: int = 256, seed: int | None = None) -> list[Reply]:
        params = {"temperature": temperature, "top_p": top_p, "max_new_tokens": max_new_tokens, "seed": seed}
        return self._chat(self.llm.chat, prompts, params)

    @property
    def chat_messages(self) -> Callable[..., list[Reply]]:
        """The backend's multimodal ``chat_messages``, cached; absent (``hasattr`` is False) when
        the backend has none, so callers can tell which LLMs take images."""
        if not hasattr(self.llm, "chat_messages"):
            raise AttributeError(f"the {self.backend} backend has no chat_messages")
        return self._chat_messages

    def _chat_messages(self, conversations: list[list[dict]], *, temperature: float = 0.0, top_p: float = 1.0,
                       max_new_tokens: int = 256, seed: int | None = None) -> list[Reply]:
        params = {"temperature": temperature, "top_p": top_p, "max_new_tokens": max_new_tokens, "seed": seed}
        return self._chat(self.llm.chat_messages, conversations, params)

    def _chat(self, send: Callable[..., list[Reply]], requests: list, params: dict) -> list[Reply]:
        if params["temperature"] > 0 and params["seed"] is None:
            # unseeded sampling asks for fresh samples; a stored one, or one shared by equal
            # requests in the batch, would silently remove the variety the caller wants
            self.calls += len(requests)
            return send(requests, **params)
        return self._through_cache("chat", requests, params, lambda todo: send(todo, **params),
                                   self._chat_entry, self._chat_reply)

    def forget(self, requests: list, *, temperature: float = 0.0, top_p: float = 1.0, max_new_tokens: int = 256,
               seed: int | None = None) -> None:
        """Remove the stored replies of these ``chat``/``chat_messages`` requests (prompts or
        conversations) so the next call asks the backend again: a reply the caller could not
        use (no valid score) must not be served forever."""
        params = {"temperature": temperature, "top_p": top_p, "max_new_tokens": max_new_tokens, "seed": seed}
        self.cache.delete([request_key(self.backend, self.model_id, "chat", r, params) for r in requests])

    def choose(self, prompts: list[str], assistant_prefix: str, choices: list[str]) -> list[dict[str, float]]:
        params = {"assistant_prefix": assistant_prefix, "choices": list(choices)}
        return self._through_cache("choose", prompts, params, lambda todo: self.llm.choose(todo, assistant_prefix, choices),
                                   lambda probs: CacheEntry("choose", self.backend, self.model_id, probs),
                                   lambda entry: entry.value)

    def _through_cache(self, kind: str, prompts: list, params: dict, fetch: Callable[[list], list[T]],
                       to_entry: Callable[[T], CacheEntry | None], from_entry: Callable[[CacheEntry], T]) -> list[T]:
        """``prompts`` (texts or conversations) answered from the cache where it can, the rest
        fetched once each and stored when ``to_entry`` says the result is worth keeping."""
        keys = [request_key(self.backend, self.model_id, kind, p, params) for p in prompts]
        results = {k: from_entry(e) for k, e in self.cache.get(keys).items()}
        todo = {k: p for k, p in zip(keys, prompts) if k not in results}  # first of equal prompts only
        self.hits += len(prompts) - len(todo)
        if todo:
            self.calls += len(todo)
            fresh = dict(zip(todo, fetch(list(todo.values()))))
            entries = {k: to_entry(v) for k, v in fresh.items()}
            self.cache.put({k: e for k, e in entries.items() if e is not None})
            results.update(fresh)
        return [results[k] for k in keys]

    def _chat_entry(self, reply: Reply) -> CacheEntry | None:
        if reply.error is not None:
            return None  # a failure is not an answer: a re-run asks again
        return CacheEntry("chat", self.backend, self.model_id, reply.text, reply.prompt_tokens, reply.completion_tokens)

    @staticmethod
    def _chat_reply(entry: CacheEntry) -> Reply:
        return Reply(entry.value, 0.0, entry.prompt_tokens, entry.completion_tokens)
