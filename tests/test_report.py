"""The report: report.md and the plots are rendered from report.json alone, and `m3distill report` redoes it."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
from sentence_transformers import SentenceTransformer

from m3distill.cli import main
from m3distill.config import EvaluationConfig, SpeedConfig, TeacherConfig
from m3distill.errors import M3DistillError
from m3distill.evaluation.evaluate import evaluate_models
from m3distill.layout import REPORT_JSON_FILE, REPORT_MD_FILE
from m3distill.report import find_report_dir, load_report, render_report, write_report
from m3distill.report.plots import P_AT_K_PLOT, QUALITY_VS_SPEED_PLOT
from m3distill.students.build import build_student


@pytest.fixture(scope="module")
def run_dir(tiny_xlmr_path, small_dataset, tmp_path_factory):
    """A run directory whose report/ holds an evaluation of the tiny XLM-R teacher and two students (exact + HNSW)."""
    root = tmp_path_factory.mktemp("run")
    teacher = SentenceTransformer(str(tiny_xlmr_path), device="cpu")
    students = []
    for layers in ([0, 2], [3]):
        folder = root / "students" / f"student-{len(layers)}L"
        build_student(teacher, layers).save(str(folder))
        students.append(folder)
    config = EvaluationConfig(k=[2, 4, 8], index=["exact", "hnsw"],
                              speed=SpeedConfig(n_texts=8, batch_size=4, repeats=1, warmup_batches=0))
    evaluate_models(small_dataset, TeacherConfig(model=str(tiny_xlmr_path)), students, config, root / "report",
                    show_progress=False)
    return root


@pytest.fixture
def report_copy(run_dir, tmp_path):
    """A private copy of the report directory, free to modify."""
    return shutil.copytree(run_dir / "report", tmp_path / "report")


def test_rerendering_from_report_json_gives_the_same_markdown(run_dir, report_copy):
    original = (report_copy / REPORT_MD_FILE).read_text()
    for name in (REPORT_MD_FILE, P_AT_K_PLOT, QUALITY_VS_SPEED_PLOT):
        (report_copy / name).unlink()
    assert render_report(report_copy) == report_copy / REPORT_MD_FILE
    assert (report_copy / REPORT_MD_FILE).read_text() == original
    for plot in (P_AT_K_PLOT, QUALITY_VS_SPEED_PLOT):
        assert (report_copy / plot).read_bytes()[:4] == b"\x89PNG"


def test_markdown_tables_show_the_json_numbers(report_copy):
    report = load_report(report_copy)
    markdown = (report_copy / REPORT_MD_FILE).read_text()
    for pair in report["pairs"]:
        for index in ("exact", "hnsw"):
            cells = " | ".join(f"{pair['metrics'][f'{index}_overlap@{k}']:.3f}" for k in (2, 4, 8))
            assert f"| {pair['a']} vs {pair['b']} | {cells} |" in markdown
    for model in report["models"]:
        metrics = model["metrics"]
        cells = " | ".join(f"{metrics[name]:.3f}" for name in
                           ("exact_recall@2", "exact_recall@4", "exact_recall@8", "exact_mrr@10", "exact_ndcg@10"))
        assert f"| {model['name']} | {cells} |" in markdown
        assert f"| {model['name']} | {model['layers']} | {metrics['speed_parameters']:,} |" in markdown
    student = report["models"][1]["metrics"]
    assert f"{student['alignment_mse_x100']:,.4f}" in markdown
    assert report["alignment_pairs"]["description"] in markdown


def test_edited_numbers_show_up_after_rerendering(report_copy):
    report = json.loads((report_copy / REPORT_JSON_FILE).read_text())
    report["pairs"][0]["metrics"]["exact_overlap@4"] = 0.123456
    (report_copy / REPORT_JSON_FILE).write_text(json.dumps(report))
    render_report(report_copy)
    pair = report["pairs"][0]
    assert f"| {pair['a']} vs {pair['b']} | {pair['metrics']['exact_overlap@2']:.3f} | 0.123 |" in (
        report_copy / REPORT_MD_FILE).read_text()


def test_report_command_accepts_a_run_dir_or_a_report_dir(run_dir, report_copy, tmp_path, capsys):
    assert main(["report", str(report_copy)]) == 0
    assert capsys.readouterr().out.strip() == f"report: {report_copy / REPORT_MD_FILE}"
    run_copy = tmp_path / "run"
    (run_copy).mkdir()
    shutil.copytree(report_copy, run_copy / "report")
    assert main(["report", str(run_copy)]) == 0
    assert str(run_copy / "report" / REPORT_MD_FILE) in capsys.readouterr().out
    assert main(["report", str(tmp_path / "nothing-here")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no report.json" in err


def test_a_teacher_alone_has_no_pair_plot(report_copy, tmp_path):
    report = copy.deepcopy(load_report(report_copy))
    report["models"] = report["models"][:1]
    report["pairs"] = []
    out = tmp_path / "alone"
    write_report(report, out)
    assert not (out / P_AT_K_PLOT).exists() and (out / QUALITY_VS_SPEED_PLOT).is_file()
    markdown = (out / REPORT_MD_FILE).read_text()
    assert "(only one model: no pairs)" in markdown and "(no students)" in markdown


def test_unreadable_reports_are_clear_errors(tmp_path):
    with pytest.raises(M3DistillError, match="no report.json"):
        find_report_dir(tmp_path)
    (tmp_path / REPORT_JSON_FILE).write_text("{not json")
    with pytest.raises(M3DistillError, match="not valid JSON"):
        load_report(tmp_path)
    (tmp_path / REPORT_JSON_FILE).write_text(json.dumps({"schema_version": 99, "models": []}))
    with pytest.raises(M3DistillError, match="upgrade m3distill"):
        load_report(tmp_path)
