"""The synthetic world: determinism, answers that match the pixels, writer schemas."""

import json

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from casp.demo import world
from casp.demo.world import QA, Scene, Shape, WorldConfig


def _scene(*shapes: Shape, background: str = "white", texture: str = "plain") -> Scene:
    return Scene(112, background, texture, tuple(sorted(shapes, key=lambda s: s.cx)), noise_seed=0)


def test_same_seed_same_example_and_splits_differ():
    a = world.make_example("test", 0, 7, "count")
    b = world.make_example("test", 0, 7, "count")
    assert np.array_equal(a.image, b.image) and a.qa == b.qa and a.scene == b.scene
    other_split = [world.make_example("train", 0, i, "count").image for i in range(5)]
    other_seed = [world.make_example("test", 1, i, "count").image for i in range(5)]
    test = [world.make_example("test", 0, i, "count").image for i in range(5)]
    for x, y, z in zip(test, other_split, other_seed):
        assert not np.array_equal(x, y) and not np.array_equal(x, z)


def test_unknown_split_and_bad_config_raise():
    with pytest.raises(ValueError, match="unknown split"):
        world.example_rng("dev", 0, 0)
    with pytest.raises(ValueError, match="max_shapes"):
        WorldConfig(max_shapes=7)
    with pytest.raises(ValueError, match="question type"):
        world.make_question(world.make_example("test", 0, 0, "color").scene, np.random.default_rng(0), "size")


def test_render_draws_each_shape_in_its_color_on_the_background():
    s1 = Shape("circle", "red", 30, 40, 12)
    s2 = Shape("square", "blue", 80, 80, 10)
    img = world.render(_scene(s1, s2))
    assert img.shape == (112, 112, 3) and img.dtype == np.uint8
    for s in (s1, s2):
        assert np.abs(img[s.cy, s.cx].astype(int) - world.COLORS[s.color]).max() <= 12
    assert tuple(img[2, 2]) == world.BACKGROUNDS["white"]
    # circle corner of its bounding box is background, square corner is filled
    assert tuple(img[40 - 11, 30 - 11]) == world.BACKGROUNDS["white"]
    assert tuple(img[80 - 10, 80 - 10]) != world.BACKGROUNDS["white"]


def _blobs(scene: Scene, img: np.ndarray) -> int:
    """Number of connected non-background regions: an independent count of the drawn shapes."""
    bg = np.asarray(world.BACKGROUNDS[scene.background], dtype=int)
    far = np.abs(img.astype(int) - bg).max(axis=-1) > 40  # texture noise/gradient stays below 40
    return ndimage.label(far)[1]


@pytest.mark.parametrize("index", range(40))
def test_count_answer_equals_shapes_seen_in_the_pixels(index):
    rng = world.example_rng("test", 5, index)
    scene = world.sample_scene(rng)
    img = world.render(scene)
    assert _blobs(scene, img) == len(scene.shapes)
    qa = world.make_question(scene, np.random.default_rng(index), "count")
    kinds = [s.kind for s in scene.shapes]
    expected = len(kinds) if "shapes" in qa.question or "objects" in qa.question else None
    for kind, plural in world.PLURALS.items():
        if plural in qa.question:
            expected = kinds.count(kind)
    assert qa.answer == str(expected)


def test_constructed_scene_answers():
    red_circle = Shape("circle", "red", 20, 30, 10)
    blue_square = Shape("square", "blue", 56, 70, 10)
    green_square = Shape("square", "green", 95, 30, 9)
    scene = _scene(green_square, red_circle, blue_square, background="gray")
    answers: dict[str, set[tuple[str, str]]] = {}
    for seed in range(300):
        for qtype in world.QUESTION_TYPES:
            qa = world.make_question(scene, np.random.default_rng(seed), qtype)
            answers.setdefault(qtype, set()).add((qa.question, qa.answer))
    got = {q: a for qs in answers.values() for q, a in qs}
    assert got["what color is the circle?"] == "red"
    assert got["what color is the leftmost shape?"] == "red"
    assert got["what color is the rightmost shape?"] == "green"
    assert got["what shape is the blue object?"] == "square"
    assert got["how many shapes are there?"] == "3"
    assert got["how many squares are there?"] == "2"
    assert got["how many triangles are there?"] == "0"
    assert got["is the red circle left of the blue square?"] == "yes"
    assert got["is the green square left of the blue square?"] == "no"
    assert got["is the green square to the left or to the right of the red circle?"] == "right"
    assert got["what is the rightmost shape?"] == "green square"
    assert got["what is the next shape to the right of the red circle?"] == "blue square"
    assert got["what is the next shape to the left of the green square?"] == "blue square"
    assert got["is there a red circle?"] == "yes"
    assert got["is there a red square?"] == "no"
    assert got["is the background gray?"] == "yes"
    assert got["are there three shapes?"] == "yes"
    # color of a non-unique shape kind is never asked ("the square" is ambiguous here)
    assert "what color is the square?" not in got
    for q, a in answers["mc"]:
        lines = q.splitlines()
        options = {ln[0]: ln[3:] for ln in lines[1:-1]}
        base = got.get(lines[0])
        assert options[a] == base, (q, a)
    assert "a red circle, a blue square and a green square on a gray background" in world.captions(scene)


