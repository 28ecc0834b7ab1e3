"""What each multiple-choice benchmark asks the model: its official prompt, word for word.

    prompt = mc_prompt("mvbench", item)   # ChatPrompt(text=..., system=..., prefill="Best option:(")

- Video-MME (BradyFU/Video-MME): an instruction, the question, the options one a line ("A. ..."),
  then "The best answer is:".
- MVBench (OpenGVLab/Ask-Anything ``mvbench.ipynb``, ``system_llm=True``): the instruction as the
  system turn and again at the start of the user turn, "Question: ...\\nOptions:\\n(A) ...", then
  "\\nOnly give the best option."; the answer is prefilled with "Best option:(".
- TempCompass (llyx97/TempCompass): the question with its options, then "\\nPlease directly give
  the best option:" (multi-choice, caption matching), "\\nPlease answer yes or no:" (yes_no), or
  nothing (captioning: the question ends with "Generated Caption:").
- NExT-QA and PerceptionTest have no official prompt for a video LMM; lmms-eval 0.7.3's is used
  (NExT-QA: the question and "A. ..." lines with no instruction; PerceptionTest: the same plus
  "\\nAnswer with the option's letter from the given choices directly.").
- The synthetic clips' suite is asked as Video-MME is, with its own letters.

The prompt is the same whichever extractor reads the answers; its name and hash go into every
summary (``prompt``, ``prompt_hash``). The judge prompts of TempCompass's LLM fallback are here too.
"""

from __future__ import annotations

from capdpo.evaluation.mc.items import MCItem
from capdpo.prompts import ChatPrompt, short_hash

VIDEOMME_INSTRUCTION = ("Select the best answer to the following multiple-choice question based on the video. "
                        "Respond with only the letter (A, B, C, or D) of the correct option.")
MVBENCH_SYSTEM = ("Carefully watch the video and pay attention to the cause and sequence of events, the detail and movement "
                  "of objects, and the action and pose of persons. Based on your observations, select the best option that "
                  "accurately addresses the question.\n")
TEMPCOMPASS_ANSWER_PROMPT = {"multi-choice": "\nPlease directly give the best option:", "yes_no": "\nPlease answer yes or no:",
                             "caption_matching": "\nPlease directly give the best option:", "captioning": ""}
PERCEPTIONTEST_POST = "\nAnswer with the option's letter from the given choices directly."

# where each prompt comes from (the summary's ``prompt``)
PROMPT_SOURCES = {
    "videomme": "videomme: BradyFU/Video-MME",
    "mvbench": "mvbench: OpenGVLab/Ask-Anything mvbench.ipynb",
    "tempcompass": "tempcompass: llyx97/TempCompass",
    "nextqa": "nextqa: lmms-eval 0.7.3 nextqa_mc_test (no official prompt)",
    "perceptiontest": "perceptiontest: lmms-eval 0.7.3 perceptiontest_val_mc (no official prompt)",
    "synthetic_mc": "synthetic_mc: Video-MME's, with the item's letters",
}


def _letters_phrase(letters: str) -> str:
    """"A, B, C, or D" - Video-MME's wording for its four letters - for any number of them."""
    return f"{', '.join(letters[:-1])}, or {letters[-1]}" if len(letters) > 2 else " or ".join(letters)


