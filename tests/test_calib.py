import json

import pytest
import torch

from casp.calib.attention import causal_visibility, row_density
from casp.calib.data import load_calibration
from casp.calib.inputs import encode_samples
from casp.calib.runner import capture_block_inputs, run_layerwise
from casp.errors import CalibrationDataError
from casp.models import load_model
from tests.fixtures import write_calibration


def test_density_uniform_onehot_and_causal_rows():
    t = 20
    vis = torch.ones(t, t, dtype=torch.bool)
    uniform = torch.full((t, t), 1.0 / t)
    assert torch.allclose(row_density(uniform, vis), torch.full((t,), 19 / 20))  # ceil(0.95 * 20) = 19 keys
    onehot = torch.zeros(t, t)
    onehot[:, 3] = 1
    assert torch.allclose(row_density(onehot, vis), torch.full((t,), 1 / 20))
    causal = causal_visibility(t, t)
    rows = causal.float() / causal.float().sum(-1, keepdim=True)  # uniform over the visible prefix
    dens = row_density(rows, causal)
    for i in range(t):
        n = i + 1
        needed = next(k for k in range(1, n + 1) if k / n >= 0.95 - 1e-7)
        assert dens[i].item() == pytest.approx(needed / n)
    half = torch.zeros(t, t)
    half[:, :2] = 0.5
    assert torch.allclose(row_density(half, vis), torch.full((t,), 2 / 20))


def test_calibration_jsonl_bad_rows_reported(tmp_path):
    path = write_calibration(tmp_path, n=3)
    rows = path.read_text().splitlines()
    rows.append(json.dumps({"image": "images/missing.png", "conversations": [{"from": "human", "value": "hi"}]}))
    rows.append("{not json")
    path.write_text("\n".join(rows) + "\n")
    data = load_calibration(path, num_samples=10)
    assert len(data.samples) == 3
    assert any("calib.jsonl:4" in s and "not found" in s for s in data.skipped)
    assert any("calib.jsonl:5" in s for s in data.skipped)


def test_calibration_errors(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(CalibrationDataError, match="no usable calibration sample"):
        load_calibration(empty)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"image": "x.png", "conversations": [{"from": "human", "value": "<image>\nq"}]}) + "\n")
    with pytest.raises(CalibrationDataError, match="not found"):
        load_calibration(bad)
    with pytest.raises(CalibrationDataError, match="does not exist"):
        load_calibration(tmp_path / "nothing.jsonl")


@pytest.mark.parametrize("family", ["llama", "llava", "qwen2_vl"])
def test_runner_outputs_match_full_forward_and_grams_brute_force(tiny_dirs, tmp_path, family):
    model, processor, adapter = load_model(tiny_dirs[family])
    data = load_calibration(write_calibration(tmp_path, n=3), num_samples=3)
    inputs = encode_samples(data.samples, processor, adapter, max_length=64)
    block_inputs = capture_block_inputs(model, adapter, inputs)
    grams, seen = [], []

    def on_block(ctx):
        grams.append(ctx.grams(["self_attn.q_proj", "mlp.down_proj"]))
        xs = []
        h = ctx.block.mlp.down_proj.register_forward_hook(lambda m, a, o: xs.append(a[0].reshape(-1, a[0].shape[-1])))
        ctx.forward_all()
        h.remove()
        seen.append(torch.cat(xs))

    result = run_layerwise(model, adapter, block_inputs, on_block, progress=False)
    for i, x in enumerate(seen):
        assert torch.allclose(grams[i]["mlp.down_proj"], x.T @ x, rtol=1e-4, atol=1e-4)
    # Block-by-block outputs equal the full forward's last hidden state (before the final norm).
    with torch.no_grad():
        for inp, out in zip(inputs, result.outputs):
            hs = model(**inp, output_hidden_states=True).hidden_states
            captured: list = []
            norm = adapter.language_model(model).norm
            h = norm.register_forward_hook(lambda m, a, o, store=captured: store.append(a[0]))
            model(**inp)
            h.remove()
            assert torch.allclose(out, captured[0], atol=1e-5)
            assert len(hs) == 3
