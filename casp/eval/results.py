"""The results JSON that every ``casp eval`` run writes, and that ``casp report`` reads.

    {
      "casp_version": "0.1.0",
      "schema_version": 1,
      "model": "path/to/model_or_casp_dir",
      "method": {"method": "casp" | "none" | ..., "quantizer": "gptq" | null, "avg_bits": 2.1, "label": ".."},
      "tasks": {"vqa:gqa.jsonl": {...task result...}, "ppl:wiki.txt": {...}},
      "timing": {"load_s": .., "total_s": .., ...},
      "speed": {...}                      (optional, from casp.eval.speed)
    }

The method block is read from the checkpoint's ``quantization_config`` (config.json) when present.
A file of another schema version, or a malformed one, raises EvalError naming the file.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from casp import __version__
from casp.eval.errors import EvalError

SCHEMA_VERSION = 1
_REQUIRED = {"model": str, "method": dict, "tasks": dict, "timing": dict}
_BITS_KEYS = ("avg_bits", "average_bits", "bits_per_weight", "target_bits", "bits")
_DTYPE_BITS = {"float32": 32, "float16": 16, "bfloat16": 16, "float64": 64}


def _quantizer_name(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("method") or value.get("name")
    return str(value) if value else None


def method_info(model_path: str | Path | None) -> dict[str, Any]:
    """Compression method of a model directory, from config.json's quantization_config.

    Without a quantization_config the model is uncompressed: method "none" and avg_bits from its dtype.
    """
    config_file = Path(model_path) / "config.json" if model_path is not None else None
    if config_file is None or not config_file.is_file():
        return {"method": "unknown", "quantizer": None, "avg_bits": None, "label": "unknown"}
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError:
        return {"method": "unknown", "quantizer": None, "avg_bits": None, "label": "unknown"}
    qc = config.get("quantization_config")
    if not isinstance(qc, dict):
        dtype = str(config.get("dtype") or config.get("torch_dtype") or "float32")
        bits = _DTYPE_BITS.get(dtype)
        return {"method": "none", "quantizer": None, "avg_bits": bits, "dtype": dtype, "label": dtype}
    quantizer = _quantizer_name(qc.get("quantizer"))
    method = str(qc.get("method") or qc.get("recipe") or qc.get("quant_method") or quantizer or "unknown")
    bits = next((qc[k] for k in _BITS_KEYS if isinstance(qc.get(k), (int, float))), None)
    label = " ".join(str(x) for x in (method, quantizer if quantizer != method else None) if x)
    if bits is not None:
        label += f" {bits:.2f}b"
    info = {"method": method, "quantizer": quantizer, "avg_bits": bits, "label": label}
    for key in ("quant_method", "lowrank", "allocation", "kv_cache", "group_size"):
        if key in qc:
            info[key] = qc[key]
    return info


def make_results(
    model: str | Path,
    tasks: dict[str, dict[str, Any]],
    timing: dict[str, float] | None = None,
    method: dict[str, Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """A results dict in the current schema (method read from the model dir unless given)."""
    results = {
        "casp_version": __version__,
        "schema_version": SCHEMA_VERSION,
        "model": str(model),
        "method": method if method is not None else method_info(model),
        "tasks": tasks,
        "timing": timing or {},
        **extra,
    }
    validate_results(results)
    return results


def validate_results(obj: Any, source: str = "results") -> dict[str, Any]:
    """Check a results object against the schema; raise EvalError naming ``source`` otherwise."""
    if not isinstance(obj, dict):
        raise EvalError(f"{source}: expected a JSON object, got {type(obj).__name__}")
    if "schema_version" not in obj:
        raise EvalError(f"{source}: not a casp results file (no 'schema_version'); write it with 'casp eval'")
    version = obj["schema_version"]
    if version != SCHEMA_VERSION:
        raise EvalError(
            f"{source}: results schema_version {version!r} is not supported by this casp (reads {SCHEMA_VERSION}); "
            "re-run 'casp eval' or use the casp version that wrote it "
            f"({obj.get('casp_version', 'unknown')})"
        )
    for key, kind in _REQUIRED.items():
        if not isinstance(obj.get(key), kind):
            raise EvalError(f"{source}: field {key!r} must be a {kind.__name__}; the file is malformed")
    for name, task in obj["tasks"].items():
        if not isinstance(task, dict):
            raise EvalError(f"{source}: task {name!r} must be an object; the file is malformed")
    return obj


def save_results(results: dict[str, Any], path: str | Path) -> Path:
    """Validate and write results as indented JSON (atomically: a crash never leaves half a file)."""
    path = Path(path)
    validate_results(results, str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)
    return path


def load_results(path: str | Path) -> dict[str, Any]:
    """Read and validate a results file; EvalError for a missing, malformed or incompatible file."""
    path = Path(path)
    if not path.is_file():
        raise EvalError(f"{path}: results file not found")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise EvalError(f"{path}: not valid JSON ({err}); is it a casp results file?") from None
    return validate_results(obj, str(path))
