"""`m3distill run` / `demo`: every stage from one config, skipped when current, redone when forced or changed."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from m3distill.cli import main
from m3distill.config import load_config
from m3distill.layout import REPORT_JSON_FILE, REPORT_MD_FILE, RunLayout, student_name
from m3distill.pipeline import STAGES, demo_config, run_pipeline

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[1]


def _tiny_config_data(sample_dir: Path, run_dir: Path) -> dict:
    """The demo's pipeline shrunk to seconds: 12 documents, a 1-layer student, 6 training steps."""
    return {
        "run_dir": str(run_dir),
        "synth": {
            "corpus": str(sample_dir / "domain"), "general": str(sample_dir / "general"), "max_documents": 12,
            "max_tokens": 64, "overlap_tokens": 8, "questions_per_context": 1, "general_ratio": 0.2,
            "splits": {"dev": 0.15, "test": 0.2}, "detect_language": False,
        },
        "teacher": {"model": "sentence-transformers/all-MiniLM-L6-v2", "max_seq_length": 64, "batch_size": 32},
        "students": {"layers": [1], "strategy": "uniform"},
        "training": {"max_steps": 6, "eval_steps": 3, "batch_size": 16, "max_dev_texts": 20},
        "evaluation": {"k": [5, 10], "speed": {"n_texts": 16, "batch_size": 16, "repeats": 1, "warmup_batches": 0,
                                                     "min_seconds_per_repeat": 0}},
    }


def _statuses(result) -> dict[str, str]:
    return {stage: info["status"] for stage, info in result.stages.items()}


def test_pipeline_runs_every_stage_then_resumes_redoes_and_reacts_to_changes(sample_dir, tmp_path):
    from m3distill.config import M3DistillConfig

    data = _tiny_config_data(sample_dir, tmp_path / "run")
    config = M3DistillConfig.model_validate(data)

    first = run_pipeline(config, show_progress=False)
    assert _statuses(first) == dict.fromkeys(STAGES, "ran")
    layout = RunLayout(tmp_path / "run")
    report = json.loads((layout.report / REPORT_JSON_FILE).read_text(encoding="utf-8"))
    assert student_name([0]) in (layout.report / REPORT_MD_FILE).read_text(encoding="utf-8")
    assert report["config"]["evaluation"]["k"] == [5, 10]
    report_mtime = (layout.report / REPORT_JSON_FILE).stat().st_mtime_ns

    # A rerun with the same settings touches nothing.
    again = run_pipeline(config, show_progress=False)
    assert _statuses(again) == dict.fromkeys(STAGES, "skipped")
    assert (layout.report / REPORT_JSON_FILE).stat().st_mtime_ns == report_mtime

    # A changed evaluation setting redoes only the evaluation.
    data["evaluation"]["k"] = [3, 6]
    changed = run_pipeline(M3DistillConfig.model_validate(data), show_progress=False)
    assert _statuses(changed) == {"synth": "skipped", "teacher": "skipped", "train": "skipped", "evaluate": "ran"}
    report = json.loads((layout.report / REPORT_JSON_FILE).read_text(encoding="utf-8"))
    assert report["config"]["evaluation"]["k"] == [3, 6]

    # --force train redoes training and everything after it, not the stages before.
    student_weights = next((layout.students / student_name([0])).glob("*.safetensors"))
    trained_at = student_weights.stat().st_mtime_ns
    forced = run_pipeline(M3DistillConfig.model_validate(data), force=["train"], show_progress=False)
    assert _statuses(forced) == {"synth": "skipped", "teacher": "skipped", "train": "ran", "evaluate": "ran"}
    assert student_weights.stat().st_mtime_ns != trained_at


def test_evaluation_in_the_pipeline_reads_the_teacher_from_its_cache(sample_dir, tmp_path, monkeypatch):
    """The evaluate stage takes the teacher's embeddings from the teacher cache instead of encoding again."""
    import m3distill.evaluation.evaluate as evaluate_module
    from m3distill.config import M3DistillConfig
    from m3distill.teacher.cache import TeacherCache

    config = M3DistillConfig.model_validate(_tiny_config_data(sample_dir, tmp_path / "run"))
    run_pipeline(config, show_progress=False)
    layout = RunLayout(tmp_path / "run")

    seen = {}
    original = evaluate_module.evaluate_models

    def spy(*args, in_memory, **kwargs):
        def recording(texts):
            seen["embeddings"] = in_memory.teacher_embeddings(texts)
            seen["texts"] = list(texts)
            return seen["embeddings"]

        return original(*args, in_memory=dataclasses.replace(in_memory, teacher_embeddings=recording), **kwargs)

    monkeypatch.setattr(evaluate_module, "evaluate_models", spy)
    result = run_pipeline(config, force=["evaluate"], show_progress=False)
    assert _statuses(result)["evaluate"] == "ran"
    cached = TeacherCache.open(layout.teacher_cache).get(seen["texts"])
    assert seen["embeddings"] is not None
    assert (seen["embeddings"] == cached).all()


