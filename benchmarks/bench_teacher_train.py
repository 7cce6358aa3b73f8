"""Teacher-cache throughput and distillation training speed and quality on this machine. Prints figures.

    python benchmarks/bench_teacher_train.py                      # MiniLM teacher on the demo dataset
    python benchmarks/bench_teacher_train.py --max-steps 100 --layers 3,2,1 --xlmr-texts 200
    python benchmarks/bench_teacher_train.py --data runs/x/dataset --skip-xlmr

Without --data it builds the demo's dataset from data/sample (configs/demo.yaml's synth settings, the packaged
MiniLM tokenizer). It then caches every text with the MiniLM teacher (texts/s), optionally caches --xlmr-texts
texts with a random bge-m3-shaped XLM-R (24 x 1024; texts/s), and trains one student per --layers count for
--max-steps steps, printing seconds per step, steps/s and dev MSE (raw and x100), mean cosine and Spearman of the
untrained and trained student.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the bge-m3-shaped stand-in is a test helper, not part of the package

from stand_in import make_xlmr_stand_in, packaged_minilm_path  # noqa: E402

from m3distill.config import StudentsConfig, TeacherConfig, TrainingConfig, load_config  # noqa: E402
from m3distill.data.dataset import TABLES, load_synth_dataset, write_table  # noqa: E402
from m3distill.layout import DATASET_MANIFEST_FILE  # noqa: E402
from m3distill.students.layer_plan import parse_layer_list  # noqa: E402
from m3distill.teacher.cache import build_teacher_cache  # noqa: E402
from m3distill.stages.train import train_students  # noqa: E402


def _demo_dataset(out_dir: Path) -> Path:
    from m3distill.stages.synth import synthesize

    config = load_config(REPO / "configs" / "demo.yaml").synth
    sample = REPO / "data" / "sample"
    config = config.model_copy(update={"corpus": str(sample / "domain"), "general": str(sample / "general")})
    started = time.perf_counter()
    synthesize(config, out_dir, tokenizer=str(packaged_minilm_path()), show_progress=False)
    print(f"dataset: demo settings on data/sample in {time.perf_counter() - started:.1f} s")
    return out_dir


def _subset(source: Path, out_dir: Path, n_texts: int) -> Path:
    """A dataset of about ``n_texts`` texts: the first contexts of each split with their questions, no general."""
    dataset = load_synth_dataset(source)
    per_split = max(1, n_texts // 9)  # about 1 context + 2 questions per context, three splits
    contexts = dataset.contexts.groupby("split", sort=False).head(per_split)
    tables = {
        "contexts": contexts,
        "questions": dataset.questions[dataset.questions["context_id"].isin(contexts["context_id"])],
        "general": dataset.general.head(0),
        "crops": dataset.crops.head(0),
    }
    out_dir.mkdir(parents=True)
    for kind, (name, schema) in TABLES.items():
        write_table(out_dir / name, tables[kind], schema)
    (out_dir / DATASET_MANIFEST_FILE).write_text("{}\n", encoding="utf-8")
    return out_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, help="dataset directory (default: build the demo dataset)")
    parser.add_argument("--layers", default="3,2,1", help="student layer counts (default 3,2,1)")
    parser.add_argument("--max-steps", type=int, default=60, help="training steps per student (default 60)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-seq-length", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--xlmr-texts", type=int, default=200, help="texts for the bge-m3-shaped cache run")
    parser.add_argument("--skip-xlmr", action="store_true", help="skip the bge-m3-shaped stand-in")
    args = parser.parse_args()

    import torch

    print(f"torch threads: {torch.get_num_threads()}, cuda: {torch.cuda.is_available()}")
    with tempfile.TemporaryDirectory(prefix="bench-teacher-train-") as tmp:
        work = Path(tmp)
        data = args.data or _demo_dataset(work / "dataset")
        dataset = load_synth_dataset(data)
        print(f"texts: {len(dataset.texts())} in all, {len(dataset.texts(['train']))} train, "
              f"{len(dataset.texts(['dev'], ['contexts', 'questions']))} dev")

        teacher = TeacherConfig(model=str(packaged_minilm_path()), batch_size=64, max_seq_length=args.max_seq_length)
        summary = build_teacher_cache(data, teacher, work / "cache", show_progress=False)
        print(f"teacher cache, MiniLM-L6 (max_seq_length {args.max_seq_length}, batch 64): {summary.n_computed} texts "
              f"in {summary.seconds:.1f} s = {summary.texts_per_second:.1f} texts/s")

        if not args.skip_xlmr:
            started = time.perf_counter()
            xlmr = make_xlmr_stand_in(work / "xlmr", max_seq_length=512)
            print(f"bge-m3-shaped stand-in created in {time.perf_counter() - started:.1f} s")
            subset = _subset(Path(data), work / "subset", args.xlmr_texts)
            xlmr_teacher = TeacherConfig(model=str(xlmr), batch_size=16)
            summary = build_teacher_cache(subset, xlmr_teacher, work / "xlmr-cache", show_progress=False)
            print(f"teacher cache, bge-m3-shaped XLM-R (24 x 1024, max_seq_length 512, batch 16): {summary.n_computed} "
                  f"texts in {summary.seconds:.1f} s = {summary.texts_per_second:.2f} texts/s")

        training = TrainingConfig(max_steps=args.max_steps, batch_size=args.batch_size, learning_rate=args.lr,
                                  max_seq_length=args.max_seq_length)
        print(f"training: {args.max_steps} steps, batch {args.batch_size}, lr {args.lr}, max_seq_length {args.max_seq_length}")
        header = f"{'student':<11} {'layers':<8} {'params':>7} {'s/step':>7} {'steps/s':>7} {'train s':>7}  " \
                 f"{'dev MSE':>17} {'MSE x100':>15} {'mean cos':>13} {'Spearman':>13}"
        print(header)
        for count in parse_layer_list(args.layers):
            [result] = train_students(
                data, work / "cache", teacher=teacher, students=StudentsConfig(layers=[count]), training=training,
                out_dir=work / "students", show_progress=False,
            )
            b, a = result.dev_before, result.dev_after
            print(f"{result.name:<11} {','.join(map(str, result.layers)):<8} {result.n_parameters / 1e6:>6.1f}M "
                  f"{result.seconds_per_step:>7.3f} {1 / result.seconds_per_step:>7.2f} {result.train_seconds:>7.1f}  "
                  f"{b['mse']:.6f}->{a['mse']:.6f} {b['mse_x100']:.4f}->{a['mse_x100']:.4f} "
                  f"{b['mean_cosine']:.3f}->{a['mean_cosine']:.3f} {b['spearman_cosine']:.3f}->{a['spearman_cosine']:.3f}")


if __name__ == "__main__":
    main()
