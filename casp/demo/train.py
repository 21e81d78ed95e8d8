"""Train the demo VLM from scratch on world data generated on the fly.

    python -m casp.demo.train --out DIR --steps 6000 --device cuda [--batch 128] [--max-minutes 5]

Every sequence is one image and 1-4 question or caption turns in the chat template's format
(``USER: <image>\\n{q} ASSISTANT: {a}</s>USER: {q} ASSISTANT: {a}</s>...``); the loss is taken on
answer tokens (and their ``</s>``) only. The whole model (vision tower, projector, language model)
trains with AdamW and a cosine schedule over the training *progress*, which is the larger of
step / steps and elapsed / max-minutes, so a time-capped run still anneals to zero. bf16 autocast on
GPU. The model is saved in fp16 with ``save_pretrained`` to a temporary directory that is renamed
into place, reloaded from disk, and scored by exact match (greedy decoding, through the processor)
on the held-out test split; ``DIR/training_log.json`` records the command, steps, time and scores.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from casp.demo import world
from casp.demo.model import DemoModelConfig, build_demo_model, load_demo_model, normalize_pixels

IGNORE = -100


class TurnEncoder:
    """Token ids of chat turns, identical to tokenizing the chat template's rendering.

    Pieces end at a special token or before a space-led word, where byte-level BPE never merges,
    so encoding them one by one (cached: the world's strings repeat a lot) equals encoding the
    whole rendered conversation. tests/test_demo_model.py checks this against the processor.
    """

    def __init__(self, tokenizer, num_image_tokens: int):
        self.tok = tokenizer
        self.num_image_tokens = num_image_tokens
        self.image_id = tokenizer.convert_tokens_to_ids(tokenizer.image_token)
        self.bos, self.eos, self.pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
        self._cache: dict[str, list[int]] = {}

    def _ids(self, text: str) -> list[int]:
        ids = self._cache.get(text)
        if ids is None:
            ids = self._cache[text] = self.tok(text, add_special_tokens=False)["input_ids"]
        return ids

    def prompt(self, question: str, first: bool = True) -> list[int]:
        """``[<s>] USER: [<image> x N]\\n{question} ASSISTANT:`` (image and <s> only when first)."""
        if not first:
            return self._ids(f"USER: {question} ASSISTANT:")
        head = [self.bos, *self._ids("USER: "), *[self.image_id] * self.num_image_tokens]
        return head + self._ids(f"\n{question} ASSISTANT:")

    def answer(self, answer: str) -> list[int]:
        return self._ids(f" {answer}") + [self.eos]

    def conversation(self, turns: list[world.QA]) -> tuple[list[int], list[int]]:
        """(input_ids, labels) of a whole conversation; labels are IGNORE outside the answers."""
        ids: list[int] = []
        labels: list[int] = []
        for t, qa in enumerate(turns):
            p, a = self.prompt(qa.question, first=t == 0), self.answer(qa.answer)
            ids += p + a
            labels += [IGNORE] * len(p) + a
        return ids, labels


def pad_right(seqs: list[list[int]], value: int) -> np.ndarray:
    out = np.full((len(seqs), max(len(s) for s in seqs)), value, dtype=np.int64)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = s
    return out


def pad_left(seqs: list[list[int]], value: int) -> tuple[np.ndarray, np.ndarray]:
    width = max(len(s) for s in seqs)
    ids = np.full((len(seqs), width), value, dtype=np.int64)
    mask = np.zeros((len(seqs), width), dtype=np.int64)
    for i, s in enumerate(seqs):
        ids[i, width - len(s) :] = s
        mask[i, width - len(s) :] = 1
    return ids, mask


def train_batch(
    encoder: TurnEncoder,
    seed: int,
    start: int,
    batch: int,
    max_turns: int,
    cfg: world.WorldConfig,
    min_text_tokens: int = 0,
) -> dict[str, np.ndarray]:
    """Examples ``start .. start+batch`` of the train split (stream ``seed``) as padded arrays.

    A conversation gets turns until its text (all but the image tokens) reaches ``min_text_tokens``
    or it has ``max_turns`` turns: sequences come out of similar length, so little of a batch is
    padding, and each image's encoding is supervised by several answers.
    """
    images, ids, labels = [], [], []
    for i in range(start, start + batch):
        rng = world.example_rng("train", seed, i)
        scene = world.sample_scene(rng, cfg)
        turns = [world.make_turn(scene, rng)]
        x, y = encoder.conversation(turns)
        while len(turns) < max_turns and len(x) - encoder.num_image_tokens < min_text_tokens:
            turns.append(world.make_turn(scene, rng))
            x, y = encoder.conversation(turns)
        images.append(world.render(scene, cfg))
        ids.append(x)
        labels.append(y)
    input_ids = pad_right(ids, encoder.pad)
    return {
        "images": np.stack(images),  # [B, H, W, 3] uint8; normalized on the device
        "input_ids": input_ids,  # [B, T]
        "attention_mask": (pad_right(ids, -1) != -1).astype(np.int64),
        "labels": pad_right(labels, IGNORE),
    }


class TrainStream(torch.utils.data.IterableDataset):
    """Endless training batches; each DataLoader worker draws its own seed stream."""

    def __init__(self, tokenizer, num_image_tokens: int, seed: int, batch: int, max_turns: int, min_text: int):
        self.tokenizer, self.num_image_tokens = tokenizer, num_image_tokens
        self.seed, self.batch, self.max_turns, self.min_text = seed, batch, max_turns, min_text

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        stream = self.seed * 1000 + (info.id if info is not None else 0)
        encoder = TurnEncoder(self.tokenizer, self.num_image_tokens)
        start = 0
        while True:
            yield train_batch(encoder, stream, start, self.batch, self.max_turns, world.WorldConfig(), self.min_text)
            start += self.batch


# ---------------------------------------------------------------------------------------------- scoring


def normalize_answer(text: str) -> str:
    return " ".join(text.strip().lower().rstrip(".").split())


def heldout_examples(split: str, n: int, seed: int = 0) -> list[world.Example]:
    """The evaluation set: example i has type ``balanced_type(i)``, as in ``write_vqa_jsonl``."""
    return [world.make_example(split, seed, i, world.balanced_type(i)) for i in range(n)]


def score(examples: list[world.Example], predictions: list[str]) -> dict[str, float]:
    """Exact match (after lower-casing and stripping a final period) per question type and overall."""
    hits: dict[str, list[bool]] = defaultdict(list)
    for ex, pred in zip(examples, predictions):
        ok = normalize_answer(pred) in {normalize_answer(a) for a in ex.qa.answers}
        hits[ex.qa.qtype].append(ok)
        hits["all"].append(ok)
    return {k: round(float(np.mean(v)), 4) for k, v in sorted(hits.items())}


@torch.no_grad()
def predict_fast(model, encoder: TurnEncoder, examples, device, batch: int = 128, max_new_tokens: int = 8):
    """Greedy answers using the training encoder (no processor): for periodic evaluation."""
    preds = []
    for k in range(0, len(examples), batch):
        chunk = examples[k : k + batch]
        ids, mask = pad_left([encoder.prompt(ex.qa.question) for ex in chunk], encoder.pad)
        pixels = normalize_pixels(torch.from_numpy(np.stack([ex.image for ex in chunk])).to(device))
        out = model.generate(
            input_ids=torch.from_numpy(ids).to(device),
            attention_mask=torch.from_numpy(mask).to(device),
            pixel_values=pixels.to(model.dtype),
            max_new_tokens=max_new_tokens,
            do_sample=False,
        )
        preds += encoder.tok.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)
    return preds


@torch.no_grad()
def predict(model, processor, examples, batch: int = 64, max_new_tokens: int = 8) -> list[str]:
    """Greedy answers through the public path: chat template + processor + generate."""
    preds = []
    device = next(model.parameters()).device
    for k in range(0, len(examples), batch):
        chunk = examples[k : k + batch]
        texts = [
            processor.apply_chat_template(
                [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": ex.qa.question}]}],
                add_generation_prompt=True,
            )
            for ex in chunk
        ]
        images = [Image.fromarray(ex.image) for ex in chunk]
        inputs = processor(images=images, text=texts, return_tensors="pt", padding=True).to(device)
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        preds += processor.tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    return preds


def timed_score(examples: list[world.Example], predict_fn, split: str, device: str, dtype: torch.dtype) -> dict:
    """Exact match of ``predict_fn(examples)`` with the settings and the seconds it took (a training log entry)."""
    t0 = time.time()
    scores = score(examples, predict_fn(examples))
    return {
        "split": split,
        "n": len(examples),
        "dtype": str(dtype).removeprefix("torch."),
        "device": device,
        "seconds": round(time.time() - t0, 1),
        "exact_match": scores,
    }


def evaluate_checkpoint(path: str | Path, n: int, device: str, dtype: torch.dtype, split: str = "test") -> dict:
    """Load a saved demo model from disk and score it on ``n`` held-out questions."""
    model, processor = load_demo_model(path, dtype=dtype, device=device)
    return timed_score(heldout_examples(split, n), lambda ex: predict(model, processor, ex), split, device, dtype)


# --------------------------------------------------------------------------------------------- training


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 6000
    batch: int = 128
    lr: float = 1e-3
    min_lr_ratio: float = 0.02
    warmup: int = 300
    weight_decay: float = 0.05
    max_turns: int = 6
    min_text_tokens: int = 100
    max_minutes: float = 0.0  # 0 = no time cap
    eval_every: int = 500
    eval_n: int = 240
    final_eval_n: int = 600
    workers: int = -1  # -1 = a few less than the CPU count
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch < 1:
            raise ValueError("steps and batch must be >= 1")
        if not 0 < self.lr < 1:
            raise ValueError(f"lr must be in (0, 1), got {self.lr}")
        if self.max_turns < 1:
            raise ValueError("max_turns must be >= 1")


def lr_factor(progress: float, step: int, tc: TrainConfig) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine from 1 to ``min_lr_ratio`` over progress."""
    warm = min(1.0, (step + 1) / tc.warmup)
    cos = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return warm * (tc.min_lr_ratio + (1 - tc.min_lr_ratio) * cos)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def save_atomic(model, processor, out: Path, log: dict) -> None:
    """save_pretrained (fp16 safetensors) into ``out.tmp-<pid>``, then rename it to ``out``."""
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.to(torch.float16).save_pretrained(tmp)
    processor.save_pretrained(tmp)
    (tmp / "training_log.json").write_text(json.dumps(log, indent=2) + "\n")
    old = out.with_name(f"{out.name}.old-{os.getpid()}")
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def _sizes_of(model) -> dict:
    """DemoModelConfig fields read back from a loaded model's config."""
    v, t = model.config.vision_config, model.config.text_config
    return {
        "image_size": v.image_size, "patch_size": v.patch_size, "vision_hidden": v.hidden_size,
        "vision_layers": v.num_hidden_layers, "vision_heads": v.num_attention_heads,
        "vision_intermediate": v.intermediate_size, "text_hidden": t.hidden_size,
        "text_layers": t.num_hidden_layers, "text_heads": t.num_attention_heads,
        "text_kv_heads": t.num_key_value_heads, "text_intermediate": t.intermediate_size,
    }  # fmt: skip


def _summary(log: dict | None) -> dict | None:
    """The parts of an earlier training log worth carrying into a continued run's log."""
    if log is None:
        return None
    keys = ("command", "device", "train_config", "steps", "examples_seen", "train_seconds", "final_eval", "init")
    return {k: log.get(k) for k in keys}


def train(
    out: Path, tc: TrainConfig, device: str, model_cfg: DemoModelConfig | None = None, init: Path | None = None
) -> dict:
    """Train a demo model per ``tc`` on ``device``, save it to ``out``, score it; returns the log.

    ``init``: continue from a saved demo checkpoint (its weights and processor) instead of a fresh
    random model; ``model_cfg`` is then ignored.
    """
    model_cfg = model_cfg or DemoModelConfig()
    t_start = time.time()
    torch.manual_seed(tc.seed)
    prior = None
    if init is not None:
        model, processor = load_demo_model(init, dtype=torch.float32)
        model_cfg = dataclasses.replace(model_cfg, **_sizes_of(model))
        if (init / "training_log.json").is_file():
            prior = json.loads((init / "training_log.json").read_text())
    else:
        model, processor = build_demo_model(model_cfg, seed=tc.seed)
    n_params = sum(p.numel() for p in model.parameters())
    workers = tc.workers if tc.workers >= 0 else max(0, min(12, (os.cpu_count() or 1) - 2))
    stream = TrainStream(
        processor.tokenizer, model_cfg.num_image_tokens, tc.seed, tc.batch, tc.max_turns, tc.min_text_tokens
    )
    # Workers are forked before CUDA is initialized in this process.
    loader = torch.utils.data.DataLoader(
        stream,
        batch_size=None,
        num_workers=workers,
        pin_memory=device == "cuda",
        prefetch_factor=4 if workers else None,
        persistent_workers=bool(workers),
    )
    batches = iter(loader)
    next_batch = next(batches)

    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    model.to(device).train()
    opt = torch.optim.AdamW(
        param_groups(model, tc.weight_decay),
        lr=tc.lr,
        betas=(0.9, 0.98),
        eps=1e-8,
        fused=device == "cuda",
    )
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)
    )
    encoder = TurnEncoder(processor.tokenizer, model_cfg.num_image_tokens)
    monitor = heldout_examples("calibration", tc.eval_n)
    history = []
    budget = tc.max_minutes * 60.0
    t_train = time.time()
    step, loss_ema, losses = 0, None, []
    log_every = max(1, min(25, tc.steps // 20))
    bar = tqdm(total=tc.steps, mininterval=5.0, file=sys.stderr, desc="train")
    while True:
        elapsed = time.time() - t_train
        progress = max(step / tc.steps, elapsed / budget if budget > 0 else 0.0)
        if progress >= 1.0:
            break
        for g in opt.param_groups:
            g["lr"] = tc.lr * lr_factor(progress, step, tc)
        batch = {k: torch.as_tensor(v).to(device, non_blocking=True) for k, v in next_batch.items()}
        next_batch = next(batches)
        with autocast:
            # No attention mask: padding is on the right and attention is causal, so no real token
            # sees a pad; without a mask SDPA takes its fused causal kernels.
            loss = model(
                input_ids=batch["input_ids"],
                pixel_values=normalize_pixels(batch["images"]),
                labels=batch["labels"],
            ).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % log_every == 0 or step == 1:
            value = loss.item()
            loss_ema = value if loss_ema is None else 0.8 * loss_ema + 0.2 * value
            losses.append([step, round(value, 4)])
            bar.set_postfix(loss=f"{loss_ema:.4f}", lr=f"{opt.param_groups[0]['lr']:.2e}")
        bar.update(1)
        if step % tc.eval_every == 0:
            model.eval()
            with autocast:
                em = score(monitor, predict_fast(model, encoder, monitor, device))
            model.train()
            history.append({"step": step, "seconds": round(time.time() - t_train, 1), "loss": loss_ema, "em": em})
            tqdm.write(f"step {step} t={history[-1]['seconds']}s loss {loss_ema:.4f} held-out EM {em}")
    bar.close()
    train_seconds = time.time() - t_train
    del batches, loader

    log = {
        "command": " ".join([Path(sys.executable).name, "-m", "casp.demo.train", *sys.argv[1:]]),
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__},
        "model_config": dataclasses.asdict(model_cfg),
        "train_config": dataclasses.asdict(tc),
        "parameters": n_params,
        "steps": step,
        "examples_seen": step * tc.batch,
        "train_seconds": round(train_seconds, 1),
        "final_loss_ema": loss_ema,
        "init": None if init is None else {"path": str(init), "prior": _summary(prior)},
        "history": history,
        "loss_curve": losses,
    }
    model.eval()
    save_atomic(model, processor, out, log)
    eval_dtype = torch.float16 if device == "cuda" else torch.float32
    log["final_eval"] = evaluate_checkpoint(out, tc.final_eval_n, device, eval_dtype)
    log["total_seconds"] = round(time.time() - t_start, 1)
    (out / "training_log.json").write_text(json.dumps(log, indent=2) + "\n")
    return log


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m casp.demo.train", description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, help="checkpoint directory to write")
    ap.add_argument("--init", type=Path, help="continue training from this saved demo checkpoint")
    ap.add_argument("--eval", type=Path, help="only score this saved checkpoint (--final-eval-n questions)")
    ap.add_argument(
        "--eval-dtype",
        choices=["auto", "float16", "float32"],
        default="auto",
        help="compute dtype for --eval (auto: float16 on cuda, float32 on cpu)",
    )
    ap.add_argument("--min-text-tokens", type=int, default=TrainConfig.min_text_tokens)
    ap.add_argument("--max-turns", type=int, default=TrainConfig.max_turns)
    ap.add_argument("--steps", type=int, default=TrainConfig.steps)
    ap.add_argument("--batch", type=int, default=TrainConfig.batch)
    ap.add_argument("--lr", type=float, default=TrainConfig.lr)
    ap.add_argument("--warmup", type=int, default=TrainConfig.warmup)
    ap.add_argument("--max-minutes", type=float, default=0.0, help="time cap for the training loop (0 = none)")
    ap.add_argument("--eval-every", type=int, default=TrainConfig.eval_every)
    ap.add_argument("--eval-n", type=int, default=TrainConfig.eval_n)
    ap.add_argument("--final-eval-n", type=int, default=TrainConfig.final_eval_n)
    ap.add_argument("--workers", type=int, default=-1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    ap.add_argument("--model", default="{}", help="JSON overrides of DemoModelConfig, e.g. '{\"text_layers\": 2}'")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda requested but CUDA is not available; use --device cpu")
    if args.eval is not None:
        dtype = {"float16": torch.float16, "float32": torch.float32}.get(args.eval_dtype)
        dtype = dtype or (torch.float16 if args.device == "cuda" else torch.float32)
        print(json.dumps(evaluate_checkpoint(args.eval, args.final_eval_n, args.device, dtype), indent=1))
        return 0
    if args.out is None:
        ap.error("--out DIR is required to train")
    try:
        tc = TrainConfig(
            steps=args.steps,
            batch=args.batch,
            lr=args.lr,
            warmup=args.warmup,
            max_minutes=args.max_minutes,
            eval_every=args.eval_every,
            eval_n=args.eval_n,
            final_eval_n=args.final_eval_n,
            workers=args.workers,
            seed=args.seed,
            max_turns=args.max_turns,
            min_text_tokens=args.min_text_tokens,
        )
        model_cfg = DemoModelConfig(**json.loads(args.model))
    except (ValueError, TypeError) as e:
        ap.error(str(e))
    log = train(args.out, tc, args.device, model_cfg, init=args.init)
    fe = log["final_eval"]
    print(
        f"saved {args.out}: {log['steps']} steps in {log['train_seconds']}s; "
        f"held-out exact match ({fe['n']} questions, {fe['dtype']}): {fe['exact_match']}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
