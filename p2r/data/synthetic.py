"""A synthetic video reasoning data set that a ~3M-parameter model can learn on a CPU in minutes.

Each clip is a few frames of large, saturated solid shapes on a plain background that appear,
move across the whole frame, disappear or change colour, or of a short word written in some
frames. Each clip gets one question of a VideoP2R problem type with a reference trace in the
process-aware template, and ``facts``: the structured ground truth plus ``facts["evidence"]``,
the phrase groups an observation must mention to be sufficient (see :mod:`p2r.data.records`),
so the perception reward can be computed by rule instead of by an LLM judge.

Perception must matter: every question reads the same whatever the answer, option letters and
answer values are balanced, and distractor options are as plausible from the text as the answer.
Everything is drawn from a seeded ``random.Random``, so a seed gives byte-identical JSON and
identical videos.
"""

from __future__ import annotations

import io
import json
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import av
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from callbacks.rewards.judges import evidence_satisfied
from p2r.data.prompts import OPTION_LETTERS
from p2r.data.records import VideoRecord
from p2r.data.shards import write_shards

COLOURS = {
    "red": (230, 30, 30),
    "green": (30, 190, 60),
    "blue": (40, 80, 235),
    "yellow": (240, 220, 30),
    "purple": (150, 50, 210),
    "orange": (250, 140, 20),
}
BACKGROUNDS = {"black": (12, 12, 12), "white": (240, 240, 240)}
TEXT_COLOURS = {"black": "white", "white": "black"}
SHAPE_KINDS = ("circle", "square", "triangle")
DIRECTIONS = ("left", "right", "up", "down")
QUADRANTS = {"top left": (0.25, 0.25), "top right": (0.75, 0.25), "bottom left": (0.25, 0.75), "bottom right": (0.75, 0.75)}
NUMBER_WORDS = ("zero", "one", "two", "three", "four")
# Three-letter words that are not part of any other record's wording, so only the OCR clip's own
# observation can mention them.
OCR_WORDS = ("CAT", "DOG", "SUN", "FOX", "BUS", "JAM", "OWL", "KEY", "MAP", "CUP", "ZIP", "FIG")
DIRECTION_PHRASES = {
    "left": ["moves left", "moving left", "moved left", "to the left", "leftward", "leftwards"],
    "right": ["moves right", "moving right", "moved right", "to the right", "rightward", "rightwards"],
    "up": ["moves up", "moving up", "moved up", "upward", "upwards", "to the top"],
    "down": ["moves down", "moving down", "moved down", "downward", "downwards", "to the bottom"],
}
START_EDGE = {"left": "right", "right": "left", "up": "bottom", "down": "top"}
END_EDGE = {"left": "left", "right": "right", "up": "top", "down": "bottom"}
UNIT_STEP = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
SPLITS = ("train", "val", "test")
DATA_SOURCE = "synthetic"


@dataclass(frozen=True)
class VideoSpec:
    """Geometry and timing shared by every clip of a data set."""

    size: int = 64  # frame width and height in pixels
    frames: int = 16  # frames per clip
    fps: int = 4  # frames per second written in the mp4

    def frame_at(self, fraction: float) -> int:
        """The frame index a fraction of the way through the clip."""
        return round(fraction * (self.frames - 1))


@dataclass(frozen=True)
class Shape:
    """One solid shape: where it is (linearly from ``start`` to ``end``), when, and in which colour."""

    kind: str
    colour: str
    width: float
    start: tuple[float, float]
    end: tuple[float, float]
    appear_frame: int = 0
    vanish_frame: int | None = None  # first frame it is gone; None: shown to the end
    colour_after: str | None = None  # colour from change_frame on
    change_frame: int | None = None

    def visible(self, t: int) -> bool:
        return t >= self.appear_frame and (self.vanish_frame is None or t < self.vanish_frame)

    def centre(self, t: int, frames: int) -> tuple[float, float]:
        a = t / (frames - 1)
        return (self.start[0] + a * (self.end[0] - self.start[0]), self.start[1] + a * (self.end[1] - self.start[1]))

    def colour_at(self, t: int) -> str:
        changed = self.colour_after is not None and self.change_frame is not None and t >= self.change_frame
        return self.colour_after if changed else self.colour

    @property
    def name(self) -> str:
        """How questions and observations refer to it, e.g. 'red circle'."""
        return f"{self.colour} {self.kind}"

    def to_facts(self) -> dict[str, Any]:
        return {
            "shape": self.kind,
            "colour": self.colour,
            "width": round(self.width, 2),
            "start": [round(v, 2) for v in self.start],
            "end": [round(v, 2) for v in self.end],
            "appear_frame": self.appear_frame,
            "vanish_frame": self.vanish_frame,
            "colour_after": self.colour_after,
            "change_frame": self.change_frame,
        }