def mc_prompt(benchmark: str, item: MCItem) -> ChatPrompt:
    """The prompt ``benchmark``'s official evaluation asks ``item`` with."""
    if benchmark in ("videomme", "synthetic_mc"):
        instruction = VIDEOMME_INSTRUCTION
        if benchmark == "synthetic_mc":
            instruction = instruction.replace("(A, B, C, or D)", f"({_letters_phrase(item.letters)})")
        options = "\n".join(f"{x}. {o}" for x, o in zip(item.letters, item.options))
        return ChatPrompt(f"{instruction}\n{item.question}\n{options}\nThe best answer is:")
    if benchmark == "mvbench":
        options = "\n".join(f"({x}) {o}" for x, o in zip(item.letters, item.options))
        question = f"Question: {item.question}\nOptions:\n{options}"
        return ChatPrompt(MVBENCH_SYSTEM + question + "\nOnly give the best option.", system=MVBENCH_SYSTEM.rstrip("\n"),
                          prefill="Best option:(")
    if benchmark == "tempcompass":
        return ChatPrompt(item.question + TEMPCOMPASS_ANSWER_PROMPT[item.task])
    if benchmark == "nextqa":
        return ChatPrompt("\n".join([item.question.strip(), *(f"{x}. {o.strip()}" for x, o in zip(item.letters, item.options))]))
    if benchmark == "perceptiontest":
        options = "".join(f"\n{x}. {o}" for x, o in zip(item.letters, item.options))
        return ChatPrompt(item.question + options + PERCEPTIONTEST_POST)
    raise ValueError(f"no prompt for benchmark {benchmark!r}")


def prompt_hash(benchmark: str, item: MCItem) -> str:
    """Hash of the wording ``benchmark`` asks items like ``item`` with (same task and option count;
    the question and options replaced by placeholders)."""
    probe = MCItem("id", ("video",), "{question}", tuple(f"{{option {x}}}" for x in item.letters), "A", task=item.task)
    prompt = mc_prompt(benchmark, probe)
    return short_hash(repr((prompt.system, prompt.text, prompt.prefill)))


# -- TempCompass's LLM fallback (the official evaluation prompts, llyx97/TempCompass prompt_templates.py) ------

_JUDGE_BASE = ("\nYou will receive a {kind} question, the ground-truth answer and the prediction from a question answering "
               "(QA) model. Your task is to determine whether QA model prediction is correct, based on the question and "
               "ground-truth answer. If the prediction is correct, respond \"Correct\". If the prediction is incorrect, "
               "respond \"Incorrect\".\n")
_JUDGE_KINDS = {"multi-choice": ("multi-choice", "Multi-Choice Question"), "yes_no": ("Yes/No", "Yes/No Question"),
                "caption_matching": ("caption matching", "Caption Matching Question")}
CAPTION_EVALUATION_PROMPT = """
You will receive a video description and a multi-choice question. Your task is to choose the correct answer and briefly explain the reason why you choose the answer. If none of the choice candidates are correct or the video description lacks enough information to answer the question, just answer "None of the choices are correct". Please organize your response in this format:
```
Reasoning: [Your reason to obtain the answer]
Answer: [Your answer]
```

Here are some examples of video description, multi-choice question and the expected answer:
```
Video Description: A person is palying football.
Multi-Choice Question:
What is the person doing in the video?
A. cooking
B. palying football
C. playing basketball
D. reading book
Reasoning: The video description mentions that the person is playing football.
Answer: B. palying football

Video Description: A bird is flying clockwise.
Multi-Choice Question:
In which direction is the bird flying?
A. backwark
B. counter-clockwise
C. clockwise
D. downward
Reasoning: The video description mentions that the bird is flying clockwise
Answer: C. clockwise

Video Description: An air balloon is inflating.
Multi-Choice Question:
What is happening to the air balloon?
A. exploding
B. getting smaller
C. flying
Reasoning: The video description mentions that the air balloon is inflating, while none of the coices can be explained as inflating.
Answer: None of the choices are correct
```
"""


def tempcompass_judge_prompt(item: MCItem, answer: str) -> str:
    """The official LLM evaluation prompt for an answer TempCompass's rules could not read, or for a
    caption (captioning: the judge answers the multi-choice question from it)."""
    if item.task == "captioning":
        caption = answer.replace("</s>", "").strip()
        return f"{CAPTION_EVALUATION_PROMPT}\nVideo Description:{caption}\nMulti-Choice Question:\n{item.judge_question}\n"
    kind, heading = _JUDGE_KINDS[item.task]
    return (f"{_JUDGE_BASE.format(kind=kind)}\n{heading}:\n{item.question}\nGround-Truth Answer: {item.answer_text}\n"
            f"Model Prediction: {answer.replace('</s>', '')}")
