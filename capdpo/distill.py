"""Distilling the caption-grounded judge into a small local student (``capdpo judge distill``).

A teacher (any judge capdpo runs - OpenAI, vLLM, hf - or the oracle of synthetic clips, or people)
scores answers; the student, a causal LM (SmolLM2-135M by default), learns to reply to a judge
prompt with the teacher's score. The prompt need not be the teacher's: by default it is
``short_caption_reward``, the same fields behind a two-line instruction, because a student learns
the task from its labels and every token of instructions costs it in training and in every call.
The result is a plain checkpoint folder that works as ``judge.llm.model: FOLDER`` with every
backend and mode: free to re-run, pinned, offline; its ``distill.json`` names the template, which
a judge using the folder takes when ``judge.template`` is unset.

    labels (TeacherLabel rows)  -> split by video -> student training -> checkpoint + agreement

The student's reply is ``Score: N`` (the template's score line, without the explanation): in
``generate`` mode it parses at once, and ``expected`` / ``constrained`` modes read the digit
distribution right where it was trained. The digit's target is the teacher's score spread over
the two nearest digits (3.4 -> 60% "3", 40% "4"), so its expectation is the teacher's score.

Training is the product's own fast path: all answers to one question sit in one packed row behind
their common prompt prefix (instructions, caption, question, reference; 5.1x fewer tokens for
builtin:judge-mini's labels), with the tree mask of :mod:`capdpo.policy.packing`, and logits are
computed only where the reply's five tokens are predicted. It resumes from its last checkpoint after a crash (``save_every``).
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from capdpo.config import DistillConfig, JudgeConfig, LLMConfig, RunConfig
from capdpo.devices import resolve_device
from capdpo.evaluation.agreement import AgreementReport, agreement, format_report, save_agreement
from capdpo.hashing import file_hash, sha256_json, split_test_ids
from capdpo.judge.judge import CaptionJudge, JudgeItem, judge_items, truncate_words
from capdpo.llm.backends import DISTILL_SUMMARY, local_weights, read_summary
from capdpo.policy.packing import Branch as TreeBranch
from capdpo.policy.packing import PackedRows, common_prefix_length, pack_branches, tree_mask
from capdpo.prompts import load_template
from capdpo.records import (
    TEACHER_SCALES,
    Judgment,
    RecordFile,
    TeacherLabel,
    atomic_dir,
    atomic_write_text,
    check_writable,
    remove_own_dir,
    write_jsonl,
)
from capdpo.rundir import RunPaths, require

log = logging.getLogger(__name__)

SCORE_PREFIX = "Score: "
DIGITS = ("1", "2", "3", "4", "5")
STATE = ".distill-state"  # resume checkpoint inside the output folder, removed when training ends
STATE_INPUTS = "inputs.json"  # in the resume checkpoint: what the interrupted training distils (distill_inputs)
FIRST_STUDENT = "first-student"  # select=uncertain: the student that picks the budget's second half
# settings that change where and how fast a student is made, not the student: a resume may change them
RUN_ONLY_SETTINGS = {"device", "batch_size", "save_every"}


# -- labels and items --------------------------------------------------------------------------

def judge_item(label: TeacherLabel) -> JudgeItem:
    """The judge prompt's fields of a labelled answer."""
    return JudgeItem(label.id, label.qa_id, label.caption, label.question, label.reference, label.answer,
                     video_id=label.video_id)


def split_labels(labels: Sequence[TeacherLabel], fraction: float, seed: int) -> tuple[list[TeacherLabel], list[TeacherLabel]]:
    """(train, held out): whole videos are held out, so no held-out caption is ever trained on."""
    held = split_test_ids(sorted({lab.video_id for lab in labels}), fraction, seed)
    return [lab for lab in labels if lab.video_id not in held], [lab for lab in labels if lab.video_id in held]


def digit_target(score: float) -> dict[int, float]:
    """The teacher's 1-5 score as probabilities of the digits 1..5 whose mean is the score."""
    score = min(5.0, max(1.0, score))
    low = math.floor(score)
    frac = score - low
    return {low: 1.0} if frac == 0 else {low: 1.0 - frac, low + 1: frac}


# -- the student's training rows ----------------------------------------------------------------

REPLY = 5  # predictions trained per answer: "Score", ":", " ", the digit, eos


