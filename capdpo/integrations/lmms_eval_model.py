"""capdpo's model for lmms-eval 0.7.3: any capdpo checkpoint answers lmms-eval's tasks through
capdpo's loader (``load_policy``: builtin:mini, a local checkpoint or a hub id of every family
capdpo supports), its frame sampler and token budget (``VideoEncoder``) and its generation.

    python -m lmms_eval --model capdpo --model_args pretrained=builtin:mini,num_frames=8 \\
        --include_path tasks --tasks capdpo_videomme --batch_size 1

``--model_args``: ``pretrained`` (capdpo's ``policy.model``), any other field of capdpo's ``policy``
section (device, dtype, attn_implementation, device_map, max_tokens, processor) or ``frames``
section (num_frames, image_size, fps, width, on_over_budget), and ``cache_dir`` (default:
$CAPDPO_CACHE, where builtin:mini is built). lmms-eval's ``--batch_size N`` is the requests per
generate call.

A request's context string, built by lmms-eval, is the user turn. On a task capdpo exported
(capdpo.evaluation.mc.lmms_eval_task) the doc adds what a string cannot carry: the prompt's system
turn and prefill (MVBench's "Best option:(") and the video record with its time window; on any
other task the video is the one path ``doc_to_visual`` gives. Of the task's ``generation_kwargs``,
max_new_tokens, temperature (0, or ``do_sample: false``: greedy), top_p and until (the answer is
cut at the first stop string) are honoured; num_beams > 1 is refused; other keys are ignored.

Only ``generate_until`` tasks: loglikelihood and multi-round requests raise NotImplementedError.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from lmms_eval.api.model import lmms
from pydantic import ValidationError
from tqdm import tqdm

from capdpo.config import FramesConfig, PolicyConfig, RunConfig
from capdpo.evaluation.mc.lmms_eval_task import DEFAULT_MAX_NEW_TOKENS, doc_prompt, doc_video, is_capdpo_doc
from capdpo.models.load import policy_from_config
from capdpo.policy.base import EncodedVideo
from capdpo.policy.video import VideoEncoder
from capdpo.prompts import ChatPrompt
from capdpo.records import Video, first_error

POLICY_ARGS = tuple(name for name in PolicyConfig.model_fields if name != "model")
FRAME_ARGS = tuple(FramesConfig.model_fields)


@dataclass(frozen=True)
class Generation:
    """How one request is answered, from its task's ``generation_kwargs``."""

    max_new_tokens: int
    temperature: float  # 0 = greedy
    top_p: float
    until: tuple[str, ...]  # the answer ends before the first of these


def generation_of(kwargs: dict, task: str) -> Generation:
    if int(kwargs.get("num_beams") or 1) > 1:
        raise ValueError(f"task {task}: capdpo's model does not beam-search (num_beams {kwargs['num_beams']}); "
                         "it answers greedily or by sampling")
    until = kwargs.get("until") or ()
    temperature = 0.0 if kwargs.get("do_sample") is False else float(kwargs.get("temperature") or 0.0)
    return Generation(int(kwargs.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS), temperature,
                      float(kwargs.get("top_p") or 1.0), (until,) if isinstance(until, str) else tuple(until))


def cut(text: str, until: tuple[str, ...]) -> str:
    """``text`` up to the first of the stop strings ``until``."""
    for stop in until:
        if stop:
            text = text.split(stop, 1)[0]
    return text


def request_prompt(doc: dict, context: str) -> ChatPrompt:
    """The context as the user turn, with the system turn and prefill of a capdpo task's prompt."""
    if not is_capdpo_doc(doc):
        return ChatPrompt(context)
    asked = doc_prompt(doc)
    return ChatPrompt(context, system=asked.system, prefill=asked.prefill)


def request_video(doc: dict, visuals: list | None, task: str) -> Video:
    """The video a request is about: a capdpo task's record, or the one path another task gives."""
    if is_capdpo_doc(doc):
        return doc_video(doc)
    if not visuals or len(visuals) != 1 or not isinstance(visuals[0], str):
        shown = [type(v).__name__ if not isinstance(v, str) else v for v in visuals or []]
        raise ValueError(f"task {task}: capdpo's model answers about one video, a file or frame folder path; "
                         f"doc_to_visual gave {shown}")
    path = str(Path(visuals[0]).resolve())
    return Video(id="lmms-" + hashlib.sha256(path.encode()).hexdigest()[:16], video=path, caption="", source="lmms-eval",
                 split="test")


class CapdpoVideoLMM(lmms):
    """lmms-eval's ``capdpo`` model (a simple model: it takes lmms-eval's context strings)."""

    is_simple = True

    def __init__(self, pretrained: str, batch_size: int | str = 1, device: str | None = None, cache_dir: str | None = None,
                 **settings) -> None:
        super().__init__()
        unknown = sorted(set(settings) - set(POLICY_ARGS) - set(FRAME_ARGS))
        if unknown:
            raise ValueError(f"capdpo model: unknown model_args {unknown}; known: pretrained, cache_dir, "
                             f"{', '.join(POLICY_ARGS + FRAME_ARGS)}")
        policy_args = {k: v for k, v in settings.items() if k in POLICY_ARGS}
        if device is not None:  # lmms-eval's --device
            policy_args["device"] = device
        try:
            policy = PolicyConfig(model=str(pretrained), **policy_args)
            frames = FramesConfig(**{k: v for k, v in settings.items() if k in FRAME_ARGS})
        except ValidationError as e:
            raise ValueError(f"capdpo model: model_args: {first_error(e)}") from None
        if not str(batch_size).isdigit() or int(batch_size) < 1:
            raise ValueError(f"capdpo model: --batch_size should be a number of requests per generate call, got {batch_size!r}")
        self.batch_size = int(batch_size)
        self.policy = policy_from_config(policy, cache_dir or RunConfig().cache_dir)
        self.encoder = VideoEncoder(self.policy, frames)

    def generate_until(self, requests) -> list[str]:
        """Answers to ``requests`` in their order, ``batch_size`` requests (of equal generation
        settings) per generate call, each video encoded for its request."""
        answers = [""] * len(requests)
        with tqdm(total=len(requests), desc=f"capdpo: answer ({self.policy.name})", disable=self.rank != 0) as bar:
            for start in range(0, len(requests), self.batch_size):
                batches: dict[Generation, list[tuple[int, EncodedVideo, ChatPrompt]]] = {}
                for i in range(start, min(start + self.batch_size, len(requests))):
                    context, kwargs, doc_to_visual, doc_id, task, split = requests[i].args
                    doc = self.task_dict[task][split][doc_id]
                    prompt, generation = request_prompt(doc, context), generation_of(kwargs or {}, task)
                    video = request_video(doc, doc_to_visual(doc), task)
                    batches.setdefault(generation, []).append((i, self.encoder.encode(video, [prompt], generation.max_new_tokens),
                                                               prompt))
                for generation, batch in batches.items():
                    texts = self.policy.generate_batch([(encoded, prompt) for _, encoded, prompt in batch],
                                                       temperature=generation.temperature, top_p=generation.top_p,
                                                       max_new_tokens=generation.max_new_tokens)
                    for (i, _, _), [text] in zip(batch, texts):
                        answers[i] = cut(text, generation.until)
                    bar.update(len(batch))
        return answers

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        raise NotImplementedError("capdpo's lmms-eval model answers generate_until tasks only (multiple-choice "
                                  "benchmarks are scored from the generated answer)")

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("capdpo's lmms-eval model answers single-turn generate_until tasks only")
