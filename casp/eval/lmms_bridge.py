"""lmms-eval model wrapper for casp models (GQA, TextVQA, ScienceQA, COCO / NoCaps captions, MME, ...).

    from casp.eval.lmms_bridge import CaspLMMS
    lmm = CaspLMMS(pretrained="llava-2bit")          # casp-compressed or original VLM directory
    lmms_eval.evaluator.simple_evaluate(model=lmm, tasks=["gqa"])

``CaspLMMS`` follows lmms-eval's simple ``lmms`` model API: ``generate_until`` receives requests whose
``.args`` are (context, gen_kwargs, doc_to_visual, doc_id, task, split), ``loglikelihood`` requests
(context, doc_to_target, doc_to_visual, doc_id, task, split); the document is looked up in
``self.task_dict[task][split][doc_id]`` (lmms-eval fills ``task_dict``). It subclasses
``lmms_eval.api.model.lmms`` (and registers as model "casp") when lmms-eval is installed, otherwise a
minimal local base. Prompts are formatted by the model's adapter (chat template, image placeholder);
one image per document (video and multi-image documents raise EvalError).
"""

from __future__ import annotations

import importlib.util
import json
from collections import defaultdict
from typing import Any

import torch
from PIL import Image

from casp.eval.errors import EvalError
from casp.eval.lm_eval_bridge import LocalLMBase, load_for_bridge
from casp.eval.ppl import get_tokenizer
from casp.eval.scoring import continuation_logprob, cut_at_stop
from casp.eval.tasks import generate_answers


class LocalLMMSBase(LocalLMBase):
    """Stand-in for ``lmms_eval.api.model.lmms`` when lmms-eval is not installed (single process): the
    lm-eval stand-in plus the ``task_dict`` that lmms-eval fills with the documents."""

    is_simple: bool = True

    def __init__(self) -> None:
        super().__init__()
        self.task_dict: dict = {}


def _base_class() -> type:
    if importlib.util.find_spec("lmms_eval") is None:
        return LocalLMMSBase
    from lmms_eval.api.model import lmms

    return lmms


def _flatten(visuals: Any) -> list[Any]:
    if visuals is None:
        return []
    if not isinstance(visuals, (list, tuple)):
        return [visuals]
    return [v for item in visuals for v in _flatten(item)]


class CaspLMMS(_base_class()):
    """lmms-eval ``lmms`` over a casp VLM (or any model a casp adapter supports)."""

    def __init__(
        self,
        pretrained: str | None = None,
        model: Any = None,
        processor: Any = None,
        adapter: Any = None,
        device: str | None = None,
        dtype: Any = None,
        batch_size: int | str = 1,
        max_new_tokens: int = 128,
    ) -> None:
        super().__init__()
        self.model, self.processor, self.adapter = load_for_bridge(pretrained, model, processor, adapter, device, dtype)
        self.model.eval()
        self.tokenizer = get_tokenizer(self.processor)
        self.batch_size_per_gpu = int(batch_size)
        self.max_new_tokens = int(max_new_tokens)

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self) -> torch.device:
        param = next(self.model.parameters(), None)
        return param.device if param is not None else torch.device("cpu")

    def _image(self, doc_to_visual: Any, task: str, split: str, doc_id: Any) -> Image.Image | None:
        """The document's single image (None for text-only documents)."""
        visuals = _flatten(doc_to_visual(self.task_dict[task][split][doc_id])) if callable(doc_to_visual) else []
        if not visuals:
            return None
        if len(visuals) > 1 or not isinstance(visuals[0], Image.Image):
            raise EvalError(
                f"{task}/{split} doc {doc_id}: {len(visuals)} visual(s) of type {type(visuals[0]).__name__}; "
                "the casp bridge supports one PIL image per document"
            )
        return visuals[0].convert("RGB")

    @staticmethod
    def _context(contexts: Any) -> str:
        return contexts if isinstance(contexts, str) else str(contexts[0])

    def loglikelihood(self, requests: list[Any]) -> list[tuple[float, bool]]:
        """[(log p(target | image, chat-formatted context), is_greedy)] per request."""
        out = []
        for request in requests:
            contexts, doc_to_target, doc_to_visual, doc_id, task, split = request.args
            doc = self.task_dict[task][split][doc_id]
            target = doc_to_target if isinstance(doc_to_target, str) else doc_to_target(doc)
            image = self._image(doc_to_visual, task, split, doc_id)
            prompt = self.adapter.build_inputs(
                self.processor, [self._context(contexts)], None if image is None else [image]
            )
            target_ids = self.tokenizer(str(target), add_special_tokens=False)["input_ids"]
            out.append(continuation_logprob(self.model, dict(prompt), target_ids))
        return out

    def generate_until(self, requests: list[Any]) -> list[str]:
        """Greedy answers, batched (left padding) among requests with equal gen_kwargs and image presence."""
        items = []
        for request in requests:
            contexts, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
            image = self._image(doc_to_visual, task, split, doc_id)
            items.append((self._context(contexts), dict(gen_kwargs or {}), image))
        groups: dict[tuple[str, bool], list[int]] = defaultdict(list)
        for i, (_, kwargs, image) in enumerate(items):
            groups[(json.dumps(kwargs, sort_keys=True, default=str), image is None)].append(i)
        results = [""] * len(items)
        for (_, text_only), indices in groups.items():
            kwargs = items[indices[0]][1]
            max_new = int(kwargs.get("max_new_tokens", self.max_new_tokens))
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                images = None if text_only else [items[i][2] for i in chunk]
                answers = generate_answers(
                    self.model, self.processor, self.adapter, [items[i][0] for i in chunk], images, max_new
                )
                for i, answer in zip(chunk, answers):
                    results[i] = cut_at_stop(answer, kwargs.get("until"))
        return results

    def generate_until_multi_round(self, requests: list[Any]) -> list[str]:
        raise EvalError("multi-round generation is not supported by the casp lmms-eval bridge")


def _register() -> None:
    if importlib.util.find_spec("lmms_eval") is None:
        return
    from lmms_eval.api.registry import register_model

    register_model("casp")(CaspLMMS)


_register()
