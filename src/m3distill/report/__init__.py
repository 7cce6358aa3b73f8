"""The evaluation report: report.json (the numbers), report.md (tables) and PNG plots.

:func:`write_report` writes all three for a fresh evaluation; :func:`render_report` redraws report.md and the
plots from an existing report.json (``m3distill report DIR``). The schema is documented in
:mod:`m3distill.report.schema`. Every file is written atomically, report.json last, so its presence marks a
complete report.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from m3distill.atomic import write_json_atomic, write_text_atomic
from m3distill.layout import REPORT_JSON_FILE, REPORT_MD_FILE
from m3distill.report.schema import REPORT_SCHEMA_VERSION, find_report_dir, is_complete_report, load_report

logger = logging.getLogger(__name__)

__all__ = [
    "REPORT_SCHEMA_VERSION",
    "find_report_dir",
    "is_complete_report",
    "load_report",
    "render_report",
    "write_report",
]


def write_report(report: dict[str, Any], report_dir: str | Path) -> Path:
    """Write report.md, the plots and (last) report.json for ``report`` into ``report_dir``.

    Returns the path of report.md.
    """
    report_dir = Path(report_dir)
    # Render what report.json will hold (sorted keys, JSON types), so a later render_report gives the same files.
    markdown = _render_files(json.loads(json.dumps(report, sort_keys=True, default=str)), report_dir)
    write_json_atomic(report_dir / REPORT_JSON_FILE, report)
    return markdown


def render_report(report_dir: str | Path) -> Path:
    """Re-render report.md and the plots from ``report_dir``'s report.json alone; returns report.md's path.

    Args:
        report_dir: a report directory, or a run directory whose ``report/`` holds one.
    """
    report_dir = find_report_dir(report_dir)
    return _render_files(load_report(report_dir), report_dir)


def _render_files(report: dict[str, Any], report_dir: Path) -> Path:
    # Imported here so reading a report (is_complete_report, load_report) does not pull in matplotlib.
    from m3distill.report.markdown import render_markdown
    from m3distill.report.plots import write_plots

    plots = write_plots(report, report_dir)
    target = report_dir / REPORT_MD_FILE
    write_text_atomic(target, render_markdown(report, plots))
    logger.info("wrote %s and %d plots", target, len(plots))
    return target
