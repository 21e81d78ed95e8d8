"""casp checkpoints load through plain transformers from_pretrained once casp.register_transformers() ran."""

import json

import pytest
import torch
import transformers

import casp
from casp.compress import compress
from casp.config import CompressionConfig
from casp.errors import CheckpointError
from casp.lowrank.module import LowRankLinear
from casp.models import load_model
from casp.quant.linear import QuantLinear
from tests.fixtures import make_image, make_tiny, write_calibration


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    return write_calibration(tmp_path_factory.mktemp("calib"), n=2)


def _logits(model, processor, adapter, with_image):
    inputs = adapter.build_inputs(processor, ["what color is the circle ?"], [make_image(3)] if with_image else None)
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize(
    "family, cfg",
    [
        ("llama", CompressionConfig(method="casp", quantizer="gptq", bits=2.5, alloc="optimal", samples=2)),
        ("llava", CompressionConfig(method="casp", quantizer="rtn", bits=2.5, alloc="optimal", samples=2)),
        ("llama", CompressionConfig(quantizer="quip", bits=2, samples=2)),
        (
            "llama",
            CompressionConfig(
                quantizer="aqlm", bits=2, samples=2, quant_options={"max_iters": 1, "kmeans_iters": 2, "beam_size": 1}
            ),
        ),
    ],
    ids=["llama-casp-gptq", "llava-casp-rtn", "llama-quip", "llama-aqlm"],
)
def test_from_pretrained_equals_casp_load(tmp_path, calib, family, cfg):
    model_dir = make_tiny(family, tmp_path / "m", num_layers=2, hidden=128)
    out = tmp_path / "out"
    compress(model_dir, out, cfg, calib=calib)
    ours, processor, adapter = load_model(out)
    casp.register_transformers()
    casp.register_transformers()  # idempotent
    cls = getattr(transformers, adapter.model_class)
    theirs = cls.from_pretrained(out).eval()
    kinds = {type(m) for m in theirs.modules()}
    assert QuantLinear in kinds and (cfg.method != "casp" or LowRankLinear in kinds)
    packed = dict(next(m for m in theirs.modules() if isinstance(m, QuantLinear)).named_buffers())
    assert all(b.device.type == "cpu" for b in packed.values())
    with_image = family == "llava"
    assert torch.equal(_logits(theirs, processor, adapter, with_image), _logits(ours, processor, adapter, with_image))


def test_newer_format_is_a_clear_error(tmp_path, calib):
    model_dir = make_tiny("llama", tmp_path / "m", num_layers=1, hidden=64)
    out = tmp_path / "out"
    compress(model_dir, out, CompressionConfig(quantizer="rtn", bits=4), calib=calib)
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"]["format_version"] = 99
    (out / "config.json").write_text(json.dumps(config))
    casp.register_transformers()
    with pytest.raises(CheckpointError, match="upgrade casp"):
        transformers.LlamaForCausalLM.from_pretrained(out)
