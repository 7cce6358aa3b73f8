"""The report's PNG plots (matplotlib, Agg backend), drawn from report.json alone.

* ``p_at_k.png``: P@k overlap against k, one line per model pair (exact search; HNSW dashed when measured).
* ``quality_vs_speed.png``: P@10 overlap with the teacher and MRR@10 against speed-up over the teacher.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

from m3distill.atomic import atomic_path  # noqa: E402
from m3distill.evaluation.retrieval import mrr_metric, overlap_metric  # noqa: E402
from m3distill.evaluation.speed import SPEEDUP  # noqa: E402

P_AT_K_PLOT = "p_at_k.png"
QUALITY_VS_SPEED_PLOT = "quality_vs_speed.png"
_DPI = 120
_QUALITY_K = 10


def write_plots(report: dict[str, Any], report_dir: str | Path) -> dict[str, str]:
    """Draw every plot into ``report_dir``; returns {title: file name} for report.md."""
    report_dir = Path(report_dir)
    written = {}
    if report["pairs"]:
        _save(_p_at_k_figure(report), report_dir / P_AT_K_PLOT)
        written["P@k overlap against k for each model pair"] = P_AT_K_PLOT
    _save(_quality_vs_speed_figure(report), report_dir / QUALITY_VS_SPEED_PLOT)
    written["Quality against speed-up over the teacher"] = QUALITY_VS_SPEED_PLOT
    return written


def quality_k(report: dict[str, Any]) -> int:
    """The k of the quality plot's overlap axis: 10 when measured, else the smallest k."""
    ks = report["retrieval"]["k"]
    return _QUALITY_K if _QUALITY_K in ks else min(ks)


def _p_at_k_figure(report: dict[str, Any]):
    ks = report["retrieval"]["k"]
    indexes = report["retrieval"]["indexes"]
    figure, axes = plt.subplots(figsize=(7.5, 4.8))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for number, pair in enumerate(report["pairs"]):
        color = colors[number % len(colors)]
        for index, style in (("exact", "-"), ("hnsw", "--")):
            if index not in indexes:
                continue
            values = [pair["metrics"][overlap_metric(index, k)] for k in ks]
            # One legend entry per pair (its colour); the line style is explained in the title.
            label = f"{pair['a']} vs {pair['b']}" if index == indexes[0] else None
            axes.plot(ks, values, style, marker="o" if index == "exact" else "x", color=color, label=label)
    axes.set_xlabel("k (top-k contexts per question)")
    axes.set_ylabel("P@k overlap")
    axes.set_xticks(ks)
    axes.set_ylim(0, 1.02)
    axes.grid(True, alpha=0.3)
    search = "exact search" if indexes == ["exact"] else "exact (solid) and HNSW (dashed) search"
    axes.set_title(f"Top-k overlap between models, Qdrant {search}")
    axes.legend(fontsize="small", loc="lower right")
    figure.tight_layout()
    return figure


def _quality_vs_speed_figure(report: dict[str, Any]):
    index = report["retrieval"]["indexes"][0]
    k = quality_k(report)
    teacher = next(model["name"] for model in report["models"] if model["role"] == "teacher")
    overlap_with_teacher = {teacher: 1.0}
    for pair in report["pairs"]:
        if teacher in (pair["a"], pair["b"]):
            other = pair["b"] if pair["a"] == teacher else pair["a"]
            overlap_with_teacher[other] = pair["metrics"][overlap_metric(index, k)]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4.2))
    panels = (
        (left, lambda model: overlap_with_teacher.get(model["name"]), f"P@{k} overlap with the teacher"),
        (right, lambda model: model["metrics"].get(mrr_metric(index)), "MRR@10 (own context relevant)"),
    )
    for axes, value_of, ylabel in panels:
        for model in report["models"]:
            x, y = model["metrics"].get(SPEEDUP), value_of(model)
            if x is None or y is None:
                continue
            marker = "s" if model["role"] == "teacher" else "o"
            axes.scatter([x], [y], marker=marker, s=50, zorder=3)
            axes.annotate(model["name"], (x, y), textcoords="offset points", xytext=(6, 4), fontsize="small")
        axes.set_xlabel("speed-up over the teacher (texts/s ratio)")
        axes.set_ylabel(ylabel)
        axes.set_ylim(0, 1.05)
        axes.grid(True, alpha=0.3)
        left_limit, right_limit = axes.get_xlim()
        axes.set_xlim(min(0.9, left_limit), right_limit * 1.15)
    figure.suptitle(f"Quality against speed ({'exact' if index == 'exact' else 'HNSW'} search)")
    figure.tight_layout()
    return figure


def _save(figure, target: Path) -> None:
    try:
        with atomic_path(target) as tmp:
            figure.savefig(tmp, dpi=_DPI, format="png", metadata={"Software": None})
    finally:
        plt.close(figure)
