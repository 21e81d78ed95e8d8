"""Results JSON schema, method info, the eval driver, and speed measurement."""

import json

import pytest
import torch

from casp.eval.errors import EvalError
from casp.eval.evaluate import evaluate, parse_task_spec
from casp.eval.results import SCHEMA_VERSION, load_results, make_results, method_info, save_results
from casp.eval.speed import measure_speed, model_bytes, offloaded_bytes
from casp.models import get_adapter
from tests.fixtures import build, make_image, make_tiny


def test_round_trip(tmp_path):
    res = make_results("m", {"ppl:x.txt": {"task": "ppl", "ppl": 12.5}}, {"total_s": 1.0}, method={"method": "none"})
    path = save_results(res, tmp_path / "sub" / "r.json")
    back = load_results(path)
    assert back == res and back["schema_version"] == SCHEMA_VERSION and back["casp_version"]


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"model": "m"}', "no 'schema_version'"),
        (
            '{"schema_version": 99, "casp_version": "9.0", "model": "m", "method": {}, "tasks": {}, "timing": {}}',
            r"schema_version 99 is not supported .*reads 1.*9\.0",
        ),
        ('{"schema_version": 1, "model": "m", "method": {}, "tasks": [], "timing": {}}', "'tasks' must be a dict"),
        ('{"schema_version": 1, "model": "m", "method": {}, "tasks": {"a": 3}, "timing": {}}', "task 'a'"),
    ],
)
def test_bad_files(tmp_path, content, message):
    path = tmp_path / "r.json"
    path.write_text(content)
    with pytest.raises(EvalError, match=message) as info:
        load_results(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(EvalError, match="not found"):
        load_results(tmp_path / "nope.json")


def test_method_info(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava", "dtype": "float16"}))
    assert method_info(tmp_path) == {
        "method": "none",
        "quantizer": None,
        "avg_bits": 16,
        "dtype": "float16",
        "label": "float16",
    }
    qc = {
        "quant_method": "casp",
        "method": "casp",
        "quantizer": {"method": "gptq", "bits": 2},
        "avg_bits": 2.125,
        "lowrank": {"rank_ratio": 0.25},
    }
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava", "quantization_config": qc}))
    info = method_info(tmp_path)
    assert info["method"] == "casp" and info["quantizer"] == "gptq" and info["avg_bits"] == 2.125
    assert info["label"] == "casp gptq 2.12b" and info["lowrank"] == {"rank_ratio": 0.25}
    assert method_info(tmp_path / "missing")["method"] == "unknown"


def test_parse_task_spec():
    assert parse_task_spec("vqa:a/b.jsonl") == ("vqa", __import__("pathlib").Path("a/b.jsonl"))
    for bad in ("vqa", "qa:x.jsonl", "ppl:"):
        with pytest.raises(EvalError, match="KIND:FILE"):
            parse_task_spec(bad)


def test_evaluate_end_to_end(tmp_path):
    model_dir = make_tiny("llava", tmp_path / "model")
    make_image(0).save(tmp_path / "0.png")
    (tmp_path / "vqa.jsonl").write_text(json.dumps({"image": "0.png", "question": "what color ?", "answers": ["red"]}))
    (tmp_path / "cap.jsonl").write_text(
        "\n".join(json.dumps({"image": "0.png", "references": [r]}) for r in ["a red circle", "two blue squares"])
    )
    (tmp_path / "mc.jsonl").write_text(json.dumps({"question": "which ?", "options": ["cat", "dog"], "answer": 0}))
    (tmp_path / "wiki.txt").write_text("the red circle is left of the blue square . " * 20)
    tasks = [
        f"vqa:{tmp_path / 'vqa.jsonl'}",
        f"caption:{tmp_path / 'cap.jsonl'}",
        f"mc:{tmp_path / 'mc.jsonl'}",
        f"ppl:{tmp_path / 'wiki.txt'}",
    ]
    res = evaluate(
        model_dir,
        tasks,
        out=tmp_path / "results.json",
        device="cpu",
        max_new_tokens=3,
        ppl_max_length=32,
        ppl_stride=16,
        progress=False,
    )
    back = load_results(tmp_path / "results.json")
    assert back == json.loads(json.dumps(res))
    assert set(back["tasks"]) == set(tasks) and back["method"]["method"] == "none"
    assert back["tasks"][tasks[3]]["ppl"] > 1 and back["tasks"][tasks[0]]["n"] == 1
    assert back["timing"]["total_s"] >= back["timing"]["load_s"] > 0
    assert all(f"{spec}_s" in back["timing"] for spec in tasks)  # every task is timed, not only the last
    with pytest.raises(EvalError, match="not found"):
        evaluate(model_dir, [f"vqa:{tmp_path / 'absent.jsonl'}"])
    with pytest.raises(EvalError, match="no task"):
        evaluate(model_dir, [])


def test_measure_speed_times_the_static_decode_path_when_it_applies(monkeypatch):
    # On a GPU casp eval decodes from a CUDA graph; forced here (the same loop, eager on the CPU), the static
    # loop's own clock is reported, with every one of the new tokens decoded.
    import casp.decode

    model, processor = build("llama")
    adapter = get_adapter(model)
    inputs = adapter.build_inputs(processor, ["the cat sat", "a dog"])
    monkeypatch.setattr(casp.decode, "graph_decode_applies", lambda *a, **k: k.get("cuda_graph", True))
    out = measure_speed(model, inputs, new_tokens=5, repeats=1, warmup=0, adapter=adapter)
    assert out["decode_path"] == "cuda_graph" and out["setup_s"] >= 0
    # the whole call (prefill, capture, 4 decode steps for 5 tokens) takes longer than its decode steps alone; a
    # plain total < decode comparison also depends on a step being faster than the prefill, which a loaded CPU breaks
    assert out["decode_tokens_per_s"] > 0 and out["total_tokens_per_s"] < out["decode_tokens_per_s"] * 5 / 4
    off = measure_speed(model, inputs, new_tokens=5, repeats=1, warmup=0, adapter=adapter, cuda_graph=False)
    assert off["decode_path"] == "generate"


def test_measure_speed_cpu():
    model, processor = build("llava")
    adapter = get_adapter(model)
    inputs = adapter.build_inputs(processor, ["what color ?", "how many shapes are there ?"], [make_image(0)] * 2)
    out = measure_speed(model, inputs, new_tokens=4, repeats=1, warmup=0, pad_token_id=processor.tokenizer.pad_token_id)
    assert out["batch_size"] == 2 and out["new_tokens"] == 4
    assert out["prefill_tokens_per_s"] > 0 and out["decode_tokens_per_s"] > 0
    assert (
        out["model_bytes"]
        == model_bytes(model)
        == sum(p.numel() * 4 for p in model.parameters()) + sum(b.numel() * b.element_size() for b in model.buffers())
    )
    assert "rss_delta_bytes" in out
    assert out["decode_path"] == "generate" and out["kernel_copy_bytes"] == 0 and out["offloaded_bytes"] == 0
    with pytest.raises(EvalError, match="new_tokens"):
        measure_speed(model, inputs, new_tokens=1)
    assert model_bytes(torch.nn.Linear(4, 2, bias=False).half()) == 16
    two = torch.nn.Sequential(torch.nn.Linear(4, 2, bias=False), torch.nn.Linear(2, 2, bias=False).to("meta"))
    assert offloaded_bytes(two, torch.device("cpu")) == 16 and offloaded_bytes(two, torch.device("meta")) == 32
