"""The LLM judge (stages 6 and 9): it scores answers, or compares two.

The paper's reward (``protocol=caption_reward``): a text-only LLM reads the video's detailed
caption (its stand-in for the video), the question, the reference answer and a candidate answer,
and replies ``Explanation: ...`` then ``Score: <1-5>``. The zero-shot QA suites use the
Video-ChatGPT protocol instead (``protocol=video_chatgpt``: no caption, reply
``{'pred': 'yes'|'no', 'score': 0-5}``). A score is only ever what a judge said: a reply that does
not parse is re-asked, then recorded as a failure with its reason - never turned into a number.

Controls, all in :class:`~capdpo.config.JudgeConfig`: several sampled replies per answer
(self-consistency), several judge LLMs (ensemble), sampled frames instead of the caption
(``evidence=frames``, a vision judge), and request/token/cost ceilings
(:class:`~capdpo.judge.budget.JudgeBudget`). :meth:`CaptionJudge.pairwise_preference` compares
two answers in both orders; :func:`judge_items` judges a list resumably into a record file.
"""

from __future__ import annotations

import base64
import io
import statistics
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from tqdm import tqdm

from capdpo.config import JudgeConfig
from capdpo.errors import BudgetExceeded, FrameError
from capdpo.judge.budget import JudgeBudget, Usage
from capdpo.judge.parse import PROTOCOLS, Vote, parse_pairwise
from capdpo.llm import HFChatLLM, Reply, distilled_template, load_llm
from capdpo.media.frames import sample_frames
from capdpo.prompts import Template, load_template, short_hash
from capdpo.records import Judgment, QAItem, RecordFile, Video

# -- items and evidence ----------------------------------------------------------------------

@dataclass(frozen=True)
class JudgeItem:
    """One answer to grade, with everything the prompt needs (``video`` only for evidence=frames)."""

    target_id: str
    qa_id: str
    caption: str
    question: str
    reference: str
    answer: str
    video: str | None = None
    video_id: str | None = None  # names the videos.jsonl row in errors about the caption

    @classmethod
    def for_answer(cls, video: Video, qa: QAItem, answer: str, target_id: str) -> JudgeItem:
        """``answer`` (a candidate, a prediction...) to question ``qa`` about ``video``."""
        return cls(target_id, qa.id, video.caption, qa.question, qa.answer, answer, video.video, video.id)


def truncate_words(text: str, max_words: int) -> str:
    """``text`` cut to its first ``max_words`` words (untouched, whitespace and all, when shorter)."""
    words = text.split()
    return text if len(words) <= max_words else " ".join(words[:max_words])


def load_frames(video: str | Path, num_frames: int, size: int | None = None, quality: int = 90) -> list[bytes]:
    """``num_frames`` frames sampled uniformly over a video file or frame folder, as JPEG bytes."""
    encoded = []
    for frame in sample_frames(video, num_frames, size):
        buf = io.BytesIO()
        frame.save(buf, format="JPEG", quality=quality)
        encoded.append(buf.getvalue())
    return encoded


def chat_messages(prompt: str, images: list[bytes] | None = None) -> list[dict]:
    """One user turn for an OpenAI-compatible chat API: each image (JPEG bytes) as a base64
    ``image_url`` part, in order, then the text prompt (the frames come first so the prompt can
    refer to "the frames above"). Without images the content is the plain prompt."""
    if not images:
        return [{"role": "user", "content": prompt}]
    parts = [{"type": "image_url", "image_url": {"url": "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii")}}
             for jpeg in images]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": prompt}]}]


def caption_messages(video: str | Path, num_frames: int = 8, size: int | None = None) -> list[dict]:
    """The request asking a vision chat model for a detailed caption of ``video`` (template
    ``detailed_caption``), for videos that come without one."""
    return chat_messages(load_template("detailed_caption").text, load_frames(video, num_frames, size))


# -- the judge -------------------------------------------------------------------------------

