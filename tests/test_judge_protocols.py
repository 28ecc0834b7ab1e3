"""Judge protocols with scripted LLMs: Video-ChatGPT, pairwise in both orders, frames evidence."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image
from test_judge import ScriptedLLM, item

from capdpo.config import JudgeConfig, LLMConfig
from capdpo.errors import BudgetExceeded
from capdpo.judge.judge import CaptionJudge, JudgeItem, caption_messages, chat_messages
from capdpo.judge.parse import parse_pairwise, parse_video_chatgpt
from capdpo.judge.stage import estimate
from capdpo.llm import Reply

MAIN = LLMConfig(backend="openai", model="scripted-judge")


def make_judge(script, llm=None, **cfg) -> CaptionJudge:
    return CaptionJudge(JudgeConfig(llm=MAIN, **cfg), cache_dir=".", llm=llm or ScriptedLLM(script))


# -- video_chatgpt ---------------------------------------------------------------------------

VIDEO_CHATGPT_CASES = [
    ("python dict", "{'pred': 'yes', 'score': 4}", ("yes", 4)),
    ("JSON", '{"pred": "no", "score": 1}', ("no", 1)),
    ("upper-case yes", "{'pred': 'YES', 'score': 5}", ("yes", 5)),
    ("capitalised keys", "{'Pred': 'No', 'Score': 0}", ("no", 0)),
    ("zero is valid", "{'pred': 'no', 'score': 0}", ("no", 0)),
    ("integer-valued float", "{'pred': 'yes', 'score': 3.0}", ("yes", 3)),
    ("inside fences", "```python\n{'pred': 'yes', 'score': 4}\n```", ("yes", 4)),
    ("same dict twice", "{'pred': 'yes', 'score': 4} {'pred': 'yes', 'score': 4}", ("yes", 4)),
    ("score 6", "{'pred': 'yes', 'score': 6}", None),
    ("negative score", "{'pred': 'no', 'score': -1}", None),
    ("fractional score", "{'pred': 'yes', 'score': 4.8}", None),
    ("missing pred", "{'score': 4}", None),
    ("missing score", "{'pred': 'yes'}", None),
    ("pred not yes/no", "{'pred': 'maybe', 'score': 3}", None),
    ("boolean score", '{"pred": "yes", "score": true}', None),
    ("two dicts disagree", "{'pred': 'yes', 'score': 4}\n{'pred': 'no', 'score': 1}", None),
    ("prose", "The prediction matches the answer, so yes with a score of 4.", None),
    ("empty", "", None),
    ("score line only", "Score: 4", None),
]


@pytest.mark.parametrize("text, expected", [c[1:] for c in VIDEO_CHATGPT_CASES], ids=[c[0] for c in VIDEO_CHATGPT_CASES])
def test_parse_video_chatgpt(text, expected):
    assert parse_video_chatgpt(text) == expected


def test_video_chatgpt_protocol_prompt_scale_verdict_and_reask():
    judge = make_judge({"alpha": [Reply("{'pred': 'no', 'score': 0}", 0.1)],
                        "beta": [Reply("Looks right", 0.1), Reply("{'pred': 'yes', 'score': 5}", 0.1)]},
                       protocol="video_chatgpt")
    a, b = judge.judge([item("q#0", "alpha"), item("q#1", "beta")])
    assert (a.score, a.verdict, a.failure) == (0, "no", None)  # 0 is on this protocol's scale
    assert (b.score, b.verdict, b.attempts) == (5, "yes", 2)
    assert a.template == "video_chatgpt" and a.params["protocol"] == "video_chatgpt"
    prompt = judge.llm.prompts[0]
    assert "What moves?" in prompt and "A red circle." in prompt and "alpha" in prompt
    assert "A red circle moves left." not in prompt  # no caption in this protocol
    assert "{'pred': 'yes', 'score': 4}" in prompt  # the braces of the example survive formatting
    assert "'pred': 'yes' or 'no'" in judge.llm.prompts[2]  # the re-ask asks for the dict again


def test_video_chatgpt_failure_and_majority_verdict():
    judge = make_judge({"alpha": [Reply("{'pred': 'yes', 'score': 7}", 0.1)] * 2}, protocol="video_chatgpt")
    [j] = judge.judge([item("q#0", "alpha")])
    assert j.score is None and j.verdict is None and "no valid {'pred': yes/no, 'score': 0-5} dict" in j.failure
    votes = ["{'pred': 'yes', 'score': 4}", "{'pred': 'no', 'score': 2}", "{'pred': 'yes', 'score': 3}", "{'pred': 'no', 'score': 1}"]
    judge = make_judge({"alpha": [Reply(v, 0.1) for v in votes[:3]]}, protocol="video_chatgpt", samples=3)
    assert judge.judge([item("q#0", "alpha")])[0].verdict == "yes"
    judge = make_judge({"alpha": [Reply(v, 0.1) for v in votes]}, protocol="video_chatgpt", samples=4)
    [tie] = judge.judge([item("q#0", "alpha")])
    assert tie.verdict is None and tie.score == 2.5  # a 2-2 split is no verdict


def test_explicit_template_wins_over_the_protocol(tmp_path):
    custom = tmp_path / "mine.txt"
    custom.write_text("Q {question} A {answer} P {prediction}\n")
    judge = make_judge({}, protocol="video_chatgpt", template=str(custom))
    assert judge.template.name == "mine"
    assert make_judge({}).template.name == "caption_reward"


def test_a_distilled_judge_is_asked_with_the_template_it_learned(tmp_path):
    """A judge folder with distill.json (and builtin:judge-mini, built in the cache dir) brings its
    template when judge.template is unset; other protocols, frames evidence, an explicit template
    and every other model keep theirs."""
    from capdpo.config import BUILTIN_JUDGE
    from capdpo.judge.judge import default_template
    from capdpo.packaged import JUDGE_MINI

    student = tmp_path / "student"
    student.mkdir()
    (student / "distill.json").write_text('{"config": {"template": "short_caption_reward"}}')
    (tmp_path / JUDGE_MINI).mkdir()
    (tmp_path / JUDGE_MINI / "distill.json").write_text('{"config": {"template": "reward_no_caption"}}')

    def template(model, **cfg):
        return default_template(JudgeConfig(llm=LLMConfig(backend="openai", model=model), **cfg), tmp_path)

    assert template(str(student)) == "short_caption_reward"
    assert template(BUILTIN_JUDGE) == "reward_no_caption"
    assert template(str(student), protocol="video_chatgpt", mode="generate") == "video_chatgpt"
    assert template(str(student), evidence="frames") == "caption_reward_frames"
    assert template("Qwen/Qwen2.5-7B-Instruct") == template(str(tmp_path)) == "caption_reward"
    judge = CaptionJudge(JudgeConfig(llm=LLMConfig(backend="openai", model=str(student))), tmp_path, llm=ScriptedLLM({}))
    assert judge.template.name == "short_caption_reward"
    judge = CaptionJudge(JudgeConfig(llm=LLMConfig(backend="openai", model=str(student)), template="caption_reward"), tmp_path,
                         llm=ScriptedLLM({}))
    assert judge.template.name == "caption_reward"


def test_each_caption_template_has_a_twin_without_the_caption():
    from capdpo.prompts import WITHOUT_CAPTION, load_template, without_caption

    for with_caption, twin in WITHOUT_CAPTION.items():
        assert "{caption}" in load_template(with_caption).text and "{caption}" not in load_template(twin).text
        assert load_template(with_caption).text.replace("{caption}", "").count("{") == load_template(twin).text.count("{")
    assert without_caption("/some/dir/short_caption_reward.txt") == "short_reward_no_caption"
    with pytest.raises(ValueError, match="repro.no_caption_template"):
        without_caption("caption_reward_frames")


def test_constrained_mode_needs_the_plain_caption_reward():
    for bad in ({"protocol": "video_chatgpt"}, {"samples": 3}, {"evidence": "frames"}):
        with pytest.raises(ValueError, match="needs protocol caption_reward, samples=1"):
            make_judge({}, mode="expected", **bad)  # refused from the config, before any model is looked at


# -- pairwise --------------------------------------------------------------------------------

PAIRWISE_CASES = [
    ("plain 1", "Explanation: more complete.\nBetter: 1", "1"),
    ("plain 2", "Better: 2", "2"),
    ("tie", "Better: tie", "tie"),
    ("Tie capitalised", "better: Tie", "tie"),
    ("bold label", "**Better:** 2", "2"),
    ("answer word", "Better: Answer 1", "1"),
    ("repeated same", "Better: 1\nSo again, Better: 1", "1"),
    ("hedge", "Better: 1 or 2", None),
    ("conflict", "Better: 1\nActually Better: 2", None),
    ("template echo", "Better: <1, 2 or tie>", None),
    ("prose", "Answer 1 is clearly better.", None),
    ("empty", "", None),
]


@pytest.mark.parametrize("text, expected", [c[1:] for c in PAIRWISE_CASES], ids=[c[0] for c in PAIRWISE_CASES])
def test_parse_pairwise(text, expected):
    assert parse_pairwise(text) == expected


class OrderLLM(ScriptedLLM):
    """Replies to a pairwise prompt from the answer shown first (keyed by its text)."""

    def chat(self, prompts, **_):
        self.prompts += prompts
        return [self.script[p.split("4. Answer 1: ")[1].split("\n")[0]].pop(0) for p in prompts]


def pair(a_reply: str, b_reply: str):
    """(result, prompts) when the judge answers ``a_reply`` with A first and ``b_reply`` with B first."""
    llm = OrderLLM({"answer A": [Reply(a_reply, 0.1)], "answer B": [Reply(b_reply, 0.1)]})
    judge = make_judge({}, llm=llm)
    result = judge.pairwise_preference(item("q#0", "answer A"), item("q#1", "answer B"))
    return result, llm.prompts


def test_pairwise_asks_both_orders_and_keeps_a_consistent_preference():
    result, prompts = pair("Better: 1", "Better: 2")  # A wins in both positions
    assert result.preference == 1 and (result.verdict_ab, result.verdict_ba) == ("A", "A")
    assert not result.position_bias and result.failure is None
    assert "4. Answer 1: answer A\n5. Answer 2: answer B" in prompts[0]
    assert "4. Answer 1: answer B\n5. Answer 2: answer A" in prompts[1]
    assert "A red circle moves left." in prompts[0] and result.reply_ab == "Better: 1" and result.reply_ba == "Better: 2"
    assert pair("Better: 2", "Better: 1")[0].preference == -1


def test_pairwise_disagreement_is_position_bias_and_ties_are_zero():
    biased, _ = pair("Better: 1", "Better: 1")  # always the first shown: the order decided
    assert biased.preference == 0 and biased.position_bias and (biased.verdict_ab, biased.verdict_ba) == ("A", "B")
    tie, _ = pair("Better: tie", "Better: tie")
    assert tie.preference == 0 and not tie.position_bias
    half, _ = pair("Better: tie", "Better: 2")
    assert half.preference == 0 and half.position_bias


def test_pairwise_failure_is_not_a_preference():
    result, _ = pair("I cannot decide", "Better: 2")
    assert result.preference is None and "no 'Better: 1|2|tie' in the (A, B) reply" in result.failure
    llm = OrderLLM({"answer A": [Reply("", 0.1, error="HTTP 500")], "answer B": [Reply("Better: 1", 0.1)]})
    result = make_judge({}, llm=llm).pairwise_preference(item("q#0", "answer A"), item("q#1", "answer B"))
    assert result.preference is None and "judge backend failed on the (A, B) order: HTTP 500" in result.failure


def test_pairwise_checks_question_and_budget():
    judge = make_judge({})
    other = JudgeItem("z#0", "z", "cap", "q", "r", "a")
    with pytest.raises(ValueError, match="one question"):
        judge.pairwise_preference(item("q#0", "a"), other)
    judge = make_judge({}, max_requests=1)
    with pytest.raises(BudgetExceeded):
        judge.pairwise_preference(item("q#0", "a"), item("q#1", "b"))
    assert judge.llm.prompts == []


# -- frames evidence -------------------------------------------------------------------------

def frame_folder(tmp_path, colours=("red", "green", "blue", "white")):
    folder = tmp_path / "clip"
    folder.mkdir()
    for i, colour in enumerate(colours):
        Image.new("RGB", (48, 32), colour).save(folder / f"{i + 1:05d}.jpg")
    return folder


def decode(part: dict) -> Image.Image:
    prefix = "data:image/jpeg;base64,"
    url = part["image_url"]["url"]
    assert part["type"] == "image_url" and url.startswith(prefix)
    return Image.open(io.BytesIO(base64.b64decode(url[len(prefix):])))


def test_chat_messages_images_in_order_then_text(tmp_path):
    jpegs = []
    for colour in ("red", "blue"):
        buf = io.BytesIO()
        Image.new("RGB", (8, 8), colour).save(buf, format="JPEG")
        jpegs.append(buf.getvalue())
    [message] = chat_messages("judge this", jpegs)
    assert message["role"] == "user"
    first, second, text = message["content"]
    assert decode(first).getpixel((4, 4))[0] > 200 and decode(second).getpixel((4, 4))[2] > 200
    assert text == {"type": "text", "text": "judge this"}
    assert chat_messages("plain") == [{"role": "user", "content": "plain"}]


def test_caption_messages_use_the_detailed_caption_prompt(tmp_path):
    [message] = caption_messages(frame_folder(tmp_path), num_frames=2, size=16)
    *images, text = message["content"]
    assert [decode(p).size for p in images] == [(16, 16), (16, 16)]
    assert "on screen" in text["text"] and "temporal order" in text["text"]


class VisionLLM(ScriptedLLM):
    """A ScriptedLLM that also takes multimodal messages, like the openai backend."""

    def __init__(self, script):
        super().__init__(script)
        self.messages = []

    def chat_messages(self, conversations, **_):
        self.messages += conversations
        return self.chat([c[-1]["content"][-1]["text"] for c in conversations])


def test_frames_mode_sends_sampled_frames_instead_of_the_caption(tmp_path):
    llm = VisionLLM({"alpha": [Reply("Score: 4", 0.1)], "beta": [Reply("Score: 2", 0.1)]})
    judge = make_judge({}, llm=llm, evidence="frames", frames_num=3, frames_size=16)
    video = str(frame_folder(tmp_path))
    items = [JudgeItem("q#0", "q", "CAPTION-TEXT", "What moves?", "A red circle.", "alpha", video),
             JudgeItem("q#1", "q", "CAPTION-TEXT", "What moves?", "A red circle.", "beta", str(tmp_path / "missing"))]
    ok, missing = judge.judge(items)
    assert ok.score == 4 and ok.template == "caption_reward_frames"
    assert ok.params["evidence"] == "frames" and ok.params["frames_num"] == 3
    assert missing.score is None and missing.failure.startswith("frames: ") and missing.attempts == 0
    [conversation] = llm.messages  # the unreadable video was never sent
    *frames, text = conversation[0]["content"]
    # linspace(0, 3, 3).round() = [0, 2, 3]: red, blue, white, in that order, cropped to 16x16
    colours = [decode(f).convert("RGB").getpixel((8, 8)) for f in frames]
    expected = [(255, 0, 0), (0, 0, 255), (255, 255, 255)]
    assert all(max(abs(a - b) for a, b in zip(got, want)) < 30 for got, want in zip(colours, expected, strict=True))
    assert {decode(f).size for f in frames} == {(16, 16)}
    assert "CAPTION-TEXT" not in text["text"] and "frames above" in text["text"] and "alpha" in text["text"]
    assert estimate(judge, items[:1])["images"] == 3


def test_frames_mode_needs_a_multimodal_backend_and_a_video():
    with pytest.raises(ValueError, match="only the openai backend"):
        make_judge({"alpha": []}, evidence="frames")
    judge = make_judge({}, llm=VisionLLM({}), evidence="frames")
    with pytest.raises(ValueError, match="needs the video path"):
        judge.judge([item("q#0", "alpha")])
    with pytest.raises(ValueError, match="has no caption"):
        make_judge({}, llm=VisionLLM({}), evidence="frames", protocol="video_chatgpt")
