"""One policy on one local multiple-choice task, through capdpo's runner and through lmms-eval 0.7.3:
the two accuracies (and every item's answer) must be the same.

    make lmms-eval-venv     # lmms-eval 0.7.3 and capdpo in .venv-lmms-eval (its pins clash with ours)
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/lmms_eval_agreement.py --lmms-python .venv-lmms-eval/bin/python

1. a Video-MME copy: ``--videos`` synthetic clips (scene seeds 11 * 100_000 + i, used nowhere else)
   and ``--questions`` of each clip's questions as multiple choice (capdpo.evaluation.mc.synthetic:
   the scene's fact among the generator's vocabulary), written in Video-MME's parquet layout with
   the clips as ``data/<videoID>.mp4``;
2. capdpo's runner: ``capdpo evaluate --suite videomme`` (official extractor) in this venv;
3. ``capdpo export lmms-eval-task`` of the same file, then ``python -m lmms_eval --model capdpo
   --include_path ... --tasks capdpo_videomme --log_samples`` in the lmms-eval venv, offline;
4. per item, capdpo's answer and letter against lmms-eval's logged ones; both accuracies.

Both sides get the same settings: frames, answer length, one request per generate call, and
``processor=capdpo`` - lmms-eval's venv has torchvision, which makes ``processor: auto`` pick the
checkpoint's HF video processor there and capdpo's own here. Exit status 1 when they disagree.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from capdpo.config import RunConfig
from capdpo.evaluation.mc.extract import extract
from capdpo.evaluation.mc.items import read_videomme
from capdpo.evaluation.mc.prompts import mc_prompt
from capdpo.evaluation.mc.synthetic import synthetic_bench
from capdpo.media.synthetic import make_synthetic_dataset
from capdpo.records import EvalSummary, MCPrediction, QAItem, RecordFile

SEED = 11
TASK = "capdpo_videomme"


def videomme_copy(root: Path, videos: int, questions: int) -> Path:
    """The synthetic clips' MC questions in Video-MME's layout under ``root``; returns the parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    clips = make_synthetic_dataset(root / "clips", videos, seed=SEED)
    qa = [QAItem(id=f"{c.video.id}_{i}", video_id=c.video.id, question=q, answer=a, split="test", source="scene")
          for c in clips for i, (q, a, _) in enumerate(c.qa[:questions])]
    bench = synthetic_bench(qa, {c.video.id: c.video for c in clips}, {c.video.id: c.scene for c in clips})
    (root / "videomme" / "data").mkdir(parents=True, exist_ok=True)
    for c in clips:
        link = root / "videomme" / "data" / f"{c.video.id}.mp4"
        if not link.exists():
            link.symlink_to(Path(c.video.video).resolve())
    rows = [{"video_id": item.video[0].removeprefix("synth_"), "duration": "short", "domain": "Synthetic",
             "sub_category": item.categories["kind"], "url": "", "videoID": item.video[0], "question_id": item.id,
             "task_type": item.categories["kind"], "question": item.question,
             "options": [f"{x}. {o}" for x, o in zip(item.letters, item.options)], "answer": item.answer} for item in bench.items]
    data = root / "videomme" / "test-00000-of-00001.parquet"
    pq.write_table(pa.Table.from_pylist(rows), data)
    return data


