"""`m3distill demo` and `m3distill run CONFIG`: every stage in one command, resumable."""

from __future__ import annotations

import argparse
import sys
import time

from m3distill.cli._common import show_progress
from m3distill.cli._flags import add_config_flags, flag_value
from m3distill.config import load_config
from m3distill.layout import REPORT_MD_FILE
from m3distill.pipeline import (
    ALL_STAGES,
    PipelineResult,
    demo_config,
    run_config_file,
    run_pipeline,
)
from m3distill.stages import stage_names

_STAGE_TITLES = {
    "synth": "synthetic dataset (contexts + questions)",
    "teacher": "teacher embedding cache",
    "train": "distilling students",
    "export": "ONNX and int8 export of the students",
    "evaluate": "evaluation and report",
}


def register(subparsers: argparse._SubParsersAction) -> None:
    demo = subparsers.add_parser(
        "demo",
        help="run the whole pipeline offline on the bundled sample corpus with the packaged MiniLM teacher",
        description="Offline end-to-end run: the bundled 16-language sample corpus -> pseudo-questions -> teacher "
        "cache -> 3-, 2- and 1-layer students of the packaged all-MiniLM-L6-v2 teacher -> evaluation -> report. "
        "A rerun resumes where the last one stopped.",
    )
    demo.add_argument("--out", default="m3distill-demo", metavar="DIR", help="run directory (default: %(default)s)")
    demo.add_argument("--m3", action="store_true",
                      help="use the M3 test teacher (MiniLM + seeded bge-m3 sparse and ColBERT heads): the students "
                      "keep and train both heads and the report covers dense, sparse, ColBERT and hybrid search")
    _add_force(demo)
    demo.set_defaults(handler=_demo)

    run = subparsers.add_parser(
        "run",
        help="run every stage from one config file (see configs/bge-m3.yaml)",
        description="Run synth, teacher, train, export (when export.enabled) and evaluate from one YAML config. "
        "A stage whose outputs are "
        "complete and made with the same settings is skipped; a changed setting or --force redoes it and "
        "every later stage.",
    )
    run.add_argument("config", metavar="CONFIG.yaml", help="the run's config file")
    add_config_flags(run, "run_dir", default_notes={"run_dir": "the config file's run_dir"})
    _add_force(run)
    run.set_defaults(handler=_run)


def _add_force(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--force", action="append", default=[], metavar="STAGE", choices=[*ALL_STAGES, "all"],
        help=f"redo STAGE ({', '.join(ALL_STAGES)} or all) and every stage after it; repeatable (export only "
        "when the config enables it)",
    )


def _progress_printer(quiet: bool, stages: tuple[str, ...]):
    """Prints "[n/N] stage ..." lines; ``stages`` are the run's stages (:func:`m3distill.stages.stage_names`)."""
    started: dict[str, float] = {}

    def on_stage(stage: str, event: str) -> None:
        if quiet:
            return
        number = stages.index(stage) + 1
        title = _STAGE_TITLES[stage]
        if event == "start":
            started[stage] = time.perf_counter()
            print(f"[{number}/{len(stages)}] {title} ...", file=sys.stderr, flush=True)
        elif event == "skip":
            print(f"[{number}/{len(stages)}] {title}: up to date, skipped", file=sys.stderr, flush=True)
        else:
            print(f"[{number}/{len(stages)}] {title}: done in {time.perf_counter() - started[stage]:.1f} s",
                  file=sys.stderr, flush=True)

    return on_stage


def _finish(result: PipelineResult, seconds: float) -> int:
    ran = [stage for stage, info in result.stages.items() if info.status == "ran"]
    print(f"finished in {seconds:.1f} s (ran: {', '.join(ran) or 'nothing, all up to date'})")
    print(f"report: {result.report_dir / REPORT_MD_FILE}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    config = demo_config(args.out, m3=args.m3)
    result = run_pipeline(config, force=args.force, show_progress=show_progress(args),
                          on_stage=_progress_printer(args.quiet, stage_names(config)))
    return _finish(result, time.perf_counter() - started)


def _run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    stages = stage_names(load_config(args.config))
    result = run_config_file(args.config, force=args.force, run_dir=flag_value(args, "run_dir"),
                             show_progress=show_progress(args), on_stage=_progress_printer(args.quiet, stages))
    return _finish(result, time.perf_counter() - started)
