"""Procedural synthetic clips whose captions and QA are exact, because they are derived from the scene.

A :class:`Scene` is a few flat shapes on a plain background. Each shape lives in its own quadrant
of the frame (so shapes never overlap or hide each other), appears at a chosen frame, moves in a
straight line in one direction without reaching its quadrant's border (so the direction is never
ambiguous), and may change colour once. Event frames sit on the 8-frame sampling grid
``linspace(0, n-1, 8)`` so a model that sees 8 uniformly sampled frames can see every event.

Everything is deterministic from an integer seed, and scenes are JSON-serialisable so an oracle can
check answers against ``scenes.jsonl`` later.
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import av
from PIL import Image, ImageDraw

from capdpo.media.frames import sample_indices
from capdpo.records import RecordError, Video, atomic_path, read_jsonl, write_jsonl

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 100, 230),
    "yellow": (240, 215, 40),
    "purple": (150, 60, 190),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
}
# Backgrounds are not palette colours, so every shape contrasts with every background.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (15, 15, 15),
    "gray": (115, 115, 115),
    "navy": (20, 25, 75),
    "brown": (95, 60, 35),
}
KINDS = ("circle", "square", "triangle")
DIRECTIONS = ("left", "right", "up", "down", "none")
SIZES = {"small": 0.06, "large": 0.1}  # half-extent as a fraction of the frame's short side
REGIONS = {"upper left": (0, 0), "upper right": (1, 0), "lower left": (0, 1), "lower right": (1, 1)}
GRID_FRAMES = 8  # events are placed on the frames a model sampling 8 frames sees
QUESTION_KINDS = ("colour", "shape", "count", "motion", "order", "change", "detail")  # SceneQuestion.kind
_NUMBERS = ("no", "one", "two", "three", "four")
_MOTION = {
    "left": "moves steadily to the left",
    "right": "moves steadily to the right",
    "up": "moves steadily upward",
    "down": "moves steadily downward",
    "none": "stays still",
}


@dataclass
class ColourChange:
    """The shape switches to ``colour`` from ``frame`` on."""

    frame: int
    colour: str


@dataclass
class Shape:
    """One shape: what it looks like, where and when it appears, how it moves, how it changes."""

    kind: str  # circle | square | triangle
    colour: str  # a PALETTE name: the colour it has when it appears
    size: str  # small | large
    radius: int  # half-extent in pixels
    x: float  # centre, in pixels, when it appears
    y: float
    direction: str  # left | right | up | down | none
    speed: float  # pixels per frame along ``direction``
    appear: int  # first frame on which it is drawn
    region: str  # quadrant it stays in, a REGIONS key
    change: ColourChange | None = None

    @property
    def name(self) -> str:
        """How captions and questions refer to it: its colour on appearing and its kind."""
        return f"{self.colour} {self.kind}"

    def position(self, frame: int) -> tuple[float, float]:
        t = frame - self.appear
        dx, dy = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1), "none": (0, 0)}[self.direction]
        return self.x + dx * self.speed * t, self.y + dy * self.speed * t

    def colour_at(self, frame: int) -> str:
        return self.change.colour if self.change and frame >= self.change.frame else self.colour

    @property
    def final_colour(self) -> str:
        return self.change.colour if self.change else self.colour


@dataclass
class Scene:
    """A whole clip: background, shapes, length and resolution; the seed that made it."""

    seed: int
    background: str
    shapes: list[Shape] = field(default_factory=list)  # in order of appearance
    n_frames: int = 48
    fps: int = 8
    width: int = 224
    height: int = 224

    @property
    def seconds(self) -> float:
        return self.n_frames / self.fps

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Scene:
        shapes = [
            Shape(**{**s, "change": ColourChange(**s["change"]) if s.get("change") else None}) for s in d["shapes"]
        ]
        return cls(**{**d, "shapes": shapes})


@dataclass
class SyntheticClip:
    """A rendered synthetic clip: its record, its exact QA ``(question, answer, kind)`` and its scene."""

    video: Video
    qa: list[tuple[str, str, str]]
    scene: Scene


# ----------------------------------------------------------------------------- scenes


def random_scene(
    seed: int,
    *,
    width: int = 224,
    height: int = 224,
    n_frames: int = 48,
    fps: int = 8,
    min_shapes: int = 1,
    max_shapes: int = 3,
    change_prob: float = 0.5,
) -> Scene:
    """A random scene, fully determined by ``seed`` and the arguments."""
    if width % 2 or height % 2:
        raise ValueError(f"width and height must be even for yuv420p video, got {width}x{height}")
    if not 1 <= min_shapes <= max_shapes <= len(REGIONS):
        raise ValueError(f"need 1 <= min_shapes <= max_shapes <= {len(REGIONS)}, got {min_shapes}, {max_shapes}")
    if n_frames < 2 * GRID_FRAMES:
        raise ValueError(f"n_frames must be >= {2 * GRID_FRAMES} so events land on distinct frames, got {n_frames}")
    rng = random.Random(seed)
    n = rng.randint(min_shapes, max_shapes)
    background = rng.choice(list(BACKGROUNDS))
    # Distinct colours (plus one spare for a change) make "the red circle" name exactly one shape.
    colours = rng.sample(list(PALETTE), n + 1)
    regions = rng.sample(list(REGIONS), n)
    grid = sample_indices(n_frames, GRID_FRAMES)
    # The first shape is there from frame 0; later ones appear on distinct grid frames in the first
    # half, leaving time to see them move.
    appears = [0] + sorted(rng.sample(grid[1:4], n - 1))
    shapes = [
        _random_shape(rng, colours[i], regions[i], appears[i], width, height, n_frames) for i in range(n)
    ]
    if rng.random() < change_prob:
        s = rng.choice(shapes)
        frame = rng.choice([g for g in grid[2:GRID_FRAMES - 1] if g > s.appear])
        s.change = ColourChange(frame=frame, colour=colours[n])
    return Scene(seed=seed, background=background, shapes=shapes, n_frames=n_frames, fps=fps, width=width, height=height)


def _random_shape(
    rng: random.Random, colour: str, region: str, appear: int, width: int, height: int, n_frames: int
) -> Shape:
    kind, size, direction = rng.choice(KINDS), rng.choice(list(SIZES)), rng.choice(DIRECTIONS)
    short = min(width, height)
    r = round(SIZES[size] * short)
    margin = 0.03 * short
    col, row = REGIONS[region]
    qw, qh = width / 2, height / 2
    # Range of centre positions that keeps the whole shape inside its quadrant.
    x_lo, x_hi = col * qw + margin + r, (col + 1) * qw - margin - r
    y_lo, y_hi = row * qh + margin + r, (row + 1) * qh - margin - r
    x, y = rng.uniform(x_lo, x_hi), rng.uniform(y_lo, y_hi)
    speed = 0.0
    if direction != "none":
        horizontal = direction in ("left", "right")
        lo, hi = (x_lo, x_hi) if horizontal else (y_lo, y_hi)
        travel = (hi - lo) * rng.uniform(0.7, 1.0)  # a long, clearly visible path
        start = lo + rng.uniform(0, hi - lo - travel)
        if direction in ("left", "up"):
            start += travel  # start at the far end and travel back
        x, y = (start, y) if horizontal else (x, start)
        speed = travel / (n_frames - 1 - appear)
    # Rounded to keep the JSON tidy; the margin absorbs the rounding.
    return Shape(kind=kind, colour=colour, size=size, radius=r, x=round(x, 2), y=round(y, 2),
                 direction=direction, speed=round(speed, 4), appear=appear, region=region)


# ----------------------------------------------------------------------------- rendering


def draw_frame(scene: Scene, frame: int) -> Image.Image:
    """The RGB image of one frame of the scene."""
    img = Image.new("RGB", (scene.width, scene.height), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(img)
    for s in scene.shapes:
        if frame < s.appear:
            continue
        x, y = s.position(frame)
        r, fill = s.radius, PALETTE[s.colour_at(frame)]
        box = (x - r, y - r, x + r, y + r)
        if s.kind == "circle":
            draw.ellipse(box, fill=fill)
        elif s.kind == "square":
            draw.rectangle(box, fill=fill)
        else:  # triangle, apex up
            draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=fill)
    return img


def video_codec() -> str:
    """H.264 when this FFmpeg build has libx264, else MPEG-4 part 2 (always built in)."""
    return "libx264" if "libx264" in av.codecs_available else "mpeg4"


def render_scene(scene: Scene, path: str | os.PathLike) -> Path:
    """Render the scene to an mp4 (yuv420p) at ``path``, atomically."""
    path = Path(path)
    codec = video_codec()
    # Same scene, same bytes: one encoder thread (threaded rate control depends on timing),
    # bitexact muxing/encoding (no encoder version string in the file), and none of x264's
    # float-heavy adaptive tools (adaptive quantisation, macroblock tree, psy): with torch's
    # thread pool busy in the same process they gave different bytes about 1 render in 10.
    with atomic_path(path) as tmp, av.open(str(tmp), "w", format="mp4", options={"fflags": "+bitexact"}) as container:
        stream = container.add_stream(codec, rate=scene.fps)
        stream.width, stream.height, stream.pix_fmt = scene.width, scene.height, "yuv420p"
        stream.thread_count = 1
        if codec == "libx264":
            stream.options = {"crf": "18", "preset": "fast", "threads": "1", "flags": "+bitexact",  # near-lossless: colours stay nameable
                              "x264-params": "aq-mode=0:mbtree=0:psy=0"}
        else:
            stream.bit_rate = 2_000_000
            stream.options = {"flags": "+bitexact"}
        for f in range(scene.n_frames):
            frame = av.VideoFrame.from_image(draw_frame(scene, f))
            container.mux(stream.encode(frame))
        container.mux(stream.encode())  # flush the encoder's delayed frames
    return path


# ----------------------------------------------------------------------------- language


def _when(scene: Scene, frame: int) -> str:
    if frame == 0:
        return "at the start"
    f = frame / (scene.n_frames - 1)
    return "early in the video" if f < 1 / 3 else "in the middle of the video" if f < 2 / 3 else "late in the video"


def _at(scene: Scene, frame: int) -> str:
    return f"at about {frame / scene.fps:.1f} seconds"


def _count(n: int, noun: str) -> str:
    return f"{_NUMBERS[n] if n < len(_NUMBERS) else n} {noun}{'' if n == 1 else 's'}"


def _is(n: int) -> str:
    return "is" if n == 1 else "are"


def _a(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def caption_scene(scene: Scene) -> str:
    """A detailed, exact caption: background, each shape (size, colour, kind, place, motion) in
    order of appearance, any colour change and when, and the final count."""
    ordinals = ("first", "second", "third", "fourth")
    parts = [
        f"The video shows simple flat shapes on a plain {scene.background} background, "
        f"filmed by a still camera for {scene.seconds:g} seconds."
    ]
    for i, s in enumerate(scene.shapes):
        if i == 0:
            parts.append(f"At the start, a {s.size} {s.name} is in the {s.region} of the frame, and it {_MOTION[s.direction]}.")
        else:
            when = _when(scene, s.appear)
            parts.append(
                f"{when[0].upper()}{when[1:]}, {_at(scene, s.appear)}, a {ordinals[i]} shape appears: a {s.size} "
                f"{s.name} in the {s.region}, which {_MOTION[s.direction]}."
            )
    changed = [s for s in scene.shapes if s.change]
    for s in changed:
        when = _when(scene, s.change.frame)
        parts.append(
            f"{when[0].upper()}{when[1:]}, {_at(scene, s.change.frame)}, the {s.name} suddenly changes colour "
            f"from {s.colour} to {s.change.colour} and stays {s.change.colour} until the end."
        )
    if not changed:
        parts.append("No shape changes colour.")
    final = [f"{_a(s.final_colour)} {s.final_colour} {s.kind}" for s in scene.shapes]
    n = len(scene.shapes)
    parts.append(f"By the end, {_count(n, 'shape')} {_is(n)} visible: {_join(final)}.")
    parts.append("The shapes never touch each other, and none leaves the frame." if n > 1 else "It never leaves the frame.")
    return " ".join(parts)


@dataclass(frozen=True)
class SceneQuestion:
    """One exact question about a scene: its text, reference answer and kind, plus ``facts``, the
    machine-readable truth an oracle checks a free-form answer against (``capdpo.oracle``).

    ``facts`` by kind (JSON-serialisable; colours are PALETTE names, kinds are KINDS):

    * colour: ``{"colour": str, "later_colour": str | None}`` -- the shape's colour when it appears;
      ``later_colour`` is the colour it changes to, if it does (the question then says "when it
      first appears").
    * shape: ``{"shape": str}``.
    * count: ``{"count": int, "noun": "shape" | kind}`` -- what is counted.
    * motion: ``{"direction": "left" | "right" | "up" | "down" | "none", "asks": "direction" | "yes_no"}``.
    * order: ``{"position": "first" | "last", "answer": shape, "options": [shape, ...]}`` with
      shape = ``{"kind", "colour"}`` (its colour when it appears, the colour that names it);
      ``options`` are the shapes the question chooses among (the two it names, or every shape).
    * change: ``{"changed": true, "from": str, "to": str, "shape": kind, "asks": "what"}`` or
      ``{"changed": false, "asks": "yes_no", "yes_means_change": bool}``.
    * detail: ``{"shape": kind, "colour": str, "size": "small" | "large", "direction": str,
      "change_to": str | None}`` -- the whole truth about one shape, of which the reference answer
      states only the motion; an answer must get the motion right and every other detail it adds
      (so only the caption can tell a right extra detail from a wrong one).

    ``full_answer`` is what a fully informed answerer says (detail questions only; None for the
    others). The built-in policy's SFT may train on it; the judge and the oracle never see it.
    """

    question: str
    answer: str
    kind: str  # one of QUESTION_KINDS
    facts: dict
    full_answer: str | None = None

    def as_tuple(self) -> tuple[str, str, str]:
        return self.question, self.answer, self.kind


def _shape_facts(s: Shape) -> dict:
    return {"kind": s.kind, "colour": s.colour}


def check_unambiguous(scene: Scene) -> None:
    """Raise ``ValueError`` unless every way :func:`scene_questions` names a shape picks exactly one.

    Questions name a shape by its first colour ("the red object", "the red circle"), by kind and
    quadrant ("the circle in the upper left"), ask which of two shapes appears first, and ask
    "what changes". That is unambiguous only when no two shapes share a quadrant, no colour is used
    twice (first colours and the colour a shape changes to), no two shapes appear on the same frame
    and at most one shape changes colour. :func:`random_scene` guarantees all four; a hand-made scene
    (say, read back from an edited ``scenes.jsonl``) might not.
    """
    shapes = scene.shapes
    colours = [s.colour for s in shapes] + [s.change.colour for s in shapes if s.change]
    problems = [
        what
        for what, values in (("quadrant", [s.region for s in shapes]), ("colour", colours),
                             ("appearance frame", [s.appear for s in shapes]))
        if len(set(values)) != len(values)
    ]
    if sum(s.change is not None for s in shapes) > 1:
        problems.append("colour change (more than one shape changes)")
    if not shapes:
        problems.append("shape (the scene has none)")
    if problems:
        raise ValueError(f"scene {scene.seed}: questions would be ambiguous, shapes share a {', a '.join(problems)}")


def scene_questions(scene: Scene) -> list[SceneQuestion]:
    """Exact questions with their truth; kinds: colour, shape, count, motion, order, change, detail.

    Every scene gets colour, shape, count, motion and change questions, plus order when it has two
    or more shapes, and a detail question last (added later, so the earlier questions of every seed
    are unchanged). Phrasing varies with the scene's seed. Raises ``ValueError`` for a scene whose
    questions would be ambiguous (:func:`check_unambiguous`).
    """
    check_unambiguous(scene)
    rng = random.Random(scene.seed * 7919 + 1)  # own stream: QA phrasing never shifts the scene
    shapes = scene.shapes
    # Prefer shapes that keep their colour, so "what colour" has one answer for the whole clip.
    stable = [s for s in shapes if not s.change] or shapes
    qa: list[SceneQuestion] = []

    s = rng.choice(stable)
    first = " when it first appears" if s.change else ""
    q = rng.choice([
        f"What colour is the {s.kind} in the {s.region} of the frame{first}?",
        f"Which colour does the {s.size} {s.kind} in the {s.region} have{first}?",
    ])
    ans = rng.choice([f"It is {s.colour}{first}.", f"The {s.kind} is {s.colour}{first}."])
    qa.append(SceneQuestion(q, ans, "colour", {"colour": s.colour, "later_colour": s.change.colour if s.change else None}))

    s = rng.choice(stable)
    who = f"the object that is {s.colour} at first" if s.change else f"the {s.colour} object"
    q = rng.choice([f"What shape is {who}?", f"What kind of shape is {who}?"])
    ans = rng.choice([f"It is a {s.kind}.", f"{who[0].upper()}{who[1:]} is a {s.kind}."])
    qa.append(SceneQuestion(q, ans, "shape", {"shape": s.kind}))

    n = len(shapes)
    qa.append(rng.choice(count_questions(scene, rng.choice([s.kind for s in shapes]))))

    s = rng.choice(shapes)
    yes_no = {"direction": s.direction, "asks": "yes_no"}
    if s.direction == "none":
        qa.append(SceneQuestion(f"Does the {s.name} move during the video?", "No, it stays still the whole time.", "motion",
                                yes_no))
    else:
        way = {"left": "to the left", "right": "to the right", "up": "upward", "down": "downward"}[s.direction]
        qa.append(rng.choice([
            SceneQuestion(f"In which direction does the {s.name} move?", f"It moves {way}.", "motion",
                          {"direction": s.direction, "asks": "direction"}),
            SceneQuestion(f"Does the {s.name} move during the video?", f"Yes, it moves steadily {way}.", "motion", yes_no),
        ]))

    if n >= 2:
        a, b = rng.sample(shapes, 2)
        early = min(a, b, key=lambda s: s.appear)
        every = [_shape_facts(s) for s in shapes]
        qa.append(rng.choice([
            SceneQuestion(f"Which appears first, the {a.name} or the {b.name}?", f"The {early.name} appears first.", "order",
                          {"position": "first", "answer": _shape_facts(early), "options": [_shape_facts(a), _shape_facts(b)]}),
            SceneQuestion("Which shape is there from the very beginning?", f"The {shapes[0].name} is there from the beginning.",
                          "order", {"position": "first", "answer": _shape_facts(shapes[0]), "options": every}),
            SceneQuestion("Which shape appears last?", f"The {shapes[-1].name} appears last.", "order",
                          {"position": "last", "answer": _shape_facts(shapes[-1]), "options": every}),
        ]))

    changed = [s for s in shapes if s.change]
    if changed:
        s = changed[0]
        ans = f"The {s.kind} changes colour from {s.colour} to {s.change.colour} {_when(scene, s.change.frame)}."
        q = rng.choice(["What changes during the video?", f"What happens to the {s.name} during the video?"])
        qa.append(SceneQuestion(q, ans, "change",
                                {"changed": True, "from": s.colour, "to": s.change.colour, "shape": s.kind, "asks": "what"}))
    else:
        qa.append(rng.choice([
            SceneQuestion("Does any shape change colour during the video?", "No, every shape keeps its colour throughout.",
                          "change", {"changed": False, "asks": "yes_no", "yes_means_change": True}),
            SceneQuestion("Does every shape keep its colour for the whole video?", "Yes, no shape changes colour.", "change",
                          {"changed": False, "asks": "yes_no", "yes_means_change": False}),
        ]))
    qa.append(_detail_question(scene, rng))  # last, drawing from rng last: the questions above stay as they were
    return qa


def _detail_question(scene: Scene, rng: random.Random) -> SceneQuestion:
    """An open question about one shape whose reference answer gives only its motion: size and colour
    change are in the caption but not the reference, so only a judge reading the caption can tell
    a right extra detail from an invented one."""
    s = rng.choice(scene.shapes)
    q = rng.choice([f"What does the {s.name} do during the video?", f"How does the {s.name} behave in the video?"])
    motion = _MOTION[s.direction] + (" the whole time" if s.direction == "none" else "")
    colour = (f"{_when(scene, s.change.frame)} it changes colour to {s.change.colour}" if s.change
              else "it keeps its colour the whole time")
    facts = {"shape": s.kind, "colour": s.colour, "size": s.size, "direction": s.direction,
             "change_to": s.change.colour if s.change else None}
    return SceneQuestion(q, f"It {motion}.", "detail", facts, full_answer=f"The {s.size} {s.name} {motion}, and {colour}.")


def count_questions(scene: Scene, kind: str) -> list[SceneQuestion]:
    """The generator's three count questions of ``scene``: the shapes that appear, the shapes visible
    at the end, and the shapes of ``kind``."""
    n = len(scene.shapes)
    k = sum(s.kind == kind for s in scene.shapes)
    n_shapes, appear = _count(n, "shape"), "appears" if n == 1 else "appear"
    return [
        SceneQuestion("How many shapes appear in the video?", f"{n_shapes.capitalize()} {appear} in the video.", "count",
                      {"count": n, "noun": "shape"}),
        SceneQuestion("How many shapes are visible at the end of the video?", f"There {_is(n)} {n_shapes} at the end.",
                      "count", {"count": n, "noun": "shape"}),
        SceneQuestion(f"How many {kind}s are there in the video?", f"There {_is(k)} {_count(k, kind)}.", "count",
                      {"count": k, "noun": kind}),
    ]


def every_question(scene: Scene, kinds: Sequence[str] = ("colour", "shape", "count")) -> list[SceneQuestion]:
    """The scene's own questions of ``kinds`` (:func:`scene_questions`) and every other count, shape
    and colour question the generator could have asked of it: each count phrasing, with the count of
    each kind present; the shape of each shape, named by its first colour; the colour of each, named
    by its kind and quadrant. Each question text once, the scene's own phrasing first. Many exact
    questions a clip, for teaching a model (``capdpo.models.mini``); unambiguous for any scene that
    :func:`check_unambiguous` accepts (no two shapes share a colour or a quadrant)."""
    more: list[SceneQuestion] = []
    if "count" in kinds:
        for kind in dict.fromkeys(s.kind for s in scene.shapes):
            more += count_questions(scene, kind)
    for s in scene.shapes:
        first = " when it first appears" if s.change else ""
        if "shape" in kinds:
            who = f"the object that is {s.colour} at first" if s.change else f"the {s.colour} object"
            more.append(SceneQuestion(f"What shape is {who}?", f"It is a {s.kind}.", "shape", {"shape": s.kind}))
        if "colour" in kinds:
            more.append(SceneQuestion(f"What colour is the {s.kind} in the {s.region} of the frame{first}?",
                                      f"It is {s.colour}{first}.", "colour",
                                      {"colour": s.colour, "later_colour": s.change.colour if s.change else None}))
    asked: dict[str, SceneQuestion] = {}
    for q in [q for q in scene_questions(scene) if q.kind in kinds] + more:
        asked.setdefault(q.question, q)
    return list(asked.values())


def scene_qa(scene: Scene) -> list[tuple[str, str, str]]:
    """The ``(question, answer, kind)`` of :func:`scene_questions`: reference answers, no facts or full answers."""
    return [item.as_tuple() for item in scene_questions(scene)]


# ----------------------------------------------------------------------------- datasets


def load_scenes(path: str | os.PathLike) -> dict[str, Scene]:
    """Scenes by video id from a ``scenes.jsonl`` written by :func:`make_synthetic_dataset`."""
    out = {}
    for lineno, row in read_jsonl(path):
        try:
            out[row["id"]] = Scene.from_dict(row["scene"])
        except (KeyError, TypeError) as e:
            raise RecordError(f"{path}:{lineno}: not a scene row ({e!r})") from None
    return out


def make_synthetic_dataset(out_dir: str | os.PathLike, n_videos: int, seed: int = 0, **scene_kwargs) -> list[SyntheticClip]:
    """Render ``out_dir/videos/synth_0000.mp4 ...`` and write ``out_dir/scenes.jsonl``.

    Clip ``i`` uses scene seed ``seed * 100_000 + i``. A clip already on disk whose recorded scene
    is unchanged is not rendered again, so re-running is cheap and a killed run resumes.
    """
    out_dir = Path(out_dir)
    scenes_path = out_dir / "scenes.jsonl"
    previous = load_scenes(scenes_path) if scenes_path.exists() else {}
    clips = []
    for i in range(n_videos):
        vid = f"synth_{i:04d}"
        scene = random_scene(seed * 100_000 + i, **scene_kwargs)
        path = out_dir / "videos" / f"{vid}.mp4"
        if not path.exists() or previous.get(vid) != scene:
            render_scene(scene, path)
        video = Video(id=vid, video=str(path), caption=caption_scene(scene), source="synthetic")
        clips.append(SyntheticClip(video=video, qa=scene_qa(scene), scene=scene))
    write_jsonl(scenes_path, ({"id": c.video.id, "video": c.video.video, "scene": c.scene.to_dict()} for c in clips))
    return clips
