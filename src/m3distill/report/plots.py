"""The report's PNG plots, drawn from the :class:`~m3distill.report.schema.Report` alone.

* ``p_at_k.png``: P@k overlap against k, one line per model pair (exact search; HNSW dashed when measured).
* ``p_at_k_{output}.png`` (M3 teachers): the same for retrieval by the sparse, ColBERT and hybrid outputs, one
  line per pair of models that both have the output.
* ``quality_vs_speed.png``: P@10 overlap with the teacher and MRR@10 against speed-up over the teacher, with
  the speed-up's min-max as horizontal error bars.

Figures are plain ``matplotlib.figure.Figure`` objects printed by an Agg canvas of their own: pyplot is never
imported, so neither importing this module nor drawing changes the backend of a program that uses m3distill.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib as mpl
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from m3distill.atomic import atomic_path
from m3distill.metrics import (
    SPEEDUP,
    SPEEDUP_MAX,
    SPEEDUP_MIN,
    mrr_metric,
    output_prefix,
    overlap_metric,
)
from m3distill.report.schema import PairReport, Report

P_AT_K_PLOT = "p_at_k.png"
QUALITY_VS_SPEED_PLOT = "quality_vs_speed.png"
_DPI = 120
_OUTPUT_NAMES = {"sparse": "sparse lexical weights", "colbert": "ColBERT multi-vector", "hybrid": "hybrid"}


def output_p_at_k_plot(output: str) -> str:
    """File name of the P@k plot of an M3 output (``sparse``, ``colbert`` or ``hybrid``)."""
    return f"p_at_k_{output_prefix(output)}.png"


def write_plots(report: Report, report_dir: str | Path) -> dict[str, str]:
    """Draw every plot into ``report_dir``; returns {title: file name} for report.md."""
    report_dir = Path(report_dir)
    written = {}
    if report.pairs:
        _save(_p_at_k_figure(report), report_dir / P_AT_K_PLOT)
        written["P@k overlap against k for each model pair"] = P_AT_K_PLOT
    for output in report.retrieval.outputs:
        if output == "dense":
            continue
        pairs = [pair for pair in report.pairs if overlap_metric(output_prefix(output), report.retrieval.k[0])
                 in pair.metrics]
        if pairs:
            _save(_output_p_at_k_figure(report, output, pairs), report_dir / output_p_at_k_plot(output))
            written[f"P@k overlap against k for each model pair ({_OUTPUT_NAMES[output]})"] = output_p_at_k_plot(output)
    _save(_quality_vs_speed_figure(report), report_dir / QUALITY_VS_SPEED_PLOT)
    written["Quality against speed-up over the teacher"] = QUALITY_VS_SPEED_PLOT
    return written


def _new_figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height))
    FigureCanvasAgg(figure)  # attaches itself as figure.canvas
    return figure


def _p_at_k_figure(report: Report) -> Figure:
    ks = report.retrieval.k
    indexes = report.retrieval.indexes
    figure = _new_figure(7.5, 4.8)
    axes = figure.subplots()
    colors = mpl.rcParams["axes.prop_cycle"].by_key()["color"]
    for number, pair in enumerate(report.pairs):
        color = colors[number % len(colors)]
        for index, style in (("exact", "-"), ("hnsw", "--")):
            if index not in indexes:
                continue
            values = [pair.metrics[overlap_metric(index, k)] for k in ks]
            # One legend entry per pair (its colour); the line style is explained in the title.
            label = f"{pair.a} vs {pair.b}" if index == indexes[0] else None
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


def _output_p_at_k_figure(report: Report, output: str, pairs: list[PairReport]) -> Figure:
    ks = report.retrieval.k
    figure = _new_figure(7.5, 4.8)
    axes = figure.subplots()
    colors = mpl.rcParams["axes.prop_cycle"].by_key()["color"]
    for number, pair in enumerate(pairs):
        values = [pair.metrics[overlap_metric(output_prefix(output), k)] for k in ks]
        axes.plot(ks, values, "-", marker="o", color=colors[number % len(colors)], label=f"{pair.a} vs {pair.b}")
    axes.set_xlabel("k (top-k contexts per question)")
    axes.set_ylabel("P@k overlap")
    axes.set_xticks(ks)
    axes.set_ylim(0, 1.02)
    axes.grid(True, alpha=0.3)
    axes.set_title(f"Top-k overlap between models, {_OUTPUT_NAMES[output]}, Qdrant exact search")
    axes.legend(fontsize="small", loc="lower right")
    figure.tight_layout()
    return figure


def _quality_vs_speed_figure(report: Report) -> Figure:
    index = report.retrieval.indexes[0]
    k = report.quality_k
    overlap_with_teacher = report.overlap_with_teacher(overlap_metric(index, k))
    figure = _new_figure(10, 4.2)
    left, right = figure.subplots(1, 2)
    panels = (
        (left, lambda model: overlap_with_teacher.get(model.name), f"P@{k} overlap with the teacher"),
        (right, lambda model: model.metrics.get(mrr_metric(index)), "MRR@10 (own context relevant)"),
    )
    for axes, value_of, ylabel in panels:
        for model in report.models:
            x, y = model.metrics.get(SPEEDUP), value_of(model)
            if x is None or y is None:
                continue
            low, high = model.metrics.get(SPEEDUP_MIN), model.metrics.get(SPEEDUP_MAX)
            # Clamped: a hand-edited report.json may put the median outside its own min-max.
            spread = [[max(0.0, x - low)], [max(0.0, high - x)]] if low is not None and high is not None else None
            marker = "s" if model.role == "teacher" else "o"
            axes.errorbar([x], [y], xerr=spread, fmt=marker, markersize=7, capsize=3, zorder=3)
            axes.annotate(model.name, (x, y), textcoords="offset points", xytext=(6, 4), fontsize="small")
        axes.set_xlabel("speed-up over the teacher (texts/s ratio; bars: min-max over repeats)")
        axes.set_ylabel(ylabel)
        axes.set_ylim(0, 1.05)
        axes.grid(True, alpha=0.3)
        left_limit, right_limit = axes.get_xlim()
        axes.set_xlim(min(0.9, left_limit), right_limit * 1.15)
    figure.suptitle(f"Quality against speed ({'exact' if index == 'exact' else 'HNSW'} search)")
    figure.tight_layout()
    return figure


def _save(figure: Figure, target: Path) -> None:
    with atomic_path(target) as tmp:
        figure.savefig(tmp, dpi=_DPI, format="png", metadata={"Software": None})