@dataclass(frozen=True)
class Caption:
    """A word written in the middle of the frame from ``first_frame`` to ``last_frame`` inclusive."""

    word: str
    colour: str
    first_frame: int
    last_frame: int


@dataclass(frozen=True)
class Scene:
    background: str
    shapes: tuple[Shape, ...] = ()
    caption: Caption | None = None


@dataclass
class Draft:
    """A clip's scene and question before option letters are assigned.

    For multiple choice, ``answer_text`` is the correct option's text and ``distractors`` the
    others; ``think`` then gets its closing sentence naming the letter.
    """

    scene: Scene
    problem: str
    answer_text: str
    observation: str
    think: str
    evidence: list[list[str]]
    distractors: list[str] = field(default_factory=list)
    direction: str | None = None
    distance_widths: float | None = None


@dataclass
class SyntheticSplit:
    records: list[VideoRecord]
    shards: list[Path]


def balanced(rng: random.Random, values: list[Any] | tuple[Any, ...], n: int) -> list[Any]:
    """``n`` values cycling through ``values`` then shuffled: every value within one of n/len."""
    out = [values[i % len(values)] for i in range(n)]
    rng.shuffle(out)
    return out


def with_article(phrase: str) -> str:
    """'a red circle', 'an orange square'."""
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def width_phrase(widths: float) -> str:
    return f"{widths:g} width" + ("" if widths == 1 else "s")


# ---- scene geometry ----------------------------------------------------------------------------


def _crossing(rng: random.Random, spec: VideoSpec, width: float, direction: str) -> tuple[tuple[float, float], tuple[float, float]]:
    """Start and end centres of a shape crossing the whole frame in ``direction``."""
    near, far = width / 2 + 1, spec.size - width / 2 - 1
    across = rng.uniform(near, far)
    dx, dy = UNIT_STEP[direction]
    if dx:
        xs = (near, far) if dx > 0 else (far, near)
        return (xs[0], across), (xs[1], across)
    ys = (near, far) if dy > 0 else (far, near)
    return (across, ys[0]), (across, ys[1])


def _in_quadrant(rng: random.Random, spec: VideoSpec, width: float, quadrant: str) -> tuple[float, float]:
    """A centre inside ``quadrant`` that keeps the whole shape inside that quarter of the frame."""
    slack = max(0.0, (spec.size / 2 - width) / 2 - 1)
    fx, fy = QUADRANTS[quadrant]
    return (fx * spec.size + rng.uniform(-slack, slack), fy * spec.size + rng.uniform(-slack, slack))


def _large(spec: VideoSpec) -> float:
    """Width of a lone shape: nearly half the frame, so that its colour dominates the few vision
    tokens of a 56x56 frame (a tiny model first learns what the mean of its vision tokens says)."""
    return round(0.45 * spec.size)


def _quarter(spec: VideoSpec) -> float:
    """Width of a shape that shares the frame with others, one per quadrant (most of the quadrant)."""
    return round(0.4 * spec.size)


def _distinct_shapes(rng: random.Random, n: int) -> list[tuple[str, str]]:
    """``n`` (colour, kind) pairs with distinct colours, so each has a unique name."""
    return [(colour, rng.choice(SHAPE_KINDS)) for colour in rng.sample(list(COLOURS), n)]


def _absent_name(rng: random.Random, used_colours: set[str]) -> str:
    """A shape name not in the clip: a plausible distractor that the text cannot rule out."""
    colour = rng.choice([c for c in COLOURS if c not in used_colours])
    return f"{colour} {rng.choice(SHAPE_KINDS)}"