@dataclass(frozen=True)
class JudgeLLM:
    """One judge LLM (the main one or an ensemble member) and its reply length."""

    llm: object
    max_new_tokens: int

    @property
    def key(self) -> str:
        return f"{self.llm.backend}:{self.llm.model_id}"


@dataclass
class _Request:
    """One reply asked of one judge LLM for one item; a re-ask updates it in place."""

    item: int
    judge: JudgeLLM
    sample: int
    prompt: str
    reply: Reply | None = None
    vote: Vote | None = None
    attempts: int = 0
    latency_s: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    refused: str | None = None  # why a needed re-ask was not sent (budget)

    def take(self, reply: Reply, vote: Vote | None) -> None:
        self.reply, self.vote = reply, vote
        self.attempts += 1
        self.latency_s += reply.latency_s
        self.prompt_tokens += reply.prompt_tokens
        self.completion_tokens += reply.completion_tokens



def judge_batch_size(cfg: JudgeConfig) -> int:
    """Items per judge call when judging many: a remote backend needs at least ``concurrency`` of
    them to keep that many requests in flight."""
    llm = cfg.llm
    return max(llm.batch_size, llm.concurrency) if llm.backend == "openai" else llm.batch_size


def protocol_config(cfg: JudgeConfig, protocol: str) -> JudgeConfig:
    """The judge settings ``cfg`` for ``protocol``: with that protocol's own template when it is not
    ``cfg.protocol`` (:meth:`CaptionJudge.for_protocol`)."""
    if protocol == cfg.protocol:
        return cfg
    if protocol != "caption_reward" and cfg.mode != "generate":
        raise ValueError(f"protocol {protocol} is judged from a free reply, but judge.mode={cfg.mode}; "
                         "evaluate this suite with --set judge.mode=generate")
    # validated like a loaded config: the combination checks live in config.JudgeConfig
    return JudgeConfig.model_validate({**cfg.model_dump(), "protocol": protocol, "template": None})


def default_template(cfg: JudgeConfig, cache_dir: str | Path) -> str:
    """The template a judge uses when ``judge.template`` is unset: the one a distilled judge was
    trained on, else the protocol's own (``caption_reward_frames`` with ``evidence=frames``)."""
    if cfg.evidence == "frames":
        return "caption_reward_frames"
    if cfg.protocol == "caption_reward" and (learned := distilled_template(cfg.llm.model, cache_dir)):
        return learned
    return PROTOCOLS[cfg.protocol].template


