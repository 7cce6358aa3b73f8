"""Bad inputs a user can give end in one line and exit code 2, never a traceback; and the small things a demanding
user noticed: config paths relative to the config file, ``~``, credentials kept out of RUN_DIR/config.yaml, file
modes, and the names errors give to an unfinished student and a missing general corpus.

An unwritable output location is simulated two ways: a regular file where a folder should be (works for everyone,
root included) and a folder without write permission (skipped as root, whom permissions do not stop).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch
import yaml
from sentence_transformers import SentenceTransformer

from m3distill.atomic import atomic_dir, describe_os_error, ensure_writable_dir
from m3distill.cli import main
from m3distill.config import (
    LLMConfig,
    M3DistillConfig,
    SynthConfig,
    TeacherConfig,
    apply_overrides,
    config_to_yaml,
    load_config,
    redact_url,
)
from m3distill.data.corpus import load_corpus
from m3distill.errors import M3DistillError
from m3distill.models import resolve_device
from m3distill.students.build import build_student
from m3distill.teacher.cache import build_teacher_cache

REPO_ROOT = Path(__file__).resolve().parents[1]
SECRET = "s3cr3t-Do-Not-Write"


def _permissions_stop_us(tmp_path: Path) -> bool:
    """Whether a folder without write permission stops this process (it does not stop root)."""
    probe = tmp_path / "permission-probe"
    probe.mkdir()
    probe.chmod(0o555)
    try:
        (probe / "x").write_text("x", encoding="utf-8")
    except PermissionError:
        return True
    finally:
        probe.chmod(0o755)
    return False


NO_PERMISSIONS = "running as root: folder permissions do not stop root (the file-in-the-way case still runs)"


def _one_line_error(code: int, capsys, command: str) -> str:
    """The CLI's error line, after checking it is exactly one line with exit code 2 and no traceback."""
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    lines = [line for line in captured.err.splitlines() if line.startswith("m3distill ")]
    assert code == 2 and len(lines) == 1, captured.err
    assert lines[0].startswith(f"m3distill {command}: error: ")
    return lines[0]


# --- fixtures: the smallest inputs each stage accepts ------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_cache(small_dataset, tiny_xlmr_path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny-cache") / "teacher_cache"
    build_teacher_cache(small_dataset, TeacherConfig(model=str(tiny_xlmr_path), device="cpu"), out,
                        show_progress=False)
    return out


@pytest.fixture(scope="module")
def student(tiny_xlmr_path, tmp_path_factory) -> Path:
    """An untrained 1-layer student of the tiny stand-in teacher (a complete sentence-transformers folder)."""
    folder = tmp_path_factory.mktemp("student") / "student-1L"
    build_student(SentenceTransformer(str(tiny_xlmr_path), device="cpu"), [3]).save(str(folder))
    return folder


@pytest.fixture(scope="module")
def eval_config(tmp_path_factory) -> Path:
    config = tmp_path_factory.mktemp("eval-config") / "eval.yaml"
    config.write_text(yaml.safe_dump({"evaluation": {"speed": {"n_texts": 8, "batch_size": 8, "repeats": 1,
                                                               "warmup_batches": 0}}}), encoding="utf-8")
    return config


@pytest.fixture(params=["file-in-the-way", "read-only-folder"])
def unwritable(request, tmp_path) -> Path:
    """An output location that cannot be created or written."""
    if request.param == "file-in-the-way":
        blocker = tmp_path / "a-file"
        blocker.write_text("not a folder", encoding="utf-8")
        yield blocker / "out"
        return
    if not _permissions_stop_us(tmp_path):
        pytest.skip(NO_PERMISSIONS)
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    yield folder / "out"
    folder.chmod(0o755)


def _synth_argv(corpus: Path, out: Path, tokenizer: Path, *extra: str) -> list[str]:
    return ["-q", "synth", "--corpus", str(corpus), "--out", str(out), "--tokenizer", str(tokenizer),
            "--max-tokens", "64", "--overlap-tokens", "8", "--dev", "0", "--test", "0", "--no-language-detection",
            *extra]


def _evaluate_argv(dataset: Path, teacher: Path, students: list[Path], out: Path, config: Path, *extra: str):
    return ["-q", "evaluate", "--data", str(dataset), "--teacher", str(teacher),
            "--students", *map(str, students), "--out", str(out), "--k", "5", "--config", str(config), *extra]


