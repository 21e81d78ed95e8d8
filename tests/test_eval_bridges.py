"""lm-eval / lmms-eval bridges, called directly with request objects shaped like theirs (no package needed)."""

import math
from types import SimpleNamespace

import pytest
import torch

from casp.eval.errors import EvalError
from casp.eval.lm_eval_bridge import CaspLM
from casp.eval.lmms_bridge import CaspLMMS
from casp.eval.scoring import cut_at_stop, parse_arg_string
from tests.fixtures import build, make_image, make_tiny


def req(*args):
    return SimpleNamespace(args=args)


@pytest.fixture(scope="module")
def llama():
    return build("llama")


def _direct_logprob(model, ctx_ids, cont_ids):
    ids = torch.tensor([ctx_ids + cont_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
    return sum(logp[len(ctx_ids) - 1 + j, t].item() for j, t in enumerate(cont_ids))


def test_lm_loglikelihood_matches_direct_computation(llama):
    model, tok = llama
    lm = CaspLM(model=model, tokenizer=tok)
    (lp, greedy), (lp_empty, _) = lm.loglikelihood([req("what color is the", " red circle"), req("", "red circle")])
    ctx = tok("what color is the", add_special_tokens=False)["input_ids"]
    cont = tok(" red circle", add_special_tokens=False)["input_ids"]
    assert lp == pytest.approx(_direct_logprob(model, ctx, cont), abs=1e-4) and lp < 0
    assert lp_empty == pytest.approx(_direct_logprob(model, [tok.bos_token_id], cont), abs=1e-4)
    # The greedy continuation is flagged greedy; a different one is not.
    (gen,) = lm.generate_until([req("what color is the", {"until": [], "max_gen_toks": 2})])
    assert lm.loglikelihood([req("what color is the", " " + gen)])[0][1] is True
    other = "circle" if gen.split()[0] != "circle" else "square"
    assert lm.loglikelihood([req("what color is the", " " + other)])[0][1] is False


def test_lm_loglikelihood_rolling(llama):
    model, tok = llama
    text = "the red circle is left of the blue square and the cat"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    full = CaspLM(model=model, tokenizer=tok).loglikelihood_rolling([req(text)])[0]
    assert full == pytest.approx(_direct_logprob(model, [tok.bos_token_id], ids), abs=1e-4)
    windowed = CaspLM(model=model, tokenizer=tok, max_length=4).loglikelihood_rolling([req(text)])[0]
    assert math.isfinite(windowed) and windowed != pytest.approx(full, abs=1e-6)  # less context, other value


def test_lm_generate_until_batched_and_stops(llama):
    model, tok = llama
    lm1 = CaspLM(model=model, tokenizer=tok, batch_size=1)
    lm3 = CaspLM(model=model, tokenizer=tok, batch_size=3)
    reqs = [req(c, {"until": [], "max_gen_toks": 5}) for c in ("what color is", "how many", "the cat is on the")]
    single, batched = lm1.generate_until(reqs), lm3.generate_until(reqs)
    assert single == batched and len(set(single)) > 1
    words = single[0].split()
    stop = words[2] if len(words) > 2 else words[-1]
    cut = lm3.generate_until([req("what color is", {"until": [stop], "max_gen_toks": 5})])[0]
    assert cut == single[0][: single[0].find(stop)] and stop not in cut


def test_lm_from_directory_and_arg_string(tmp_path):
    model_dir = make_tiny("llama", tmp_path / "m")
    lm = CaspLM.create_from_arg_string(f"pretrained={model_dir},batch_size=2,max_length=64,device=cpu")
    assert lm.batch_size == 2 and lm.max_length == 64 and lm.rank == 0 and lm.world_size == 1
    assert len(lm.generate_until([req("the cat", {"until": ["."], "max_gen_toks": 3})])) == 1
    with pytest.raises(EvalError, match="pretrained"):
        CaspLM()


@pytest.fixture(scope="module")
def lmms():
    model, processor = build("llava")
    lmm = CaspLMMS(model=model, processor=processor, batch_size=2, max_new_tokens=4)
    docs = [
        {"image": make_image(0), "q": "what color is the circle ?", "a": "red"},
        {"image": make_image(1), "q": "how many shapes are there ?", "a": "two"},
        {"image": None, "q": "is the cat left of the dog ?", "a": "yes"},
    ]
    lmm.task_dict = {"toy": {"test": docs}}
    return lmm


def visual(doc):
    return [doc["image"]] if doc["image"] is not None else []


def test_lmms_generate_until(lmms):
    reqs = [
        req(lmms.task_dict["toy"]["test"][i]["q"], {"max_new_tokens": 4, "until": ["\n\n"]}, visual, i, "toy", "test")
        for i in range(3)
    ]
    out = lmms.generate_until(reqs)
    assert len(out) == 3 and all(isinstance(o, str) for o in out)
    lmms.batch_size_per_gpu = 1
    assert lmms.generate_until(reqs) == out  # batching (left padding) does not change answers
    lmms.batch_size_per_gpu = 2


def test_lmms_loglikelihood_uses_the_image(lmms):
    target = lambda doc: doc["a"]  # noqa: E731
    (lp0, _), (lp_text, _) = lmms.loglikelihood(
        [
            req("what color is the circle ?", target, visual, 0, "toy", "test"),
            req("is the cat left of the dog ?", " yes", visual, 2, "toy", "test"),
        ]
    )
    assert lp0 < 0 and lp_text < 0
    # Same question and target on another image: a different likelihood, so the image is really seen.
    lmms.task_dict["toy"]["test"].append({"image": make_image(5), "q": "", "a": "red"})
    ((lp_other, _),) = lmms.loglikelihood([req("what color is the circle ?", target, visual, 3, "toy", "test")])
    assert lp_other != pytest.approx(lp0, abs=1e-6)
    # The model's own greedy next token is flagged greedy (it may be a special token: score it by its text).
    doc = lmms.task_dict["toy"]["test"][0]
    inputs = lmms.adapter.build_inputs(lmms.processor, [doc["q"]], [doc["image"]])
    first = lmms.model.generate(**inputs, max_new_tokens=1, do_sample=False)[0, -1].item()
    token = lmms.tokenizer.convert_ids_to_tokens(first)
    other = "circle" if token != "circle" else "square"
    assert lmms.loglikelihood([req(doc["q"], token, visual, 0, "toy", "test")])[0][1] is True
    assert lmms.loglikelihood([req(doc["q"], other, visual, 0, "toy", "test")])[0][1] is False


def test_lmms_rejects_multi_image_and_multi_round(lmms):
    two = lambda doc: [make_image(0), make_image(1)]  # noqa: E731
    with pytest.raises(EvalError, match="one PIL image"):
        lmms.generate_until([req("q", {}, two, 0, "toy", "test")])
    with pytest.raises(EvalError, match="multi-round"):
        lmms.generate_until_multi_round([])


def test_helpers():
    assert cut_at_stop("a b. c\n\nd", ["\n\n", "."]) == "a b"
    assert cut_at_stop("abc", "x") == "abc" and cut_at_stop("abc", None) == "abc"
    assert parse_arg_string("pretrained=/a/b,batch_size=4,trust=True") == {
        "pretrained": "/a/b",
        "batch_size": 4,
        "trust": True,
    }
