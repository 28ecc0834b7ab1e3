"""Multiple-choice versions of the synthetic clips' questions: the miniature's judge-free benchmark.

    bench = synthetic_bench(run_paths.qa.read(), run_paths.videos.by_id(), load_scenes(scenes_path))

Each held-out question the scene generator wrote (matched by its text: capdpo.oracle.find_question)
becomes an item whose right option is the scene's fact and whose other options come from the
generator's vocabulary - the palette's colours, the three shape kinds, counts one to four, the
four directions, the scene's own shapes - in an order drawn from the scene's seed and the question
id, so the same run always gets the same items. By kind:

- colour: the shape's first colour and three other palette colours (never its later colour);
- shape: circle, square, triangle;
- count: one, two, three, four;
- motion: the four directions, or Yes / No ("Does the red circle move?");
- order: the shapes the question names (or all of the scene's);
- change: "from X to Y" against "from Y to X", "from X to <another colour>" and "No shape changes
  colour", or Yes / No;
- detail: the shape's motion among the five motions.

They are asked and scored as Video-MME is (its prompt and extractors, with the item's letters).
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping

from capdpo.evaluation.mc.items import BENCHMARKS, LETTERS, MCBench, MCItem
from capdpo.media.synthetic import KINDS, PALETTE, Scene
from capdpo.oracle import Unscorable, find_question
from capdpo.records import QAItem, Video

COUNT_WORDS = ("one", "two", "three", "four")  # the generator's count words (a scene has one to four shapes)
DIRECTION_WORDS = {"left": "to the left", "right": "to the right", "up": "upward", "down": "downward"}
MOTIONS = {"left": "It moves to the left.", "right": "It moves to the right.", "up": "It moves upward.",
           "down": "It moves downward.", "none": "It stays still."}
NO_CHANGE = "No shape changes colour."


def _shape_name(shape: dict) -> str:
    return f"the {shape['colour']} {shape['kind']}"


def mc_options(kind: str, facts: dict, rng: random.Random) -> tuple[list[str], str]:
    """The options of a question of ``kind`` with ``facts`` (capdpo.media.synthetic.SceneQuestion)
    and the right one, before shuffling."""
    if kind == "colour":
        others = [c for c in PALETTE if c not in (facts["colour"], facts["later_colour"])]
        return [facts["colour"], *rng.sample(others, 3)], facts["colour"]
    if kind == "shape":
        return list(KINDS), facts["shape"]
    if kind == "count":
        return list(COUNT_WORDS), COUNT_WORDS[facts["count"] - 1]
    if kind == "motion" and facts["asks"] == "direction":
        return list(DIRECTION_WORDS.values()), DIRECTION_WORDS[facts["direction"]]
    if kind == "motion":
        return ["Yes", "No"], "No" if facts["direction"] == "none" else "Yes"
    if kind == "order":
        return [_shape_name(s) for s in facts["options"]], _shape_name(facts["answer"])
    if kind == "change" and facts["asks"] == "what":
        old, new = facts["from"], facts["to"]
        third = rng.choice([c for c in PALETTE if c not in (old, new)])
        right = f"It changes from {old} to {new}."
        return [right, f"It changes from {new} to {old}.", f"It changes from {old} to {third}.", NO_CHANGE], right
    if kind == "change":
        return ["Yes", "No"], "Yes" if facts["changed"] == facts["yes_means_change"] else "No"
    if kind == "detail":
        return list(MOTIONS.values()), MOTIONS[facts["direction"]]
    raise ValueError(f"no multiple-choice form for question kind {kind!r}")


def synthetic_item(question: QAItem, scene: Scene, scenes: Mapping[str, Scene]) -> MCItem:
    """The multiple-choice version of one held-out question (Unscorable when the scene generator
    did not write it)."""
    asked = find_question(question, scenes)
    rng = random.Random(f"{scene.seed}:{question.id}")  # a str seed: the same draw in every process
    options, right = mc_options(asked.kind, asked.facts, rng)
    rng.shuffle(options)
    return MCItem(question.id, (question.video_id,), question.question, tuple(options), LETTERS[options.index(right)],
                  {"kind": asked.kind}, where=f"question {question.id}")


def synthetic_bench(questions: Iterable[QAItem], videos: Mapping[str, Video], scenes: Mapping[str, Scene],
                    max_items: int | None = None) -> MCBench:
    """The MC versions of the held-out (test split) questions about synthetic clips; questions the
    generator did not write (LLM-written, an edited scenes file) are left out."""
    items = []
    for q in questions:
        if q.split != "test" or q.video_id not in scenes:
            continue
        try:
            items.append(synthetic_item(q, scenes[q.video_id], scenes))
        except Unscorable:
            continue
    items = items[:max_items] if max_items else items
    return MCBench(BENCHMARKS["synthetic_mc"], "synthetic_mc", [], items, {i.id: videos[i.video[0]] for i in items}, {})
