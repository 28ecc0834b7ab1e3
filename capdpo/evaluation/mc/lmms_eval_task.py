"""A multiple-choice benchmark as an lmms-eval 0.7.3 task (``capdpo export lmms-eval-task``).

    export = export_task("tasks/videomme", "videomme", data="videomme/test-00000-of-00001.parquet",
                         video_root="videomme/data")
    # python -m lmms_eval --model capdpo --model_args pretrained=... --include_path tasks --tasks capdpo_videomme

The items are read by capdpo's own loader (``items.load_benchmark``, or the run's synthetic suite)
and written, one doc each, into a folder for lmms-eval's ``--include_path``:

- ``<task>.yaml``: a ``generate_until`` task over the docs (``dataset_path: json``, the docs file's
  absolute path), greedy, no stop strings, capdpo's answer length, metrics ``accuracy`` (over every
  doc, unanswered = wrong) and ``accuracy_answered`` (over the docs an answer was read from) - the
  two accuracies of capdpo's summary;
- ``<task>.jsonl``: the docs: the item and its video (absolute path, MVBench's time window) as
  capdpo's records, so nothing is read twice in two ways;
- ``utils.py``: the task's functions, which are this module's: the prompt is
  ``prompts.mc_prompt`` and the answer is read by ``extract`` with the export's extractor. lmms-eval
  imports it from the folder, so capdpo must be installed beside lmms-eval.

Items whose video is missing are left out (capdpo's runner counts them apart, outside both
accuracies, so the denominators stay the same). TempCompass captioning is not exported: only an
LLM judge scores it, and lmms-eval would call its own.

A prompt's system turn and prefill (MVBench's) do not fit lmms-eval's context string, which holds
the user turn only: the ``capdpo`` model (capdpo.integrations.lmms_eval_model) takes them from the
doc (:func:`doc_prompt`); another lmms-eval model asked this task gets the user turn alone.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

from capdpo.evaluation.mc.extract import check_extractor
from capdpo.evaluation.mc.items import MCBench, MCItem, get_benchmark, load_benchmark
from capdpo.evaluation.mc.prompts import PROMPT_SOURCES, mc_prompt, prompt_hash
from capdpo.evaluation.mc.score import score_rules
from capdpo.prompts import ChatPrompt
from capdpo.records import ClipWindow, RecordError, Video, atomic_dir, write_jsonl

DOC_ITEM = "capdpo_item"  # the doc field holding the item (JSON of MCItem's fields)
DOC_VIDEO = "capdpo_video"  # and its video (JSON of the Video record)
DEFAULT_MAX_NEW_TOKENS = 64  # capdpo's evaluate.max_new_tokens default


# -- docs: an item and its video, and back ----------------------------------------------------------------

def item_doc(benchmark: str, item: MCItem, video: Video) -> dict:
    """One doc of the task: readable fields for lmms-eval's logs, and the item and its video."""
    video = video.model_copy(update={"video": str(Path(video.video).resolve())})  # the task may run from anywhere
    data = {f.name: getattr(item, f.name) for f in fields(item)}
    data["window"] = item.window.model_dump() if item.window else None
    return {"id": item.id, "benchmark": benchmark, "video": video.video, "answer": item.answer,
            DOC_ITEM: json.dumps(data, ensure_ascii=False), DOC_VIDEO: video.model_dump_json()}


def is_capdpo_doc(doc: dict) -> bool:
    """Whether ``doc`` is one of an exported task's (else another lmms-eval task's)."""
    return DOC_ITEM in doc and DOC_VIDEO in doc and "benchmark" in doc


def doc_item(doc: dict) -> MCItem:
    data = json.loads(doc[DOC_ITEM])
    tuples = {name: tuple(data[name]) for name in ("video", "options", "labels")}
    window = ClipWindow(**data["window"]) if data["window"] else None
    return MCItem(**{**data, **tuples, "window": window})


def doc_video(doc: dict) -> Video:
    return Video.model_validate_json(doc[DOC_VIDEO])


def doc_prompt(doc: dict) -> ChatPrompt:
    """What capdpo's runner asks the doc's item with: the user turn, system turn and prefill."""
    return mc_prompt(doc["benchmark"], doc_item(doc))


# -- the task's functions (utils.py re-exports them) -------------------------------------------------------

def doc_to_visual(doc: dict) -> list[str]:
    """The item's video: a file or a frame folder, absolute."""
    return [doc["video"]]


def doc_to_text(doc: dict) -> str:
    """The user turn of the benchmark's prompt (capdpo.evaluation.mc.prompts)."""
    return doc_prompt(doc).text


def scorer(extractor: str) -> Callable[[dict, list[str]], dict]:
    """The task's ``process_results``: the answer read by ``extractor``'s rule for the doc's
    benchmark, as capdpo's runner reads it (``score.score_rules``)."""
    check_extractor(extractor)

    def process_results(doc: dict, results: list[str]) -> dict:
        letter, correct = score_rules(doc["benchmark"], extractor, doc_item(doc), results[0])
        return {"accuracy": float(correct), "accuracy_answered": {"id": doc["id"], "extracted": letter, "correct": correct}}

    return process_results


def answered_accuracy(rows: list[dict]) -> float:
    """``accuracy_answered``'s aggregation: the share right among the docs an answer was read
    from (NaN when none was: lmms-eval's tables take a number)."""
    answered = [row for row in rows if row["extracted"]]
    return sum(row["correct"] for row in answered) / len(answered) if answered else float("nan")


