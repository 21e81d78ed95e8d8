import pytest
import torch

from casp.errors import ModelLoadError
from casp.models import get_adapter, load_model
from tests.fixtures import FAMILIES, make_image

EXPECTED_ORDER = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                  "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_detects_family_and_lists_blocks(tiny_dirs, family):
    model, processor, adapter = load_model(tiny_dirs[family])
    assert adapter.family == family
    assert get_adapter(tiny_dirs[family]) is adapter
    layers = adapter.decoder_layers(model)
    assert len(layers) == adapter.text_config(model).num_hidden_layers == 2
    assert adapter.linear_names == EXPECTED_ORDER
    for name in adapter.linear_names:
        assert isinstance(layers[0].get_submodule(name), torch.nn.Linear)
    assert adapter.attention(layers[0]) is layers[0].self_attn
    assert bool(adapter.vision_modules(model)) == (family != "llama")


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "llama"])
def test_image_token_mask_matches_processor_expansion(tiny_dirs, family):
    model, processor, adapter = load_model(tiny_dirs[family])
    inputs = adapter.build_inputs(processor, ["what color is the circle ?"], [make_image(1)])
    mask = adapter.image_token_mask(model, inputs["input_ids"])
    # Every image-token position is filled by a vision feature: the model checks the counts agree.
    with torch.no_grad():
        model(**inputs)
    image_id = adapter.image_token_id(model.config)
    assert mask.sum() == (inputs["input_ids"] == image_id).sum() > 0
    text_only = adapter.build_inputs(processor, ["what color is the circle ?"], None)
    assert adapter.image_token_mask(model, text_only["input_ids"]).sum() == 0


def test_missing_dir_and_config_give_clear_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(tmp_path / "nope")
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(tmp_path)


def test_unsupported_model_type_names_supported_families(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ModelLoadError, match="unsupported model_type 'bert'.*llava"):
        load_model(tmp_path)
