"""Serving variants: a student's ONNX exports (fp32 and int8) are evaluated as models of their own, timed in the
same turns as the torch models, searched like every model, reported in their own table and plot, and a re-export
makes the report stale."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from sentence_transformers import SentenceTransformer

from m3distill.config import EvaluationConfig, ExportConfig, M3DistillConfig, SpeedConfig, TeacherConfig
from m3distill.data.dataset import load_synth_dataset
from m3distill.evaluation import evaluate as evaluate_module
from m3distill.evaluation.evaluate import EMBEDDINGS_CACHE_DIRNAME, evaluate_models
from m3distill import export_student
from m3distill.layout import REPORT_JSON_FILE, REPORT_MD_FILE
from m3distill.metrics import (
    LAYER_RATIO,
    PARAMETERS,
    SIZE_ON_DISK,
    SPEEDUP,
    SPEEDUP_SUSPECT,
    TEXTS_PER_S,
    WEIGHTS_BYTES,
)
from m3distill.models import count_parameters
from m3distill.onnx_serving import OnnxEncoder
from m3distill.report import load_report, render_report, variant_label
from m3distill.report.plots import QUALITY_VS_SPEED_PLOT
from m3distill.stages.evaluate import REPORT_INPUTS_FILE, EvaluateStage
from m3distill.students.build import build_student

TINY_SPEED = SpeedConfig(n_texts=16, batch_size=8, repeats=1, warmup_batches=1, min_seconds_per_repeat=0)
# Only test contexts are indexed, to keep encoding short.
CONFIG = EvaluationConfig(k=[5, 10], distractors="test", speed=TINY_SPEED)
EXPORT = ExportConfig(verify_texts=16)


@pytest.fixture(scope="module")
def students(minilm_teacher, tmp_path_factory) -> dict[str, Path]:
    """A 1-layer MiniLM student exported to ONNX fp32 and int8, and a 2-layer one left unexported."""
    root = tmp_path_factory.mktemp("onnx-students")
    folders = {}
    for layers in ([5], [0, 5]):
        folder = root / f"student-{len(layers)}L"
        build_student(minilm_teacher, layers).save(str(folder))
        folders[folder.name] = folder
    export_student(folders["student-1L"], EXPORT, show_progress=False)
    return folders


@pytest.fixture(scope="module")
def evaluated(minilm_path, students, small_dataset, tmp_path_factory):
    """(report, report folder) of the teacher, both students and the 1-layer student's two exports."""
    out_dir = tmp_path_factory.mktemp("onnx-report") / "report"
    report = evaluate_models(small_dataset, TeacherConfig(model=str(minilm_path)), list(students.values()), CONFIG,
                             out_dir, show_progress=False)
    return report, out_dir


def _test_texts(dataset_dir: Path) -> tuple[list[str], list[str]]:
    dataset = load_synth_dataset(dataset_dir)
    return list(dataset.split_questions("test")["text"]), list(dataset.split_contexts("test")["text"])


def _top(questions: np.ndarray, contexts: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-(questions @ contexts.T), axis=1, kind="stable")[:, :k]


def test_each_export_is_a_model_of_its_own_beside_its_torch_student(evaluated, students):
    report, _ = evaluated
    onnx, int8 = variant_label("student-1L", "onnx"), variant_label("student-1L", "int8")
    assert (onnx, int8) == ("student-1L (onnx)", "student-1L (int8)")
    assert [model.name for model in report.models] == ["teacher", "student-1L", onnx, int8, "student-2L"]
    by_name = {model.name: model for model in report.models}
    assert [(by_name[name].variant, by_name[name].variant_of) for name in (onnx, int8)] == [
        ("onnx", "student-1L"), ("int8", "student-1L")]
    assert by_name["student-1L"].variant is None and by_name[onnx].device == "cpu"
    assert by_name[onnx].layers == by_name["student-1L"].layers == 1
    assert by_name[int8].source.endswith("onnx/model_qint8_quantized.onnx")
    parameters = count_parameters(SentenceTransformer(str(students["student-1L"]), device="cpu"))
    for name in (onnx, int8):
        metrics = by_name[name].metrics
        encoder = OnnxEncoder(students["student-1L"], by_name[name].variant)
        # Timed in the same run as the torch models, against the torch teacher.
        assert metrics[TEXTS_PER_S] > 0 and metrics[SPEEDUP] > 0
        assert metrics[LAYER_RATIO] == 6.0 and metrics[SPEEDUP_SUSPECT] is False
        assert metrics[PARAMETERS] == parameters
        assert metrics[WEIGHTS_BYTES] == metrics[SIZE_ON_DISK] == encoder.weights_bytes
        # Searched and aligned like every student.
        assert 0 < metrics["exact_mrr@10"] <= 1 and "exact_recall@5" in metrics and "exact_ndcg@10" in metrics
        assert 0 < metrics["alignment_mean_cosine"] <= 1 and "alignment_spearman_cosine" in metrics
    # Only the layers' matrices are quantised; a 1-layer student's weights are mostly its fp32 embedding table.
    assert by_name[int8].metrics[WEIGHTS_BYTES] < by_name[onnx].metrics[WEIGHTS_BYTES]
    # A variant is compared with the teacher, its torch student and its sibling; not with another student.
    pairs = {frozenset((pair.a, pair.b)) for pair in report.pairs}
    for name in (onnx, int8):
        assert {frozenset(("teacher", name)), frozenset(("student-1L", name))} <= pairs
        assert frozenset(("student-2L", name)) not in pairs
    assert frozenset((onnx, int8)) in pairs and frozenset(("student-2L", "student-1L")) in pairs
    assert len(pairs) == 3 + 2 * 2 + 1