def _static(colour: str, kind: str, width: float, centre: tuple[float, float], **timing: Any) -> Shape:
    return Shape(kind=kind, colour=colour, width=width, start=centre, end=centre, **timing)


def _listing(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


# ---- tasks: one builder per kind of question -----------------------------------------------------


def _motion_observation(shape: Shape, background: str, direction: str) -> str:
    return (
        f"{with_article(shape.name).capitalize()} is on a {background} background. It starts at the {START_EDGE[direction]} edge "
        f"and moves {direction} across the whole frame, ending at the {END_EDGE[direction]} edge."
    )


def motion_direction(rng: random.Random, spec: VideoSpec, direction: str) -> Draft:
    colour, kind = rng.choice(list(COLOURS)), rng.choice(SHAPE_KINDS)
    width = _large(spec)
    start, end = _crossing(rng, spec, width, direction)
    shape = Shape(kind, colour, width, start, end)
    background = rng.choice(list(BACKGROUNDS))
    return Draft(
        scene=Scene(background, (shape,)),
        problem=f"In which direction does the {kind} move?",
        answer_text=direction,
        distractors=[d for d in DIRECTIONS if d != direction],
        observation=_motion_observation(shape, background, direction),
        think=(
            f"The {kind} begins at the {START_EDGE[direction]} edge and finishes at the {END_EDGE[direction]} edge, "
            f"so its motion is {direction}."
        ),
        evidence=[DIRECTION_PHRASES[direction]],
        direction=direction,
    )


def colour_change(rng: random.Random, spec: VideoSpec, after: str) -> Draft:
    before = rng.choice([c for c in COLOURS if c != after])
    kind = rng.choice(SHAPE_KINDS)
    width = _large(spec)
    jitter = spec.size / 16
    centre = (spec.size / 2 + rng.uniform(-jitter, jitter), spec.size / 2 + rng.uniform(-jitter, jitter))
    change = rng.randint(spec.frame_at(0.35), spec.frame_at(0.65))
    shape = _static(before, kind, width, centre, colour_after=after, change_frame=change)
    background = rng.choice(list(BACKGROUNDS))
    others = rng.sample([c for c in COLOURS if c not in (before, after)], 2)
    return Draft(
        scene=Scene(background, (shape,)),
        problem=f"What colour does the {kind} turn into?",
        answer_text=after,
        # The starting colour is always offered: only watching tells it apart from the answer.
        distractors=[before, *others],
        observation=(
            f"A {kind} sits in the middle of a {background} background. It is {before} at first; "
            f"partway through the video it turns {after} and stays {after} until the end."
        ),
        think=f"The {kind} started {before} and ended {after}, so the colour it turned into is {after}.",
        evidence=[[f"turns {after}", f"turned {after}", f"becomes {after}", f"became {after}", f"changes to {after}", f"to {after}"]],
    )


def first_appearance(rng: random.Random, spec: VideoSpec, _target: None) -> Draft:
    pairs = _distinct_shapes(rng, 3)
    quadrants = rng.sample(list(QUADRANTS), 3)
    width = _quarter(spec)
    shapes = tuple(
        _static(colour, kind, width, _in_quadrant(rng, spec, width, q), appear_frame=spec.frame_at(f))
        for (colour, kind), q, f in zip(pairs, quadrants, (0.1, 0.4, 0.7))
    )
    background = rng.choice(list(BACKGROUNDS))
    first, second, third = (s.name for s in shapes)
    return Draft(
        scene=Scene(background, shapes),
        problem="Which shape appears first?",
        answer_text=first,
        distractors=[second, third, _absent_name(rng, {c for c, _ in pairs})],
        observation=(
            f"On a {background} background, first {with_article(first)} appears at the {quadrants[0]}, then {with_article(second)} "
            f"appears at the {quadrants[1]}, and last {with_article(third)} appears at the {quadrants[2]}. All three stay until the end."
        ),
        think=f"The {first} is the earliest to appear; the {second} and the {third} come later. So the first shape is the {first}.",
        evidence=[[f"first {with_article(first)}", f"first, {with_article(first)}", f"first the {first}", f"first, the {first}", f"{first} appears first", f"{first} is first"]],
    )


def disappearance(rng: random.Random, spec: VideoSpec, _target: None) -> Draft:
    pairs = _distinct_shapes(rng, 3)
    quadrants = rng.sample(list(QUADRANTS), 3)
    width = _quarter(spec)
    gone = rng.randrange(3)
    vanish = rng.randint(spec.frame_at(0.35), spec.frame_at(0.65))
    shapes = tuple(
        _static(colour, kind, width, _in_quadrant(rng, spec, width, q), vanish_frame=vanish if i == gone else None)
        for i, ((colour, kind), q) in enumerate(zip(pairs, quadrants))
    )
    background = rng.choice(list(BACKGROUNDS))
    names = [s.name for s in shapes]
    placed = [f"{with_article(n)} at the {q}" for n, q in zip(names, quadrants)]
    return Draft(
        scene=Scene(background, shapes),
        problem="Which shape disappears during the video?",
        answer_text=names[gone],
        distractors=[n for i, n in enumerate(names) if i != gone] + [_absent_name(rng, {c for c, _ in pairs})],
        observation=(
            f"On a {background} background there are three shapes: {_listing(placed)}. "
            f"Partway through, the {names[gone]} disappears while the other two stay."
        ),
        think=f"Only the {names[gone]} is missing at the end; the other two shapes remain. So the shape that disappears is the {names[gone]}.",
        evidence=[[f"{names[gone]} disappears", f"{names[gone]} disappeared", f"{names[gone]} vanishes", f"{names[gone]} vanished", f"{names[gone]} is gone"]],
    )


def count(rng: random.Random, spec: VideoSpec, n: int) -> Draft:
    pairs = _distinct_shapes(rng, n)
    quadrants = rng.sample(list(QUADRANTS), n)
    width = _quarter(spec)
    appear = [spec.frame_at(0.6 * i / max(n - 1, 1)) for i in range(n)]
    shapes = tuple(
        _static(colour, kind, width, _in_quadrant(rng, spec, width, q), appear_frame=a)
        for (colour, kind), q, a in zip(pairs, quadrants, appear)
    )
    background = rng.choice(list(BACKGROUNDS))
    names = [s.name for s in shapes]
    word = NUMBER_WORDS[n]
    noun = "shape" if n == 1 else "shapes"
    if n == 1:
        seen = f"On a {background} background, {with_article(names[0])} appears at the {quadrants[0]}."
        reasoning = f"Only the {names[0]} appears, so there is 1 shape."
    else:
        placed = [f"{with_article(name)} at the {q}" for name, q in zip(names, quadrants)]
        seen = f"On a {background} background, shapes appear one after another: {_listing(placed)}."
        reasoning = f"Counting the shapes that appeared: {_listing(names)}. That makes {n} shapes."
    return Draft(
        scene=Scene(background, shapes),
        problem="How many shapes appear in the video?",
        answer_text=str(n),
        observation=f"{seen} In total {word} {noun} appear{'s' if n == 1 else ''}.",
        think=f"{reasoning} So the answer is {n}.",
        evidence=[[f"{n} {noun}", f"{word} {noun}"]],
    )


def distance_choices(spec: VideoSpec) -> list[float]:
    """Distances in half-width steps that fit inside the frame for :func:`distance`'s shape."""
    width = _distance_width(spec)
    return [k / 2 for k in range(2, 9) if k / 2 * width <= spec.size - width - 2]


def _distance_width(spec: VideoSpec) -> float:
    return round(0.19 * spec.size)


def distance(rng: random.Random, spec: VideoSpec, widths: float) -> Draft:
    colour, kind = rng.choice(list(COLOURS)), rng.choice(SHAPE_KINDS)
    width = _distance_width(spec)
    direction = rng.choice(DIRECTIONS)
    travel = widths * width
    near, far = width / 2 + 1, spec.size - width / 2 - 1
    dx, dy = UNIT_STEP[direction]
    # Place the start so that the whole path stays inside the frame.
    along = rng.uniform(near, far - travel) if dx + dy > 0 else rng.uniform(near + travel, far)
    across = rng.uniform(near, far)
    start = (along, across) if dx else (across, along)
    end = (start[0] + dx * travel, start[1] + dy * travel)
    shape = Shape(kind, colour, width, start, end)
    background = rng.choice(list(BACKGROUNDS))
    amount = width_phrase(widths)
    return Draft(
        scene=Scene(background, (shape,)),
        problem=f"How far does the {kind} travel, measured in widths of the {kind}?",
        answer_text=f"{widths:g}",
        observation=f"{with_article(shape.name).capitalize()} on a {background} background moves {direction} in a straight line. From start to end it travels {amount} of the {kind}.",
        think=f"The {kind} covers {amount} of its own size between its first and last position. So the distance is {widths:g}.",
        evidence=[[amount, f"{widths:g} times its width"]],
        direction=direction,
        distance_widths=widths,
    )


def ocr(rng: random.Random, spec: VideoSpec, word: str) -> Draft:
    background = rng.choice(list(BACKGROUNDS))
    caption = Caption(word, TEXT_COLOURS[background], spec.frame_at(0.2), spec.frame_at(0.8))
    return Draft(
        scene=Scene(background, (), caption),
        problem="What word is written in the video?",
        answer_text=word,
        observation=f'The word "{word}" is written in {caption.colour} capital letters in the middle of a {background} background during the middle part of the video.',
        think=f"The letters shown in the frames spell {word}, and no other text appears. So the answer is {word}.",
        evidence=[[word]],
    )


DESCRIPTION_MOTION = {
    "left": "moves from the right to the left",
    "right": "moves from the left to the right",
    "up": "moves from the bottom to the top",
    "down": "moves from the top to the bottom",
}


def description(rng: random.Random, spec: VideoSpec, direction: str) -> Draft:
    colour, kind = rng.choice(list(COLOURS)), rng.choice(SHAPE_KINDS)
    width = _large(spec)
    start, end = _crossing(rng, spec, width, direction)
    shape = Shape(kind, colour, width, start, end)
    background = rng.choice(list(BACKGROUNDS))
    sentence = f"{with_article(shape.name).capitalize()} {DESCRIPTION_MOTION[direction]}."
    return Draft(
        scene=Scene(background, (shape,)),
        problem="Describe in one sentence what happens in the video.",
        answer_text=sentence,
        observation=_motion_observation(shape, background, direction),
        think=f"There is a single {shape.name} and it travels {direction} across the frame. A short description is: {sentence}",
        evidence=[[colour], [kind], DIRECTION_PHRASES[direction]],
        direction=direction,
    )


@dataclass(frozen=True)
class Task:
    """A kind of question: how often it is drawn, and the answer values it is balanced over."""

    build: Callable[[random.Random, VideoSpec, Any], Draft]
    problem_type: str
    weight: float
    targets: Callable[[VideoSpec], list[Any]]


# Mostly multiple choice and counting: the types a tiny model can learn from 56x56 frames.
TASKS: dict[str, Task] = {
    "motion_direction": Task(motion_direction, "multiple choice", 0.12, lambda spec: list(DIRECTIONS)),
    "colour_change": Task(colour_change, "multiple choice", 0.11, lambda spec: list(COLOURS)),
    "first_appearance": Task(first_appearance, "multiple choice", 0.11, lambda spec: [None]),
    "disappearance": Task(disappearance, "multiple choice", 0.11, lambda spec: [None]),
    "count": Task(count, "numerical", 0.30, lambda spec: list(range(1, len(QUADRANTS) + 1))),
    "distance": Task(distance, "regression", 0.08, distance_choices),
    "ocr": Task(ocr, "OCR", 0.09, lambda spec: list(OCR_WORDS)),
    "description": Task(description, "free-form", 0.08, lambda spec: list(DIRECTIONS)),
}


def task_plan(rng: random.Random, n: int, tasks: tuple[str, ...] | None = None) -> list[str]:
    """``n`` task names in the proportions of the weights (largest remainders), shuffled; ``tasks``
    limits the draw to those tasks (their weights renormalised)."""
    chosen = {name: TASKS[name] for name in (tasks or TASKS)}
    total = sum(t.weight for t in chosen.values())
    exact = {name: n * t.weight / total for name, t in chosen.items()}
    counts = {name: math.floor(v) for name, v in exact.items()}
    by_remainder = sorted(chosen, key=lambda name: counts[name] - exact[name])
    for name in by_remainder[: n - sum(counts.values())]:
        counts[name] += 1
    plan = [name for name in chosen for _ in range(counts[name])]
    rng.shuffle(plan)
    return plan


# ---- terse traces (the RL testbed) -------------------------------------------------------------
# The RL testbed (tools/compare_rl.py) samples thousands of completions per minute on a CPU, so its
# traces say only what decides the answer: a one-clause observation naming the observed value, and
# a think that maps that value to the answer. Each phrase below contains one of the task's evidence
# phrases for that value, so a terse observation of the right value is judged sufficient and one of
# a wrong value is not.
TERSE_OBSERVATION: dict[str, Callable[[str], str]] = {
    "motion_direction": lambda v: f"It moves {v}.",
    "colour_change": lambda v: f"It turns {v}.",
    "first_appearance": lambda v: f"First {with_article(v)} appears.",
    "disappearance": lambda v: f"The {v} disappears.",
    "count": lambda v: f"{v} shape appears." if v == "1" else f"{v} shapes appear.",
    "ocr": lambda v: f'The word "{v}" is written.',
}
TraceStyle = Literal["full", "terse"]


def terse_draft(task: str, draft: Draft, value: str) -> Draft:
    """``draft`` with a terse observation and think that report ``value`` as the observed answer
    (the true ``draft.answer_text``, or a wrong one for a noisy teacher trace); evidence unchanged."""
    if task not in TERSE_OBSERVATION:
        raise ValueError(f"task {task!r} has no terse trace; terse tasks: {sorted(TERSE_OBSERVATION)}")
    return replace(draft, observation=TERSE_OBSERVATION[task](value), think=f"So the answer is {value}.")


def wrong_value(rng: random.Random, task: str, draft: Draft) -> str:
    """A plausible wrong reading of the clip: a distractor option, or another count or word."""
    if draft.distractors:
        return rng.choice(draft.distractors)
    if task == "count":
        return rng.choice([str(n) for n in range(1, len(QUADRANTS) + 1) if str(n) != draft.answer_text])
    return rng.choice([w for w in OCR_WORDS if w != draft.answer_text])


# ---- rendering ---------------------------------------------------------------------------------


@lru_cache(maxsize=8)
def _font(px: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=px)


def _draw_shape(draw: ImageDraw.ImageDraw, kind: str, centre: tuple[float, float], width: float, rgb: tuple[int, int, int]) -> None:
    x, y = centre
    r = width / 2
    if kind == "circle":
        draw.ellipse([x - r, y - r, x + r, y + r], fill=rgb)
    elif kind == "square":
        draw.rectangle([x - r, y - r, x + r, y + r], fill=rgb)
    else:
        draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=rgb)


