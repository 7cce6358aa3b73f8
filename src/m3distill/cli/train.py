"""`m3distill train`: distil layer-reduced students on the teacher cache (m3distill.training.train_students)."""

from __future__ import annotations

import argparse
import logging
import os

from m3distill.cli._common import add_config_argument, resolve_config
from m3distill.layout import RunLayout
from m3distill.students.layer_plan import parse_layer_list

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
    paths = parser.add_argument_group("inputs and outputs")
    paths.add_argument("--data", metavar="DIR", help="dataset directory (default: <run_dir>/dataset)")
    paths.add_argument("--cache", metavar="DIR", help="teacher cache (default: <run_dir>/teacher_cache)")
    paths.add_argument("--out", metavar="DIR", help="students folder (default: <run_dir>/students)")
    paths.add_argument("--run-dir", metavar="DIR", help="run directory (default from the config)")
    paths.add_argument("--teacher", metavar="MODEL", help="teacher model (default: the one that made the cache)")

    students = parser.add_argument_group("students")
    students.add_argument("--layers", metavar="N,N,...", help="layer counts, one student each (default 8,6,4)")
    students.add_argument("--strategy", choices=("spread", "uniform", "first", "last", "search"),
                          help="layer choice (default spread: first and last layer kept, the rest evenly spaced)")
    students.add_argument("--plan", action="append", metavar="L,L,...",
                          help="explicit 0-based teacher layers of one student; repeat for more (overrides --layers)")
    students.add_argument("--search-candidates", type=int, metavar="N", help="plans scored per student with --strategy search")
    students.add_argument("--search-steps", type=int, metavar="N", help="training steps per candidate before scoring")

    training = parser.add_argument_group("training")
    training.add_argument("--max-steps", type=int, metavar="N",
                          help="optimizer steps to train, the budget (default 1000; wins over --epochs)")
    training.add_argument("--epochs", type=float, metavar="E", help="passes over the training texts instead of --max-steps")
    training.add_argument("--lr", type=float, metavar="LR", help="learning rate (default 1e-3)")
    training.add_argument("--batch-size", type=int, metavar="N", help="texts per batch and process (default 32)")
    training.add_argument("--max-seq-length", type=int, metavar="N", help="student max sequence length")
    training.add_argument("--eval-steps", type=int, metavar="N", help="dev evaluation every N steps")
    training.add_argument("--save-steps", type=int, metavar="N", help="checkpoint every N steps")
    training.add_argument("--lr-scheduler", choices=("linear", "cosine", "constant_with_warmup"),
                          help="learning-rate schedule after the warm-up")
    training.add_argument("--best-metric", choices=("top_k", "spearman", "mse"),
                          help="dev metric that picks the checkpoint kept (default top_k: top-10 agreement)")
    training.add_argument("--early-stopping", type=int, metavar="N",
                          help="stop when the best metric has not improved for N dev evaluations")
    training.add_argument("--texts", metavar="KIND,...",
                          help="training text kinds among contexts,questions,crops,general (default all)")
    training.add_argument("--device", metavar="D", help="cpu, cuda, mps (default: best available)")

    loss = parser.add_argument_group("loss terms (weights; 0 switches a term off)")
    for term, what in (("mse", "MSE of the sentence embeddings"), ("cosine", "1 - cosine of the sentence embeddings"),
                       ("in-batch-kl", "KL of softmaxed similarities within the batch"),
                       ("anchor-kl", "KL of softmaxed similarities to cached teacher anchors"),
                       ("token", "MSE of last hidden states (online teacher)")):
        loss.add_argument(f"--loss-{term}", type=float, metavar="W", help=what)
    training.add_argument("--resume", action="store_true", help="continue unfinished students from their latest checkpoint")
    parser.set_defaults(handler=run_train)


def run_train(args: argparse.Namespace) -> int:
    """Handler: resolve the config, run :func:`train_students`, print the one-line summary."""
    from m3distill.teacher.cache import cache_fingerprint
    from m3distill.training import train_students

    config = resolve_config(
        args,
        {
            "run_dir": args.run_dir,
            "teacher.model": args.teacher,
            "students.layers": parse_layer_list(args.layers) if args.layers else None,
            "students.strategy": args.strategy,
            "students.explicit": [parse_layer_list(plan) for plan in args.plan] if args.plan else None,
            "students.search_candidates": args.search_candidates,
            "students.search_steps": args.search_steps,
            "training.epochs": args.epochs,
            "training.max_steps": args.max_steps,
            "training.learning_rate": args.lr,
            "training.batch_size": args.batch_size,
            "training.max_seq_length": args.max_seq_length,
            "training.eval_steps": args.eval_steps,
            "training.save_steps": args.save_steps,
            "training.device": args.device,
            "training.lr_scheduler": args.lr_scheduler,
            "training.best_metric": args.best_metric,
            "training.early_stopping_patience": args.early_stopping,
            "training.texts": [kind.strip() for kind in args.texts.split(",") if kind.strip()] if args.texts else None,
            **{f"training.loss.{term}": getattr(args, f"loss_{term}")
               for term in ("mse", "cosine", "in_batch_kl", "anchor_kl", "token")},
        },
    )
    layout = RunLayout(config.run_dir)
    cache_dir = args.cache or layout.teacher_cache
    teacher = config.teacher
    if args.teacher is None:
        teacher = teacher.model_copy(update={"model": cache_fingerprint(cache_dir).name})
    results = train_students(
        args.data or layout.dataset, cache_dir, teacher=teacher, students=config.students, training=config.training,
        out_dir=args.out or layout.students, resume=args.resume,
        show_progress=logging.getLogger().getEffectiveLevel() <= logging.INFO,
    )
    parts = [
        f"{r.name} (layers {','.join(map(str, r.layers))}, {r.n_parameters / 1e6:.1f}M params"
        f"{', already trained' if r.skipped else f', {r.global_step} steps, {r.seconds_per_step:.2f} s/step'}) "
        + (f"dev top-10 agreement {r.dev_before['teacher_p@10']:.3f}->{r.dev_after['teacher_p@10']:.3f}, "
           if "teacher_p@10" in r.dev_before and "teacher_p@10" in r.dev_after else "")
        + f"dev spearman {r.dev_before['spearman_cosine']:.3f}->{r.dev_after['spearman_cosine']:.3f}, "
        f"mse x100 {r.dev_before['mse_x100']:.3f}->{r.dev_after['mse_x100']:.3f}"
        for r in results
    ]
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun every process gets here; one summary is enough
        print(f"m3distill train: {args.out or layout.students}: " + "; ".join(parts))
    return 0
