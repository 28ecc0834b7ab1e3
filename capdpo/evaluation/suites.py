"""Benchmark suites: the paper's test sets read into capdpo videos and held-out questions.

    bench = load_suite("msvd_qa", "test/msvd.qa.official.jsonl", video_root="video_data/test/msvd")
    bench.videos, bench.questions, bench.skipped

Two families (method.md, step 9), each judged by its own protocol:

- caption-based suites, judged from the video's detailed caption (``caption_reward``, 1-5):
  in-domain WebVid / VIDAL / ActivityNet and out-of-domain MSRVTT / MSVD / TGIF / SSv2;
- "official" zero-shot QA, judged without a caption (``video_chatgpt``, yes/no + 0-5):
  MSVD-QA / MSRVTT-QA / TGIF-QA (LLaVA-Hound's ``*.qa.official.jsonl``) and ActivityNet-QA in
  Video-ChatGPT's format (``test_q.json`` + ``test_a.json``).

The row shapes accepted are listed in docs/evaluation.md. A video is a file or a frame folder,
resolved against ``video_root``; questions whose video (or, for caption-based suites, caption)
cannot be found stop the load with a list of them, or are skipped and counted (``skip_missing``).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from capdpo.config import SuiteConfig
from capdpo.ids import BadId, check_id
from capdpo.records import QAItem, RecordError, RecordFile, Video, read_jsonl

VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".gif")
VIDEO_TAG = "<video>"
log = logging.getLogger("capdpo")

SHOW_MISSING = 5  # names listed in a missing-media error; the rest are counted


@dataclass(frozen=True)
class Suite:
    """A benchmark: how its files look and how its answers are judged."""

    name: str
    title: str  # column header in comparison tables, as in the paper
    protocol: Literal["caption_reward", "video_chatgpt"]
    group: Literal["in-domain", "out-of-domain", "official"]
    files: tuple[str, ...]  # file names looked for when --data is a folder
    reader: Literal["llava_hound", "activitynet_qa"] = "llava_hound"

    @property
    def needs_caption(self) -> bool:
        return self.protocol == "caption_reward"


def _caption_suite(name: str, title: str, group: str, stem: str | None = None) -> Suite:
    return Suite(name, title, "caption_reward", group, (f"{stem or name}.qa.jsonl", f"{stem or name}.qa.json"))


def _official_suite(name: str, title: str, stem: str) -> Suite:
    return Suite(name, title, "video_chatgpt", "official", (f"{stem}.qa.official.jsonl", f"{stem}.qa.official.json"))


SUITES: dict[str, Suite] = {s.name: s for s in (
    _caption_suite("webvid", "WebVid", "in-domain"),
    _caption_suite("vidal", "VIDAL", "in-domain"),
    _caption_suite("activitynet", "ActivityNet", "in-domain", stem="actnet"),
    _caption_suite("msrvtt", "MSRVTT", "out-of-domain"),
    _caption_suite("msvd", "MSVD", "out-of-domain"),
    _caption_suite("tgif", "TGIF", "out-of-domain"),
    _caption_suite("ssv2", "SSv2", "out-of-domain"),
    _official_suite("msvd_qa", "MSVD-QA", "msvd"),
    _official_suite("msrvtt_qa", "MSRVTT-QA", "msrvtt"),
    _official_suite("tgif_qa", "TGIF-QA", "tgif"),
    Suite("activitynet_qa", "ActivityNet-QA", "video_chatgpt", "official", ("test_q.json",), "activitynet_qa"),
)}


def get_suite(name: str) -> Suite:
    if name not in SUITES:
        raise ValueError(f"unknown suite {name!r}; known suites: {', '.join(SUITES)}")
    return SUITES[name]


def suite_title(dataset: str) -> str:
    """Column header of a dataset: the suite's title, else the name itself (e.g. 'held-out')."""
    return SUITES[dataset].title if dataset in SUITES else dataset


class MissingMediaError(ValueError):
    """Videos or captions of a suite that could not be found; the message lists them."""


@dataclass(frozen=True)
class QARow:
    """One test question as read from a suite file, before its video is looked up."""

    id: str
    names: tuple[str, ...]  # the video's name as given, then alternatives (ActivityNet-QA's v_ prefix)
    question: str
    answer: str
    caption: str | None
    where: str  # file:line, for error messages
    kind: str = ""  # question type, when the suite has one


