"""What judging costs: requests, tokens and USD, spent or planned, and the ceilings on them.

:class:`JudgeBudget` counts what the judge spent (from the replies' reported usage) and refuses,
before sending, requests that would pass ``judge.max_requests`` / ``max_tokens`` /
``max_cost_usd``; :meth:`JudgeBudget.plan` estimates requests not yet sent (prompt tokens by
:func:`count_tokens`, completion tokens at their ``max_new_tokens``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from capdpo.config import JudgeConfig
from capdpo.llm import Reply


@dataclass
class Usage:
    """Requests, tokens and USD of some judge calls (spent or planned); ``cost_usd`` None when
    a model involved has no price."""

    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float | None = 0.0

    def __add__(self, other: Usage) -> Usage:
        cost = None if self.cost_usd is None or other.cost_usd is None else self.cost_usd + other.cost_usd
        return Usage(self.requests + other.requests, self.prompt_tokens + other.prompt_tokens,
                     self.completion_tokens + other.completion_tokens, cost)

    def as_dict(self) -> dict:
        cost = None if self.cost_usd is None else round(self.cost_usd, 6)
        return {"requests": self.requests, "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens, "cost_usd": cost}


class JudgeBudget:
    """What the judge spent in this run (from the replies' reported usage) and its ceilings.

    Ceilings are checked before sending, against the spend so far plus an estimate of the
    requests about to be sent (prompt tokens estimated, completion at ``max_new_tokens``), so a
    run stops *before* passing one. Image tokens are not estimated, only counted afterwards.
    Cached replies count as spent: the count never underestimates.
    """

    def __init__(self, cfg: JudgeConfig):
        self.max_requests, self.max_tokens, self.max_cost_usd = cfg.max_requests, cfg.max_tokens, cfg.max_cost_usd
        self.prices = cfg.price_per_million
        self.used = Usage()
        self.exhausted: str | None = None  # why the last refused request was refused
        self.reasks_refused = 0  # answers recorded as failed because their re-ask did not fit

    @property
    def limited(self) -> bool:
        return any(x is not None for x in (self.max_requests, self.max_tokens, self.max_cost_usd))

    def usage(self, model: str, requests: int, prompt_tokens: int, completion_tokens: int) -> Usage:
        price = self.prices.get(model)
        cost = None if price is None else (prompt_tokens * price[0] + completion_tokens * price[1]) / 1e6
        return Usage(requests, prompt_tokens, completion_tokens, cost)

    def plan(self, llm, prompts: list[str], max_new_tokens: int) -> Usage:
        """Estimated usage of sending ``prompts`` to ``llm``, each reply at its longest."""
        tokens = {p: count_tokens(llm, p) for p in set(prompts)}
        return self.usage(llm.model_id, len(prompts), sum(tokens[p] for p in prompts), max_new_tokens * len(prompts))

    def total(self) -> Usage:
        """The spend the ceilings hold for: this judge's (a :class:`PooledBudget`'s: its pool's)."""
        return self.used

    def over(self, planned: Usage) -> str | None:
        """Why sending ``planned`` on top of what was spent would pass a ceiling; None if it fits."""
        total = self.total() + planned
        if self.max_requests is not None and total.requests > self.max_requests:
            return f"judge.max_requests={self.max_requests}: this run would need {total.requests} requests"
        tokens = total.prompt_tokens + total.completion_tokens
        if self.max_tokens is not None and tokens > self.max_tokens:
            return f"judge.max_tokens={self.max_tokens}: this run would need about {tokens} tokens"
        if self.max_cost_usd is not None and (total.cost_usd or 0.0) > self.max_cost_usd:
            return f"judge.max_cost_usd={self.max_cost_usd}: this run would need about ${total.cost_usd:.4f}"
        return None

    def refuse(self, planned: Usage) -> str | None:
        """:meth:`over`, remembering the reason as ``exhausted`` when ``planned`` does not fit."""
        reason = self.over(planned)
        if reason:
            self.exhausted = reason
        return reason

    def spend(self, model: str, replies: list[Reply]) -> None:
        self.add(self.usage(model, len(replies), sum(r.prompt_tokens for r in replies),
                            sum(r.completion_tokens for r in replies)))

    def add(self, usage: Usage) -> None:
        """Count ``usage`` as spent."""
        self.used += usage


class UsagePool:
    """The spend of several judges judging one run at once (the actors of one ray judge job)."""

    def __init__(self):
        self.used = Usage()

    def add(self, usage: Usage) -> None:
        self.used += usage

    def total(self) -> Usage:
        return self.used


class PooledBudget(JudgeBudget):
    """A judge's budget whose ceilings hold for the spend of every judge sharing ``pool`` (a
    :class:`UsagePool`, or a proxy of one); ``used`` is still this judge's own. The judges check
    before they send and count after, so together they may pass a ceiling by the requests they had
    in flight at once (at most one batch each)."""

    def __init__(self, cfg: JudgeConfig, pool):
        super().__init__(cfg)
        self.pool = pool

    def total(self) -> Usage:
        return self.pool.total()

    def add(self, usage: Usage) -> None:
        super().add(usage)
        self.pool.add(usage)


def count_tokens(llm, text: str) -> int:
    """Prompt tokens of ``text`` as ``llm`` will see it: its tokenizer with its chat template for
    the hf backend, else ``len(text) / 4`` rounded up (a common rule of thumb for English)."""
    tokenizer = None
    if llm.backend == "hf":
        backend = getattr(llm, "llm", llm)  # a CachedLLM keeps the backend in .llm
        tokenizer = getattr(backend, "tokenizer", None)
    if tokenizer is None:
        return math.ceil(len(text) / 4)
    chat = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
    return len(tokenizer(chat, add_special_tokens=False)["input_ids"])
