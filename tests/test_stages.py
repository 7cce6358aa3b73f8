"""Stages decide alike alone and in the pipeline: current outputs are reused, stale ones redone (pipeline) or
refused with the flag that redoes them (standalone), never silently reused; the Python API runs the README."""

from __future__ import annotations

import json
import logging
import re
import runpy
import shutil
from pathlib import Path

import pytest
import yaml

import m3distill
from m3distill.cli import main
from m3distill.config import M3DistillConfig
from m3distill.layout import REPORT_JSON_FILE, RunLayout
from m3distill.pipeline import STAGES, run_pipeline
from m3distill.stages import EvaluateStage, TrainStage, run_stages
from m3distill.training import is_trained_student, read_student_metadata

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[1]
STUDENT = "student-1L"


def _config(corpus: Path, general: Path, run_dir: Path, **training) -> M3DistillConfig:
    """A whole pipeline in seconds: a few documents, one 1-layer student, 6 training steps."""
    return M3DistillConfig.model_validate({
        "run_dir": str(run_dir),
        "synth": {"corpus": str(corpus), "general": str(general), "max_tokens": 64, "overlap_tokens": 8,
                  "questions_per_context": 1, "general_ratio": 0.2, "splits": {"dev": 0.15, "test": 0.2},
                  "detect_language": False},
        "teacher": {"model": "sentence-transformers/all-MiniLM-L6-v2", "max_seq_length": 64, "batch_size": 32},
        "students": {"layers": [1], "strategy": "uniform"},
        "training": {"max_steps": 6, "eval_steps": 3, "batch_size": 16, "max_dev_texts": 20, **training},
        "evaluation": {"k": [5, 10], "speed": {"n_texts": 16, "batch_size": 16, "repeats": 1, "warmup_batches": 0,
                                                     "min_seconds_per_repeat": 0}},
    })


def _statuses(result) -> dict[str, str]:
    return {stage: info["status"] for stage, info in result.stages.items()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory, sample_dir) -> Path:
    """A folder with ``corpus/``, ``general/`` (a few sample documents) and ``run/``, a finished run on them."""
    base = tmp_path_factory.mktemp("finished")
    for kind, languages, per_language in (("domain", ("en", "de", "fr"), 3), ("general", ("en",), 2)):
        for language in languages:
            target = base / ("corpus" if kind == "domain" else "general") / language
            target.mkdir(parents=True)
            for file in sorted((sample_dir / kind / language).glob("*.txt"))[:per_language]:
                shutil.copy(file, target / file.name)
    result = run_pipeline(_config(base / "corpus", base / "general", base / "run"), show_progress=False)
    assert _statuses(result) == dict.fromkeys(STAGES, "ran")
    return base


@pytest.fixture
def copy_of_run(finished, tmp_path) -> Path:
    """The finished run and its corpus, copied to another place (so its absolute paths all differ)."""
    return Path(shutil.copytree(finished, tmp_path / "moved"))


def _write_config(folder: Path, config: M3DistillConfig) -> Path:
    path = folder / "run.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")), encoding="utf-8")
    return path


def test_a_moved_run_is_current_and_an_edited_corpus_file_redoes_synth_and_everything_after(copy_of_run):
    config = _config(copy_of_run / "corpus", copy_of_run / "general", copy_of_run / "run")
    # Same contents reached by other paths: nothing to redo.
    assert _statuses(run_pipeline(config, show_progress=False)) == dict.fromkeys(STAGES, "skipped")

    edited = min((copy_of_run / "corpus" / "en").glob("*.txt"))
    edited.write_text(edited.read_text(encoding="utf-8") + "\n\nA brand-new closing paragraph about tar archives "
                      "and their compression flags, added after the first run.\n", encoding="utf-8")
    result = run_pipeline(config, show_progress=False)
    assert _statuses(result) == dict.fromkeys(STAGES, "ran")
    assert "synth.corpus contents changed" in result.stages["synth"]["reason"]
    assert "dataset contents changed" in result.stages["teacher"]["reason"]


