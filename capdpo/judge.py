"""Stage 6: the caption-grounded reward.

A text-only LLM reads the video's detailed caption (its stand-in for the video), the question,
the reference answer and a candidate answer, and replies ``Explanation: ...`` then
``Score: <1-5>``. A score is only ever what the judge said: a reply that does not parse is
re-asked, then recorded as a failure with its reason - never turned into a number.
"""

from __future__ import annotations

import ast
import json
import logging
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from capdpo.config import JudgeConfig
from capdpo.llm import HFChatLLM, load_llm
from capdpo.prompts import Template, load_template, short_hash
from capdpo.records import Candidate, Judgment, QAItem, RecordFile, Video

log = logging.getLogger(__name__)

SCORE_RANGE = (1, 5)
REASK = ("\n\nYour previous reply was:\n{reply}\n\nIt did not end with a valid score. "
         "Reply with exactly one line: Score: <one integer from 1 to 5>")

# "Score: 4", "**Score:** 4", "score = 4/5", "Rating: 4 out of 5", "Score (1-5): 4". The number is
# captured with any decimal part or sign so that "4.5", "6" or "-1" are seen - and then rejected,
# not rounded; a range such as "4-5" is no single score (and "(1-5)" is the scale, not a score).
_SCORE_LINE = re.compile(r"(?:score|rating)(?:\s*\(\s*(?:\d+\s*(?:-|–|to)\s*(\d+)|out of\s*(\d+))\s*\))?"
                         r"\W{0,6}?(?:is\s*)?[:=]?\s*\**\s*(-?\d+(?:\.\d+)?)(?!\.?\d|\s*(?:-|–|to)\s*\d)"
                         r"\s*(?:/\s*(\d+)|out of\s*(\d+))?",
                         re.IGNORECASE)
_MAPPING = re.compile(r"\{[^{}]*\}", re.DOTALL)


def parse_reward(text: str, low: int = SCORE_RANGE[0], high: int = SCORE_RANGE[1]) -> int | None:
    """The integer score a judge reply states, or None when it states no single valid one.

    Accepts a JSON or Python-dict object with a ``score`` key, or a ``Score: N`` line (markdown
    emphasis, ``N/5`` and ``N out of 5`` allowed). Rejects out-of-range, fractional and
    conflicting scores: None means "ask again or record a failure", never "guess".
    """
    if not text or not text.strip():
        return None
    found = set()  # every score stated, in a mapping or a line; more than one value is a conflict
    for blob in _MAPPING.findall(text):
        obj = _load_mapping(blob)
        if obj is not None:
            for key, value in obj.items():
                if str(key).lower() in ("score", "rating"):
                    found.add(_valid(value, low, high))
    for m in _SCORE_LINE.finditer(text):
        number, scales = m.group(3), [s for s in m.group(1, 2, 4, 5) if s is not None]
        if any(int(s) != high for s in scales):
            return None  # "3/10" is on another scale; rescaling would invent precision
        found.add(_valid(number, low, high))
    if len(found) == 1:
        return found.pop()
    return None


def _load_mapping(blob: str) -> dict | None:
    for loader in (json.loads, ast.literal_eval):
        try:
            obj = loader(blob)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            continue
        if isinstance(obj, dict):
            return obj
    return None


def _valid(value: object, low: int, high: int) -> int | None:
    try:
        number = float(str(value).strip())
    except ValueError:
        return None
    if not number.is_integer() or not low <= number <= high:
        return None
    return int(number)


@dataclass(frozen=True)
class JudgeItem:
    """One answer to grade, with everything the prompt needs."""

    target_id: str
    qa_id: str
    caption: str
    question: str
    reference: str
    answer: str


def truncate_words(text: str, max_words: int) -> str:
    words = text.split()
    return text if len(words) <= max_words else " ".join(words[:max_words])


