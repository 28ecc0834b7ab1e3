"""How often does a judge score a correct answer above a wrong one to the same question?

Runs any judge config on ``../shared/data/judge_cases.jsonl`` (real clips, human captions,
answers labelled correct / wrong) and prints wins / ties / losses over all (correct, wrong)
pairs of each question, plus failed judgments (never counted as a score).

    python benchmarks/judge_cases.py                                   # the embedded SmolLM2 judge, every scoring mode
    python benchmarks/judge_cases.py --set judge.mode=generate \\
        --set judge.llm.backend=openai --set judge.llm.base_url=http://127.0.0.1:8000/v1 \\
        --set judge.llm.model=Qwen/Qwen2.5-7B-Instruct                 # a stronger judge
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

from capdpo.config import load_config
from capdpo.judge.judge import CaptionJudge, JudgeItem
from capdpo.records import read_jsonl

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def load_cases(data: Path) -> tuple[list[JudgeItem], dict[str, str]]:
    videos = {row["id"]: row for _, row in read_jsonl(data / "real_videos.jsonl")}
    items, labels = [], {}
    for lineno, case in read_jsonl(data / "judge_cases.jsonl"):
        video = videos[case["video_id"]]
        reference = next(qa["a"] for qa in video["qa"] if qa["q"] == case["question"])
        qa_id = f"{case['video_id']}:{case['question']}"
        items.append(JudgeItem(f"{qa_id}#{lineno}", qa_id, video["caption"], case["question"], reference, case["candidate"]))
        labels[items[-1].target_id] = case["label"]
    return items, labels


def correct_above_wrong(items: list[JudgeItem], labels: dict[str, str], scores: dict[str, float | None]) -> dict[str, int]:
    tally = {"wins": 0, "ties": 0, "losses": 0, "unscored_pairs": 0}
    by_question = itertools.groupby(sorted(items, key=lambda it: it.qa_id), key=lambda it: it.qa_id)
    for _, group in by_question:
        group = list(group)
        for good, bad in itertools.product(group, group):
            if labels[good.target_id] != "correct" or labels[bad.target_id] != "wrong":
                continue
            a, b = scores[good.target_id], scores[bad.target_id]
            key = "unscored_pairs" if a is None or b is None else "wins" if a > b else "ties" if a == b else "losses"
            tally[key] += 1
    return tally


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", help="Run config YAML (its judge section is used).")
    ap.add_argument("--set", action="append", default=[], help="Config override, e.g. judge.mode=generate.")
    ap.add_argument("--modes", default=None, help="Comma-separated judge modes to compare (default: the config's).")
    ap.add_argument("--data", type=Path, default=SHARED, help="Folder with real_videos.jsonl and judge_cases.jsonl.")
    args = ap.parse_args()
    items, labels = load_cases(args.data)
    cfg = load_config(args.config, args.set)
    modes = args.modes.split(",") if args.modes else [cfg.judge.mode]
    llm = None
    print("| judge | mode | correct > wrong | ties | correct < wrong | failed judgments |\n|---|---|---|---|---|---|")
    for mode in modes:
        judge = CaptionJudge(cfg.judge.model_copy(update={"mode": mode}), cfg.cache_dir, llm=llm)
        llm = judge.llm  # load the model once for all modes
        judgments = judge.judge(items)
        tally = correct_above_wrong(items, labels, {j.target_id: j.score for j in judgments})
        pairs = tally["wins"] + tally["ties"] + tally["losses"] + tally["unscored_pairs"]
        failed = sum(j.score is None for j in judgments)
        print(f"| {judge.llm.backend}:{judge.model_id} | {mode} | {tally['wins']}/{pairs} | {tally['ties']} | "
              f"{tally['losses']} | {failed}/{len(judgments)} |")


if __name__ == "__main__":
    main()
