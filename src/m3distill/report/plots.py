"""The report's PNG plots, drawn from the :class:`~m3distill.report.schema.Report` alone.

* ``p_at_k.png``: P@k overlap against k, one line per pair of torch models (exact search; HNSW dashed when
  measured); the ONNX variants' pairs are in report.md, their lines would hide the students' under them.
* ``p_at_k_{output}.png`` (M3 teachers): the same for retrieval by the sparse, ColBERT and hybrid outputs, one
  line per pair of models that both have the output.
* ``quality_vs_speed.png``: P@10 overlap with the teacher and MRR@10 against speed-up over the teacher, with
  the speed-up's min-max as horizontal error bars; a student and its ONNX variants share a colour and a thin line,
  the marker says what ran it (legend).

Figures are plain ``matplotlib.figure.Figure`` objects printed by an Agg canvas of their own: pyplot is never
imported, so neither importing this module nor drawing changes the backend of a program that uses m3distill.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib as mpl
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from m3distill.atomic import atomic_path
from m3distill.layout import P_AT_K_PLOT, QUALITY_VS_SPEED_PLOT
from m3distill.metrics import (
    SPEEDUP,
    SPEEDUP_MAX,
    SPEEDUP_MIN,
    mrr_metric,
    output_prefix,
    overlap_metric,
)
from m3distill.report.schema import TORCH_TITLE, ModelReport, PairReport, Report, variant_title

_DPI = 120
_OUTPUT_NAMES = {"sparse": "sparse lexical weights", "colbert": "ColBERT multi-vector", "hybrid": "hybrid"}
# Markers by what ran a model: the teacher, a torch student, and each ONNX variant (others: a diamond).
_TEACHER_MARKER, _STUDENT_MARKER, _OTHER_VARIANT_MARKER = "s", "o", "D"
_VARIANT_MARKERS = {"onnx": "^", "int8": "v"}


def output_p_at_k_plot(output: str) -> str:
    """File name of the P@k plot of an M3 output (``sparse``, ``colbert`` or ``hybrid``)."""
    return f"p_at_k_{output_prefix(output)}.png"


def write_plots(report: Report, report_dir: str | Path) -> dict[str, str]:
    """Draw every plot into ``report_dir``; returns {title: file name} for report.md."""
    report_dir = Path(report_dir)
    written = {}
    if _torch_pairs(report):
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
    for number, pair in enumerate(_torch_pairs(report)):
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


def _torch_pairs(report: Report) -> list[PairReport]:
    """The pairs of models run by torch (no ONNX variant in them)."""
    variants = {model.name for model in report.models if model.is_variant}
    return [pair for pair in report.pairs if pair.a not in variants and pair.b not in variants]


def _marker(model: ModelReport) -> str:
    if model.is_variant:
        return _VARIANT_MARKERS.get(model.variant, _OTHER_VARIANT_MARKER)
    return _TEACHER_MARKER if model.role == "teacher" else _STUDENT_MARKER


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
    colors = mpl.rcParams["axes.prop_cycle"].by_key()["color"]
    # A student and its variants share a colour: the family is what the reader follows across the plot.
    families = list(dict.fromkeys(model.variant_of or model.name for model in report.models))
    color_of = {name: colors[number % len(colors)] for number, name in enumerate(families)}
    for axes, value_of, ylabel in panels:
        points: dict[str, list[tuple[float, float]]] = {}
        for model in report.models:
            x, y = model.metrics.get(SPEEDUP), value_of(model)
            if x is None or y is None:
                continue
            family = model.variant_of or model.name
            points.setdefault(family, []).append((x, y))
            low, high = model.metrics.get(SPEEDUP_MIN), model.metrics.get(SPEEDUP_MAX)
            # Clamped: a hand-edited report.json may put the median outside its own min-max.
            spread = [[max(0.0, x - low)], [max(0.0, high - x)]] if low is not None and high is not None else None
            axes.errorbar([x], [y], xerr=spread, fmt=_marker(model), markersize=7, capsize=3, zorder=3,
                          color=color_of[family])
            # A variant is told by its marker and its student's colour (legend); names beside it would pile up.
            if not model.is_variant:
                axes.annotate(model.name, (x, y), textcoords="offset points", xytext=(6, 4), fontsize="small")
        for family, family_points in points.items():
            if len(family_points) > 1:
                xs, ys = zip(*family_points)
                axes.plot(xs, ys, "-", color=color_of[family], linewidth=0.8, alpha=0.5, zorder=2)
        axes.set_xlabel("speed-up over the teacher (texts/s ratio)\nbars: min-max over repeats")
        axes.set_ylabel(ylabel)
        axes.set_ylim(0, 1.05)
        axes.grid(True, alpha=0.3)
        left_limit, right_limit = axes.get_xlim()
        axes.set_xlim(min(0.9, left_limit), right_limit * 1.15)
    legend = _legend(report, color_of)
    if legend:
        right.legend(handles=legend, fontsize="small", loc="lower right")
    figure.suptitle(f"Quality against speed ({'exact' if index == 'exact' else 'HNSW'} search)")
    figure.tight_layout()
    return figure


def _legend(report: Report, color_of: dict[str, str]) -> list[Line2D]:
    """With ONNX variants: what each marker means (what ran the model) and whose each colour is (the student
    whose export it is). Without them the names beside the points say it all."""
    variants = list(dict.fromkeys(model.variant for model in report.models if model.is_variant))
    if not variants:
        return []
    entries = [(_TEACHER_MARKER, f"teacher ({TORCH_TITLE})"), (_STUDENT_MARKER, f"student ({TORCH_TITLE})")]
    entries += [(_VARIANT_MARKERS.get(variant, _OTHER_VARIANT_MARKER), f"student ({variant_title(variant)})")
                for variant in variants]
    handles = [Line2D([], [], linestyle="none", marker=marker, color="gray", markersize=7, label=label)
               for marker, label in entries]
    exported = dict.fromkeys(model.variant_of for model in report.models if model.is_variant)
    handles += [Line2D([], [], color=color_of[name], linewidth=3, label=name) for name in exported]
    return handles


def _save(figure: Figure, target: Path) -> None:
    with atomic_path(target) as tmp:
        figure.savefig(tmp, dpi=_DPI, format="png", metadata={"Software": None})