class CaptionJudge:
    """Scores answers with the caption-reward template through a chat LLM."""

    def __init__(self, cfg: JudgeConfig, cache_dir: str | Path, llm=None):
        self.cfg = cfg
        self.template: Template = load_template(cfg.template)
        self.llm = llm if llm is not None else load_llm(cfg.llm, cache_dir)
        if cfg.mode != "generate" and not isinstance(self.llm, HFChatLLM):
            raise ValueError(f"judge.mode={cfg.mode} needs judge.llm.backend=hf (it reads the model's logits)")

    @property
    def model_id(self) -> str:
        return self.llm.model_id

    def render(self, item: JudgeItem) -> str:
        return self.template.render(caption=item.caption, question=item.question, answer=item.reference,
                                    prediction=truncate_words(item.answer, self.cfg.max_answer_words))

    def judge(self, items: list[JudgeItem]) -> list[Judgment]:
        prompts = [self.render(it) for it in items]
        if self.cfg.mode != "generate":
            return [self._constrained_judgment(it, p, probs)
                    for it, p, probs in zip(items, prompts, self.llm.choose(prompts, "Score: ", ["1", "2", "3", "4", "5"]))]
        replies = self.llm.chat(prompts, temperature=0.0, max_new_tokens=self.cfg.llm.max_new_tokens)
        results = [self._judgment(it, p, r.text, parse_reward(r.text), 1, r.latency_s) for it, p, r in zip(items, prompts, replies)]
        for attempt in range(2, self.cfg.retries + 2):
            redo = [i for i, j in enumerate(results) if j.score is None]
            if not redo:
                break
            reasks = [prompts[i] + REASK.format(reply=results[i].raw_reply) for i in redo]
            for i, r in zip(redo, self.llm.chat(reasks, temperature=0.0, max_new_tokens=16)):
                results[i] = self._judgment(items[i], prompts[i], r.text, parse_reward(r.text), attempt,
                                            results[i].latency_s + r.latency_s)
        return results

    def _judgment(self, item: JudgeItem, prompt: str, reply: str, score: float | None, attempts: int, latency: float) -> Judgment:
        failure = None if score is not None else f"no valid score 1-5 in reply after {attempts} attempt(s)"
        return Judgment(id=item.target_id, target_id=item.target_id, qa_id=item.qa_id, score=score, failure=failure,
                        raw_reply=reply, judge_backend=self.llm.backend, judge_model=self.model_id,
                        template=self.template.name, template_hash=self.template.hash, prompt_hash=short_hash(prompt),
                        attempts=attempts, latency_s=round(latency, 4))

    def _constrained_judgment(self, item: JudgeItem, prompt: str, probs: dict[str, float]) -> Judgment:
        """The reply is the digit distribution after 'Score: '; the score its argmax
        (``constrained``) or its mean (``expected``): always valid, never a parse guess."""
        if self.cfg.mode == "expected":
            score = round(sum(int(k) * p for k, p in probs.items()), 4)
        else:
            score = int(max(probs, key=probs.get))
        reply = f"Score: {score}  ({self.cfg.mode}; p=" + ", ".join(f"{k}:{v:.3f}" for k, v in probs.items()) + ")"
        return self._judgment(item, prompt, reply, score, 1, 0.0)


def candidate_items(videos: dict[str, Video], qa: dict[str, QAItem], candidates: Iterable[Candidate]) -> Iterator[JudgeItem]:
    for c in candidates:
        q = qa[c.qa_id]
        yield JudgeItem(c.id, c.qa_id, videos[q.video_id].caption, q.question, q.answer, c.answer)


def judge_items(judge: CaptionJudge, items: list[JudgeItem], out: RecordFile[Judgment], *,
                batch_size: int = 8, retry_failed: bool = False, desc: str = "judge") -> list[Judgment]:
    """Judge every item not already judged in ``out``; appends batch by batch so a crash loses at
    most one batch. ``retry_failed`` first drops recorded failures so they are judged again."""
    if retry_failed and out.exists():
        out.write([j for j in out.read() if j.failure is None])
    done = out.ids()
    todo = [it for it in items if it.target_id not in done]
    with tqdm(total=len(items), initial=len(items) - len(todo), desc=desc, unit="answer") as bar:
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            out.append(judge.judge(batch))
            bar.update(len(batch))
    wanted = {it.target_id for it in items}
    return [j for j in out.read() if j.target_id in wanted]


def run_judge(videos_file: RecordFile[Video], qa_file: RecordFile[QAItem], candidates_file: RecordFile[Candidate],
              out: RecordFile[Judgment], cfg: JudgeConfig, cache_dir: str | Path, *, retry_failed: bool = False) -> list[Judgment]:
    """The ``judge`` stage: score every candidate answer."""
    items = list(candidate_items(videos_file.by_id(), qa_file.by_id(), candidates_file.read()))
    judge = CaptionJudge(cfg, cache_dir)
    judgments = judge_items(judge, items, out, batch_size=cfg.llm.batch_size, retry_failed=retry_failed)
    failed = sum(j.failure is not None for j in judgments)
    if failed:
        log.warning("%d of %d judgments failed (recorded with their reason in %s)", failed, len(judgments), out.path)
    return judgments
