"""Judge throughput of the openai backend against a loopback server with a fixed latency.

    python benchmarks/judge_throughput.py [--latency-ms 200] [--rounds 10] [--concurrency 1,8,64,256]

A fake OpenAI-compatible server (asyncio streams, in its own process so it does not share the
client's GIL) answers every chat completion after exactly ``latency`` seconds, whatever the load.
An ideal client with ``c`` requests in flight then judges ``c / latency`` items per second; each
run judges ``c * rounds`` items through ``CaptionJudge`` and reports the fraction of that ideal.
Finally the same job runs twice through the reply cache: the second run must send no request.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import multiprocessing
import os
import tempfile
import time
from pathlib import Path

from capdpo.config import JudgeConfig, LLMConfig
from capdpo.judge.judge import CaptionJudge, JudgeItem
from capdpo.llm import load_llm

# -- the fake server -------------------------------------------------------------------------

async def _serve_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, latency_s: float,
                            requests) -> None:
    """HTTP/1.1 keep-alive: answer requests on this connection until the client closes it."""
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), 0)
            body = await reader.readexactly(length)
            with requests.get_lock():
                requests.value += 1
            await asyncio.sleep(latency_s)
            score = hashlib.sha256(body).digest()[0] % 5 + 1
            reply = json.dumps({"id": "cmpl", "object": "chat.completion", "created": 0, "model": "fake",
                                "choices": [{"index": 0, "finish_reason": "stop",
                                             "message": {"role": "assistant", "content": f"Explanation: ok.\nScore: {score}"}}],
                                "usage": {"prompt_tokens": 100, "completion_tokens": 8, "total_tokens": 108}}).encode()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(reply), reply))
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionResetError):
        pass  # the client closed the connection
    finally:
        writer.close()


def _server_main(latency_s: float, requests, port_queue) -> None:
    async def main() -> None:
        server = await asyncio.start_server(lambda r, w: _serve_connection(r, w, latency_s, requests),
                                            "127.0.0.1", 0, backlog=1024)
        port_queue.put(server.sockets[0].getsockname()[1])
        async with server:
            await server.serve_forever()

    asyncio.run(main())


class FakeServer:
    """The fake server in a child process; ``requests`` counts the completions it received."""

    def __init__(self, latency_s: float):
        ctx = multiprocessing.get_context("fork")  # started before the client runs any thread or loop
        self.requests = ctx.Value("l", 0)
        ports = ctx.Queue()
        self.process = ctx.Process(target=_server_main, args=(latency_s, self.requests, ports), daemon=True)
        self.process.start()
        self.url = f"http://127.0.0.1:{ports.get(timeout=60)}/v1"

    def close(self) -> None:
        self.process.terminate()
        self.process.join(timeout=10)


# -- the client ------------------------------------------------------------------------------

def make_items(n: int) -> list[JudgeItem]:
    return [JudgeItem(f"c{i}", f"q{i % 97}", f"A red ball rolls past {i % 13} blue cubes on a wooden table.",
                      "What rolls past the cubes?", "A red ball.", f"It is a red ball (answer {i}).") for i in range(n)]


def make_judge(url: str, concurrency: int, cache_path: Path | None = None) -> CaptionJudge:
    cfg = JudgeConfig(llm=LLMConfig(backend="openai", model="fake", base_url=url, concurrency=concurrency,
                                    timeout_s=30, max_tries=3))
    return CaptionJudge(cfg, ".", llm=load_llm(cfg.llm, ".", cache_path=cache_path))


def timed_judge(judge: CaptionJudge, items: list[JudgeItem]) -> tuple[float, float]:
    """(wall seconds, client CPU seconds) to judge ``items`` in one call (one batch: the backend's
    concurrency is the only limit)."""
    t0, cpu0 = time.perf_counter(), time.process_time()
    judgments = judge.judge(items)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    failed = [j.failure for j in judgments if j.failure is not None]
    if failed:
        raise SystemExit(f"{len(failed)} of {len(items)} judgments failed, e.g. {failed[0]}")
    return seconds, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--latency-ms", type=float, default=200.0, help="server latency per request")
    parser.add_argument("--rounds", type=int, default=10, help="items per run = concurrency x rounds")
    parser.add_argument("--concurrency", default="1,8,64,256", help="comma-separated concurrency levels")
    parser.add_argument("--cache-concurrency", type=int, default=64, help="concurrency of the cache check")
    args = parser.parse_args()
    latency_s = args.latency_ms / 1000
    server = FakeServer(latency_s)
    try:
        timed_judge(make_judge(server.url, 4), make_items(8))  # warm-up: imports, first connections
        load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
        print(f"server latency {args.latency_ms:g} ms, {args.rounds} rounds per run, {os.cpu_count()} CPUs, "
              f"load average before: {load}\n")
        print("| concurrency | items | seconds | items/s | ideal items/s | fraction of ideal | client CPU ms/item |")
        print("|---:|---:|---:|---:|---:|---:|---:|")
        for c in (int(x) for x in args.concurrency.split(",")):
            items = make_items(c * args.rounds)
            seconds, cpu = timed_judge(make_judge(server.url, c), items)
            rate, ideal = len(items) / seconds, c / latency_s
            print(f"| {c} | {len(items)} | {seconds:.2f} | {rate:.1f} | {ideal:.0f} | {rate / ideal:.3f} | "
                  f"{cpu / len(items) * 1000:.2f} |", flush=True)

        c = args.cache_concurrency
        items = make_items(c * args.rounds)
        with tempfile.TemporaryDirectory() as tmp:
            cache_path = Path(tmp) / "llm_cache.sqlite"
            print(f"\ncache, {len(items)} items at concurrency {c}:")
            for run in ("first", "second"):
                before = server.requests.value
                seconds, _ = timed_judge(make_judge(server.url, c, cache_path), items)
                print(f"- {run} run: {server.requests.value - before} requests to the server, {seconds:.2f} s")
    finally:
        server.close()


if __name__ == "__main__":
    main()