@dataclass
class Benchmark:
    """A suite's questions whose media were found, ready for :func:`capdpo.evaluation.stage.run_evaluate`."""

    suite: Suite
    source: Path
    videos: dict[str, Video]
    questions: list[QAItem]
    skipped: int  # questions left out because their video or caption is missing (skip_missing)


# -- reading files ---------------------------------------------------------------------------

def read_rows(path: Path) -> list[tuple[str, dict]]:
    """``(where, row)`` of a JSONL file, or of a JSON file holding a list of objects."""
    if path.suffix == ".jsonl":
        return [(f"{path}:{lineno}", row) for lineno, row in read_jsonl(path)]
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    except json.JSONDecodeError as e:
        raise RecordError(f"{path}: not valid JSON ({e.msg})") from None
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise RecordError(f"{path}: expected a JSON list of objects")
    return [(f"{path}[{i}]", row) for i, row in enumerate(data)]


def _text(row: dict, key: str, where: str) -> str:
    value = row.get(key)
    if not isinstance(value, str) or not value.strip():
        raise RecordError(f"{where}: field {key!r} should be a non-empty string")
    return value.strip()


def _row_id(row: dict, where: str) -> str:
    value = row.get("id", row.get("idx", row.get("question_id")))
    if not isinstance(value, (str, int)) or isinstance(value, bool) or value == "":
        raise RecordError(f"{where}: needs an 'id' (or 'idx'/'question_id') string or integer")
    try:
        return check_id(str(value), "question id")
    except BadId as e:
        raise RecordError(f"{where}: {e}") from None


def _conversation(row: dict, where: str) -> tuple[str, str]:
    """Question and answer of a ShareGPT row: the first human turn (``<video>`` tag removed) and
    the gpt turn after it."""
    turns = row["conversations"]
    if not isinstance(turns, list) or len(turns) < 2 or not all(isinstance(t, dict) and isinstance(t.get("value"), str)
                                                               for t in turns[:2]):
        raise RecordError(f"{where}: 'conversations' needs a human turn and a gpt turn with string 'value'")
    question = turns[0]["value"].replace(VIDEO_TAG, "").strip()
    answer = turns[1]["value"].strip()
    if not question or not answer:
        raise RecordError(f"{where}: empty question or answer in 'conversations'")
    return question, answer


def read_llava_hound(path: Path) -> list[QARow]:
    """LLaVA-Hound test rows: ``{id|idx, video, conversations: [human "<video>\\nQ", gpt A], caption?}``
    or flat ``{id|idx, video, question, answer, caption?}``."""
    rows = []
    for where, row in read_rows(path):
        if "conversations" in row:
            question, answer = _conversation(row, where)
        else:
            question, answer = _text(row, "question", where), _text(row, "answer", where)
        caption = row.get("caption")
        rows.append(QARow(_row_id(row, where), (_text(row, "video", where),), question, answer,
                          caption.strip() if isinstance(caption, str) and caption.strip() else None, where))
    return rows


def read_activitynet_qa(questions_path: Path) -> list[QARow]:
    """Video-ChatGPT's ActivityNet-QA: ``test_q.json`` rows ``{video_name, question, question_id}``
    joined by ``question_id`` to ``test_a.json`` rows ``{answer, type, question_id}`` (the file
    beside it, ``_q`` replaced by ``_a``). Videos are ``v_<video_name>.<ext>`` in Video-ChatGPT's
    layout; the bare name is tried too."""
    answers_path = questions_path.with_name(questions_path.name.replace("_q", "_a", 1))
    if answers_path == questions_path:
        raise ValueError(f"{questions_path}: ActivityNet-QA questions should be named like test_q.json "
                         "(answers are read from test_a.json beside it)")
    answers = {}
    for where, row in read_rows(answers_path):
        answers[_row_id(row, where)] = (row, where)
    rows = []
    for where, row in read_rows(questions_path):
        qid = _row_id(row, where)
        if qid not in answers:
            raise RecordError(f"{where}: question_id {qid} has no answer in {answers_path}")
        answer_row, answer_where = answers[qid]
        name = _text(row, "video_name", where)
        kind = answer_row.get("type")
        rows.append(QARow(qid, (name, f"v_{name}"), _text(row, "question", where), _text(answer_row, "answer", answer_where),
                          None, where, "" if kind is None else f"type:{kind}"))
    return rows


