"""Generation tasks on JSONL files: VQA, multiple choice and captioning.

Each line of a task file is one JSON object; image paths are relative to the JSONL's folder (or to
``image_root``). Fields:

* vqa:     {"image", "question", "answers": [..] | "answer": str, optional "question_type", "id"}
           ("answers" may also be VQAv2-style [{"answer": ..}, ..]).
* mc:      {"question", "options" | "choices": [..], "answer": index | letter | option text,
           optional "image", "question_type", "id"}  (ScienceQA style; image-free rows allowed).
* caption: {"image", "references" | "captions": [..], optional "prompt", "id"}.

Unusable rows (bad JSON, missing image file, empty question, no answers) are skipped and reported
as ``file:line: reason`` in the result's "skipped"; a file with no usable row raises EvalError.
Generation is greedy and batched with left padding (the adapter builds the inputs); only the new
tokens are decoded.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError
from torch import nn
from tqdm.auto import tqdm

from casp.eval.cider import cider_d, tokenize_caption
from casp.eval.errors import EvalError
from casp.eval.metrics import exact_match, mc_correct, option_letter, parse_choice, vqa_accuracy
from casp.eval.ppl import get_tokenizer

VQA_SUFFIX = "\nAnswer the question using a single word or phrase."
MC_SUFFIX = "\nAnswer with the option's letter from the given choices directly."
CAPTION_PROMPT = "Describe the image in one sentence."
MAX_REPORTED_SKIPS = 50


@dataclasses.dataclass(frozen=True)
class TaskRow:
    """One usable line of a task file."""

    line: int
    prompt: str
    image: Path | None
    data: dict[str, Any]


def _strings(value: Any) -> list[str]:
    """A list of non-empty answer strings from a str, a list of str, or VQAv2 [{"answer": ..}]."""
    items = value if isinstance(value, list) else [value]
    items = [item.get("answer") if isinstance(item, dict) else item for item in items]
    return [str(item) for item in items if isinstance(item, (str, int, float)) and str(item).strip()]


def _row_image(row: dict, root: Path, required: bool) -> tuple[Path | None, str | None]:
    """(resolved image path, None) or (None, reason the row is unusable)."""
    name = row.get("image")
    if not name:
        return None, ("no 'image' field" if required else None)
    path = Path(name) if Path(name).is_absolute() else root / name
    if not path.is_file():
        return None, f"image {str(path)!r} not found"
    try:
        with Image.open(path) as img:
            img.size  # noqa: B018 - opening reads the header; a corrupt file fails here, not mid-batch
    except (OSError, UnidentifiedImageError):
        return None, f"image {str(path)!r} is not a readable image"
    return path, None


def _vqa_row(row: dict, root: Path) -> tuple[TaskRow | None, str | None]:
    question = str(row.get("question") or "").strip()
    if not question:
        return None, "empty or missing 'question'"
    answers = _strings(row.get("answers", row.get("answer")))
    if not answers:
        return None, "no 'answers' (or 'answer')"
    image, err = _row_image(row, root, required=True)
    if err:
        return None, err
    return TaskRow(0, question, image, {**row, "answers": answers}), None


def _mc_row(row: dict, root: Path) -> tuple[TaskRow | None, str | None]:
    question = str(row.get("question") or "").strip()
    if not question:
        return None, "empty or missing 'question'"
    options = _strings(row.get("options", row.get("choices")))
    if len(options) < 2:
        return None, "needs 'options' (or 'choices'): a list of at least 2 strings"
    if len(options) > 26:
        return None, f"{len(options)} options; at most 26 (A-Z) are supported"
    if row.get("answer") is None:
        return None, "no 'answer'"
    image, err = _row_image(row, root, required=False)
    if err:
        return None, err
    listed = "\n".join(f"{option_letter(i)}. {o}" for i, o in enumerate(options))
    return TaskRow(0, f"{question}\n{listed}", image, {**row, "options": options}), None


def _caption_row(row: dict, root: Path) -> tuple[TaskRow | None, str | None]:
    references = _strings(row.get("references", row.get("captions")))
    if not references:
        return None, "no 'references' (or 'captions')"
    image, err = _row_image(row, root, required=True)
    if err:
        return None, err
    return TaskRow(0, str(row.get("prompt") or ""), image, {**row, "references": references}), None


ROW_PARSERS: dict[str, Callable[[dict, Path], tuple[TaskRow | None, str | None]]] = {
    "vqa": _vqa_row,
    "mc": _mc_row,
    "caption": _caption_row,
}


def read_task_file(
    path: str | Path, kind: str, image_root: str | Path | None = None, limit: int | None = None
) -> tuple[list[TaskRow], list[str]]:
    """(usable rows, "file:line: reason" for each skipped row). Raises EvalError when none is usable."""
    path = Path(path)
    if kind not in ROW_PARSERS:
        raise EvalError(f"unknown task kind {kind!r}; choose one of {', '.join(ROW_PARSERS)}")
    if not path.is_file():
        raise EvalError(f"{path}: task file not found")
    root = Path(image_root) if image_root is not None else path.parent
    rows: list[TaskRow] = []
    skipped: list[str] = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if limit is not None and len(rows) >= limit:
                break
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                skipped.append(f"{path}:{line_no}: not valid JSON ({err.msg})")
                continue
            if not isinstance(obj, dict):
                skipped.append(f"{path}:{line_no}: expected a JSON object, got {type(obj).__name__}")
                continue
            row, reason = ROW_PARSERS[kind](obj, root)
            if row is None:
                skipped.append(f"{path}:{line_no}: {reason}")
            else:
                rows.append(dataclasses.replace(row, line=line_no))
    if not rows:
        first = f"; first problem: {skipped[0]}" if skipped else ""
        raise EvalError(f"{path}: no usable {kind} rows ({len(skipped)} skipped){first}")
    return rows, skipped


def _model_device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _model_dtype(model: nn.Module) -> torch.dtype:
    for param in model.parameters():
        if param.is_floating_point():
            return param.dtype
    return torch.float32


def model_inputs(model: nn.Module, processor: Any, adapter: Any, prompts: Sequence[str],
                 images: Sequence[Image.Image] | None) -> dict[str, Any]:
    """The adapter's left-padded inputs for a batch, on the model's device; pixel values in its dtype."""
    inputs = adapter.build_inputs(processor, list(prompts), None if images is None else list(images))
    device, dtype = _model_device(model), _model_dtype(model)
    return {
        k: (v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device))
        if isinstance(v, torch.Tensor)
        else v
        for k, v in inputs.items()
    }


@torch.no_grad()
def generate_answers(
    model: nn.Module,
    processor: Any,
    adapter: Any,
    prompts: Sequence[str],
    images: Sequence[Image.Image] | None,
    max_new_tokens: int = 16,
    cuda_graph: bool = True,
) -> list[str]:
    """Greedy answers for one left-padded batch; decodes only the newly generated tokens.

    On a GPU the batch decodes from one captured CUDA graph (casp.decode) where the adapter allows it and
    ``cuda_graph`` is set, else with transformers' ``generate``."""
    from casp.decode import eos_ids, graph_decode_applies, static_greedy_generate

    tokenizer = get_tokenizer(processor)
    inputs = model_inputs(model, processor, adapter, prompts, images)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if graph_decode_applies(model, adapter, cuda_graph=cuda_graph):
        new_tokens = static_greedy_generate(model, inputs, max_new_tokens, eos_ids(model), pad_token_id=pad_id)
    else:
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, pad_token_id=pad_id)
        new_tokens = out[:, inputs["input_ids"].shape[1] :]  # [B, new]
    return [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]


