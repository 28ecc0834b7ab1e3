"""Import and export of the field's row formats.

- capdpo video rows (``{id, video, caption, qa?: [{q, a}]}``), the format of ``capdpo run``'s
  ``data.videos`` and of ``../shared/data/real_videos.jsonl``;
- ShareGPTVideo caption rows (``{id, video, conversations: [human "<video>\\n...", gpt caption]}``);
- the paper's QA/test rows (``{id: "<video>_<i>", video, conversations: [human "<video>\\nQ", gpt A]}``);
- the paper's released DPO rows (``{id, prompt, answer, video, chosen, rejected, chosen_score, rejected_score}``);
- TRL's conversational preference rows (``prompt/chosen/rejected`` message lists plus the video).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from capdpo.records import PreferencePair, QAItem, RecordError, Video, read_jsonl, write_jsonl

VIDEO_TAG = "<video>"
DESCRIBE_PROMPT = "Describe the video in detail."


def _resolve(video: str, base: Path) -> str:
    """Video paths in a row file are relative to that file, so data folders can move."""
    return video if os.path.isabs(video) else str((base / video).resolve())


def _require(row: dict, key: str, path: Path, lineno: int, kind: type = str):
    if key not in row:
        raise RecordError(f"{path}:{lineno}: missing field {key!r}")
    if not isinstance(row[key], kind):
        expected = " or ".join(k.__name__ for k in kind) if isinstance(kind, tuple) else kind.__name__
        raise RecordError(f"{path}:{lineno}: field {key!r} should be {expected}, got {type(row[key]).__name__}")
    return row[key]


def read_capdpo_videos(path: str | os.PathLike) -> Iterator[tuple[Video, list[QAItem]]]:
    """Video rows with their optional QA (``qa`` items use keys ``q``/``a`` or ``question``/``answer``)."""
    path = Path(path)
    for lineno, row in read_jsonl(path):
        vid = _require(row, "id", path, lineno)
        video = Video(id=vid, video=_resolve(_require(row, "video", path, lineno), path.parent),
                      caption=_require(row, "caption", path, lineno), source=row.get("source", path.stem))
        qa = []
        items = row.get("qa") or []
        if not isinstance(items, list):
            raise RecordError(f"{path}:{lineno}: field 'qa' should be a list of {{q, a}} objects")
        for i, item in enumerate(items):
            if not isinstance(item, dict):
                raise RecordError(f"{path}:{lineno}: qa[{i}] needs string 'q' and 'a'")
            q, a = item.get("q", item.get("question")), item.get("a", item.get("answer"))
            if not isinstance(q, str) or not isinstance(a, str):
                raise RecordError(f"{path}:{lineno}: qa[{i}] needs string 'q' and 'a'")
            qa.append(QAItem(id=f"{vid}_{i}", video_id=vid, question=q, answer=a, source="given"))
        yield video, qa


def _conversation_pair(row: dict, path: Path, lineno: int) -> tuple[str, str]:
    conv = _require(row, "conversations", path, lineno, list)
    if len(conv) < 2 or not all(isinstance(t, dict) and "value" in t for t in conv[:2]):
        raise RecordError(f"{path}:{lineno}: conversations needs a human turn and a gpt turn")
    human = conv[0]["value"].replace(VIDEO_TAG, "").strip()
    return human, conv[1]["value"].strip()


def read_sharegpt_captions(path: str | os.PathLike, video_root: str | os.PathLike | None = None) -> Iterator[Video]:
    path = Path(path)
    root = Path(video_root) if video_root else path.parent
    for lineno, row in read_jsonl(path):
        _, caption = _conversation_pair(row, path, lineno)
        yield Video(id=_require(row, "id", path, lineno), video=_resolve(_require(row, "video", path, lineno), root),
                    caption=caption, source="sharegpt")


def read_paper_qa(path: str | os.PathLike, split: str = "train") -> Iterator[QAItem]:
    """The paper's QA rows; the video id is the row's ``video`` field without extension."""
    path = Path(path)
    for lineno, row in read_jsonl(path):
        question, answer = _conversation_pair(row, path, lineno)
        video_id = Path(_require(row, "video", path, lineno)).stem
        yield QAItem(id=_require(row, "id", path, lineno), video_id=video_id, question=question, answer=answer,
                     split=split, source="paper")


def read_paper_dpo(path: str | os.PathLike) -> Iterator[PreferencePair]:
    path = Path(path)
    for lineno, row in read_jsonl(path):
        get = lambda k, kind=str: _require(row, k, path, lineno, kind)  # noqa: E731
        vid = get("id")
        yield PreferencePair(id=vid, qa_id=vid, video_id=Path(get("video")).stem, video=get("video"),
                             prompt=get("prompt").replace(VIDEO_TAG, "").strip(), answer=row.get("answer", ""),
                             chosen=get("chosen"), rejected=get("rejected"),
                             chosen_score=float(get("chosen_score", (int, float))),
                             rejected_score=float(get("rejected_score", (int, float))),
                             chosen_id=f"{vid}#chosen", rejected_id=f"{vid}#rejected")


def sharegpt_caption_rows(videos: Iterable[Video]) -> Iterator[dict]:
    for v in videos:
        yield {"id": v.id, "video": v.video, "conversations": [
            {"from": "human", "value": f"{VIDEO_TAG}\n{DESCRIBE_PROMPT}"}, {"from": "gpt", "value": v.caption}]}


def paper_qa_rows(qa: Iterable[QAItem], videos: dict[str, Video]) -> Iterator[dict]:
    for q in qa:
        yield {"id": q.id, "video": videos[q.video_id].video, "conversations": [
            {"from": "human", "value": f"{VIDEO_TAG}\n{q.question}"}, {"from": "gpt", "value": q.answer}]}


def paper_dpo_rows(pairs: Iterable[PreferencePair]) -> Iterator[dict]:
    for p in pairs:
        yield {"id": p.id, "prompt": p.prompt, "answer": p.answer, "video": p.video, "chosen": p.chosen,
               "rejected": p.rejected, "chosen_score": p.chosen_score, "rejected_score": p.rejected_score}


def write_pair_exports(pairs: list[PreferencePair], out_dir: Path) -> None:
    """The pairs in TRL's and the paper's row formats, beside the run's pairs.jsonl."""
    write_jsonl(out_dir / "pairs_trl.jsonl", trl_rows(pairs))
    write_jsonl(out_dir / "pairs_paper.jsonl", paper_dpo_rows(pairs))


def trl_rows(pairs: Iterable[PreferencePair]) -> Iterator[dict]:
    """TRL's conversational preference format, with a ``video`` content part and path."""
    for p in pairs:
        yield {
            "id": p.id,
            "video": p.video,
            "prompt": [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": p.prompt}]}],
            "chosen": [{"role": "assistant", "content": [{"type": "text", "text": p.chosen}]}],
            "rejected": [{"role": "assistant", "content": [{"type": "text", "text": p.rejected}]}],
        }