def _draw_caption(draw: ImageDraw.ImageDraw, caption: Caption, size: int) -> None:
    """The word centred, as large as fits in 80 % of the frame width."""
    px = round(0.3 * size)
    while True:
        font = _font(px)
        left, top, right, bottom = draw.textbbox((0, 0), caption.word, font=font)
        if right - left <= 0.8 * size or px <= 6:
            break
        px -= 1
    xy = ((size - (right - left)) / 2 - left, (size - (bottom - top)) / 2 - top)
    fill = BACKGROUNDS["white"] if caption.colour == "white" else BACKGROUNDS["black"]
    draw.text(xy, caption.word, font=font, fill=fill)


def render_frames(scene: Scene, spec: VideoSpec) -> list[np.ndarray]:
    """The clip's frames as (size, size, 3) uint8 RGB arrays."""
    frames = []
    for t in range(spec.frames):
        image = Image.new("RGB", (spec.size, spec.size), BACKGROUNDS[scene.background])
        draw = ImageDraw.Draw(image)
        for shape in scene.shapes:
            if shape.visible(t):
                _draw_shape(draw, shape.kind, shape.centre(t, spec.frames), shape.width, COLOURS[shape.colour_at(t)])
        if scene.caption is not None and scene.caption.first_frame <= t <= scene.caption.last_frame:
            _draw_caption(draw, scene.caption, spec.size)
        frames.append(np.asarray(image))
    return frames