@dataclass(frozen=True)
class Branch:
    """One answer behind a shared prefix: its own tokens, ending with the reply ``Score: N<eos>``;
    the last ``REPLY`` predictions are trained (the digit's against ``digit``)."""

    tokens: list[int]
    digit: dict[int, float]


@dataclass(frozen=True)
class Row:
    """Answers to one question packed behind their common prefix."""

    prefix: list[int]
    branches: list[Branch]


class StudentTokens:
    """Renders labels into the judge's chat prompt exactly as ``HFChatLLM`` does, and packs them."""

    def __init__(self, tokenizer, template: str, max_answer_words: int):
        self.tokenizer = tokenizer
        self.template = load_template(template)
        self.max_answer_words = max_answer_words
        ids = [tokenizer.encode(d, add_special_tokens=False) for d in DIGITS]
        if any(len(i) != 1 for i in ids):
            raise ValueError(f"the student's tokenizer does not write each digit 1-5 as one token: {ids}")
        self.digit_ids = [i[0] for i in ids]
        self.eos = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)

    def prompt_ids(self, label: TeacherLabel) -> list[int]:
        """Token ids of the chat prompt followed by ``Score: `` (HFChatLLM._encode's text)."""
        prompt = self.template.render(caption=label.caption, question=label.question, answer=label.reference,
                                      prediction=truncate_words(label.answer, self.max_answer_words))
        text = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                  add_generation_prompt=True)
        return self.tokenizer.encode(text + SCORE_PREFIX, add_special_tokens=False)

    def rows(self, labels: Sequence[TeacherLabel], group_size: int) -> list[Row]:
        """One row per question (and per ``group_size`` of its answers), prefix shared."""
        by_question: dict[str, list[TeacherLabel]] = defaultdict(list)
        for lab in labels:
            by_question[lab.qa_id].append(lab)
        rows = []
        for qa_id in sorted(by_question):
            group = by_question[qa_id]
            for start in range(0, len(group), group_size):
                rows.append(self._row(group[start:start + group_size]))
        return rows

    def _row(self, labels: Sequence[TeacherLabel]) -> Row:
        seqs = [self.prompt_ids(lab) for lab in labels]
        # the reply's first token ("Score") must stay in every branch: predicted from the prefix's end
        n = common_prefix_length(seqs, max_len=min(map(len, seqs)) - 3)
        branches = []
        for seq, lab in zip(seqs, labels):
            digit = digit_target(lab.target)
            shown = self.digit_ids[max(digit, key=digit.get) - 1]  # the likelier digit, teacher-forced
            branches.append(Branch(seq[n:] + [shown, self.eos], {self.digit_ids[d - 1]: p for d, p in digit.items()}))
        return Row(seqs[0][:n], branches)


@dataclass
class PackedAnswers:
    """Rows as tensors (``capdpo.policy.packing.pack_branches``: each answer's ``REPLY`` reply
    tokens are its scored tokens) and each answer's digit target distribution."""

    tree: PackedRows
    soft: list[dict[int, float]]


def pack_rows(rows: Sequence[Row], pad: int, device: torch.device | str = "cpu") -> PackedAnswers:
    tree = pack_branches([(row.prefix, [TreeBranch(b.tokens, len(b.tokens) - REPLY) for b in row.branches]) for row in rows],
                         pad, device)
    return PackedAnswers(tree, [b.digit for row in rows for b in row.branches])


def reply_loss(model, batch: PackedAnswers) -> torch.Tensor:
    """Mean over answers of: cross-entropy of the reply's format tokens, plus the cross-entropy of
    the digit against the teacher's distribution."""
    tree = batch.tree
    mask = tree_mask(tree.segment, "sdpa", torch.float32)
    hidden = model.model(input_ids=tree.ids, attention_mask=mask, position_ids=tree.source, use_cache=False).last_hidden_state
    logp = model.lm_head(hidden[tree.row, tree.position]).float().log_softmax(-1)  # (answers*5, vocab)
    logp = logp.view(-1, REPLY, logp.shape[-1])
    hard = tree.target.view(-1, REPLY)  # the digit's is ignored: soft target
    fmt = [0, 1, 2, 4]  # "Score", ":", " ", eos
    format_nll = -logp[:, fmt].gather(-1, hard[:, fmt, None]).squeeze(-1).sum(-1)
    digit_nll = torch.stack([-sum(p * logp[a, 3, t] for t, p in d.items()) for a, d in enumerate(batch.soft)])
    return (format_nll + digit_nll).mean()


# -- training ------------------------------------------------------------------------------------