@pytest.mark.parametrize("index", range(30))
def test_position_answers_follow_center_x(index):
    rng = world.example_rng("calibration", 0, index)
    scene = world.sample_scene(rng)
    xs = {s.name: s.cx for s in scene.shapes}
    assert list(xs.values()) == sorted(xs.values())
    gaps = np.diff(sorted(xs.values()))
    assert (gaps >= WorldConfig().min_dx).all()
    for k in range(10):
        qa = world.make_question(scene, np.random.default_rng(k), "position")
        q = qa.question
        if q.startswith("is the ") and " of the " in q and " or " not in q:
            a_name, rest = q[len("is the ") :].split(" left of the " if " left of " in q else " right of the ")
            b_name = rest.rstrip("?")
            left = xs[a_name] < xs[b_name]
            assert qa.answer == ("yes" if left == (" left of " in q) else "no")
        if "leftmost" in q:
            assert qa.answer == scene.shapes[0].name


def test_colors_distinct_and_shapes_do_not_overlap():
    for i in range(50):
        scene = world.sample_scene(world.example_rng("train", 0, i))
        colors = [s.color for s in scene.shapes]
        assert len(set(colors)) == len(colors)
        for a in scene.shapes:
            for b in scene.shapes:
                if a is not b:
                    assert max(abs(a.cx - b.cx), abs(a.cy - b.cy)) >= a.r + b.r + 3


def test_vqa_writer_schema(tmp_path):
    path = world.write_vqa_jsonl(tmp_path, 12, seed=3)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(records) == 12
    assert {r["type"] for r in records} == set(world.QUESTION_TYPES)
    for r in records:
        assert set(r) == {"image", "question", "answers", "type"}
        assert r["image"].startswith("images/") and isinstance(r["answers"], list) and r["answers"]
        im = Image.open(tmp_path / r["image"])
        assert im.size == (112, 112) and im.mode == "RGB"
    # images are the same examples the in-memory generator produces
    ex = world.make_example("test", 3, 4, world.balanced_type(4))
    assert np.array_equal(np.asarray(Image.open(tmp_path / records[4]["image"])), ex.image)
    assert records[4]["question"] == ex.qa.question


def test_caption_llava_and_corpus_writers(tmp_path):
    caps = [json.loads(x) for x in world.write_caption_jsonl(tmp_path / "c", 4).read_text().splitlines()]
    assert all(set(r) == {"image", "references"} and len(r["references"]) >= 3 for r in caps)
    assert all((tmp_path / "c" / r["image"]).is_file() for r in caps)
    llava = [
        json.loads(x) for x in world.write_llava_jsonl(tmp_path / "l", 5, seed=1, turns=2).read_text().splitlines()
    ]
    for r in llava:
        conv = r["conversations"]
        assert [t["from"] for t in conv] == ["human", "gpt", "human", "gpt"]
        assert conv[0]["value"].startswith("<image>\n") and "<image>" not in conv[2]["value"]
        assert (tmp_path / "l" / r["image"]).is_file()
    text = world.write_text_corpus(tmp_path / "corpus.txt", 6).read_text().splitlines()
    assert len(text) > 6 * 3 and all(line.strip() for line in text)


def test_qa_types_and_captions_are_consistent_for_many_scenes():
    for i in range(100):
        rng = world.example_rng("train", 2, i)
        scene = world.sample_scene(rng)
        for qtype in world.QUESTION_TYPES:
            qa = world.make_question(scene, rng, qtype)
            assert isinstance(qa, QA) and qa.qtype == qtype and qa.answer == qa.answers[0]
        names = [s.name for s in scene.shapes]
        first = world.captions(scene)[0]
        positions = [first.index(n) for n in names]
        assert positions == sorted(positions)  # captions list shapes left to right
