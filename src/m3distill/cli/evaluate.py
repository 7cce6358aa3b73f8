"""`m3distill evaluate` (measure teacher and students, write the report) and `m3distill report` (re-render it)."""

from __future__ import annotations

import argparse

from m3distill.cli._common import add_config_argument, resolve_config, show_progress
from m3distill.cli._flags import add_config_flags
from m3distill.layout import REPORT_MD_FILE


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="measure the teacher and students: alignment, Qdrant top-k overlap, ground truth, speed",
        description="Evaluate the teacher and its students on a dataset's test split and write report.json, "
        "report.md and plots. Paths default to the run directory of --config.",
    )
    parser.add_argument("--data", metavar="DIR", help="dataset directory (default: RUN_DIR/dataset)")
    parser.add_argument("--students", metavar="DIR", nargs="+",
                        help="student folders (default: the finished students in RUN_DIR/students; unfinished ones "
                        "are skipped and named)")
    parser.add_argument("--cache", metavar="DIR",
                        help="teacher cache whose embeddings stand in for encoding with the teacher, when the same "
                        "teacher made it (default: RUN_DIR/teacher_cache)")
    parser.add_argument("--out", metavar="DIR", help="report directory (default: RUN_DIR/report)")
    add_config_argument(parser)
    add_config_flags(parser, "run_dir", "teacher.model", "evaluation")
    parser.set_defaults(handler=run_evaluate)

    report = subparsers.add_parser(
        "report",
        help="re-render report.md and the plots from report.json",
        description="Re-render report.md and the plots of a finished evaluation from its report.json.",
    )
    report.add_argument("path", metavar="RUN_DIR_OR_REPORT_DIR", help="a run directory or its report/ directory")
    report.set_defaults(handler=run_report)


def run_evaluate(args: argparse.Namespace) -> int:
    """Handler: resolve the config, run the evaluate stage through the API, print the one-line summary."""
    import m3distill
    from m3distill.metrics import mrr_metric, overlap_metric

    result = m3distill.evaluate(resolve_config(args), students=args.students, dataset_dir=args.data,
                                cache_dir=args.cache, out_dir=args.out, show_progress=show_progress(args))
    report = result.report
    k, index = report.quality_k, report.retrieval.indexes[0]
    overlaps = report.overlap_with_teacher(overlap_metric(index, k))
    against_teacher = ", ".join(f"{model.name} {overlaps[model.name]:.2f}" for model in report.students)
    mrr = ", ".join(f"{model.name} {model.metrics[mrr_metric(index)]:.2f}" for model in report.models)
    print(f"evaluated {len(report.models)} models on {report.retrieval.n_questions} questions and "
          f"{report.retrieval.n_contexts} contexts in {report.duration_s:.0f} s; "
          + (f"P@{k} vs teacher: {against_teacher}; " if against_teacher else "")
          + f"MRR@10: {mrr}; report: {result.report_dir / REPORT_MD_FILE}")
    return 0


def run_report(args: argparse.Namespace) -> int:
    from m3distill.report import render_report

    print(f"report: {render_report(args.path)}")
    return 0

