"""Sliding-window perplexity on models whose probabilities are known."""

import math

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from casp.eval.errors import EvalError
from casp.eval.ppl import perplexity, perplexity_of_ids, run_ppl


class UniformLM(nn.Module):
    """Logits all zero: every token has probability 1/V, so ppl == V."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, input_ids):
        return torch.zeros(*input_ids.shape, self.vocab)


class BigramLM(nn.Module):
    """p(x_t | x_{t-1}) = P[x_{t-1}, x_t]: the context before the previous token is irrelevant."""

    def __init__(self, probs: torch.Tensor):
        super().__init__()
        self.log_probs = nn.Parameter(probs.log(), requires_grad=False)

    def forward(self, input_ids):
        return (self.log_probs[input_ids],)  # tuple output, like return_dict=False


class WordTokenizer:
    """Maps single characters to ids; returns a dict like a HF tokenizer."""

    def __call__(self, text, return_tensors="pt"):
        return {"input_ids": torch.tensor([[ord(c) - ord("a") for c in text.strip()]])}


def test_uniform_model_ppl_is_vocab_size():
    ids = torch.randint(0, 37, (101,), generator=torch.Generator().manual_seed(0))
    for max_length, stride in [(16, 8), (16, 15), (200, 100), (2, 1)]:
        out = perplexity_of_ids(UniformLM(37), ids, max_length=max_length, stride=stride, progress=False)
        assert out["ppl"] == pytest.approx(37.0, rel=1e-5)
        assert out["n_tokens"] == 100


def test_bigram_model_matches_hand_computation():
    g = torch.Generator().manual_seed(1)
    probs = torch.softmax(torch.randn(6, 6, generator=g) * 2, dim=-1)
    ids = torch.randint(0, 6, (57,), generator=g)
    log_p = sum(math.log(probs[ids[t - 1], ids[t]].item()) for t in range(1, len(ids)))
    expected = math.exp(-log_p / (len(ids) - 1))
    # Every window keeps the previous token of each target in context, so any (max_length, stride)
    # gives the exact bigram perplexity; a double-counted or skipped token would change it.
    for max_length, stride in [(2, 1), (5, 4), (8, 3), (64, 32), (100, 99)]:
        out = perplexity_of_ids(BigramLM(probs), ids, max_length=max_length, stride=stride, progress=False)
        assert out["ppl"] == pytest.approx(expected, rel=1e-5)
        assert out["n_tokens"] == 56


def test_perplexity_text_and_file(tmp_path):
    probs = torch.full((26, 26), 1 / 26)
    assert perplexity(BigramLM(probs), WordTokenizer(), "abcabcabc", progress=False)["ppl"] == pytest.approx(26)
    f = tmp_path / "t.txt"
    f.write_text("helloworld\n")
    out = run_ppl(BigramLM(probs), WordTokenizer(), f, max_length=4, stride=2, progress=False)
    assert out["task"] == "ppl" and out["ppl"] == pytest.approx(26, rel=1e-5) and out["n_tokens"] == 9


def test_full_window_equals_model_loss():
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=50,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 50, (40,))
    out = perplexity_of_ids(model, ids, max_length=64, stride=63, progress=False)
    with torch.no_grad():
        loss = model(input_ids=ids[None], labels=ids[None]).loss.item()
    assert out["ppl"] == pytest.approx(math.exp(loss), rel=1e-4)
    # A short window loses context: a different number, same token count.
    short = perplexity_of_ids(model, ids, max_length=4, stride=2, progress=False)
    assert short["n_tokens"] == 39 and short["ppl"] != pytest.approx(out["ppl"], rel=1e-6)
    # Default max_length comes from the config.
    assert perplexity_of_ids(model, ids, progress=False)["max_length"] == 64


def test_bad_input(tmp_path):
    lm = UniformLM(5)
    with pytest.raises(EvalError, match="stride"):
        perplexity_of_ids(lm, torch.arange(5), max_length=4, stride=4, progress=False)
    with pytest.raises(EvalError, match="at least 2"):
        perplexity_of_ids(lm, torch.arange(1), max_length=4, stride=2, progress=False)
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(EvalError, match="empty"):
        run_ppl(lm, WordTokenizer(), empty)
    with pytest.raises(EvalError, match="not found"):
        run_ppl(lm, WordTokenizer(), tmp_path / "missing.txt")
