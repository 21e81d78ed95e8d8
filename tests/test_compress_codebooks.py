import pytest
import torch

from casp.compress import compress
from casp.config import CompressionConfig
from casp.formats.checkpoint import compressed_modules
from casp.models import load_model
from tests.fixtures import make_image, make_tiny, write_calibration


@pytest.mark.parametrize("family", ["llama", "llava"])
@pytest.mark.parametrize("quantizer,options", [("quip", {}), ("aqlm", {"max_iters": 2, "kmeans_iters": 3})])
@pytest.mark.parametrize("method", ["plain", "casp"])
def test_codebook_quantizers_compress_save_load(tmp_path, family, quantizer, options, method):
    model_dir = make_tiny(family, tmp_path / "m", num_layers=1, hidden=64)
    calib = write_calibration(tmp_path / "calib", n=2)
    cfg = CompressionConfig(method=method, quantizer=quantizer, bits=2, quant_options=options, samples=2)
    result = compress(model_dir, tmp_path / "out", cfg, calib=calib)
    model, processor, adapter = load_model(tmp_path / "out")
    modules = compressed_modules(model).values()
    formats = {m.meta["format"] if hasattr(m, "meta") else m.A.meta["format"] for m in modules}
    assert formats == {quantizer}
    images = [make_image(2)] if family == "llava" else None
    inputs = adapter.build_inputs(processor, ["what color is the circle ?"], images)
    with torch.no_grad():
        reloaded = model(**inputs).logits
        in_memory = result.model(**inputs).logits
    assert torch.allclose(reloaded, in_memory, atol=1e-4)
    tok = getattr(processor, "tokenizer", processor)
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3
