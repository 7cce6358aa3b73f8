"""`m3distill teacher`: embed every dataset text with the teacher into the cache (m3distill.teacher.cache)."""

from __future__ import annotations

import argparse

from m3distill.cli._common import add_config_argument, resolve_config, show_progress
from m3distill.cli._flags import add_config_flags

_DESCRIPTION = """\
Embed every text of the dataset (contexts, questions and general text of all splits) once with the teacher, in
length-sorted batches (of --batch-size texts, or cut by --max-tokens-per-batch padded tokens), into memory-mapped
shards keyed by text hash. An interrupted run resumes where it stopped; a rerun after the dataset grew embeds only
the new texts. A cache made by another teacher (or another --max-seq-length, --dtype or --precision) is refused;
--force rebuilds it. Under torchrun the processes share the shards, one GPU each.
"""

_EPILOG = """\
examples:
  m3distill teacher --data runs/x/dataset --teacher BAAI/bge-m3 --out runs/x/teacher_cache
  m3distill teacher --config run.yaml --dtype float16 --batch-size 64 --device cuda
  m3distill teacher --config run.yaml --batch-size 256 --max-tokens-per-batch 65536 --precision bf16
  torchrun --nproc_per_node 4 "$(which m3distill)" teacher --config run.yaml
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "teacher", help="embed the dataset with the teacher (the teacher cache)", description=_DESCRIPTION,
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_argument(parser)
    parser.add_argument("--data", metavar="DIR", help="dataset directory (default: <run_dir>/dataset)")
    parser.add_argument("--out", metavar="DIR", help="cache folder (default: <run_dir>/teacher_cache)")
    parser.add_argument("--force", action="store_true",
                        help="rebuild the cache from scratch, also when it was made by another teacher or dtype")
    add_config_flags(parser, "run_dir", "teacher")
    parser.set_defaults(handler=run_teacher)


def run_teacher(args: argparse.Namespace) -> int:
    """Handler: resolve the config, run the teacher stage through the API, print the one-line summary."""
    import m3distill
    from m3distill.distributed import process_rank

    summary = m3distill.teacher_cache(resolve_config(args), dataset_dir=args.data, out_dir=args.out, force=args.force,
                                      show_progress=show_progress(args))
    if process_rank() != 0:  # under torchrun every process gets here; one summary is enough
        return 0
    processes = f" by {summary.processes} processes" if summary.processes > 1 else ""
    print(
        f"m3distill teacher: {summary.cache_dir}: {summary.n_texts} texts ({summary.n_computed} embedded{processes}, "
        f"{summary.n_reused} already cached) in {summary.n_shards} shards, dim {summary.dim}, {summary.dtype}, "
        f"computed in {summary.precision}, {summary.texts_per_second:.1f} texts/s"
    )
    return 0