def encode_mp4(frames: list[np.ndarray], fps: int) -> bytes:
    """H.264 mp4 bytes (yuv420p) of RGB frames; the same frames always give the same bytes.

    x264's SIMD code paths made about one clip in a hundred encode differently depending on
    what the process encoded before (measured here), so they are switched off (``asm=0``, about
    2 ms more per 16-frame 64x64 clip); one thread and explicit timestamps for the same reason.
    """
    height, width = frames[0].shape[:2]
    options = {"crf": "18", "preset": "veryfast", "threads": "1", "x264-params": "asm=0"}
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps, options=options)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for index, frame in enumerate(frames):
            video_frame = av.VideoFrame.from_ndarray(frame, format="rgb24")
            video_frame.pts = index
            container.mux(stream.encode(video_frame))
        container.mux(stream.encode())
    return buffer.getvalue()


# ---- records -----------------------------------------------------------------------------------


def _trace(observation: str, think: str, answer: str) -> str:
    return f"<observation>{observation}</observation>\n<think>{think}</think>\n<answer>{answer}</answer>"


def make_record(
    record_id: str, task: str, draft: Draft, spec: VideoSpec, letter_index: int | None, rng: random.Random,
    style: TraceStyle = "full", traced_value: str | None = None,
) -> VideoRecord:
    """The Video-R1-layout record of a draft; multiple choice puts the answer at ``letter_index``.

    ``style="terse"`` writes the testbed's short trace (:func:`terse_draft`); ``traced_value``, a
    wrong value, makes that trace a noisy teacher's: its observation, think and answer report the
    wrong value while ``solution`` keeps the right one (so rewards and evaluation stay correct).
    """
    problem_type = TASKS[task].problem_type
    options: list[str] = []
    if problem_type == "multiple choice":
        others = list(draft.distractors)
        rng.shuffle(others)
        texts = others[:letter_index] + [draft.answer_text] + others[letter_index:]
        options = [f"{OPTION_LETTERS[i]}. {text}" for i, text in enumerate(texts)]
    noisy = traced_value is not None and traced_value != draft.answer_text
    trace = terse_draft(task, draft, traced_value or draft.answer_text) if style == "terse" else draft
    answer, think, solution = traced_value if noisy else draft.answer_text, trace.think, draft.answer_text
    if problem_type == "multiple choice":
        answer = OPTION_LETTERS[texts.index(answer)]
        solution = OPTION_LETTERS[letter_index]
        think = f"{think} That is option {answer}."
    if not noisy and not evidence_satisfied(trace.observation, draft.evidence):
        raise AssertionError(f"{record_id}: reference observation misses its own evidence {draft.evidence}")
    if noisy and evidence_satisfied(trace.observation, draft.evidence):
        raise AssertionError(f"{record_id}: the noisy observation {trace.observation!r} still meets the evidence")
    scene = draft.scene
    caption = scene.caption
    facts = {
        "task": task,
        "background": scene.background,
        "size": spec.size,
        "frames": spec.frames,
        "fps": spec.fps,
        "shapes": [s.to_facts() for s in scene.shapes],
        "count": len(scene.shapes),
        "text": None if caption is None else {
            "word": caption.word, "colour": caption.colour, "first_frame": caption.first_frame, "last_frame": caption.last_frame,
        },
        "direction": draft.direction,
        "distance_widths": draft.distance_widths,
        "answer_text": draft.answer_text,
        "evidence": draft.evidence,
        "trace_correct": not noisy,
    }
    return VideoRecord(
        id=record_id,
        problem=draft.problem,
        problem_type=problem_type,
        data_type="video",
        path=f"videos/{record_id}.mp4",
        solution=f"<answer>{solution}</answer>",
        options=options,
        observation=f"<observation>{trace.observation}</observation>",
        process=f"<think>{think}</think>",
        output=_trace(trace.observation, think, answer),
        data_source=DATA_SOURCE,
        facts=facts,
    )