def run(cmd: list[str], log: Path, env: dict | None = None) -> float:
    """Run ``cmd`` (output to ``log``); its wall time in seconds, or exit with its log's tail."""
    start = time.perf_counter()
    with log.open("w") as f:
        done = subprocess.run(cmd, check=False, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    if done.returncode != 0:
        sys.exit(f"failed ({done.returncode}): {' '.join(cmd)}\n{log.read_text()[-4000:]}")
    return time.perf_counter() - start


def lmms_eval_outputs(out: Path, log: Path) -> tuple[float, dict[str, dict]]:
    """lmms-eval's accuracy of the task and its logged samples by item id (lmms-eval exits 0 after
    an error: no results file is how it shows)."""
    results, samples = sorted(out.rglob("*_results.json"))[-1:], sorted(out.rglob(f"*_samples_{TASK}.jsonl"))[-1:]
    if not results or not samples:
        sys.exit(f"lmms-eval wrote no results under {out}; its log {log} ends:\n{log.read_text()[-4000:]}")
    [results], [samples] = results, samples
    accuracy = json.loads(results.read_text())["results"][TASK]["accuracy,none"]
    rows = [json.loads(line) for line in samples.read_text().splitlines() if line.strip()]
    return accuracy, {row["accuracy_answered"]["id"]: row for row in rows}  # the log keeps no doc; the metric names it


def first_text(value) -> str:
    """A logged response: lmms-eval nests it in lists."""
    while isinstance(value, list):
        value = value[0]
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lmms-python", default=".venv-lmms-eval/bin/python", help="Python of the lmms-eval venv.")
    parser.add_argument("--model", default="builtin:mini", help="The policy (capdpo's policy.model).")
    parser.add_argument("--videos", type=int, default=6, help="Synthetic clips.")
    parser.add_argument("--questions", type=int, default=2, help="Questions per clip.")
    parser.add_argument("--num-frames", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=8, help="Answer length (synthetic_mc's in the demo).")
    parser.add_argument("--work", type=Path, default=Path("/tmp/capdpo-lmms-eval-agreement"), help="Working folder.")
    args = parser.parse_args()
    work, cache = args.work.resolve(), RunConfig().cache_dir
    work.mkdir(parents=True, exist_ok=True)
    data = videomme_copy(work, args.videos, args.questions)
    videos = data.parent / "data"
    capdpo = [sys.executable, "-m", "capdpo.cli"]

    settings = [f"policy.model={args.model}", "policy.processor=capdpo", f"frames.num_frames={args.num_frames}",
                f"evaluate.max_new_tokens={args.max_new_tokens}", "evaluate.batch_size=1", f"cache_dir={cache}"]
    # answered afresh each time (a finished evaluation would load no model): the wall time is the runner's
    (work / "run" / "eval" / "videomme" / "agreement_predictions.jsonl").unlink(missing_ok=True)
    capdpo_seconds = run([*capdpo, "evaluate", "--run-dir", str(work / "run"), *(x for s in settings for x in ("--set", s)),
                          "--suite", "videomme", "--data", str(data), "--video-root", str(videos), "--tag", "agreement"],
                         work / "capdpo_evaluate.log")
    summaries = {s.id: s for s in RecordFile(work / "run" / "eval" / "summary.jsonl", EvalSummary).all()}
    summary = summaries["videomme/agreement"]
    ours = {p.id: p for p in RecordFile(work / "run" / "eval" / "videomme" / "agreement_predictions.jsonl", MCPrediction).all()}

    run([*capdpo, "export", "lmms-eval-task", str(work / "tasks"), "--suite", "videomme", "--data", str(data),
         "--video-root", str(videos), "--max-new-tokens", str(args.max_new_tokens)], work / "export.log")
    lmms_out = work / "lmms_eval_out"
    model_args = f"pretrained={args.model},num_frames={args.num_frames},processor=capdpo,cache_dir={cache}"
    lmms_cmd = [args.lmms_python, "-m", "lmms_eval", "--model", "capdpo", "--model_args", model_args, "--tasks", TASK,
                "--include_path", str(work / "tasks"), "--batch_size", "1", "--output_path", str(lmms_out), "--log_samples"]
    offline = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(work / "hf_home"), "CAPDPO_CACHE": cache}
    shutil.rmtree(lmms_out, ignore_errors=True)  # only this run's results
    lmms_seconds = run(lmms_cmd, work / "lmms_eval.log", offline)
    lmms_accuracy, theirs = lmms_eval_outputs(lmms_out, work / "lmms_eval.log")

    items = {item.id: item for item in read_videomme(data)}
    differ = []
    for item_id, item in items.items():
        answer, logged = first_text(theirs[item_id]["filtered_resps"]), theirs[item_id]["accuracy_answered"]
        if theirs[item_id]["input"] != mc_prompt("videomme", item).text:
            differ.append(f"  {item_id}: lmms-eval asked {theirs[item_id]['input']!r}")
        if (answer.strip(), logged["extracted"], logged["correct"]) != (ours[item_id].answer, ours[item_id].extracted,
                                                                        ours[item_id].correct):
            differ.append(f"  {item_id}: capdpo {ours[item_id].answer!r} -> {ours[item_id].extracted or '-'}, lmms-eval "
                          f"{answer!r} -> {logged['extracted'] or '-'} (recomputed {extract('videomme', 'official', item, answer) or '-'})")
    print(f"items: {len(items)} ({args.videos} synthetic clips x {args.questions} questions, Video-MME layout, "
          f"official extractor), policy {args.model}, {args.num_frames} frames, {args.max_new_tokens} answer tokens")
    print(f"capdpo evaluate : accuracy {summary.accuracy:.4f} ({sum(p.correct for p in ours.values())}/{len(ours)}), "
          f"{capdpo_seconds:.0f} s wall (model load included)")
    print(f"lmms-eval 0.7.3 : accuracy {lmms_accuracy:.4f}, {lmms_seconds:.0f} s wall (lmms-eval start and model load included)")
    print(f"lmms-eval command: {' '.join(lmms_cmd)}")
    if differ or abs(lmms_accuracy - summary.accuracy) > 1e-12:
        print(f"DISAGREE on {len(differ)} item(s):\n" + "\n".join(differ))
        sys.exit(1)
    print(f"agree: the same prompt, answer, letter and score on all {len(items)} items")


if __name__ == "__main__":
    main()
