"""The openai backend against loopback servers: concurrency, retries, failures recorded with their
reason, the API key kept secret, the reply cache; plus the vllm backend's requests (fake vllm)
and, marked slow, a real ``transformers serve`` judging a few answers."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import multiprocessing
import os
import re
import socket
import sqlite3
import sys
import threading
import time
import traceback
import types
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Self

import pytest
from fault_proxy import FAULTS, FaultProxy

from capdpo.config import JudgeConfig, LLMConfig
from capdpo.judge.judge import CaptionJudge, JudgeItem, judge_items
from capdpo.llm import OpenAIChatLLM, VLLMChatLLM, load_llm
from capdpo.llm.cache import CachedLLM, CacheEntry, LLMCache
from capdpo.records import Judgment, RecordFile

KEY_ENV = "CAPDPO_TEST_API_KEY"
PLANTED_KEY = "sk-test-PLANTED-7f3c9a1e5b2d4c6e8a0f"


# ---------------------------------------------------------------------------------------------
# a fake OpenAI-compatible upstream


def expected_score(prompt: str) -> int:
    return int(hashlib.sha256(prompt.encode()).hexdigest()[:8], 16) % 5 + 1


@dataclass
class Scripted:
    """A canned response for the next request (before the normal behaviour resumes)."""

    status: int
    content: bytes = b'{"error": {"message": "scripted"}}'
    headers: dict = field(default_factory=dict)
    delay_s: float = 0.0


class FakeUpstream:
    """``POST /v1/chat/completions`` answering ``Score: N`` with N from a hash of the prompt.

    A prompt containing ``STATUS=<code>`` always gets that error status; ``ECHO-AUTH`` gets a 401
    quoting the Authorization header (as some servers do). ``script`` queues canned responses.
    Tracks requests, arrival times, the largest number in flight and the keys presented."""

    def __init__(self, delay_s: float = 0.0):
        self.delay_s = delay_s
        self.script: deque[Scripted] = deque()
        self.requests = 0
        self.arrivals: list[float] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.auth: set[str] = set()
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _upstream_handler(self))
        self._server.daemon_threads = True

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> Self:
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def respond(self, body: bytes, auth: str) -> Scripted:
        with self._lock:
            self.requests += 1
            self.arrivals.append(time.monotonic())
            self.auth.add(auth)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            scripted = self.script.popleft() if self.script else None
        try:
            if scripted is not None:
                time.sleep(scripted.delay_s)
                return scripted
            time.sleep(self.delay_s)
            return self._completion(json.loads(body), auth)
        finally:
            with self._lock:
                self.in_flight -= 1

    @staticmethod
    def _completion(request: dict, auth: str) -> Scripted:
        content = request["messages"][-1]["content"]
        if isinstance(content, list):  # multimodal: the text parts, and how many images came
            images = sum(part["type"] == "image_url" for part in content)
            content = f"[{images} images] " + " ".join(part["text"] for part in content if part["type"] == "text")
        prompt = content
        forced = re.search(r"STATUS=(\d{3})", prompt)
        if forced:
            return Scripted(int(forced.group(1)), b'{"error": {"message": "forced by the prompt"}}')
        if "ECHO-AUTH" in prompt:
            return Scripted(401, json.dumps({"error": {"message": f"Incorrect API key provided: {auth}"}}).encode())
        text = f"Explanation: fine.\nScore: {expected_score(prompt)}"
        reply = {"id": "cmpl-1", "object": "chat.completion", "created": 0, "model": request["model"],
                 "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}],
                 "usage": {"prompt_tokens": len(prompt.split()), "completion_tokens": 4, "total_tokens": 0}}
        return Scripted(200, json.dumps(reply).encode())


def _upstream_handler(server: FakeUpstream) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            r = server.respond(body, self.headers.get("Authorization", ""))
            try:
                self.send_response(r.status)
                for k, v in {"Content-Type": "application/json", **r.headers}.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(r.content)))
                self.end_headers()
                self.wfile.write(r.content)
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True

        def log_message(self, *args) -> None:
            pass

    return Handler


@pytest.fixture
def upstream():
    with FakeUpstream() as server:
        yield server


@pytest.fixture(autouse=True)
def planted_key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, PLANTED_KEY)


def llm_config(base_url: str, **overrides) -> LLMConfig:
    fields = {"backend": "openai", "model": "fake-judge", "base_url": base_url + "/v1", "api_key_env": KEY_ENV,
              "timeout_s": 2.0, "backoff_base_s": 0.01, "backoff_max_s": 2.0}
    return LLMConfig(**{**fields, **overrides})


def make_llm(server, **overrides) -> OpenAIChatLLM:
    return load_llm(llm_config(server.url, **overrides), cache_dir=".")


def judge_item(i: int, answer: str | None = None) -> JudgeItem:
    return JudgeItem(f"v{i % 7}_{i % 3}#{i}", f"v{i % 7}_{i % 3}", f"A red ball rolls past {i % 7} blue cubes.",
                     "What rolls?", "A red ball.", answer or f"Answer number {i}: a ball.")


# ---------------------------------------------------------------------------------------------
# the openai backend


def test_replies_follow_prompts_across_repeated_calls(upstream):
    llm = make_llm(upstream)
    prompts = [f"prompt {i}" for i in range(20)]
    for _ in range(3):  # each call runs (and closes) its own event loop
        replies = llm.chat(prompts)
        assert [r.error for r in replies] == [None] * 20
        assert [r.text for r in replies] == [f"Explanation: fine.\nScore: {expected_score(p)}" for p in prompts]
        assert all(r.prompt_tokens == 2 and r.completion_tokens == 4 for r in replies)
    assert llm.chat([]) == []


def test_works_inside_a_running_event_loop(upstream):
    llm = make_llm(upstream)

    async def caller():
        return llm.chat(["from async code"])

    assert asyncio.run(caller())[0].text.endswith(f"Score: {expected_score('from async code')}")


def test_chat_messages_sends_whole_conversations(upstream):
    image = {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,/9j/AA=="}}
    conversation = [{"role": "user", "content": [image, image, {"type": "text", "text": "what is shown?"}]}]
    reply = make_llm(upstream).chat_messages([conversation])[0]
    assert reply.error is None and reply.text.endswith(f"Score: {expected_score('[2 images] what is shown?')}")


def test_concurrency_limit_respected(upstream):
    upstream.delay_s = 0.05
    llm = make_llm(upstream, concurrency=4)
    replies = llm.chat([f"p{i}" for i in range(40)])
    assert all(r.error is None for r in replies)
    assert upstream.max_in_flight == 4


def test_429_waits_for_retry_after(upstream):
    upstream.script.append(Scripted(429, headers={"Retry-After": "1"}))
    reply = make_llm(upstream, backoff_base_s=0.0).chat(["rate limited once"])[0]
    assert reply.error is None and reply.text.endswith(f"Score: {expected_score('rate limited once')}")
    assert upstream.requests == 2
    assert upstream.arrivals[1] - upstream.arrivals[0] >= 1.0


def test_retry_after_beyond_backoff_cap_fails_at_once(upstream):
    upstream.script.append(Scripted(429, headers={"Retry-After": "3600"}))
    reply = make_llm(upstream).chat(["come back in an hour"])[0]
    assert reply.text == "" and "HTTP 429" in reply.error and "3600s > backoff_max_s" in reply.error
    assert upstream.requests == 1


def test_5xx_retried_then_success(upstream):
    upstream.script.extend([Scripted(500), Scripted(503)])
    reply = make_llm(upstream).chat(["flaky"])[0]
    assert reply.error is None and reply.text.endswith(f"Score: {expected_score('flaky')}")
    assert upstream.requests == 3


def test_garbage_truncated_and_slow_bodies_retried(upstream):
    upstream.script.extend([Scripted(200, b"<html>not json</html>"), Scripted(200, b'{"choices": [{"mess'),
                            Scripted(200, b'{"object": "chat.completion"}'), Scripted(200, delay_s=1.0)])
    reply = make_llm(upstream, timeout_s=0.3).chat(["eventually"])[0]
    assert reply.error is None and reply.text.endswith(f"Score: {expected_score('eventually')}")
    assert upstream.requests == 5


def test_400_not_retried_and_does_not_spoil_the_batch(upstream):
    replies = make_llm(upstream).chat(["fine", "STATUS=400", "also fine"])
    assert replies[0].error is None and replies[2].error is None
    assert replies[1].text == "" and replies[1].error.startswith("HTTP 400") and "not retried" in replies[1].error
    assert upstream.requests == 3


def test_exhausted_tries_give_error_with_reason(upstream):
    reply = make_llm(upstream, max_tries=3).chat(["STATUS=503"])[0]
    assert reply.text == ""
    assert reply.error.startswith("HTTP 503") and reply.error.endswith("after 3 tries")
    assert upstream.requests == 3


def test_connection_refused_gives_error_with_reason():
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    reply = load_llm(llm_config(f"http://127.0.0.1:{port}", max_tries=2), ".").chat(["anyone?"])[0]
    assert reply.error.startswith("connection error") and reply.error.endswith("after 2 tries")


def test_key_sent_but_redacted_from_errors(upstream):
    reply = make_llm(upstream).chat(["ECHO-AUTH"])[0]
    assert upstream.auth == {f"Bearer {PLANTED_KEY}"}
    assert "HTTP 401" in reply.error and "***" in reply.error and PLANTED_KEY not in reply.error


# ---------------------------------------------------------------------------------------------
# judging through a faulty proxy


def test_judging_through_faults_records_everything_then_retry_completes(upstream, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    items = [judge_item(i) for i in range(60)]
    cache_path = tmp_path / "llm_cache.sqlite"
    out = RecordFile(tmp_path / "judgments.jsonl", Judgment)
    with FaultProxy(upstream.url, fault_rate=0.3, seed=1, hang_s=1.0) as proxy:
        cfg = JudgeConfig(llm=llm_config(proxy.url, timeout_s=0.3, max_tries=2, concurrency=16))
        judge = CaptionJudge(cfg, tmp_path, llm=load_llm(cfg.llm, tmp_path, cache_path=cache_path))
        first = judge_items(judge, items, out, batch_size=len(items))

        assert_complete(first, items)
        failed = [j for j in first if j.failure is not None]
        assert failed, "seed 1 makes some items fail twice in a row; pick another seed if FAULTS change"
        for j in failed:
            assert j.score is None and j.failure.startswith("judge backend failed: ") and "after 2 tries" in j.failure
        for j, it in zip(first, items):
            if j.failure is None:  # each reply landed on its own item
                assert j.score == expected_score(judge.render(it))
        assert set(proxy.served) == set(FAULTS) | {"forwarded"}

        proxy.fault_rate = 0.0
        requests_before = upstream.requests
        second = judge_items(judge, items, out, batch_size=len(items), retry_failed=True)
        assert_complete(second, items)
        assert all(j.failure is None for j in second)
        assert upstream.requests - requests_before == len(failed)  # the judged ones came from the records

    assert upstream.auth == {f"Bearer {PLANTED_KEY}"}  # the key was used...
    for path in [out.path, *tmp_path.glob("llm_cache.sqlite*")]:  # ...and kept nowhere
        assert PLANTED_KEY.encode() not in path.read_bytes(), path
    assert caplog.records and PLANTED_KEY not in caplog.text


def assert_complete(judgments: list[Judgment], items: list[JudgeItem]) -> None:
    ids = [j.target_id for j in judgments]
    assert len(ids) == len(set(ids)) == len(items)
    assert set(ids) == {it.target_id for it in items}
    for j in judgments:
        assert (j.score is None) != (j.failure is None)


# ---------------------------------------------------------------------------------------------
# the reply cache


def test_second_run_is_served_by_the_cache(upstream, tmp_path):
    items = [judge_item(i) for i in range(20)]
    cfg = JudgeConfig(llm=llm_config(upstream.url))
    runs = []
    for run in range(2):
        llm = load_llm(cfg.llm, tmp_path, cache_path=tmp_path / "cache.sqlite")
        judged = judge_items(CaptionJudge(cfg, tmp_path, llm=llm), items, RecordFile(tmp_path / f"j{run}.jsonl", Judgment),
                             batch_size=8)
        runs.append(([(j.target_id, j.score) for j in judged], llm.calls, llm.hits, upstream.requests))
    assert runs[0][0] == runs[1][0]
    assert runs[0][1:] == (20, 0, 20)
    assert runs[1][1:] == (0, 20, 20)  # zero new upstream requests


def test_failures_are_not_cached_and_duplicates_sent_once(upstream, tmp_path):
    llm = CachedLLM(make_llm(upstream), LLMCache(tmp_path / "cache.sqlite"))
    first = llm.chat(["same", "same", "STATUS=400"])
    assert first[0] == first[1] and first[2].error
    assert upstream.requests == 2 and len(llm.cache) == 1
    again = llm.chat(["same", "STATUS=400"])
    assert again[0].text == first[0].text and again[1].error
    assert upstream.requests == 3  # only the failure was asked again
    assert (llm.calls, llm.hits) == (3, 2)


def test_chat_messages_are_cached(upstream, tmp_path):
    llm = CachedLLM(make_llm(upstream), LLMCache(tmp_path / "cache.sqlite"))
    image = {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,/9j/AA=="}}
    with_image = [{"role": "user", "content": [image, {"type": "text", "text": "p"}]}]
    first = llm.chat_messages([with_image, [{"role": "user", "content": "p"}]])
    assert llm.chat_messages([with_image])[0].text == first[0].text
    assert upstream.requests == 2  # the images are part of the key
    assert first[0].text != first[1].text


def test_cache_key_covers_sampling_and_unseeded_sampling_bypasses(upstream, tmp_path):
    llm = CachedLLM(make_llm(upstream), LLMCache(tmp_path / "cache.sqlite"))
    llm.chat(["p"])
    llm.chat(["p"], max_new_tokens=7)
    llm.chat(["p"], temperature=0.5, seed=1)
    llm.chat(["p"], temperature=0.5, seed=1)
    assert upstream.requests == 3
    llm.chat(["p", "p"], temperature=0.5)  # unseeded sampling: fresh samples every time
    assert upstream.requests == 5 and len(llm.cache) == 3


class FakeChooser:
    backend, model_id = "hf", "fake-chooser"

    def __init__(self):
        self.asked: list[str] = []

    def choose(self, prompts, assistant_prefix, choices):
        self.asked += prompts
        return [{c: (1.0 if c == str(len(p) % 5 + 1) else 0.0) for c in choices} for p in prompts]


def test_choose_is_cached(tmp_path):
    inner = FakeChooser()
    llm = CachedLLM(inner, LLMCache(tmp_path / "cache.sqlite"))
    assert not hasattr(llm, "chat_messages")  # as the wrapped backend: it takes no images
    first = llm.choose(["ab", "abc"], "Score: ", ["1", "2", "3", "4", "5"])
    assert llm.choose(["abc", "ab"], "Score: ", ["1", "2", "3", "4", "5"]) == first[::-1]
    llm.choose(["ab"], "Rating: ", ["1", "2", "3", "4", "5"])  # another prefix is another request
    assert inner.asked == ["ab", "abc", "ab"]


def _cache_writer(cache: LLMCache, worker: int) -> None:
    """Two threads, each writing overlapping keys in small transactions and reading them back."""

    def write(thread: int) -> None:
        for start in range(worker * 50 + thread * 25, worker * 50 + thread * 25 + 150, 10):
            keys = {f"k{i}": CacheEntry("chat", "fake", "m", f"reply {i}", i, 1) for i in range(start, start + 10)}
            cache.put(keys)
            got = cache.get(list(keys))
            assert {k: e.value for k, e in got.items()} == {k: e.value for k, e in keys.items()}

    threads = [threading.Thread(target=write, args=(t,)) for t in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def _run_writer(cache: LLMCache, worker: int) -> None:
    try:
        _cache_writer(cache, worker)
    except Exception:  # noqa: BLE001 - any failure is the verdict, told by the exit code
        traceback.print_exc()
        os._exit(1)  # os._exit: a forked child must not run pytest's teardown
    os._exit(0)


def test_concurrent_processes_do_not_corrupt_the_cache(tmp_path):
    cache = LLMCache(tmp_path / "cache.sqlite")
    assert len(cache) == 0  # the parent holds an open connection across the forks
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_run_writer, args=(cache, w)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0] * 4
    expected = {f"k{i}" for i in range(3 * 50 + 25 + 150)}
    assert len(cache) == len(expected)
    assert {k: e.value for k, e in cache.get(sorted(expected)).items()} == {k: f"reply {k[1:]}" for k in expected}
    with sqlite3.connect(cache.path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)


# ---------------------------------------------------------------------------------------------
# the vllm backend, with a fake vllm module


@pytest.fixture
def fake_vllm(monkeypatch):
    module = types.ModuleType("vllm")

    class SamplingParams:
        def __init__(self, **kwargs):
            self.kwargs = kwargs

    class LLM:
        def __init__(self, **kwargs):
            self.kwargs = kwargs
            self.calls = []

        def chat(self, messages, sampling_params, use_tqdm=True):
            self.calls.append((messages, [p.kwargs for p in sampling_params], use_tqdm))
            out = types.SimpleNamespace
            return [out(prompt_token_ids=[0] * len(m[0]["content"]),
                        outputs=[out(text=f" echo {m[0]['content']}\n", token_ids=[1, 2, 3])]) for m in messages]

    module.LLM, module.SamplingParams = LLM, SamplingParams
    monkeypatch.setitem(sys.modules, "vllm", module)
    return module


def test_vllm_requests(fake_vllm):
    llm = load_llm(LLMConfig(backend="vllm", model="/models/judge"), cache_dir=".")
    assert isinstance(llm, VLLMChatLLM) and llm.backend == "vllm" and llm.model_id == "/models/judge"
    assert llm.engine.kwargs == {"model": "/models/judge", "tokenizer": "/models/judge", "seed": 0}
    replies = llm.chat(["a", "bb"], temperature=0.7, top_p=0.9, max_new_tokens=32, seed=5)
    messages, params, use_tqdm = llm.engine.calls[0]
    assert messages == [[{"role": "user", "content": "a"}], [{"role": "user", "content": "bb"}]]
    assert params == [{"temperature": 0.7, "top_p": 0.9, "max_tokens": 32, "seed": 5},
                      {"temperature": 0.7, "top_p": 0.9, "max_tokens": 32, "seed": 6}]
    assert use_tqdm is False
    assert [(r.text, r.prompt_tokens, r.completion_tokens, r.error) for r in replies] == [
        ("echo a", 1, 3, None), ("echo bb", 2, 3, None)]
    assert llm.chat(["c"])[0].text == "echo c" and llm.engine.calls[1][1][0]["seed"] is None
    assert llm.chat([]) == []


def test_vllm_missing_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # makes `import vllm` fail
    with pytest.raises(ImportError, match="pip install vllm"):
        VLLMChatLLM("/models/judge", cache_dir=".")


# ---------------------------------------------------------------------------------------------
# a real server: `transformers serve` with a local checkpoint folder, offline (a tiny random LLM with
# SmolLM2's tokenizer: the server and the client are tested here; a served student that replies a
# score is in test_distill.py)


@pytest.mark.slow
def test_transformers_serve_judges_a_few_items(tiny_llm, tmp_path, transformers_serve):
    with transformers_serve(tiny_llm) as port:
        # The server names a model preloaded from a folder by that folder's path. It generates
        # one request at a time on CPU, and a request the client gave up on still runs to its
        # end: one request in flight and a generous timeout keep a busy machine from cascading.
        cfg = JudgeConfig(llm=LLMConfig(backend="openai", model=str(tiny_llm), base_url=f"http://127.0.0.1:{port}/v1",
                                        max_new_tokens=32, timeout_s=300, concurrency=1, max_tries=2), retries=0)
        items = [judge_item(i) for i in range(3)]
        judged = judge_items(CaptionJudge(cfg, tmp_path), items, RecordFile(tmp_path / "j.jsonl", Judgment), batch_size=3)
        assert_complete(judged, items)
        for j in judged:
            assert j.judge_backend == "openai" and j.judge_model == str(tiny_llm)
            assert j.failure is None or j.failure.startswith(("no valid score", "judge backend failed: ")), j.failure
        assert any(j.raw_reply for j in judged), "the server replied nothing at all"
