"""VQA / multiple-choice / caption runners on tiny models, with a stub model whose answers are known."""

import json

import pytest
import torch
from torch import nn

from casp.eval.cider import cider_d, tokenize_caption
from casp.eval.errors import EvalError
from casp.eval.tasks import read_task_file, run_caption, run_mc, run_vqa
from casp.models import get_adapter
from tests.fixtures import build, make_image


class StubVLM(nn.Module):
    """generate() appends a fixed answer to every row: predictions are known exactly."""

    def __init__(self, answer_ids: list[int]):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.answer = torch.tensor(answer_ids)
        self.calls = []

    def generate(self, input_ids, attention_mask=None, pixel_values=None, max_new_tokens=16, **kwargs):
        self.calls.append(
            {
                "batch": input_ids.shape[0],
                "images": pixel_values is not None,
                "left_padded": bool(attention_mask is not None and (attention_mask[:, -1] == 1).all()),
            }
        )
        answer = self.answer[:max_new_tokens].expand(input_ids.shape[0], -1)
        return torch.cat([input_ids, answer], dim=1)


@pytest.fixture(scope="module")
def llava():
    model, processor = build("llava")
    return model, processor, get_adapter(model)


def _write(tmp_path, name, lines):
    (tmp_path / "images").mkdir(exist_ok=True)
    for i in range(2):
        make_image(i).save(tmp_path / "images" / f"{i}.png")
    path = tmp_path / name
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


def _stub(processor, text):
    return StubVLM(processor.tokenizer(text, add_special_tokens=False)["input_ids"])


VQA_LINES = [
    {
        "image": "images/0.png",
        "question": "how many shapes ?",
        "answers": ["two"] * 4 + ["three"] * 6,
        "question_type": "count",
    },
    {"image": "images/1.png", "question": "what color ?", "answers": ["red"], "question_type": "color"},
    {"image": "missing.png", "question": "what color ?", "answers": ["red"]},
    {"image": "images/0.png", "question": "  ", "answers": ["red"]},
    "{not json",
    {"image": "images/1.png", "question": "how many ?", "answer": "2", "question_type": "count"},
    {"image": "images/1.png", "question": "how many ?", "answers": [{"answer": "three"}, {"answer": "two"}]},
]


def test_run_vqa_known_answers(tmp_path, llava):
    _, processor, adapter = llava
    path = _write(tmp_path, "vqa.jsonl", VQA_LINES)
    stub = _stub(processor, "two")
    out = run_vqa(stub, processor, adapter, path, batch_size=3, progress=False)
    assert out["n"] == 4 and out["n_skipped"] == 3
    assert [p["prediction"] for p in out["predictions"]] == ["two"] * 4  # only new tokens decoded
    assert out["exact_match"] == pytest.approx(3 / 4)
    # Row 1: 4 of 10 humans said "two" -> 1.0; row 2: 0; rows 6, 7: exact match (not 10 answers) -> 1.
    assert out["vqa_accuracy"] == pytest.approx(3 / 4)
    assert out["per_type"]["count"] == {"n": 2, "exact_match": 1.0, "vqa_accuracy": 1.0}
    assert out["per_type"]["color"]["vqa_accuracy"] == 0.0
    assert out["skipped"][0] == f"{path}:3: image {str(tmp_path / 'missing.png')!r} not found"
    assert out["skipped"][1].startswith(f"{path}:4: empty") and out["skipped"][2].startswith(
        f"{path}:5: not valid JSON"
    )
    assert [c["batch"] for c in stub.calls] == [3, 1] and all(c["images"] and c["left_padded"] for c in stub.calls)
    json.dumps(out)  # results are JSON-serializable


def test_run_vqa_limit_and_image_root(tmp_path, llava):
    _, processor, adapter = llava
    path = _write(tmp_path, "vqa.jsonl", [{"image": "0.png", "question": "how many ?", "answers": ["2"]}] * 3)
    out = run_vqa(
        _stub(processor, "two"), processor, adapter, path, image_root=tmp_path / "images", limit=2, progress=False
    )
    assert out["n"] == 2 and out["vqa_accuracy"] == 1.0


def test_run_vqa_real_tiny_llava_batched_equals_unbatched(tmp_path, llava):
    # Left padding must not change greedy answers: batch of 4 == 4 batches of 1.
    model, processor, adapter = llava
    questions = ["what color is the circle ?", "how many shapes are there ?", "is it red ?", "describe the picture ."]
    lines = [{"image": f"images/{i % 2}.png", "question": q, "answers": ["red"]} for i, q in enumerate(questions)]
    path = _write(tmp_path, "vqa.jsonl", lines)
    batched = run_vqa(model, processor, adapter, path, batch_size=4, max_new_tokens=6, progress=False)
    single = run_vqa(model, processor, adapter, path, batch_size=1, max_new_tokens=6, progress=False)
    preds = [p["prediction"] for p in batched["predictions"]]
    assert preds == [p["prediction"] for p in single["predictions"]]
    assert len(set(preds)) > 1  # the rows really differ, so the comparison means something
    assert batched["n"] == 4 and 0.0 <= batched["vqa_accuracy"] <= 1.0