def read_captions(path: Path) -> dict[str, str]:
    """Captions by video name and by id, from rows ``{id|video, caption}`` or ShareGPT caption rows
    ``{id, video, conversations: [human describe, gpt caption]}``."""
    captions: dict[str, str] = {}
    for where, row in read_rows(path):
        caption = row.get("caption")
        if caption is None and "conversations" in row:
            caption = _conversation(row, where)[1]
        if not isinstance(caption, str) or not caption.strip():
            raise RecordError(f"{where}: needs a non-empty 'caption' (or a ShareGPT 'conversations' caption)")
        keys = [row[k] for k in ("video", "id") if isinstance(row.get(k), (str, int))]
        if not keys:
            raise RecordError(f"{where}: needs an 'id' or a 'video' naming the captioned video")
        for key in map(video_key, map(str, keys)):
            captions[key] = captions[Path(key).name] = caption.strip()  # rows may name the video by path or by base name
    return captions


# -- finding media ---------------------------------------------------------------------------

def video_key(name: str) -> str:
    """A video's id: its name as given in the rows, without a video file suffix."""
    path = Path(name)
    return str(path.with_suffix("")) if path.suffix.lower() in VIDEO_SUFFIXES else name


def video_ids(rows: list[QARow]) -> dict[str, str]:
    """The id of each video named in ``rows`` (by :func:`video_key`): its file or folder name
    without the folders before it (``clips/x.mp4`` -> ``x``), on the id rule (capdpo.ids), so a
    suite's video ids are safe names wherever its rows put the videos. A name that gives no such
    id, or two videos given the same id, is a RecordError naming the rows."""
    ids: dict[str, str] = {}
    first: dict[str, tuple[str, str]] = {}  # id -> (key, where) of the first video given it
    for row in rows:
        key = video_key(row.names[0])
        if key in ids:
            continue
        try:
            vid = check_id(Path(key).name, "video id")
        except BadId as e:
            raise RecordError(f"{row.where}: video {row.names[0]!r}: {e}") from None
        if vid in first:
            other, where = first[vid]
            raise RecordError(f"{row.where}: video {key!r} and video {other!r} ({where}) would share the id {vid!r}; "
                              "rename one of them")
        ids[key], first[vid] = vid, (key, row.where)
    return ids


def resolve_video(names: tuple[str, ...], root: Path) -> Path | None:
    """The first existing file or frame folder for a video named in the rows: the name as given
    (relative to ``root``), the name without its suffix (a frame folder extracted from the file),
    or the name with each video suffix added."""
    for name in names:
        base = Path(name) if Path(name).is_absolute() else root / name
        if base.suffix.lower() in VIDEO_SUFFIXES:
            candidates = [base, base.with_suffix("")]
        else:
            candidates = [base, *(base.with_name(base.name + s) for s in VIDEO_SUFFIXES)]
        for candidate in candidates:
            if candidate.exists():
                return candidate
    return None


def suite_file(suite: Suite, data: Path) -> Path:
    """The suite's test file: ``data`` itself, or the first of the suite's file names inside it."""
    if not data.is_dir():
        if not data.exists():
            raise FileNotFoundError(f"{data}: no such file or folder (suite {suite.name})")
        return data
    for name in suite.files:
        if (data / name).exists():
            return data / name
    raise FileNotFoundError(f"{data}: none of {', '.join(suite.files)} in this folder (suite {suite.name})")


def default_captions(path: Path) -> Path | None:
    """``webvid.caption.jsonl`` beside ``webvid.qa.jsonl``, when it exists."""
    if ".qa" not in path.name:
        return None
    candidate = path.with_name(path.name.replace(".qa", ".caption", 1))
    return candidate if candidate.exists() else None


def _missing_message(suite: Suite, what: str, names: list[str], total: int, hint: str) -> str:
    shown = ", ".join(names[:SHOW_MISSING]) + (f" ... and {len(names) - SHOW_MISSING} more" if len(names) > SHOW_MISSING else "")
    return f"suite {suite.name}: {len(names)} of {total} videos {what}: {shown}. {hint}"


