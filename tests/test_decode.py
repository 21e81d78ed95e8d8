"""casp.decode: greedy decoding on a static cache (the CUDA-graph path of casp generate), run eagerly on the CPU."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from casp.cli import main
from casp.decode import eos_ids, graph_decode_applies, static_greedy_generate
from casp.errors import CaspError
from casp.models import get_adapter
from tests.fixtures import build, make_image

ROOT = Path(__file__).resolve().parents[1]


def _setup(family: str):
    model, processor = build(family, num_layers=2, hidden=64)
    adapter = get_adapter(model)
    images = [make_image(0)] if adapter.is_multimodal else None
    inputs = dict(adapter.build_inputs(processor, ["what color is the circle ?"], images))
    return model, processor, adapter, inputs


def _reference(model, processor, inputs, n: int) -> torch.Tensor:
    tokenizer = getattr(processor, "tokenizer", processor)
    out = model.generate(**inputs, max_new_tokens=n, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return out[:, inputs["input_ids"].shape[1]:]


@pytest.mark.parametrize("family", ["llama", "llava", "llava_next", "idefics3"])
def test_static_decode_matches_generate(family):
    model, processor, adapter, inputs = _setup(family)
    assert adapter.graph_decode
    ref = _reference(model, processor, inputs, 12)
    stats = {}
    got = static_greedy_generate(model, inputs, 12, eos_ids(model), check_every=5, stats=stats)
    assert torch.equal(got, ref)
    assert stats["decode_steps"] == got.shape[1] - 1 and stats["decode_s"] >= 0 and stats["prefill_s"] > 0


def test_static_decode_stops_after_eos_like_generate():
    model, processor, _, inputs = _setup("llama")
    free = _reference(model, processor, inputs, 10)[0].tolist()
    # an end token that first appears at position 3 of the free-running continuation
    stop = next(i for i, t in enumerate(free) if i >= 3 and t not in free[:i])
    model.generation_config.eos_token_id = free[stop]
    ref = _reference(model, processor, inputs, 10)
    got = static_greedy_generate(model, inputs, 10, eos_ids(model), check_every=2)
    assert got[0].tolist() == free[: stop + 1] == ref[0].tolist()


PROMPTS = ["what color is the circle ?", "a dog", "how many red squares are there in the picture ?"]


def _batch(family: str):
    model, processor = build(family, num_layers=2, hidden=64)
    adapter = get_adapter(model)
    # images of three sizes: LLaVA-NeXT's tiling gives them different numbers of image tokens
    images = [make_image(0), make_image(1, size=56), make_image(2, size=80)] if adapter.is_multimodal else None
    inputs = dict(adapter.build_inputs(processor, PROMPTS, images))
    return model, processor, inputs


@pytest.mark.parametrize("family", ["llama", "llava", "llava_next", "idefics3"])
def test_static_decode_of_a_left_padded_batch_matches_generate(family):
    model, processor, inputs = _batch(family)
    mask = inputs["attention_mask"]
    assert not bool(mask[:, 0].all()) and bool(mask[:, -1].all())  # left-padded: the test means something
    ref = _reference(model, processor, inputs, 10)
    got = static_greedy_generate(model, inputs, 10, eos_ids(model), check_every=3)
    assert torch.equal(got, ref)


def test_static_decode_of_a_batch_pads_ended_rows_and_stops_when_all_end():
    model, processor, inputs = _batch("llama")
    pad = processor.pad_token_id
    free = _reference(model, processor, inputs, 12)
    # end on a token that row 0 first emits at step >= 2 and row 1 never emits
    row0, row1 = free[0].tolist(), free[1].tolist()
    stop = next(i for i, t in enumerate(row0) if i >= 2 and t not in row0[:i] and t not in row1 and t != pad)
    model.generation_config.eos_token_id = row0[stop]
    ref = _reference(model, processor, inputs, 12)
    got = static_greedy_generate(model, inputs, 12, eos_ids(model), check_every=4, pad_token_id=pad)
    assert torch.equal(got, ref)
    assert got[0, : stop + 1].tolist() == row0[: stop + 1] and set(got[0, stop + 1:].tolist()) <= {pad}
    assert got[1].tolist() == row1[: got.shape[1]]
    # every row ends at its first token: nothing after it is kept, as generate keeps nothing
    model.generation_config.eos_token_id = free[:, 0].tolist()
    got = static_greedy_generate(model, inputs, 12, eos_ids(model), pad_token_id=pad)
    assert got.shape[1] == 1
    assert torch.equal(got, _reference(model, processor, inputs, 12))


def test_static_decode_rejects_empty_requests():
    model, processor, adapter, _ = _setup("llama")
    one = dict(adapter.build_inputs(processor, ["the cat"]))
    with pytest.raises(CaspError, match="at least 1"):
        static_greedy_generate(model, one, 0)
    empty = {"input_ids": torch.zeros(1, 0, dtype=torch.long)}
    with pytest.raises(CaspError, match="at least one prompt token"):
        static_greedy_generate(model, empty, 4)


def test_graph_path_only_on_gpu_and_for_allowed_families():
    model, _, adapter, _ = _setup("llama")
    assert not graph_decode_applies(model, adapter)  # CPU: generate's eager loop
    qwen, _ = build("qwen2_vl", num_layers=1, hidden=64)
    assert not get_adapter(qwen).graph_decode  # M-RoPE positions are chosen on the host


def test_cli_generate_options(tiny_dirs, capsys):
    base = ["generate", str(tiny_dirs["llama"]), "--prompt", "hello there"]
    options = ["--max-new-tokens", "3", "--no-cuda-graph", "--dtype", "float32", "--batch1-kernel", "gemv"]
    assert main(base + options) == 0
    assert main(base + options[:-1] + ["kmajor-only"]) == 0  # on the CPU the torch path runs: the mode is a no-op
    assert main(base + ["--max-new-tokens", "0"]) == 2
    assert "--max-new-tokens must be at least 1" in capsys.readouterr().err


def test_generate_7b_tiny_smoke(tmp_path):
    out = tmp_path / "gen.txt"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "generate_7b.py"), "--tiny", "--out", str(out)],
                   check=True, capture_output=True, timeout=300)
    text = out.read_text()
    assert "static tokens equal the eager static loop's: True" in text
    assert "casp 2-bit     static" in text
