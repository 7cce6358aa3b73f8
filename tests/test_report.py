"""The report: a typed Report that report.json holds; report.md and the plots are rendered from it alone, and
`m3distill report` redoes them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from sentence_transformers import SentenceTransformer

from m3distill.cli import main
from m3distill.config import EvaluationConfig, SpeedConfig, TeacherConfig
from m3distill.errors import M3DistillError
from m3distill.evaluation.evaluate import evaluate_models
from m3distill.metrics import (
    LAYER_RATIO,
    SPEEDUP,
    SPEEDUP_SUSPECT,
)
from m3distill.layout import REPORT_JSON_FILE, REPORT_MD_FILE, STUDENT_METADATA_FILE
from m3distill.report import (
    REPORT_SCHEMA_VERSION,
    Report,
    find_report_dir,
    load_report,
    render_report,
    write_report,
)
from m3distill.report.plots import P_AT_K_PLOT, QUALITY_VS_SPEED_PLOT
from m3distill.stages.fingerprint import CONTENTS, dataset_fingerprint
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
    # Metadata as a trained student's says what it learnt: the 2-layer student every context of this dataset, the
    # 1-layer one every context of another dataset (which says nothing about this one's test contexts).
    for name, dataset in (("student-2L", dataset_fingerprint(small_dataset)), ("student-1L", "another dataset")):
        metadata = {"data": {"all_contexts": True}, "inputs": {"dataset" + CONTENTS: dataset}}
        (root / "students" / name / STUDENT_METADATA_FILE).write_text(json.dumps(metadata))
    config = EvaluationConfig(k=[2, 4, 8], index=["exact", "hnsw"],
                              speed=SpeedConfig(n_texts=8, batch_size=4, repeats=2, warmup_batches=0,
                                                min_seconds_per_repeat=0))
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


def test_report_json_round_trips_through_the_typed_report(report_copy, tmp_path):
    report = load_report(report_copy)
    assert isinstance(report, Report) and report.schema_version == REPORT_SCHEMA_VERSION == 5
    assert report.to_json_dict() == json.loads((report_copy / REPORT_JSON_FILE).read_text())
    assert [model.role for model in report.models] == ["teacher", "student", "student"]
    assert report.speed.order == "interleaved" and report.speed.repeats == 2
    # Written again from the typed object, every file comes out the same.
    write_report(report, tmp_path / "again")
    for name in (REPORT_JSON_FILE, REPORT_MD_FILE):
        assert (tmp_path / "again" / name).read_text() == (report_copy / name).read_text()


def test_markdown_tables_show_the_json_numbers(report_copy):
    report = load_report(report_copy)
    markdown = (report_copy / REPORT_MD_FILE).read_text()
    for pair in report.pairs:
        for index in ("exact", "hnsw"):
            cells = " | ".join(f"{pair.metrics[f'{index}_overlap@{k}']:.3f}" for k in (2, 4, 8))
            assert f"| {pair.a} vs {pair.b} | {cells} |" in markdown
    for model in report.models:
        metrics = model.metrics
        cells = " | ".join(f"{metrics[name]:.3f}" for name in
                           ("exact_recall@2", "exact_recall@4", "exact_recall@8", "exact_mrr@10", "exact_ndcg@10"))
        assert f"| {model.name} | {cells} |" in markdown
        assert f"| {model.name} | {model.layers} | {metrics['speed_parameters']:,} |" in markdown
        speed = (f"{metrics['speed_texts_per_s']:,.1f} ({metrics['speed_texts_per_s_min']:,.1f}-"
                 f"{metrics['speed_texts_per_s_max']:,.1f}) | {metrics[SPEEDUP]:.2f}x "
                 f"({metrics['speed_speedup_vs_teacher_min']:.2f}x-{metrics['speed_speedup_vs_teacher_max']:.2f}x)")
        assert speed in markdown
    student = report.models[1].metrics
    assert f"{student['alignment_mse_x100']:,.4f}" in markdown
    assert report.alignment_pairs.description in markdown
    assert "the models take turns (teacher, student-2L, student-1L) in each of 2 repeats" in markdown


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


def _suspect_note_lines(markdown: str) -> list[str]:
    return [line for line in markdown.splitlines() if line.startswith("(!) Suspect")]


def test_the_report_says_which_students_learnt_the_test_contexts(report_copy):
    report = load_report(report_copy)
    assert {model.name: model.learnt_test_contexts for model in report.models} == {
        "teacher": None, "student-2L": True, "student-1L": None}
    markdown = (report_copy / REPORT_MD_FILE).read_text()
    assert "student-2L learnt every context of the corpus in training, test ones included" in markdown

    for learnt, note in ((True, "The students learnt every context"), (False, None)):
        for model in report.students:
            model.learnt_test_contexts = learnt
        write_report(report, report_copy)
        markdown = (report_copy / REPORT_MD_FILE).read_text()
        assert (note in markdown) if note else "learnt every context" not in markdown


def test_a_speed_up_above_the_layer_ratio_is_marked_with_a_note(report_copy):
    report = json.loads((report_copy / REPORT_JSON_FILE).read_text())
    # Real timings of these tiny models are noise (they may well be flagged): pin the figures.
    for model, speedup in zip(report["models"][1:], (1.9, 3.5)):
        model["metrics"].update({SPEEDUP: speedup, SPEEDUP_SUSPECT: False})
    (report_copy / REPORT_JSON_FILE).write_text(json.dumps(report))
    assert not _suspect_note_lines(render_report(report_copy).read_text())
    student = report["models"][2]  # the 1-layer student of a 4-layer teacher
    assert student["metrics"][LAYER_RATIO] == 4.0
    student["metrics"].update({SPEEDUP: 6.97, SPEEDUP_SUSPECT: True})
    (report_copy / REPORT_JSON_FILE).write_text(json.dumps(report))
    markdown = render_report(report_copy).read_text()
    row = next(line for line in markdown.splitlines() if line.startswith(f"| {student['name']} | 1 |"))
    assert "6.97x" in row and row.count("(!)") == 1
    [note] = _suspect_note_lines(markdown)
    assert "4.00x for student-1L" in note and note.count(". ") == 0  # one sentence


def test_a_version_1_report_is_migrated(report_copy, tmp_path):
    report = json.loads((report_copy / REPORT_JSON_FILE).read_text())
    # What m3distill 0.1 wrote: no spread, no layer ratio, no suspect flag, sequential timing.
    report["schema_version"] = 1
    for key in ("min_seconds_per_repeat", "order"):
        del report["speed"][key]
    for model in report["models"]:
        for suffix in ("speed_texts_per_s_min", "speed_texts_per_s_max", "speed_speedup_vs_teacher_min",
                       "speed_speedup_vs_teacher_max", LAYER_RATIO, SPEEDUP_SUSPECT):
            model["metrics"].pop(suffix, None)
    report["models"][1]["metrics"][SPEEDUP] = 1.9  # below the 2-layer student's layer ratio of 2
    report["models"][2]["metrics"][SPEEDUP] = 4.5  # above the 1-layer student's layer ratio of 4
    (report_copy / REPORT_JSON_FILE).write_text(json.dumps(report))
    migrated = load_report(report_copy)
    assert migrated.schema_version == 5 and migrated.speed.order == "sequential"
    assert migrated.speed.min_seconds_per_repeat is None
    assert [model.metrics.get(SPEEDUP_SUSPECT) for model in migrated.models] == [None, False, True]
    markdown = render_report(report_copy).read_text()
    assert "each model ran 2 timed passes back to back" in markdown
    assert len(_suspect_note_lines(markdown)) == 1
    assert json.loads((report_copy / REPORT_JSON_FILE).read_text())["schema_version"] == 1  # never rewritten


def test_a_teacher_alone_has_no_pair_plot(report_copy, tmp_path):
    report = load_report(report_copy)
    report = report.model_copy(update={"models": report.models[:1], "pairs": []})
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
    for unknown in (0, "2", None):
        (tmp_path / REPORT_JSON_FILE).write_text(json.dumps({"schema_version": unknown, "models": []}))
        with pytest.raises(M3DistillError, match="unknown schema version"):
            load_report(tmp_path)


def test_a_report_that_does_not_match_its_schema_is_one_line(report_copy, capsys):
    report = json.loads((report_copy / REPORT_JSON_FILE).read_text())
    del report["retrieval"]["k"]
    (report_copy / REPORT_JSON_FILE).write_text(json.dumps(report))
    with pytest.raises(M3DistillError, match=r"does not match report schema 5: retrieval\.k: Field required"):
        load_report(report_copy)
    report["retrieval"]["k"] = [2]
    report["schema_version"] = REPORT_SCHEMA_VERSION + 1
    (report_copy / REPORT_JSON_FILE).write_text(json.dumps(report))
    assert main(["report", str(report_copy)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"schema version {REPORT_SCHEMA_VERSION + 1}" in err
    assert "upgrade m3distill" in err


def test_importing_and_plotting_leave_matplotlibs_backend_alone(report_copy):
    """A program that embeds m3distill keeps the backend it chose (pyplot is never imported by m3distill)."""
    script = f"""
import sys, matplotlib
import m3distill.report, m3distill.report.plots, m3distill.report.markdown
import m3distill.evaluation, m3distill.evaluation.evaluate
from m3distill.report import render_report
render_report({str(report_copy)!r})
print(matplotlib.get_backend(), "matplotlib.pyplot" in sys.modules)
"""
    env = {**os.environ, "MPLBACKEND": "svg"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["svg", "False"]
