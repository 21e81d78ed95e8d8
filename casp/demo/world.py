"""A deterministic synthetic visual world: colored shapes on plain backgrounds, with questions.

Every example is a pure function of ``(split, seed, index)``: the random stream of example ``i``
comes from ``numpy.random.SeedSequence([split_tag, seed, i])``, so splits never share a stream,
any example can be regenerated on its own, and held-out sets are unlimited.

A scene holds 1-5 shapes (circle, square, triangle) of pairwise different colors (6 colors), so
"the red shape" always names one object, and pairwise horizontal center distance of at least
``min_dx`` pixels, so "left of" and "leftmost" always have one answer. Backgrounds are large
uniform areas (sometimes with light noise or a gradient): most image tokens are redundant, as in
real photos with sky or walls, which is what makes VLM attention sparse.

Question types: ``color``, ``shape``, ``count``, ``position``, ``yesno``, ``mc`` (multiple choice,
answered with a letter), plus reference captions. Writers produce LLaVA conversation JSONL, VQA
JSONL, caption JSONL and a plain-text corpus. Only numpy and Pillow.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
from PIL import Image

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 225),
    "yellow": (235, 205, 40),
    "purple": (140, 60, 185),
    "orange": (245, 140, 30),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "gray": (140, 140, 140),
    "black": (20, 20, 20),
}
TEXTURES: tuple[str, ...] = ("plain", "noise", "gradient")
QUESTION_TYPES: tuple[str, ...] = ("color", "shape", "count", "position", "yesno", "mc")
SPLITS: dict[str, int] = {"train": 11, "calibration": 23, "test": 37}
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles"}


@dataclasses.dataclass(frozen=True)
class WorldConfig:
    """Geometry of the world. ``radius`` is a circle's radius, a square's half side, a triangle's
    half base; ``min_dx`` is the least horizontal distance between two shape centers."""

    image_size: int = 112
    min_shapes: int = 1
    max_shapes: int = 5
    min_radius: int = 8
    max_radius: int = 14
    min_dx: int = 10
    color_jitter: int = 12

    def __post_init__(self) -> None:
        if self.image_size < 32:
            raise ValueError(f"image_size must be >= 32, got {self.image_size}")
        if not 1 <= self.min_shapes <= self.max_shapes <= len(COLORS):
            raise ValueError(
                f"need 1 <= min_shapes <= max_shapes <= {len(COLORS)} (one color per shape), "
                f"got {self.min_shapes}..{self.max_shapes}"
            )
        if not 2 <= self.min_radius <= self.max_radius or 4 * self.max_radius > self.image_size:
            raise ValueError("need 2 <= min_radius <= max_radius <= image_size / 4")
        span = self.image_size - 2 * self.max_radius - 2
        if self.min_dx * (self.max_shapes - 1) > span // 2:
            raise ValueError(f"min_dx={self.min_dx} too large to place {self.max_shapes} shapes; lower it")


@dataclasses.dataclass(frozen=True)
class Shape:
    kind: str
    color: str
    cx: int
    cy: int
    r: int

    @property
    def name(self) -> str:
        return f"{self.color} {self.kind}"


@dataclasses.dataclass(frozen=True)
class Scene:
    size: int
    background: str
    texture: str
    shapes: tuple[Shape, ...]  # sorted left to right by center x
    noise_seed: int


@dataclasses.dataclass(frozen=True)
class QA:
    question: str
    answer: str  # the training target
    qtype: str
    answers: tuple[str, ...]  # every accepted answer (answer first)


@dataclasses.dataclass(frozen=True)
class Example:
    scene: Scene
    image: np.ndarray  # [H, W, 3] uint8
    qa: QA


def example_rng(split: str, seed: int, index: int) -> np.random.Generator:
    """The random stream of example ``index`` of ``split``; independent across splits/seeds/indices."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {sorted(SPLITS)}")
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([SPLITS[split], seed, index])))


# ----------------------------------------------------------------------------------------------- scenes


