import json

from casp.cli import main
from tests.fixtures import make_tiny


def test_demo_quick_path_end_to_end(tmp_path):
    """The `casp demo --quick` code path at CI size (a tiny random LLaVA in place of the bundled model)."""
    model = make_tiny("llava", tmp_path / "model", num_layers=2, hidden=256)
    from casp.demo.run import run_demo

    summary = run_demo(tmp_path / "demo", quick=True, model_dir=model, n_test=8, n_calib=4)
    names = [row["method"] for row in summary["rows"]]
    assert names[0] == "fp16" and "CASP+GPTQ 2.25" in names and len(names) == 4
    for row in summary["rows"]:
        assert all(isinstance(row[k], float) for k in ("vqa_em", "cider"))
        assert 0 <= row["vqa_em"] <= 1 and row["per_type"]
    casp_row = next(r for r in summary["rows"] if r["method"] == "CASP+GPTQ 2.25")
    assert abs(casp_row["avg_bits"] - 2.25) < 0.05
    html = (tmp_path / "demo" / "report.html").read_text()
    assert "CASP" in html and "<img" in html
    assert json.loads((tmp_path / "demo" / "demo_summary.json").read_text())["quick"] is True


def test_demo_cli_help(capsys):
    import pytest

    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    assert "--quick" in capsys.readouterr().out


def test_demo_model_names_resolve_to_the_bundled_models(tmp_path):
    import pytest

    from casp.demo.run import resolve_demo_model
    from casp.errors import CaspError

    demo, real = resolve_demo_model(None), resolve_demo_model("real-parts")
    assert demo == resolve_demo_model("demo") and demo.name == "demo-model"
    assert json.loads((real / "config.json").read_text())["model_type"] != json.loads(
        (demo / "config.json").read_text()
    )["model_type"]
    (tmp_path / "config.json").write_text("{}")
    assert resolve_demo_model(tmp_path) == tmp_path
    with pytest.raises(CaspError, match="not a model directory.*real-parts"):
        resolve_demo_model(tmp_path / "nowhere")