class CaptionJudge:
    """Scores answers through one or more chat LLMs; :meth:`judge` is the single entry point.

    ``llm`` replaces the configured main judge and ``members`` the loaded ``cfg.ensemble``
    (one LLM per entry, same order) - both for tests or callers holding loaded models.
    ``budget`` is shared with other judges (see :meth:`for_protocol`); by default its own.
    """

    def __init__(self, cfg: JudgeConfig, cache_dir: str | Path, llm=None, *, members: list | None = None,
                 reply_cache: Path | None = None, budget: JudgeBudget | None = None):
        self.cfg = cfg
        self.cache_dir = cache_dir
        self.protocol = PROTOCOLS[cfg.protocol]
        self.template: Template = load_template(cfg.template or default_template(cfg, cache_dir))
        self.llm = llm if llm is not None else load_llm(cfg.llm, cache_dir, reply_cache)
        if members is None:
            members = [load_llm(m, cache_dir, reply_cache) for m in cfg.ensemble]
        if len(members) != len(cfg.ensemble):
            raise ValueError(f"got {len(members)} ensemble LLMs for {len(cfg.ensemble)} judge.ensemble entries")
        self.judges = [JudgeLLM(self.llm, cfg.llm.max_new_tokens)] + [
            JudgeLLM(m, c.max_new_tokens) for m, c in zip(members, cfg.ensemble)]
        self.budget = budget if budget is not None else JudgeBudget(cfg)
        self._by_protocol: dict[str, CaptionJudge] = {cfg.protocol: self}
        self._check_llms()

    def for_protocol(self, protocol: str) -> CaptionJudge:
        """This judge for ``protocol`` (with that protocol's own template when it is not
        ``judge.protocol``), made once per protocol. It shares this judge's LLMs - loaded once,
        behind the same reply cache, so judging the same answers again sends nothing - and its
        budget: one spend, one set of ceilings for everything judged in a process."""
        if protocol not in self._by_protocol:
            cfg = protocol_config(self.cfg, protocol)
            self._by_protocol[protocol] = CaptionJudge(cfg, self.cache_dir, llm=self.llm, budget=self.budget,
                                                       members=[jl.llm for jl in self.judges[1:]])
        return self._by_protocol[protocol]

    def _check_llms(self) -> None:
        """Refuse judge LLMs that cannot do what the config asks, before any request is sent."""
        cfg = self.cfg
        if cfg.mode != "generate" and not isinstance(getattr(self.llm, "llm", self.llm), HFChatLLM):  # may be cached
            raise ValueError(f"judge.mode={cfg.mode} needs judge.llm.backend=hf (it reads the model's logits)")
        keys = [j.key for j in self.judges]
        if len(set(keys)) != len(keys):
            raise ValueError(f"judge.ensemble repeats a judge already used: {keys}")
        if cfg.evidence == "frames":
            blind = [j.key for j in self.judges if not hasattr(j.llm, "chat_messages")]
            if blind:
                raise ValueError(f"judge.evidence=frames sends images, which only the openai backend supports "
                                 f"(a vision model behind an OpenAI-compatible endpoint); {blind} cannot take them")
        if cfg.max_cost_usd is not None:
            unpriced = sorted({j.llm.model_id for j in self.judges} - set(cfg.price_per_million))
            if unpriced:
                raise ValueError(f"judge.max_cost_usd needs judge.price_per_million for {unpriced}")

    @property
    def model_id(self) -> str:
        """The judge's identity pinned in every Judgment: the model, or ``ensemble(k1,k2,..)``."""
        if len(self.judges) == 1:
            return self.llm.model_id
        return "ensemble(" + ",".join(j.key for j in self.judges) + ")"

    @property
    def params(self) -> dict:
        """Scoring settings pinned with every judgment. Settings at their defaults are left out,
        so files judged before those settings existed still resume."""
        cfg = self.cfg
        params = {"mode": cfg.mode, "temperature": 0.0, "max_new_tokens": cfg.llm.max_new_tokens,
                  "max_answer_words": cfg.max_answer_words}
        if cfg.protocol != "caption_reward":
            params["protocol"] = cfg.protocol
        if cfg.samples > 1:
            params.update(temperature=cfg.sample_temperature, samples=cfg.samples, aggregate=cfg.aggregate, seed=cfg.seed)
        if cfg.evidence != "caption":
            params.update(evidence=cfg.evidence, frames_num=cfg.frames_num, frames_size=cfg.frames_size)
        return params

    @property
    def batch_size(self) -> int:
        """Items per :meth:`judge` call when judging many (:func:`judge_batch_size`)."""
        return judge_batch_size(self.cfg)

    def render(self, item: JudgeItem) -> str:
        return self.template.render(caption=item.caption, question=item.question, answer=item.reference,
                                    prediction=truncate_words(item.answer, self.cfg.max_answer_words))

    # -- judging ---------------------------------------------------------------------------
    def judge(self, items: list[JudgeItem]) -> list[Judgment]:
        """One Judgment per item, in order. Raises :class:`BudgetExceeded`, sending nothing,
        when the items' first requests would pass a ceiling (``judge_items`` sends only what fits)."""
        if self.affordable(items) < len(items):
            raise BudgetExceeded(self.budget.exhausted)
        prompts = [self.render(it) for it in items]
        if self.cfg.mode != "generate":
            return self._judge_constrained(items, prompts)
        images, unreadable = self._evidence(items)
        asked = [i for i in range(len(items)) if i not in unreadable]
        requests = self._ask(prompts, images, asked)
        self._reask(requests)
        by_item: dict[int, list[_Request]] = {i: [] for i in asked}
        for r in requests:
            by_item[r.item].append(r)
        return [self._record(items[i], prompts[i], failure=unreadable[i], attempts=0) if i in unreadable
                else self._combine(items[i], prompts[i], by_item[i]) for i in range(len(items))]

    def _evidence(self, items: list[JudgeItem]) -> tuple[list[list[bytes]] | None, dict[int, str]]:
        """The frames of each item (evidence=frames; None otherwise) and, by item index, why an
        item's frames could not be read: that item is recorded as failed, the others go on."""
        if self.cfg.evidence != "frames":
            return None, {}
        images, unreadable = [], {}
        for i, it in enumerate(items):
            if it.video is None:
                raise ValueError(f"{it.target_id}: judge.evidence=frames needs the video path (JudgeItem.video)")
            try:
                images.append(load_frames(it.video, self.cfg.frames_num, self.cfg.frames_size))
            except FrameError as e:
                images.append([])
                unreadable[i] = f"frames: {e}"
        return images, unreadable

    def _ask(self, prompts: list[str], images: list[list[bytes]] | None, asked: list[int]) -> list[_Request]:
        """First requests: every judge, every sample, every asked item; one LLM call per
        (judge, sample) so a backend batches the items. The budget was checked by ``affordable``."""
        if not asked:
            return []
        temperature, seeds = self._sampling()
        requests = []
        for jl in self.judges:
            for sample, seed in enumerate(seeds):
                batch = [_Request(i, jl, sample, prompts[i]) for i in asked]
                replies = self._send(jl, [prompts[i] for i in asked], None if images is None else [images[i] for i in asked],
                                     temperature=temperature, max_new_tokens=jl.max_new_tokens, seed=seed,
                                     readable=self._readable)
                for r, reply in zip(batch, replies):
                    r.take(reply, self._parse(reply))
                requests += batch
        return requests

    def _reask(self, requests: list[_Request]) -> None:
        """Re-ask replies that came back but did not parse, up to ``retries`` times. A backend
        that gave up has already retried (``judge --retry-failed`` redoes those later). The
        re-ask is text only even with frames: it asks for the score the previous reply meant."""
        for _ in range(self.cfg.retries):
            redo = [r for r in requests if r.vote is None and r.reply.error is None and r.refused is None]
            if not redo:
                return
            for jl in self.judges:
                group = [r for r in redo if r.judge is jl]
                if not group:
                    continue
                prompts = [r.prompt + self.protocol.reask.format(reply=r.reply.text) for r in group]
                refused = self.budget.refuse(self.budget.plan(jl.llm, prompts, self.protocol.reask_tokens))
                if refused:
                    self.budget.reasks_refused += len({r.item for r in group})
                    for r in group:
                        r.refused = refused
                    continue
                replies = self._send(jl, prompts, None, temperature=0.0, max_new_tokens=self.protocol.reask_tokens, seed=None,
                                     readable=self._readable)
                for r, reply in zip(group, replies):
                    r.take(reply, self._parse(reply))

    def _sampling(self) -> tuple[float, list[int | None]]:
        """(temperature, seeds) of the first requests: one reply is greedy; several are sampled,
        each sample with its own seed."""
        if self.cfg.samples == 1:
            return 0.0, [None]
        return self.cfg.sample_temperature, [self.cfg.seed + s for s in range(self.cfg.samples)]

    def _send(self, jl: JudgeLLM, prompts: list[str], images: list[list[bytes]] | None, *, temperature: float,
              max_new_tokens: int, seed: int | None, readable: Callable[[Reply], bool] | None = None) -> list[Reply]:
        """Every call into a judge LLM goes through here, and is counted by the budget. With
        ``images`` (one list of JPEG frames per prompt) it needs the LLM's ``chat_messages``
        (OpenAI-compatible multimodal messages, openai backend only). Replies that came back but
        are not ``readable`` are removed from the reply cache: a later run asks again instead of
        being served the same unreadable reply."""
        params = {"temperature": temperature, "max_new_tokens": max_new_tokens, "seed": seed}
        requests = prompts if images is None else [chat_messages(p, im) for p, im in zip(prompts, images)]
        replies = jl.llm.chat(requests, **params) if images is None else jl.llm.chat_messages(requests, **params)
        self.budget.spend(jl.llm.model_id, replies)
        forget = getattr(jl.llm, "forget", None)  # only a CachedLLM keeps replies
        if readable is not None and forget is not None:
            unreadable = [q for q, r in zip(requests, replies) if r.error is None and not readable(r)]
            if unreadable:
                forget(unreadable, **params)
        return replies

    def forget(self, items: list[JudgeItem]) -> None:
        """Remove the cached first replies of ``items`` (``judge --retry-failed``): a reply cached
        before it was found unreadable would otherwise be served again and nothing re-asked."""
        if not items or self.cfg.mode != "generate":
            return
        prompts = [self.render(it) for it in items]
        images, unreadable = self._evidence(items)
        requests = prompts if images is None else [
            chat_messages(p, im) for i, (p, im) in enumerate(zip(prompts, images)) if i not in unreadable]
        temperature, seeds = self._sampling()
        for jl in self.judges:
            forget = getattr(jl.llm, "forget", None)
            for seed in seeds if forget is not None else []:
                forget(requests, temperature=temperature, max_new_tokens=jl.max_new_tokens, seed=seed)

    def _parse(self, reply: Reply) -> Vote | None:
        return None if reply.error is not None else self.protocol.parse(reply.text)

    def _readable(self, reply: Reply) -> bool:
        return self._parse(reply) is not None

    # -- one item's judgment ---------------------------------------------------------------
    def _combine(self, item: JudgeItem, prompt: str, requests: list[_Request]) -> Judgment:
        """The item's judgment from all its replies: each judge's valid samples aggregated
        (mean or median), then the mean over the judges that gave any valid score."""
        per_judge = {jl.key: self._aggregate([r.vote.score for r in requests if r.judge is jl and r.vote])
                     for jl in self.judges}
        valid = [s for s in per_judge.values() if s is not None]
        score = round(statistics.fmean(valid), 4) if valid else None
        votes = [r.vote for r in requests if r.vote is not None]
        if len(requests) == 1:
            raw_reply, samples = requests[0].reply.text, []
        else:  # every reply, labelled, and every valid score behind the combined one
            raw_reply = "\n\n".join(f"[{self._label(r)}] {_reply_text(r.reply)}" for r in requests)
            samples = [float(v.score) for v in votes]
        return self._record(
            item, prompt, score=score, failure=None if score is not None else self._failure(requests),
            verdict=_majority([v.verdict for v in votes if v.verdict is not None]), raw_reply=raw_reply,
            score_samples=samples, score_spread=round(statistics.pstdev(samples), 4) if samples else None,
            judge_scores=per_judge if len(self.judges) > 1 else {},
            attempts=sum(r.attempts for r in requests), latency_s=round(sum(r.latency_s for r in requests), 4),
            prompt_tokens=sum(r.prompt_tokens for r in requests), completion_tokens=sum(r.completion_tokens for r in requests))

    def _aggregate(self, scores: list[int]) -> float | None:
        if not scores:
            return None
        if len(scores) == 1:
            return scores[0]
        value = statistics.median(scores) if self.cfg.aggregate == "median" else statistics.fmean(scores)
        return round(value, 4)

    def _failure(self, requests: list[_Request]) -> str:
        errors = [r.reply.error for r in requests if r.reply.error is not None]
        if len(errors) == len(requests):
            return f"judge backend failed: {errors[0]}" if len(requests) == 1 else \
                f"judge backend failed on all {len(requests)} requests: {errors[0]}"
        attempts = sum(r.attempts for r in requests)
        what = f"no {self.protocol.expects} in reply after {attempts} attempt(s)" if len(requests) == 1 else \
            f"no {self.protocol.expects} in any of {len(requests)} replies ({attempts} attempts)"
        if errors:
            what += f"; {len(errors)} backend failure(s): {errors[0]}"
        refused = next((r.refused for r in requests if r.refused), None)
        if refused:
            what += f"; re-ask not sent, budget reached: {refused}"
        return what

    def _label(self, r: _Request) -> str:
        parts = ([r.judge.key] if len(self.judges) > 1 else []) + ([f"sample {r.sample + 1}"] if self.cfg.samples > 1 else [])
        return " ".join(parts)

    def _record(self, item: JudgeItem, prompt: str, **fields) -> Judgment:
        """A Judgment of ``item`` stamped with this judge's identity, template and settings."""
        return Judgment(id=item.target_id, target_id=item.target_id, qa_id=item.qa_id, judge_backend=self.llm.backend,
                        judge_model=self.model_id, template=self.template.name, template_hash=self.template.hash,
                        prompt_hash=short_hash(prompt), params=self.params, **fields)

    def _judge_constrained(self, items: list[JudgeItem], prompts: list[str]) -> list[Judgment]:
        """The reply is the digit distribution after 'Score: '; the score its argmax
        (``constrained``) or its mean (``expected``): always valid, never a parse guess."""
        dists = self.llm.choose(prompts, "Score: ", ["1", "2", "3", "4", "5"])
        self.budget.add(Usage(requests=len(prompts)))  # one forward pass each; no tokens generated
        results = []
        for item, prompt, probs in zip(items, prompts, dists):
            if self.cfg.mode == "expected":
                score = round(sum(int(k) * p for k, p in probs.items()), 4)
            else:
                score = int(max(probs, key=probs.get))
            text = f"Score: {score}  ({self.cfg.mode}; p=" + ", ".join(f"{k}:{v:.3f}" for k, v in probs.items()) + ")"
            results.append(self._record(item, prompt, score=score, raw_reply=text))
        return results

    # -- budget ----------------------------------------------------------------------------
    def affordable(self, items: list[JudgeItem]) -> int:
        """How many of ``items`` (a prefix) the budget still allows, by estimate of their first
        requests; when not all, ``budget.exhausted`` says which ceiling stops them."""
        if not self.budget.limited:
            return len(items)
        planned = Usage()
        for n, item in enumerate(items):
            planned += sum(self.plan_item(item).values(), Usage())
            if self.budget.refuse(planned):
                return n
        return len(items)

    def plan_item(self, item: JudgeItem) -> dict[str, Usage]:
        """Estimated usage of an item's first requests by judge key (every sample; no re-asks)."""
        prompt = self.render(item)
        return {jl.key: self.budget.plan(jl.llm, [prompt] * self.cfg.samples, jl.max_new_tokens) for jl in self.judges}

    # -- pairwise --------------------------------------------------------------------------
    def pairwise_preference(self, item_a: JudgeItem, item_b: JudgeItem) -> PairwiseResult:
        """Ask the main judge LLM (template ``pairwise``, greedy) which of two answers to the same
        question is better, once as (A, B) and once as (B, A); only a verdict both orders agree on
        counts. Two requests, counted by the budget (:class:`BudgetExceeded` before sending when
        they do not fit). The caption is the evidence: evidence=frames is not supported."""
        if item_a.qa_id != item_b.qa_id:
            raise ValueError(f"pairwise_preference compares answers to one question, got {item_a.qa_id} and {item_b.qa_id}")
        if self.cfg.evidence != "caption":
            raise ValueError("pairwise_preference judges from the caption; judge.evidence=frames is not supported")
        main = self.judges[0]
        prompts = [self._render_pair(item_a, item_b), self._render_pair(item_b, item_a)]
        refused = self.budget.refuse(self.budget.plan(main.llm, prompts, main.max_new_tokens))
        if refused:
            raise BudgetExceeded(refused)
        ab, ba = self._send(main, prompts, None, temperature=0.0, max_new_tokens=main.max_new_tokens, seed=None,
                            readable=lambda reply: parse_pairwise(reply.text) is not None)
        verdict_ab, why_ab = _pairwise_verdict(ab, "A", "B", "(A, B)")
        verdict_ba, why_ba = _pairwise_verdict(ba, "B", "A", "(B, A)")
        failures = [w for w in (why_ab, why_ba) if w]
        if failures:
            preference = None
        elif verdict_ab != verdict_ba or verdict_ab == "tie":
            preference = 0
        else:
            preference = 1 if verdict_ab == "A" else -1
        return PairwiseResult(preference, verdict_ab, verdict_ba, ab.text, ba.text, "; ".join(failures) or None,
                              self.llm.model_id, _pairwise_template().hash)

    def _render_pair(self, first: JudgeItem, second: JudgeItem) -> str:
        words = self.cfg.max_answer_words
        return _pairwise_template().render(caption=first.caption, question=first.question, answer=first.reference,
                                           answer_1=truncate_words(first.answer, words),
                                           answer_2=truncate_words(second.answer, words))


