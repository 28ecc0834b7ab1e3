"""Text-only chat LLMs: the QA writer and the judge talk to one of these.

    llm = load_llm(cfg.judge.llm, cache_dir, cache_path=run_dir / "llm_cache.sqlite")
    replies = llm.chat(prompts)

``backends`` holds the three backends (transformers in process, any OpenAI-compatible endpoint,
offline vLLM); ``cache`` the persistent reply cache that ``load_llm(..., cache_path=...)`` puts in
front of them.
"""

from __future__ import annotations

from pathlib import Path

from capdpo.config import LLMConfig
from capdpo.llm.backends import ChatLLM, HFChatLLM, OpenAIChatLLM, Reply, VLLMChatLLM, distilled_template
from capdpo.llm.cache import CachedLLM, LLMCache

__all__ = ["ChatLLM", "CachedLLM", "HFChatLLM", "LLMCache", "OpenAIChatLLM", "Reply", "VLLMChatLLM", "distilled_template", "load_llm"]


def load_llm(cfg: LLMConfig, cache_dir: str | Path, cache_path: Path | None = None) -> ChatLLM | CachedLLM:
    """The configured backend; with ``cache_path``, wrapped in a :class:`~capdpo.llm.cache.CachedLLM`
    keeping its replies in that SQLite file."""
    llm = _load_backend(cfg, cache_dir)
    return llm if cache_path is None else CachedLLM(llm, LLMCache(cache_path))


def _load_backend(cfg: LLMConfig, cache_dir: str | Path) -> ChatLLM:
    if cfg.backend == "openai":
        return OpenAIChatLLM(cfg.model, cfg.base_url, cfg.api_key_env, cfg.timeout_s, concurrency=cfg.concurrency,
                             max_tries=cfg.max_tries, backoff_base_s=cfg.backoff_base_s, backoff_max_s=cfg.backoff_max_s)
    if cfg.backend == "vllm":
        return VLLMChatLLM(cfg.model, cache_dir)
    return HFChatLLM(cfg.model, cache_dir, cfg.device, cfg.batch_size)
