"""Nothing of the user's is ever deleted: m3distill removes or replaces only folders carrying its own marker, checks
its inputs before it removes anything, and replaces an output only once the new one is complete."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from lock_holder import held_by_another_process
from sentence_transformers import SentenceTransformer

from m3distill import pipeline
from m3distill.cli import main
from m3distill.config import (
    EvaluationConfig,
    M3DistillConfig,
    SpeedConfig,
    TeacherConfig,
)
from m3distill.errors import M3DistillError
from m3distill.evaluation import evaluate as evaluate_module
from m3distill.evaluation.evaluate import EMBEDDINGS_CACHE_DIRNAME, evaluate_models
from m3distill.layout import (
    CONTEXTS_FILE,
    DATASET_MANIFEST_FILE,
    REPORT_JSON_FILE,
    REPORT_MD_FILE,
    RunLayout,
)
from m3distill.students.build import build_student
from m3distill.teacher.cache import build_teacher_cache

TINY_SPEED = SpeedConfig(n_texts=16, batch_size=8, repeats=1, warmup_batches=1, min_seconds_per_repeat=0)


def _user_files(folder: Path) -> dict[str, bytes]:
    """A user's own files, written into ``folder``; returns what they hold so a test can check they survived."""
    files = {"notes.txt": b"my notes, not m3distill's", "thesis/chapter1.md": b"# Chapter 1\n"}
    for name, content in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(content)
    return files


def _assert_intact(folder: Path, files: dict[str, bytes]) -> None:
    for name, content in files.items():
        assert (folder / name).read_bytes() == content, f"{folder / name} was lost"


# --- synth -------------------------------------------------------------------------------------------------------


def _synth_cli(corpus: Path, out: Path, tokenizer: Path, *extra: str) -> list[str]:
    return ["-q", "synth", "--corpus", str(corpus), "--out", str(out), "--tokenizer", str(tokenizer),
            "--max-tokens", "64", "--overlap-tokens", "8", "--dev", "0", "--test", "0", "--no-language-detection",
            *extra]


def test_synth_overwrite_refuses_a_folder_that_is_not_an_m3distill_dataset(few_documents, minilm_path, tmp_path,
                                                                            capsys):
    out = tmp_path / "home"
    out.mkdir()
    files = _user_files(out)

    code = main(_synth_cli(few_documents, out, minilm_path, "--overwrite"))

    error = capsys.readouterr().err.strip()
    assert code == 2 and len(error.splitlines()) == 1
    assert error.startswith("m3distill synth: error:") and str(out) in error and "not an m3distill dataset" in error
    _assert_intact(out, files)
    assert not (out / DATASET_MANIFEST_FILE).exists()


def test_synth_overwrite_still_replaces_its_own_dataset(few_documents, minilm_path, tmp_path, capsys):
    out = tmp_path / "dataset"
    assert main(_synth_cli(few_documents, out, minilm_path)) == 0
    assert main(_synth_cli(few_documents, out, minilm_path, "--seed", "7")) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(_synth_cli(few_documents, out, minilm_path, "--seed", "7", "--overwrite")) == 0
    assert json.loads((out / DATASET_MANIFEST_FILE).read_text(encoding="utf-8"))["seed"] == 7


def test_synth_refuses_a_corpus_inside_its_output_folder(few_documents, minilm_path, tmp_path, capsys):
    out = tmp_path / "dataset"
    assert main(_synth_cli(few_documents, out, minilm_path)) == 0
    corpus = shutil.copytree(few_documents, out / "docs")

    code = main(_synth_cli(corpus, out, minilm_path, "--seed", "7", "--overwrite"))

    error = capsys.readouterr().err.strip()
    assert code == 2 and len(error.splitlines()) == 1 and "lies inside the output folder" in error
    assert sorted(p.name for p in corpus.iterdir()) == sorted(p.name for p in few_documents.iterdir())


def _refusal(code: int, capsys, command: str) -> str:
    """The one line a refused command printed (exit code 2)."""
    error = capsys.readouterr().err.strip()
    assert code == 2 and len(error.splitlines()) == 1, error
    assert error.startswith(f"m3distill {command}: error: ")
    return error


