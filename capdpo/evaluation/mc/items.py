"""The multiple-choice benchmarks' files, exactly as published, read into typed items.

    bench = load_benchmark("videomme", "videomme/test-00000-of-00001.parquet", video_root="videomme/data")
    bench.items[0]      # MCItem(id="001-1", question=..., options=(...), answer="C", categories={...})
    bench.video_of      # item id -> Video (the file found under the video root), or
    bench.missing       # item id -> why its video was not found

One reader per benchmark, a pure function from a file to items: :func:`read_videomme` (the parquet
of ``lmms-lab/Video-MME``), :func:`read_mvbench` (a ``json/<task>.json`` of ``OpenGVLab/MVBench``),
:func:`read_tempcompass` (a ``questions/<task>.json`` of ``llyx97/TempCompass``),
:func:`read_nextqa` (NExT-QA's ``val.csv`` / ``test.csv``) and :func:`read_perceptiontest`
(PerceptionTest's multiple-choice validation rows); each row goes through a pure row -> item
function (:func:`videomme_item`, :func:`mvbench_item`, :func:`tempcompass_item`, :func:`nextqa_item`,
:func:`perceptiontest_item`) that another harness can call on the rows it loads. Column names are
the published ones (../shared/docs/mc-benchmarks.md); a malformed row is a RecordError naming the
file and the row.

An item's video is looked up under the video root when the benchmark is loaded; one that is not
there does not stop the load: the item keeps a named error, which its prediction records, and the
other items are evaluated.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

from pydantic import ValidationError

from capdpo.evaluation.suites import VIDEO_SUFFIXES, read_rows, resolve_video
from capdpo.ids import BadId, check_id
from capdpo.records import ClipWindow, RecordError, Video, first_error

LETTERS = "ABCDEFGHIJ"


@dataclass(frozen=True)
class MCItem:
    """One multiple-choice question, as its benchmark's file gives it."""

    id: str  # unique in the benchmark, on the id rule (capdpo.ids): it names the item's prediction
    video: tuple[str, ...]  # the video's name as the row gives it, then other names it may have under the video root
    question: str  # the question as the file gives it (TempCompass: with its option lines)
    options: tuple[str, ...]  # the options' texts, without their labels
    answer: str  # the right option's letter: "A" names options[0]
    categories: dict[str, str] = field(default_factory=dict)  # e.g. {"task_type": "Counting Problem", "duration": "short"}
    labels: tuple[str, ...] = ()  # how the file labels each option, when not A, B, ... ("Option 1", "Sentence A", "yes")
    answer_text: str = ""  # the answer as the file gives it ("B. dunking", "Option 2: ...", "yes", MVBench's candidate)
    window: ClipWindow | None = None  # MVBench's time bounds: only this part of the video is seen
    task: str = ""  # MVBench's and TempCompass's task (the file the item comes from)
    judge_question: str = ""  # TempCompass captioning: the multi-choice question a judge answers from the caption
    judge_answer: str = ""  # and its answer ("B. dunking a basketball")
    where: str = ""  # file and row, for messages

    @property
    def letters(self) -> str:
        """The option letters, A onwards."""
        return LETTERS[: len(self.options)]

    def option_labels(self) -> tuple[str, ...]:
        return self.labels or tuple(self.letters)


# -- reading files -------------------------------------------------------------------------------

