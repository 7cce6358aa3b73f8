"""`m3distill teacher`: embed every dataset text with the teacher into the cache (m3distill.teacher.cache)."""

from __future__ import annotations

import argparse
import logging

from m3distill.cli._common import add_config_argument, resolve_config
from m3distill.layout import RunLayout

_DESCRIPTION = """\
Embed every text of the dataset (contexts, questions and general text of all splits) once with the teacher, in
length-sorted batches, into memory-mapped shards keyed by text hash. An interrupted run resumes where it
stopped; a rerun after the dataset grew embeds only the new texts. A cache made by another teacher is refused.
"""

_EPILOG = """\
examples:
  m3distill teacher --data runs/x/dataset --teacher BAAI/bge-m3 --out runs/x/teacher_cache
  m3distill teacher --config run.yaml --dtype float16 --batch-size 64 --device cuda
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "teacher", help="embed the dataset with the teacher (the teacher cache)", description=_DESCRIPTION,
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_argument(parser)
    parser.add_argument("--data", metavar="DIR", help="dataset directory (default: <run_dir>/dataset)")
    parser.add_argument("--teacher", metavar="MODEL", help="sentence-transformers folder or hub id (default BAAI/bge-m3)")
    parser.add_argument("--out", metavar="DIR", help="cache folder (default: <run_dir>/teacher_cache)")
    parser.add_argument("--run-dir", metavar="DIR", help="run directory (default from the config)")
    parser.add_argument("--revision", metavar="REV", help="hub revision of the teacher")
    parser.add_argument("--batch-size", type=int, metavar="N", help="texts per batch (default 32)")
    parser.add_argument("--dtype", choices=("float32", "float16"), help="storage dtype (default float32)")
    parser.add_argument("--max-seq-length", type=int, metavar="N", help="override the teacher's max sequence length")
    parser.add_argument("--shard-size", type=int, metavar="N", help="texts per shard, the unit of resumption (default 2048)")
    parser.add_argument("--device", metavar="D", help="cpu, cuda, cuda:1, mps (default: best available)")
    parser.set_defaults(handler=run_teacher)


def run_teacher(args: argparse.Namespace) -> int:
    """Handler: resolve the config, run :func:`build_teacher_cache`, print the one-line summary."""
    from m3distill.teacher.cache import build_teacher_cache

    config = resolve_config(
        args,
        {
            "run_dir": args.run_dir,
            "teacher.model": args.teacher,
            "teacher.revision": args.revision,
            "teacher.batch_size": args.batch_size,
            "teacher.dtype": args.dtype,
            "teacher.max_seq_length": args.max_seq_length,
            "teacher.shard_size": args.shard_size,
            "teacher.device": args.device,
        },
    )
    layout = RunLayout(config.run_dir)
    summary = build_teacher_cache(
        args.data or layout.dataset, config.teacher, args.out or layout.teacher_cache,
        show_progress=logging.getLogger().getEffectiveLevel() <= logging.INFO,
    )
    print(
        f"m3distill teacher: {summary.cache_dir}: {summary.n_texts} texts ({summary.n_computed} embedded, "
        f"{summary.n_reused} already cached) in {summary.n_shards} shards, dim {summary.dim}, {summary.dtype}, "
        f"{summary.texts_per_second:.1f} texts/s"
    )
    return 0
