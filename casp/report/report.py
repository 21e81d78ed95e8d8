"""``casp report``: a set of eval runs (plus optional analysis / compression reports) -> HTML or Markdown.

Inputs, recognized by content:

* results JSON of ``casp eval`` (has "schema_version"): one table row per run, quality-vs-bits plots;
* analysis.json of ``casp analyze`` ({"layers": [{"layer", "density", "density_image_rows", ...}]}):
  attention density per layer;
* casp_report.json of ``casp compress`` ({"layers": [{"name", "block", "bits", "rank", "error"}]}):
  bits, ranks and error per layer.

analysis.json and casp_report.json lying in a run's model directory are picked up automatically.
HTML output is self-contained (plots inlined as base64 PNG); Markdown output writes the PNGs next to it.
"""

from __future__ import annotations

import base64
import html
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from casp.eval.errors import EvalError
from casp.eval.results import validate_results
from casp.report import plots

# Headline metric(s) of each task kind, in table order.
HEADLINE = {"vqa": ("vqa_accuracy", "exact_match"), "mc": ("accuracy",), "caption": ("cider",), "ppl": ("ppl",)}
SHORT = {"vqa_accuracy": "acc", "exact_match": "EM", "accuracy": "acc", "cider": "CIDEr", "ppl": "ppl"}


@dataclass
class ReportInputs:
    runs: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # (source path, results)
    analyses: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    layer_reports: list[tuple[str, dict[str, Any]]] = field(default_factory=list)


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise EvalError(f"{path}: file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise EvalError(f"{path}: not valid JSON ({err})") from None


def _kind(obj: Any) -> str | None:
    if isinstance(obj, dict) and "schema_version" in obj:
        return "results"
    layers = obj.get("layers") if isinstance(obj, dict) else None
    if isinstance(layers, list) and layers and all(isinstance(row, dict) for row in layers):
        if "bits" in layers[0]:
            return "layer_report"
        if "density" in layers[0]:
            return "analysis"
    return None


def collect_inputs(paths: list[str | Path]) -> ReportInputs:
    """Classify every input file by content; add analysis/casp_report files found in run model dirs."""
    if not paths:
        raise EvalError("report: no input files; pass results JSON files written by 'casp eval'")
    inputs = ReportInputs()
    seen: set[Path] = set()
    queue = [(Path(p), True) for p in paths]
    while queue:
        path, explicit = queue.pop(0)
        if path.resolve() in seen:
            continue
        seen.add(path.resolve())
        obj = _read_json(path)
        kind = _kind(obj)
        if kind == "results":
            res = validate_results(obj, str(path))
            inputs.runs.append((str(path), res))
            model_dir = Path(res["model"])
            queue += [
                (model_dir / name, False)
                for name in ("analysis.json", "casp_report.json")
                if (model_dir / name).is_file()
            ]
        elif kind == "analysis":
            inputs.analyses.append((str(path), obj))
        elif kind == "layer_report":
            inputs.layer_reports.append((str(path), obj))
        elif explicit:
            raise EvalError(
                f"{path}: not a casp results, analysis.json or casp_report.json file (no 'schema_version', "
                "no 'layers' with 'density' or 'bits')"
            )
    if not inputs.runs and not inputs.analyses and not inputs.layer_reports:
        raise EvalError("report: nothing to report")
    return inputs


def headline_metrics(tasks: dict[str, dict[str, Any]]) -> dict[str, float]:
    """{"vqa:gqa.jsonl acc": 0.61, "ppl:wiki.txt ppl": 9.3, ...}: files named by base name so that
    runs evaluated on the same file in different folders line up."""
    out = {}
    for spec, result in tasks.items():
        kind = result.get("task") or spec.partition(":")[0]
        name = Path(result.get("file") or spec.partition(":")[2] or spec).name
        for metric in HEADLINE.get(kind, ()):
            if isinstance(result.get(metric), (int, float)):
                out[f"{kind}:{name} {SHORT[metric]}"] = float(result[metric])
    return out


def speed_metrics(speed: Any) -> dict[str, float]:
    """Table cells of a run's "speed" block (casp eval --speed): decode tok/s at its batch, memory."""
    if not isinstance(speed, dict) or not isinstance(speed.get("decode_tokens_per_s"), (int, float)):
        return {}
    out = {f"decode tok/s (batch {speed.get('batch_size', '?')})": float(speed["decode_tokens_per_s"])}
    if isinstance(speed.get("peak_memory_bytes"), (int, float)):
        out["peak GPU GiB"] = speed["peak_memory_bytes"] / 2**30
    return out


def _run_rows(inputs: ReportInputs) -> tuple[list[str], list[str], list[dict[str, Any]]]:
    """(task metric columns, speed columns, one row per run); the quality plot takes the task columns only."""
    rows, columns, speed_columns = [], [], []
    for source, res in inputs.runs:
        metrics = headline_metrics(res["tasks"])
        columns += [c for c in metrics if c not in columns]
        speed = speed_metrics(res.get("speed"))
        speed_columns += [c for c in speed if c not in speed_columns]
        metrics.update(speed)
        method = res["method"]
        bits = method.get("avg_bits")
        rows.append(
            {
                "model": Path(res["model"]).name or res["model"],
                "source": source,
                "method": str(method.get("method", "unknown")),
                "quantizer": method.get("quantizer") or "-",
                "avg_bits": bits if isinstance(bits, (int, float)) else None,
                "series": _series(method),
                "metrics": metrics,
            }
        )
    return columns, speed_columns, rows


def _series(method: dict[str, Any]) -> str:
    """Plot series of a run: method and quantizer ("casp gptq"), bits excluded (they are the x axis)."""
    name, quantizer = method.get("method"), method.get("quantizer")
    if name == "none":
        return "uncompressed"
    return " ".join(str(x) for x in dict.fromkeys((name, quantizer)) if x) or "unknown"


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) >= 100 else f"{value:.4f}".rstrip("0").rstrip(".") or "0"
    return str(value)