def generate_split(
    split: str, n: int, seed: int, spec: VideoSpec, tasks: tuple[str, ...] | None = None,
    style: TraceStyle = "full", observation_noise: float = 0.0,
) -> list[tuple[VideoRecord, Draft]]:
    """The records of one split (no video yet); answers and option letters balanced per split.

    ``tasks`` limits the kinds of question; ``style`` picks full or terse traces; a share
    ``observation_noise`` of the records get a noisy teacher trace (a wrong observation and the
    answer that follows from it; terse style only; see :func:`make_record`). The noise has its own random stream, so
    the clips and questions of a split are the same whatever the noise.
    """
    if not 0.0 <= observation_noise <= 1.0:
        raise ValueError(f"observation_noise must be in [0, 1], got {observation_noise}")
    if observation_noise and style != "terse":
        raise ValueError("observation_noise needs style='terse' (only terse traces can report a wrong value)")
    rng = random.Random(f"p2r-synthetic:{seed}:{split}")
    noise_rng = random.Random(f"p2r-synthetic-noise:{seed}:{split}")
    plan = task_plan(rng, n, tasks)
    targets = {name: iter(balanced(rng, TASKS[name].targets(spec), plan.count(name))) for name in TASKS}
    # Letters are balanced per task, so no task leaks its answer through a favourite letter.
    letters = {name: iter(balanced(rng, list(range(4)), plan.count(name))) for name in TASKS}
    out = []
    for i, name in enumerate(plan):
        draft = TASKS[name].build(rng, spec, next(targets[name]))
        letter = next(letters[name]) if TASKS[name].problem_type == "multiple choice" else None
        wrong = wrong_value(noise_rng, name, draft) if noise_rng.random() < observation_noise else None
        record = make_record(f"synthetic-{split}-{i:06d}", name, draft, spec, letter, rng, style, wrong)
        out.append((record, draft))
    return out


