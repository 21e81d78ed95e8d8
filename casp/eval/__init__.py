"""Evaluation: perplexity, VQA / multiple choice / captioning on JSONL files, speed and memory, results JSON.

The lmms-eval and lm-eval-harness bridges live in ``casp.eval.lmms_bridge`` and
``casp.eval.lm_eval_bridge`` (imported on demand; neither package is needed otherwise).
"""

from casp.eval.cider import cider_d, tokenize_caption
from casp.eval.errors import EvalError
from casp.eval.evaluate import TASK_KINDS, evaluate, parse_task_spec, run_task
from casp.eval.metrics import exact_match, mc_correct, normalize_answer, parse_choice, vqa_accuracy
from casp.eval.ppl import perplexity, perplexity_of_ids, run_ppl
from casp.eval.results import SCHEMA_VERSION, load_results, make_results, method_info, save_results
from casp.eval.speed import measure_speed, model_bytes, speed_sweep
from casp.eval.tasks import generate_answers, read_task_file, run_caption, run_mc, run_vqa

__all__ = [
    "SCHEMA_VERSION",
    "TASK_KINDS",
    "EvalError",
    "cider_d",
    "evaluate",
    "exact_match",
    "generate_answers",
    "load_results",
    "make_results",
    "mc_correct",
    "measure_speed",
    "method_info",
    "model_bytes",
    "normalize_answer",
    "parse_choice",
    "parse_task_spec",
    "perplexity",
    "perplexity_of_ids",
    "read_task_file",
    "run_caption",
    "run_mc",
    "run_ppl",
    "run_task",
    "run_vqa",
    "save_results",
    "speed_sweep",
    "tokenize_caption",
    "vqa_accuracy",
]