def load_student(cfg: DistillConfig, cache_dir: str | Path):
    """(model, tokenizer): the student's starting point, cut to ``cfg.layers`` decoder layers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = local_weights(cfg.student, cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
    model.to(resolve_device(cfg.device))
    if cfg.layers is not None and cfg.layers < model.config.num_hidden_layers:
        model.model.layers = model.model.layers[: cfg.layers]
        model.config.num_hidden_layers = cfg.layers
        if getattr(model.config, "layer_types", None):
            model.config.layer_types = model.config.layer_types[: cfg.layers]
    return model, tokenizer


def _steps(rows: Sequence[Row], batch_answers: int, rng: random.Random) -> list[list[int]]:
    """Row indices per optimizer step: shuffled, then filled to about ``batch_answers`` answers."""
    order = list(range(len(rows)))
    rng.shuffle(order)
    steps, current, answers = [], [], 0
    for i in order:
        current.append(i)
        answers += len(rows[i].branches)
        if answers >= batch_answers:
            steps.append(current)
            current, answers = [], 0
    if current:
        steps.append(current)
    return steps


def train_student(model, rows: Sequence[Row], cfg: DistillConfig, pad: int, state_dir: Path,
                  on_step: Callable[[int, float], None] | None = None, inputs: Mapping | None = None) -> list[float]:
    """Fine-tune ``model`` (every weight, or the top ``cfg.train_layers`` layers) on the packed rows;
    resumes from ``state_dir``, whose checkpoints also keep ``inputs`` (:func:`distill_inputs`)."""
    from transformers import get_linear_schedule_with_warmup

    plan = [step for epoch in range(cfg.epochs) for step in _steps(rows, cfg.batch_answers, random.Random(cfg.seed + epoch))]
    trained = trainable_weights(model, cfg.train_layers)
    opt = torch.optim.AdamW(trained, lr=cfg.lr, weight_decay=0.0)
    sched = get_linear_schedule_with_warmup(opt, max(1, len(plan) // 10), len(plan))
    losses = _resume(model, opt, sched, state_dir)
    torch.manual_seed(cfg.seed)
    model.train()
    with tqdm(total=len(plan), initial=len(losses), desc="distill", unit="step") as bar:
        for step in range(len(losses), len(plan)):
            loss = reply_loss(model, pack_rows([rows[i] for i in plan[step]], pad, model.device))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trained, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(round(loss.item(), 5))
            bar.set_postfix(loss=f"{loss.item():.3f}")
            bar.update()
            if on_step:
                on_step(step, loss.item())
            if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < len(plan):
                _save_state(model, opt, sched, losses, state_dir, inputs)
    model.eval()
    return losses


def trainable_weights(model, top_layers: int | None) -> list[torch.nn.Parameter]:
    """The weights the student trains: all, or only its top ``top_layers`` decoder layers and final
    norm. Frozen lower layers (and the tied embeddings) need no backward pass of their own, which
    is most of a step's cost."""
    if top_layers is None or top_layers >= len(model.model.layers):
        return list(model.parameters())
    layers = model.model.layers
    model.requires_grad_(False)
    trained = [*layers[len(layers) - top_layers:], model.model.norm]
    for module in trained:
        module.requires_grad_(True)
    return [p for module in trained for p in module.parameters()]


def _save_state(model, opt, sched, losses: list[float], state_dir: Path, inputs: Mapping | None) -> None:
    with atomic_dir(state_dir) as tmp:
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                    "losses": losses}, tmp / "state.pt")
        if inputs is not None:
            (tmp / STATE_INPUTS).write_text(json.dumps(inputs, indent=1) + "\n")


def _resume(model, opt, sched, state_dir: Path) -> list[float]:
    if not (state_dir / "state.pt").is_file():
        return []
    state = torch.load(state_dir / "state.pt", weights_only=True, map_location=model.device)
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["opt"])
    sched.load_state_dict(state["sched"])
    log.info("resuming the student's training at step %d", len(state["losses"]))
    return list(state["losses"])


# -- what a student is distilled from ----------------------------------------------------------------

