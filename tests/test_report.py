"""casp.report: HTML and Markdown reports from small fake results / analysis / compression files."""

import base64
import json
import re

import pytest

from casp.eval.errors import EvalError
from casp.eval.results import make_results, save_results
from casp.report import build_report, headline_metrics

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _run(tmp_path, name, method, bits, vqa, ppl, quantizer=None):
    model_dir = tmp_path / name
    model_dir.mkdir()
    tasks = {
        "vqa:data/gqa.jsonl": {"task": "vqa", "file": "data/gqa.jsonl", "vqa_accuracy": vqa, "exact_match": vqa - 0.1},
        "ppl:wiki.txt": {"task": "ppl", "file": "wiki.txt", "ppl": ppl},
    }
    info = {"method": method, "quantizer": quantizer, "avg_bits": bits}
    return save_results(make_results(model_dir, tasks, {"total_s": 1.0}, method=info), tmp_path / f"{name}.json")


@pytest.fixture
def inputs(tmp_path):
    paths = [
        _run(tmp_path, "fp16", "none", 16, 0.62, 9.5),
        _run(tmp_path, "rtn2", "rtn", 2.25, 0.11, 4100.0, quantizer="rtn"),
        _run(tmp_path, "casp2", "casp", 2.1, 0.48, 14.2, quantizer="gptq"),
        _run(tmp_path, "casp3", "casp", 3.1, 0.58, 10.9, quantizer="gptq"),
    ]
    layers = [
        {"layer": i, "density": 0.5 - 0.1 * i, "density_image_rows": 0.3, "density_text_rows": 0.6, "image_mass": 0.2}
        for i in range(3)
    ]
    # The analysis sits in a run's model dir: picked up without being named.
    (tmp_path / "casp2" / "analysis.json").write_text(json.dumps({"model": "tiny", "layers": layers}))
    layer_report = {
        "layers": [
            {"name": f"model.layers.{b}.self_attn.{p}", "block": b, "bits": bits, "rank": rank, "error": 0.01 * (b + 1)}
            for b in range(3)
            for p, bits, rank in (("q_proj", 2, 8), ("k_proj", 2, 8), ("v_proj", 3, None))
        ]
    }
    (tmp_path / "casp_report.json").write_text(json.dumps(layer_report))
    return paths + [tmp_path / "casp_report.json"]


def test_headline_metrics():
    tasks = {
        "vqa:a/b.jsonl": {"task": "vqa", "file": "a/b.jsonl", "vqa_accuracy": 0.5, "exact_match": 0.25},
        "caption:c.jsonl": {"task": "caption", "file": "c.jsonl", "cider": 0.9},
        "mc:m.jsonl": {"task": "mc", "file": "m.jsonl", "accuracy": 1.0},
    }
    assert headline_metrics(tasks) == {
        "vqa:b.jsonl acc": 0.5,
        "vqa:b.jsonl EM": 0.25,
        "caption:c.jsonl CIDEr": 0.9,
        "mc:m.jsonl acc": 1.0,
    }


def test_html_report(tmp_path, inputs):
    out = build_report(inputs, tmp_path / "out" / "report.html")
    text = out.read_text()
    assert text.startswith("<!DOCTYPE html>") and "</html>" in text
    for cell in ("fp16", "casp2", "rtn", "gptq", "2.25", "0.48", "4100", "vqa:gqa.jsonl acc", "ppl:wiki.txt ppl"):
        assert f">{cell}<" in text, cell
    assert text.count("<tr>") == 1 + 4  # header + one row per run
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    assert len(images) == 3  # quality vs bits, attention density, bits/ranks
    assert all(base64.b64decode(img).startswith(PNG_MAGIC) for img in images)
    assert "Attention density per layer" in text and "Bits, ranks and error per layer" in text
    assert not list((tmp_path / "out").glob("*.png"))  # self-contained


def test_markdown_report(tmp_path, inputs):
    out = build_report(inputs, tmp_path / "md" / "report.md")
    text = out.read_text()
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("| model"))
    assert header.split(" | ")[:4] == ["| model", "method", "quantizer", "avg bits"]
    rows = [line for line in lines if line.startswith("| casp3")]
    assert rows and "| casp | gptq | 3.1 | 0.58 |" in rows[0]
    pngs = sorted(p.name for p in (tmp_path / "md").glob("*.png"))
    assert pngs == ["report_attention_density_0.png", "report_layer_bits_0.png", "report_quality_vs_bits.png"]
    for name in pngs:
        assert f"]({name})" in text
        assert (tmp_path / "md" / name).read_bytes().startswith(PNG_MAGIC)


def test_report_bad_inputs(tmp_path, inputs):
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"schema_version": 0, "model": "m", "method": {}, "tasks": {}, "timing": {}}))
    with pytest.raises(EvalError, match="schema_version 0 is not supported"):
        build_report([inputs[0], old], tmp_path / "r.html")
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"hello": 1}))
    with pytest.raises(EvalError, match="not a casp results"):
        build_report([other], tmp_path / "r.html")
    with pytest.raises(EvalError, match=".html or .md"):
        build_report(inputs, tmp_path / "r.pdf")
    with pytest.raises(EvalError, match="no input"):
        build_report([], tmp_path / "r.html")
    with pytest.raises(EvalError, match="not found"):
        build_report([tmp_path / "missing.json"], tmp_path / "r.html")


def test_report_without_bits_or_layers(tmp_path):
    res = make_results(
        "somewhere", {"mc:m.jsonl": {"task": "mc", "file": "m.jsonl", "accuracy": 0.5}}, method={"method": "unknown"}
    )
    path = save_results(res, tmp_path / "r.json")
    text = build_report([path], tmp_path / "r.html").read_text()
    assert ">0.5<" in text and "data:image/png" not in text  # no bits -> no plot, and no crash