def make_synthetic(
    out: str | Path,
    n_train: int = 6000,
    n_val: int = 200,
    n_test: int = 200,
    seed: int = 0,
    size: int = 64,
    frames: int = 16,
    fps: int = 4,
    samples_per_shard: int = 1000,
    progress: bool = True,
    tasks: tuple[str, ...] | None = None,
    style: TraceStyle = "full",
    observation_noise: float = 0.0,
) -> dict[str, SyntheticSplit]:
    """Write the data set under ``out``: ``videos/<id>.mp4``, ``{split}.json``, ``shards/{split}-*.tar``.

    ``path`` in the JSON is relative to ``out``. Returns each split's records and shard paths.
    ``tasks``, ``style`` and ``observation_noise`` (training split only: held-out traces are the
    right ones) are :func:`generate_split`'s.
    """
    if frames < 8 or size < 32:
        raise ValueError("need at least 8 frames of at least 32x32 pixels for the events to be visible")
    spec = VideoSpec(size=size, frames=frames, fps=fps)
    root = Path(out)
    (root / "videos").mkdir(parents=True, exist_ok=True)
    sizes = dict(zip(SPLITS, (n_train, n_val, n_test)))
    result: dict[str, SyntheticSplit] = {}
    with tqdm(total=sum(sizes.values()), desc="synthetic clips", unit="clip", disable=not progress) as bar:
        for split, n in sizes.items():
            samples = []
            noise = observation_noise if split == "train" else 0.0
            for record, draft in generate_split(split, n, seed, spec, tasks, style, noise):
                media = encode_mp4(render_frames(draft.scene, spec), spec.fps)
                (root / record.path).write_bytes(media)
                samples.append((record, media, "mp4"))
                bar.update()
            records = [record for record, _, _ in samples]
            text = json.dumps([r.to_dict() for r in records], indent=1, ensure_ascii=False)
            (root / f"{split}.json").write_text(text + "\n", encoding="utf-8")
            shards = write_shards(samples, root / "shards", split, samples_per_shard)
            result[split] = SyntheticSplit(records, shards)
    return result