@dataclass(frozen=True)
class PairwiseResult:
    """Which of two answers to one question the judge prefers, asked in both orders.

    ``preference``: +1 A better, -1 B better, 0 a tie or the two orders disagree (position
    bias); None when a reply gave no verdict (``failure`` says why). ``verdict_ab`` /
    ``verdict_ba``: 'A', 'B' or 'tie' as read from the (A, B) and (B, A) orders.
    """

    preference: int | None
    verdict_ab: str | None
    verdict_ba: str | None
    reply_ab: str
    reply_ba: str
    failure: str | None
    judge_model: str
    template_hash: str

    @property
    def position_bias(self) -> bool:
        """Both orders gave a verdict, and they differ: the answers' order decided."""
        return None not in (self.verdict_ab, self.verdict_ba) and self.verdict_ab != self.verdict_ba


@cache
def _pairwise_template() -> Template:
    return load_template("pairwise")


def _pairwise_verdict(reply: Reply, first: str, second: str, order: str) -> tuple[str | None, str | None]:
    """('A' | 'B' | 'tie', None) from a reply that showed ``first`` as answer 1, or (None, why)."""
    if reply.error is not None:
        return None, f"judge backend failed on the {order} order: {reply.error}"
    choice = parse_pairwise(reply.text)
    if choice is None:
        return None, f"no 'Better: 1|2|tie' in the {order} reply"
    return {"1": first, "2": second, "tie": "tie"}[choice], None


