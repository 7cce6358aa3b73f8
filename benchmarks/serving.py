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
- speed: texts/s on each text set of ``--texts``, batches of ``--batch-size``, every model in one interleaved run per
  set (:func:`m3distill.evaluation.speed.interleaved_throughput`: the models take turns, each turn at least
  ``--min-seconds``), so a busy machine hits all alike; the speed-up is the median of the per-repeat ratios to the
  fp32 torch teacher, with its range. Text sets:
  - ``short``: the test texts (questions and test contexts, ``--n-texts`` of them, the demo's max length);
  - ``passages``: ``--n-texts`` documentation passages, paragraphs of at least 8 words of the bundled sample
    corpus's manual pages (every language, a seeded draw), every model truncating at ``--passage-max-length``
    tokens: the length of what a search system embeds (median about 75 tokens under MiniLM's tokenizer).

Quantisation options (``--options``): the default (``export.quantization``: dynamic QInt8 weights, per channel)
and the alternatives it was chosen against. The option is chosen by P@10 against the teacher, not speed alone.
``static`` is not an export setting: the benchmark replaces the default int8 file by onnxruntime's static
(calibrated) int8 of the same float32 graph, to compare it with the dynamic int8 the export writes.
Graphs (``--graphs``): ``fused`` (``export.graph_fusions``, the default: eager attention traced, onnxruntime's
transformer fusions) and ``plain`` (the model's own attention, unfused: the export before fusions), each with the
default quantisation.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import statistics
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
from m3distill.models import load_sentence_transformer  # noqa: E402
from m3distill.onnx_serving import OnnxEncoder  # noqa: E402
from m3distill.stages.export import export_status  # noqa: E402
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
    "static": {},  # not an export setting: the benchmark's own calibrated int8 (see _static_int8)
}
GRAPHS = {"fused": True, "plain": False}  # export.graph_fusions
TEXT_SETS = ("short", "passages")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, help="working folder (default: a new temporary folder)")
    parser.add_argument("--layers", default="2", help="student layer counts to train (ignored with --students)")
    parser.add_argument("--students", type=Path, help="a folder of finished students to measure instead")
    parser.add_argument("--max-steps", type=int, help="training steps per student (default: the demo's)")
    parser.add_argument("--options", default=",".join(OPTIONS), help=f"quantisation options: {','.join(OPTIONS)}")
    parser.add_argument("--graphs", default=",".join(GRAPHS), help=f"graphs: {','.join(GRAPHS)}")
    parser.add_argument("--texts", default=",".join(TEXT_SETS), help=f"text sets timed: {','.join(TEXT_SETS)}")
    parser.add_argument("--passage-max-length", type=int, default=256, help="tokens every model keeps of a passage")
    parser.add_argument("--n-texts", type=int, default=256, help="texts in one timed pass")
    parser.add_argument("--batch-size", type=int, default=32, help="texts per batch while timing")
    parser.add_argument("--repeats", type=int, default=5, help="timed turns per model")
    parser.add_argument("--min-seconds", type=float, default=3.0, help="seconds of work per turn at least")
    args = parser.parse_args(argv)
    options = [name.strip() for name in args.options.split(",") if name.strip()]
    unknown = set(options) - set(OPTIONS)
    if unknown:
        parser.error(f"unknown option(s) {', '.join(sorted(unknown))}; choose from {', '.join(OPTIONS)}")
    graphs = [name.strip() for name in args.graphs.split(",") if name.strip()]
    text_sets = [name.strip() for name in args.texts.split(",") if name.strip()]
    if not graphs or set(graphs) - set(GRAPHS):
        parser.error(f"--graphs takes some of {', '.join(GRAPHS)}")
    if not text_sets or set(text_sets) - set(TEXT_SETS):
        parser.error(f"--texts takes some of {', '.join(TEXT_SETS)}")

    work = args.work or Path(tempfile.mkdtemp(prefix="m3distill-serving-"))
    config = load_config(REPO / "configs" / "demo.yaml")
    dataset_dir, cache_dir = prepare_sample_run(config, work)
    students = _students(args, config, dataset_dir, cache_dir, work)
    search = TestSearch(config, dataset_dir, cache_dir)
    max_length = config.teacher.max_seq_length

    # What each timed model is, to build it for a text set's max length: ("torch", folder) or (variant, folder).
    timed: dict[str, tuple[str, Path | str]] = {"teacher (torch fp32)": ("torch", config.teacher.model)}
    rows: list[dict] = []
    for student_dir in students:
        model = load_sentence_transformer(student_dir, device="cpu")
        label = f"{student_dir.name} (torch fp32)"
        timed[label] = ("torch", student_dir)
        fp32 = model.encode(search.questions + search.contexts, batch_size=32, convert_to_numpy=True,
                            show_progress_bar=False)
        fp32_top = search.top(fp32)
        rows.append({"model": student_dir.name, "variant": "torch fp32", "label": label,
                     **search.fidelity(fp32, fp32, fp32_top)})
        for graph in graphs:
            for option in options if graph == graphs[0] else options[:1]:
                folder = _exported_copy(student_dir, option, graph, work)
                for variant in ("onnx", "int8"):
                    if variant == "onnx" and option != options[0]:
                        continue  # the fp32 export does not depend on the quantisation option
                    encoder = OnnxEncoder(folder, variant)
                    name = ("onnx fp32" if variant == "onnx" else f"int8 {option}") + f", {graph} graph"
                    label = f"{student_dir.name} ({name})"
                    embeddings = encoder.encode(search.questions + search.contexts, batch_size=32)
                    rows.append({"model": student_dir.name, "variant": name, "label": label,
                                 "mb": encoder.weights_bytes / 2**20, **search.fidelity(embeddings, fp32, fp32_top)})
                    timed[label] = (variant, folder)
                    print(json.dumps(rows[-1]), flush=True)

    print(f"\nCPU: {os.cpu_count()} cores, torch {torch.__version__} with {torch.get_num_threads()} threads; "
          f"batches of {args.batch_size}, {args.repeats} interleaved repeats of >= {args.min_seconds:g} s per set; "
          f"fidelity: {search.n_questions} test questions among {search.n_contexts} contexts")
    throughputs = {}
    for text_set in text_sets:
        if text_set == "short":
            texts, length = speed_texts(search.speed_texts(), args.n_texts), max_length
        else:
            texts, length = documentation_passages(args.n_texts), args.passage_max_length
        models = {label: _load(kind, where, length) for label, (kind, where) in timed.items()}
        encoders = {label: _encoder(model, texts, args.batch_size) for label, model in models.items()}
        for encode in encoders.values():  # warm-up, untimed
            encode()
        throughputs[text_set] = interleaved_throughput(encoders, args.repeats, args.min_seconds)
        print(f"- {text_set}: {_describe(texts, models['teacher (torch fp32)'], length, args.batch_size)}")

    print("\n| model | variant | " + " | ".join(f"texts/s {name} (min-max) | speed-up {name} (min-max)"
                                               for name in text_sets)
          + " | P@10 vs teacher | P@10 vs fp32 student | MRR@10 / teacher's | mean cosine to fp32 | MB |")
    print("|---|---|" + "---:|---:|" * len(text_sets) + "---:|---:|---:|---:|---:|")
    teacher_speed = []
    for name in text_sets:
        rate = spread(throughputs[name]["teacher (torch fp32)"])
        teacher_speed.append(f"{rate.median:.0f} ({rate.low:.0f}-{rate.high:.0f}) | 1.00x")
    print(f"| teacher | torch fp32 | {' | '.join(teacher_speed)} | 1.000 | | 100.0% | | |")
    for row in rows:
        speeds = []
        for name in text_sets:
            runs, reference = throughputs[name].get(row["label"]), throughputs[name]["teacher (torch fp32)"]
            rate = spread(runs)
            ratio = spread([mine / theirs for mine, theirs in zip(runs, reference)])
            speeds.append(f"{rate.median:.0f} ({rate.low:.0f}-{rate.high:.0f}) | "
                          f"{ratio.median:.2f}x ({ratio.low:.2f}-{ratio.high:.2f})")
        mb = f"{row['mb']:.1f}" if "mb" in row else ""
        print(f"| {row['model']} | {row['variant']} | {' | '.join(speeds)} | {row['p@10']:.3f} | "
              f"{row['p@10_self']:.3f} | {row['mrr_share']:.1%} | {row['cosine_to_fp32']:.5f} | {mb} |")
    return 0


def documentation_passages(n_texts: int) -> list[str]:
    """The first ``n_texts`` of :func:`_paragraphs`: documentation passages as a search system embeds them."""
    return speed_texts(_paragraphs(), n_texts)


def _paragraphs() -> list[str]:
    """The paragraphs (at least 8 words, whitespace collapsed) of the bundled sample corpus's domain pages, every
    language, in a seeded random order."""
    paragraphs = []
    for path in sorted((REPO / "data" / "sample" / "domain").rglob("*.txt")):
        for paragraph in re.split(r"\n\s*\n", path.read_text(encoding="utf-8")):
            words = paragraph.split()
            if len(words) >= 8:
                paragraphs.append(" ".join(words))
    random.Random(0).shuffle(paragraphs)
    return paragraphs


def _describe(texts: list[str], teacher, max_length: int, batch_size: int) -> str:
    """Token lengths under the teacher's tokenizer (truncated at ``max_length``) and the padding share of
    length-sorted batches, which is what padding-free batching could save at most."""
    lengths = sorted((min(len(ids), max_length) for ids in teacher.tokenizer(texts)["input_ids"]), reverse=True)
    padded = sum(len(batch) * batch[0] for batch in (lengths[i:i + batch_size] for i in range(0, len(lengths),
                                                                                              batch_size)))
    return (f"{len(texts)} texts, median {statistics.median(lengths):.0f} tokens (max {lengths[0]}, truncated at "
            f"{max_length}); padding {1 - sum(lengths) / padded:.1%} of the tokens run in length-sorted batches")


def _load(kind: str, where: Path | str, max_length: int):
    if kind == "torch":
        return load_sentence_transformer(str(where), device="cpu", max_seq_length=max_length)
    return OnnxEncoder(where, kind, max_seq_length=max_length)


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


def _exported_copy(student_dir: Path, option: str, graph: str, work: Path) -> Path:
    """A copy of the student exported with one quantisation option and graph (the student itself is left as it
    is)."""
    folder = work / "exports" / f"{option}-{graph}" / student_dir.name
    if not folder.is_dir():
        shutil.copytree(student_dir, folder, ignore=shutil.ignore_patterns("onnx", "checkpoint*"))
    quantization = ExportConfig().quantization.model_copy(update=OPTIONS[option])
    config = ExportConfig(enabled=True, quantization=quantization, graph_fusions=GRAPHS[graph])
    # An export made by an earlier m3distill is redone, as `m3distill export --force` would.
    export_student(folder, config, force=export_status(folder, config).state == "stale", show_progress=False)
    if option == "static":
        _static_int8(folder)
    return folder


def _static_int8(folder: Path, n_calibration: int = 256) -> None:
    """Replace the export's int8 file by static (calibrated) int8: onnxruntime's ``quantize_static`` of the float32
    graph's MatMuls (QOperator format, per-channel QInt8 weights, QUInt8 activations with ranges from MinMax
    calibration on the last ``n_calibration`` documentation passages, which the timed ones do not include)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from m3distill.exporting.onnx import head_nodes

    calibration = _paragraphs()[-n_calibration:]
    encoder = OnnxEncoder(folder, "onnx")

    class _Passages(CalibrationDataReader):
        def __init__(self) -> None:
            self._feeds = iter([feed for _, feed, _ in encoder._batches(calibration, 16)])

        def get_next(self):
            return next(self._feeds, None)

    fp32 = folder / "onnx" / "model.onnx"
    quantize_static(fp32, folder / "onnx" / "model_qint8_quantized.onnx", _Passages(),
                    quant_format=QuantFormat.QOperator, per_channel=True, op_types_to_quantize=["MatMul"],
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, nodes_to_exclude=head_nodes(fp32),
                    extra_options={"DefaultTensorType": 1})


def _encoder(model, texts: list[str], batch_size: int):
    if isinstance(model, OnnxEncoder):
        return lambda: len(model.encode(texts, batch_size=batch_size))
    return lambda: len(model.encode(texts, batch_size=batch_size, show_progress_bar=False))


if __name__ == "__main__":
    sys.exit(main())
