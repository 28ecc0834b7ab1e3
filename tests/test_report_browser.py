"""The report in a real browser: headless Chromium driven by Selenium through chromedriver.

Checks that every chart and thumbnail decodes (naturalWidth > 0), and that the pair browser's
filter box and sortable columns work. With CAPDPO_UPDATE_SCREENSHOT=1 it also saves
docs/report_screenshot.png. Skips, saying why, where Chromium, chromedriver or selenium is absent
(Debian: `apt-get install -y chromium chromium-driver`; `pip install selenium`)."""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from capdpo.config import RunConfig
from capdpo.records import Candidate, EvalSummary, Judgment, Prediction, PreferencePair, QAItem, Video
from capdpo.report import write_report
from capdpo.rundir import RunPaths

SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "report_screenshot.png"
JUDGE = {"judge_backend": "hf", "judge_model": "judge-llm", "template": "caption_reward", "template_hash": "abc123def4567890"}
CHROME_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]
# question, chosen (score), rejected (score) of the pairs shown
PAIRS = [("What color is the ball?", "The ball is red.", 5, "It is blue.", 1),
         ("How many cubes are there?", "Two cubes.", 4, "There are five cubes.", 2),
         ("Where does the circle move?", "To the left.", 3, "It does not move.", 2),
         ("What shape is on top?", "A triangle is on top.", 5, "A square.", 3)]
ROUND_ONE = 2  # pairs of round 1; the others are round 2's


def find_browser() -> tuple[str, str]:
    """Paths of Chromium and chromedriver, or skip."""
    browser = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
    driver = shutil.which("chromedriver")
    if browser is None or driver is None:
        pytest.skip("headless browser test needs Chromium and chromedriver "
                    "(Debian: apt-get install -y chromium chromium-driver)")
    pytest.importorskip("selenium", reason="headless browser test needs selenium (pip install selenium)")
    return browser, driver


