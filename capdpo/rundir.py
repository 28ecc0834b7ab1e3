"""The run folder: where each stage's output lives, for a run and for each of its rounds.

Round 1 fills the run folder itself; round k >= 2 fills ``round-k/`` with its own candidates,
judgments, pairs, train/ and eval/, reading videos, QA and frames from the run folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from capdpo.errors import MissingInput, UnsafePath
from capdpo.ids import check_id, shown
from capdpo.records import (
    Candidate,
    EvalSummary,
    Judgment,
    MCPrediction,
    Prediction,
    PreferencePair,
    QAItem,
    RecordFile,
    ReferenceLogps,
    Video,
)

HELD_OUT = "held-out"  # the dataset name of a run's own test split (not a suite)
# the stage that writes each input file a later stage needs, to tell the user what to run first
WRITTEN_BY = {"videos.jsonl": "data", "qa.jsonl": "qa", "candidates.jsonl": "sample", "judgments.jsonl": "judge",
              "pairs.jsonl": "pairs"}


def require(stage: str, *inputs: RecordFile) -> None:
    """Stop ``stage`` when one of its ``inputs`` is missing or empty: running on nothing would do
    nothing and say nothing. The error names the file and the stage that writes it."""
    for records in inputs:
        writer = WRITTEN_BY[records.path.name]
        if not records.exists():
            raise MissingInput(f"{stage}: {records.path} not found; run `capdpo {writer}` first")
        if records.path.stat().st_size == 0:
            raise MissingInput(f"{stage}: {records.path} is empty: `capdpo {writer}` wrote no records (see its log); "
                               "run it again once its inputs are fixed")


NAME_MAX = 255  # bytes of one file or folder name on the usual file systems


def inside(folder: Path, name: str) -> Path:
    """``folder / name`` for a ``name`` made from an id or a tag, proven to lie inside ``folder``:
    every path capdpo makes from an id or a tag goes through here. ``name`` must be one file or
    folder name the file system can hold (not empty, ``.`` or ``..``, no ``/``, no NUL, at most
    NAME_MAX bytes) and the path must resolve (symbolic links followed) to a child of ``folder``;
    else :class:`UnsafePath` naming both."""
    path = folder / name if _one_name(name) else None
    if path is None or path.resolve().parent != folder.resolve():
        raise UnsafePath(f"{shown(name)} cannot name a file or folder inside {folder}: a name from an id or a tag "
                         "must stay inside its folder (see the id rule, capdpo.ids)")
    return path


def _one_name(name: object) -> bool:
    """Whether ``name`` is one file or folder name the file system can hold."""
    return (isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\0" not in name
            and len(name.encode("utf-8", "surrogateescape")) <= NAME_MAX)


@dataclass(frozen=True)
class RunPaths:
    """Where each stage's output lives inside a run folder, or inside one of its rounds
    (``base``: the run folder of a round-k folder; the data stages' files live there)."""

    root: Path
    base: Path | None = None

    @property
    def top(self) -> Path:
        """The run folder itself (``root`` unless this is a round-k folder)."""
        return self.base or self.root

    @property
    def round_number(self) -> int:
        return int(self.root.name.removeprefix("round-")) if self.base else 1

    def round(self, k: int) -> RunPaths:
        """Round ``k``'s paths: the run folder for round 1, ``round-k/`` after."""
        return RunPaths(self.top) if k == 1 else RunPaths(self.top / f"round-{k}", self.top)

    def rounds(self) -> list[RunPaths]:
        """Round 1 and every round-k folder on disk, in order."""
        found = sorted(int(d.name.removeprefix("round-")) for d in self.top.glob("round-*")
                       if d.is_dir() and d.name.removeprefix("round-").isdigit())
        return [self.round(1)] + [self.round(k) for k in found if k >= 2]

    @property
    def videos(self) -> RecordFile[Video]:
        return RecordFile(self.top / "videos.jsonl", Video)

    @property
    def qa_given(self) -> RecordFile[QAItem]:
        return RecordFile(self.top / "qa_given.jsonl", QAItem)

    @property
    def qa(self) -> RecordFile[QAItem]:
        return RecordFile(self.top / "qa.jsonl", QAItem)

    @property
    def candidates(self) -> RecordFile[Candidate]:
        return RecordFile(self.root / "candidates.jsonl", Candidate)

    @property
    def judgments(self) -> RecordFile[Judgment]:
        return RecordFile(self.root / "judgments.jsonl", Judgment)

    @property
    def pairs(self) -> RecordFile[PreferencePair]:
        return RecordFile(self.root / "pairs.jsonl", PreferencePair)

    @property
    def reference(self) -> RecordFile[ReferenceLogps]:
        """The reference log-probs of the round's pairs (`capdpo reference`), read by ``train``."""
        return RecordFile(self.train / "reference.jsonl", ReferenceLogps)

    def eval_dir(self, dataset: str = HELD_OUT) -> Path:
        """``eval/`` for the held-out questions, ``eval/<suite>/`` for a benchmark suite."""
        return self.root / "eval" if dataset == HELD_OUT else inside(self.root / "eval", dataset)

    def predictions(self, tag: str, dataset: str = HELD_OUT) -> RecordFile[Prediction]:
        """An evaluation's greedy answers; ``tag`` follows the id rule (capdpo.ids), or :class:`~capdpo.ids.BadId`."""
        return RecordFile(inside(self.eval_dir(dataset), f"{check_id(tag, 'tag')}_predictions.jsonl"), Prediction)

    def mc_predictions(self, tag: str, dataset: str) -> RecordFile[MCPrediction]:
        """A multiple-choice benchmark's scored answers (``eval/<benchmark>/<tag>_predictions.jsonl``)."""
        return RecordFile(inside(self.eval_dir(dataset), f"{check_id(tag, 'tag')}_predictions.jsonl"), MCPrediction)

    def eval_judgments(self, tag: str, dataset: str = HELD_OUT) -> RecordFile[Judgment]:
        return RecordFile(inside(self.eval_dir(dataset), f"{check_id(tag, 'tag')}_judgments.jsonl"), Judgment)

    def frame_folder(self, video_id: str) -> Path:
        """``frames/<video id>/``, the video's JPEG frames (``capdpo frames``)."""
        return inside(self.frames, video_id)

    def suite_videos(self, dataset: str) -> RecordFile[Video]:
        """A suite's videos and questions as evaluated (found media only), kept for the report."""
        return RecordFile(self.eval_dir(dataset) / "videos.jsonl", Video)

    def suite_questions(self, dataset: str) -> RecordFile[QAItem]:
        return RecordFile(self.eval_dir(dataset) / "questions.jsonl", QAItem)

    @property
    def eval_summary(self) -> RecordFile[EvalSummary]:
        return RecordFile(self.root / "eval" / "summary.jsonl", EvalSummary)

    frames = property(lambda self: self.top / "frames")
    media = property(lambda self: self.top / "media")
    train = property(lambda self: self.root / "train")
    sft = property(lambda self: self.top / "sft")  # `capdpo sft`: sft/<phase>/ and the result sft/policy/, once per run
    report = property(lambda self: self.top / "report.html")
    config = property(lambda self: self.top / "config.yaml")
    agreement = property(lambda self: self.top / "agreement.json")
    llm_cache = property(lambda self: self.top / "llm_cache.sqlite")  # one reply cache for every round
