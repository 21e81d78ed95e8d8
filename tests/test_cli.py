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


def test_generate_with_every_kv_cache_and_kv_analyze(tiny_dirs, tmp_path, capsys):
    from tests.fixtures import make_image

    model = tiny_dirs["llava"]
    image = tmp_path / "img.png"
    make_image(4).save(image)
    outputs = {}
    for kv in ("fp16", "akvq", "kivi", "uniform"):
        assert main(["generate", str(model), "--prompt", "what color ?", "--image", str(image),
                     "--max-new-tokens", "3", "--kv", kv]) == 0
        outputs[kv] = capsys.readouterr().out.strip()
    assert all(outputs.values())
    calib = write_calibration(tmp_path / "calib", n=2)
    assert main(["kv-analyze", str(model), "--calib", str(calib), "--samples", "2", "--out", str(tmp_path / "kv")]) == 0
    profile = json.loads((tmp_path / "kv" / "casp_kv_profile.json").read_text())
    assert len(profile["patterns"]) == 2 and set(profile["patterns"]) <= {"TSA", "PSA"}
    assert (tmp_path / "kv" / "kv_saliency.png").stat().st_size > 1000
    with pytest.raises(SystemExit):
        main(["kv-bench", "--help"])
    assert "--gpu" in capsys.readouterr().out


def test_generate_kv_window_reaches_the_cache_and_is_checked(tiny_dirs, monkeypatch, capsys):
    from casp.kv import methods

    seen = []
    real = methods.make_cache

    def spy(*args, **kwargs):
        cache = real(*args, **kwargs)
        seen.append(cache.layers[0].residual)
        return cache

    monkeypatch.setattr(methods, "make_cache", spy)
    args = ["generate", str(tiny_dirs["llama"]), "--prompt", "hello there", "--max-new-tokens", "3", "--kv", "akvq"]
    assert main([*args, "--kv-window", "4"]) == 0
    assert seen == [4]
    capsys.readouterr()
    assert main([*args, "--kv-window", "0"]) != 0
    assert "--kv-window must be at least 1" in capsys.readouterr().err


def test_generate_text_only_model_rejects_image(tiny_dirs, tmp_path, capsys):
    from tests.fixtures import make_image

    image = tmp_path / "img.png"
    make_image(4).save(image)
    assert main(["generate", str(tiny_dirs["llama"]), "--prompt", "what", "--image", str(image)]) == 2
    assert "text-only" in capsys.readouterr().err