def distill_inputs(cfg: DistillConfig, teacher: str, labels: Sequence[TeacherLabel] | None = None) -> dict:
    """What a student is distilled from: ``teacher`` (who labelled: a judge, the oracle, a scores or
    labels file with its content hash), the settings that shape the student and, once known, the
    labels' hash. Kept in the resume checkpoint and in ``distill.json``: a training is resumed,
    and a finished student returned, only for the same inputs (:func:`check_inputs`)."""
    inputs = {"teacher": teacher, "config": cfg.model_dump(mode="json", exclude=RUN_ONLY_SETTINGS)}
    if labels is not None:
        inputs["labels"] = sha256_json([lab.model_dump(mode="json") for lab in labels])
    return inputs


def _differences(found: Mapping, inputs: Mapping) -> list[str]:
    """What differs between recorded inputs and ``inputs``, only for the keys ``inputs`` has."""
    differ = []
    for key, now in inputs.items():
        was = found.get(key)
        if was == now:
            continue
        if key == "config" and isinstance(was, dict):
            differ += [f"distill.{name} {was.get(name)!r} -> {value!r}" for name, value in now.items() if was.get(name) != value]
        elif key == "teacher":
            differ.append(f"teacher {was!r} -> {now!r}")
        else:
            differ.append(f"the {key}")
    return differ


def check_inputs(out: Path, inputs: Mapping) -> None:
    """Refuse ``out`` when its finished student or its interrupted training was distilled from
    other inputs than ``inputs`` (:func:`distill_inputs`; only the keys ``inputs`` has are
    compared, so a check before the teacher is asked leaves out the labels). A folder distilled by
    a capdpo that recorded no inputs is taken as it is, with a warning."""
    summary = read_summary(out)
    recorded = [("distilled", summary.get("inputs") if summary else None),
                ("holds an interrupted distillation", _state_inputs(out / STATE))]
    for what, found in recorded:
        if found is not None and (differ := _differences(found, inputs)):
            raise ValueError(f"{out}: {what} from other inputs ({'; '.join(differ)}); "
                             "pass --fresh to start over (it deletes what capdpo wrote there), or choose another --out")
    if summary is not None and "inputs" not in summary:
        log.warning("%s: distilled by an older capdpo that recorded no inputs: taken as it is (--fresh distils again)", out)


def _state_inputs(state_dir: Path) -> dict | None:
    """The inputs an interrupted training recorded; None without a checkpoint (or one from a capdpo
    that recorded none, which resumes as before)."""
    path = state_dir / STATE_INPUTS
    return json.loads(path.read_text()) if path.is_file() else None


def _is_student(folder: Path) -> bool:
    """A folder that holds capdpo's ``distill.json``: a student capdpo wrote, whole."""
    summary = read_summary(folder)
    return isinstance(summary, dict) and {"config", "labels", "steps"} <= summary.keys()


def start_fresh(out: Path) -> None:
    """``--fresh``: forget what capdpo distilled into ``out`` - a finished student (a folder with
    capdpo's distill.json, removed whole), an interrupted training's checkpoint, a first student of
    ``select: uncertain`` - so the distillation starts over. Nothing else is removed: a
    ``distill.json`` that is not capdpo's stops it."""
    for folder in (out / FIRST_STUDENT, out):
        if _is_student(folder):
            shutil.rmtree(folder)
            log.info("%s: removed the student distilled there (--fresh)", folder)
        elif (folder / DISTILL_SUMMARY).exists():
            raise ValueError(f"{folder / DISTILL_SUMMARY}: not a distill.json capdpo wrote; left as it is - choose another --out")
        elif (folder / STATE).exists():
            remove_own_dir(folder / STATE, proof=("state.pt",))  # state.pt: a checkpoint from before capdpo's marker
            log.info("%s: removed the interrupted distillation's checkpoint (--fresh)", folder)


# -- the whole distillation ------------------------------------------------------------------------

def expected_scores(model: str, items: Sequence[JudgeItem], cache_dir: str | Path, *, template: str | None = None,
                    batch_size: int = 16, device: str = "auto", max_answer_words: int = 256,
                    desc: str = "judge") -> dict[str, float | None]:
    """A local judge's ``expected``-mode score of each answer, through the judge every run uses."""
    llm = LLMConfig(model=model, batch_size=batch_size, device=device)
    judge = CaptionJudge(JudgeConfig(llm=llm, mode="expected", template=template, max_answer_words=max_answer_words),
                         cache_dir)
    scores = {}
    for start in tqdm(range(0, len(items), batch_size), desc=desc, unit="batch"):
        for j in judge.judge(items[start:start + batch_size]):
            scores[j.target_id] = j.score
    return scores


