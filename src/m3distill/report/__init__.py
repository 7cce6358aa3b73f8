"""The evaluation report: a typed :class:`Report`, written as report.json (the numbers), report.md (tables) and plots.

:func:`write_report` writes all three for a fresh evaluation; :func:`render_report` redraws report.md and the
plots from an existing report.json (``m3distill report DIR``). The schema is documented in
:mod:`m3distill.report.schema`. Every file is written atomically, report.json last, so its presence marks a
complete report. Importing this package neither imports pyplot nor changes matplotlib's backend.
"""

from __future__ import annotations

import json
import logging
from contextlib import ExitStack
from pathlib import Path

from m3distill.atomic import write_json_atomic, write_text_atomic
from m3distill.layout import REPORT_JSON_FILE, REPORT_MD_FILE
from m3distill.locks import hold_outputs, hold_run_dir
from m3distill.report.schema import (
    REPORT_SCHEMA_VERSION,
    AlignmentPairsInfo,
    DatasetSummary,
    DeviceInfo,
    HnswSettings,
    ModelReport,
    PairReport,
    RealQuestionsInfo,
    Report,
    RetrievalSettings,
    SpeedPolicy,
    find_report_dir,
    is_complete_report,
    load_report,
    report_from_json_dict,
    variant_label,
)

logger = logging.getLogger(__name__)

__all__ = [
    "REPORT_SCHEMA_VERSION",
    "AlignmentPairsInfo",
    "DatasetSummary",
    "DeviceInfo",
    "HnswSettings",
    "ModelReport",
    "PairReport",
    "RealQuestionsInfo",
    "Report",
    "RetrievalSettings",
    "SpeedPolicy",
    "find_report_dir",
    "is_complete_report",
    "load_report",
    "render_report",
    "report_from_json_dict",
    "variant_label",
    "write_report",
]


def write_report(report: Report, report_dir: str | Path) -> Path:
    """Write report.md, the plots and (last) report.json for ``report`` into ``report_dir``.

    Returns the path of report.md.
    """
    report_dir = Path(report_dir)
    content = report.to_json_dict()
    # Render what report.json will hold, read back, so a later render_report gives the same files.
    markdown = _render_files(report_from_json_dict(json.loads(json.dumps(content, sort_keys=True))), report_dir)
    write_json_atomic(report_dir / REPORT_JSON_FILE, content)
    return markdown


def render_report(report_dir: str | Path) -> Path:
    """Re-render report.md and the plots from ``report_dir``'s report.json alone; returns report.md's path.

    Args:
        report_dir: a report directory, or a run directory whose ``report/`` holds one.
    """
    given, report_dir = Path(report_dir), find_report_dir(report_dir)
    # The report's own lock (evaluate writes it too), and the run directory's when given one, as every command
    # writing into a run directory holds it.
    with ExitStack() as locks:
        if report_dir != given:
            locks.enter_context(hold_run_dir(given, doing="report"))
        locks.enter_context(hold_outputs([report_dir], doing="report"))
        return _render_files(load_report(report_dir), report_dir)


def _render_files(report: Report, report_dir: Path) -> Path:
    # Imported here so reading a report (is_complete_report, load_report) does not pull in matplotlib.
    from m3distill.report.markdown import render_markdown
    from m3distill.report.plots import write_plots

    plots = write_plots(report, report_dir)
    target = report_dir / REPORT_MD_FILE
    write_text_atomic(target, render_markdown(report, plots))
    logger.debug("wrote %s and %d plots", target, len(plots))
    return target
