"""Report plots, each a pure function of plain data returning PNG bytes.

Figures are drawn on matplotlib's Agg canvas directly (no pyplot, so no global backend state).
"""

from __future__ import annotations

import io
import math
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


def _nan(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) else math.nan


def quality_vs_bits(points: Sequence[dict[str, Any]], metrics: Sequence[str]) -> bytes | None:
    """One panel per metric: metric vs average bits, one series per method.

    ``points``: [{"method": label, "avg_bits": float, "metrics": {name: value}}]. None when no point
    has both bits and a metric.
    """
    panels = [m for m in metrics if any(p["avg_bits"] is not None and m in p["metrics"] for p in points)]
    if not panels:
        return None
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(4.2 * cols, 3.2 * rows))
    for i, metric in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        series: dict[str, list[tuple[float, float]]] = defaultdict(list)
        for p in points:
            if p["avg_bits"] is not None and metric in p["metrics"]:
                series[p["method"]].append((float(p["avg_bits"]), _nan(p["metrics"][metric])))
        for method, xy in sorted(series.items()):
            xy.sort()
            ax.plot([x for x, _ in xy], [y for _, y in xy], marker="o", label=method)
        ax.set_xlabel("average bits per weight")
        ax.set_title(metric, fontsize=9)
        if metric.endswith(" ppl"):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _png(fig)


def attention_density(layers: Sequence[dict[str, Any]], title: str = "") -> bytes | None:
    """Attention density per decoder layer (all / image-token / text-token rows) and mass on image tokens."""
    if not layers:
        return None
    fig = Figure(figsize=(7, 3.4))
    ax = fig.add_subplot(1, 1, 1)
    idx = [row.get("layer", i) for i, row in enumerate(layers)]
    curves = (
        ("density", "density, all rows", "-"),
        ("density_image_rows", "density, image-token rows", "-"),
        ("density_text_rows", "density, text-token rows", "-"),
        ("image_mass", "attention mass on image tokens", "--"),
    )
    for key, label, style in curves:
        values = [_nan(row.get(key)) for row in layers]
        if any(not math.isnan(v) for v in values):
            ax.plot(idx, values, style, marker="o", markersize=3, label=label)
    ax.set_xlabel("decoder layer")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("fraction")
    ax.set_ylim(0, 1)
    ax.set_title(title or "attention density per layer", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _png(fig)


def layer_bits_ranks(layers: Sequence[dict[str, Any]], title: str = "") -> bytes | None:
    """Bits of every linear by block (and the block mean); ranks of low-rank layers; error per layer."""
    if not layers:
        return None
    ranked = [row for row in layers if row.get("rank") is not None]
    with_error = [row for row in layers if isinstance(row.get("error"), (int, float))]
    panels = 1 + bool(ranked) + bool(with_error)
    fig = Figure(figsize=(7, 2.6 * panels))
    ax = fig.add_subplot(panels, 1, 1)
    by_block: dict[int, list[float]] = defaultdict(list)
    for row in layers:
        by_block[int(row.get("block", 0))].append(_nan(row.get("bits")))
    ax.scatter(
        [int(r.get("block", 0)) for r in layers],
        [_nan(r.get("bits")) for r in layers],
        s=12,
        alpha=0.5,
        label="each linear",
    )
    blocks = sorted(by_block)
    ax.plot(blocks, [sum(by_block[b]) / len(by_block[b]) for b in blocks], marker="o", color="C1", label="block mean")
    ax.set_ylabel("bits")
    ax.set_title(title or "bits and ranks per layer", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    panel = 2
    for rows, key, label in ((ranked, "rank", "rank"), (with_error, "error", "relative output error")):
        if not rows:
            continue
        axp = fig.add_subplot(panels, 1, panel, sharex=ax)
        names = sorted({str(r.get("name", "")).rsplit(".", 1)[-1] for r in rows})
        for name in names:
            sel = [r for r in rows if str(r.get("name", "")).rsplit(".", 1)[-1] == name]
            axp.plot(
                [int(r.get("block", 0)) for r in sel], [_nan(r[key]) for r in sel], marker="o", markersize=3, label=name
            )
        if key == "error" and all(_nan(r[key]) > 0 for r in rows):
            axp.set_yscale("log")
        axp.set_ylabel(label)
        axp.grid(alpha=0.3)
        axp.legend(fontsize=6, ncol=4)
        panel += 1
    fig.axes[-1].set_xlabel("decoder block")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return _png(fig)