def student_scores(model_dir: Path, items: Sequence[JudgeItem], cfg: DistillConfig, cache_dir: str | Path) -> dict[str, float | None]:
    """The student's scores, with the template and settings it was distilled with."""
    return expected_scores(str(model_dir), items, cache_dir, template=cfg.template, batch_size=cfg.batch_size,
                           device=cfg.device, max_answer_words=cfg.max_answer_words, desc="student")


def held_out_agreement(scores: Mapping[str, float], held_out: Sequence[TeacherLabel]) -> AgreementReport:
    """The student against the teacher on held-out answers, the teacher on its own scale (0-1
    labels give AUROC)."""
    teacher = {lab.id: lab.score for lab in held_out}
    return agreement(scores, teacher, group={lab.id: lab.qa_id for lab in held_out})


def distill(labels: Sequence[TeacherLabel], cfg: DistillConfig, out: Path, cache_dir: str | Path, *,
            teacher: str | None = None, dropped_teacher_ids: int = 0) -> dict:
    """Train a student on ``labels`` into the checkpoint folder ``out`` and measure it on the
    held-out videos' labels. ``out`` also gets ``labels.jsonl``, ``held_out_scores.jsonl``,
    ``agreement.md`` and ``distill.json`` (returned: settings, inputs, counts, losses, agreement);
    a finished ``out`` of the same inputs (``teacher``, by default the labels' teacher names;
    the labels; the settings) is left as it is, one of other inputs is refused.
    ``dropped_teacher_ids``: the teacher's scores that named no answer, counted in distill.json."""
    out = Path(out)
    inputs = distill_inputs(cfg, teacher or ", ".join(sorted({lab.teacher for lab in labels})), labels)
    check_inputs(out, inputs)
    if (done := read_summary(out)) is not None:
        log.info("%s is already distilled", out)
        return done
    if not labels:
        raise ValueError("no teacher labels to distil from")
    t0 = time.perf_counter()
    train, held_out = split_labels(labels, cfg.held_out_fraction, cfg.split_seed)
    if not train:
        raise ValueError(f"distill.held_out_fraction={cfg.held_out_fraction} leaves no video to train on")
    if cfg.held_out_fraction > 0 and not held_out:
        videos = len({lab.video_id for lab in labels})
        raise ValueError(f"distill.held_out_fraction={cfg.held_out_fraction} holds out none of the labels' {videos} "
                         "video(s), so nothing would measure the student; give labels of more videos, or set "
                         "distill.held_out_fraction=0 to distil without measuring")
    check_writable(out)  # before the student loads
    model, tokenizer = load_student(cfg, cache_dir)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows = StudentTokens(tokenizer, cfg.template, cfg.max_answer_words).rows(train, cfg.group_size)
    losses = train_student(model, rows, cfg, pad, out / STATE, inputs=inputs)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    write_jsonl(out / "labels.jsonl", (lab.model_dump() for lab in labels))
    report = None
    if held_out:
        scores = student_scores(out, [judge_item(lab) for lab in held_out], cfg, cache_dir)
        write_jsonl(out / "held_out_scores.jsonl", ({"id": k, "score": v} for k, v in scores.items()))
        report = held_out_agreement(scores, held_out)
        teachers = ", ".join(sorted({lab.teacher for lab in held_out}))
        atomic_write_text(out / "agreement.md", format_report(report, name_a="student", name_b=teachers) + "\n")
        save_agreement(out / "agreement.json", report, "student", teachers)
    summary = {
        "config": cfg.model_dump(), "inputs": inputs, "teachers": sorted({lab.teacher for lab in labels}),
        "labels": len(labels), "dropped_teacher_ids": dropped_teacher_ids,
        "train": len(train), "held_out": len(held_out), "rows": len(rows),
        "held_out_videos": sorted({lab.video_id for lab in held_out}),
        "steps": len(losses), "loss_first": losses[:5], "loss_last": losses[-5:],
        "agreement": _summary(report), "seconds": round(time.perf_counter() - t0, 1),
    }
    atomic_write_text(out / DISTILL_SUMMARY, json.dumps(summary, indent=1) + "\n")  # written last: marks it done
    remove_own_dir(out / STATE)  # made by atomic_dir (_save_state); a folder capdpo did not make there stays
    return summary


def _summary(report: AgreementReport | None) -> dict | None:
    if report is None:
        return None
    keys = ("n_common", "auroc", "pairwise_agreement_strict", "n_pairs_strict", "spearman", "pearson",
            "exact_agreement", "mean_a", "mean_b")
    return {k: getattr(report, k) for k in keys}


