"""Stage 3: question-answer pairs from captions (method.md step 3).

With ``qa.source=given`` the QA that ships with a video is used (exact for synthetic clips) and an
LLM writes QA only for videos without any; with ``llm`` every caption goes to the LLM. A reply
that does not parse to exactly ``per_caption`` pairs is dropped, as in the paper, and counted.
"""

from __future__ import annotations

import logging
import re

from tqdm import tqdm

from capdpo.config import QAConfig
from capdpo.llm import load_llm
from capdpo.prompts import load_template
from capdpo.records import QAItem, RecordFile, Video

log = logging.getLogger(__name__)
_ITEM = re.compile(r"^\s*\**\s*([QA])(\d+)\s*\**\s*[:.)]\s*\**\s*(.*)$", re.IGNORECASE)


def parse_qa(text: str, n: int) -> list[tuple[str, str]] | None:
    """``Q1: .. A1: .. Q2: ..`` -> n (question, answer) pairs, or None unless exactly 1..n appear
    once each. Continuation lines are joined to the item above."""
    items: dict[tuple[str, int], str] = {}
    current = None
    for line in text.splitlines():
        m = _ITEM.match(line)
        if m:
            current = (m.group(1).upper(), int(m.group(2)))
            if current in items:
                return None
            items[current] = m.group(3).strip()
        elif current is not None and line.strip():
            items[current] = f"{items[current]} {line.strip()}".lstrip()  # "A1:" alone, text below
    if set(items) != {(k, i) for k in "QA" for i in range(1, n + 1)}:
        return None
    pairs = [(items["Q", i], items["A", i]) for i in range(1, n + 1)]
    return pairs if all(q and a for q, a in pairs) else None


def run_qa(videos_file: RecordFile[Video], given: RecordFile[QAItem], out: RecordFile[QAItem], cfg: QAConfig,
           cache_dir) -> dict[str, int]:
    """The ``qa`` stage. Videos that already have QA in ``out`` are skipped (resumable)."""
    videos = videos_file.all()
    have = {q.video_id for q in out.read()}
    given_by_video: dict[str, list[QAItem]] = {}
    for q in given.read():
        given_by_video.setdefault(q.video_id, []).append(q)
    stats = {"given": 0, "generated": 0, "dropped_replies": 0}
    need_llm = []
    for v in videos:
        if v.id in have:
            continue
        if cfg.source == "given" and given_by_video.get(v.id):
            out.append(given_by_video[v.id])
            stats["given"] += len(given_by_video[v.id])
        else:
            need_llm.append(v)
    if need_llm:
        llm = load_llm(cfg.llm, cache_dir)
        template = load_template("qa_generation")
        for v in tqdm(need_llm, desc="qa", unit="caption"):
            [reply] = llm.chat([template.render(caption=v.caption, n=cfg.per_caption)], temperature=cfg.temperature,
                               top_p=cfg.top_p, max_new_tokens=cfg.llm.max_new_tokens, seed=cfg.seed)
            pairs = parse_qa(reply.text, cfg.per_caption)
            if pairs is None:
                stats["dropped_replies"] += 1
                log.warning("qa: reply for %s did not parse to %d pairs; dropped", v.id, cfg.per_caption)
                continue
            out.append(QAItem(id=f"{v.id}_{i}", video_id=v.id, question=q, answer=a, split=v.split,
                              source=f"llm:{llm.model_id}") for i, (q, a) in enumerate(pairs))
            stats["generated"] += len(pairs)
    return stats
