"""M3 benchmark: does training the student's sparse and ColBERT heads keep those outputs close to the teacher's?

    python benchmarks/m3_heads.py                       # 300 steps per student, work folder in /tmp
    python benchmarks/m3_heads.py --max-steps 600 --work /tmp/m3-heads
    python benchmarks/m3_heads.py --serving --work /tmp/m3-heads   # + the trained student's ONNX fp32 / int8 exports
    python benchmarks/m3_heads.py --serving --graphs fused,plain   # + the unfused graph beside the fused one

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

With ``--serving`` the ``+ head losses`` student is exported (``m3distill export``: one ONNX graph returning all three
outputs, float32 and int8) and its exports are searched the same way, beside the torch student: P@10 against the
teacher and against the torch student itself per output, and texts/s for producing all three outputs at once
(``encode_m3`` in torch, ``onnx_encoder(...).encode_m3`` in onnxruntime) for the teacher, the torch student and both
exports, timed in one run, the models taking turns in each repeat; the speed-up is the median of the per-repeat
ratios to the teacher, with their range.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
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
    parser.add_argument("--serving", action="store_true", help="also the ONNX exports of the trained student")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats of each model (--serving)")
    parser.add_argument("--speed-texts", type=int, default=256, help="texts timed per repeat (--serving)")
    parser.add_argument("--graphs", default="fused", help="exported graphs (--serving): fused (export.graph_fusions, "
                        "the default), plain (the unfused graph), or both: fused,plain")
    args = parser.parse_args(argv)
    graphs = [name.strip() for name in args.graphs.split(",") if name.strip()]
    if not graphs or set(graphs) - {"fused", "plain"}:
        parser.error("--graphs takes fused, plain or both")

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
    encoders = {label: _torch_encoder(folder, config.training.max_seq_length)
                for label, folder in {"teacher": teacher_dir, **students}.items()}
    served = {}
    if args.serving:
        for graph in graphs:
            served.update(_exports(students["+ head losses (default)"], work, config.training.max_seq_length, graph))
        encoders.update(served)
    for label, encode in encoders.items():
        encoded = encode(texts, 64)
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
    if served:
        _serving_tables(tops, mrrs, encoders, texts[:args.speed_texts], args.repeats)
    print("\n| student | seconds per step | minutes | teacher per step |")
    print("|---|---:|---:|---|")
    for name, folder in students.items():
        training = read_student_metadata(folder)["training"]
        online = "online (forward pass per batch)" if training["loss"]["sparse"] or training["loss"]["colbert"] \
            else "cached embeddings only"
        print(f"| {name} | {training['seconds_per_step']:.3f} | {training['train_seconds'] / 60:.1f} | {online} |")
    (work / "m3_heads.json").write_text(json.dumps(rows, indent=1))
    return 0


def _torch_encoder(folder: Path, max_seq_length: int | None):
    model = load_sentence_transformer(folder, device="cpu", max_seq_length=max_seq_length)
    heads = load_m3_heads(model, folder)
    return lambda texts, batch_size: encode_m3(model, heads, texts, batch_size=batch_size)


def _exports(student: Path, work: Path, max_seq_length: int | None, graph: str) -> dict:
    """The student's float32 and int8 exports (one graph: all three outputs) as encoders, by label; ``graph``:
    ``fused`` (the default export) or ``plain`` (``export.graph_fusions: false``)."""
    from m3distill import export_student
    from m3distill.config import ExportConfig
    from m3distill.onnx_serving import OnnxEncoder
    from m3distill.stages.export import export_status

    folder = work / "exports" / ("" if graph == "fused" else graph) / student.name
    if not folder.is_dir():
        shutil.copytree(student, folder, ignore=shutil.ignore_patterns("onnx", "checkpoint*"))
    config = ExportConfig(enabled=True, graph_fusions=graph == "fused")
    # An export made with other settings (an earlier m3distill's) is redone, as `m3distill export --force` would.
    result = export_student(folder, config, force=export_status(folder, config).state == "stale", show_progress=False)
    print(result.line(), file=sys.stderr)
    for variant, entry in result.record["variants"].items():
        print(f"{variant} vs torch: {json.dumps(entry.get('m3_vs_torch'))}", file=sys.stderr)
    encoders = {}
    for variant, title in (("onnx", "ONNX fp32"), ("int8", "ONNX int8")):
        encoder = OnnxEncoder(folder, variant, max_seq_length=max_seq_length)
        label = f"student {title}" + ("" if graph == "fused" else f" ({graph} graph)")
        encoders[label] = lambda texts, batch_size, encoder=encoder: encoder.encode_m3(texts, batch_size=batch_size)
    return encoders


def _serving_tables(tops: dict, mrrs: dict, encoders: dict, texts: list[str], repeats: int) -> None:
    torch_student = "+ head losses (default)"
    labels = ["teacher", torch_student, *[label for label in encoders if label.startswith("student ")]]
    print("\n| model | output | P@10 vs teacher | P@10 vs torch student | MRR@10 / teacher's |")
    print("|---|---|---:|---:|---:|")
    for label in labels[1:]:
        for output in OUTPUTS:
            rule = "miss" if output == "dense" else M3_OVERLAP_SHORT_LISTS
            p10 = top_k_overlap(tops[label][output], tops["teacher"][output], 10, short_lists=rule)
            own = top_k_overlap(tops[label][output], tops[torch_student][output], 10, short_lists=rule)
            share = mrrs[label][output] / mrrs["teacher"][output]
            name = "torch student" if label == torch_student else label
            print(f"| {name} | {output} | {p10:.3f} | {own:.3f} | {share:.1%} |")
    seconds: dict[str, list[float]] = {label: [] for label in labels}
    for label in labels:  # warm-up
        encoders[label](texts[:32], 32)
    for _ in range(repeats):
        for label in labels:
            started = time.perf_counter()
            encoders[label](texts, 32)
            seconds[label].append(time.perf_counter() - started)
    print(f"\nall three outputs at once, {len(texts)} texts in batches of 32, {repeats} interleaved repeats "
          f"({os.cpu_count()} CPU cores)\n")
    print("| model | texts/s | speed-up vs teacher (min-max) |")
    print("|---|---:|---|")
    for label in labels:
        rate = len(texts) / float(np.median(seconds[label]))
        ratios = [teacher / mine for teacher, mine in zip(seconds["teacher"], seconds[label])]
        name = "torch student" if label == torch_student else label
        print(f"| {name} | {rate:.0f} | {np.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}) |")


if __name__ == "__main__":
    sys.exit(main())