# -- labels from synthetic clips: the oracle as teacher ----------------------------------------------

def synthetic_labels(seed: int, n_clips: int, answers_per_question: int, detail_answers: int = 0) -> list[TeacherLabel]:
    """Oracle-labelled answers about ``n_clips`` synthetic scenes (scene seed ``seed * 100_000 + i``,
    as ``make_synthetic_dataset`` numbers them): every question of each scene, its reference answer
    and variants with swapped facts (:func:`capdpo.media.answers.answer_variants`), plus
    ``detail_answers`` more to each ``detail`` question that only the caption decides
    (:func:`capdpo.media.answers.detail_variants`), each graded by the oracle. No video is rendered:
    the caption and the questions come from the scene."""
    from capdpo.media.answers import answer_variants, detail_variants
    from capdpo.media.synthetic import caption_scene, random_scene, scene_questions
    from capdpo.oracle import judge_answer

    rng = random.Random(seed)
    detail_rng = random.Random(seed + 1)  # its own draws: the other answers stay those of detail_answers=0
    labels = []
    for i in range(n_clips):
        scene = random_scene(seed * 100_000 + i)
        video_id, caption = f"synth{seed}_{i:04d}", caption_scene(scene)
        for q_index, question in enumerate(scene_questions(scene)):
            qa_id = f"{video_id}_{q_index}"
            answers = answer_variants(question, answers_per_question, rng)
            if question.kind == "detail" and detail_answers:
                answers += [a for a in detail_variants(question, detail_answers, detail_rng) if a not in answers]
            for k, answer in enumerate(answers):
                correct = judge_answer(question.facts, question.kind, answer).correct
                labels.append(TeacherLabel(id=f"{qa_id}#{k}", qa_id=qa_id, video_id=video_id, caption=caption,
                                           question=question.question, reference=question.answer, answer=answer,
                                           score=float(correct), scale="0-1", teacher="oracle", kind=question.kind))
    return labels


# -- a run's answers, the teacher budget and the teachers --------------------------------------------

def run_items(paths: RunPaths) -> list[JudgeItem]:
    """Every sampled answer of a run (``candidates.jsonl``), ready for a judge prompt."""
    require("judge distill", paths.videos, paths.qa, paths.candidates)
    videos, qa = paths.videos.by_id(), paths.qa.by_id()
    return [JudgeItem.for_answer(videos[c.video_id], qa[c.qa_id], c.answer, c.id) for c in paths.candidates.read()]


def select_items(items: Sequence[JudgeItem], k: int | None, strategy: str, seed: int) -> list[JudgeItem]:
    """``k`` of ``items`` for the teacher to label: a seeded random sample, or the most diverse
    (greedy k-centre: each pick is the answer farthest, in MiniLM embedding space of question +
    answer, from every answer picked so far, so near-duplicate answers cost one teacher call)."""
    if k is None or k >= len(items):
        return list(items)
    rng = random.Random(seed)
    if strategy == "random":
        return [items[i] for i in sorted(rng.sample(range(len(items)), k))]
    from capdpo.similarity import MiniLM

    emb = MiniLM().embed([f"{it.question} {it.answer}" for it in items])
    picked = [rng.randrange(len(items))]
    distance = 1 - emb @ emb[picked[0]]
    for _ in range(k - 1):
        picked.append(int(distance.argmax()))
        distance = torch.minimum(distance, 1 - emb @ emb[picked[-1]])
    return [items[i] for i in sorted(picked)]


def most_uncertain(items: Sequence[JudgeItem], scores: Mapping[str, float | None], k: int) -> list[JudgeItem]:
    """The ``k`` answers whose student score is nearest the middle of the scale (3): where the
    student is least sure whether the answer is right."""
    return sorted(items, key=lambda it: abs((scores.get(it.target_id) or 3.0) - 3.0))[:k]


Teacher = Callable[[list[JudgeItem]], list[TeacherLabel]]


def label(item: JudgeItem, score: float, scale: str, teacher: str) -> TeacherLabel:
    return TeacherLabel(id=item.target_id, qa_id=item.qa_id, video_id=item.video_id or "", caption=item.caption,
                        question=item.question, reference=item.reference, answer=item.answer, score=score, scale=scale,
                        teacher=teacher)