def test_run_command_from_a_config_file_and_its_errors(sample_dir, tmp_path, capsys):
    config_file = tmp_path / "tiny.yaml"
    config_file.write_text(yaml.safe_dump(_tiny_config_data(sample_dir, tmp_path / "from-file")), encoding="utf-8")
    assert main(["-q", "run", str(config_file), "--run-dir", str(tmp_path / "elsewhere")]) == 0
    out = capsys.readouterr().out
    assert f"report: {tmp_path / 'elsewhere' / 'report' / REPORT_MD_FILE}" in out
    assert not (tmp_path / "from-file").exists()
    assert main(["-q", "run", str(config_file), "--run-dir", str(tmp_path / "elsewhere")]) == 0
    assert "nothing, all up to date" in capsys.readouterr().out
    # -q quiets the terminal, not the run's own log: both runs are in it, with the dev evaluations.
    log = (tmp_path / "elsewhere" / "m3distill.log").read_text(encoding="utf-8")
    assert "student-1L step " in log and ": dev " in log
    assert "INFO m3distill.data.synth: synth: " in log

    no_corpus = tmp_path / "no-corpus.yaml"
    no_corpus.write_text(f"run_dir: {tmp_path / 'nc'}\n", encoding="utf-8")
    assert main(["-q", "run", str(no_corpus)]) == 2
    err = capsys.readouterr().err
    assert "no corpus configured" in err and "Traceback" not in err

    assert main(["-q", "run", str(tmp_path / "missing.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err

    with pytest.raises(SystemExit):
        main(["run", str(config_file), "--force", "sideways"])


def test_demo_config_points_at_the_bundled_sample_and_packaged_teacher(tmp_path):
    config = demo_config(tmp_path / "demo")
    assert Path(config.synth.corpus).is_dir() and Path(config.synth.general).is_dir()
    assert any(Path(config.synth.corpus).rglob("*.txt"))
    assert config.students.layers == [3, 2, 1]
    assert config.run_dir == str(tmp_path / "demo")
    from m3distill.models import resolve_model_name

    assert Path(resolve_model_name(config.teacher.model)).is_dir()


def test_bge_m3_config_distils_8_6_4_layer_students_of_bge_m3():
    config = load_config(REPO_ROOT / "configs" / "bge-m3.yaml")
    assert config.teacher.model == "BAAI/bge-m3"
    assert config.students.layers == [8, 6, 4] and config.students.strategy == "spread"
    assert config.evaluation.k == [10, 20, 30, 40, 50]


def test_a_run_directory_in_use_is_refused(sample_dir, tmp_path):
    from m3distill.config import M3DistillConfig
    from m3distill.errors import M3DistillError
    from m3distill.locks import hold_run_dir

    config = M3DistillConfig.model_validate(_tiny_config_data(sample_dir, tmp_path / "run"))
    layout = RunLayout(tmp_path / "run")
    layout.root.mkdir()
    with hold_run_dir(layout.root), pytest.raises(M3DistillError, match="is in use by m3distill process"):
        run_pipeline(config, show_progress=False)
    assert not layout.dataset.exists()


def test_pipeline_on_an_m3_teacher_gives_students_with_heads_and_a_report_of_every_output(sample_dir, tmp_path):
    from m3distill.config import M3DistillConfig
    from m3distill.m3 import is_m3_model, make_m3_test_teacher
    from m3distill.metrics import output_prefix, overlap_metric

    teacher = make_m3_test_teacher(tmp_path / "teacher")
    data = _tiny_config_data(sample_dir, tmp_path / "run")
    data["teacher"]["model"] = str(teacher)
    data["students"] = {"layers": [2], "strategy": "spread"}
    result = run_pipeline(M3DistillConfig.model_validate(data), show_progress=False)
    layout = RunLayout(tmp_path / "run")
    student = layout.students / student_name([0, 5])
    assert is_m3_model(student)
    card = (student / "README.md").read_text(encoding="utf-8")
    assert "BGEM3FlagModel" in card and "ColBERT" in card
    report = json.loads((layout.report / REPORT_JSON_FILE).read_text(encoding="utf-8"))
    assert report["retrieval"]["outputs"] == ["dense", "sparse", "colbert", "hybrid"]
    [pair] = report["pairs"]
    for output in ("sparse", "colbert", "hybrid"):
        for k in (5, 10):
            assert 0 <= pair["metrics"][overlap_metric(output_prefix(output), k)] <= 1
    assert _statuses(result) == dict.fromkeys(STAGES, "ran")

    # New teacher heads leave the dense teacher cache current but make the students (trained against the old
    # heads) and the report stale.
    from m3distill.m3 import attach_random_heads

    attach_random_heads(teacher, seed=1)
    again = run_pipeline(M3DistillConfig.model_validate(data), show_progress=False)
    assert _statuses(again) == {"synth": "skipped", "teacher": "skipped", "train": "ran", "evaluate": "ran"}