def _train_argv(dataset: Path, cache: Path, out: Path, *extra: str) -> list[str]:
    return ["-q", "train", "--data", str(dataset), "--cache", str(cache), "--out", str(out), "--layers", "1",
            "--max-steps", "1", "--batch-size", "8", "--eval-steps", "1", *extra]


# --- an output location that cannot be written: every stage ---------------------------------------------------------


def test_synth_into_an_unwritable_location(few_documents, minilm_path, unwritable, capsys):
    line = _one_line_error(main(_synth_argv(few_documents, unwritable, minilm_path)), capsys, "synth")
    assert "cannot write" in line and str(unwritable) in line


def test_synth_overwrite_in_a_folder_that_became_read_only(few_documents, minilm_path, tmp_path, capsys):
    if not _permissions_stop_us(tmp_path):
        pytest.skip(NO_PERMISSIONS)
    parent = tmp_path / "run"
    out = parent / "dataset"
    assert main(_synth_argv(few_documents, out, minilm_path)) == 0
    parent.chmod(0o555)
    try:
        code = main(_synth_argv(few_documents, out, minilm_path, "--seed", "7", "--overwrite"))
        line = _one_line_error(code, capsys, "synth")
    finally:
        parent.chmod(0o755)
    assert "cannot write" in line
    assert json.loads((out / "manifest.json").read_text(encoding="utf-8"))["seed"] == 42  # the old one is whole


def test_teacher_cache_into_an_unwritable_location(small_dataset, tiny_xlmr_path, unwritable, capsys):
    code = main(["-q", "teacher", "--data", str(small_dataset), "--teacher", str(tiny_xlmr_path), "--out",
                 str(unwritable), "--device", "cpu"])
    line = _one_line_error(code, capsys, "teacher")
    assert "cannot write" in line and str(unwritable) in line


def test_train_into_an_unwritable_location(small_dataset, tiny_cache, unwritable, capsys):
    line = _one_line_error(main(_train_argv(small_dataset, tiny_cache, unwritable)), capsys, "train")
    assert "cannot write" in line and str(unwritable) in line


def test_evaluate_into_an_unwritable_location(small_dataset, tiny_xlmr_path, student, eval_config, unwritable,
                                              capsys):
    code = main(_evaluate_argv(small_dataset, tiny_xlmr_path, [student], unwritable, eval_config))
    line = _one_line_error(code, capsys, "evaluate")
    assert "cannot write" in line and str(unwritable) in line


@pytest.mark.parametrize("stage", ["synth", "teacher", "train"])
def test_an_unwritable_output_is_refused_before_any_work(stage, few_documents, minilm_path, small_dataset, tiny_cache,
                                                       tiny_xlmr_path, unwritable, monkeypatch, capsys):
    def work_started(*args, **kwargs):
        raise AssertionError(f"{stage} started its work before checking that {unwritable} can be written")

    module, function, argv = {
        "synth": ("m3distill.data.synth", "write_dataset", _synth_argv(few_documents, unwritable, minilm_path)),
        "teacher": ("m3distill.teacher.cache", "build_teacher_cache",
                    ["-q", "teacher", "--data", str(small_dataset), "--teacher", str(tiny_xlmr_path), "--out",
                     str(unwritable), "--device", "cpu"]),
        "train": ("m3distill.training", "distil_students", _train_argv(small_dataset, tiny_cache, unwritable)),
    }[stage]
    monkeypatch.setattr(f"{module}.{function}", work_started)
    line = _one_line_error(main(argv), capsys, stage)
    assert "cannot write" in line and str(unwritable) in line


def test_run_with_an_unwritable_run_dir(few_documents, unwritable, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"run_dir": str(unwritable), "synth": {"corpus": str(few_documents)}}),
                      encoding="utf-8")
    line = _one_line_error(main(["-q", "run", str(config)]), capsys, "run")
    assert "cannot write" in line and str(unwritable) in line


# --- a disk that fills up while a stage writes: every stage ---------------------------------------------------------


