"""Scoring multiple-choice answers, and the numbers of one evaluation.

    rows = score_predictions("videomme", "official", items_by_id, rows)        # extracted, correct
    summary = summarize_mc("after", "videomme", items, rows, ...)              # the summary.jsonl row

``accuracy`` is over every item whose video could be read (an unanswered item is wrong);
``accuracy_answered`` over the items an answer was read from (Video-MME's official denominator,
and lmms-eval's MVBench one). Items whose video is missing or unreadable are counted apart
(``skipped``) and left out of both. Each comes with a percentile-bootstrap 95% interval over the
items (capdpo.stats), overall and per value of each category field.

TempCompass: its rules first; with a judge (``judge``: any chat LLM, the run's), each answer the
rules cannot read is put to it with the official evaluation prompt and its "Correct"/"Incorrect"
decides (``decided_by_judge``); without one a rule miss is unanswered - the official ``--disable_llm``.
Captioning has no rules: it is scored only with a judge, which answers the multi-choice question
from the model's caption (the official protocol).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from pydantic import ValidationError

from capdpo.evaluation.mc.extract import extract
from capdpo.evaluation.mc.items import MCItem
from capdpo.evaluation.mc.prompts import tempcompass_judge_prompt
from capdpo.records import CategoryScore, EvalSummary, MCPrediction, RecordError, first_error, read_jsonl
from capdpo.stats import bootstrap_mean

RESAMPLES = 1000
JUDGE_TOKENS = 128  # the official judge calls' max_tokens


class JudgeNeeded(ValueError):
    """TempCompass captioning has no rules: only a judge scores it."""


def judge_rating(reply: str) -> bool | None:
    """TempCompass's ``llm_output_to_rating``: a reply starting with "Correct" is right, with
    "Incorrect" wrong; else "Correct" without "Incorrect" is right, any "Incorrect" wrong; a reply
    with neither is no decision (None; the official script asks again)."""
    if reply.startswith("Correct"):
        return True
    if reply.startswith("Incorrect"):
        return False
    if "Incorrect" in reply:
        return False
    return True if "Correct" in reply else None


def captioning_rating(reply: str, mc_answer: str) -> bool | None:
    """TempCompass's ``parse_llm_output`` for captioning: the judge's "Answer:" line (its whole reply
    without one) is right when it starts with the reference's letter ("B. ...") and names exactly one
    of "A." - "D."; an empty reply is no decision (None)."""
    if not reply.strip():
        return None
    said = reply
    for line in reply.split("\n"):
        if "Answer" in line.strip():
            said = line.strip().replace("Answer:", "").strip()
    named = sum(said.count(f"{x}.") for x in "ABCD")
    return said.split(". ")[0] == mc_answer.split(". ")[0] and named == 1


def score_rules(benchmark: str, extractor: str, item: MCItem, answer: str) -> tuple[str, bool]:
    """(the letter ``extractor`` reads from ``answer``, whether it is the item's answer)."""
    letter = extract(benchmark, extractor, item, answer)
    return letter, letter == item.answer


def score_predictions(benchmark: str, extractor: str, items: Mapping[str, MCItem], rows: Sequence[MCPrediction],
                      judge=None) -> list[MCPrediction]:
    """``rows`` scored again from their answers: ``extracted`` and ``correct`` by the extractor, and
    for TempCompass with ``judge`` the rule misses by the judge (one batch of requests; a cached
    judge LLM answers a repeated scoring without a request). Rows with an error stay as they are."""
    scored: list[MCPrediction] = []
    ask: list[tuple[int, MCItem, str]] = []  # (index in scored, item, prompt) for the judge
    for row in rows:
        item = items[row.id]
        if row.error is not None:
            scored.append(row)
            continue
        extracted, correct = score_rules(benchmark, extractor, item, row.answer)
        if item.task == "captioning" and judge is None:
            raise JudgeNeeded("TempCompass captioning is scored by an LLM answering multi-choice.json's question from the "
                              "model's caption (the official protocol has no rules for it): pass --llm-judge to use the "
                              "run's judge")
        scored.append(row.model_copy(update={"extracted": extracted, "correct": correct, "decided_by_judge": False,
                                             "judge_reply": None}))
        if judge is not None and benchmark == "tempcompass" and not extracted:
            ask.append((len(scored) - 1, item, tempcompass_judge_prompt(item, row.answer)))
    if ask:
        replies = judge.chat([prompt for _, _, prompt in ask], temperature=0.0, max_new_tokens=JUDGE_TOKENS)
        for (k, item, _), reply in zip(ask, replies):
            text = reply.text or ""
            rating = captioning_rating(text, item.judge_answer) if item.task == "captioning" else judge_rating(text)
            scored[k] = scored[k].model_copy(update={"judge_reply": text, "decided_by_judge": rating is not None,
                                                     "correct": bool(rating)})
    return scored


def scoring_name(judge=None) -> str:
    """What decided correctness: the rules, or the rules and a judge for what they cannot read."""
    return "rules" if judge is None else f"rules, judge {judge.backend}:{judge.model_id} for rule misses"


def read_answers(path: str | os.PathLike) -> dict[str, MCPrediction]:
    """The answers of a predictions file to score again (``--predictions``): rows of this form -
    at least ``id`` and ``answer`` (or ``error``); their scoring fields are recomputed."""
    answers: dict[str, MCPrediction] = {}
    keep = ("id", "answer", "error", "model", "frames", "pixels", "categories")
    for lineno, row in read_jsonl(Path(path)):
        if "answer" not in row and row.get("error") is None:
            raise RecordError(f"{path}:{lineno}: a prediction needs 'id' and 'answer' (or 'error')")
        try:
            prediction = MCPrediction.model_validate({k: row[k] for k in keep if k in row})
        except ValidationError as e:
            raise RecordError(f"{path}:{lineno}: malformed prediction: {first_error(e)}") from None
        if prediction.id in answers and answers[prediction.id] != prediction:
            raise RecordError(f"{path}:{lineno}: id {prediction.id!r} appears twice with different answers")
        answers[prediction.id] = prediction
    return answers


# -- numbers -----------------------------------------------------------------------------------

def _accuracy(correct: list[bool], resamples: int, seed: int) -> tuple[float | None, float | None, float | None]:
    return bootstrap_mean([float(c) for c in correct], resamples, seed) if correct else (None, None, None)


def category_scores(items: Sequence[MCItem], rows: Mapping[str, MCPrediction], fields: Sequence[str],
                    resamples: int = RESAMPLES, seed: int = 0) -> dict[str, dict[str, CategoryScore]]:
    """Accuracy of each value of each category field, with its bootstrap interval, over the items
    whose video could be read."""
    out: dict[str, dict[str, CategoryScore]] = {}
    for name in fields:
        groups: dict[str, list[MCPrediction]] = {}
        for item in items:
            row = rows.get(item.id)
            if row is not None and row.error is None and name in item.categories:
                groups.setdefault(item.categories[name], []).append(row)
        if groups:
            out[name] = {}
            for value in sorted(groups):
                acc, low, high = _accuracy([r.correct for r in groups[value]], resamples, seed)
                out[name][value] = CategoryScore(items=len(groups[value]), answered=sum(r.answered for r in groups[value]),
                                                 accuracy=acc, low=low, high=high)
    return out


def summarize_mc(tag: str, dataset: str, items: Sequence[MCItem], rows: Mapping[str, MCPrediction], *, model: str,
                 categories: Sequence[str], extractor: str, prompt: str, prompt_hash: str, scoring: str, round_: int = 1,
                 resamples: int = RESAMPLES, seed: int = 0) -> EvalSummary:
    """The summary row of one multiple-choice evaluation of ``items`` (``rows``: their predictions
    by id; an item without one was not evaluated and counts as skipped, like an unreadable video)."""
    done = [rows[item.id] for item in items if item.id in rows and rows[item.id].error is None]
    answered = [r for r in done if r.answered]
    accuracy, low, high = _accuracy([r.correct for r in done], resamples, seed)
    return EvalSummary(
        id=f"{dataset}/{tag}", tag=tag, dataset=dataset, protocol="multiple_choice", round=round_, model=model,
        questions=len(items), judged=len(answered), skipped=len(items) - len(done), accuracy=accuracy,
        accuracy_answered=sum(r.correct for r in answered) / len(answered) if answered else None,
        accuracy_low=low, accuracy_high=high, categories=category_scores(items, rows, categories, resamples, seed),
        frames=sorted({r.frames for r in done if r.frames}), pixels=sorted({r.pixels for r in done if r.pixels}),
        prompt=prompt, prompt_hash=prompt_hash, extractor=extractor, scoring=scoring,
    )


def format_mc_summary(s: EvalSummary) -> str:
    """One line per evaluation: the numbers, then what made them (extractor, prompt, frames, pixels)."""
    def pct(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.1%}"

    interval = f" [{pct(s.accuracy_low)}, {pct(s.accuracy_high)}]" if s.accuracy_low is not None else ""
    where = f"round {s.round} " if s.round > 1 else ""
    skipped = f", {s.skipped} without a readable video" if s.skipped else ""
    return (f"{where}{s.dataset}/{s.tag}: accuracy {pct(s.accuracy)}{interval} over {s.questions - s.skipped} items, "
            f"{pct(s.accuracy_answered)} of the {s.judged} answered{skipped} | extractor {s.extractor}, {s.scoring}, "
            f"prompt {s.prompt} {s.prompt_hash}, frames {','.join(map(str, s.frames)) or '-'}, "
            f"pixels/frame {','.join(map(str, s.pixels)) or '-'}")
