"""GPU check of casp.decode (CUDA-graph greedy decoding) on every supported family and on the demo model.

1. Tiny random models of every family (tests/fixtures.py), fp16 on CUDA: the graph's tokens must equal the
   same static loop run eagerly (same kernels, so bit-identical); how many leading tokens agree with
   transformers' generate is printed (fp16 sums in another order can flip near-ties of a random model).
   Qwen2-VL is run too, for the record, although its adapter keeps it on generate (graph_decode=False).
   Each graph family also decodes a left-padded batch of 3 prompts (what casp eval runs) both ways.
2. The demo model compressed with RTN at 4 and 2 bits, loaded the way ``casp generate`` loads it (fp16 on
   the GPU, so the packed-weight Triton kernels run inside the graph): answers
   to held-out questions with ``casp.generate.generate`` on the graph path and with ``cuda_graph=False``
   (transformers' generate), and the seconds each took; then casp eval's VQA runner in batches of 8, both ways.
3. ``casp eval --speed`` on the 2-bit demo model (``casp.eval.evaluate``, batch 1) in each packed-weight mode of
   ``--batch1-kernel`` (kmajor, gemv, kmajor-only): VQA accuracy, answers against the kmajor mode's, decode and
   prefill tokens/s, peak GPU memory, the kernels' copies and the weights held off the GPU.

    PYTHONPATH=. python benchmarks/gpu_check_graph_decode.py --out $OUT/gpu_check_graph_decode.txt
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[0] = os.path.dirname(HERE)  # the repository root, not benchmarks/ (its kernels.py shadows a package)

from casp.decode import eos_ids, graph_decode_applies, static_greedy_generate  # noqa: E402
from casp.generate import generate  # noqa: E402
from casp.models import get_adapter, load_model  # noqa: E402
from tests.fixtures import FAMILIES, build, make_image  # noqa: E402


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def agree(a: torch.Tensor, b: torch.Tensor) -> int:
    n = min(a.shape[1], b.shape[1])
    return int((a[0, :n] == b[0, :n]).long().cumprod(0).sum())


def check_families(lines: list[str], failures: list[str], device: str) -> None:
    for family in FAMILIES:
        model, processor = build(family, num_layers=2, hidden=64)
        model = model.to(device, torch.float16 if device == "cuda" else torch.float32)
        adapter = get_adapter(model)
        images = [make_image(0)] if adapter.is_multimodal else None
        inputs = dict(adapter.build_inputs(processor, ["what color is the circle ?"], images).to(device))
        tokenizer = getattr(processor, "tokenizer", processor)
        with torch.no_grad():
            ref = model.generate(**inputs, max_new_tokens=16, do_sample=False, pad_token_id=tokenizer.pad_token_id)
            ref = ref[:, inputs["input_ids"].shape[1]:]
            try:
                eager = static_greedy_generate(model, inputs, 16, eos_ids(model), cuda_graph=False)
                graph = static_greedy_generate(model, inputs, 16, eos_ids(model), cuda_graph=True)
            except Exception as e:  # record and go on: one family failing must not hide the others
                lines.append(f"{family}: FAILED {type(e).__name__}: {str(e)[:300]}")
                if adapter.graph_decode:
                    failures.append(family)
                continue
        same = torch.equal(eager, graph)
        if not same and adapter.graph_decode:
            failures.append(family)
        lines.append(f"{family}: graph == eager static: {same}; agrees with generate on {agree(graph, ref)} of "
                     f"{ref.shape[1]} tokens; used by casp generate: {adapter.graph_decode}")
        print(lines[-1], flush=True)
        if adapter.graph_decode:
            check_batch(lines, failures, family, model, processor, adapter, device)


def check_batch(lines: list[str], failures: list[str], family: str, model, processor, adapter, device: str) -> None:
    """A left-padded batch of 3 prompts (casp eval's case): graph == eager static loop, rows vs generate."""
    images = [make_image(i) for i in range(len(BATCH_PROMPTS))] if adapter.is_multimodal else None
    inputs = dict(adapter.build_inputs(processor, BATCH_PROMPTS, images).to(device))
    tokenizer = getattr(processor, "tokenizer", processor)
    pad = tokenizer.pad_token_id
    with torch.no_grad():
        ref = model.generate(**inputs, max_new_tokens=16, do_sample=False, pad_token_id=pad)
        ref = ref[:, inputs["input_ids"].shape[1]:]
        eager = static_greedy_generate(model, inputs, 16, eos_ids(model), cuda_graph=False, pad_token_id=pad)
        graph = static_greedy_generate(model, inputs, 16, eos_ids(model), cuda_graph=True, pad_token_id=pad)
    same = torch.equal(eager, graph)
    if not same:
        failures.append(f"{family} batch")
    rows = [agree(graph[i:i + 1], ref[i:i + 1]) for i in range(len(BATCH_PROMPTS))]
    lines.append(f"{family}, batch of {len(BATCH_PROMPTS)} left-padded: graph == eager static: {same}; leading "
                 f"tokens agreeing with generate per row: {rows} of {ref.shape[1]}")
    print(lines[-1], flush=True)


BATCH_PROMPTS = ["what color is the circle ?", "a dog", "how many red squares are there in the picture ?"]


def check_demo(lines: list[str], failures: list[str], n_questions: int, device: str) -> None:
    from PIL import Image

    from casp.compress import compress
    from casp.config import CompressionConfig
    from casp.demo import world
    from casp.demo.model import DEMO_MODEL_DIR
    from casp.eval.tasks import read_task_file

    tmp = Path(tempfile.mkdtemp(prefix="casp-graph-"))
    vqa = Path(world.write_vqa_jsonl(tmp, n_questions, seed=2, split="test"))
    rows, _ = read_task_file(vqa, "vqa", None, n_questions)
    for bits in (4, 2):
        out = tmp / f"rtn{bits}"
        compress(DEMO_MODEL_DIR, out, CompressionConfig(quantizer="rtn", bits=bits), device=device)
        dtype = torch.float16 if device == "cuda" else torch.float32  # as casp generate loads it
        model, processor, adapter = load_model(out, dtype=dtype, device=device)
        if device == "cuda":
            assert graph_decode_applies(model, adapter)
        answers, seconds = {}, {}
        for graph in (True, False):
            got = []
            generate(model, processor, adapter, [rows[0].prompt], [Image.open(rows[0].image).convert("RGB")], 8,
                     cuda_graph=graph)  # warm-up: Triton compiles
            sync(device)
            t = time.perf_counter()
            for row in rows:
                with Image.open(row.image) as img:
                    got += generate(model, processor, adapter, [row.prompt], [img.convert("RGB")], 16,
                                    cuda_graph=graph)
            sync(device)
            seconds[graph], answers[graph] = time.perf_counter() - t, got
        same = sum(a == b for a, b in zip(answers[True], answers[False]))
        if same != len(rows):
            failures.append(f"demo rtn{bits}")
        lines.append(f"demo model, RTN {bits}-bit, {len(rows)} questions: graph answers equal generate's on {same}; "
                     f"{seconds[True]:.2f} s with the graph vs {seconds[False]:.2f} s eager "
                     f"({seconds[False] / seconds[True]:.2f}x); first answers: {answers[True][:3]}")
        print(lines[-1], flush=True)
        check_demo_eval(lines, failures, bits, model, processor, adapter, vqa, device)
        del model
    check_demo_modes(lines, failures, tmp / "rtn2", vqa, device)


def check_demo_eval(lines: list[str], failures: list[str], bits: int, model, processor, adapter, vqa: Path,
                    device: str) -> None:
    """casp eval's VQA runner, batches of 8: graph decode vs transformers' generate, answers and seconds."""
    from casp.eval.tasks import run_vqa

    preds, seconds = {}, {}
    for graph in (True, False):
        run_vqa(model, processor, adapter, vqa, batch_size=8, max_new_tokens=16, limit=8, progress=False,
                prompt_suffix="", cuda_graph=graph)  # warm-up
        sync(device)
        t = time.perf_counter()
        res = run_vqa(model, processor, adapter, vqa, batch_size=8, max_new_tokens=16, progress=False,
                      prompt_suffix="", cuda_graph=graph)
        sync(device)
        seconds[graph] = time.perf_counter() - t
        preds[graph] = ([p["prediction"] for p in res["predictions"]], res["vqa_accuracy"])
    same = sum(a == b for a, b in zip(preds[True][0], preds[False][0]))
    if same != len(preds[True][0]):
        failures.append(f"demo rtn{bits} eval")
    lines.append(f"demo model, RTN {bits}-bit, run_vqa in batches of 8: graph answers equal generate's on {same} of "
                 f"{len(preds[True][0])}; VQA accuracy {preds[True][1]:.3f} vs {preds[False][1]:.3f}; "
                 f"{seconds[True]:.2f} s vs {seconds[False]:.2f} s ({seconds[False] / seconds[True]:.2f}x)")
    print(lines[-1], flush=True)


def check_demo_modes(lines: list[str], failures: list[str], model_dir: Path, vqa: Path, device: str) -> None:
    """casp eval --speed (batch 1) in each --batch1-kernel mode: answers agree, memory and speed recorded."""
    from casp.eval.evaluate import evaluate
    from casp.kernels import BATCH1_KERNELS

    first = None
    for mode in BATCH1_KERNELS:
        try:
            res = evaluate(model_dir, [f"vqa:{vqa}"], device=device, speed=True, speed_tokens=32, batch1_kernel=mode,
                           batch_size=1, progress=False, prompt_suffix="")  # as the demo model was trained
        except Exception as e:  # record and go on with the other modes
            failures.append(f"eval --speed {mode}")
            lines.append(f"demo model, RTN 2-bit, casp eval --speed --batch1-kernel {mode}: FAILED "
                         f"{type(e).__name__}: {str(e)[:300]}")
            print(lines[-1], flush=True)
            continue
        task = next(iter(res["tasks"].values()))
        preds = [p["prediction"] for p in task["predictions"]]
        first = first or (mode, preds)
        same = sum(a == b for a, b in zip(preds, first[1]))
        if same < 0.8 * len(preds):  # other kernels sum in another order: a few near-ties may flip, not more
            failures.append(f"eval --speed {mode} answers")
        sp = res["speed"]
        mib = {k: sp.get(k, 0) / 2**20 for k in ("peak_memory_bytes", "kernel_copy_bytes", "offloaded_bytes")}
        lines.append(f"demo model, RTN 2-bit, casp eval --speed --batch1-kernel {mode}: VQA accuracy "
                     f"{task['vqa_accuracy']:.3f}, answers equal {first[0]}'s on {same} of {len(preds)}; decode "
                     f"{sp['decode_tokens_per_s']:.1f} tok/s ({sp['decode_path']}), prefill "
                     f"{sp['prefill_tokens_per_s']:.0f} tok/s; peak memory {mib['peak_memory_bytes']:.1f} MiB, "
                     f"kernel copies {mib['kernel_copy_bytes']:.2f} MiB, off the device "
                     f"{mib['offloaded_bytes']:.2f} MiB")
        print(lines[-1], flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--questions", type=int, default=20)
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run of the code (no graphs)")
    args = ap.parse_args()
    t0 = time.time()
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    lines = [f"device {name}; torch {torch.__version__}"]
    failures: list[str] = []
    check_families(lines, failures, args.device)
    check_demo(lines, failures, args.questions, args.device)
    lines.append(f"{'FAILED: ' + ', '.join(failures) if failures else 'all checks passed'}; {time.time() - t0:.0f} s")
    print(lines[-1])
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