def _disk_full(kind: str):
    """A writer that finds the disk full, raising what the library behind it raises."""
    def write(*args, **kwargs):
        if kind == "pyarrow":  # no errno, the number is in the text
            raise OSError("[Errno 28] Error writing bytes to file. Detail: [errno 28] No space left on device")
        if kind == "safetensors":
            from safetensors import SafetensorError

            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        raise OSError(errno.ENOSPC, "No space left on device")

    return write


@pytest.mark.parametrize("command", ["synth", "run", "teacher", "train", "export", "evaluate"])
def test_a_full_disk_is_one_line_naming_the_folder_and_the_space_needed(command, few_documents, minilm_path,
                                                                        small_dataset, tiny_xlmr_path, tiny_cache,
                                                                        student, eval_config, tmp_path, monkeypatch,
                                                                        capsys):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "run"), "synth": {"corpus": str(few_documents)},
                                      "teacher": {"model": str(minilm_path)}}), encoding="utf-8")
    student_copy = shutil.copytree(student, tmp_path / "students" / "student-1L")
    writer, folder, argv = {
        "synth": ("m3distill.data.dataset.pq.write_table", tmp_path / "dataset",
                  _synth_argv(few_documents, tmp_path / "dataset", minilm_path)),
        "run": ("m3distill.data.dataset.pq.write_table", tmp_path / "run" / "dataset", ["-q", "run", str(config)]),
        "teacher": ("m3distill.teacher.cache.np.save", tmp_path / "cache",
                    ["-q", "teacher", "--data", str(small_dataset), "--teacher", str(tiny_xlmr_path), "--out",
                     str(tmp_path / "cache"), "--device", "cpu"]),
        "train": ("transformers.modeling_utils.safe_save_file", tmp_path / "trained" / "student-1L",
                  _train_argv(small_dataset, tiny_cache, tmp_path / "trained")),
        "export": ("m3distill.exporting.onnx.export_graph", student_copy / "onnx",
                   ["-q", "export", str(student_copy), "--variants", "onnx"]),
        "evaluate": ("m3distill.evaluation.evaluate.write_report", tmp_path / "report",
                     _evaluate_argv(small_dataset, tiny_xlmr_path, [student], tmp_path / "report", eval_config)),
    }[command]
    kind = {"synth": "pyarrow", "run": "pyarrow", "train": "safetensors"}.get(command, "os")
    monkeypatch.setattr(writer, _disk_full(kind))

    line = _one_line_error(main(argv), capsys, command)

    assert line.startswith(f"m3distill {command}: error: cannot write {folder}: no space left on the device (about ")
    assert " needed, " in line and " free there); free some space or choose another location" in line
    assert not [path for path in tmp_path.rglob("*") if ".tmp" in path.name]  # no temporary file left behind
    assert not (folder / "report.json").exists() and not (folder / "manifest.json").exists()


def test_the_cli_backstop_turns_an_unchecked_permission_error_into_one_line(monkeypatch, capsys):
    from m3distill.cli import teacher as teacher_command

    def denied(args):
        raise PermissionError(errno.EACCES, "Permission denied", "/srv/shared/cache")

    monkeypatch.setattr(teacher_command, "run_teacher", denied)
    line = _one_line_error(main(["teacher"]), capsys, "teacher")
    assert line.endswith("cannot write /srv/shared/cache: permission denied; choose another location or change its "
                         "permissions")


def test_the_cli_backstop_leaves_a_bug_its_traceback(monkeypatch):
    from m3distill.cli import teacher as teacher_command

    def bug(args):
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", "/tmp/ours-vanished")

    monkeypatch.setattr(teacher_command, "run_teacher", bug)
    with pytest.raises(FileNotFoundError):
        main(["teacher"])


@pytest.mark.parametrize(
    ("code", "expected"),
    [(errno.EROFS, "the file system is read-only"), (errno.ENOSPC, "no space left on the device"),
     (errno.EACCES, "permission denied")],
)
def test_unwritable_locations_are_described_with_what_to_do(code, expected, tmp_path):
    line = describe_os_error(OSError(code, os.strerror(code), str(tmp_path / "x" / ".tmp-1")), tmp_path / "x")
    assert line.startswith(f"cannot write {tmp_path / 'x'}: {expected}") and "choose another location" in line


