import json

import pytest

from casp.cli import main
from tests.fixtures import FAMILIES, write_calibration


@pytest.mark.parametrize("family", FAMILIES)
def test_analyze_end_to_end(tiny_dirs, tmp_path, family):
    calib = write_calibration(tmp_path / "calib", n=2)
    out = tmp_path / "out"
    assert main(["analyze", str(tiny_dirs[family]), "--calib", str(calib), "--samples", "2", "--out", str(out)]) == 0
    analysis = json.loads((out / "analysis.json").read_text())
    assert len(analysis["layers"]) == 2
    assert (out / "attention_density.png").stat().st_size > 1000
    for row in analysis["layers"]:
        assert 0 < row["density"] <= 1
        assert len(row["head_density"]) == 4
        if family != "llama":
            assert 0 < row["image_mass"] < 1


def test_help_texts(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "analyze" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["analyze", "--help"])
    assert "--calib" in capsys.readouterr().out


@pytest.mark.parametrize("case", ["no_config", "bad_type", "missing_image", "empty_calib"])
def test_bad_input_one_line_error(tiny_dirs, tmp_path, capsys, case):
    model = str(tiny_dirs["llava"])
    calib = write_calibration(tmp_path / "calib", n=2)
    if case == "no_config":
        model = str(tmp_path)
    elif case == "bad_type":
        (tmp_path / "m").mkdir()
        (tmp_path / "m" / "config.json").write_text('{"model_type": "whisper"}')
        model = str(tmp_path / "m")
    elif case == "missing_image":
        calib.write_text(json.dumps({"image": "gone.png", "conversations": [{"from": "human", "value": "q"}]}))
    else:
        calib.write_text("")
    code = main(["analyze", model, "--calib", str(calib), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code != 0
    assert "Traceback" not in err
    assert len([line for line in err.splitlines() if line.startswith("error: ")]) == 1