# -- loading ---------------------------------------------------------------------------------

def load_suite(name: str, data: str | Path, *, video_root: str | Path | None = None, captions: str | Path | None = None,
               skip_missing: bool = False, max_questions: int | None = None) -> Benchmark:
    """Read a suite's test questions and find their videos (and captions, for caption-based
    suites). Raises :class:`MissingMediaError` listing what is missing, unless ``skip_missing``."""
    suite = get_suite(name)
    path = suite_file(suite, Path(data))
    rows = read_activitynet_qa(path) if suite.reader == "activitynet_qa" else read_llava_hound(path)
    _check_unique(rows)
    rows = rows[:max_questions] if max_questions else rows
    root = Path(video_root) if video_root else path.parent
    caption_file = Path(captions) if captions else default_captions(path)
    caption_of = read_captions(caption_file) if suite.needs_caption and caption_file else {}
    id_of = video_ids(rows)

    found: dict[str, Path | None] = {}
    for row in rows:
        key = video_key(row.names[0])
        if key not in found:
            found[key] = resolve_video(row.names, root)
    caption = video_captions(rows, caption_of)
    no_video = sorted(k for k, p in found.items() if p is None)
    no_caption = sorted(k for k in found if suite.needs_caption and k not in caption and k not in no_video)
    if (no_video or no_caption) and not skip_missing:
        problems = []
        if no_video:
            tried = ", ".join(VIDEO_SUFFIXES)
            problems.append(_missing_message(suite, f"not found under {root} (tried each name as a file, as a frame folder "
                                             f"and with {tried})", no_video, len(found), "Check --video-root."))
        if no_caption:
            problems.append(_missing_message(suite, "without a caption (the caption_reward judge needs one)", no_caption,
                                             len(found), "Pass --captions FILE or add a 'caption' field to the rows."))
        raise MissingMediaError(" ".join(problems) + " Or pass --skip-missing to evaluate the others.")

    left_out = set(no_video) | set(no_caption)
    videos: dict[str, Video] = {}
    questions: list[QAItem] = []
    for row in rows:
        key = video_key(row.names[0])
        if key in left_out:
            continue
        vid = id_of[key]
        if vid not in videos:
            videos[vid] = Video(id=vid, video=str(found[key]), caption=caption.get(key, ""), source=suite.name, split="test")
        questions.append(QAItem(id=row.id, video_id=vid, question=row.question, answer=row.answer, split="test",
                                source=row.kind or suite.name))
    return Benchmark(suite, path, videos, questions, skipped=len(rows) - len(questions))


def video_captions(rows: list[QARow], caption_of: dict[str, str]) -> dict[str, str]:
    """Each video's caption: the first one its rows carry, else the caption file's (looked up by
    the video's name, its base name, or a row id)."""
    captions: dict[str, str] = {}
    for row in rows:
        key = video_key(row.names[0])
        if row.caption and key not in captions:
            captions[key] = row.caption
    for row in rows:
        key = video_key(row.names[0])
        if key not in captions:
            found = next((caption_of[c] for c in (key, Path(key).name, row.id) if c in caption_of), None)
            if found:
                captions[key] = found
    return captions


def _check_unique(rows: list[QARow]) -> None:
    """Question ids identify predictions and judgments: two rows with one id would share them."""
    seen: dict[str, str] = {}
    for row in rows:
        if row.id in seen:
            raise RecordError(f"{row.where}: question id {row.id!r} already used at {seen[row.id]}")
        seen[row.id] = row.where


def load_configured_suite(suite: SuiteConfig, videos_out: RecordFile[Video], questions_out: RecordFile[QAItem]) -> Benchmark:
    """A configured suite's found videos and questions, also written to ``videos_out`` and
    ``questions_out`` (a round's eval/<suite>/, where the report reads them)."""
    bench = load_suite(suite.name, suite.data, video_root=suite.video_root, captions=suite.captions,
                       skip_missing=suite.skip_missing, max_questions=suite.max_questions)
    if bench.skipped:
        log.warning("evaluate %s: %d question(s) skipped, their video or caption is missing", suite.name, bench.skipped)
    videos_out.write(bench.videos.values())
    questions_out.write(bench.questions)
    return bench