def test_the_fp32_export_retrieves_what_its_torch_student_retrieves(evaluated, students, small_dataset):
    report, _ = evaluated
    questions, contexts = _test_texts(small_dataset)
    torch_student = SentenceTransformer(str(students["student-1L"]), device="cpu")
    onnx = OnnxEncoder(students["student-1L"], "onnx")
    expected = _top(torch_student.encode(questions), torch_student.encode(contexts), 10)
    found = _top(onnx.encode(questions), onnx.encode(contexts), 10)
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, expected)])
    assert overlap >= 0.99
    measured = report.pair_metric("student-1L", "student-1L (onnx)", "exact_overlap@10")
    assert measured >= 0.99 and measured == pytest.approx(overlap, abs=0.01)
    assert 0 < report.pair_metric("student-1L", "student-1L (int8)", "exact_overlap@10") <= 1
    assert report.pair_metric("teacher", "student-1L (onnx)", "exact_overlap@10") == pytest.approx(
        report.pair_metric("teacher", "student-1L", "exact_overlap@10"), abs=0.02)


def test_serving_table_speed_rows_and_plot_include_the_exports(evaluated):
    report, out_dir = evaluated
    markdown = (out_dir / REPORT_MD_FILE).read_text()
    section = markdown.split("## Serving variants")[1].split("\n## ")[0]
    print("## Serving variants" + section)  # the table as a user reads it (pytest -s)
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| model")]
    assert [row.split(" | ")[0:2] for row in rows] == [
        ["| teacher", "torch"], ["| student-1L", "torch"], ["| student-1L (onnx)", "ONNX fp32"],
        ["| student-1L (int8)", "ONNX int8"]]
    int8 = next(model for model in report.models if model.variant == "int8")
    teacher_mrr = report.teacher.metrics["exact_mrr@10"]
    share = f"{int8.metrics['exact_mrr@10'] / teacher_mrr:.1%}"
    versus_self = report.pair_metric(int8.name, "student-1L", "exact_overlap@10")
    assert (f"| {versus_self:.3f} | {int8.metrics['exact_mrr@10']:.3f} | {share} |") in rows[3]
    assert f"{int8.metrics[SPEEDUP]:.2f}x" in rows[3]
    speed = markdown.split("## Speed and size")[1].split("\n## ")[0]
    for model in report.models:
        assert f"| {model.name} | {model.layers} |" in speed
    assert (out_dir / QUALITY_VS_SPEED_PLOT).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_switching_onnx_variants_off_leaves_the_exports_out(minilm_path, students, small_dataset, tmp_path):
    config = CONFIG.model_copy(update={"onnx_variants": False})
    report = evaluate_models(small_dataset, TeacherConfig(model=str(minilm_path)), [students["student-1L"]], config,
                             tmp_path / "report", show_progress=False)
    assert [model.name for model in report.models] == ["teacher", "student-1L"]
    assert "Serving variants" not in (tmp_path / "report" / REPORT_MD_FILE).read_text()