# -- the folder ------------------------------------------------------------------------------------------

UTILS = '''"""The functions of lmms-eval task {task}, written by `capdpo export lmms-eval-task`: capdpo's own prompt
and its {extractor} extractor (capdpo.evaluation.mc.lmms_eval_task), so lmms-eval's accuracy is capdpo's."""

from capdpo.evaluation.mc.lmms_eval_task import answered_accuracy, doc_to_text, doc_to_visual, scorer  # noqa: F401

process_results = scorer({extractor!r})
'''

YAML = """# lmms-eval task written by `capdpo export lmms-eval-task` (docs/evaluation.md, "Hand-off to lmms-eval"):
# {items} items of {dataset} read by capdpo from {source}
# prompt {prompt} {prompt_hash}, extractor {extractor}
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {docs}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: {max_new_tokens}
  temperature: 0
  do_sample: false
  until: []
process_results: !function utils.process_results
metric_list:
  - metric: accuracy
    aggregation: mean
    higher_is_better: true
  - metric: accuracy_answered
    aggregation: !function utils.answered_accuracy
    higher_is_better: true
metadata:
  version: 0.0
  capdpo_benchmark: {benchmark}
  capdpo_extractor: {extractor}
"""


@dataclass(frozen=True)
class TaskExport:
    """What an export wrote."""

    task: str  # the lmms-eval task name (--tasks)
    folder: Path  # the folder to pass as --include_path (or a folder above it)
    docs: int  # items written
    left_out: int  # items without a video, not written

    def __str__(self) -> str:
        without = f" ({self.left_out} without a video left out)" if self.left_out else ""
        return f"lmms-eval task {self.task}: {self.docs} items{without} -> {self.folder} (--include_path {self.folder})"


def task_name(dataset: str) -> str:
    """``capdpo_<dataset>``: lmms-eval's own task names (videomme, mvbench, ...) win a clash."""
    return "capdpo_" + dataset.replace("-", "_")


def write_task(bench: MCBench, out: str | Path, *, extractor: str = "official",
               max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, name: str | None = None, source: str = "") -> TaskExport:
    """Write ``bench`` as the lmms-eval task folder ``out`` (an earlier export there is replaced; a
    folder capdpo did not make is refused)."""
    check_extractor(extractor)
    benchmark = bench.benchmark.name
    if any(item.task == "captioning" for item in bench.items):
        raise ValueError("TempCompass captioning is scored only by an LLM judge answering from the caption; "
                         "export another TempCompass task (multi-choice, yes_no, caption_matching)")
    items = [item for item in bench.items if item.id in bench.video_of]
    if not items:
        raise ValueError(f"{bench.dataset}: no item has its video under the video root, nothing to export "
                         f"(e.g. {next(iter(bench.missing.values()), 'no items')})")
    task = name or task_name(bench.dataset)
    out = Path(out).resolve()
    docs = out / f"{task}.jsonl"
    with atomic_dir(out) as tmp:
        write_jsonl(tmp / docs.name, (item_doc(benchmark, item, bench.video_of[item.id]) for item in items))
        (tmp / "utils.py").write_text(UTILS.format(task=task, extractor=extractor), encoding="utf-8")
        (tmp / f"{task}.yaml").write_text(YAML.format(
            task=task, docs=json.dumps(str(docs)), max_new_tokens=max_new_tokens, benchmark=benchmark, extractor=extractor,
            items=len(items), dataset=bench.dataset, source=source or ", ".join(map(str, bench.files)) or "a run",
            prompt=PROMPT_SOURCES[benchmark], prompt_hash=prompt_hash(benchmark, items[0])), encoding="utf-8")
    return TaskExport(task, out, len(items), len(bench.items) - len(items))


def export_task(out: str | Path, suite: str, *, data: str | Path | None = None, video_root: str | Path | None = None,
                run_dir: str | Path | None = None, extractor: str = "official",
                max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, max_items: int | None = None,
                name: str | None = None) -> TaskExport:
    """Read benchmark ``suite`` as ``capdpo evaluate --suite`` does - from ``data`` with its videos
    under ``video_root``, or ``synthetic_mc`` from the run folder ``run_dir`` - and write its task."""
    get_benchmark(suite)
    if suite == "synthetic_mc":
        bench = _synthetic_bench(Path(run_dir or "runs/demo"), max_items)
        return write_task(bench, out, extractor=extractor, max_new_tokens=max_new_tokens, name=name,
                          source=f"the held-out synthetic questions of {run_dir}")
    if data is None:
        raise ValueError(f"--suite {suite} needs --data (its test file, or the folder holding it)")
    bench = load_benchmark(suite, data, video_root=video_root, max_items=max_items)
    return write_task(bench, out, extractor=extractor, max_new_tokens=max_new_tokens, name=name)


def _synthetic_bench(run_dir: Path, max_items: int | None) -> MCBench:
    from capdpo.evaluation.mc.synthetic import synthetic_bench
    from capdpo.media.synthetic import load_scenes
    from capdpo.oracle import run_scenes_path
    from capdpo.rundir import RunPaths, require

    paths = RunPaths(run_dir)
    require("export", paths.videos, paths.qa)
    scenes = run_scenes_path(paths.top)
    if not scenes.exists():
        raise RecordError(f"{scenes}: not found; synthetic_mc is made from a run's synthetic clips (`capdpo data` "
                          "with data.synthetic_videos)")
    return synthetic_bench(paths.qa.read(), paths.videos.by_id(), load_scenes(scenes), max_items)
