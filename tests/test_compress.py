import json

import pytest
import torch

import casp.compress as pipeline
from casp.cli import main
from casp.compress import compress
from casp.config import CompressionConfig
from casp.errors import CheckpointError, ModelLoadError
from casp.formats.checkpoint import compressed_modules
from casp.models import load_model
from casp.quant.linear import QuantLinear
from tests.fixtures import make_image, make_tiny, write_calibration


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("compress")
    return {
        "llama": make_tiny("llama", root / "llama", num_layers=3, hidden=128),
        "llava": make_tiny("llava", root / "llava", num_layers=2, hidden=128),
        "calib": write_calibration(root / "calib", n=4),
        "root": root,
    }


def _logits(model, processor, adapter, with_image):
    inputs = adapter.build_inputs(processor, ["what color is the circle ?"], [make_image(5)] if with_image else None)
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("family", ["llama", "llava"])
def test_gptq_compress_save_load_generate(setup, family, tmp_path):
    out = tmp_path / "out"
    result = compress(setup[family], out, CompressionConfig(quantizer="gptq", bits=2), calib=setup["calib"])
    model, processor, adapter = load_model(out)
    with_image = family == "llava"
    assert torch.equal(_logits(model, processor, adapter, with_image),
                       _logits(result.model, result.processor, result.adapter, with_image))
    layers = compressed_modules(model)
    assert len(layers) == 7 * len(adapter.decoder_layers(model))
    assert all(isinstance(m, QuantLinear) for m in layers.values())
    packed = sum(b.numel() * b.element_size() for m in layers.values() for b in m.buffers())
    fp16 = sum(m.in_features * m.out_features * 2 for m in layers.values())
    assert fp16 / packed >= 5, f"2-bit packed linears only {fp16 / packed:.2f}x smaller than fp16"
    tokenizer = getattr(processor, "tokenizer", processor)
    inputs = adapter.build_inputs(processor, ["describe the picture ."], [make_image(1)] if with_image else None)
    generated = model.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert generated.shape[1] == inputs["input_ids"].shape[1] + 4
    report = json.loads((out / "casp_report.json").read_text())
    assert {"bits", "error", "seconds"} <= set(report["layers"][0])


def test_resume_after_failure_does_not_redo_blocks(setup, tmp_path, monkeypatch):
    out = tmp_path / "out"
    cfg = CompressionConfig(quantizer="rtn", bits=4)
    real = pipeline.compress_block
    calls: list[int] = []
    fail = {"at": 2}

    def failing(ctx, plan, cfg):
        calls.append(ctx.index)
        if ctx.index == fail["at"]:
            raise RuntimeError("injected failure after block 1")
        return real(ctx, plan, cfg)

    monkeypatch.setattr(pipeline, "compress_block", failing)
    with pytest.raises(RuntimeError, match="injected"):
        compress(setup["llama"], out, cfg, calib=setup["calib"])
    assert calls == [0, 1, 2]
    assert not (out / "config.json").exists()  # nothing that looks complete
    with pytest.raises(ModelLoadError, match="--resume"):
        load_model(out)
    calls.clear()
    fail["at"] = None
    result = compress(setup["llama"], out, cfg, calib=setup["calib"], resume=True)
    assert calls == [2]  # blocks 0 and 1 were replayed from disk, not recompressed
    assert result.report["resumed_from_block"] == 2
    fresh = compress(setup["llama"], tmp_path / "fresh", cfg, calib=setup["calib"])
    a = _logits(*load_model(out), False)
    b = _logits(fresh.model, fresh.processor, fresh.adapter, False)
    assert torch.allclose(a, b, atol=1e-5)


def test_corrupt_and_mismatched_checkpoints(setup, tmp_path):
    out = tmp_path / "out"
    compress(setup["llama"], out, CompressionConfig(quantizer="rtn", bits=4))
    shard = out / "model.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_model(out)
    shard.write_bytes(data)
    config = json.loads((out / "config.json").read_text())
    config["num_hidden_layers"] = 4
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="do not match"):
        load_model(out)


