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
from dataclasses import dataclass
from pathlib import Path

from capdpo.errors import ItemErrors
from capdpo.ids import BadId, IdKind, check_id
from capdpo.records import PreferencePair, QAItem, RecordError, RecordFile, Video, json_object, jsonl_lines, read_jsonl, write_jsonl
from capdpo.rundir import RunPaths

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


def _checked(value: str, kind: IdKind, path: Path, lineno: int, key: str) -> str:
    """``value`` (from field ``key``) when it is on the id rule (capdpo.ids) for a ``kind``; else a
    RecordError naming file:line and the field."""
    try:
        return check_id(value, kind)
    except BadId as e:
        raise RecordError(f"{path}:{lineno}: field {key!r}: {e}") from None


def _id(row: dict, key: str, path: Path, lineno: int, kind: IdKind) -> str:
    return _checked(_require(row, key, path, lineno), kind, path, lineno, key)


def read_capdpo_videos(path: str | os.PathLike, errors: ItemErrors | None = None) -> Iterator[tuple[Video, list[QAItem]]]:
    """Video rows with their optional QA (``qa`` items use keys ``q``/``a`` or ``question``/``answer``).
    A row without an id on the id rule (capdpo.ids) is recorded in ``errors`` and skipped, the other
    rows go on; without ``errors`` it raises. Any other malformed row raises naming file and line."""
    path = Path(path)
    for lineno, row in read_jsonl(path):
        try:
            vid = _id(row, "id", path, lineno, "video id")
        except RecordError as e:
            if errors is None:
                raise
            errors.record(f"line {lineno}", e)
            continue
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


@dataclass(frozen=True)
class Conversation:
    """A ``{id, video, conversations}`` row (ShareGPTVideo caption rows, the paper's QA and SFT
    rows): its video path (resolved), its (human, gpt) turns without the ``<video>`` tag, and
    where it is (``file:line``)."""

    id: str
    video: str
    turns: list[tuple[str, str]]
    where: str


def read_conversations(path: str | os.PathLike, video_root: str | os.PathLike | None = None,
                       errors: ItemErrors | None = None) -> Iterator[Conversation]:
    """The rows of a conversations file. A malformed row (not JSON, a missing or mistyped field,
    turns that are not human/gpt pairs) is recorded in ``errors`` under ``file:line`` and the
    other rows go on; without ``errors`` it raises a RecordError naming ``file:line``."""
    path = Path(path)
    root = Path(video_root) if video_root else path.parent
    for lineno, line in jsonl_lines(path):
        try:
            yield _conversation(line, path, lineno, root)
        except RecordError as e:
            if errors is None:
                raise
            errors.record(f"line {lineno}", e)  # the message names file:line


def _conversation(line: str, path: Path, lineno: int, root: Path) -> Conversation:
    row = json_object(line, path, lineno)
    conv = _require(row, "conversations", path, lineno, list)
    speakers = ["human", "gpt"] * (len(conv) // 2)
    if not conv or len(conv) % 2 or any(not isinstance(t, dict) or t.get("from") != who or not isinstance(t.get("value"), str)
                                        for t, who in zip(conv, speakers)):
        raise RecordError(f"{path}:{lineno}: conversations should be turns {{from: human, value}} then {{from: gpt, value}}, "
                          "in pairs, each value a string")
    turns = [(conv[i]["value"].replace(VIDEO_TAG, "").strip(), conv[i + 1]["value"].strip()) for i in range(0, len(conv), 2)]
    return Conversation(_require(row, "id", path, lineno), _resolve(_require(row, "video", path, lineno), root), turns,
                        f"{path}:{lineno}")


def read_sharegpt_captions(path: str | os.PathLike, video_root: str | os.PathLike | None = None) -> Iterator[Video]:
    path = Path(path)
    root = Path(video_root) if video_root else path.parent
    for lineno, row in read_jsonl(path):
        _, caption = _conversation_pair(row, path, lineno)
        yield Video(id=_id(row, "id", path, lineno, "video id"), video=_resolve(_require(row, "video", path, lineno), root),
                    caption=caption, source="sharegpt")


def read_paper_qa(path: str | os.PathLike, split: str = "train") -> Iterator[QAItem]:
    """The paper's QA rows; the video id is the row's ``video`` field without extension."""
    path = Path(path)
    for lineno, row in read_jsonl(path):
        question, answer = _conversation_pair(row, path, lineno)
        video_id = _checked(Path(_require(row, "video", path, lineno)).stem, "video id", path, lineno, "video")
        yield QAItem(id=_id(row, "id", path, lineno, "question id"), video_id=video_id, question=question, answer=answer,
                     split=split, source="paper")


def read_paper_dpo(path: str | os.PathLike) -> Iterator[PreferencePair]:
    path = Path(path)
    for lineno, row in read_jsonl(path):
        get = lambda k, kind=str: _require(row, k, path, lineno, kind)  # noqa: E731
        vid = _id(row, "id", path, lineno, "question id")
        video_id = _checked(Path(get("video")).stem, "video id", path, lineno, "video")
        yield PreferencePair(id=vid, qa_id=vid, video_id=video_id, video=get("video"),
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


PAIR_EXPORTS = ("pairs_trl.jsonl", "pairs_paper.jsonl")  # written beside pairs.jsonl by the pairs stage


def write_pair_exports(pairs: list[PreferencePair], out_dir: Path) -> None:
    """The pairs in TRL's and the paper's row formats, beside the run's pairs.jsonl."""
    write_jsonl(out_dir / PAIR_EXPORTS[0], trl_rows(pairs))
    write_jsonl(out_dir / PAIR_EXPORTS[1], paper_dpo_rows(pairs))


def run_outputs(paths: RunPaths) -> set[Path]:
    """Every file and folder a run folder's stages write where :class:`RunPaths` names it (every
    round's), resolved; files named by an id or a tag lie inside one of these folders."""
    found = set()
    for round_paths in paths.rounds():
        for name, attr in vars(RunPaths).items():
            if not isinstance(attr, property) or name in ("top", "base", "round_number"):
                continue
            value = getattr(round_paths, name)
            if isinstance(value, RecordFile):
                value = value.path
            if isinstance(value, Path):
                found.add(value.resolve())
        found.update((round_paths.root / name).resolve() for name in PAIR_EXPORTS)
        found.add(round_paths.eval_dir().resolve())
    return found


def check_export_target(paths: RunPaths, out: Path) -> None:
    """Refuse an export of a run folder that does not exist, or onto the run's own files: an output
    inside the run folder may be a new file only, never one that is there or that a stage writes."""
    if not paths.top.is_dir():
        raise ValueError(f"{paths.top}: no such run folder")
    target, top = out.resolve(), paths.top.resolve()
    if not target.is_relative_to(top):
        return
    own = run_outputs(paths)
    if target.exists() or any(target == p or target.is_relative_to(p) for p in own):
        raise ValueError(f"{out}: the run's own file, or one already in the run folder {paths.top}; "
                         "export to a new file (outside the run folder, say)")


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
