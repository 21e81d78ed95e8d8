"""The eval/report subcommand parsers and handlers (what casp/cli.py wires in)."""

import argparse
import json

import pytest
import torch

from casp.eval.cli import add_eval_parser, add_report_parser
from casp.eval.errors import EvalError
from tests.fixtures import make_image, make_tiny


def _parser():
    parser = argparse.ArgumentParser(prog="casp")
    sub = parser.add_subparsers(dest="command")
    add_eval_parser(sub)
    add_report_parser(sub)
    return parser


def test_eval_then_report(tmp_path, capsys):
    model_dir = make_tiny("llava", tmp_path / "model")
    make_image(0).save(tmp_path / "0.png")
    (tmp_path / "vqa.jsonl").write_text(
        json.dumps({"image": "0.png", "question": "what color ?", "answers": ["red"]})
        + "\n"
        + json.dumps({"image": "gone.png", "question": "what color ?", "answers": ["red"]})
        + "\n"
    )
    (tmp_path / "wiki.txt").write_text("the red circle is left of the blue square . " * 10)
    out = tmp_path / "results.json"
    args = _parser().parse_args(
        [
            "eval",
            str(model_dir),
            "--task",
            f"vqa:{tmp_path / 'vqa.jsonl'}",
            "--task",
            f"ppl:{tmp_path / 'wiki.txt'}",
            "--out",
            str(out),
            "--max-new-tokens",
            "2",
            "--ppl-max-length",
            "16",
            "--no-progress",
            "--no-cuda-graph",
            "--speed",
            "--speed-tokens",
            "3",
            "--batch-size",
            "2",
            "--device",
            "cpu",
        ]
    )
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "vqa:vqa.jsonl acc:" in printed and "ppl:wiki.txt ppl:" in printed and "vqa.jsonl:2: image" in printed
    assert ("speed (generate, --batch1-kernel kmajor, batch 2, 3 new tokens, prompt from vqa:vqa.jsonl line 1 with its "
            "image)") in printed
    speed = json.loads(out.read_text())["speed"]
    assert speed["decode_tokens_per_s"] > 0 and speed["batch_size"] == 2 and speed["kernel_copy_bytes"] == 0
    report = tmp_path / "report.html"
    args = _parser().parse_args(["report", str(out), "--out", str(report)])
    assert args.func(args) == 0
    text = report.read_text()
    assert "ppl:wiki.txt ppl" in text and "decode tok/s (batch 2)" in text


def test_eval_speed_from_a_text_file_and_its_errors(tmp_path):
    from casp.eval.evaluate import evaluate

    model_dir = make_tiny("llama", tmp_path / "model")
    (tmp_path / "wiki.txt").write_text("the red circle is left of the blue square . " * 10)
    res = evaluate(model_dir, [f"ppl:{tmp_path / 'wiki.txt'}"], device="cpu", speed=True, speed_tokens=3,
                   batch_size=3, ppl_max_length=16, progress=False)
    assert res["speed"]["prompt"] == "ppl:wiki.txt first 1000 chars" and res["speed"]["batch_size"] == 3
    assert res["speed"]["batch1_kernel"] == "kmajor"  # "auto" off a GPU (the default), recorded as decided
    from casp.eval.speed import speed_line

    assert "--batch1-kernel kmajor," in speed_line(res["speed"])
    tokens = res["speed"]["prompt_tokens"]
    assert tokens % 3 == 0 and tokens // 3 > 50  # three copies of the text, all of it (440 characters)
    with pytest.raises(EvalError, match="--speed-tokens must be at least 2"):
        evaluate(model_dir, [f"ppl:{tmp_path / 'wiki.txt'}"], speed=True, speed_tokens=1)


def test_eval_bad_task_is_one_line_error(tmp_path):
    args = _parser().parse_args(["eval", str(tmp_path), "--task", "vqa", "--out", str(tmp_path / "r.json")])
    with pytest.raises(EvalError, match="KIND:FILE") as info:
        args.func(args)
    assert "\n" not in str(info.value)


def test_eval_speed_out_of_memory_keeps_the_task_results(tmp_path, monkeypatch):
    import importlib

    ev = importlib.import_module("casp.eval.evaluate")  # the module: the package exports a function of that name

    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    model_dir = make_tiny("llama", tmp_path / "model")
    (tmp_path / "wiki.txt").write_text("the red circle is left of the blue square . " * 10)
    monkeypatch.setattr(ev, "measure_speed", oom)
    out = tmp_path / "r.json"
    res = ev.evaluate(model_dir, [f"ppl:{tmp_path / 'wiki.txt'}"], out=out, device="cpu", speed=True, batch_size=4,
                      ppl_max_length=16, progress=False)
    saved = json.loads(out.read_text())
    assert saved["tasks"]["ppl:" + str(tmp_path / "wiki.txt")]["ppl"] > 0
    assert saved["speed"]["oom"] and "lower --batch-size" in saved["speed"]["error"] and res["speed"]["batch_size"] == 4