def _majority(verdicts: list[str]) -> str | None:
    """The most frequent verdict; None when there is none or the top two tie (not a coin flip)."""
    ranked = Counter(verdicts).most_common(2)
    if not ranked or (len(ranked) == 2 and ranked[0][1] == ranked[1][1]):
        return None
    return ranked[0][0]


def _reply_text(reply: Reply) -> str:
    return f"(backend failed: {reply.error})" if reply.error is not None else reply.text


# -- judging many, resumably -----------------------------------------------------------------

@dataclass(frozen=True)
class JudgeIdentity:
    """What a judgment records of the judge that made it."""

    backend: str
    model: str
    protocol: str
    template: str
    template_hash: str
    params: dict

    @classmethod
    def of(cls, judge: CaptionJudge) -> JudgeIdentity:
        return cls(judge.llm.backend, judge.model_id, judge.cfg.protocol, judge.template.name, judge.template.hash, judge.params)


def check_same_judge(judge: CaptionJudge | JudgeIdentity, out: RecordFile[Judgment]) -> None:
    """Resuming must not mix two judges' scores in one file: refuse when the recorded judge,
    template or scoring parameters differ from the current ones."""
    first = next(out.read(), None)
    if first is None:
        return
    judge = judge if isinstance(judge, JudgeIdentity) else JudgeIdentity.of(judge)
    now = (judge.backend, judge.model, judge.template_hash, judge.params)
    was = (first.judge_backend, first.judge_model, first.template_hash, first.params)
    if now != was:
        raise ValueError(f"{out.path}: made by another judge ({was[0]}:{was[1]}, template {was[2]}, {was[3]}); "
                         f"the current one is {now[0]}:{now[1]}, template {now[2]}, {now[3]}. "
                         "Use another run folder or move the file away to judge again.")