def read_table(path: Path) -> list[tuple[str, dict]]:
    """``(where, row)`` of every row of a parquet, csv, JSONL or JSON-list file."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return [(f"{path} row {i}", row) for i, row in enumerate(_parquet_rows(path))]
    if suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            return [(f"{path}:{i + 2}", row) for i, row in enumerate(csv.DictReader(f))]  # line 1 is the header
    return read_rows(path)


def _parquet_rows(path: Path) -> list[dict]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise RecordError(f"{path}: reading a parquet file needs pyarrow (pip install pyarrow)") from None
    try:
        return pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises its own ArrowInvalid, OSError and more for a file it cannot read
        raise RecordError(f"{path}: not a readable parquet file ({type(e).__name__}: {e})") from None


def read_json(path: Path) -> object:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise RecordError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None


def _text(row: dict, key: str, where: str) -> str:
    value = row.get(key)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)  # csv and parquet may give a name that is a number as one
    if not isinstance(value, str) or not value.strip():
        raise RecordError(f"{where}: column {key!r} should be a non-empty string, got {value!r}")
    return value.strip()


def _strings(row: dict, key: str, where: str, at_least: int = 2) -> list[str]:
    """A list column: a list (parquet, JSON) or a JSON list in a csv cell."""
    value = row.get(key)
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            pass
    if not isinstance(value, (list, tuple)) or len(value) < at_least or not all(isinstance(v, str) and v.strip() for v in value):
        raise RecordError(f"{where}: column {key!r} should be a list of at least {at_least} non-empty strings, got {value!r}")
    return [v.strip() for v in value]


def _index(row: dict, key: str, where: str, n: int) -> int:
    value = row.get(key)
    try:
        index = None if isinstance(value, bool) else int(str(value).strip())  # an int, or its text in a csv cell
    except ValueError:
        index = None
    if index is None or not 0 <= index < n:
        raise RecordError(f"{where}: column {key!r} should be an option index 0-{n - 1}, got {value!r}")
    return index


def _item_id(value: str, where: str) -> str:
    try:
        return check_id(value, "question id")
    except BadId as e:
        raise RecordError(f"{where}: {e}") from None


def _check_unique(items: list[MCItem]) -> list[MCItem]:
    seen: dict[str, str] = {}
    for item in items:
        if item.id in seen:
            raise RecordError(f"{item.where}: item id {item.id!r} already used at {seen[item.id]}")
        seen[item.id] = item.where
    return items


# -- Video-MME ------------------------------------------------------------------------------------

_LABELLED = re.compile(r"^\s*([A-Z])\s*[.)]\s*(.*)$", re.S)


def read_videomme(path: Path) -> list[MCItem]:
    """``videomme/test-00000-of-00001.parquet``: columns ``video_id, duration, domain, sub_category,
    url, videoID, question_id, task_type, question, options`` (["A. ...", ...]) ``, answer`` (a
    letter). The video is ``<videoID>.mp4`` under the video root (or under its ``data/``)."""
    return _check_unique([videomme_item(row, where) for where, row in read_table(path)])


def videomme_item(row: dict, where: str = "row") -> MCItem:
    """One Video-MME row (a dict with the parquet's columns) as an item."""
    labels, texts = [], []
    for option in _strings(row, "options", where):
        m = _LABELLED.match(option)
        if not m:
            raise RecordError(f"{where}: option {option!r} should start with its letter, like 'A. ...'")
        labels.append(m.group(1))
        texts.append(m.group(2).strip())
    if "".join(labels) != LETTERS[: len(labels)]:
        raise RecordError(f"{where}: options should be lettered A, B, C... in order, got {labels}")
    answer = _text(row, "answer", where).upper()
    if answer not in labels:
        raise RecordError(f"{where}: answer {answer!r} is none of the option letters {''.join(labels)}")
    video = _text(row, "videoID", where)
    return MCItem(_item_id(_text(row, "question_id", where), where), (video, f"data/{video}"), _text(row, "question", where),
                  tuple(texts), answer, {"duration": _text(row, "duration", where), "domain": _text(row, "domain", where),
                                         "sub_category": _text(row, "sub_category", where),
                                         "task_type": _text(row, "task_type", where)},
                  answer_text=answer, where=where)


# -- MVBench -------------------------------------------------------------------------------------

# task -> (video folder under MVBench's video/, frame rate of a frame-folder task, time-bounded):
# the table of OpenGVLab/Ask-Anything video_chat2/mvbench.ipynb (data_list), in its order
MVBENCH_TASKS: dict[str, tuple[str, float | None, bool]] = {
    "action_sequence": ("star/Charades_v1_480", None, True),
    "action_prediction": ("star/Charades_v1_480", None, True),
    "action_antonym": ("ssv2_video", None, False),
    "fine_grained_action": ("Moments_in_Time_Raw/videos", None, False),
    "unexpected_action": ("FunQA_test/test", None, False),
    "object_existence": ("clevrer/video_validation", None, False),
    "object_interaction": ("star/Charades_v1_480", None, True),
    "object_shuffle": ("perception/videos", None, False),
    "moving_direction": ("clevrer/video_validation", None, False),
    "action_localization": ("sta/sta_video", None, True),
    "scene_transition": ("scene_qa/video", None, False),
    "action_count": ("perception/videos", None, False),
    "moving_count": ("clevrer/video_validation", None, False),
    "moving_attribute": ("clevrer/video_validation", None, False),
    "state_change": ("perception/videos", None, False),
    "fine_grained_pose": ("nturgbd", None, False),
    "character_order": ("perception/videos", None, False),
    "egocentric_navigation": ("vlnqa", None, False),
    "episodic_reasoning": ("tvqa/frames_fps3_hq", 3.0, True),  # frame folders at 3 fps
    "counterfactual_inference": ("clevrer/video_validation", None, False),
}


def read_mvbench(path: Path) -> list[MCItem]:
    """``json/<task>.json``: a list of ``{video, question, candidates, answer}`` (``answer`` the text
    of the right candidate), plus ``start``, ``end`` (seconds) in the five time-bounded tasks, whose
    frames are then sampled only inside the bounds. Item ids are ``<task>_<row>``; the video is
    ``<task's folder>/<video>`` under MVBench's ``video/`` folder (or ``<video>`` under the root)."""
    task = path.stem
    if task not in MVBENCH_TASKS:
        raise RecordError(f"{path}: not an MVBench task file (its name should be one of {', '.join(MVBENCH_TASKS)})")
    return _check_unique([mvbench_item(task, i, row, where) for i, (where, row) in enumerate(read_table(path))])


def mvbench_item(task: str, i: int, row: dict, where: str = "row") -> MCItem:
    """Row ``i`` of MVBench task ``task``'s json as an item (with its time window in a bounded task)."""
    folder, fps, bounded = MVBENCH_TASKS[task]
    candidates = _strings(row, "candidates", where)
    answer_text = _text(row, "answer", where)
    if answer_text not in candidates:
        raise RecordError(f"{where}: answer {answer_text!r} is none of the candidates {candidates}")
    window = None
    if bounded:
        try:
            window = ClipWindow(start=row.get("start"), end=row.get("end"), fps=fps)
        except ValidationError as e:
            raise RecordError(f"{where}: task {task} needs the time bounds 'start' and 'end' (seconds): "
                              f"{first_error(e)}") from None
    video = _text(row, "video", where)
    return MCItem(_item_id(f"{task}_{i}", where), (f"{folder}/{video}", video), _text(row, "question", where),
                  tuple(candidates), LETTERS[candidates.index(answer_text)], {"task": task}, answer_text=answer_text,
                  window=window, task=task, where=where)


# -- TempCompass ---------------------------------------------------------------------------------

TEMPCOMPASS_TASKS = ("multi-choice", "yes_no", "caption_matching", "captioning")


def read_tempcompass(path: Path) -> list[MCItem]:
    """``questions/<task>.json`` (task: multi-choice, yes_no, caption_matching, captioning):
    ``{video_id: {dimension: [{question, answer}]}}``. The options are lines of the question
    ("A. x" for multi-choice, "Option 1: x" / "Sentence A: x" / "Caption A: x" for caption matching,
    "Information A: {...}" for captioning); yes_no's are yes and no. Item ids are
    ``<video_id>_<dimension>_<i>``; the video is ``<video_id>.mp4``. Captioning is scored by a judge
    answering ``multi-choice.json``'s first question of the same video and dimension from the
    caption (the official protocol), so that file must lie beside it."""
    task = path.stem
    if task not in TEMPCOMPASS_TASKS:
        raise RecordError(f"{path}: not a TempCompass question file (its name should be one of "
                          f"{', '.join(f'{t}.json' for t in TEMPCOMPASS_TASKS)})")
    data = read_json(path)
    mc = None
    if task == "captioning":
        if not path.with_name("multi-choice.json").is_file():
            raise RecordError(f"{path}: captioning is scored by answering multi-choice.json's questions from the caption "
                              f"(the official protocol); {path.with_name('multi-choice.json')} not found beside it")
        mc = read_json(path.with_name("multi-choice.json"))
    if not isinstance(data, dict):
        raise RecordError(f"{path}: expected {{video_id: {{dimension: [{{question, answer}}]}}}}")
    items = []
    for video_id, dims in data.items():
        if not isinstance(dims, dict):
            raise RecordError(f"{path}[{video_id!r}]: expected {{dimension: [{{question, answer}}]}}")
        for dim, rows in dims.items():
            if not isinstance(rows, list):
                raise RecordError(f"{path}[{video_id!r}][{dim!r}]: expected a list of {{question, answer}}")
            for i, row in enumerate(rows):
                where = f"{path}[{video_id!r}][{dim!r}][{i}]"
                if not isinstance(row, dict):
                    raise RecordError(f"{where}: expected {{question, answer}}")
                item = tempcompass_item(task, video_id, dim, i, row, where)
                if mc is not None:
                    item = _with_mc_reference(item, mc, path)
                items.append(item)
    return _check_unique(items)


def tempcompass_item(task: str, video_id: str, dim: str, i: int, row: dict, where: str = "row") -> MCItem:
    """Question ``i`` of ``video_id``'s dimension ``dim`` in TempCompass task ``task`` as an item
    (captioning: without its reference multi-choice question, which :func:`read_tempcompass` adds)."""
    question, answer_text = _text(row, "question", where), _text(row, "answer", where)
    lines = question.split("\n")
    if task == "yes_no":
        if answer_text not in ("yes", "no"):
            raise RecordError(f"{where}: a yes_no answer is 'yes' or 'no', got {answer_text!r}")
        labels, texts, answer = ("yes", "no"), ("yes", "no"), "A" if answer_text == "yes" else "B"
    elif task == "caption_matching":
        pairs = [line.split(": ", 1) for line in lines[1:]]
        if len(pairs) < 2 or any(len(p) != 2 for p in pairs):
            raise RecordError(f"{where}: caption matching options are lines 'Label: sentence' after the question")
        if answer_text not in lines[1:]:
            raise RecordError(f"{where}: answer {answer_text!r} is none of the option lines")
        labels, texts = tuple(p[0] for p in pairs), tuple(p[1] for p in pairs)
        answer = LETTERS[lines[1:].index(answer_text)]
    else:  # multi-choice ("A. x" lines) and captioning ("Information A: {...}" lines, then "Generated Caption:")
        pattern = re.compile(r"^([A-Z])\. (.*)$") if task == "multi-choice" else re.compile(r"^Information ([A-Z]): (.*)$")
        found = [m for line in lines[1:] if (m := pattern.match(line))]
        if len(found) < 2:
            raise RecordError(f"{where}: expected option lines like {'A. x' if task == 'multi-choice' else 'Information A: ...'}")
        labels, texts = tuple(m.group(1) for m in found), tuple(m.group(2) for m in found)
        answer = answer_text.split(".")[0].strip()
        if answer not in labels:
            raise RecordError(f"{where}: answer {answer_text!r} does not start with an option letter ({''.join(labels)})")
    return MCItem(_item_id(f"{video_id}_{dim}_{i}", where), (video_id,), question, texts, answer, {"dimension": dim},
                  labels=labels, answer_text=answer_text, task=task, where=where)


def _with_mc_reference(item: MCItem, mc: object, path: Path) -> MCItem:
    """A captioning item with the multi-choice question the judge answers from its caption."""
    video_id, dim = item.video[0], item.categories["dimension"]
    try:
        reference = mc[video_id][dim][0]
        return replace(item, judge_question=reference["question"], judge_answer=reference["answer"])
    except (KeyError, IndexError, TypeError):
        raise RecordError(f"{item.where}: {path.with_name('multi-choice.json')} has no question for video {video_id!r}, "
                          f"dimension {dim!r} (captioning is scored by answering it from the caption)") from None


# -- NExT-QA ---------------------------------------------------------------------------------------

def read_nextqa(path: Path, video_map: dict[str, str] | None = None) -> list[MCItem]:
    """NExT-QA's ``val.csv`` / ``test.csv``: ``video, frame_count, width, height, question, answer``
    (0-4) ``, qid, type, a0 ... a4``. Item ids are ``<video>_<qid>``; with ``video_map``
    (``map_vid_vidorID.json``: video -> ``<folder>/<vidor id>``) the video is
    ``<folder>/<vidor id>.mp4`` (or under ``NExTVideo/``), else ``<video>.mp4``."""
    return _check_unique([nextqa_item(row, where, video_map) for where, row in read_table(path)])


def nextqa_item(row: dict, where: str = "row", video_map: dict[str, str] | None = None) -> MCItem:
    """One NExT-QA csv row as an item."""
    options = [_text(row, f"a{k}", where) for k in range(5)]
    video = _text(row, "video", where)
    mapped = (video_map or {}).get(video)
    names = (mapped, f"NExTVideo/{mapped}", video) if mapped else (video,)
    return MCItem(_item_id(f"{video}_{_text(row, 'qid', where)}", where), names, _text(row, "question", where), tuple(options),
                  LETTERS[_index(row, "answer", where, 5)], {"type": _text(row, "type", where)}, where=where)


NEXTQA_MAP = "map_vid_vidorID.json"


def nextqa_video_map(*folders: Path) -> dict[str, str] | None:
    """``map_vid_vidorID.json`` from the first of ``folders`` that holds it (None when none does)."""
    for folder in folders:
        if (folder / NEXTQA_MAP).is_file():
            data = read_json(folder / NEXTQA_MAP)
            if not isinstance(data, dict):
                raise RecordError(f"{folder / NEXTQA_MAP}: expected {{video: '<folder>/<vidor id>'}}")
            return {str(k): str(v) for k, v in data.items()}
    return None


# -- PerceptionTest --------------------------------------------------------------------------------

def read_perceptiontest(path: Path) -> list[MCItem]:
    """PerceptionTest's multiple-choice validation rows (parquet, JSON list, JSONL or csv):
    ``video_name, question, options`` (3) ``, answer_id`` (0-2), and when present ``question_id,
    area, reasoning``. Item ids are ``<video_name>_<question_id>`` (the row number without one);
    the video is ``<video_name>.mp4``."""
    return _check_unique([perceptiontest_item(i, row, where) for i, (where, row) in enumerate(read_table(path))])


def perceptiontest_item(i: int, row: dict, where: str = "row") -> MCItem:
    """Row ``i`` of PerceptionTest's multiple-choice rows as an item."""
    options = _strings(row, "options", where)
    video = _text(row, "video_name", where)
    number = str(row["question_id"]) if row.get("question_id") not in (None, "") else str(i)
    categories = {key: _text(row, key, where) for key in ("area", "reasoning") if row.get(key) not in (None, "")}
    return MCItem(_item_id(f"{video}_{number}", where), (video, f"{video}.MP4"), _text(row, "question", where), tuple(options),
                  LETTERS[_index(row, "answer_id", where, len(options))], categories, where=where)


# -- the registry ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class MCBenchmark:
    """A multiple-choice benchmark: its reader, its category fields and where its file is."""

    name: str
    title: str  # column header in comparison tables
    categories: tuple[str, ...]  # category fields reported, in this order
    files: tuple[str, ...] = ()  # names looked for when --data is a folder


BENCHMARKS: dict[str, MCBenchmark] = {b.name: b for b in (
    MCBenchmark("videomme", "Video-MME", ("duration", "domain", "task_type"),
                ("videomme/test-00000-of-00001.parquet", "test-00000-of-00001.parquet")),
    MCBenchmark("mvbench", "MVBench", ("task",)),
    MCBenchmark("tempcompass", "TempCompass", ("dimension",)),
    MCBenchmark("nextqa", "NExT-QA", ("type",), ("test.csv", "val.csv")),
    MCBenchmark("perceptiontest", "PerceptionTest", ("area", "reasoning")),
    MCBenchmark("synthetic_mc", "Synthetic MC", ("kind",)),
)}


def is_mc(name: str) -> bool:
    """Whether ``name`` is a multiple-choice benchmark (else an open-ended suite or the held-out set)."""
    return name in BENCHMARKS


def get_benchmark(name: str) -> MCBenchmark:
    if name not in BENCHMARKS:
        raise ValueError(f"unknown multiple-choice benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    return BENCHMARKS[name]


def dataset_name(benchmark: str, data_file: Path | None = None) -> str:
    """The name an evaluation is filed under (``eval/<name>/``, summary ``<name>/<tag>``): the
    benchmark's, and for TempCompass one per task (``tempcompass_yes_no``): the paper reports each task apart."""
    if benchmark == "tempcompass" and data_file is not None:
        return f"tempcompass_{data_file.stem}"
    return benchmark


def benchmark_of(dataset: str) -> MCBenchmark | None:
    """The multiple-choice benchmark a dataset name is filed under (``tempcompass_yes_no`` ->
    TempCompass), None for other datasets."""
    return BENCHMARKS.get("tempcompass" if dataset.startswith("tempcompass_") else dataset)


def dataset_title(dataset: str) -> str | None:
    """Column header of a multiple-choice dataset (None for other datasets)."""
    if dataset.startswith("tempcompass_"):
        return f"TempCompass ({dataset.removeprefix('tempcompass_')})"
    return BENCHMARKS[dataset].title if dataset in BENCHMARKS else None


def benchmark_files(name: str, data: Path) -> list[Path]:
    """The file(s) of benchmark ``name`` that ``data`` names: the file itself, or in a folder the
    benchmark's file (MVBench: every task file of a ``json/`` folder, in the official order)."""
    if not data.exists():
        raise FileNotFoundError(f"{data}: no such file or folder (benchmark {name})")
    if data.is_file():
        return [data]
    if name == "mvbench":
        folder = data / "json" if (data / "json").is_dir() else data
        found = [folder / f"{task}.json" for task in MVBENCH_TASKS if (folder / f"{task}.json").is_file()]
        if found:
            return found
        raise FileNotFoundError(f"{data}: no MVBench task file (<task>.json, e.g. action_sequence.json) here or in json/")
    present = [data / f for f in get_benchmark(name).files if (data / f).is_file()]
    if name == "nextqa" and len(present) > 1:
        raise ValueError(f"{data}: both test.csv and val.csv are here; name the one to evaluate with --data")
    if present:
        return present[:1]
    if name == "tempcompass":
        raise ValueError(f"{data}: a folder; name one TempCompass question file with --data "
                         f"({', '.join(f'{t}.json' for t in TEMPCOMPASS_TASKS)}): each task is scored apart")
    wanted = ", ".join(get_benchmark(name).files) or "its file"
    raise FileNotFoundError(f"{data}: none of {wanted} in this folder (benchmark {name}); name the file with --data")


def read_benchmark(name: str, files: Iterable[Path], video_root: Path | None = None) -> list[MCItem]:
    """Every item of benchmark ``name`` in ``files`` (NExT-QA: with ``map_vid_vidorID.json`` when
    found beside the file, in the video root or above it)."""
    readers: dict[str, Callable[[Path], list[MCItem]]] = {
        "videomme": read_videomme, "mvbench": read_mvbench, "tempcompass": read_tempcompass,
        "perceptiontest": read_perceptiontest,
    }
    items = []
    for path in files:
        if name == "nextqa":
            roots = [path.parent] + ([video_root, video_root.parent] if video_root else [])
            items += read_nextqa(path, nextqa_video_map(*roots))
        elif name in readers:
            items += readers[name](path)
        else:
            raise ValueError(f"benchmark {name} has no file reader")
    return _check_unique(items)


# -- videos ------------------------------------------------------------------------------------------

@dataclass
class MCBench:
    """A benchmark's items ready to evaluate: each item's video, or why it has none."""

    benchmark: MCBenchmark
    dataset: str  # the name it is filed under (tempcompass_<task> for TempCompass)
    files: list[Path]
    items: list[MCItem]
    video_of: dict[str, Video]  # item id -> its video (the part of it the item is about)
    missing: dict[str, str]  # item id -> why its video is not there


def item_videos(items: list[MCItem], root: Path) -> tuple[dict[str, Video], dict[str, str]]:
    """Each item's video under ``root`` (a file or frame folder, tried as named, without and with a
    video suffix), as a Video whose id is made from its file name and a hash of its path and window
    (a safe, unique name); items whose video is not found get a message instead."""
    found: dict[tuple[str, ...], Path | None] = {}
    video_of, missing = {}, {}
    for item in items:
        if item.video not in found:
            found[item.video] = resolve_video(item.video, root)
        path = found[item.video]
        if path is None:
            tried = ", ".join(repr(n) for n in item.video)
            missing[item.id] = (f"video {item.video[0]!r} not found under {root} (tried {tried}, as files, frame folders "
                                f"and with {', '.join(VIDEO_SUFFIXES)})")
            continue
        video_of[item.id] = Video(id=_video_id(path, item.window), video=str(path), caption="", source="mc", split="test",
                                  window=item.window)
    return video_of, missing


def _video_id(path: Path, window: ClipWindow | None) -> str:
    stem = re.sub(r"[^A-Za-z0-9_.:+-]", "_", path.name if path.is_dir() else path.stem).lstrip(".")[:80] or "video"
    digest = hashlib.sha256(json.dumps([str(path), window.model_dump() if window else None]).encode()).hexdigest()[:10]
    return f"{stem}-{digest}"


def load_benchmark(name: str, data: str | Path, *, video_root: str | Path | None = None,
                   max_items: int | None = None) -> MCBench:
    """Read benchmark ``name`` from ``data`` (a file, or the folder holding it) and find each item's
    video under ``video_root`` (default: the data file's folder)."""
    benchmark = get_benchmark(name)
    if name == "synthetic_mc":
        raise ValueError("synthetic_mc is made from a run's synthetic clips (capdpo.evaluation.mc.synthetic), "
                         "not read from a file")
    files = benchmark_files(name, Path(data))
    root = Path(video_root) if video_root else files[0].parent
    items = read_benchmark(name, files, root)
    items = items[:max_items] if max_items else items
    video_of, missing = item_videos(items, root)
    return MCBench(benchmark, dataset_name(name, files[0]), files, items, video_of, missing)