def _batches(rows: list[TaskRow], batch_size: int) -> list[list[TaskRow]]:
    """Consecutive rows, batch_size at a time, never mixing rows with and without an image."""
    batches: list[list[TaskRow]] = []
    for row in rows:
        last = batches[-1] if batches else None
        if last is not None and len(last) < batch_size and (last[0].image is None) == (row.image is None):
            last.append(row)
        else:
            batches.append([row])
    return batches


def _load_image(path: Path) -> Image.Image:
    with Image.open(path) as img:
        return img.convert("RGB")


def _predict(
    model: nn.Module,
    processor: Any,
    adapter: Any,
    rows: list[TaskRow],
    task: str,
    batch_size: int,
    max_new_tokens: int,
    progress: bool,
    cuda_graph: bool = True,
) -> list[str]:
    if batch_size < 1:
        raise EvalError(f"batch_size must be >= 1, got {batch_size}")
    if not getattr(adapter, "is_multimodal", True) and any(row.image is not None for row in rows):
        raise EvalError(
            f"{task}: the model is a text-only language model ({getattr(adapter, 'family', '?')}); "
            "tasks with images need a vision-language model (text-only models support ppl)"
        )
    predictions: list[str] = []
    bar = tqdm(total=len(rows), desc=task, unit="row", disable=not progress)
    for batch in _batches(rows, batch_size):
        images = None if batch[0].image is None else [_load_image(row.image) for row in batch]
        predictions += generate_answers(model, processor, adapter, [r.prompt for r in batch], images, max_new_tokens,
                                        cuda_graph)
        bar.update(len(batch))
    bar.close()
    return predictions


def _row_type(row: TaskRow) -> str:
    value = row.data.get("question_type", row.data.get("type", row.data.get("category")))
    return str(value) if value is not None else "all"