def test_stages_run_one_by_one_from_the_config_are_current_for_run(finished, tmp_path, capsys):
    # What the refusal of `run` under torchrun tells a user to do: synth, teacher and train one command each (the
    # last two under torchrun), then `run`, which must find them current and only evaluate.
    config = _config(finished / "corpus", finished / "general", tmp_path / "run")
    path = _write_config(tmp_path, config)
    for stage in ("synth", "teacher", "train"):
        assert main(["-q", stage, "--config", str(path)]) == 0, capsys.readouterr().err
    result = run_pipeline(config, show_progress=False)
    assert _statuses(result) == {"synth": "skipped", "teacher": "skipped", "train": "skipped", "evaluate": "ran"}


def test_train_with_a_changed_setting_is_refused_alone_and_retrained_by_the_pipeline(copy_of_run, capsys):
    run_dir = copy_of_run / "run"
    student = RunLayout(run_dir).student(STUDENT)
    config = _config(copy_of_run / "corpus", copy_of_run / "general", run_dir, max_steps=8)
    config_file = _write_config(copy_of_run, config)
    before = (student / "model.safetensors").read_bytes()

    assert main(["-q", "train", "--config", str(config_file)]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1
    assert str(student) in error and "training.max_steps is 8 now, 6 when it was made" in error and "--force" in error
    assert (student / "model.safetensors").read_bytes() == before  # refused: nothing touched

    result = run_pipeline(config, show_progress=False)
    assert _statuses(result) == {"synth": "skipped", "teacher": "skipped", "train": "ran", "evaluate": "ran"}
    assert read_student_metadata(student)["training"]["global_step"] == 8
    assert TrainStage(config, run_dir / "dataset", run_dir / "teacher_cache", run_dir / "students").is_current()
    assert sorted(p.name for p in (run_dir / "students").iterdir()) == [STUDENT]  # the old one is gone, no leftovers

    # Standalone with --force retrains a current student too.
    assert main(["-q", "train", "--config", str(config_file), "--force"]) == 0
    assert "8 steps" in capsys.readouterr().out

    # A folder of the user's where a retrain sets the old student aside is refused, never removed.
    users = run_dir / "students" / f".{STUDENT}.replaced"
    users.mkdir()
    (users / "notes.txt").write_text("mine", encoding="utf-8")
    assert main(["-q", "train", "--config", str(config_file), "--force"]) == 2
    assert "m3distill did not write it" in capsys.readouterr().err
    assert (users / "notes.txt").read_text(encoding="utf-8") == "mine" and is_trained_student(student)


def test_a_student_whose_weights_changed_is_retrained_by_run_and_its_report_redone(copy_of_run, capsys):
    from safetensors.torch import load_file, save_file

    run_dir = copy_of_run / "run"
    config = _config(copy_of_run / "corpus", copy_of_run / "general", run_dir)
    weights = RunLayout(run_dir).student(STUDENT) / "model.safetensors"
    # Another student's weights copied in: a valid file, other numbers.
    save_file({name: tensor + 0.01 for name, tensor in load_file(weights).items()}, weights)

    evaluate = run_stages(config)[-1]
    assert evaluate.status().reason == f"students.{STUDENT} contents changed"
    assert main(["-q", "train", "--config", str(_write_config(copy_of_run, config))]) == 2
    assert "its files changed since it was trained (model.safetensors changed)" in capsys.readouterr().err

    result = run_pipeline(config, show_progress=False)
    assert _statuses(result)["train"] == "ran" and "model.safetensors changed" in result.stages["train"]["reason"]
    # The report is of the weights there now: redone, or current when the retrain gave back the very weights it
    # measured (training is deterministic on a CPU).
    assert run_stages(config)[-1].status().current
    assert _statuses(run_pipeline(config, show_progress=False)) == dict.fromkeys(STAGES, "skipped")


def test_standalone_evaluate_skips_unfinished_students_and_reuses_the_teacher_cache(copy_of_run, capsys, caplog,
                                                                                     monkeypatch):
    from m3distill.evaluation.embeddings_cache import EmbeddingsCache

    run_dir = copy_of_run / "run"
    layout = RunLayout(run_dir)
    half_written = layout.student("student-2L")
    half_written.mkdir()
    (half_written / "run.json").write_text(json.dumps({"layers": [0, 5], "strategy": "uniform", "search": None}))
    (half_written / "checkpoints").mkdir()
    encoded: list[str] = []
    real_encode = EmbeddingsCache.model

    def encode(self, label, *args):
        encoded.append(label)
        return real_encode(self, label, *args)

    monkeypatch.setattr(EmbeddingsCache, "model", encode)
    config_file = _write_config(copy_of_run, _config(copy_of_run / "corpus", copy_of_run / "general", run_dir))
    with caplog.at_level(logging.WARNING, logger="m3distill"):
        assert main(["-q", "evaluate", "--config", str(config_file)]) == 0

    report = json.loads((layout.report / REPORT_JSON_FILE).read_text(encoding="utf-8"))
    assert [model["name"] for model in report["models"]] == ["teacher", STUDENT]
    skipped = [record.getMessage() for record in caplog.records if "skipped" in record.getMessage()]
    assert len(skipped) == 1 and "student-2L (unfinished: rerun train with --resume)" in skipped[0]
    assert encoded == [STUDENT]  # the teacher's embeddings came from the teacher cache

    # The students folder itself, passed where student folders are expected, means the finished students in it.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="m3distill"):
        assert main(["-q", "evaluate", "--config", str(config_file), "--students", str(layout.students),
                     "--out", str(copy_of_run / "report-2")]) == 0
    report = json.loads((copy_of_run / "report-2" / REPORT_JSON_FILE).read_text(encoding="utf-8"))
    assert [model["name"] for model in report["models"]] == ["teacher", STUDENT]
    assert any("student-2L (unfinished" in record.getMessage() for record in caplog.records)


def test_the_report_is_stale_once_a_student_s_weights_change(tmp_path):
    """The report measured the students' files: new weights (a retrain, or another student's copied in) make a
    report of the old ones stale, whatever the metadata beside them says."""
    student = tmp_path / "students" / STUDENT
    student.mkdir(parents=True)
    (student / "model.safetensors").write_bytes(b"the first weights")

    def fingerprint():
        return EvaluateStage(M3DistillConfig(), tmp_path / "dataset", tmp_path / "report",
                             students=[student]).fingerprint()

    first = fingerprint()
    (student / "model.safetensors").write_bytes(b"other weights")
    second = fingerprint()
    assert first.digest != second.digest
    assert second.change(first.parts) == f"students.{STUDENT} contents changed"


def _readme_snippet() -> str:
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)


