"""The lmms-eval hand-off without lmms-eval: the task folder `capdpo export lmms-eval-task` writes
(its YAML, docs and utils.py, loaded as lmms-eval loads them) asks with capdpo's prompt and scores
with capdpo's extractor; the `capdpo` model, run under a stand-in for lmms-eval's base class, gives
capdpo's runner's answers on the same items. Where lmms-eval is installed (the venv of `make
lmms-eval-venv`), its registry is checked to find the model; benchmarks/lmms_eval_agreement.py runs
the real thing end to end."""

from __future__ import annotations

import importlib
import importlib.util
import json
import re
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from typer.testing import CliRunner

from capdpo.cli import app
from capdpo.config import EvaluateConfig, FramesConfig
from capdpo.evaluation.mc.extract import extract
from capdpo.evaluation.mc.items import load_benchmark
from capdpo.evaluation.mc.lmms_eval_task import doc_prompt, doc_video, write_task
from capdpo.evaluation.mc.prompts import mc_prompt
from capdpo.evaluation.stage import run_multiple_choice
from capdpo.media.synthetic import random_scene, render_scene
from capdpo.records import ClipWindow, ForeignFolderError, MCPrediction, RecordFile

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

QUESTIONS = [  # (question id, video, question, options, answer)
    ("1-1", "clip_a", "How many shapes are there?", ["one", "two", "three", "four"], "B"),
    ("1-2", "clip_a", "What colour is the circle at the start?", ["red", "blue", "green", "yellow"], "C"),
    ("2-1", "clip_b", "Does the square move?", ["Yes", "No"], "A"),
    ("3-1", "gone", "Which way does it move?", ["left", "right", "up", "down"], "D"),
]


def videomme_copy(root: Path) -> tuple[Path, Path]:
    """A Video-MME parquet (its columns) over two rendered clips; the third video is missing."""
    rows = [{"video_id": qid.split("-")[0], "duration": "short", "domain": "Synthetic", "sub_category": "shapes", "url": "",
             "videoID": video, "question_id": qid, "task_type": "Counting Problem" if i == 0 else "Attribute Perception",
             "question": q, "options": [f"{'ABCD'[k]}. {o}" for k, o in enumerate(options)], "answer": answer}
            for i, (qid, video, q, options, answer) in enumerate(QUESTIONS)]
    data = root / "videomme" / "test-00000-of-00001.parquet"
    data.parent.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), data)
    for seed, name in enumerate(("clip_a", "clip_b")):
        render_scene(random_scene(seed, width=64, height=64, n_frames=16), root / "videos" / "data" / f"{name}.mp4")
    return data, root / "videos"


class FunctionTag(str):
    """A ``!function module.name`` of a task YAML, as written."""


def read_task_yaml(path: Path) -> dict:
    loader = type("TaskLoader", (yaml.SafeLoader,), {})
    loader.add_constructor("!function", lambda load, node: FunctionTag(load.construct_scalar(node)))
    return yaml.load(path.read_text(), Loader=loader)