def check_evidence(cfg: JudgeConfig, items: list[JudgeItem]) -> None:
    """Refuse, before sending anything, answers whose video has an empty caption under protocol
    caption_reward: the judge would grade them with no evidence and they would become pairs."""
    if cfg.protocol != "caption_reward" or cfg.evidence != "caption" or cfg.allow_missing_caption:
        return
    bare = [it for it in items if not it.caption.strip()]
    if bare:
        first = bare[0]
        row = f"videos.jsonl row {first.video_id}" if first.video_id else f"video {first.video}"
        raise ValueError(f"{row}: empty caption, so answer {first.target_id} (question {first.qa_id}) has no evidence "
                         f"to be judged against ({len(bare)} answer(s) in all). Add the caption, or set "
                         "judge.allow_missing_caption=true to judge them from the question and reference alone.")


def judge_items(judge: CaptionJudge, items: list[JudgeItem], out: RecordFile[Judgment], *,
                batch_size: int | None = None, retry_failed: bool = False, desc: str = "judge") -> list[Judgment]:
    """Judge every item not already judged in ``out``; appends batch by batch (of
    ``judge.batch_size`` items unless ``batch_size`` says otherwise) so a crash loses at most one
    batch. ``retry_failed`` first drops recorded failures so they are judged again, and their
    cached replies so they are asked again.

    Several processes may judge into one ``out`` at once: each claims its batches
    (:class:`~capdpo.records.WorkClaims`), so every item is judged and sent once. Repeated rows
    left by older concurrent runs are dropped; a conflicting one (one id, two judgments) raises.

    When the judge's budget would be passed, the affordable part of the batch is judged and
    saved, then :class:`BudgetExceeded` is raised: nothing judged is lost, and running again
    (with a fresh or larger budget) goes on from there."""
    batch_size = batch_size or judge.batch_size
    check_evidence(judge.cfg, items)
    out.drop_duplicates()
    if retry_failed and out.exists():
        judge.forget(drop_failures(items, out))  # and their cached replies, so they are asked again
    check_same_judge(judge, out)
    judge.budget.exhausted = None  # set again below only if this call hits a ceiling
    by_id = {it.target_id: it for it in items}
    with out.claims() as claims, tqdm(total=len(items), initial=len(claims.done_ids() & by_id.keys()), desc=desc,
                                      unit="answer") as bar:
        while batch_ids := claims.claim(list(by_id), limit=batch_size):
            judged = judge_affordable(judge, [by_id[i] for i in batch_ids])
            out.append(judged)
            bar.update(len(judged))
            if len(judged) < len(batch_ids) or judge.budget.exhausted:
                _stop_for_budget(judge, out, left=len(by_id.keys() - claims.done_ids()))
    return [j for j in out.read() if j.target_id in by_id]