def test_synth_overwrite_refuses_its_own_dataset_holding_the_user_s_files_and_names_them(few_documents, minilm_path,
                                                                                          tmp_path, capsys):
    out = tmp_path / "dataset"
    assert main(_synth_cli(few_documents, out, minilm_path)) == 0
    files = _user_files(out)
    manifest = (out / DATASET_MANIFEST_FILE).read_bytes()

    error = _refusal(main(_synth_cli(few_documents, out, minilm_path, "--seed", "7", "--overwrite")), capsys, "synth")

    assert "holds files m3distill did not write (notes.txt, thesis/)" in error and "move them out" in error
    _assert_intact(out, files)
    assert (out / DATASET_MANIFEST_FILE).read_bytes() == manifest


def test_synth_overwrite_never_replaces_another_stage_s_output_and_says_what_it_is(few_documents, minilm_path,
                                                                                   tiny_cache, tmp_path, capsys):
    cache = shutil.copytree(tiny_cache, tmp_path / "teacher_cache")
    before = sorted(path.relative_to(cache) for path in cache.rglob("*"))

    error = _refusal(main(_synth_cli(few_documents, cache, minilm_path, "--overwrite")), capsys, "synth")

    assert f"{cache} is a teacher cache, not a dataset" in error and "incomplete" not in error
    assert sorted(path.relative_to(cache) for path in cache.rglob("*")) == before


# --- run (the pipeline) --------------------------------------------------------------------------------------------


class _StopAfterSynth(Exception):
    """Raised instead of running the stages after synth: these tests are about what synth may remove."""


@pytest.fixture
def synth_only(monkeypatch):
    """Run the real synth stage and stop the pipeline where the teacher stage would start."""
    from m3distill.stages import TeacherStage

    def stop(self, **kwargs):
        raise _StopAfterSynth(self.name)

    monkeypatch.setattr(TeacherStage, "run", stop)


def _tiny_config(corpus: Path, run_dir: Path) -> M3DistillConfig:
    return M3DistillConfig.model_validate({
        "run_dir": str(run_dir),
        "synth": {"corpus": str(corpus), "max_tokens": 64, "overlap_tokens": 8, "questions_per_context": 1,
                  "splits": {"dev": 0, "test": 0}, "detect_language": False},
        "teacher": {"model": "sentence-transformers/all-MiniLM-L6-v2", "max_seq_length": 64},
        "students": {"layers": [1]},
    })


def test_run_refuses_a_corpus_inside_the_run_dataset_folder_before_removing_anything(few_documents, tmp_path,
                                                                                     synth_only):
    layout = RunLayout(tmp_path / "run")
    corpus = shutil.copytree(few_documents, layout.dataset / "my-corpus")

    with pytest.raises(M3DistillError, match="lies inside"):
        pipeline.run_pipeline(_tiny_config(corpus, layout.root), show_progress=False)

    assert sorted(p.name for p in corpus.iterdir()) == sorted(p.name for p in few_documents.iterdir())