def test_run_vqa_static_decode_path_gives_generate_answers(tmp_path, llava, monkeypatch):
    # On a GPU eval batches decode through casp.decode; here that path is forced (it runs eagerly on the CPU)
    # and must answer exactly as transformers' generate does, batch of 4 with left padding.
    import casp.decode

    model, processor, adapter = llava
    questions = ["what color is the circle ?", "how many ?", "is it red or blue ?", "describe the picture ."]
    lines = [{"image": f"images/{i % 2}.png", "question": q, "answers": ["red"]} for i, q in enumerate(questions)]
    path = _write(tmp_path, "vqa.jsonl", lines)
    ref = run_vqa(model, processor, adapter, path, batch_size=4, max_new_tokens=6, progress=False)
    taken = []
    monkeypatch.setattr(casp.decode, "graph_decode_applies", lambda *a, **k: taken.append(k) or True)
    static = run_vqa(model, processor, adapter, path, batch_size=4, max_new_tokens=6, progress=False)
    assert taken == [{"cuda_graph": True}]  # one batch, through the static loop
    assert [p["prediction"] for p in static["predictions"]] == [p["prediction"] for p in ref["predictions"]]


def test_run_mc(tmp_path, llava):
    _, processor, adapter = llava
    lines = [
        {"image": "images/0.png", "question": "which shape ?", "options": ["square", "circle"], "answer": "B"},
        {"image": "images/1.png", "question": "which shape ?", "choices": ["circle", "dog"], "answer": 0},
        {"question": "which animal ?", "options": ["cat", "dog"], "answer": "cat"},  # text only
        {"question": "which ?", "options": ["cat"], "answer": 0},  # one option: skipped
    ]
    path = _write(tmp_path, "mc.jsonl", lines)
    stub = _stub(processor, "circle")
    out = run_mc(stub, processor, adapter, path, progress=False)
    assert out["n"] == 3 and out["n_skipped"] == 1 and "mc.jsonl:4:" in out["skipped"][0]
    assert out["accuracy"] == pytest.approx(2 / 3)
    assert [p["picked"] for p in out["predictions"]] == ["B", "A", None] and out["unparsed"] == 1
    # Image rows and the text-only row never share a batch.
    assert [(c["batch"], c["images"]) for c in stub.calls] == [(2, True), (1, False)]


def test_run_caption(tmp_path, llava):
    _, processor, adapter = llava
    refs = [["a red circle on the left", "a red circle"], ["two blue squares", "blue squares on black"]]
    path = _write(tmp_path, "cap.jsonl", [{"image": f"images/{i}.png", "references": r} for i, r in enumerate(refs)])
    out = run_caption(_stub(processor, "a red circle"), processor, adapter, path, progress=False)
    expected, per = cider_d(["a red circle"] * 2, [[tokenize_caption(c) for c in r] for r in refs])
    assert out["cider"] == pytest.approx(expected) and out["cider"] > 0
    assert [p["cider"] for p in out["predictions"]] == pytest.approx(per)


def test_bad_task_files(tmp_path, llava):
    _, processor, adapter = llava
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(EvalError, match="no usable vqa rows"):
        run_vqa(StubVLM([1]), processor, adapter, empty, progress=False)
    bad = _write(tmp_path, "bad.jsonl", [{"image": "nope.png", "question": "q", "answers": ["a"]}])
    with pytest.raises(EvalError, match=r"bad\.jsonl:1: image .*nope\.png.* not found"):
        read_task_file(bad, "vqa")
    with pytest.raises(EvalError, match="not found"):
        read_task_file(tmp_path / "absent.jsonl", "vqa")
    with pytest.raises(EvalError, match="unknown task kind"):
        read_task_file(bad, "retrieval")
    (tmp_path / "images" / "broken.png").write_bytes(b"not a png")
    broken = _write(tmp_path, "broken.jsonl", [{"image": "images/broken.png", "question": "q", "answers": ["a"]}])
    with pytest.raises(EvalError, match="not a readable image"):
        read_task_file(broken, "vqa")


def test_text_only_model_refuses_image_tasks(tmp_path):
    model, tokenizer = build("llama")
    path = _write(tmp_path, "vqa.jsonl", VQA_LINES[:1])
    with pytest.raises(EvalError, match="text-only"):
        run_vqa(model, tokenizer, get_adapter(model), path, progress=False)
    # ... but multiple choice without images runs on a language model.
    mc = _write(tmp_path, "mc.jsonl", [{"question": "which animal ?", "options": ["cat", "dog"], "answer": 1}])
    out = run_mc(model, tokenizer, get_adapter(model), mc, max_new_tokens=2, progress=False)
    assert out["n"] == 1


@pytest.mark.parametrize("family", ["llava_next", "qwen2_vl", "idefics3"])
def test_other_vlm_families(tmp_path, family):
    # Images of two sizes in one batch; batched answers equal one-by-one answers; lmms log-likelihood runs.
    from types import SimpleNamespace

    from casp.eval.lmms_bridge import CaspLMMS

    model, processor = build(family)
    adapter = get_adapter(model)
    make_image(0).save(tmp_path / "0.png")
    make_image(1, size=56).save(tmp_path / "1.png")
    questions = ["what color is the circle ?", "how many shapes are there ?", "is it red ?"]
    lines = [{"image": f"{i % 2}.png", "question": q, "answers": ["red"]} for i, q in enumerate(questions)]
    path = tmp_path / "vqa.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines))
    batched = run_vqa(model, processor, adapter, path, batch_size=3, max_new_tokens=3, progress=False)
    single = run_vqa(model, processor, adapter, path, batch_size=1, max_new_tokens=3, progress=False)
    assert [p["prediction"] for p in batched["predictions"]] == [p["prediction"] for p in single["predictions"]]
    lmm = CaspLMMS(model=model, processor=processor)
    lmm.task_dict = {"t": {"s": [{"image": make_image(0)}]}}
    request = SimpleNamespace(args=("what color ?", "red", lambda doc: [doc["image"]], 0, "t", "s"))
    ((logprob, _),) = lmm.loglikelihood([request])
    assert logprob < 0
