"""The CLI is a shell over the Python API: every default and rule lives in the API or its stage, and the commands
and the functions decide alike (what the CLI used to decide alone is tested here through the API)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from lock_holder import held_by_another_process

import m3distill
from m3distill.cli import main
from m3distill.config import M3DistillConfig, TeacherConfig
from m3distill.errors import M3DistillError
from m3distill.stages import TrainStage
from m3distill.teacher.cache import build_teacher_cache, cache_fingerprint


@pytest.fixture(scope="module")
def tiny_cache(small_dataset, tiny_xlmr_path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny-cache") / "teacher_cache"
    build_teacher_cache(small_dataset, TeacherConfig(model=str(tiny_xlmr_path), device="cpu"), out, show_progress=False)
    return out


def test_the_train_stage_takes_the_teacher_that_made_the_cache_unless_the_config_names_one(
    small_dataset, tiny_cache, minilm_path, tmp_path
):
    # Was the train command's rule alone ("--teacher absent: the cache's teacher"); the API refused instead.
    default = TrainStage(M3DistillConfig(), small_dataset, tiny_cache, tmp_path / "students")
    assert default.teacher.model == cache_fingerprint(tiny_cache).name
    default.check_inputs()  # the cache's own teacher: nothing to refuse

    named = M3DistillConfig(teacher=TeacherConfig(model=str(minilm_path)))
    with pytest.raises(M3DistillError, match="made by another teacher: teacher.model contents changed"):
        m3distill.train(named, dataset_dir=small_dataset, cache_dir=tiny_cache, out_dir=tmp_path / "students")
    assert not (tmp_path / "students").exists()


def _train_argv(small_dataset: Path, tiny_cache: Path, out: Path, *extra: str) -> list[str]:
    return ["-q", "train", "--data", str(small_dataset), "--cache", str(tiny_cache), "--out", str(out), "--layers", "1",
            "--max-steps", "1", *extra]


@pytest.mark.parametrize(("flag", "resume"), [((), True), (("--resume",), True), (("--no-resume",), False)])
def test_train_resumes_by_default_in_the_command_as_in_the_api(flag, resume, small_dataset, tiny_cache, tmp_path,
                                                               monkeypatch):
    assert TrainStage.__init__.__kwdefaults__["resume"] is True
    seen = {}

    def distil(*args, resume, **kwargs):
        seen["resume"] = resume
        raise KeyboardInterrupt  # enough: the stage has handed over

    monkeypatch.setattr("m3distill.training.distil_students", distil)
    assert main(_train_argv(small_dataset, tiny_cache, tmp_path / "students", *flag)) == 130
    assert seen == {"resume": resume}


def test_evaluate_without_a_students_folder_is_refused_by_the_api_as_by_the_command(tmp_path, capsys):
    config = M3DistillConfig(run_dir=str(tmp_path / "run"))
    with pytest.raises(M3DistillError, match=f"no students in {tmp_path / 'run' / 'students'}: train some"):
        m3distill.evaluate(config)
    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "run")}), encoding="utf-8")
    assert main(["-q", "evaluate", "--config", str(config_file)]) == 2
    assert "no students in" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_the_api_exports_the_run_s_students(tmp_path):
    config = M3DistillConfig(run_dir=str(tmp_path / "run"))
    with pytest.raises(M3DistillError, match=f"not found: {tmp_path / 'run' / 'students'}"):
        m3distill.export(config)
    student = tmp_path / "run" / "students" / "student-1L"
    student.mkdir(parents=True)
    (student / "modules.json").write_text("[]")
    with pytest.raises(M3DistillError, match="dataset directory not found"):  # a dataset asked for must be there
        m3distill.export(config, students=[student], dataset_dir=tmp_path / "no-dataset")


def test_the_api_s_export_stays_the_function_once_the_exporting_package_is_imported():
    # A worker package named like the API function would replace it on m3distill the moment it is first imported.
    import m3distill.exporting.student  # noqa: F401

    assert callable(m3distill.export) and m3distill.export.__module__ == "m3distill"
    assert m3distill.ExportResult is m3distill.exporting.ExportResult


@pytest.mark.parametrize("command", ["synth", "teacher", "train", "export", "evaluate"])
def test_the_commands_leave_every_default_folder_to_the_api(command, monkeypatch):
    """A folder flag left out reaches the API as None: the API alone knows the run directory's layout."""
    api = {"synth": "synth", "teacher": "teacher_cache", "train": "train", "export": "export",
           "evaluate": "evaluate"}[command]
    seen = {}

    def record(config, **kwargs):
        seen.update(kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(m3distill, api, record)
    assert main(["-q", command]) == 130
    folders = {key: value for key, value in seen.items()
               if key in ("out_dir", "dataset_dir", "cache_dir", "students")}
    assert folders and set(folders.values()) == {None}, seen


@pytest.mark.parametrize("command", ["synth", "teacher", "train", "export", "evaluate", "report"])
def test_a_command_writing_into_a_run_directory_in_use_is_refused_as_the_pipeline_is(command, tmp_path, capsys):
    run_dir = tmp_path / "run"
    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml.safe_dump({"run_dir": str(run_dir), "synth": {"corpus": str(tmp_path)}}),
                           encoding="utf-8")
    argv = ["-q", command, str(run_dir)] if command == "report" else ["-q", command, "--config", str(config_file)]
    if command == "report":
        (run_dir / "report").mkdir(parents=True)
        (run_dir / "report" / "report.json").write_text("{}")
    if command == "export":
        (run_dir / "students" / "student-1L").mkdir(parents=True)
        (run_dir / "students" / "student-1L" / "modules.json").write_text("[]")
        argv.append(str(run_dir / "students" / "student-1L"))
    with held_by_another_process("hold_run_dir(args[0])", str(run_dir)) as pid:
        assert main(argv) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error == (f"m3distill {command}: error: run directory {run_dir} is in use by m3distill process {pid} (run); "
                     "wait for it to finish or use another run directory")


def test_the_pipeline_s_stage_runs_are_typed():
    run = m3distill.StageRun("ran", 1.5, "training.max_steps is 10 now, 6 when it was made")
    assert (run.status, run.seconds, run["status"]) == ("ran", 1.5, "ran")
    with pytest.raises(KeyError):
        m3distill.StageRun("skipped")["reason"]