def _figures(inputs: ReportInputs, columns: list[str], rows: list[dict[str, Any]]) -> list[tuple[str, str, bytes]]:
    """(file stem, caption, PNG) for every plot that has data."""
    figs = []
    points = [{"method": r["series"], "avg_bits": r["avg_bits"], "metrics": r["metrics"]} for r in rows]
    png = plots.quality_vs_bits(points, columns)
    if png:
        figs.append(("quality_vs_bits", "Quality vs average bits per weight, per method", png))
    for i, (source, obj) in enumerate(inputs.analyses):
        png = plots.attention_density(obj["layers"], title=f"attention density: {obj.get('model', source)}")
        if png:
            figs.append((f"attention_density_{i}", f"Attention density per layer ({source})", png))
    for i, (source, obj) in enumerate(inputs.layer_reports):
        png = plots.layer_bits_ranks(obj["layers"], title=f"bits / ranks per layer: {obj.get('model', source)}")
        if png:
            figs.append((f"layer_bits_{i}", f"Bits, ranks and error per layer ({source})", png))
    return figs


def _table(columns: list[str], rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    header = ["model", "method", "quantizer", "avg bits", *columns]
    body = [
        [
            r["model"],
            r["method"],
            str(r["quantizer"]),
            _fmt(r["avg_bits"]),
            *(_fmt(r["metrics"].get(c)) for c in columns),
        ]
        for r in rows
    ]
    return header, body


def _markdown(title: str, header, body, figs, out_path: Path) -> str:
    lines = [f"# {title}", ""]
    if body:
        esc = lambda s: s.replace("|", "\\|")  # noqa: E731 - a cell must not end the row early
        lines += ["| " + " | ".join(esc(h) for h in header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in body]
        lines.append("")
    for stem, caption, png in figs:
        name = f"{out_path.stem}_{stem}.png"
        (out_path.parent / name).write_bytes(png)
        lines += [f"## {caption}", "", f"![{caption}]({name})", ""]
    return "\n".join(lines)


def _html(title: str, header, body, figs) -> str:
    esc = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html><head><meta charset="utf-8">',
        f"<title>{esc(title)}</title>",
        "<style>body{font-family:sans-serif;margin:2em;max-width:1100px}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
        "td:first-child,th:first-child{text-align:left}img{max-width:100%}</style>",
        f"</head><body><h1>{esc(title)}</h1>",
    ]
    if body:
        parts.append("<table><thead><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr></thead><tbody>")
        parts += ["<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in body]
        parts.append("</tbody></table>")
    for _, caption, png in figs:
        data = base64.b64encode(png).decode("ascii")
        parts.append(f'<h2>{esc(caption)}</h2><img alt="{esc(caption)}" src="data:image/png;base64,{data}">')
    parts.append("</body></html>")
    return "\n".join(parts)


def build_report(results_paths: list[str | Path], out_path: str | Path, title: str = "casp report") -> Path:
    """Write an HTML (``.html``/``.htm``) or Markdown (``.md``) report of the given files; return its path."""
    out_path = Path(out_path)
    fmt = {".html": "html", ".htm": "html", ".md": "md", ".markdown": "md"}.get(out_path.suffix.lower())
    if fmt is None:
        raise EvalError(f"report: {out_path} must end in .html or .md")
    inputs = collect_inputs(list(results_paths))
    columns, speed_columns, rows = _run_rows(inputs)
    header, body = _table(columns + speed_columns, rows)
    figs = _figures(inputs, columns, rows)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    text = _html(title, header, body, figs) if fmt == "html" else _markdown(title, header, body, figs, out_path)
    out_path.write_text(text, encoding="utf-8")
    return out_path


__all__ = ["build_report", "collect_inputs", "headline_metrics"]