@pytest.fixture
def browser(tmp_path):
    binary, driver_path = find_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in [*CHROME_FLAGS, f"--user-data-dir={tmp_path / 'chrome-profile'}", "--window-size=1280,1600"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    yield driver
    driver.quit()


def frame_folder(folder: Path, hue: int) -> None:
    """A small frame folder: a coloured shape moving left to right."""
    folder.mkdir(parents=True)
    for i in range(6):
        img = Image.new("RGB", (96, 72), (235, 235, 240))
        ImageDraw.Draw(img).ellipse((8 + 12 * i, 24, 32 + 12 * i, 48), fill=(hue, 80, 255 - hue))
        img.save(folder / f"{i + 1:05d}.jpg")


def judgment(target: str, score: float, reply: str) -> Judgment:
    return Judgment(id=target, target_id=target, qa_id=target.split("#")[0], score=score, raw_reply=reply, prompt_hash="p", **JUDGE)


def write_round(paths: RunPaths, pairs: list[tuple], first: int) -> None:
    """One round's candidates, judgments, pairs and DPO metrics; clip ids count from ``first``."""
    cands, judged, rows = [], [], []
    for k, (question, chosen, cs, rejected, rs) in enumerate(pairs, start=first):
        vid, qid = f"clip{k}", f"clip{k}_0"
        for n, (answer, score) in enumerate(((chosen, cs), (rejected, rs))):
            cands.append(Candidate(id=f"{qid}#{n}", qa_id=qid, video_id=vid, answer=answer, model="sft", seed=n,
                                   temperature=1.0, top_p=0.95))
            judged.append(judgment(f"{qid}#{n}", score, f"Explanation: compared with the caption of clip {k}.\nScore: {score}"))
        rows.append(PreferencePair(id=qid, qa_id=qid, video_id=vid, video=f"{vid}.mp4", prompt=question, answer=chosen,
                                   chosen=chosen, rejected=rejected, chosen_score=cs, rejected_score=rs,
                                   chosen_id=f"{qid}#0", rejected_id=f"{qid}#1"))
    paths.candidates.write(cands)
    paths.judgments.write(judged)
    paths.pairs.write(rows)
    paths.train.mkdir(parents=True)
    scale = paths.round_number
    (paths.train / "metrics.jsonl").write_text("".join(json.dumps(
        {"step": s, "epoch": s / 8, "loss": 0.69 * (0.9 - 0.05 * scale)**s, "rewards/chosen": 0.05 * s / scale,
         "rewards/rejected": -0.04 * s, "rewards/accuracies": min(1.0, 0.5 + 0.08 * s),
         "rewards/margins": 0.09 * s / scale}) + "\n" for s in range(1, 9)))


def write_evaluation(paths: RunPaths, tag: str, dataset: str, answers: dict[str, tuple[str, float, str | None]],
                     protocol: str = "caption_reward") -> None:
    """Predictions, judgments and the summary of one evaluation (answers: question id -> (answer, score, verdict))."""
    paths.predictions(tag, dataset).write([Prediction(id=q, qa_id=q, video_id="clip0", answer=a, model=tag)
                                           for q, (a, _, _) in answers.items()])
    paths.eval_judgments(tag, dataset).write([judgment(q, s, f"Score: {s}").model_copy(update={"verdict": v})
                                              for q, (_, s, v) in answers.items()])
    scores = [s for _, s, _ in answers.values()]
    verdicts = [v for _, _, v in answers.values()]
    accuracy = verdicts.count("yes") / len(verdicts) if protocol == "video_chatgpt" else sum(s >= 3 for s in scores) / len(scores)
    summary = EvalSummary(id=tag if dataset == "held-out" else f"{dataset}/{tag}", tag=tag, dataset=dataset, protocol=protocol,
                          round=paths.round_number, model=tag, questions=len(answers), judged=len(answers), failed=0,
                          accuracy=accuracy, mean_score=sum(scores) / len(scores), pass_score=3.0, **JUDGE)
    paths.eval_summary.write([*paths.eval_summary.all(), summary] if paths.eval_summary.exists() else [summary])


@pytest.fixture
def report(tmp_path) -> Path:
    """A two-round run: four pairs in round 1 and two in round 2, training curves, held-out and
    MSVD-QA evaluations before and after each round, and a judge-agreement study."""
    from capdpo.evaluation.agreement import agreement, save_agreement

    paths = RunPaths(tmp_path / "demo-run")
    for k, (question, chosen, *_) in enumerate(PAIRS):
        frame_folder(paths.frames / f"clip{k}", 60 * k)
    paths.videos.write([Video(id=f"clip{k}", video=f"clip{k}.mp4", caption=f"Caption of clip {k}.") for k in range(len(PAIRS))])
    paths.qa.write([QAItem(id=f"clip{k}_0", video_id=f"clip{k}", question=q, answer=c) for k, (q, c, *_) in enumerate(PAIRS)]
                   + [QAItem(id="t_0", video_id="clip0", question="What rolls?", answer="a red ball", split="test")])
    write_round(paths, PAIRS[:ROUND_ONE], first=0)
    write_round(paths.round(2), PAIRS[ROUND_ONE:], first=ROUND_ONE)
    paths.suite_questions("msvd_qa").write([QAItem(id=f"m{i}", video_id="clip0", question=f"Question {i}?", answer="yes",
                                                   split="test") for i in range(4)])
    evaluations = [(paths, "before", 3, ["yes", "no", "no", "no"]), (paths, "after", 4, ["yes", "yes", "no", "no"]),
                   (paths.round(2), "after", 5, ["yes", "yes", "yes", "no"])]
    for where, tag, score, verdicts in evaluations:
        write_evaluation(where, tag, "held-out", {"t_0": (f"{tag} answer, round {where.round_number}", score, None)})
        write_evaluation(where, tag, "msvd_qa", {f"m{i}": (f"answer {i}", score - (v == "no"), v) for i, v in enumerate(verdicts)},
                         protocol="video_chatgpt")
    caption = {f"a{i}": float(s) for i, s in enumerate([5, 4, 2, 1, 3, 4])}
    frames = {f"a{i}": float(s) for i, s in enumerate([4, 4, 2, 2, 3, 5])}
    save_agreement(paths.agreement, agreement(caption, frames), "caption judge", "frame judge")
    return write_report(paths, RunConfig(run_dir=str(paths.root), rounds=2, policy={"model": "builtin:mini"}))


def column(driver, name: str) -> list:
    """The cells of the pair browser's column ``name`` in display order, visible rows only."""
    heads = [th.text.rstrip(" ▲▼") for th in driver.find_elements("css selector", "#pairs th")]
    selector = f"td:nth-child({heads.index(name) + 1})"
    return [r.find_element("css selector", selector) for r in driver.find_elements("css selector", "#pairs tbody tr")
            if r.is_displayed()]


def visible_questions(driver) -> list[str]:
    return [td.text for td in column(driver, "question")]


def sort_by(driver, name: str) -> list[float]:
    """Click header ``name``; the column's values after sorting."""
    next(th for th in driver.find_elements("css selector", "#pairs th") if th.text.startswith(name)).click()
    return [float(td.get_attribute("data-sort")) for td in column(driver, name)]


def test_report_renders_in_chromium(browser, report):
    browser.get(report.as_uri())
    images = browser.execute_script(
        "return Array.from(document.images).map(i => [i.className, i.complete && i.naturalWidth > 0]);")
    # counts, scores, pairs of each round (2), training, evaluation, agreement
    assert sum(c == "chart" for c, _ in images) == 7 and sum(c == "thumb" for c, _ in images) == 4 * len(PAIRS)
    assert all(ok for _, ok in images), f"images that did not decode: {[c for c, ok in images if not ok]}"

    count = browser.find_element("id", "pair-count")
    assert count.text == f"{len(PAIRS)} of {len(PAIRS)} pairs shown"  # the script ran on load
    box = browser.find_element("id", "pair-filter")
    box.send_keys("cubes")
    assert len(visible_questions(browser)) == 1 and "How many cubes" in visible_questions(browser)[0]
    assert count.text == f"1 of {len(PAIRS)} pairs shown"
    box.clear()
    box.send_keys("CLIP3 triangle")  # every word, any case, anywhere in the row (video id, answers)
    assert len(visible_questions(browser)) == 1 and "What shape" in visible_questions(browser)[0]
    box.send_keys("\b" * 40)
    assert len(visible_questions(browser)) == len(PAIRS)

    assert sort_by(browser, "margin") == [1, 2, 2, 4]
    assert sort_by(browser, "margin") == [4, 2, 2, 1]  # a second click reverses
    assert sort_by(browser, "round") == [1, 1, 2, 2]
    assert sort_by(browser, "chosen score") == [3, 4, 5, 5]

    if os.environ.get("CAPDPO_UPDATE_SCREENSHOT") == "1":
        save_screenshot(browser, SCREENSHOT)


def save_screenshot(driver, path: Path, max_height: int = 5600) -> None:
    """The whole page (up to ``max_height`` px) as a small palette PNG for the docs."""
    driver.execute_script("window.scrollTo(0, 0);")
    height = min(max_height, driver.execute_script("return document.documentElement.scrollHeight;"))
    driver.set_window_size(1280, height)
    shot = Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB")
    shot = shot.resize((shot.width * 3 // 4, shot.height * 3 // 4), Image.LANCZOS).quantize(colors=96)
    path.parent.mkdir(parents=True, exist_ok=True)
    shot.save(path, optimize=True)
    assert path.stat().st_size < 500_000, f"{path} is {path.stat().st_size} bytes"