def test_ensure_writable_dir_names_the_file_in_the_way(tmp_path):
    (tmp_path / "a-file").write_text("x", encoding="utf-8")
    with pytest.raises(M3DistillError, match="a-file is a file, not a folder"):
        ensure_writable_dir(tmp_path / "a-file" / "out")
    assert ensure_writable_dir(tmp_path / "new" / "out").is_dir()
    assert list((tmp_path / "new" / "out").iterdir()) == []


# --- a damaged student, an unfinished one, a device this machine lacks ---------------------------------------------


def test_a_truncated_model_safetensors_is_one_line(small_dataset, tiny_xlmr_path, student, eval_config, tmp_path,
                                                   capsys):
    damaged = shutil.copytree(student, tmp_path / "student-1L")
    weights = damaged / "model.safetensors"
    with open(weights, "r+b") as handle:
        handle.truncate(weights.stat().st_size // 2)
    code = main(_evaluate_argv(small_dataset, tiny_xlmr_path, [damaged], tmp_path / "report", eval_config))
    line = _one_line_error(code, capsys, "evaluate")
    assert str(damaged) in line and "damaged or truncated" in line
    assert not (tmp_path / "report" / "report.json").exists()


def test_exporting_a_student_with_a_truncated_model_safetensors_is_one_line(student, tmp_path, capsys):
    damaged = shutil.copytree(student, tmp_path / "student-1L")
    weights = damaged / "model.safetensors"
    with open(weights, "r+b") as handle:
        handle.truncate(weights.stat().st_size // 2)
    line = _one_line_error(main(["-q", "export", str(damaged), "--variants", "onnx"]), capsys, "export")
    assert str(damaged) in line and "damaged or truncated" in line
    assert not (damaged / "onnx").exists() and not any(path.name.startswith(".onnx") for path in damaged.iterdir())


def test_an_unfinished_student_is_called_unfinished(small_dataset, tiny_xlmr_path, eval_config, tmp_path, capsys):
    unfinished = tmp_path / "students" / "student-1L"
    unfinished.mkdir(parents=True)
    (unfinished / "run.json").write_text(json.dumps({"layers": [3], "strategy": "spread"}), encoding="utf-8")
    code = main(_evaluate_argv(small_dataset, tiny_xlmr_path, [unfinished], tmp_path / "report", eval_config))
    line = _one_line_error(code, capsys, "evaluate")
    assert f"{unfinished} is an unfinished student" in line and "--resume" in line
    assert "not a sentence-transformers model folder" not in line


def test_evaluation_with_no_finished_student_says_so_and_reports_the_teacher(small_dataset, tiny_xlmr_path, tmp_path,
                                                                            caplog, capsys):
    (tmp_path / "run" / "students").mkdir(parents=True)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "run_dir": str(tmp_path / "run"), "teacher": {"model": str(tiny_xlmr_path)},
        "evaluation": {"speed": {"n_texts": 8, "batch_size": 8, "repeats": 1, "warmup_batches": 0}},
    }), encoding="utf-8")
    with caplog.at_level("WARNING", logger="m3distill"):
        code = main(["-q", "evaluate", "--config", str(config), "--data", str(small_dataset), "--k", "5"])
    assert code == 0 and "Traceback" not in capsys.readouterr().err
    warnings = [record.getMessage() for record in caplog.records if record.levelname == "WARNING"]
    assert sum("no finished student" in message for message in warnings) == 1, warnings


_MISSING_DEVICES = ["cuda:99", "gpu"] + ([] if torch.cuda.is_available() else ["cuda"])


@pytest.mark.parametrize("device", _MISSING_DEVICES)
def test_a_device_this_machine_lacks_is_one_line_for_every_command(device, small_dataset, tiny_xlmr_path, tiny_cache,
                                                                    student, eval_config, tmp_path, capsys):
    commands = {
        "teacher": ["-q", "teacher", "--data", str(small_dataset), "--teacher", str(tiny_xlmr_path), "--out",
                    str(tmp_path / "cache")],
        "train": _train_argv(small_dataset, tiny_cache, tmp_path / "students"),
        "evaluate": _evaluate_argv(small_dataset, tiny_xlmr_path, [student], tmp_path / "report", eval_config),
    }
    for command, argv in commands.items():
        line = _one_line_error(main([*argv, "--device", device]), capsys, command)
        assert repr(device) in line and ("cpu" in line)
    assert not any(tmp_path.iterdir()), "a stage wrote output before checking its device"


