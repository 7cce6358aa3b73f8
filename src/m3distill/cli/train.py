"""`m3distill train`: distil layer-reduced students on the teacher cache (m3distill.training.train_students)."""

from __future__ import annotations

import argparse

from m3distill.cli._common import add_config_argument, resolve_config, show_progress
from m3distill.cli._flags import add_config_flags

_DESCRIPTION = """\
Build one student per layer count (--layers 3,2,1) or explicit layer list (--plan 0,2,4, repeatable) from the
teacher's own layers and train it to reproduce the cached teacher embeddings (a weighted sum of loss terms, see
the loss flags). Dev top-10 agreement with the teacher, MSE and cosine Spearman are measured before and during
training; the checkpoint with the best --best-metric is kept. Each student is a plain sentence-transformers folder
<out>/student-<N>L with a model card. Runs data-parallel under torchrun.
"""

_EPILOG = """\
examples:
  m3distill train --data runs/x/dataset --cache runs/x/teacher_cache --layers 8,6,4 --out runs/x/students
  m3distill train --config run.yaml --strategy search --layers 4
  m3distill train --config run.yaml --plan 0,5,11,17,23 --max-steps 2000 --resume
  torchrun --nproc_per_node 4 "$(which m3distill)" train --config run.yaml
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train", help="train layer-reduced students on the teacher cache", description=_DESCRIPTION, epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_argument(parser)
    parser.add_argument("--data", metavar="DIR", help="dataset directory (default: <run_dir>/dataset)")
    parser.add_argument("--cache", metavar="DIR", help="teacher cache (default: <run_dir>/teacher_cache)")
    parser.add_argument("--out", metavar="DIR", help="students folder (default: <run_dir>/students)")
    parser.add_argument("--resume", action=argparse.BooleanOptionalAction, default=None,
                        help="continue unfinished students from their latest checkpoint (the default; --no-resume "
                        "refuses a student with checkpoints of an unfinished run)")
    parser.add_argument("--force", action="store_true",
                        help="retrain finished students, also those trained with other settings (refused without "
                        "this flag); the old student stays until the new one is complete")
    add_config_flags(parser, "run_dir", "teacher.model", "students", "training",
                     default_notes={"teacher.model": "the teacher that made the cache"})
    parser.set_defaults(handler=run_train)


def run_train(args: argparse.Namespace) -> int:
    """Handler: resolve the config, run the train stage through the API, print the one-line summary."""
    import m3distill
    from m3distill.distributed import process_rank

    resume = {} if args.resume is None else {"resume": args.resume}  # unset: the API's default
    result = m3distill.train(resolve_config(args), dataset_dir=args.data, cache_dir=args.cache, out_dir=args.out,
                             force=args.force, show_progress=show_progress(args), **resume)
    parts = [
        f"{r.name} (layers {','.join(map(str, r.layers))}, {r.n_parameters / 1e6:.1f}M params"
        f"{', already trained' if r.skipped else f', {r.global_step} steps, {r.seconds_per_step:.2f} s/step'}) "
        + (f"dev top-10 agreement {r.dev_before['teacher_p@10']:.3f}->{r.dev_after['teacher_p@10']:.3f}, "
           if "teacher_p@10" in r.dev_before and "teacher_p@10" in r.dev_after else "")
        + f"dev spearman {r.dev_before['spearman_cosine']:.3f}->{r.dev_after['spearman_cosine']:.3f}, "
        f"mse x100 {r.dev_before['mse_x100']:.3f}->{r.dev_after['mse_x100']:.3f}"
        for r in result.students
    ]
    if process_rank() == 0:  # under torchrun every process gets here; one summary is enough
        print(f"m3distill train: {result.out_dir}: " + "; ".join(parts))
    return 0
