"""Answer extractors: the text a model wrote -> the option letter it chose, '' when none can be read.

    extract("videomme", "official", item, "Based on the video, the answer is C.")   # -> "B"
    extract("videomme", "lmms-eval", item, "Based on the video, the answer is C.")  # -> "C"

Two families, chosen by name (``capdpo evaluate --extractor``):

- ``official``: each benchmark's own scorer, ported line by line - Video-MME's
  ``extract_characters_regex`` (BradyFU/Video-MME ``evaluation/eval_your_results.py``), MVBench's
  ``check_ans`` (OpenGVLab/Ask-Anything ``video_chat2/mvbench.ipynb``), TempCompass's matching rules
  (llyx97/TempCompass ``eval_multi-choice.py``, ``eval_yes_no.py``, ``eval_caption_matching.py``).
  NExT-QA and PerceptionTest publish no rule for free-text answers (their official metrics compare
  option indices), so their ``official`` is capdpo's strict rule :func:`leading_letter`.
- ``lmms-eval``: what lmms-eval 0.7.3 (the PyPI wheel) does for the same benchmark -
  ``extract_mcq_answer`` (``tasks/_task_utils/mcq_extract.py``) for Video-MME, ``mcq_acc`` for
  MVBench, its copies of TempCompass's rules, the MMMU parser for NExT-QA and a ``\\b[A-D]\\b`` search
  for PerceptionTest.

Every extractor is a pure function of the answer (and the item's options). None ever guesses:
where lmms-eval's NExT-QA parser falls back to ``random.choice``, this port returns '' - the item
is unanswered, wrong in ``accuracy`` and left out of ``accuracy_answered``. The two families
disagree on verbose answers - "Based on the video, the answer is C." is B officially (the capital B
of "Based") and C in lmms-eval 0.7.3 - so every number records the extractor that made it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from capdpo.evaluation.mc.items import MCItem

EXTRACTORS = ("official", "lmms-eval")


# -- Video-MME, official ---------------------------------------------------------------------------

# eval_your_results.py's prefixes, removed before the search. The original list lacks two commas, so
# Python joins "The best option is" with "The correct option is", and "Best answer:" with "Best
# option:": those four phrases are never removed on their own, only fused, as here.
VIDEOMME_PREFIXES = ("The best answer is", "The correct answer is", "The answer is", "The answer",
                     "The best option isThe correct option is", "Best answer:Best option:")


def videomme_official(answer: str, letters: str = "ABCD") -> str:
    """Video-MME's ``extract_characters_regex``: strip, remove the answer prefixes (case-sensitive),
    then the first capital option letter anywhere in what is left (so "Based on ..." reads B). Its
    other rule - more than 10 words and no letter gives '' - gives what the search gives anyway."""
    s = answer.strip()
    for prefix in VIDEOMME_PREFIXES:
        s = s.replace(prefix, "")
    match = re.search(f"[{letters}]", s)
    return match[0] if match else ""


# -- MVBench, official -----------------------------------------------------------------------------

def mvbench_official(answer: str, letters: str) -> str:
    """MVBench's ``check_ans``: the answer was prefilled with "Best option:(", so the prediction is
    "(" + the first line of the answer; its first space-separated token, lower-cased and without
    ".", names option X when it lies inside "(x)" or "(x)" lies inside it ("A) ...", "A", "B." all
    read). A token inside several options - the bare "(" of an empty answer - is one the notebook
    counts right whatever the answer is; here it is unanswered."""
    first_line = answer.strip().split("\n")[0]
    token = ("(" + first_line).lower().split(" ")[0]
    chosen = [x for x in letters if token.replace(".", "") in f"({x.lower()})" or f"({x.lower()})" in token]
    return chosen[0] if len(chosen) == 1 else ""


# -- TempCompass, official and lmms-eval 0.7.3 --------------------------------------------------------

def tempcompass_rules(answer: str, item: MCItem, *, lmms_eval: bool = False) -> str:
    """TempCompass's matching rules for the item's task (``--disable_llm``: what they cannot read is
    unanswered). multi-choice: the whole answer line, a bare letter A-D, or "A." / "A)" at the start;
    yes_no: starts with "yes" / "no" (any case); caption_matching: the answer is an option line, its
    sentence (also after "X) "), or its label ("Option 1", "Sentence A"; with ``lmms_eval`` also the
    bare "1" / "A" lmms-eval 0.7.3 added); captioning: never (a judge reads the caption)."""
    pred = answer.replace("</s>", "")
    if item.task == "multi-choice":
        if pred == item.answer_text:
            return item.answer
        if pred in ("A", "B", "C", "D"):
            return pred
        for mark in (".", ")"):
            if any(pred.startswith(f"{x}{mark}") for x in "ABCD"):
                return pred.split(mark)[0]
        return ""
    if item.task == "yes_no":
        lowered = pred.lower()
        return "A" if lowered.startswith("yes") else "B" if lowered.startswith("no") else ""
    if item.task == "caption_matching":
        return _caption_match(pred, item, lmms_eval)
    return ""


def _caption_match(pred: str, item: MCItem, lmms_eval: bool) -> str:
    """``eval_rule`` of eval_caption_matching.py: the option the answer matches (the last rule that
    matches wins, as there), as its letter."""
    lines = item.question.split("\n")[1:]
    sentences = [line.split(": ")[1] for line in lines]
    labels = [line.split(": ")[0] for line in lines]
    chosen = None
    for i, line in enumerate(lines):
        if line == pred:
            chosen = i
    for i, sentence in enumerate(sentences):
        if sentence == pred or (") " in pred and sentence == pred.split(") ")[1]):
            chosen = i
    # lmms-eval 0.7.3 also takes the bare label: "Sentence A" -> "A", "Option 1" -> "1"
    short = [label.replace("Sentence ", "").replace("Option ", "").replace("Caption ", "") for label in labels]
    short = short if lmms_eval else []
    for i, label in enumerate(labels + short):
        if label == pred or label == pred.replace(".", ""):
            chosen = i % len(labels)
    return "" if chosen is None else item.letters[chosen]


# -- NExT-QA and PerceptionTest, official: capdpo's strict rule ---------------------------------------

_LEADING = re.compile(r"^(?:\(([A-Z])\)|([A-Z])(?:[.:)]|$))")  # "(B) ...", or "B" then ".", ":", ")" or nothing


def _normal(text: str) -> str:
    return re.sub(r"[^a-z0-9 ]", "", text.lower()).strip()


def leading_letter(answer: str, item: MCItem) -> str:
    """capdpo's rule where a benchmark has none for free text: the answer is an option letter alone
    or marked as one at its start ("B", "B.", "B)", "(B)", "B: ...", "B. the cat"), or is exactly one
    option's text (case and punctuation aside). "A man ..." is not A; anything else is unanswered."""
    text = answer.strip()
    match = _LEADING.match(text)
    if match and (match.group(1) or match.group(2)) in item.letters:
        return match.group(1) or match.group(2)
    said = _normal(text)
    same = [x for x, option in zip(item.letters, item.options) if said and said == _normal(option)]
    return same[0] if len(same) == 1 else ""


