"""bge-m3's shape, all three outputs served without torch: export and time an 8-of-24-layer student.

    python benchmarks/m3_stand_in_export.py                        # full vocabulary
    python benchmarks/m3_stand_in_export.py --vocabulary corpus    # trimmed to the sample corpus's English part

The teacher is a random XLM-R of bge-m3's shape (24 layers, 1024 wide, 16 heads; ``tests/stand_in.py``) with bge-m3's
own tokenizer and seeded bge-m3 sparse and ColBERT heads: weights are random, so only shapes, sizes and speed mean
anything here. Its 8-layer student (layers 0, 3, 7, 10, 13, 16, 20, 23, the teacher's heads) is exported by
``m3distill export`` (one graph returning token embeddings, sparse weights and ColBERT vectors; float32 and int8,
verified against the torch student), and the teacher (torch fp32), the torch student and both exports produce all
three outputs of the same sample texts in interleaved repeats. Prints the verification figures, the files' sizes,
texts/s and the speed-up over the teacher (median of the per-repeat ratios, with their range).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
from sentence_transformers import SentenceTransformer  # noqa: E402

from m3distill import export_student  # noqa: E402
from m3distill.stages.export import export_status  # noqa: E402
from m3distill.config import ExportConfig  # noqa: E402
from m3distill.layout import STUDENT_METADATA_FILE  # noqa: E402
from m3distill.m3 import M3Heads, encode_m3, load_m3_heads  # noqa: E402
from m3distill.onnx_serving import OnnxEncoder  # noqa: E402
from m3distill.students.build import build_student  # noqa: E402
from m3distill.students.layer_plan import plan_layers  # noqa: E402
from m3distill.students.vocabulary import choose_vocabulary, trim_student, write_vocabulary_map  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from stand_in import BGE_M3_SHAPE, make_xlmr_stand_in  # noqa: E402

sys.path.insert(0, str(REPO / "benchmarks"))
from vocabulary import sample_texts  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, help="working folder (default: a new temporary folder)")
    parser.add_argument("--vocabulary", choices=("full", "corpus"), default="full",
                        help="the student's vocabulary (corpus: the sample corpus's English part)")
    parser.add_argument("--texts", type=int, default=64, help="texts timed per repeat")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved timed repeats")
    args = parser.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="m3distill-m3-stand-in-"))

    teacher_dir = work / "teacher"
    if not teacher_dir.is_dir():
        make_xlmr_stand_in(teacher_dir, **BGE_M3_SHAPE, tokenizer="xlmr", m3_heads=True)
    teacher = SentenceTransformer(str(teacher_dir), device="cpu")
    teacher_heads = M3Heads.load(teacher_dir)
    student_dir = work / "students" / f"student-8L-{args.vocabulary}"
    if not (student_dir / STUDENT_METADATA_FILE).is_file():
        student = build_student(teacher, plan_layers(24, 8, "spread"))
        choice = None
        if args.vocabulary != "full":
            choice = choose_vocabulary(teacher.tokenizer, sample_texts(("en",)), args.vocabulary)
            trim_student(student, choice)
        student.save(str(student_dir))
        teacher_heads.save(student_dir)
        if choice is not None:
            write_vocabulary_map(student_dir, choice)
        (student_dir / STUDENT_METADATA_FILE).write_text(json.dumps({"name": student_dir.name}), encoding="utf-8")
    started = time.perf_counter()
    config = ExportConfig(verify_texts=64)
    result = export_student(student_dir, config, force=export_status(student_dir, config).state == "stale",
                            show_progress=False)
    print(f"{result.line()} ({time.perf_counter() - started:.0f} s)")
    for variant, entry in result.record["variants"].items():
        print(f"  {variant}: {entry['bytes'] / 1e6:.1f} MB, vs torch {json.dumps(entry.get('m3_vs_torch'))}")

    texts = sample_texts(("en",))[: args.texts]
    student = SentenceTransformer(str(student_dir), device="cpu")
    heads = load_m3_heads(student, student_dir)
    encoders = {
        "teacher (torch fp32, 24 layers)": lambda: encode_m3(teacher, teacher_heads, texts, batch_size=16),
        "student (torch fp32, 8 layers)": lambda: encode_m3(student, heads, texts, batch_size=16),
    }
    for variant, title in (("onnx", "ONNX fp32"), ("int8", "ONNX int8")):
        encoder = OnnxEncoder(student_dir, variant)
        assert encoder.outputs == ("dense", "sparse", "colbert")
        encoders[f"student ({title})"] = lambda encoder=encoder: encoder.encode_m3(texts, batch_size=16)
    for encode in encoders.values():
        encode()  # warm-up
    seconds: dict[str, list[float]] = {label: [] for label in encoders}
    for _ in range(args.repeats):
        for label, encode in encoders.items():
            began = time.perf_counter()
            encode()
            seconds[label].append(time.perf_counter() - began)
    tokens = [len(ids) for ids in teacher.tokenizer(texts)["input_ids"]]
    print(f"\nall three outputs of {len(texts)} sample texts (median {int(np.median(tokens))} tokens, up to "
          f"{max(tokens)}), batches of 16, {args.repeats} interleaved repeats, {os.cpu_count()} CPU cores; "
          f"student vocabulary {args.vocabulary}\n")
    print("| model | texts/s | speed-up vs teacher (min-max) |")
    print("|---|---:|---|")
    teacher_label = next(iter(encoders))
    for label in encoders:
        ratios = [theirs / mine for theirs, mine in zip(seconds[teacher_label], seconds[label])]
        print(f"| {label} | {len(texts) / float(np.median(seconds[label])):.1f} | "
              f"{np.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}) |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
