"""M3 benchmark: does training the student's sparse and ColBERT heads keep those outputs close to the teacher's?

    python benchmarks/m3_heads.py                       # 300 steps per student, work folder in /tmp
    python benchmarks/m3_heads.py --max-steps 600 --work /tmp/m3-heads

On the bundled sample corpus with the M3 test teacher (the packaged all-MiniLM-L6-v2 plus seeded random bge-m3
heads, :func:`m3distill.m3.make_m3_test_teacher`), it trains two 2-of-6-layer students at the same step budget,
both with the default dense recipe:

- ``dense losses only``: ``loss.sparse = loss.colbert = 0``: the student keeps copies of the teacher's heads,
  untrained, over its own hidden states (what a dense-only distillation leaves a user with);
- ``+ head losses``: the default, the heads trained against the teacher's, token by token, with the teacher run on
  every batch (online teacher);

and, for each model, searches the test questions among all contexts with qdrant-edge (exact) for every output:
dense, sparse, ColBERT (MaxSim) and hybrid (1 : 0.3 : 1). It prints P@10 and P@50 against the teacher's top-k per
output, MRR@10 as a share of the teacher's, and the training cost: seconds per step with the cached teacher
embeddings alone and with the online teacher.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402

from m3distill.config import TrainingConfig, load_config  # noqa: E402
from m3distill.data.dataset import load_synth_dataset  # noqa: E402
from m3distill.stages.synth import synthesize  # noqa: E402
from m3distill.evaluation.retrieval import EdgeSearchBackend  # noqa: E402
from m3distill.m3 import encode_m3, load_m3_heads, make_m3_test_teacher  # noqa: E402
from m3distill.metrics import (  # noqa: E402
    M3_OVERLAP_SHORT_LISTS,
    ground_truth_metrics,
    mrr_metric,
    top_k_overlap,
)
from m3distill.models import load_sentence_transformer  # noqa: E402
from m3distill.teacher.cache import build_teacher_cache, is_complete_cache  # noqa: E402
from m3distill.stages.train import train_students  # noqa: E402
from m3distill.training import is_trained_student, read_student_metadata  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
OUTPUTS = ("dense", "sparse", "colbert", "hybrid")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, help="working folder (default: a new temporary folder)")
    parser.add_argument("--max-steps", type=int, default=300, help="step budget of each student")
    parser.add_argument("--layers", default="0,5", help="teacher layers the student keeps")
    args = parser.parse_args(argv)

    work = args.work or Path(tempfile.mkdtemp(prefix="m3distill-m3-heads-"))
    config = load_config(REPO / "configs" / "demo.yaml")
    teacher_dir = work / "teacher-m3"
    if not teacher_dir.is_dir():
        make_m3_test_teacher(teacher_dir)
    teacher = config.teacher.model_copy(update={"model": str(teacher_dir)})
    sample = REPO / "data" / "sample"
    synth = config.synth.model_copy(update={"corpus": str(sample / "domain"), "general": str(sample / "general")})
    dataset_dir, cache_dir = work / "dataset", work / "teacher_cache"
    synthesize(synth, dataset_dir, tokenizer=str(teacher_dir), show_progress=False)
    if not is_complete_cache(cache_dir):
        build_teacher_cache(dataset_dir, teacher, cache_dir, show_progress=False)

    default = TrainingConfig(max_steps=args.max_steps, max_seq_length=config.training.max_seq_length)
    recipes = {
        "dense losses only (heads copied, untrained)": default.model_copy(update={
            "loss": default.loss.model_copy(update={"sparse": 0.0, "colbert": 0.0})}),
        "+ head losses (default)": default,
    }
    layers = [int(n) for n in args.layers.split(",")]
    students = {}
    for name, training in recipes.items():
        folder = work / "students" / "".join(char if char.isalnum() else "_" for char in name)
        student = folder / f"student-{len(layers)}L"
        if not is_trained_student(student):
            train_students(dataset_dir, cache_dir, teacher=teacher, students=[layers], training=training,
                           out_dir=folder, show_progress=False)
        students[name] = student

    dataset = load_synth_dataset(dataset_dir)
    questions = dataset.split_questions("test")
    contexts = list(dataset.contexts["text"])
    row_of = {context_id: row for row, context_id in enumerate(dataset.contexts["context_id"])}
    own = np.array([row_of[context_id] for context_id in questions["context_id"]])
    texts = list(questions["text"]) + contexts
    n = len(questions)
    backend = EdgeSearchBackend()
    tops, mrrs = {}, {}
    for label, folder in {"teacher": teacher_dir, **students}.items():
        model = load_sentence_transformer(folder, device="cpu", max_seq_length=config.training.max_seq_length)
        encoded = encode_m3(model, load_m3_heads(model, folder), texts, batch_size=64)
        tops[label] = backend.search_m3(label, encoded.rows(slice(n, None)), encoded.rows(slice(0, n)), 50, OUTPUTS)
        mrrs[label] = {output: ground_truth_metrics(top, own, [10], output)[mrr_metric(output)]
                       for output, top in tops[label].items()}
        timings = ", ".join(f"{phase} {seconds:.1f} s" for phase, seconds in backend.last_timings.items())
        print(f"{label}: searched {n} questions among {len(contexts)} contexts ({timings})", file=sys.stderr,
              flush=True)

    print(f"\nsample corpus, M3 test teacher (all-MiniLM-L6-v2 + seeded bge-m3 heads), 2-of-6-layer students "
          f"{layers}, {args.max_steps} steps x {default.batch_size} texts; test split: {n} questions among "
          f"{len(contexts)} contexts, qdrant-edge exact search\n")
    print("| student | output | P@10 vs teacher | P@50 vs teacher | MRR@10 / teacher's |")
    print("|---|---|---:|---:|---:|")
    rows = []
    for name in students:
        for output in OUTPUTS:
            # As the report counts it: sparse lists can be shorter than k (no shared token), dense ones never are.
            rule = "miss" if output == "dense" else M3_OVERLAP_SHORT_LISTS
            p10 = top_k_overlap(tops[name][output], tops["teacher"][output], 10, short_lists=rule)
            p50 = top_k_overlap(tops[name][output], tops["teacher"][output], 50, short_lists=rule)
            share = mrrs[name][output] / mrrs["teacher"][output]
            rows.append({"student": name, "output": output, "p@10": p10, "p@50": p50, "mrr_share": share})
            print(f"| {name} | {output} | {p10:.3f} | {p50:.3f} | {share:.1%} |")
    print("\n| student | seconds per step | minutes | teacher per step |")
    print("|---|---:|---:|---|")
    for name, folder in students.items():
        training = read_student_metadata(folder)["training"]
        online = "online (forward pass per batch)" if training["loss"]["sparse"] or training["loss"]["colbert"] \
            else "cached embeddings only"
        print(f"| {name} | {training['seconds_per_step']:.3f} | {training['train_seconds'] / 60:.1f} | {online} |")
    (work / "m3_heads.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