def sample_scene(rng: np.random.Generator, cfg: WorldConfig = WorldConfig(), n_shapes: int | None = None) -> Scene:
    """Draw a scene: non-overlapping shapes of distinct colors, centers ``min_dx`` apart in x."""
    n = int(rng.integers(cfg.min_shapes, cfg.max_shapes + 1)) if n_shapes is None else n_shapes
    colors = rng.choice(list(COLORS), size=n, replace=False)
    lo, hi = cfg.max_radius + 1, cfg.image_size - cfg.max_radius - 1
    while True:  # rejection sampling; with the validated config a draw is accepted within a few tries
        placed: list[Shape] = []
        for color in colors:
            for _ in range(50):
                r = int(rng.integers(cfg.min_radius, cfg.max_radius + 1))
                cx, cy = (int(v) for v in rng.integers(lo, hi + 1, size=2))
                far_x = all(abs(cx - s.cx) >= cfg.min_dx for s in placed)
                apart = all(max(abs(cx - s.cx), abs(cy - s.cy)) >= r + s.r + 3 for s in placed)
                if far_x and apart:
                    placed.append(Shape(str(rng.choice(SHAPES)), str(color), cx, cy, r))
                    break
            else:
                break
        if len(placed) == n:
            break
    background = str(rng.choice(list(BACKGROUNDS)))
    texture = str(rng.choice(TEXTURES, p=[0.5, 0.25, 0.25]))
    shapes = tuple(sorted(placed, key=lambda s: s.cx))
    return Scene(cfg.image_size, background, texture, shapes, int(rng.integers(2**31)))


