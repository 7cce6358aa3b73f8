"""An M3 teacher (dense, sparse, ColBERT) evaluated on every output, and the M3 metric definitions."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from qdrant_client import QdrantClient
from sentence_transformers import SentenceTransformer

from m3distill.config import EvaluationConfig, SpeedConfig, TeacherConfig
from m3distill.evaluation.embeddings_cache import read_m3_embeddings, write_m3_embeddings
from m3distill.evaluation.evaluate import InMemory, evaluate_models
from m3distill.layout import REPORT_JSON_FILE, REPORT_MD_FILE
from m3distill.m3 import M3Embeddings, M3Heads, copy_head_files
from m3distill.metrics import (
    COLBERT_PEARSON,
    COLBERT_SPEARMAN,
    COLBERT_TOKEN_COSINE,
    GROUND_TRUTH_CUTOFF,
    M3_RETRIEVAL_OUTPUTS,
    MEAN_COSINE,
    SPARSE_MASS_COVERED,
    SPARSE_SPEARMAN,
    SPARSE_TEXTS,
    SimilarityPairs,
    colbert_alignment_metrics,
    mrr_metric,
    ndcg_metric,
    output_prefix,
    overlap_metric,
    recall_metric,
    sparse_alignment_metrics,
    top_k_overlap,
)
from m3distill.report import load_report
from m3distill.report.plots import output_p_at_k_plot
from m3distill.students.build import build_student

TINY_SPEED = SpeedConfig(n_texts=8, batch_size=8, repeats=1, warmup_batches=1, min_seconds_per_repeat=0)
KS = [5, 10]
CONFIG = EvaluationConfig(k=KS, index=["exact"], distractors="test", speed=TINY_SPEED)


@pytest.fixture(scope="module")
def m3_folders(tmp_path_factory, m3_teacher_path) -> dict[str, Path]:
    """An M3 teacher (MiniLM + seeded heads), an exact copy of it, and 2-layer students with and without heads."""
    root = tmp_path_factory.mktemp("m3-models")
    teacher = root / "teacher"
    shutil.copytree(m3_teacher_path, teacher)
    copy = root / "teacher-copy"
    shutil.copytree(teacher, copy)
    teacher_model = SentenceTransformer(str(teacher), device="cpu")
    with_heads, without_heads = root / "student-m3", root / "student-dense"
    for folder in (with_heads, without_heads):
        build_student(teacher_model, [0, 5]).save(str(folder))
    copy_head_files(teacher, with_heads)
    return {"teacher": teacher, "copy": copy, "with_heads": with_heads, "without_heads": without_heads}


def _m3_metric_names(output: str) -> list[str]:
    prefix = output_prefix(output)
    return [*[recall_metric(prefix, k) for k in KS], mrr_metric(prefix), ndcg_metric(prefix)]


def test_an_m3_teacher_is_evaluated_on_every_output_with_qdrant_edge(m3_folders, small_dataset, tmp_path, caplog):
    out_dir = tmp_path / "report"
    students = [m3_folders["copy"], m3_folders["with_heads"], m3_folders["without_heads"]]
    with caplog.at_level(logging.WARNING, logger="m3distill.evaluation.evaluate"):
        report = evaluate_models(small_dataset, TeacherConfig(model=str(m3_folders["teacher"])), students, CONFIG,
                                 out_dir, show_progress=False)

    assert report.schema_version == 5
    assert report.retrieval.outputs == ["dense", "sparse", "colbert", "hybrid"]
    assert report.retrieval.hybrid_weights == (1.0, 0.3, 1.0)
    assert load_report(out_dir).to_json_dict() == json.loads((out_dir / REPORT_JSON_FILE).read_text())
    models = {model.name: model for model in report.models}
    assert list(models) == ["teacher", "teacher-copy", "student-m3", "student-dense"]

    # Every model with heads has every output's ground truth; the student without heads has dense alone.
    for name in ("teacher", "teacher-copy", "student-m3"):
        for output in M3_RETRIEVAL_OUTPUTS:
            assert all(0.0 <= models[name].metrics[metric] <= 1.0 for metric in _m3_metric_names(output))
    assert not any(metric.startswith(M3_RETRIEVAL_OUTPUTS) for metric in models["student-dense"].metrics)
    assert models["student-dense"].metrics[MEAN_COSINE] is not None
    assert sum("student-dense has no M3 head files" in message for message in caplog.messages) == 1
    # Speed: models with heads are timed producing all three outputs at once; the dense-only student its one.
    assert {name: model.metrics["speed_outputs"] for name, model in models.items()} == {
        "teacher": "dense+sparse+colbert", "teacher-copy": "dense+sparse+colbert",
        "student-m3": "dense+sparse+colbert", "student-dense": "dense"}

    # P@k for every pair of models that both have an output, for every k; dense for every pair.
    pairs = {(pair.a, pair.b): pair.metrics for pair in report.pairs}
    assert len(pairs) == 6
    for (a, b), metrics in pairs.items():
        assert all(overlap_metric("exact", k) in metrics for k in KS)
        has_m3 = "student-dense" not in (a, b)
        for output in M3_RETRIEVAL_OUTPUTS:
            assert all((overlap_metric(output_prefix(output), k) in metrics) == has_m3 for k in KS)
    # An exact copy of the teacher returns the teacher's top-k for every output.
    assert {m: v for m, v in pairs[("teacher", "teacher-copy")].items() if v != 1.0} == {}
    assert len(pairs[("teacher", "teacher-copy")]) == len(KS) * (1 + len(M3_RETRIEVAL_OUTPUTS))

    copy = models["teacher-copy"].metrics
    assert copy[SPARSE_SPEARMAN] == pytest.approx(1.0) and copy[SPARSE_MASS_COVERED] == pytest.approx(1.0)
    assert copy[COLBERT_PEARSON] == pytest.approx(1.0) and copy[COLBERT_SPEARMAN] == pytest.approx(1.0)
    assert copy[COLBERT_TOKEN_COSINE] == pytest.approx(1.0, abs=1e-5)
    student = models["student-m3"].metrics
    assert -1.0 <= student[COLBERT_SPEARMAN] <= 1.0 and 0.0 <= student[SPARSE_MASS_COVERED] <= 1.0
    assert student[SPARSE_TEXTS] > 0 and -1.0 <= student[COLBERT_TOKEN_COSINE] <= 1.0
    assert SPARSE_SPEARMAN not in models["student-dense"].metrics

    markdown = (out_dir / REPORT_MD_FILE).read_text()
    for heading in ("P@k, sparse lexical weights", "P@k, ColBERT multi-vector", "P@k, hybrid: dense, sparse, ColBERT",
                    "Ground truth: each question's own context (sparse lexical weights",
                    "Sparse lexical weights: alignment", "ColBERT multi-vectors: alignment",
                    "Dense output only (no M3 head files): student-dense"):
        assert heading in markdown
    for output in M3_RETRIEVAL_OUTPUTS:
        assert (out_dir / output_p_at_k_plot(output)).read_bytes()[:4] == b"\x89PNG"

    # A version-2 report (before M3 outputs) reads as a dense-only one.
    old = json.loads((out_dir / REPORT_JSON_FILE).read_text())
    old["schema_version"] = 2
    del old["retrieval"]["outputs"], old["retrieval"]["hybrid_weights"]
    (out_dir / REPORT_JSON_FILE).write_text(json.dumps(old))
    migrated = load_report(out_dir)
    assert migrated.schema_version == 5 and migrated.retrieval.outputs == ["dense"]
    assert migrated.retrieval.hybrid_weights is None


def test_an_in_memory_m3_teacher_is_evaluated_with_qdrant_client(m3_folders, small_dataset, tmp_path):
    teacher = SentenceTransformer(str(m3_folders["teacher"]), device="cpu")
    report = evaluate_models(
        small_dataset, TeacherConfig(model="in-memory"), [m3_folders["copy"]], CONFIG, tmp_path / "report",
        show_progress=False, qdrant_client=QdrantClient(":memory:"),
        in_memory=InMemory(teacher=teacher, teacher_heads=M3Heads.load(m3_folders["teacher"])),
    )
    assert report.retrieval.backend == "qdrant-client"
    [pair] = report.pairs
    assert sorted(pair.metrics) == sorted(overlap_metric(prefix, k) for prefix in ("exact", *M3_RETRIEVAL_OUTPUTS)
                                          for k in KS)
    assert all(value == 1.0 for value in pair.metrics.values())
    for model in report.models:
        for output in M3_RETRIEVAL_OUTPUTS:
            assert all(metric in model.metrics for metric in _m3_metric_names(output))
    # The same teacher's own context is found as well by the copy, output by output.
    teacher_metrics, copy_metrics = (model.metrics for model in report.models)
    assert all(teacher_metrics[metric] == copy_metrics[metric] for metric in _m3_metric_names("hybrid"))


def test_the_m3_embeddings_cache_gives_back_what_was_encoded(tmp_path):
    embeddings = M3Embeddings(
        dense=np.arange(6, dtype=np.float32).reshape(3, 2),
        sparse=[{5: 0.5, 7: 1.25}, {}, {2: 0.125}],
        colbert=[np.ones((2, 4), np.float32), np.zeros((0, 4), np.float32), np.eye(4, dtype=np.float32)[:3]],
    )
    with open(tmp_path / "cache.m3.npz", "wb") as handle:
        write_m3_embeddings(handle, embeddings)
    again = read_m3_embeddings(tmp_path / "cache.m3.npz")
    assert np.array_equal(again.dense, embeddings.dense) and again.sparse == embeddings.sparse
    assert [vectors.shape for vectors in again.colbert] == [(2, 4), (0, 4), (3, 4)]
    assert all(np.array_equal(a, b) for a, b in zip(again.colbert, embeddings.colbert))


def test_sparse_alignment_by_hand():
    teacher = [{1: 1.0, 2: 2.0, 3: 3.0, 4: 4.0}, {1: 1.0, 9: 3.0}, {}]
    student = [{1: 0.1, 2: 0.3, 3: 0.2, 8: 5.0}, {1: 2.0}, {4: 1.0}]
    metrics = sparse_alignment_metrics(student, teacher)
    # Text 1: shared ids 1, 2, 3 with teacher ranks 1 2 3 and student ranks 1 3 2 -> Spearman 1 - 6*2/(3*8) = 0.5.
    # Text 2 shares one id (no correlation); text 3 has no teacher weight (no mass share).
    assert metrics[SPARSE_SPEARMAN] == pytest.approx(0.5) and metrics[SPARSE_TEXTS] == 1
    # Mass covered: text 1 (1+2+3)/10 = 0.6, text 2 1/4 = 0.25 -> 0.425.
    assert metrics[SPARSE_MASS_COVERED] == pytest.approx(0.425)
    assert sparse_alignment_metrics([{}], [{}]) == {SPARSE_SPEARMAN: None, SPARSE_TEXTS: 0, SPARSE_MASS_COVERED: None}
    with pytest.raises(ValueError, match="same texts"):
        sparse_alignment_metrics([{}], [])


def test_colbert_alignment_by_hand():
    x, y = np.array([1.0, 0.0]), np.array([0.0, 1.0])
    diagonal = np.array([np.sqrt(0.5), np.sqrt(0.5)])
    # Texts: a question of two tokens and three one-token contexts.
    teacher = [np.stack([x, y]), x[None], y[None], diagonal[None]]
    pairs = SimilarityPairs(left=np.array([0, 0, 0]), right=np.array([1, 2, 3]),
                            matching=np.array([True, False, False]))
    # The teacher's MaxSim of the pairs: (1 + 0)/2, (0 + 1)/2, (s + s)/2 -> 0.5, 0.5, 0.707.
    student = [np.stack([x, x]), x[None], y[None], diagonal[None]]
    # The student's: 1.0, 0.0, 0.707. Ranks (1.5, 1.5, 3) and (3, 1, 2): their deviations from the mean rank,
    # (-0.5, -0.5, 1) and (1, -1, 0), are orthogonal, so Spearman is 0 while Pearson is not.
    metrics = colbert_alignment_metrics(student, teacher, pairs)
    assert metrics[COLBERT_SPEARMAN] == pytest.approx(0.0)
    assert metrics[COLBERT_PEARSON] == pytest.approx(np.corrcoef([0.5, 0.5, np.sqrt(0.5)], [1, 0, np.sqrt(0.5)])[0, 1])
    # Token cosines: text 0 (1 + 0)/2, texts 1-3 all 1 -> mean 0.875; text_rows picks texts.
    assert metrics[COLBERT_TOKEN_COSINE] == pytest.approx(0.875)
    assert colbert_alignment_metrics(student, teacher, pairs, text_rows=[0])[COLBERT_TOKEN_COSINE] == pytest.approx(0.5)
    # Another token count (or width) leaves a text out of the token cosine; a constant score leaves out correlations.
    shorter = [np.stack([x, y])[:1], *teacher[1:]]
    assert colbert_alignment_metrics(shorter, teacher, pairs, text_rows=[0])[COLBERT_TOKEN_COSINE] is None
    constant = colbert_alignment_metrics([x[None]] * 4, teacher, pairs)
    assert constant[COLBERT_PEARSON] is None and constant[COLBERT_SPEARMAN] is None


def test_m3_metric_names():
    assert overlap_metric(output_prefix("sparse"), 10) == "sparse_overlap@10"
    assert mrr_metric(output_prefix("colbert")) == f"colbert_mrr@{GROUND_TRUTH_CUTOFF}"
    assert recall_metric(output_prefix("hybrid"), 20) == "hybrid_recall@20"
    assert (SPARSE_SPEARMAN, COLBERT_SPEARMAN) == ("alignment_sparse_spearman", "alignment_colbert_spearman")
    with pytest.raises(ValueError, match="unknown M3 output"):
        output_prefix("dense")


def test_m3_overlap_compares_short_lists_over_the_longer_one():
    # Sparse search leaves out contexts that share no token: the same two contexts agree fully, none at all too.
    top_a = np.array([[3, 4, -1], [-1, -1, -1], [1, 2, 3]])
    top_b = np.array([[4, 3, -1], [-1, -1, -1], [1, -1, -1]])
    assert top_k_overlap(top_a, top_b, 3, short_lists="longer") == pytest.approx((1 + 1 + 1 / 3) / 3)
    assert top_k_overlap(top_a, top_b, 3) == pytest.approx((2 / 3 + 0 + 1 / 3) / 3)


def test_an_m3_students_onnx_exports_are_evaluated_on_every_output(m3_folders, small_dataset, tmp_path):
    from m3distill import export_student
    from m3distill.config import ExportConfig
    from m3distill.layout import STUDENT_METADATA_FILE

    student = tmp_path / "students" / "student-m3"
    shutil.copytree(m3_folders["with_heads"], student)
    (student / STUDENT_METADATA_FILE).write_text(json.dumps({"name": student.name}), encoding="utf-8")
    export_student(student, ExportConfig(), show_progress=False)
    report = evaluate_models(small_dataset, TeacherConfig(model=str(m3_folders["teacher"])), [student], CONFIG,
                             tmp_path / "report", show_progress=False)
    models = {model.name: model for model in report.models}
    assert list(models) == ["teacher", "student-m3", "student-m3 (onnx)", "student-m3 (int8)"]
    for name in ("student-m3 (onnx)", "student-m3 (int8)"):
        for output in M3_RETRIEVAL_OUTPUTS:
            assert all(0.0 <= models[name].metrics[metric] <= 1.0 for metric in _m3_metric_names(output))
    pairs = {(pair.a, pair.b): pair.metrics for pair in report.pairs}
    # The float32 graph returns the torch student's top-k on every output; int8 stays close to it.
    fp32 = pairs[("student-m3", "student-m3 (onnx)")]
    assert {metric: value for metric, value in fp32.items() if value < 0.99} == {}
    assert len(fp32) == len(KS) * (1 + len(M3_RETRIEVAL_OUTPUTS))
    int8 = pairs[("student-m3", "student-m3 (int8)")]
    assert all(value > 0.5 for value in int8.values())
    markdown = (tmp_path / "report" / REPORT_MD_FILE).read_text(encoding="utf-8")
    serving = markdown[markdown.index("## Serving variants"):]
    # One row per output and runtime in the serving section: sparse of the int8 export among them.
    assert "Per output of bge-m3" in serving and "| sparse | student-m3 (int8) | ONNX int8 |" in serving
    assert all(model.metrics["speed_outputs"] == "dense+sparse+colbert" for model in report.models)
    assert ("teacher, student-m3, student-m3 (onnx), student-m3 (int8) were timed producing dense, sparse and "
            "ColBERT outputs at once") in markdown
