"""Serving benchmark: what the students give a user on a CPU, as fp32 torch, ONNX and int8 ONNX. Prints tables.

    python benchmarks/serving.py                                  # 2-layer student, demo budget, work in /tmp
    python benchmarks/serving.py --layers 3,2,1 --work /tmp/serving
    python benchmarks/serving.py --students RUN_DIR/students     # students trained elsewhere (e.g. m3distill demo)

On the bundled sample corpus with the packaged all-MiniLM-L6-v2 teacher (configs/demo.yaml's synth, teacher and
training settings), it trains the students (or takes finished ones), exports each with ``m3distill export``'s
code into a copy per quantisation option, and measures every variant:

- fidelity, as the fidelity benchmark does: the test questions searched (exact cosine) among all contexts; P@10 of
  the variant's top-10 against the teacher's and against its own fp32 torch student's, MRR@10 as a share of the
  teacher's, and the mean cosine of its embeddings to the fp32 torch student's;
- speed: texts/s on the test texts (questions and test contexts, ``--n-texts`` of them, the demo's max length),
  batches of ``--batch-size``, every model in one interleaved run (:func:`m3distill.evaluation.speed
  .interleaved_throughput`: the models take turns, each turn at least ``--min-seconds``), so a busy machine hits
  all alike; the speed-up is the median of the per-repeat ratios to the fp32 torch teacher, with its range.

Quantisation options (``--options``): the default (``export.quantization``: dynamic QInt8 weights, per channel)
and the alternatives it was chosen against. The option is chosen by P@10 against the teacher, not speed alone.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from fidelity import TestSearch, prepare_sample_run  # noqa: E402
from m3distill.config import ExportConfig, StudentsConfig, load_config  # noqa: E402
from m3distill.evaluation.speed import interleaved_throughput, speed_texts, spread  # noqa: E402
from m3distill import export_student  # noqa: E402
from m3distill.models import load_sentence_transformer, num_layers  # noqa: E402
from m3distill.onnx_serving import OnnxEncoder  # noqa: E402
from m3distill.stages.train import train_students  # noqa: E402
from m3distill.training import is_trained_student  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

# Quantisation options compared; "default" is ExportConfig's own.
OPTIONS = {
    "default": {},
    "per-tensor": {"per_channel": False},
    "quint8": {"weight_type": "quint8"},
    "reduce-range": {"reduce_range": True},
    "+embeddings": {"op_types": ["MatMul", "Gather"]},
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, help="working folder (default: a new temporary folder)")
    parser.add_argument("--layers", default="2", help="student layer counts to train (ignored with --students)")
    parser.add_argument("--students", type=Path, help="a folder of finished students to measure instead")
    parser.add_argument("--max-steps", type=int, help="training steps per student (default: the demo's)")
    parser.add_argument("--options", default=",".join(OPTIONS), help=f"quantisation options: {','.join(OPTIONS)}")
    parser.add_argument("--n-texts", type=int, default=256, help="texts in one timed pass")
    parser.add_argument("--batch-size", type=int, default=32, help="texts per batch while timing")
    parser.add_argument("--repeats", type=int, default=5, help="timed turns per model")
    parser.add_argument("--min-seconds", type=float, default=3.0, help="seconds of work per turn at least")
    args = parser.parse_args(argv)
    options = [name.strip() for name in args.options.split(",") if name.strip()]
    unknown = set(options) - set(OPTIONS)
    if unknown:
        parser.error(f"unknown option(s) {', '.join(sorted(unknown))}; choose from {', '.join(OPTIONS)}")

    work = args.work or Path(tempfile.mkdtemp(prefix="m3distill-serving-"))
    config = load_config(REPO / "configs" / "demo.yaml")
    dataset_dir, cache_dir = prepare_sample_run(config, work)
    students = _students(args, config, dataset_dir, cache_dir, work)
    search = TestSearch(config, dataset_dir, cache_dir)
    max_length = config.teacher.max_seq_length

    teacher = load_sentence_transformer(config.teacher.model, device="cpu", max_seq_length=max_length)
    timed: dict[str, object] = {"teacher (torch fp32)": teacher}
    layers: dict[str, int] = {"teacher (torch fp32)": num_layers(teacher)}
    rows: list[dict] = []
    for student_dir in students:
        model = load_sentence_transformer(student_dir, device="cpu")
        label = f"{student_dir.name} (torch fp32)"
        timed[label], layers[label] = model, num_layers(model)
        fp32 = model.encode(search.questions + search.contexts, batch_size=32, convert_to_numpy=True,
                            show_progress_bar=False)
        fp32_top = search.top(fp32)
        rows.append({"model": student_dir.name, "variant": "torch fp32", "label": label,
                     **search.fidelity(fp32, fp32, fp32_top)})
        for option in options:
            folder = _exported_copy(student_dir, option, work)
            for variant in ("onnx", "int8"):
                if variant == "onnx" and option != options[0]:
                    continue  # the fp32 export does not depend on the quantisation option
                encoder = OnnxEncoder(folder, variant)
                name = "onnx fp32" if variant == "onnx" else f"int8 {option}"
                label = f"{student_dir.name} ({name})"
                embeddings = encoder.encode(search.questions + search.contexts, batch_size=32)
                rows.append({"model": student_dir.name, "variant": name, "label": label,
                             "mb": encoder.weights_bytes / 2**20, **search.fidelity(embeddings, fp32, fp32_top)})
                timed[label], layers[label] = encoder, layers[f"{student_dir.name} (torch fp32)"]
        print(json.dumps(rows[-1]), flush=True)

    texts = speed_texts(search.speed_texts(), args.n_texts)
    encoders = {label: _encoder(model, texts, args.batch_size) for label, model in timed.items()}
    for encode in encoders.values():  # warm-up, untimed
        encode()
    throughput = interleaved_throughput(encoders, args.repeats, args.min_seconds)
    reference = throughput["teacher (torch fp32)"]

    print(f"\nCPU: {os.cpu_count()} cores, torch {torch.__version__} with {torch.get_num_threads()} threads; "
          f"{args.n_texts} test texts (max {max_length} tokens), batches of {args.batch_size}, "
          f"{args.repeats} interleaved repeats of >= {args.min_seconds:g} s; fidelity: {search.n_questions} test "
          f"questions among {search.n_contexts} contexts\n")
    print("| model | variant | texts/s (min-max) | speed-up vs teacher (min-max) | P@10 vs teacher | "
          "P@10 vs fp32 student | MRR@10 / teacher's | mean cosine to fp32 | MB |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    rate = spread(reference)
    print(f"| teacher | torch fp32 | {rate.median:.0f} ({rate.low:.0f}-{rate.high:.0f}) | 1.00x | 1.000 | | 100.0% | "
          "| |")
    for row in rows:
        runs = throughput.get(row["label"])
        if runs:
            rate = spread(runs)
            ratio = spread([mine / theirs for mine, theirs in zip(runs, reference)])
            speed = f"{rate.median:.0f} ({rate.low:.0f}-{rate.high:.0f}) | {ratio.median:.2f}x ({ratio.low:.2f}-{ratio.high:.2f})"
        else:
            speed = "not timed | "
        mb = f"{row['mb']:.1f}" if "mb" in row else ""
        print(f"| {row['model']} | {row['variant']} | {speed} | {row['p@10']:.3f} | {row['p@10_self']:.3f} | "
              f"{row['mrr_share']:.1%} | {row['cosine_to_fp32']:.5f} | {mb} |")
    return 0


def _students(args: argparse.Namespace, config, dataset_dir: Path, cache_dir: Path, work: Path) -> list[Path]:
    if args.students is not None:
        found = sorted(path for path in args.students.iterdir() if is_trained_student(path))
        if not found:
            raise SystemExit(f"no finished student in {args.students}")
        return found
    training = config.training
    if args.max_steps:
        training = training.model_copy(update={"max_steps": args.max_steps})
    students = StudentsConfig(layers=[int(n) for n in args.layers.split(",")], strategy=config.students.strategy)
    results = train_students(dataset_dir, cache_dir, teacher=config.teacher, students=students, training=training,
                             out_dir=work / "students", resume=True, show_progress=False)
    return [result.path for result in results]


def _exported_copy(student_dir: Path, option: str, work: Path) -> Path:
    """A copy of the student exported with one quantisation option (the student itself is left as it is)."""
    folder = work / "exports" / option / student_dir.name
    if not folder.is_dir():
        shutil.copytree(student_dir, folder, ignore=shutil.ignore_patterns("onnx", "checkpoint*"))
    quantization = ExportConfig().quantization.model_copy(update=OPTIONS[option])
    export_student(folder, ExportConfig(enabled=True, quantization=quantization), show_progress=False)
    return folder


def _encoder(model, texts: list[str], batch_size: int):
    if isinstance(model, OnnxEncoder):
        return lambda: len(model.encode(texts, batch_size=batch_size))
    return lambda: len(model.encode(texts, batch_size=batch_size, show_progress_bar=False))


if __name__ == "__main__":
    sys.exit(main())