def judge_affordable(judge: CaptionJudge, batch: list[JudgeItem]) -> list[Judgment]:
    """The judgments of the first items of ``batch`` the budget lets the judge send (all of them
    without ceilings): the judge's work on a batch, the same in the local loop and in a ray actor."""
    fits = judge.affordable(batch)
    return judge.judge(batch[:fits]) if fits else []


def drop_failures(items: list[JudgeItem], out: RecordFile[Judgment]) -> list[JudgeItem]:
    """Remove the recorded failures from ``out``; returns the items they judged (whose cached
    replies the judge must forget, :meth:`CaptionJudge.forget`)."""
    with out.lock():
        judgments = out.all()
        failed = {j.target_id for j in judgments if j.failure is not None}
        out.write([j for j in judgments if j.failure is None])
    return [it for it in items if it.target_id in failed]


def _stop_for_budget(judge: CaptionJudge, out: RecordFile[Judgment], left: int) -> None:
    used = judge.budget.used.as_dict()
    refused = judge.budget.reasks_refused
    hint = f"; {refused} answer(s) whose re-ask did not fit are recorded as failed (--retry-failed redoes them)" if refused else ""
    raise BudgetExceeded(f"judge budget reached: {judge.budget.exhausted}. Spent this run: {used}. "
                         f"{left} answer(s) not sent; everything judged is saved in {out.path}{hint}. "
                         "Run again (with a larger limit) to go on.")