def task_functions(folder: Path, yaml_config: dict) -> dict:
    """The YAML's ``!function utils.x`` resolved as lmms-eval resolves them (the module by file path)."""
    spec = importlib.util.spec_from_file_location("utils", folder / "utils.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    named = {key: value for key, value in yaml_config.items() if isinstance(value, FunctionTag)}
    named |= {m["metric"]: m["aggregation"] for m in yaml_config["metric_list"] if isinstance(m["aggregation"], FunctionTag)}
    return {key: getattr(module, tag.split(".", 1)[1]) for key, tag in named.items()}


def read_docs(yaml_config: dict) -> list[dict]:
    with open(yaml_config["dataset_kwargs"]["data_files"]["test"], encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def export(out: Path, *args: str):
    return CliRunner().invoke(app, ["export", "lmms-eval-task", str(out), *args], catch_exceptions=False)


def test_exported_task_asks_and_scores_as_capdpo(tmp_path):
    data, videos = videomme_copy(tmp_path)
    result = export(tmp_path / "tasks" / "official", "--suite", "videomme", "--data", str(data), "--video-root", str(videos),
                    "--max-new-tokens", "8")
    assert result.exit_code == 0, result.output
    assert "lmms-eval task capdpo_videomme: 3 items (1 without a video left out)" in result.output
    folder = tmp_path / "tasks" / "official"
    config = read_task_yaml(folder / "capdpo_videomme.yaml")
    assert (config["task"], config["dataset_path"], config["test_split"], config["output_type"]) == (
        "capdpo_videomme", "json", "test", "generate_until")
    assert Path(config["dataset_kwargs"]["data_files"]["test"]).is_absolute()
    assert config["generation_kwargs"] == {"max_new_tokens": 8, "temperature": 0, "do_sample": False, "until": []}
    assert [m["metric"] for m in config["metric_list"]] == ["accuracy", "accuracy_answered"]
    assert config["metric_list"][0]["aggregation"] == "mean"
    functions = task_functions(folder, config)
    assert set(functions) == {"doc_to_visual", "doc_to_text", "process_results", "accuracy_answered"}

    items = {item.id: item for item in load_benchmark("videomme", data, video_root=videos).items}
    docs = read_docs(config)
    assert [d["id"] for d in docs] == ["1-1", "1-2", "2-1"] and all(d["answer"] == items[d["id"]].answer for d in docs)
    for doc in docs:
        assert functions["doc_to_text"](doc) == mc_prompt("videomme", items[doc["id"]]).text
        assert functions["doc_to_visual"](doc) == [str((videos / "data" / f"{items[doc['id']].video[0]}.mp4").resolve())]

    # verbose answers, where the two extractors disagree (the golden strings of tests/test_mc.py)
    assert export(tmp_path / "tasks" / "lmms", "--suite", "videomme", "--data", str(data), "--video-root", str(videos),
                  "--extractor", "lmms-eval").exit_code == 0
    lmms_config = read_task_yaml(tmp_path / "tasks" / "lmms" / "capdpo_videomme.yaml")
    lmms_functions = task_functions(tmp_path / "tasks" / "lmms", lmms_config)
    answers = {"1-1": "B", "1-2": "Based on the video, the answer is C.", "2-1": "The answer is A because option B is wrong."}
    for name, score, extractor in (("official", functions, "official"), ("lmms-eval", lmms_functions, "lmms-eval")):
        rows = [score["process_results"](doc, [answers[doc["id"]]]) for doc in docs]
        expected = [extract("videomme", extractor, items[doc["id"]], answers[doc["id"]]) for doc in docs]
        assert [r["accuracy_answered"]["extracted"] for r in rows] == expected, name
        assert [r["accuracy"] for r in rows] == [float(e == items[d["id"]].answer) for e, d in zip(expected, docs)]
    official = [functions["process_results"](doc, [answers[doc["id"]]]) for doc in docs]
    assert [r["accuracy_answered"]["extracted"] for r in official] == ["B", "B", "A"]  # "Based" reads B officially
    assert functions["accuracy_answered"]([r["accuracy_answered"] for r in official]) == pytest.approx(2 / 3)


def test_mvbench_docs_keep_the_window_system_turn_and_prefill(tmp_path):
    folder = tmp_path / "MVBench" / "json"
    folder.mkdir(parents=True)
    (folder / "action_sequence.json").write_text(json.dumps([
        {"video": "clip.mp4", "question": "What happened first?", "candidates": ["It sat.", "It moved."],
         "answer": "It moved.", "start": 0.5, "end": 1.5}]))
    render_scene(random_scene(3, width=64, height=64, n_frames=16), tmp_path / "video" / "star" / "Charades_v1_480" / "clip.mp4")
    bench = load_benchmark("mvbench", folder, video_root=tmp_path / "video")
    export_ = write_task(bench, tmp_path / "tasks")
    [doc] = read_docs(read_task_yaml(tmp_path / "tasks" / f"{export_.task}.yaml"))
    asked = doc_prompt(doc)
    assert asked == mc_prompt("mvbench", bench.items[0]) and asked.prefill == "Best option:(" and asked.system
    assert doc_video(doc).window == ClipWindow(start=0.5, end=1.5)
    assert doc_video(doc).video == str((tmp_path / "video" / "star" / "Charades_v1_480" / "clip.mp4").resolve())


def test_export_refusals(tmp_path):
    data, videos = videomme_copy(tmp_path)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("not capdpo's")
    with pytest.raises(ForeignFolderError, match="did not make"):
        write_task(load_benchmark("videomme", data, video_root=videos), foreign)
    assert (foreign / "notes.txt").exists()
    again = write_task(load_benchmark("videomme", data, video_root=videos, max_items=1), tmp_path / "task")
    assert write_task(load_benchmark("videomme", data, video_root=videos), tmp_path / "task").docs == 3 and again.docs == 1
    with pytest.raises(ValueError, match="no item has its video"):
        write_task(load_benchmark("videomme", data, video_root=tmp_path), tmp_path / "none")
    questions = tmp_path / "TempCompass" / "questions"
    questions.mkdir(parents=True)
    (questions / "multi-choice.json").write_text(json.dumps({"v": {"action": [{"question": "Q?\nA. x\nB. y", "answer": "A. x"}]}}))
    (questions / "captioning.json").write_text(json.dumps({"v": {"action": [
        {"question": "Info\nInformation A: a\nInformation B: b\nGenerated Caption:", "answer": "A. x"}]}}))
    render_scene(random_scene(0, width=64, height=64, n_frames=16), questions / "v.mp4")
    with pytest.raises(ValueError, match="captioning is scored only by an LLM judge"):
        write_task(load_benchmark("tempcompass", questions / "captioning.json"), tmp_path / "caption")
    assert export(tmp_path / "x", "--data", str(data)).exit_code != 0  # no --suite
    result = CliRunner().invoke(app, ["export", "trl", str(tmp_path / "t.jsonl"), "--suite", "videomme"])
    assert result.exit_code == 2 and "are for lmms-eval-task" in re.sub(r"[\s│]+", " ", result.output)  # rich boxes the message


# -- the capdpo model, under a stand-in for lmms-eval's base class ------------------------------------------

@pytest.fixture
def plugin(monkeypatch):
    """capdpo.integrations.lmms_eval_model imported against a minimal ``lmms_eval.api.model.lmms``
    (what the model uses of it: rank and task_dict), removed again afterwards."""
    if importlib.util.find_spec("lmms_eval") is None:
        class lmms:  # lmms-eval's name for it
            is_simple = True

            def __init__(self):
                self._rank, self.task_dict = 0, {}

            @property
            def rank(self):
                return self._rank

        for name in ("lmms_eval", "lmms_eval.api"):
            monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
        model = types.ModuleType("lmms_eval.api.model")
        model.lmms = lmms
        monkeypatch.setitem(sys.modules, "lmms_eval.api.model", model)
    sys.modules.pop("capdpo.integrations.lmms_eval_model", None)
    yield importlib.import_module("capdpo.integrations.lmms_eval_model")
    sys.modules.pop("capdpo.integrations.lmms_eval_model", None)


def test_plugin_answers_as_capdpo_runner(tmp_path, plugin, tiny_policy_dir, cache_dir):
    data, videos = videomme_copy(tmp_path)
    bench = load_benchmark("videomme", data, video_root=videos)
    frames = FramesConfig(num_frames=4)
    from capdpo.models.load import load_policy

    out = RecordFile(tmp_path / "predictions.jsonl", MCPrediction)
    summary = run_multiple_choice("t", bench, out, EvaluateConfig(batch_size=1, max_new_tokens=6), frames,
                                  policy=lambda: load_policy(str(tiny_policy_dir), cache_dir))
    runner = {p.id: p for p in out.all() if p.error is None}

    export_ = write_task(bench, tmp_path / "task", max_new_tokens=6)
    config = read_task_yaml(tmp_path / "task" / f"{export_.task}.yaml")
    functions, docs = task_functions(tmp_path / "task", config), read_docs(config)
    model = plugin.CapdpoVideoLMM(pretrained=str(tiny_policy_dir), cache_dir=str(cache_dir), num_frames=4, batch_size="1")
    model.task_dict = {export_.task: {"test": docs}}
    requests = [SimpleNamespace(args=(functions["doc_to_text"](doc), dict(config["generation_kwargs"]), functions["doc_to_visual"],
                                      i, export_.task, "test")) for i, doc in enumerate(docs)]
    answers = model.generate_until(requests)
    assert answers == [runner[doc["id"]].answer for doc in docs]
    scored = [functions["process_results"](doc, [answer.strip()]) for doc, answer in zip(docs, answers)]
    assert sum(r["accuracy"] for r in scored) / len(scored) == pytest.approx(summary.accuracy)


def test_plugin_settings_and_requests(tmp_path, plugin):
    assert plugin.generation_of({"max_new_tokens": 5, "temperature": 0.7, "do_sample": False, "until": "\n"}, "t") == \
        plugin.Generation(5, 0.0, 1.0, ("\n",))
    assert plugin.generation_of({}, "t").max_new_tokens == 64
    with pytest.raises(ValueError, match="beam"):
        plugin.generation_of({"num_beams": 4}, "t")
    assert plugin.cut("B. two\n\nBecause", ("\n\n",)) == "B. two"
    video = tmp_path / "clip.mp4"
    video.write_bytes(b"")
    foreign = plugin.request_video({"question": "q"}, [str(video)], "other_task")
    assert foreign.video == str(video.resolve()) and foreign.window is None
    with pytest.raises(ValueError, match="one video"):
        plugin.request_video({"question": "q"}, [object(), object()], "image_task")
    assert plugin.request_prompt({"question": "q"}, "the context").text == "the context"
    with pytest.raises(ValueError, match="unknown model_args"):
        plugin.CapdpoVideoLMM(pretrained="builtin:mini", frames=8)
    with pytest.raises(ValueError, match="num_frames"):
        plugin.CapdpoVideoLMM(pretrained="builtin:mini", num_frames=0)


def test_lmms_eval_finds_the_capdpo_model():
    pytest.importorskip("lmms_eval", reason="lmms-eval lives in its own venv (make lmms-eval-venv)")
    from lmms_eval.models import get_model

    assert get_model("capdpo").__name__ == "CapdpoVideoLMM"