def test_on_a_gpu_the_exports_get_cpu_texts_per_s_and_no_speed_up(evaluated, tmp_path):
    # What a CUDA evaluation writes (no GPU here: the report is edited): the torch models on the GPU, the exports
    # on onnxruntime's CPU provider without a speed-up, since it would compare the hardware.
    _, out_dir = evaluated
    report = json.loads((out_dir / REPORT_JSON_FILE).read_text())
    report["device"]["name"] = "cuda"
    for model in report["models"]:
        if model["variant"]:
            model["metrics"].update({SPEEDUP: None, "speed_speedup_vs_teacher_min": None,
                                     "speed_speedup_vs_teacher_max": None})
        else:
            model["device"] = "cuda"
    folder = tmp_path / "gpu"
    folder.mkdir()
    (folder / REPORT_JSON_FILE).write_text(json.dumps(report))
    markdown = render_report(folder).read_text()
    row = next(line for line in markdown.splitlines() if line.startswith("| student-1L (int8) | ONNX int8 | `cpu` |"))
    assert row.split(" | ")[4] == "n/a"
    assert "the variants ran on `cpu`, so their speed-up would compare the hardware and is n/a" in markdown


def test_a_version_3_report_still_loads(evaluated, tmp_path):
    _, out_dir = evaluated
    report = json.loads((out_dir / REPORT_JSON_FILE).read_text())
    # What the previous m3distill wrote: no variants, no per-model device.
    report["schema_version"] = 3
    variants = {model["name"] for model in report["models"] if model["variant"]}
    report["models"] = [model for model in report["models"] if not model["variant"]]
    report["pairs"] = [pair for pair in report["pairs"] if not {pair["a"], pair["b"]} & variants]
    for model in report["models"]:
        for key in ("variant", "variant_of", "device"):
            del model[key]
    folder = tmp_path / "v3"
    folder.mkdir()
    (folder / REPORT_JSON_FILE).write_text(json.dumps(report))
    migrated = load_report(folder)
    assert migrated.schema_version == 5
    assert [(model.variant, model.device) for model in migrated.models] == [(None, report["device"]["name"])] * 3
    assert "Serving variants" not in render_report(folder).read_text()


def test_a_re_export_makes_the_report_stale_and_re_keys_the_exports_embeddings(minilm_path, students, small_dataset,
                                                                               evaluated, tmp_path, monkeypatch,
                                                                               caplog):
    student = shutil.copytree(students["student-1L"], tmp_path / "students" / "student-1L")
    config = M3DistillConfig(teacher=TeacherConfig(model=str(minilm_path)), evaluation=CONFIG)
    stage = EvaluateStage(config, small_dataset, tmp_path / "report", students=[student])
    stopped = tmp_path / "stopped"  # evaluations stopped after encoding: their embeddings cache stays

    def embeddings_files() -> set[str]:
        return {path.name for path in (stopped / EMBEDDINGS_CACHE_DIRNAME).glob("*.npy")}

    def evaluate_until_speed() -> None:
        def interrupted(*args, **kwargs):
            raise KeyboardInterrupt

        with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
            patch.setattr(evaluate_module, "measure_speed", interrupted)
            evaluate_models(small_dataset, config.teacher, [student], CONFIG, stopped, show_progress=False)

    evaluate_until_speed()
    first = embeddings_files()
    assert {name.rsplit("-", 1)[0] for name in first} == {"teacher", "student-1L", "student-1L-onnx",
                                                          "student-1L-int8"}
    # The module's report of the same student, teacher, dataset and settings, recorded as the stage records it.
    shutil.copytree(evaluated[1], tmp_path / "report")
    (tmp_path / "report" / REPORT_INPUTS_FILE).write_text(json.dumps(stage.fingerprint().to_record()))
    assert stage.status().current

    export_student(student, EXPORT, show_progress=False, force=True)
    status = stage.status()
    assert status.state == "stale" and "student-1L.onnx_export contents changed" in status.reason
    off = EvaluateStage(M3DistillConfig(teacher=config.teacher, evaluation=CONFIG.model_copy(
        update={"onnx_variants": False})), small_dataset, tmp_path / "other", students=[student])
    assert not any("onnx_export" in part for part in off.fingerprint().parts)

    with caplog.at_level(logging.INFO, logger="m3distill.evaluation.evaluate"):
        evaluate_until_speed()
    # The torch models' embeddings are reused; the exports' are new entries, encoded again.
    new = embeddings_files() - first
    assert {name.rsplit("-", 1)[0] for name in new} == {"student-1L-onnx", "student-1L-int8"}
    reused = [message for message in caplog.messages if "reusing embeddings" in message]
    assert sorted(message.split(":")[0] for message in reused) == ["student-1L", "teacher"]