# -- lmms-eval 0.7.3: extract_mcq_answer (Video-MME, and the synthetic suite) ---------------------------

_ANSWER_PHRASES = ("the answer is", "answer is", "the correct answer is", "correct answer is", "the best answer is",
                   "best answer is", "the correct option is", "correct option is", "the best option is", "best option is",
                   "the choice is", "choice is", "the correct choice is", "correct choice is", "i choose", "i select",
                   "i pick", "my answer is", "my choice is", "옵션", "정답은", "답은", "답:", "答案是", "答案为", "选", "答えは")
_PRIORITY = {"start": 10, "end": 9, "phrase": 7, "parentheses": 6, "period": 5, "colon": 4, "right_paren": 3, "space": 2,
             "fallback": 0}


def lmms_extract_mcq_answer(response: str, choices: Sequence[str] = tuple("ABCDEFGH")) -> str:
    """lmms-eval 0.7.3's ``extract_mcq_answer``: candidates in several formats ("(B)", "B.", "B:",
    "B)", "B ", an answer phrase then the next capital choice letter, a letter at the start or the
    end), the highest-priority format wins and within it the last position; with no candidate, the
    last occurrence of any capital choice letter anywhere (deterministic, not random)."""
    if not response or not response.strip():
        return ""
    text = response.strip()
    for char in (",", ".", "!", "?", ";", ":", "'", '"'):
        text = text.strip(char)
    text = " " + text + " "
    candidates: list[tuple[str, int, str]] = []
    for ch in choices:
        for form, name in ((f"({ch})", "parentheses"), (f"{ch}.", "period"), (f"{ch}:", "colon"), (f"{ch})", "right_paren"),
                           (f"{ch} ", "space")):
            if form in text:
                candidates.append((ch, text.rfind(form), name))
    lowered = text.lower()
    for phrase in _ANSWER_PHRASES:
        at = lowered.find(phrase)
        if at != -1:
            for ch in choices:
                found = text.find(ch, at + len(phrase))
                if found != -1:
                    candidates.append((ch, found, "phrase"))
    stripped = text.strip()
    for ch in choices:
        if stripped.startswith(ch) and (len(stripped) == 1 or not stripped[1].isalpha()):
            candidates.append((ch, 0, "start"))
        if stripped.endswith(ch) and (len(stripped) == 1 or not stripped[-2].isalpha()):
            candidates.append((ch, len(text) - 1, "end"))
    if not candidates:
        candidates = [(ch, text.rfind(ch), "fallback") for ch in choices if ch in text]
    if not candidates:
        return ""
    candidates.sort(key=lambda c: (_PRIORITY[c[2]], c[1]), reverse=True)
    return candidates[0][0]


# -- lmms-eval 0.7.3: MVBench's mcq_acc ------------------------------------------------------------