def test_resolve_device_checks_what_it_is_given():
    assert resolve_device("cpu") == "cpu"
    assert resolve_device(None) in ("cuda", "mps", "cpu")
    with pytest.raises(M3DistillError, match="unknown device 'tpu9'"):
        resolve_device("tpu9")


# --- settings checked before any work: numbers, split sizes, the config file's encoding -----------------------------


@pytest.mark.parametrize("weights", ["nan,1,1", "inf,1,1", "1,-inf,1"])
def test_hybrid_weights_that_are_not_finite_are_refused_before_any_encoding(weights, small_dataset, tiny_xlmr_path,
                                                                            student, eval_config, tmp_path,
                                                                            monkeypatch, capsys):
    def encoding(*args, **kwargs):
        raise AssertionError("the evaluation started before its settings were checked")

    monkeypatch.setattr("m3distill.evaluation.evaluate.evaluate_models", encoding)
    argv = _evaluate_argv(small_dataset, tiny_xlmr_path, [student], tmp_path / "report", eval_config,
                          "--hybrid-weights", weights)
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    line = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and len(line.splitlines()) == 1
    assert "--hybrid-weights" in line and "finite number" in line


def test_a_config_file_with_a_weight_that_is_not_finite_is_one_line(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("evaluation:\n  hybrid_weights: [.nan, 1, 1]\n", encoding="utf-8")
    line = _one_line_error(main(["-q", "evaluate", "--config", str(config)]), capsys, "evaluate")
    assert str(config) in line and "evaluation.hybrid_weights" in line and "finite number" in line


@pytest.mark.parametrize(("flags", "expected"), [
    (["--dev", "1.5"], "dev size 1.5 is neither a fraction below 1 nor a whole number"),
    (["--dev", "0.6", "--test", "0.5"], "add up to 1 or more and leave no training contexts"),
])
def test_split_sizes_are_refused_before_the_corpus_is_read(flags, expected, few_documents, minilm_path, tmp_path,
                                                           monkeypatch, capsys):
    def reading(*args, **kwargs):
        raise AssertionError("the corpus was read before the split sizes were checked")

    monkeypatch.setattr("m3distill.data.synth.load_corpus", reading)
    line = _one_line_error(main(_synth_argv(few_documents, tmp_path / "dataset", minilm_path, *flags)), capsys, "synth")
    assert expected in line
    assert not (tmp_path / "dataset").exists()


@pytest.mark.parametrize("command", ["run", "train", "synth"])
def test_a_config_file_that_is_not_utf8_is_one_line(command, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_bytes("run_dir: runs/caf\u00e9\n".encode("latin-1"))
    argv = ["-q", "run", str(config)] if command == "run" else ["-q", command, "--config", str(config)]
    line = _one_line_error(main(argv), capsys, command)
    assert f"config file {config} is not UTF-8 text" in line


# --- corpus files that read as something else ---------------------------------------------------------------------


def test_a_parquet_text_column_of_numbers_is_refused(minilm_path, tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    corpus = tmp_path / "numbers.parquet"
    pq.write_table(pa.table({"id": ["a", "b", "c"], "text": [1, 2, 3]}), corpus)
    line = _one_line_error(main(_synth_argv(corpus, tmp_path / "dataset", minilm_path)), capsys, "synth")
    assert str(corpus) in line and "column 'text' holds int64 values, not text" in line and "--text-column" in line


def test_a_jsonl_text_that_is_a_number_is_refused(tmp_path):
    corpus = tmp_path / "numbers.jsonl"
    corpus.write_text('{"text": "a real document"}\n{"text": 2}\n', encoding="utf-8")
    with pytest.raises(M3DistillError, match="line 2: column 'text' holds a int, not text"):
        load_corpus(corpus)


def test_a_csv_with_an_unterminated_quote_warns_that_its_rows_merged(tmp_path, caplog):
    corpus = tmp_path / "docs.csv"
    rows = [f"{number},document {number} about disks and backups" for number in range(2, 9)]
    corpus.write_text('id,text\n1,"document 1 opens a quote and never closes it\n' + "\n".join(rows) + "\n",
                      encoding="utf-8")
    with caplog.at_level("WARNING", logger="m3distill"):
        assert len(load_corpus(corpus).documents) == 1
    [warning] = [record.getMessage() for record in caplog.records if record.levelname == "WARNING"]
    assert "1 rows from 8 lines" in warning and "unterminated quote" in warning

    caplog.clear()
    corpus.write_text('id,text\n1,"a document\n\nof two paragraphs"\n2,another\n3,a third\n', encoding="utf-8")
    with caplog.at_level("WARNING", logger="m3distill"):
        assert len(load_corpus(corpus).documents) == 3
    assert not caplog.records  # quoted line breaks alone are fine


# --- minor: config paths, ~, credentials, file modes, names in messages ------------------------------------------


def test_the_bundled_bge_m3_config_works_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load_config(REPO_ROOT / "configs" / "bge-m3.yaml")
    assert Path(config.synth.corpus) == REPO_ROOT / "data" / "sample" / "domain"
    assert Path(config.synth.general) == REPO_ROOT / "data" / "sample" / "general"
    assert Path(config.run_dir) == REPO_ROOT / "runs" / "bge-m3"  # where it was when run from the repository root
    assert config.teacher.model == "BAAI/bge-m3"  # a hub id stays a hub id


def test_relative_paths_in_a_config_are_relative_to_its_folder_and_hub_ids_stay(tmp_path, monkeypatch):
    folder = tmp_path / "project"
    (folder / "docs").mkdir(parents=True)
    (folder / "models" / "teacher").mkdir(parents=True)
    config_file = folder / "run.yaml"
    config_file.write_text(yaml.safe_dump({
        "run_dir": "runs/x",
        "synth": {"corpus": "docs", "general": "someone/wiki-dataset", "tokenizer": "./tok",
                  "llm": {"cache_path": "cache.sqlite"}},
        "teacher": {"model": "models/teacher"},
    }), encoding="utf-8")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)

    config = load_config(Path("..") / "project" / "run.yaml")

    assert config.run_dir == str(folder / "runs" / "x")
    assert config.synth.corpus == str(folder / "docs")
    assert config.synth.general == "someone/wiki-dataset"
    assert config.synth.tokenizer == str(folder / "tok")
    assert config.synth.llm.cache_path == str(folder / "cache.sqlite")
    assert config.teacher.model == str(folder / "models" / "teacher")
    # Flags are relative to where the command runs, as they always were.
    assert apply_overrides(config, {"synth.corpus": "here"}).synth.corpus == "here"


def test_run_from_another_directory_names_the_missing_corpus_where_it_looked(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "run.yaml").write_text("run_dir: runs/x\nsynth:\n  corpus: ./no-such-docs\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    line = _one_line_error(main(["-q", "run", "project/run.yaml"]), capsys, "run")
    assert f"corpus not found: {folder / 'no-such-docs'}" in line
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("argv", [["run"], ["demo"], ["demo", "--m3"]], ids=" ".join)
def test_run_and_demo_under_torchrun_are_refused_before_the_run_directory_is_touched(argv, few_documents, tmp_path,
                                                                                    monkeypatch, capsys):
    # What torchrun --nproc_per_node 2 tells the second process; without the refusal it would race the first one
    # for the run directory's lock and report the directory "in use".
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    run_dir = tmp_path / "run"
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"run_dir": str(run_dir), "synth": {"corpus": str(few_documents)}}),
                      encoding="utf-8")
    extra = [str(config)] if argv == ["run"] else ["--out", str(run_dir)]
    line = _one_line_error(main(["-q", *argv, *extra]), capsys, argv[0])
    assert "torchrun started 2 processes, but the whole pipeline runs in one" in line
    assert "torchrun ... m3distill train --config CONFIG" in line
    assert not run_dir.exists()