def test_the_readme_python_api_snippet_runs(finished, tmp_path, monkeypatch, capsys):
    """The README's snippet as written, with demo_config shrunk to the tiny run of these tests."""
    corpus, general = finished / "corpus", finished / "general"
    monkeypatch.setattr(m3distill, "demo_config", lambda run_dir: _config(corpus, general, Path(run_dir)))
    monkeypatch.chdir(tmp_path)

    snippet = tmp_path / "readme_snippet.py"
    snippet.write_text(_readme_snippet(), encoding="utf-8")
    namespace = runpy.run_path(str(snippet))

    assert _statuses(namespace["again"]) == dict.fromkeys(STAGES, "skipped")
    assert namespace["result"].report_dir == Path("my-run/report")
    assert namespace["result"].teacher_from_cache
    mine = json.loads((tmp_path / "my-run" / "report-mine" / REPORT_JSON_FILE).read_text(encoding="utf-8"))
    assert [model["name"] for model in mine["models"]] == ["teacher", "mine"]
    assert STUDENT in capsys.readouterr().out


def test_import_m3distill_gives_the_typed_stage_functions():
    import inspect

    for name in ("synth", "teacher_cache", "train", "evaluate", "run_pipeline", "demo_config", "load_config"):
        assert callable(getattr(m3distill, name)), name
    for name in ("synth", "teacher_cache", "train", "evaluate"):
        signature = inspect.signature(getattr(m3distill, name))
        assert next(iter(signature.parameters)) == "config" and signature.return_annotation != inspect.Signature.empty