_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
_PUNCT = (";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")


def _process_punctuation(text: str) -> str:
    out = text
    for p in _PUNCT:
        if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    # lmms-eval passes re.UNICODE (32) where Pattern.sub takes count: at most 32 periods go
    return _PERIOD_STRIP.sub("", out, re.UNICODE)


def lmms_mvbench(answer: str) -> str:
    """lmms-eval 0.7.3's MVBench ``mcq_acc`` reading of a prediction: "X. text" at the start gives
    X (A-E); else, after its punctuation clean-up and lower-casing, the first standalone letter a-e
    anywhere - so the article in "a man" reads A."""
    match = re.match(r"^([A-E])\.\s*(.+)$", answer.strip(), re.IGNORECASE)
    if match:
        return match.group(1).upper()
    text = answer.replace("\n", " ").replace("\t", " ").strip()
    text = _process_punctuation(text)
    text = text.strip("'").strip('"').strip(")").strip("(").strip().lower()
    letter = re.search(r"\b([A-E])\b", text, re.IGNORECASE)
    return letter.group(1).upper() if letter else ""


# -- lmms-eval 0.7.3: NExT-QA's MMMU parser, PerceptionTest's search ------------------------------------

def lmms_mmmu(answer: str, item: MCItem) -> str:
    """lmms-eval 0.7.3's ``parse_multi_choice_response`` (from MMMU) for NExT-QA: "(X)", then "X ",
    then "X." anywhere; for an answer of more than 5 words, an option's text inside it; of several
    candidates the last one in the text. Where lmms-eval then picks ``random.choice``, '' here."""
    response = answer
    for char in (",", ".", "!", "?", ";", ":", "'"):
        response = response.strip(char)
    response = " " + response + " "
    letters = list(item.letters)
    by_index = True  # candidates found by their letter; False: by their option's text
    candidates = [x for x in letters if f"({x})" in response]
    bracketed = bool(candidates)
    if not candidates:
        candidates = [x for x in letters if f"{x} " in response]
    if not candidates:
        candidates = [x for x in letters if f"{x}." in response]
    if not candidates and len(response.split()) > 5:
        candidates = [x for x, option in zip(letters, item.options) if option.lower() in response.lower()]
        by_index = False
    if not candidates:
        return ""
    if len(candidates) == 1:
        return candidates[0]
    if not by_index:
        starts = [response.lower().rfind(item.options[letters.index(x)].lower()) for x in candidates]
    elif bracketed:
        starts = [response.rfind(f"({x})") for x in candidates]
    else:
        starts = [response.rfind(f" {x} ") for x in candidates]
    return candidates[max(range(len(candidates)), key=lambda k: (starts[k], -k))]


def lmms_perceptiontest(answer: str) -> str:
    """lmms-eval 0.7.3's PerceptionTest reading: the first standalone capital A-D."""
    match = re.search(r"\b([A-D])\b", answer.strip())
    return match.group(1) if match else ""


# -- dispatch ----------------------------------------------------------------------------------------

_OFFICIAL: dict[str, Callable[[str, MCItem], str]] = {
    "videomme": lambda a, item: videomme_official(a, item.letters),
    "mvbench": lambda a, item: mvbench_official(a, item.letters),
    "tempcompass": lambda a, item: tempcompass_rules(a, item),
    "nextqa": leading_letter,
    "perceptiontest": leading_letter,
    "synthetic_mc": lambda a, item: videomme_official(a, item.letters),  # asked with Video-MME's prompt
}
_LMMS_EVAL: dict[str, Callable[[str, MCItem], str]] = {
    "videomme": lambda a, item: lmms_extract_mcq_answer(a, list(item.letters)),
    "mvbench": lambda a, item: lmms_mvbench(a),
    "tempcompass": lambda a, item: tempcompass_rules(a, item, lmms_eval=True),
    "nextqa": lmms_mmmu,
    "perceptiontest": lambda a, item: lmms_perceptiontest(a),
    "synthetic_mc": lambda a, item: lmms_extract_mcq_answer(a, list(item.letters)),
}


def check_extractor(extractor: str) -> str:
    if extractor not in EXTRACTORS:
        raise ValueError(f"unknown extractor {extractor!r}; choose {' or '.join(EXTRACTORS)}")
    return extractor


def extract(benchmark: str, extractor: str, item: MCItem, answer: str) -> str:
    """The option letter ``answer`` chooses by ``extractor``'s rule for ``benchmark``; '' = unanswered.

    A letter may lie outside the item's options where the benchmark's own rule reads one (Video-MME's
    D for a three-option item cannot happen; TempCompass's bare "D" to three options can): it is
    then answered and wrong, as there."""
    table = _OFFICIAL if check_extractor(extractor) == "official" else _LMMS_EVAL
    if benchmark not in table:
        raise ValueError(f"no {extractor} extractor for benchmark {benchmark!r}")
    return table[benchmark](answer, item)