def _row_id(row: TaskRow) -> Any:
    return row.data.get("id", row.data.get("question_id", row.line))


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def _per_type(rows: list[TaskRow], scores: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    groups: dict[str, list[int]] = defaultdict(list)
    for i, row in enumerate(rows):
        groups[_row_type(row)].append(i)
    return {
        t: {"n": len(idx), **{name: _mean([vals[i] for i in idx]) for name, vals in scores.items()}}
        for t, idx in sorted(groups.items())
    }


def _header(task: str, path: Path, rows: list[TaskRow], skipped: list[str]) -> dict[str, Any]:
    return {
        "task": task,
        "file": str(path),
        "n": len(rows),
        "n_skipped": len(skipped),
        "skipped": skipped[:MAX_REPORTED_SKIPS],
    }


def run_vqa(
    model: nn.Module,
    processor: Any,
    adapter: Any,
    jsonl_path: str | Path,
    image_root: str | Path | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 16,
    limit: int | None = None,
    progress: bool = True,
    cuda_graph: bool = True,
    prompt_suffix: str = VQA_SUFFIX,
) -> dict[str, Any]:
    """VQA: exact match and VQA accuracy (overall and per question type) with every prediction.

    ``prompt_suffix`` follows each question (LLaVA's evaluation instruction by default; "" for models
    trained without it, such as the demo model).
    """
    t0 = time.perf_counter()
    rows, skipped = read_task_file(jsonl_path, "vqa", image_root, limit)
    rows = [dataclasses.replace(r, prompt=r.prompt + prompt_suffix) for r in rows]
    preds = _predict(model, processor, adapter, rows, "vqa", batch_size, max_new_tokens, progress, cuda_graph)
    em = [exact_match(p, r.data["answers"]) for p, r in zip(preds, rows)]
    acc = [vqa_accuracy(p, r.data["answers"]) for p, r in zip(preds, rows)]
    return {
        **_header("vqa", Path(jsonl_path), rows, skipped),
        "exact_match": _mean(em),
        "vqa_accuracy": _mean(acc),
        "per_type": _per_type(rows, {"exact_match": em, "vqa_accuracy": acc}),
        "predictions": [
            {
                "id": _row_id(r),
                "question": r.data["question"],
                "prediction": p,
                "answers": r.data["answers"],
                "exact_match": e,
                "vqa_accuracy": a,
            }
            for r, p, e, a in zip(rows, preds, em, acc)
        ],
        "seconds": time.perf_counter() - t0,
    }


def run_mc(
    model: nn.Module,
    processor: Any,
    adapter: Any,
    jsonl_path: str | Path,
    image_root: str | Path | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 8,
    limit: int | None = None,
    progress: bool = True,
    cuda_graph: bool = True,
    prompt_suffix: str = MC_SUFFIX,
) -> dict[str, Any]:
    """Multiple choice: accuracy (a prediction may name the letter or the option text)."""
    t0 = time.perf_counter()
    rows, skipped = read_task_file(jsonl_path, "mc", image_root, limit)
    rows = [dataclasses.replace(r, prompt=r.prompt + prompt_suffix) for r in rows]
    preds = _predict(model, processor, adapter, rows, "mc", batch_size, max_new_tokens, progress, cuda_graph)
    correct = [mc_correct(p, r.data["options"], r.data["answer"]) for p, r in zip(preds, rows)]
    picked = [parse_choice(p, r.data["options"]) for p, r in zip(preds, rows)]
    return {
        **_header("mc", Path(jsonl_path), rows, skipped),
        "accuracy": _mean(correct),
        "unparsed": sum(c is None for c in picked),
        "per_type": _per_type(rows, {"accuracy": correct}),
        "predictions": [
            {
                "id": _row_id(r),
                "question": r.data["question"],
                "prediction": p,
                "picked": None if c is None else option_letter(c),
                "answer": r.data["answer"],
                "correct": s,
            }
            for r, p, c, s in zip(rows, preds, picked, correct)
        ],
        "seconds": time.perf_counter() - t0,
    }


def run_caption(
    model: nn.Module,
    processor: Any,
    adapter: Any,
    jsonl_path: str | Path,
    image_root: str | Path | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 32,
    limit: int | None = None,
    progress: bool = True,
    cuda_graph: bool = True,
    caption_prompt: str = CAPTION_PROMPT,
) -> dict[str, Any]:
    """Captioning: corpus CIDEr-D over the file (and per-image scores). A row's own "prompt" wins over
    ``caption_prompt``."""
    t0 = time.perf_counter()
    rows, skipped = read_task_file(jsonl_path, "caption", image_root, limit)
    rows = [r if r.prompt else dataclasses.replace(r, prompt=caption_prompt) for r in rows]
    preds = _predict(model, processor, adapter, rows, "caption", batch_size, max_new_tokens, progress, cuda_graph)
    refs = [[tokenize_caption(c) for c in r.data["references"]] for r in rows]
    cider, per_image = cider_d([tokenize_caption(p) for p in preds], refs)
    return {
        **_header("caption", Path(jsonl_path), rows, skipped),
        "cider": cider,
        "predictions": [
            {"id": _row_id(r), "prediction": p, "references": r.data["references"], "cider": s}
            for r, p, s in zip(rows, preds, per_image)
        ],
        "seconds": time.perf_counter() - t0,
    }
