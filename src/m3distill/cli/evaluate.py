"""`m3distill evaluate` (measure teacher and students, write the report) and `m3distill report` (re-render it)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from m3distill.cli._common import add_config_argument, resolve_config
from m3distill.errors import M3DistillError
from m3distill.layout import REPORT_MD_FILE, RunLayout

# --index hnsw measures HNSW *beside* exact search, never instead of it.
_INDEX_FLAG = {"exact": ["exact"], "hnsw": ["exact", "hnsw"]}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="measure the teacher and students: alignment, Qdrant top-k overlap, ground truth, speed",
        description="Evaluate the teacher and its students on a dataset's test split and write report.json, "
        "report.md and plots. Paths default to the run directory of --config.",
    )
    parser.add_argument("--data", metavar="DIR", help="dataset directory (default: RUN_DIR/dataset)")
    parser.add_argument("--teacher", metavar="MODEL", help="teacher folder or hub id (default: teacher.model)")
    parser.add_argument("--students", metavar="DIR", nargs="+", help="student folders (default: RUN_DIR/students/*)")
    parser.add_argument("--out", metavar="DIR", help="report directory (default: RUN_DIR/report)")
    parser.add_argument("--k", type=_k_list, metavar="K,K,...", help="top-k cut-offs, e.g. 10,20,30,40,50")
    parser.add_argument("--index", choices=("exact", "hnsw"),
                        help="exact: exact search only (default); hnsw: HNSW search too, reported beside exact")
    parser.add_argument("--qdrant-url", metavar="URL",
                        help="search on this Qdrant server/cluster instead of embedded qdrant-edge (':memory:' for "
                        "qdrant-client's local mode); API key from the env var named by evaluation.qdrant_api_key_env")
    parser.add_argument("--distractors", choices=("all", "test"), help="index all contexts (default) or test ones only")
    parser.add_argument("--device", metavar="D", help="cpu, cuda, cuda:1, mps (default: best available)")
    add_config_argument(parser)
    parser.set_defaults(handler=run_evaluate)

    report = subparsers.add_parser(
        "report",
        help="re-render report.md and the plots from report.json",
        description="Re-render report.md and the plots of a finished evaluation from its report.json.",
    )
    report.add_argument("path", metavar="RUN_DIR_OR_REPORT_DIR", help="a run directory or its report/ directory")
    report.set_defaults(handler=run_report)


def run_evaluate(args: argparse.Namespace) -> int:
    from m3distill.evaluation.evaluate import evaluate_models
    from m3distill.evaluation.retrieval import mrr_metric, overlap_metric
    from m3distill.report.plots import quality_k

    config = resolve_config(
        args,
        {
            "teacher.model": args.teacher,
            "evaluation.k": args.k,
            "evaluation.index": None if args.index is None else _INDEX_FLAG[args.index],
            "evaluation.qdrant_url": args.qdrant_url,
            "evaluation.distractors": args.distractors,
            "evaluation.device": args.device,
        },
    )
    layout = RunLayout(config.run_dir)
    students = args.students if args.students is not None else _run_students(layout)
    out_dir = Path(args.out) if args.out else layout.report
    report = evaluate_models(
        args.data or layout.dataset, config.teacher, students, config.evaluation, out_dir,
        show_progress=os.environ.get("TQDM_DISABLE") != "1",
    )
    k = quality_k(report)
    index = report["retrieval"]["indexes"][0]
    against_teacher = ", ".join(f"{pair['b']} {pair['metrics'][overlap_metric(index, k)]:.2f}"
                                for pair in report["pairs"] if pair["a"] == "teacher")
    mrr = ", ".join(f"{model['name']} {model['metrics'][mrr_metric(index)]:.2f}" for model in report["models"])
    print(f"evaluated {len(report['models'])} models on {report['retrieval']['n_questions']} questions and "
          f"{report['retrieval']['n_contexts']} contexts in {report['duration_s']:.0f} s; "
          + (f"P@{k} vs teacher: {against_teacher}; " if against_teacher else "")
          + f"MRR@10: {mrr}; report: {out_dir / REPORT_MD_FILE}")
    return 0


def run_report(args: argparse.Namespace) -> int:
    from m3distill.report import render_report

    print(f"report: {render_report(args.path)}")
    return 0


def _run_students(layout: RunLayout) -> list[Path]:
    if not layout.students.is_dir():
        raise M3DistillError(f"no students in {layout.students}: train some with `m3distill train` or pass --students")
    return sorted(path for path in layout.students.iterdir() if path.is_dir() and not path.name.startswith("."))


def _k_list(text: str) -> list[int]:
    try:
        ks = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers, e.g. 10,20,30") from None
    if not ks or any(k < 1 for k in ks):
        raise argparse.ArgumentTypeError(f"{text!r}: every k must be a positive integer")
    return ks