def test_unsupported_bits_is_a_clear_cli_error(setup, tmp_path, capsys):
    code = main(["compress", str(setup["llama"]), "--out", str(tmp_path / "o"), "--quantizer", "rtn", "--bits", "5"])
    err = capsys.readouterr().err
    assert code == 2 and "error: --bits 5" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_casp_lowrank_and_allocation_meets_target(tmp_path, family):
    model_dir = make_tiny(family, tmp_path / family, num_layers=2, hidden=256)
    calib = write_calibration(tmp_path / "calib", n=3)
    cfg = CompressionConfig(method="casp", quantizer="rtn", bits=2.25, alloc="optimal", samples=3)
    result = compress(model_dir, tmp_path / "out", cfg, calib=calib)
    assert abs(result.report["avg_bits_per_original_param"] - 2.25) <= 0.01
    model, processor, adapter = load_model(tmp_path / "out")
    q = adapter.decoder_layers(model)[0].self_attn.q_proj
    assert type(q).__name__ == "LowRankLinear" and q.rank == 256 * 256 // 4 // 512 // 8 * 8
    # The measured storage of the checkpoint, not just the report, meets the target.
    layers = compressed_modules(model)
    stored = sum(b.numel() * b.element_size() * 8 for m in layers.values() for b in m.buffers()
                 if not b.is_floating_point() or b.dtype == torch.float16)
    original = sum(r["params"] for r in result.report["layers"])
    assert abs(stored / original - 2.25) <= 0.01
    # (compression ran with eager attention, the reload uses the default kernel: equal up to float rounding)
    assert torch.allclose(_logits(model, processor, adapter, True),
                          _logits(result.model, result.processor, result.adapter, True), atol=1e-4)
    bits = {r["config"] for r in result.report["layers"]}
    assert len(bits) > 1  # the allocation is not uniform