def oracle_teacher(paths: RunPaths) -> Teacher:
    """The exact oracle of the run's synthetic clips: free, so a budget only simulates one."""
    from capdpo.media.synthetic import load_scenes
    from capdpo.oracle import Answer, oracle_scores, run_scenes_path

    scenes, questions = load_scenes(run_scenes_path(paths.top)), paths.qa.by_id()

    def teach(items: list[JudgeItem]) -> list[TeacherLabel]:
        scored = oracle_scores([Answer(it.target_id, it.qa_id, it.answer) for it in items], questions, scenes)
        if scored.skipped:
            log.warning("oracle: %s", scored.summary())
        by_id = {it.target_id: it for it in items}
        return [label(by_id[r["id"]], float(r["score"]), "0-1", "oracle").model_copy(update={"kind": r["kind"]})
                for r in scored.rows]
    return teach


def score_file_teacher(path: Path, scale: str) -> Teacher:
    """Scores already given: a judgments file of any backend, or ``{id, score}`` rows (people, an
    oracle) on ``scale``; answers without a score are not labels. A score off ``scale`` is refused
    naming its line."""
    from capdpo.evaluation.agreement import load_scores

    scores = load_scores(path, TEACHER_SCALES[scale], check_ids=True)  # its ids become TeacherLabel ids
    name = path.stem

    def teach(items: list[JudgeItem]) -> list[TeacherLabel]:
        return [label(it, float(scores[it.target_id]), scale, name) for it in items if scores.get(it.target_id) is not None]
    return teach


def labels_teacher(labels: Sequence[TeacherLabel]) -> Teacher:
    """Labels given as a file: the teacher's answer is looked up."""
    by_id = {lab.id: lab for lab in labels}
    return lambda items: [by_id[it.target_id] for it in items]


def judge_teacher(judge: CaptionJudge, out: Path) -> Teacher:
    """The run's configured judge (any backend), asked only about the chosen answers; its replies
    land in ``out`` (resumable, within the judge's budget). Failed judgments are not labels."""
    def teach(items: list[JudgeItem]) -> list[TeacherLabel]:
        judged = {j.target_id: j for j in judge_items(judge, items, RecordFile(out, Judgment), desc="teacher")}
        return [label(it, judged[it.target_id].score, "1-5", judge.model_id) for it in items
                if it.target_id in judged and judged[it.target_id].score is not None]
    return teach


