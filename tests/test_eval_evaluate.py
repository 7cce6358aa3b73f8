"""`evaluate_models` and `m3distill evaluate`: the whole evaluation, its report, and the inputs it refuses."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from sentence_transformers import SentenceTransformer

from m3distill.cli import main
from m3distill.config import EvaluationConfig, SpeedConfig, TeacherConfig
from m3distill.data.dataset import (
    CONTEXT_SCHEMA,
    QUESTION_SCHEMA,
    load_synth_dataset,
    write_table,
)
from m3distill.evaluation import evaluate as evaluate_module
from m3distill.evaluation.evaluate import EMBEDDINGS_CACHE_DIRNAME, InMemory, evaluate_models
from m3distill.evaluation.speed import size_on_disk, speed_texts
from m3distill.metrics import (
    LAYER_RATIO,
    PARAMETERS,
    SIZE_ON_DISK,
    SPEEDUP,
    SPEEDUP_MAX,
    SPEEDUP_MIN,
    SPEEDUP_SUSPECT,
)
from m3distill.layout import (
    CONTEXTS_FILE,
    QUESTIONS_FILE,
    REPORT_JSON_FILE,
    REPORT_MD_FILE,
)
from m3distill.models import count_parameters
from m3distill.students.build import build_student

TINY_SPEED = SpeedConfig(n_texts=16, batch_size=8, repeats=1, warmup_batches=1, min_seconds_per_repeat=0)


@pytest.fixture(scope="module")
def minilm_students(minilm_teacher, tmp_path_factory) -> list[Path]:
    """Untrained 3- and 1-layer students of the MiniLM teacher, saved as sentence-transformers folders."""
    root = tmp_path_factory.mktemp("minilm-students")
    folders = []
    for layers in ([0, 2, 4], [0]):
        folder = root / f"student-{len(layers)}L"
        build_student(minilm_teacher, layers).save(str(folder))
        folders.append(folder)
    return folders


@pytest.fixture(scope="module")
def xlmr_student(tiny_xlmr_path, tmp_path_factory) -> Path:
    """A 2-layer student of the tiny XLM-RoBERTa (CLS pooling) stand-in for bge-m3."""
    folder = tmp_path_factory.mktemp("xlmr-student") / "student-2L"
    build_student(SentenceTransformer(str(tiny_xlmr_path), device="cpu"), [0, 2]).save(str(folder))
    return folder


def test_evaluate_minilm_teacher_and_students(minilm_path, minilm_students, small_dataset, tmp_path):
    out_dir = tmp_path / "report"
    # Only test contexts are indexed to keep encoding short; the CLI test below indexes all of them.
    config = EvaluationConfig(k=[5, 10], distractors="test", speed=TINY_SPEED)
    report = evaluate_models(small_dataset, TeacherConfig(model=str(minilm_path)), minilm_students, config, out_dir,
                             show_progress=False)

    assert json.loads((out_dir / REPORT_JSON_FILE).read_text()) == report.to_json_dict()
    assert [m.name for m in report.models] == ["teacher", "student-3L", "student-1L"]
    assert [m.layers for m in report.models] == [6, 3, 1]
    assert [(p.a, p.b) for p in report.pairs] == [
        ("teacher", "student-3L"), ("teacher", "student-1L"), ("student-3L", "student-1L")]
    dataset = load_synth_dataset(small_dataset)
    assert report.retrieval.n_contexts == len(dataset.split_contexts("test"))
    assert report.retrieval.n_questions == len(dataset.split_questions("test"))
    teacher, *students = [model.model_dump() for model in report.models]
    # Pseudo-questions are sentences of their own context: a correct question->context mapping puts it near the
    # top for the teacher, a broken one (wrong rows) would score near 1/n_contexts.
    assert teacher["metrics"]["exact_mrr@10"] > 0.5
    assert teacher["metrics"]["exact_recall@5"] <= teacher["metrics"]["exact_recall@10"]
    assert "alignment_mse" not in teacher["metrics"]
    for student, folder in zip(students, minilm_students):
        metrics = student["metrics"]
        assert metrics["alignment_mse_x100"] == pytest.approx(100 * metrics["alignment_mse"])
        assert 0 < metrics["alignment_mean_cosine"] < 1
        assert metrics[SIZE_ON_DISK] == sum(f.stat().st_size for f in folder.rglob("*.safetensors"))
        assert metrics[PARAMETERS] == count_parameters(SentenceTransformer(str(folder), device="cpu"))
        assert 0 < metrics[SPEEDUP_MIN] <= metrics[SPEEDUP] <= metrics[SPEEDUP_MAX]
        assert metrics[LAYER_RATIO] == 6 / student["layers"]
        assert metrics[SPEEDUP_SUSPECT] is (metrics[SPEEDUP] > metrics[LAYER_RATIO])
    for pair in report.pairs:
        assert all(0 <= value <= 1 for value in pair.metrics.values())

    # Query-side stand-in: student questions in the teacher's index, checked against numpy exact search.
    questions = list(dataset.split_questions("test")["text"])
    contexts = list(dataset.split_contexts("test")["text"])
    row_of = {cid: row for row, cid in enumerate(dataset.split_contexts("test")["context_id"])}
    own = [row_of[cid] for cid in dataset.split_questions("test")["context_id"]]
    teacher_model = SentenceTransformer(str(minilm_path), device="cpu")
    teacher_q, teacher_c = teacher_model.encode(questions), teacher_model.encode(contexts)
    teacher_top = np.argsort(-(teacher_q @ teacher_c.T), axis=1)
    for student, folder in zip(students, minilm_students):
        student_q = SentenceTransformer(str(folder), device="cpu").encode(questions)
        top = np.argsort(-(student_q @ teacher_c.T), axis=1)
        for k in (5, 10):
            expected = np.mean([len(set(a[:k]) & set(b[:k])) / k for a, b in zip(top, teacher_top)])
            assert student["metrics"][f"query_side_exact_overlap@{k}"] == pytest.approx(expected, abs=0.02)
        ranks = [list(row).index(context) + 1 for row, context in zip(top, own)]
        expected_mrr = np.mean([1 / rank if rank <= 10 else 0 for rank in ranks])
        assert student["metrics"]["query_side_exact_mrr@10"] == pytest.approx(expected_mrr, abs=0.02)
    assert "Query-side stand-in" in (out_dir / REPORT_MD_FILE).read_text()
    assert report.alignment_pairs.n_matching == report.retrieval.n_questions
    assert report.alignment_pairs.n_non_matching == 4 * report.retrieval.n_questions
    assert teacher["metrics"][SPEEDUP] == 1.0
    assert report.speed.order == "interleaved" and report.speed.min_seconds_per_repeat == 0
    libraries = {"torch", "transformers", "sentence-transformers", "qdrant-edge-py", "qdrant-client"}
    assert libraries <= set(report.versions)
    markdown = (out_dir / REPORT_MD_FILE).read_text()
    first_pair = report.pairs[0]
    assert f"| teacher vs student-3L | {first_pair.metrics['exact_overlap@5']:.3f} |" in markdown
    for plot in ("p_at_k.png", "quality_vs_speed.png"):
        assert (out_dir / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out_dir / EMBEDDINGS_CACHE_DIRNAME).exists()


def test_xlmr_stand_in_through_the_cli_with_hnsw_and_qdrant_client(tiny_xlmr_path, xlmr_student, small_dataset,
                                                                      tmp_path, capsys):
    config_file = tmp_path / "eval.yaml"
    config_file.write_text(yaml.safe_dump({"evaluation": {"speed": TINY_SPEED.model_dump()}}))
    out_dir = tmp_path / "run" / "report"
    argv = ["evaluate", "--data", str(small_dataset), "--teacher", str(tiny_xlmr_path), "--students", str(xlmr_student),
            "--out", str(out_dir), "--k", "3,10", "--index", "hnsw", "--qdrant-url", ":memory:",
            "--config", str(config_file)]
    assert main(argv) == 0
    summary = capsys.readouterr().out.strip()
    assert summary.count("\n") == 0 and str(out_dir / REPORT_MD_FILE) in summary
    report = json.loads((out_dir / REPORT_JSON_FILE).read_text())
    assert report["retrieval"]["n_contexts"] == len(load_synth_dataset(small_dataset).contexts)  # distractors: all
    assert report["retrieval"]["backend"] == "qdrant-client"
    assert report["retrieval"]["indexes"] == ["exact", "hnsw"]
    assert report["retrieval"]["k"] == [3, 10]
    for model in report["models"]:
        assert 0 <= model["metrics"]["hnsw_vs_exact_overlap@10"] <= 1
        assert {"hnsw_recall@3", "hnsw_mrr@10", "exact_ndcg@10"} <= set(model["metrics"])
    assert report["models"][1]["layers"] == 2 and report["models"][0]["layers"] == 4
    markdown = (out_dir / REPORT_MD_FILE).read_text()
    assert "HNSW recall against exact search" in markdown and "Qdrant HNSW search" in markdown


def test_interrupted_evaluation_resumes_from_cached_embeddings(tiny_xlmr_path, xlmr_student, small_dataset, tmp_path,
                                                               monkeypatch, caplog):
    out_dir = tmp_path / "report"
    config = EvaluationConfig(k=[5], speed=TINY_SPEED)
    teacher = TeacherConfig(model=str(tiny_xlmr_path))

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(evaluate_module, "measure_speed", interrupted)
        with pytest.raises(KeyboardInterrupt):
            evaluate_models(small_dataset, teacher, [xlmr_student], config, out_dir, show_progress=False)
    assert len(list((out_dir / EMBEDDINGS_CACHE_DIRNAME).glob("*.npy"))) == 2
    assert not (out_dir / REPORT_JSON_FILE).exists()
    with caplog.at_level(logging.INFO, logger="m3distill.evaluation.evaluate"):
        evaluate_models(small_dataset, teacher, [xlmr_student], config, out_dir, show_progress=False)
    assert sum("reusing embeddings" in message for message in caplog.messages) == 2
    assert (out_dir / REPORT_JSON_FILE).is_file()


def _run_cli(argv: list[str], capsys) -> tuple[int, str]:
    code = main(argv)
    return code, capsys.readouterr().err.strip()


@pytest.fixture
def models_must_not_load(monkeypatch):
    """Fail the test if the evaluation gets as far as loading a model."""

    def refuse(*args, **kwargs):
        raise AssertionError("the error should have come before any model was loaded")

    monkeypatch.setattr(evaluate_module, "load_sentence_transformer", refuse)
    monkeypatch.setattr(evaluate_module, "load_teacher", refuse)


def test_folder_that_is_not_a_model_is_one_clear_line(tiny_xlmr_path, small_dataset, tmp_path, capsys):
    not_a_model = tmp_path / "notes"
    not_a_model.mkdir()
    (not_a_model / "readme.txt").write_text("hello")
    code, err = _run_cli(["evaluate", "--data", str(small_dataset), "--teacher", str(tiny_xlmr_path),
                          "--students", str(not_a_model), "--out", str(tmp_path / "out"), "--k", "5"], capsys)
    assert code == 2
    assert err.count("\n") == 0 and "not a sentence-transformers model" in err and str(not_a_model) in err
    code, err = _run_cli(["evaluate", "--data", str(small_dataset), "--teacher", str(tiny_xlmr_path),
                          "--students", str(tmp_path / "missing"), "--out", str(tmp_path / "out"), "--k", "5"], capsys)
    assert code == 2 and err.count("\n") == 0 and "student folder not found" in err


def test_k_larger_than_the_corpus_fails_before_loading_models(small_dataset, tmp_path, capsys, models_must_not_load):
    n_contexts = len(load_synth_dataset(small_dataset).contexts)
    code, err = _run_cli(["evaluate", "--data", str(small_dataset), "--teacher", "unused", "--students",
                          str(tmp_path), "--out", str(tmp_path / "out"), "--k", f"10,{n_contexts + 1}"], capsys)
    assert code == 2
    assert err.count("\n") == 0 and f"k={n_contexts + 1} is larger than the {n_contexts} contexts" in err


def test_empty_test_split_fails_before_loading_models(small_dataset, tmp_path, capsys, models_must_not_load):
    dataset = tmp_path / "dataset"
    shutil.copytree(small_dataset, dataset)
    for name, schema in ((CONTEXTS_FILE, CONTEXT_SCHEMA), (QUESTIONS_FILE, QUESTION_SCHEMA)):
        frame = pd.read_parquet(dataset / name)
        frame["split"] = frame["split"].replace("test", "train")
        write_table(dataset / name, frame, schema)
    code, err = _run_cli(["evaluate", "--data", str(dataset), "--teacher", "unused", "--students", str(tmp_path),
                          "--out", str(tmp_path / "out"), "--k", "5"], capsys)
    assert code == 2 and err.count("\n") == 0 and "empty test split" in err


def test_speed_texts_repeat_the_test_texts_in_order():
    assert speed_texts(["a", "b", "c"], 7) == ["a", "b", "c", "a", "b", "c", "a"]
    assert speed_texts(["a", "b", "c"], 2) == ["a", "b"]


def test_size_on_disk_counts_weights_once_and_skips_checkpoints(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"x" * 100)
    (tmp_path / "pytorch_model.bin").write_bytes(b"x" * 1000)  # the old copy beside the safetensors
    (tmp_path / "2_Dense").mkdir()
    (tmp_path / "2_Dense" / "pytorch_model.bin").write_bytes(b"x" * 10)
    (tmp_path / "checkpoint-500").mkdir()
    (tmp_path / "checkpoint-500" / "model.safetensors").write_bytes(b"x" * 5000)
    (tmp_path / "tokenizer.json").write_bytes(b"x" * 77)
    assert size_on_disk(tmp_path) == 110
    assert size_on_disk(tmp_path / "nope") is None


def test_alignment_rows_follow_the_dataset_order(small_dataset):
    # The question -> own-context rows the evaluation builds must point at the right context text.
    data = evaluate_module._load_test_data(small_dataset, EvaluationConfig(distractors="test"))
    dataset = load_synth_dataset(small_dataset)
    context_text = dict(zip(dataset.contexts["context_id"], dataset.contexts["text"]))
    questions = dataset.split_questions("test")
    assert data.questions == questions["text"].tolist()
    assert [data.contexts[row] for row in data.own_context] == [context_text[c] for c in questions["context_id"]]
    assert len(data.contexts) == len(dataset.split_contexts("test"))
    np.testing.assert_array_equal(data.test_context_rows, np.arange(len(data.contexts)))


def test_provided_teacher_embeddings_replace_teacher_encoding(xlmr_student, tiny_xlmr_path, small_dataset, tmp_path):
    config = EvaluationConfig(k=[5], distractors="test", speed=TINY_SPEED)
    teacher = TeacherConfig(model=str(tiny_xlmr_path))
    student_model = SentenceTransformer(str(xlmr_student), device="cpu")
    calls = []

    def students_embeddings_as_teachers(texts):
        calls.append(len(texts))
        return student_model.encode(texts)

    report = evaluate_models(small_dataset, teacher, [xlmr_student], config, tmp_path / "a", show_progress=False,
                             in_memory=InMemory(teacher_embeddings=students_embeddings_as_teachers))
    assert calls == [report.retrieval.n_questions + report.retrieval.n_contexts]
    # The "teacher" embeddings are the student's own, so the student must look perfectly aligned.
    student = report.models[1].metrics
    assert student["alignment_mse"] == pytest.approx(0.0, abs=1e-10)
    assert student["alignment_mean_cosine"] == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match="expected"):
        evaluate_models(small_dataset, teacher, [xlmr_student], config, tmp_path / "b", show_progress=False,
                        in_memory=InMemory(teacher_embeddings=lambda texts: np.zeros((len(texts), 3))))


def test_memory_freed_by_an_earlier_model_is_handed_back_before_the_next_is_measured():
    """glibc keeps freed memory for reuse; unless it is handed back, a model measured after another one reuses
    the earlier model's freed activations and its own encoding memory reads as almost nothing."""
    import platform

    import numpy as np
    import psutil

    from m3distill.evaluation.speed import _return_freed_memory

    if platform.system() != "Linux":
        pytest.skip("malloc_trim is glibc's")
    process = psutil.Process()
    before = process.memory_info().rss
    # 2000 x 64 KiB blocks stay below glibc's mmap threshold, so they live in the heap; freeing every other one
    # leaves 62 MiB of holes the allocator keeps.
    blocks = [np.ones(16 * 1024, dtype=np.float32) for _ in range(2000)]
    del blocks[::2]
    held = process.memory_info().rss - before
    _return_freed_memory()
    after_trim = process.memory_info().rss - before
    assert held > 100 * 2**20
    assert held - after_trim > 40 * 2**20