def test_a_tilde_is_the_home_directory_not_a_folder_named_tilde(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    config_file = tmp_path / "run.yaml"
    config_file.write_text("run_dir: ~/runs/x\nsynth:\n  corpus: ~/docs\n", encoding="utf-8")
    config = load_config(config_file)
    assert config.run_dir == str(tmp_path / "home" / "runs" / "x")
    assert config.synth.corpus == str(tmp_path / "home" / "docs")
    assert apply_overrides(config, {"run_dir": "~/other"}).run_dir == str(tmp_path / "home" / "other")


def test_the_demo_config_still_points_at_the_bundled_sample(tmp_path):
    from m3distill.pipeline import demo_config

    config = demo_config(tmp_path / "demo")
    assert Path(config.synth.corpus).is_dir() and Path(config.synth.general).is_dir()
    assert Path(load_config(REPO_ROOT / "configs" / "demo.yaml").synth.corpus) == Path(config.synth.corpus)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (f"http://user:{SECRET}@llm.local:8000/v1", "http://llm.local:8000/v1"),
        (f"https://api.example.com/v1?api_key={SECRET}&model=x", "https://api.example.com/v1?api_key=***&model=x"),
        (f"https://h/v1?token={SECRET}", "https://h/v1?token=***"),
        ("http://127.0.0.1:8000/v1", "http://127.0.0.1:8000/v1"),
    ],
)
def test_credentials_are_redacted_from_urls(url, expected):
    assert redact_url(url) == expected


