"""lm-evaluation-harness model wrapper for casp models (text tasks: MMLU, HellaSwag, ARC, wikitext...).

    from casp.eval.lm_eval_bridge import CaspLM
    lm = CaspLM(pretrained="llava-2bit")              # casp-compressed or original model directory
    lm_eval.simple_evaluate(model=lm, tasks=["arc_easy"])

``CaspLM`` follows lm-eval's ``LM`` API (``loglikelihood``, ``loglikelihood_rolling``,
``generate_until``; each request's ``.args`` as lm-eval builds them). It subclasses
``lm_eval.api.model.LM`` (and registers itself as model "casp") when lm-eval is installed, otherwise a
minimal local base with the same surface, so it works and is tested without lm-eval. Prompts are raw
text (no chat template), like lm-eval's HF model; VLMs run their language model alone.
"""

from __future__ import annotations

import importlib.util
import json
from collections import defaultdict
from typing import Any

import torch

from casp.eval.errors import EvalError
from casp.eval.ppl import get_tokenizer, model_max_length
from casp.eval.scoring import continuation_logprob, cut_at_stop, parse_arg_string, rolling_logprob


class LocalLMBase:
    """Stand-in for ``lm_eval.api.model.LM`` when lm-eval is not installed (single process)."""

    def __init__(self) -> None:
        self._rank = 0
        self._world_size = 1
        self.cache_hook = None

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size

    def set_cache_hook(self, cache_hook: Any) -> None:
        self.cache_hook = cache_hook

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        return cls(**parse_arg_string(arg_string), **extra)


def _base_class() -> type:
    if importlib.util.find_spec("lm_eval") is None:
        return LocalLMBase
    from lm_eval.api.model import LM

    return LM


def load_for_bridge(pretrained: str | None, model: Any, processor: Any, adapter: Any, device: Any, dtype: Any):
    """(model, processor, adapter): the given objects, or loaded from ``pretrained`` with casp.models."""
    if model is not None:
        if processor is None:
            raise EvalError("pass the tokenizer/processor together with an already-loaded model")
        if adapter is None:
            from casp.models import get_adapter

            adapter = get_adapter(model)
        return model, processor, adapter
    if pretrained is None:
        raise EvalError("give pretrained=MODEL_DIR (an original or casp-compressed model directory)")
    from casp.models import load_model

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    dtype = dtype or (torch.float16 if str(device).startswith("cuda") else torch.float32)
    return load_model(pretrained, dtype=dtype, device=device)


class CaspLM(_base_class()):
    """lm-eval ``LM`` over a casp model (or any causal LM / VLM with its tokenizer)."""

    def __init__(
        self,
        pretrained: str | None = None,
        model: Any = None,
        tokenizer: Any = None,
        device: str | None = None,
        dtype: Any = None,
        batch_size: int | str = 1,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        add_bos_token: bool = False,
    ) -> None:
        super().__init__()
        self.model, processor, self.adapter = load_for_bridge(pretrained, model, tokenizer, None, device, dtype)
        self.model.eval()
        self.tokenizer = get_tokenizer(processor)
        self._batch_size = int(str(batch_size).split(":")[0]) if str(batch_size) != "auto" else 1
        self._max_length = int(max_length) if max_length else model_max_length(self.model)
        self._max_gen_toks = int(max_gen_toks)
        self.add_bos_token = bool(add_bos_token)

    # ---- properties lm-eval reads ----------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        """Token that conditions the first token of a text with empty context (BOS, else end-of-text)."""
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def device(self) -> torch.device:
        param = next(self.model.parameters(), None)
        return param.device if param is not None else torch.device("cpu")

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "casp")).replace("/", "__")

    def tok_encode(self, string: str) -> list[int]:
        return self.tokenizer(string, add_special_tokens=self.add_bos_token)["input_ids"]

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens)

    # ---- requests --------------------------------------------------------------------------------
    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Context and continuation ids, split from the joint encoding so merges at the seam are kept."""
        spaces = len(context) - len(context.rstrip())
        if spaces:  # trailing spaces of the context belong to the continuation's first word
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        if not context:
            return [self.prefix_token_id], self.tokenizer(continuation, add_special_tokens=False)["input_ids"]
        whole = self.tok_encode(context + continuation)
        n_ctx = len(self.tok_encode(context))
        return whole[:n_ctx], whole[n_ctx:]

    def loglikelihood(self, requests: list[Any]) -> list[tuple[float, bool]]:
        """[(log p(continuation | context), is_greedy)] for requests with args (context, continuation)."""
        out = []
        for request in requests:
            context, continuation = request.args[0], request.args[1]
            ctx, cont = self._encode_pair(context, continuation)
            # Keep the last max_length + 1 tokens of context + continuation (the last one is never input).
            cont = cont[-self.max_length :]
            ctx = (ctx or [self.prefix_token_id])[-(self.max_length + 1 - len(cont)) :]
            out.append(continuation_logprob(self.model, {"input_ids": torch.tensor([ctx])}, cont))
        return out

    def loglikelihood_rolling(self, requests: list[Any]) -> list[float]:
        """[total log-likelihood of the text] for requests with args (text,), sliding windows of max_length."""
        return [
            rolling_logprob(self.model, self.tok_encode(r.args[0]), self.prefix_token_id, self.max_length)
            for r in requests
        ]

    @torch.no_grad()
    def generate_until(self, requests: list[Any]) -> list[str]:
        """Greedy continuation of each context, cut at the first ``until`` string of its gen_kwargs."""
        groups: dict[str, list[int]] = defaultdict(list)
        for i, r in enumerate(requests):
            groups[json.dumps(r.args[1], sort_keys=True, default=str)].append(i)
        results: list[str] = [""] * len(requests)
        tok = self.tokenizer
        for indices in groups.values():
            kwargs = dict(requests[indices[0]].args[1])
            until = kwargs.get("until") or []
            max_new = int(kwargs.get("max_gen_toks", kwargs.get("max_new_tokens", self.max_gen_toks)))
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                tok.padding_side = "left"
                enc = tok(
                    [requests[i].args[0] for i in chunk],
                    return_tensors="pt",
                    padding=True,
                    add_special_tokens=self.add_bos_token,
                )
                keep = max(1, self.max_length - max_new)  # left-truncate long prompts
                ids = enc["input_ids"][:, -keep:].to(self.device)
                mask = enc["attention_mask"][:, -keep:].to(self.device)
                pad = tok.pad_token_id if tok.pad_token_id is not None else self.eot_token_id
                gen = self.model.generate(
                    input_ids=ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False, pad_token_id=pad
                )
                texts = tok.batch_decode(gen[:, ids.shape[1] :], skip_special_tokens=True)
                for i, text in zip(chunk, texts):
                    results[i] = cut_at_stop(text, until)
        return results


def _register() -> None:
    if importlib.util.find_spec("lm_eval") is None:
        return
    from lm_eval.api.registry import register_model

    register_model("casp")(CaspLM)


_register()