def shape_mask(shape: Shape, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Boolean mask of ``shape`` on pixel centers ``(ys, xs)`` (broadcastable grids)."""
    dx, dy = xs + 0.5 - shape.cx, ys + 0.5 - shape.cy
    if shape.kind == "circle":
        return dx * dx + dy * dy <= shape.r * shape.r
    if shape.kind == "square":
        return (np.abs(dx) <= shape.r) & (np.abs(dy) <= shape.r)
    # upward isosceles triangle: apex (0, -r), base from (-r, r) to (r, r); inside both slanted edges
    return (dy <= shape.r) & (2 * np.abs(dx) <= dy + shape.r)


def render(scene: Scene, cfg: WorldConfig = WorldConfig()) -> np.ndarray:
    """The scene as an [H, W, 3] uint8 RGB array. Deterministic (texture noise from ``noise_seed``)."""
    size = scene.size
    rng = np.random.default_rng(scene.noise_seed)
    img = np.empty((size, size, 3), np.float32)
    img[:] = BACKGROUNDS[scene.background]
    if scene.texture == "noise":
        img += rng.normal(0.0, 6.0, size=(size, size, 1)).astype(np.float32)
    elif scene.texture == "gradient":
        direction = rng.choice([-1.0, 1.0])
        img += direction * np.linspace(-15.0, 15.0, size, dtype=np.float32)[:, None, None]
    for s in scene.shapes:
        y0, y1 = max(s.cy - s.r - 1, 0), min(s.cy + s.r + 2, size)
        x0, x1 = max(s.cx - s.r - 1, 0), min(s.cx + s.r + 2, size)
        ys, xs = np.mgrid[y0:y1, x0:x1]
        mask = shape_mask(s, ys, xs)
        jitter = rng.integers(-cfg.color_jitter, cfg.color_jitter + 1, size=3)
        img[y0:y1, x0:x1][mask] = np.asarray(COLORS[s.color]) + jitter
    return np.clip(img, 0, 255).astype(np.uint8)


# -------------------------------------------------------------------------------------------- questions


def _pick(rng: np.random.Generator, items):
    return items[int(rng.integers(len(items)))]


def _count_answers(n: int) -> tuple[str, ...]:
    return (str(n), NUMBER_WORDS[n])


def _q_color(scene: Scene, rng: np.random.Generator) -> QA:
    kinds = [s.kind for s in scene.shapes]
    unique = [s for s in scene.shapes if kinds.count(s.kind) == 1]
    if unique and rng.random() < 0.7:
        s = _pick(rng, unique)
        q = _pick(rng, [f"what color is the {s.kind}?", f"what is the color of the {s.kind}?"])
    else:
        side = _pick(rng, ["leftmost", "rightmost"])
        s = scene.shapes[0] if side == "leftmost" else scene.shapes[-1]
        q = _pick(rng, [f"what color is the {side} shape?", f"what is the color of the {side} shape?"])
    return QA(q, s.color, "color", (s.color,))


def _q_shape(scene: Scene, rng: np.random.Generator) -> QA:
    s = _pick(rng, scene.shapes)
    q = _pick(rng, [f"what shape is the {s.color} object?", f"what is the shape of the {s.color} one?"])
    return QA(q, s.kind, "shape", (s.kind,))


def _q_count(scene: Scene, rng: np.random.Generator) -> QA:
    if rng.random() < 0.6:
        n = len(scene.shapes)
        q = _pick(rng, ["how many shapes are there?", "how many objects are in the image?"])
    else:
        kind = _pick(rng, SHAPES)
        n = sum(s.kind == kind for s in scene.shapes)
        q = f"how many {PLURALS[kind]} are there?"
    return QA(q, str(n), "count", _count_answers(n))


def _q_position(scene: Scene, rng: np.random.Generator) -> QA:
    shapes = scene.shapes
    if len(shapes) == 1:
        return _q_extreme(scene, rng)
    form = int(rng.integers(4))
    i, j = (int(v) for v in rng.choice(len(shapes), size=2, replace=False))
    a, b = shapes[i], shapes[j]  # index order is left-to-right order
    if form == 0:
        rel = _pick(rng, ["left", "right"])
        truth = (i < j) == (rel == "left")
        ans = "yes" if truth else "no"
        return QA(f"is the {a.name} {rel} of the {b.name}?", ans, "position", (ans,))
    if form == 1:
        ans = "left" if i < j else "right"
        return QA(f"is the {a.name} to the left or to the right of the {b.name}?", ans, "position", (ans,))
    if form == 2:
        return _q_extreme(scene, rng)
    rel = _pick(rng, ["left", "right"])
    k = int(rng.integers(1, len(shapes))) if rel == "left" else int(rng.integers(0, len(shapes) - 1))
    ref, nxt = shapes[k], shapes[k - 1 if rel == "left" else k + 1]
    return QA(f"what is the next shape to the {rel} of the {ref.name}?", nxt.name, "position", (nxt.name,))


def _q_extreme(scene: Scene, rng: np.random.Generator) -> QA:
    side = _pick(rng, ["leftmost", "rightmost"])
    s = scene.shapes[0] if side == "leftmost" else scene.shapes[-1]
    q = _pick(rng, [f"what is the {side} shape?", f"which shape is the {side} one?"])
    return QA(q, s.name, "position", (s.name,))


def _q_yesno(scene: Scene, rng: np.random.Generator) -> QA:
    form = int(rng.integers(4))
    present = {(s.color, s.kind) for s in scene.shapes}
    if form == 0:
        if rng.random() < 0.5:
            color, kind = _pick(rng, sorted(present))
        else:  # a near miss: a present color with another shape, or a present shape in another color
            s = _pick(rng, scene.shapes)
            options = [(s.color, k) for k in SHAPES] + [(c, s.kind) for c in COLORS]
            absent = [o for o in options if o not in present]
            color, kind = _pick(rng, absent)
        ans = "yes" if (color, kind) in present else "no"
        return QA(f"is there {article(color + ' ' + kind)}?", ans, "yesno", (ans,))
    if form == 1:
        s = _pick(rng, scene.shapes)
        kind = s.kind if rng.random() < 0.5 else _pick(rng, [k for k in SHAPES if k != s.kind])
        ans = "yes" if kind == s.kind else "no"
        return QA(f"is the {s.color} shape a {kind}?", ans, "yesno", (ans,))
    if form == 2:
        n = len(scene.shapes)
        k = n if rng.random() < 0.5 else _pick(rng, [m for m in range(1, 6) if m != n])
        ans = "yes" if k == n else "no"
        noun = "shape" if k == 1 else "shapes"
        verb = "is" if k == 1 else "are"
        return QA(f"{verb} there {NUMBER_WORDS[k]} {noun}?", ans, "yesno", (ans,))
    bg = scene.background if rng.random() < 0.5 else _pick(rng, [b for b in BACKGROUNDS if b != scene.background])
    ans = "yes" if bg == scene.background else "no"
    return QA(f"is the background {bg}?", ans, "yesno", (ans,))


_LETTERS = "ABCD"


def _q_mc(scene: Scene, rng: np.random.Generator) -> QA:
    base = _pick(rng, [_q_color, _q_shape, _q_count])(scene, rng)
    if base.qtype == "color":
        pool = list(COLORS)
    elif base.qtype == "shape":
        pool = list(SHAPES)
    else:
        pool = [str(m) for m in range(6)]
    n_opt = min(len(pool), int(rng.integers(3, 5)))
    wrong = [p for p in pool if p != base.answer]
    options = [base.answer] + [str(w) for w in rng.choice(wrong, size=n_opt - 1, replace=False)]
    options = [options[int(k)] for k in rng.permutation(n_opt)]
    letter = _LETTERS[options.index(base.answer)]
    listing = "\n".join(f"{_LETTERS[k]}. {o}" for k, o in enumerate(options))
    q = f"{base.question}\n{listing}\nanswer with the option's letter."
    return QA(q, letter, "mc", (letter, base.answer))


_MAKERS = {
    "color": _q_color,
    "shape": _q_shape,
    "count": _q_count,
    "position": _q_position,
    "yesno": _q_yesno,
    "mc": _q_mc,
}


def make_question(scene: Scene, rng: np.random.Generator, qtype: str) -> QA:
    """One question of type ``qtype`` about ``scene`` with its (unique) answer."""
    if qtype not in _MAKERS:
        raise ValueError(f"unknown question type {qtype!r}; use one of {QUESTION_TYPES}")
    return _MAKERS[qtype](scene, rng)


def article(phrase: str) -> str:
    """``phrase`` with its indefinite article: "a red circle", "an orange square"."""
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _listing(names: list[str]) -> str:
    items = [article(n) for n in names]
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def captions(scene: Scene) -> list[str]:
    """Reference captions (several phrasings); objects are listed left to right."""
    lst = _listing([s.name for s in scene.shapes])
    n = len(scene.shapes)
    count = f"{NUMBER_WORDS[n]} {'shape' if n == 1 else 'shapes'}"
    bg = scene.background
    return [
        f"{lst} on a {bg} background",
        f"a {bg} background with {lst}",
        f"{count} on a {bg} background: {lst}",
        f"an image of {lst}",
        f"from left to right: {lst}",
    ]


CAPTION_PROMPTS = ("describe the image.", "write a short caption for the image.", "what is in the image?")


def make_caption_turn(scene: Scene, rng: np.random.Generator) -> QA:
    refs = captions(scene)
    return QA(_pick(rng, list(CAPTION_PROMPTS)), _pick(rng, refs), "caption", tuple(refs))


def sentences(scene: Scene) -> list[str]:
    """Plain declarative sentences about the scene, for a language-model corpus."""
    out = [captions(scene)[0] + "."]
    n = len(scene.shapes)
    out.append(f"there {'is' if n == 1 else 'are'} {NUMBER_WORDS[n]} {'shape' if n == 1 else 'shapes'}.")
    for s in scene.shapes:
        out.append(f"the {s.color} shape is a {s.kind}.")
    for a, b in zip(scene.shapes, scene.shapes[1:]):
        out.append(f"the {a.name} is left of the {b.name}.")
    return out


# --------------------------------------------------------------------------------------------- examples


def make_example(split: str, seed: int, index: int, qtype: str, cfg: WorldConfig = WorldConfig()) -> Example:
    """Example ``index`` of a split: its scene, rendered image, and one question of ``qtype``."""
    rng = example_rng(split, seed, index)
    scene = sample_scene(rng, cfg)
    qa = make_caption_turn(scene, rng) if qtype == "caption" else make_question(scene, rng, qtype)
    return Example(scene, render(scene, cfg), qa)


def balanced_type(index: int) -> str:
    """Question type of record ``index`` in the evaluation writers: cycles so types are balanced."""
    return QUESTION_TYPES[index % len(QUESTION_TYPES)]


def _image_path(root: Path, index: int, image: np.ndarray) -> str:
    rel = f"images/{index + 1:06d}.png"
    path = root / rel
    if not path.exists():
        Image.fromarray(image).save(path)
    return rel


def _check_n(n: int) -> None:
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    tmp.replace(path)
    return path


def write_vqa_jsonl(
    out_dir: str | Path, n: int, seed: int = 0, split: str = "test", cfg: WorldConfig = WorldConfig()
) -> Path:
    """``n`` VQA records (one image each, types balanced) to ``out_dir/vqa.jsonl`` + ``out_dir/images``.

    Record: ``{"image": "images/000001.png", "question": ..., "answers": [...], "type": ...}``.
    """
    _check_n(n)
    root = Path(out_dir)
    (root / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        ex = make_example(split, seed, i, balanced_type(i), cfg)
        image = _image_path(root, i, ex.image)
        records.append(
            {"image": image, "question": ex.qa.question, "answers": list(ex.qa.answers), "type": ex.qa.qtype}
        )
    return _write_jsonl(root / "vqa.jsonl", records)


def write_caption_jsonl(
    out_dir: str | Path, n: int, seed: int = 0, split: str = "test", cfg: WorldConfig = WorldConfig()
) -> Path:
    """``n`` caption records to ``out_dir/captions.jsonl``: ``{"image": ..., "references": [...]}``."""
    _check_n(n)
    root = Path(out_dir)
    (root / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        ex = make_example(split, seed, i, "caption", cfg)
        records.append({"image": _image_path(root, i, ex.image), "references": list(ex.qa.answers)})
    return _write_jsonl(root / "captions.jsonl", records)


def write_llava_jsonl(
    out_dir: str | Path,
    n: int,
    seed: int = 0,
    split: str = "train",
    turns: int = 3,
    cfg: WorldConfig = WorldConfig(),
) -> Path:
    """``n`` LLaVA conversation records (``turns`` QA pairs per image) to ``out_dir/llava.jsonl``.

    Record: ``{"image": ..., "conversations": [{"from": "human", "value": "<image>\\n<question>"},
    {"from": "gpt", "value": "<answer>"}, ...]}``; only the first human turn carries ``<image>``.
    """
    _check_n(n)
    if turns < 1:
        raise ValueError(f"turns must be >= 1, got {turns}")
    root = Path(out_dir)
    (root / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        rng = example_rng(split, seed, i)
        scene = sample_scene(rng, cfg)
        conv = []
        for t in range(turns):
            qa = make_turn(scene, rng)
            conv.append({"from": "human", "value": ("<image>\n" if t == 0 else "") + qa.question})
            conv.append({"from": "gpt", "value": qa.answer})
        records.append({"image": _image_path(root, i, render(scene, cfg)), "conversations": conv})
    return _write_jsonl(root / "llava.jsonl", records)


def write_text_corpus(
    path: str | Path, n: int, seed: int = 0, split: str = "test", cfg: WorldConfig = WorldConfig()
) -> Path:
    """A plain-text corpus of ``n`` scenes' captions, sentences and QA pairs, one line each."""
    _check_n(n)
    lines = []
    for i in range(n):
        rng = example_rng(split, seed, i)
        scene = sample_scene(rng, cfg)
        lines.extend(sentences(scene))
        qa = make_question(scene, rng, balanced_type(i))
        lines.append(f"{qa.question.splitlines()[0]} {qa.answers[-1] if qa.qtype == 'mc' else qa.answer}.")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(path)
    return path


# Training mix. Weights follow what the model finds hard: spatial questions (position, the colour of
# the leftmost shape) and multiple choice lag behind shape, yes/no and counting (see
# benchmarks/results/demo_training.txt), so they are drawn more often.
TRAIN_MIX: dict[str, float] = {
    "color": 1.5,
    "shape": 0.7,
    "count": 1.4,
    "position": 2.5,
    "yesno": 0.7,
    "mc": 1.6,
    "caption": 0.6,
}


def make_turn(scene: Scene, rng: np.random.Generator, mix: dict[str, float] = TRAIN_MIX) -> QA:
    """A random question or caption turn about ``scene``, types drawn with weights ``mix``."""
    names = list(mix)
    p = np.asarray([mix[k] for k in names], dtype=np.float64)
    qtype = names[int(rng.choice(len(names), p=p / p.sum()))]
    return make_caption_turn(scene, rng) if qtype == "caption" else make_question(scene, rng, qtype)