def test_the_config_written_to_the_run_directory_holds_no_credential(tmp_path):
    config = M3DistillConfig(
        run_dir=str(tmp_path / "run"),
        synth=SynthConfig(llm=LLMConfig(base_url=f"https://me:{SECRET}@llm.example.com/v1?key={SECRET}")),
    )
    written = config_to_yaml(config)
    assert SECRET not in written
    assert yaml.safe_load(written)["synth"]["llm"]["base_url"] == "https://llm.example.com/v1?key=***"

    # The dataset manifest describes the endpoint with the same redaction.
    from m3distill.data.questions.llm import LLMQuestionGenerator

    described = LLMQuestionGenerator(config.synth.llm, 1, tmp_path / "cache.sqlite").describe()
    assert described["base_url"] == "https://llm.example.com/v1?key=***"


def test_files_written_through_atomic_dir_are_not_private(tmp_path):
    import tempfile

    umask = os.umask(0o022)
    os.umask(umask)
    with atomic_dir(tmp_path / "out") as tmp:
        fd, name = tempfile.mkstemp(dir=tmp)  # 0600, as transformers' safetensors writer makes them
        os.close(fd)
        os.replace(name, tmp / "model.safetensors")
        (tmp / "sub").mkdir(mode=0o700)
        (tmp / "mine.txt").write_text("x", encoding="utf-8")
        (tmp / "mine.txt").chmod(0o640)  # a mode chosen on purpose stays
    assert stat.S_IMODE((tmp_path / "out" / "model.safetensors").stat().st_mode) == 0o666 & ~umask
    assert stat.S_IMODE((tmp_path / "out" / "sub").stat().st_mode) == 0o777 & ~umask
    assert stat.S_IMODE((tmp_path / "out" / "mine.txt").stat().st_mode) == 0o640


def test_a_trained_students_weights_are_as_readable_as_its_other_files(small_dataset, tiny_cache, tmp_path, capsys):
    out = tmp_path / "students"
    assert main(_train_argv(small_dataset, tiny_cache, out)) == 0
    modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in (out / "student-1L").iterdir() if path.is_file()}
    assert modes["model.safetensors"] == modes["config.json"] == 0o666 & ~_umask(), modes


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def test_a_general_corpus_pointing_nowhere_says_corpus_not_found(few_documents, minilm_path, tmp_path, capsys):
    missing = tmp_path / "no-such-general"
    code = main(_synth_argv(few_documents, tmp_path / "dataset", minilm_path, "--general", str(missing)))
    line = _one_line_error(code, capsys, "synth")
    assert f"corpus not found: {missing}" in line
    assert not (tmp_path / "dataset").exists()
    with pytest.raises(M3DistillError, match=f"general corpus not found: {missing}"):
        load_corpus(missing, kind="general corpus")


def test_the_config_written_to_a_relative_run_directory_reruns_that_run(tmp_path, monkeypatch):
    from m3distill.pipeline import run_config_yaml

    monkeypatch.chdir(tmp_path)
    written = tmp_path / "plain" / "config.yaml"
    written.parent.mkdir()
    written.write_text(run_config_yaml(M3DistillConfig(run_dir="plain")), encoding="utf-8")
    # Relative paths in a config file are taken from its folder: a relative run_dir would mean plain/plain.
    assert Path(load_config(written).run_dir) == tmp_path / "plain"