def test_run_cli_names_a_corpus_inside_an_output_folder_in_one_line(few_documents, tmp_path, synth_only, capsys):
    import yaml

    layout = RunLayout(tmp_path / "run")
    corpus = shutil.copytree(few_documents, layout.report / "corpus")
    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml.safe_dump(_tiny_config(corpus, layout.root).model_dump(mode="json")), encoding="utf-8")

    assert main(["-q", "run", str(config_file)]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and str(corpus) in error and "evaluate stage" in error
    assert any(corpus.iterdir())


def test_run_after_a_corpus_typo_keeps_the_good_dataset(few_documents, tmp_path, synth_only):
    layout = RunLayout(tmp_path / "run")
    good = _tiny_config(few_documents, layout.root)
    stages: list[tuple[str, str]] = []
    with pytest.raises(_StopAfterSynth):
        pipeline.run_pipeline(good, show_progress=False)
    contexts = (layout.dataset / CONTEXTS_FILE).read_bytes()

    typo = good.model_copy(update={"synth": good.synth.model_copy(update={"corpus": str(few_documents) + "-typo"})})
    with pytest.raises(M3DistillError, match="typo"):
        pipeline.run_pipeline(typo, show_progress=False)
    assert (layout.dataset / CONTEXTS_FILE).read_bytes() == contexts
    assert (layout.dataset / DATASET_MANIFEST_FILE).is_file()

    # With the typo fixed the dataset is still current: synth is skipped, not redone.
    with pytest.raises(_StopAfterSynth):
        pipeline.run_pipeline(good, show_progress=False, on_stage=lambda stage, event: stages.append((stage, event)))
    assert stages[0] == ("synth", "skip")


def test_a_failed_run_keeps_the_config_of_the_last_good_one_and_logs_the_failure(few_documents, tmp_path, synth_only,
                                                                                   capsys):
    layout = RunLayout(tmp_path / "run")
    good = _tiny_config(few_documents, layout.root)
    with pytest.raises(_StopAfterSynth):
        pipeline.run_pipeline(good, show_progress=False)
    written = layout.config.read_text(encoding="utf-8")
    assert str(few_documents) in written

    typo = tmp_path / "typo.yaml"
    settings = good.model_dump(mode="json")
    settings["synth"]["corpus"] = str(few_documents) + "-typo"
    typo.write_text(yaml.safe_dump(settings), encoding="utf-8")
    assert main(["-q", "run", str(typo)]) == 2
    error = capsys.readouterr().err.strip()

    assert layout.config.read_text(encoding="utf-8") == written  # still what the outputs were made from
    log = layout.log.read_text(encoding="utf-8")
    assert error.endswith(log.strip().splitlines()[-1].split("run failed: ", 1)[1])
    assert "ERROR m3distill.pipeline: run failed: corpus not found" in log and "-typo" in log


def test_rebuilding_the_teacher_cache_removes_only_a_folder_that_carries_m3distill_s_marker(tmp_path):
    from m3distill.stages import TeacherStage

    layout = RunLayout(tmp_path / "run")
    layout.teacher_cache.mkdir(parents=True)
    cache_files = _user_files(layout.teacher_cache)
    stage = TeacherStage(TeacherConfig(), layout.dataset, layout.teacher_cache)
    with pytest.raises(M3DistillError, match="not a teacher cache m3distill wrote"):
        stage.clear()
    _assert_intact(layout.teacher_cache, cache_files)
    (layout.teacher_cache / "manifest.json").write_text("{}", encoding="utf-8")  # a name anyone's folder may hold
    with pytest.raises(M3DistillError, match="not a teacher cache m3distill wrote"):
        stage.clear()
    _assert_intact(layout.teacher_cache, cache_files)


def test_teacher_force_refuses_a_cache_holding_the_user_s_files_and_names_them(small_dataset, tiny_xlmr_path,
                                                                              tiny_cache, tmp_path, capsys):
    cache = shutil.copytree(tiny_cache, tmp_path / "teacher_cache")
    files = _user_files(cache)
    (cache / "shards" / "my-shard-notes.md").write_text("mine", encoding="utf-8")

    error = _refusal(main(["-q", "teacher", "--data", str(small_dataset), "--teacher", str(tiny_xlmr_path), "--out",
                           str(cache), "--device", "cpu", "--force"]), capsys, "teacher")

    assert "holds files m3distill did not write (notes.txt, shards/my-shard-notes.md, thesis/)" in error
    _assert_intact(cache, files)
    assert (cache / "manifest.json").is_file()


def test_a_replaced_folder_that_gained_files_while_the_stage_ran_is_kept(tmp_path, caplog):
    from m3distill.atomic import atomic_dir

    target = tmp_path / "report"
    target.mkdir()
    (target / "report.json").write_text("{}", encoding="utf-8")
    with caplog.at_level("WARNING", logger="m3distill"), atomic_dir(target, overwrite=True,
                                                                    ours=["report.json"]) as tmp:
        (tmp / "report.json").write_text('{"new": 1}', encoding="utf-8")
        (target / "written-meanwhile.txt").write_text("the user's", encoding="utf-8")

    assert (target / "report.json").read_text(encoding="utf-8") == '{"new": 1}'
    [kept] = tmp_path.glob("report.replaced-*")
    assert (kept / "written-meanwhile.txt").read_text(encoding="utf-8") == "the user's"
    assert "written-meanwhile.txt" in caplog.text and str(kept) in caplog.text


# --- train ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_cache(small_dataset, tiny_xlmr_path, tmp_path_factory) -> Path:
    """The tiny XLM-R stand-in's cache of the small dataset."""
    out = tmp_path_factory.mktemp("tiny-cache") / "teacher_cache"
    build_teacher_cache(small_dataset, TeacherConfig(model=str(tiny_xlmr_path), device="cpu"), out, show_progress=False)
    return out


def test_train_refuses_a_student_folder_holding_the_user_s_files(small_dataset, tiny_cache, tmp_path, capsys):
    out = tmp_path / "students"
    (out / "student-1L").mkdir(parents=True)
    files = _user_files(out / "student-1L")

    code = main(["-q", "train", "--data", str(small_dataset), "--cache", str(tiny_cache), "--out", str(out),
                 "--layers", "1", "--max-steps", "1", "--batch-size", "8"])

    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2
    assert error.startswith("m3distill train: error:") and str(out / "student-1L") in error
    assert "not an m3distill student" in error
    _assert_intact(out / "student-1L", files)


def test_train_still_replaces_its_own_unfinished_student(small_dataset, tiny_cache, tmp_path, capsys):
    out = tmp_path / "students"
    (out / "student-1L").mkdir(parents=True)
    (out / "student-1L" / "run.json").write_text(json.dumps({"layers": [0], "strategy": "uniform", "search": None}))
    assert main(["-q", "train", "--data", str(small_dataset), "--cache", str(tiny_cache), "--out", str(out),
                 "--layers", "1", "--max-steps", "1", "--batch-size", "8"]) == 0
    assert (out / "student-1L" / "m3distill_student.json").is_file()


def test_train_resumes_no_checkpoints_of_another_plan_and_keeps_them(small_dataset, tiny_cache, tmp_path, capsys):
    # Resuming is the default: checkpoints of a run started with other layers are refused, not trained on.
    student = tmp_path / "students" / "student-1L"
    (student / "checkpoints" / "checkpoint-1").mkdir(parents=True)
    (student / "run.json").write_text(json.dumps({"layers": [0], "strategy": "uniform", "search": None}))
    files = sorted(path.relative_to(student) for path in student.rglob("*"))
    assert main(["-q", "train", "--data", str(small_dataset), "--cache", str(tiny_cache), "--out",
                 str(tmp_path / "students"), "--layers", "1", "--max-steps", "1", "--batch-size", "8"]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error == (f"m3distill train: error: {student} was started with layers [0], not [3]; resume with the same "
                     "plan or delete the folder")
    assert sorted(path.relative_to(student) for path in student.rglob("*")) == files


@pytest.fixture(scope="module")
def trained_students(small_dataset, tiny_cache, tmp_path_factory) -> Path:
    """A students folder holding one trained 1-layer student of the tiny stand-in (read-only: copy it)."""
    out = tmp_path_factory.mktemp("trained") / "students"
    assert main(["-q", "train", "--data", str(small_dataset), "--cache", str(tiny_cache), "--out", str(out),
                 "--layers", "1", "--max-steps", "1", "--batch-size", "8", "--eval-steps", "1"]) == 0
    return out


def _train_cli(small_dataset: Path, tiny_cache: Path, out: Path, *extra: str) -> list[str]:
    return ["-q", "train", "--data", str(small_dataset), "--cache", str(tiny_cache), "--out", str(out), "--layers",
            "1", "--max-steps", "1", "--batch-size", "8", "--eval-steps", "1", *extra]


def test_train_force_refuses_a_student_holding_the_user_s_own_onnx_folder(small_dataset, tiny_cache, trained_students,
                                                                          tmp_path, capsys):
    out = shutil.copytree(trained_students, tmp_path / "students")
    student = out / "student-1L"
    (student / "onnx").mkdir()
    (student / "onnx" / "model.onnx").write_bytes(b"the user's own export")
    files = _user_files(student)
    weights = (student / "model.safetensors").read_bytes()

    error = _refusal(main(_train_cli(small_dataset, tiny_cache, out, "--force")), capsys, "train")

    assert f"{student} holds files m3distill did not write (notes.txt, onnx/, thesis/)" in error
    assert "retraining the student would remove them" in error
    assert (student / "onnx" / "model.onnx").read_bytes() == b"the user's own export"
    _assert_intact(student, files)
    assert (student / "model.safetensors").read_bytes() == weights


def test_export_force_refuses_an_export_holding_the_user_s_files_and_names_them(trained_students, tmp_path, capsys):
    student = shutil.copytree(trained_students / "student-1L", tmp_path / "student-1L")
    export = ["-q", "export", str(student), "--variants", "onnx", "--verify-texts", "8"]
    assert main(export) == 0
    capsys.readouterr()
    (student / "onnx" / "benchmark.txt").write_text("my timings", encoding="utf-8")
    graph = (student / "onnx" / "model.onnx").read_bytes()

    error = _refusal(main([*export, "--force"]), capsys, "export")

    assert f"{student / 'onnx'} holds files m3distill did not write (benchmark.txt)" in error
    assert (student / "onnx" / "benchmark.txt").read_text(encoding="utf-8") == "my timings"
    assert (student / "onnx" / "model.onnx").read_bytes() == graph


# --- a student's identity is its files ----------------------------------------------------------------------------


def _truncate(file: Path) -> None:
    with open(file, "r+b") as handle:
        handle.truncate(file.stat().st_size // 2)


def test_a_student_with_a_truncated_model_is_not_taken_for_a_trained_one(small_dataset, tiny_cache, tiny_xlmr_path,
                                                                         trained_students, tmp_path, capsys):
    out = shutil.copytree(trained_students, tmp_path / "students")
    student = out / "student-1L"
    _truncate(student / "model.safetensors")

    error = _refusal(main(_train_cli(small_dataset, tiny_cache, out)), capsys, "train")
    assert f"{student} is out of date: its files changed since it was trained (model.safetensors changed)" in error
    assert "--force" in error
    for command, argv in {
        "export": ["-q", "export", str(student), "--variants", "onnx"],
        "evaluate": ["-q", "evaluate", "--data", str(small_dataset), "--teacher", str(tiny_xlmr_path), "--students",
                     str(student), "--out", str(tmp_path / "report"), "--k", "5"],
    }.items():
        error = _refusal(main(argv), capsys, command)
        assert f"{student} was changed or damaged since it was trained (model.safetensors changed)" in error
        assert "m3distill train --force" in error

    assert main(_train_cli(small_dataset, tiny_cache, out, "--force")) == 0
    assert "1 steps" in capsys.readouterr().out  # retrained, not "already trained"
    assert main(_train_cli(small_dataset, tiny_cache, out)) == 0
    assert "already trained" in capsys.readouterr().out


def test_a_student_of_an_earlier_m3distill_without_file_hashes_is_still_used_and_its_files_still_guarded(
    small_dataset, tiny_cache, trained_students, tmp_path, capsys, caplog
):
    out = shutil.copytree(trained_students, tmp_path / "students")
    student = out / "student-1L"
    metadata_file = student / "m3distill_student.json"
    metadata = json.loads(metadata_file.read_text(encoding="utf-8"))
    for added_later in ("contents", "files"):
        del metadata[added_later]
    metadata_file.write_text(json.dumps(metadata), encoding="utf-8")

    with caplog.at_level("INFO", logger="m3distill"):  # (without -q, which keeps INFO lines off every handler)
        assert main(_train_cli(small_dataset, tiny_cache, out)[1:]) == 0
    assert "already trained" in capsys.readouterr().out
    assert "did not record the hashes of its files" in caplog.text

    (student / "notes.txt").write_text("mine", encoding="utf-8")
    error = _refusal(main(_train_cli(small_dataset, tiny_cache, out, "--force")), capsys, "train")
    assert "holds files m3distill did not write (notes.txt)" in error


# --- evaluate ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def xlmr_student(tiny_xlmr_path, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("xlmr-student") / "student-2L"
    build_student(SentenceTransformer(str(tiny_xlmr_path), device="cpu"), [0, 2]).save(str(folder))
    return folder


def _good_report(folder: Path) -> dict[str, bytes]:
    files = {REPORT_JSON_FILE: b'{"schema_version": 1, "the": "good report"}\n', REPORT_MD_FILE: b"# Good report\n",
             "p_at_k.png": b"\x89PNG good plot"}
    folder.mkdir(parents=True)
    for name, content in files.items():
        (folder / name).write_bytes(content)
    return files


def test_a_failing_evaluation_leaves_the_previous_report_whole(tiny_xlmr_path, xlmr_student, small_dataset,
                                                               tmp_path, monkeypatch):
    out_dir = tmp_path / "report"
    good = _good_report(out_dir)
    config = EvaluationConfig(k=[5], distractors="test", speed=TINY_SPEED)
    teacher = TeacherConfig(model=str(tiny_xlmr_path))

    def fails(*args, **kwargs):
        raise RuntimeError("the machine ran out of memory")

    with monkeypatch.context() as patch:
        patch.setattr(evaluate_module, "measure_speed", fails)
        with pytest.raises(RuntimeError):
            evaluate_models(small_dataset, teacher, [xlmr_student], config, out_dir, show_progress=False)
    _assert_intact(out_dir, good)
    assert len(list((out_dir / EMBEDDINGS_CACHE_DIRNAME).glob("*.npy"))) == 2  # the rerun resumes from these

    with monkeypatch.context() as patch:
        patch.setattr(evaluate_module, "write_report", fails)  # a failure while the new report is written
        with pytest.raises(RuntimeError):
            evaluate_models(small_dataset, teacher, [xlmr_student], config, out_dir, show_progress=False)
    _assert_intact(out_dir, good)

    report = evaluate_models(small_dataset, teacher, [xlmr_student], config, out_dir, show_progress=False)
    assert json.loads((out_dir / REPORT_JSON_FILE).read_text()) == report.to_json_dict()
    assert (out_dir / REPORT_MD_FILE).read_bytes() != good[REPORT_MD_FILE]
    assert (out_dir / "p_at_k.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out_dir / EMBEDDINGS_CACHE_DIRNAME).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]  # no temp folder left beside it


def test_evaluate_refuses_an_output_folder_that_is_not_a_report(tiny_xlmr_path, xlmr_student, small_dataset, tmp_path,
                                                                capsys):
    out_dir = tmp_path / "papers"
    out_dir.mkdir()
    files = _user_files(out_dir)
    code = main(["-q", "evaluate", "--data", str(small_dataset), "--teacher", str(tiny_xlmr_path), "--students",
                 str(xlmr_student), "--out", str(out_dir), "--k", "5"])
    error = capsys.readouterr().err.strip()
    assert code == 2 and len(error.splitlines()) == 1 and "not an m3distill report folder" in error
    _assert_intact(out_dir, files)
    assert sorted(p.name for p in out_dir.iterdir()) == ["notes.txt", "thesis"]


def test_evaluate_refuses_a_report_folder_holding_the_user_s_files_and_names_them(tiny_xlmr_path, xlmr_student,
                                                                                 small_dataset, tmp_path, capsys):
    out_dir = tmp_path / "report"
    good = _good_report(out_dir)
    mine = {"notes.txt": b"my notes", "data.bin": b"\x00\x01", "sub/nested.md": b"# mine\n"}
    for name, content in mine.items():
        (out_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (out_dir / name).write_bytes(content)

    error = _refusal(main(["-q", "evaluate", "--data", str(small_dataset), "--teacher", str(tiny_xlmr_path),
                           "--students", str(xlmr_student), "--out", str(out_dir), "--k", "5"]), capsys, "evaluate")

    assert f"{out_dir} holds files m3distill did not write (data.bin, notes.txt, sub/)" in error
    _assert_intact(out_dir, {**good, **mine})


# --- one writer per output ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["synth", "teacher", "train", "export", "evaluate", "report"])
def test_a_second_command_writing_the_same_output_is_refused_naming_the_first(
    command, few_documents, minilm_path, small_dataset, tiny_cache, tiny_xlmr_path, trained_students, tmp_path, capsys
):
    students = shutil.copytree(trained_students, tmp_path / "students")
    report = tmp_path / "report"
    _good_report(report)
    output, argv = {
        "synth": (tmp_path / "dataset", _synth_cli(few_documents, tmp_path / "dataset", minilm_path)),
        "teacher": (tmp_path / "cache", ["-q", "teacher", "--data", str(small_dataset), "--teacher",
                                         str(tiny_xlmr_path), "--out", str(tmp_path / "cache"), "--device", "cpu"]),
        "train": (students, _train_cli(small_dataset, tiny_cache, students, "--force")),
        "export": (students, ["-q", "export", str(students / "student-1L"), "--variants", "onnx"]),
        "evaluate": (report, ["-q", "evaluate", "--data", str(small_dataset), "--teacher", str(tiny_xlmr_path),
                              "--students", str(students / "student-1L"), "--out", str(report), "--k", "5"]),
        "report": (report, ["-q", "report", str(report)]),
    }[command]
    before = sorted(path.relative_to(tmp_path) for path in tmp_path.rglob("*"))

    with held_by_another_process("hold_outputs([Path(args[0])], doing=args[1])", str(output), "train") as pid:
        error = _refusal(main(argv), capsys, command)

    assert error.endswith(f"{output} is in use by m3distill process {pid} (train); wait for it to finish or choose "
                          "another output folder")
    assert sorted(path.relative_to(tmp_path) for path in tmp_path.rglob("*")) == before  # nothing touched
    if command == "synth":  # once the first is done, the output is free again
        assert main(argv) == 0