def distill_from_pool(pool: Sequence[JudgeItem], teacher: Teacher, cfg: DistillConfig, out: Path,
                      cache_dir: str | Path, *, teacher_name: str | None = None, dropped_teacher_ids: int = 0) -> dict:
    """Choose what the teacher labels (``cfg.teacher_budget`` answers by ``cfg.select``), ask it,
    distil (``teacher_name`` and ``dropped_teacher_ids``: as :func:`distill`'s). ``uncertain``
    spends half the budget on diverse answers, distils a first student from them
    (``out/first-student``), and spends the other half on the answers that student is least sure of."""
    source = {"teacher": teacher_name, "dropped_teacher_ids": dropped_teacher_ids}
    if teacher_name is not None:  # refused before the teacher is asked, when it can be told already
        for folder in (out, out / FIRST_STUDENT):
            check_inputs(folder, distill_inputs(cfg, teacher_name))
    k = cfg.teacher_budget
    if cfg.select != "uncertain" or k is None or k >= len(pool):
        return distill(_labelled(teacher, select_items(pool, k, cfg.select, cfg.seed)), cfg, out, cache_dir, **source)
    first = select_items(pool, k // 2, "diverse", cfg.seed)
    first_labels = _labelled(teacher, first)
    distill(first_labels, cfg, out / FIRST_STUDENT, cache_dir, **source)
    chosen = {it.target_id for it in first}
    rest = [it for it in pool if it.target_id not in chosen]
    scores = student_scores(out / FIRST_STUDENT, rest, cfg, cache_dir)
    second = most_uncertain(rest, scores, k - len(first))
    return distill(first_labels + _labelled(teacher, second), cfg, out, cache_dir, **source)


def _labelled(teacher: Teacher, items: list[JudgeItem]) -> list[TeacherLabel]:
    """The teacher's labels of ``items``, saying how many it left unlabelled."""
    labels = teacher(items)
    if len(labels) < len(items):
        log.warning("the teacher labelled %d of the %d answers chosen; the others are left out", len(labels), len(items))
    return labels


# -- the built-in distilled judge ------------------------------------------------------------------

JUDGE_MINI_SEED = 3  # synthetic seed of its clips: the demo uses 0, the reproduction 0 and 1, the mini SFT 7
JUDGE_MINI_CLIPS = 32  # ~1,400 labels: ~10 minutes on 2 CPU cores
JUDGE_MINI_ANSWERS = 8  # answers per question: the reference, the full answer and swapped-fact variants
# and 6 more to each detail question that only the caption decides: without them the short-prompt student
# judged detail answers from the reference alone (the caption added +0.003 AUROC; with them +0.031)
JUDGE_MINI_DETAIL_ANSWERS = 6
# every layer of SmolLM2-135M, the short template, one epoch at lr 1e-4, 20% of videos held out; batches of
# 8 answers: with the short prompt, 16 gave 65 updates that never learned to rank (AUROC 0.619)
JUDGE_MINI = DistillConfig(batch_answers=8)


def judge_mini_dir(cache_dir: str | Path) -> Path:
    """``builtin:judge-mini``: SmolLM2-135M distilled from the oracle on synthetic clips of their
    own seed, built once per cache dir (``capdpo models``)."""
    from capdpo.packaged import JUDGE_MINI as NAME
    from capdpo.packaged import cached_build

    def build(tmp: Path) -> None:
        labels = synthetic_labels(JUDGE_MINI_SEED, JUDGE_MINI_CLIPS, JUDGE_MINI_ANSWERS, JUDGE_MINI_DETAIL_ANSWERS)
        distill(labels, JUDGE_MINI, tmp, cache_dir)
    return cached_build(Path(cache_dir), NAME, build)


def run_distill(cfg: RunConfig, out: Path, teacher: str, scale: str = "1-5", labels_file: Path | None = None,
                fresh: bool = False) -> dict:
    """``capdpo judge distill``: the pool (a labels file, or the run's sampled answers), its teacher
    (``judge``, ``oracle`` or a scores file on ``scale``), the budget, the student in ``out``.
    ``out`` is tied to its teacher, labels and settings: a finished or interrupted distillation
    there from others is refused, unless ``fresh`` starts over (:func:`start_fresh`)."""
    out = Path(out)
    dropped = 0
    if labels_file is not None:  # labelled already: a budget chooses among them
        given = list(RecordFile(labels_file, TeacherLabel).read())
        pool, teach = [judge_item(lab) for lab in given], labels_teacher(given)
        name = f"labels file sha256:{file_hash(labels_file)[:16]}"
    else:
        paths = RunPaths(Path(cfg.run_dir))
        pool = run_items(paths)
        if teacher == "oracle":
            teach, name = oracle_teacher(paths), "oracle"
        elif teacher == "judge":
            reply_cache = paths.root / "llm_cache.sqlite" if cfg.judge.cache else None
            judge = CaptionJudge(cfg.judge, cfg.cache_dir, reply_cache=reply_cache)
            teach, name = judge_teacher(judge, out.parent / f"{out.name}.teacher.jsonl"), f"judge {judge.model_id}"
        elif Path(teacher).is_file():
            if scale not in ("1-5", "0-1"):
                raise ValueError(f"--teacher-scale must be 1-5 or 0-1, got {scale!r}")
            teach = score_file_teacher(Path(teacher), scale)
            name = f"scores file sha256:{file_hash(Path(teacher))[:16]} on {scale}"
            dropped = _unmatched_scores(Path(teacher), pool)
        else:
            raise ValueError(f"--teacher must be judge, oracle or an existing scores file, got {teacher!r}")
    if fresh:  # only once the inputs are read and valid: a bad one deletes nothing
        start_fresh(out)
    check_writable(out)  # before a teacher or a student loads
    return distill_from_pool(pool, teach, cfg.distill, out, cfg.cache_dir, teacher_name=name, dropped_teacher_ids=dropped)


def _unmatched_scores(path: Path, pool: Sequence[JudgeItem]) -> int:
    """How many of a scores file's ids name no answer of the run (left out: counted and logged,
    since a file of another run's ids would otherwise leave next to nothing to learn from)."""
    from capdpo.evaluation.agreement import load_scores

    unmatched = sorted(set(load_scores(path)) - {it.target_id for it in pool})
    if unmatched:
        log.warning("%s: %d teacher score(s) name no answer of the run and are left out (e.g. %s)", path, len(unmatched),
                    ", ".join(unmatched[:3]))
    return len(unmatched)