def test_vision_quantize_and_adaptive_ranks(tmp_path):
    model_dir = make_tiny("llava", tmp_path / "m", num_layers=2, hidden=256)
    calib = write_calibration(tmp_path / "calib", n=3)
    cfg = CompressionConfig(method="casp", quantizer="rtn", bits=3.25, alloc="optimal", ranks="adaptive",
                            vision="quantize", samples=3)
    result = compress(model_dir, tmp_path / "out", cfg, calib=calib)
    model, processor, adapter = load_model(tmp_path / "out")
    assert adapter.vision_linears(model) == {}  # every vision-tower / projector linear was replaced
    vision = [n for n in compressed_modules(model) if n.startswith(("model.vision_tower", "model.multi_modal"))]
    assert len(vision) == 2 * 6 + 2
    # the vision linears share the budget: never above it, and close at this coarse granularity
    assert 3.2 <= result.report["avg_bits_per_original_param"] <= 3.25
    ranks = {r["name"]: r["rank"] for r in result.report["layers"] if r["rank"]}
    assert len(ranks) == 4 and all(r % 8 == 0 for r in ranks.values())
    shapes = {n: (m.out_features, m.in_features) for n, m in compressed_modules(model).items() if n in ranks}
    fixed_budget = sum((m * n // 4 // (m + n)) * (m + n) for m, n in shapes.values())
    assert sum(r * sum(shapes[n]) for n, r in ranks.items()) <= fixed_budget
    assert torch.allclose(_logits(model, processor, adapter, True),
                          _logits(result.model, result.processor, result.adapter, True), atol=1e-4)


def test_fisher_importance_and_weighted_allocation(tmp_path):
    from casp.alloc.importance import fisher_importance

    model_dir = make_tiny("llava", tmp_path / "m", num_layers=2, hidden=256)
    model, processor, adapter = load_model(model_dir)
    names = [f"{adapter.block_prefix(i)}.{n}" for i in range(2) for n in adapter.linear_names]
    with torch.no_grad():
        adapter.decoder_layers(model)[1].mlp.down_proj.weight.zero_()  # an output that cannot matter
    batches = [dict(adapter.build_inputs(processor, ["what color is the circle ?"], [make_image(i)])) for i in range(2)]
    scores = fisher_importance(model, batches, names, adapter.image_token_id(model.config))
    # the zeroed output, and gate/up whose only path to the loss goes through it, cannot matter
    dead = set(names[-3:])
    assert all(scores[n] == 0.0 for n in dead)
    assert sum(scores.values()) / len(scores) == pytest.approx(1.0)
    assert all(v > 0 for n, v in scores.items() if n not in dead)
    assert all(p.grad is None for p in model.parameters())
    cfg = CompressionConfig(method="casp", quantizer="rtn", bits=2.25, alloc="optimal", importance="fisher", samples=2)
    result = compress(model_dir, tmp_path / "out", cfg, calib=write_calibration(tmp_path / "calib", n=2))
    assert result.report["avg_bits_per_original_param"] <= 2.25


def test_resume_inside_the_sensitivity_pass(setup, tmp_path, monkeypatch):
    """A run stopped during the sensitivity pass (the longest at 7B) resumes without re-measuring finished blocks."""
    out = tmp_path / "out"
    cfg = CompressionConfig(quantizer="gptq", bits=2.5, alloc="optimal", samples=3)
    real = pipeline.layer_sensitivity
    measured: list[tuple] = []
    fail = {"after": 7}  # the llama fixture's blocks have 7 linears: fail on block 1's first

    def counting(W, G, candidates, quantize_fn, quantize_many=None):
        if fail["after"] is not None and len(measured) == fail["after"]:
            raise RuntimeError("injected failure in block 1")
        measured.append(tuple(W.shape))
        return real(W, G, candidates, quantize_fn, quantize_many)

    monkeypatch.setattr(pipeline, "layer_sensitivity", counting)
    with pytest.raises(RuntimeError, match="injected"):
        compress(setup["llama"], out, cfg, calib=setup["calib"])
    assert len(list((out / pipeline.PARTIAL).glob("sensitivity_*_0000.json"))) == 1
    assert not list((out / pipeline.PARTIAL).glob("sensitivity_*_0001.json"))
    first = list(measured)
    measured.clear()
    fail["after"] = None
    resumed = compress(setup["llama"], out, cfg, calib=setup["calib"], resume=True)
    blocks = len(resumed.adapter.decoder_layers(resumed.model))
    assert len(first) == 7 and len(measured) == 7 * (blocks - 1)  # block 0 came from disk
    fresh = compress(setup["llama"], tmp_path / "fresh", cfg, calib=setup["calib"])
    assert resumed.report["allocation"] == fresh.report["allocation"]


def test_shared_sensitivity_cache_serves_other_targets_not_other_settings(setup, tmp_path, monkeypatch):
    """Tables in a shared --sensitivity-cache are reused at another target bits (same allocation as measuring
    afresh), but not by a run with other settings, other calibration data or other weights."""
    shared = tmp_path / "shared"
    real = pipeline.layer_sensitivity
    measured: list[tuple] = []

    def counting(W, G, candidates, quantize_fn, quantize_many=None):
        measured.append(tuple(W.shape))
        return real(W, G, candidates, quantize_fn, quantize_many)

    monkeypatch.setattr(pipeline, "layer_sensitivity", counting)
    at = {b: CompressionConfig(quantizer="gptq", bits=b, alloc="optimal", samples=3) for b in (2.5, 3.0)}
    compress(setup["llama"], tmp_path / "a", at[2.5], calib=setup["calib"], sensitivity_cache=shared)
    first = len(measured)
    assert first > 0 and len(list(shared.glob("sensitivity_*.json"))) > 0
    reused = compress(setup["llama"], tmp_path / "b", at[3.0], calib=setup["calib"], sensitivity_cache=shared)
    assert len(measured) == first  # nothing measured again
    fresh = compress(setup["llama"], tmp_path / "c", at[3.0], calib=setup["calib"])
    assert len(measured) == 2 * first
    assert reused.report["allocation"] == fresh.report["allocation"]
    other = CompressionConfig(quantizer="gptq", bits=3.0, alloc="optimal", samples=3, candidate_bits=(2, 4, 8))
    compress(setup["llama"], tmp_path / "d", other, calib=setup["calib"], sensitivity_cache=shared)
    assert len(measured) == 3 * first  # other settings: other key, measured
    text = write_calibration(tmp_path / "text", n=4, with_images=False)
    compress(setup["llama"], tmp_path / "e", at[3.0], calib=text, sensitivity_cache=shared)
    assert len(measured) == 4 * first  # same settings, other calibration batches: measured


def test_sensitivity_table_of_other_weights_is_not_used(tmp_path):
    stamp = {"ranks": {}, "weights": pipeline._weight_stamp([torch.ones(2, 2)])}
    path = tmp_path / "t.json"
    pipeline.save_sensitivity(path, stamp, ["l"], [4], [[]])
    assert pipeline.load_sensitivity(path, stamp)["names"] == ["l"]
    assert pipeline.load_sensitivity(path, {**stamp, "weights": pipeline._weight_stamp([2 * torch.ones(2, 2)])}) is None
    assert pipeline.load_sensitivity(path, {**stamp, "ranks": {"l": 1}}) is None
