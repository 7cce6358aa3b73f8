"""Export for serving: a student's ONNX (float32) and int8 files, verified against the torch student, loaded with
onnxruntime alone; written beside the old export and renamed into place, never over a user's onnx/ folder."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sentence_transformers import SentenceTransformer
from stand_in import TINY_SHAPE, make_xlmr_stand_in

import m3distill
from m3distill import export_student
from m3distill.cli import main
from m3distill.config import ExportConfig, M3DistillConfig
from m3distill.errors import M3DistillError
from m3distill.exporting import verification_texts
from m3distill.fingerprint import hash_model_files
from m3distill.metrics import row_cosines
from m3distill.onnx_serving import (
    EXPORT_RECORD_FILE,
    ONNX_VARIANT_FILES,
    OnnxEncoder,
    exported_variants,
    read_export_record,
)
from m3distill.stages import ExportStage, stage_names
from m3distill.stages.export import export_status
from m3distill.students.build import build_student
from m3distill.training import STUDENT_METADATA_FILE
from m3distill.training.model_card import EXPORT_SECTION_START, with_export_section

REPO_ROOT = Path(__file__).resolve().parents[1]
CARD = "# student-1L\n\nLoad it with sentence-transformers.\n\n## Model\n\n| | |\n|---|---|\n"
LONG_TEXT = " ".join(["The quick brown fox jumps over the lazy dog near the riverbank."] * 60)


def _texts() -> list[str]:
    """Sample-corpus paragraphs in several languages, an empty text and one far longer than max_seq_length."""
    return [*verification_texts(ExportConfig(verify_texts=40)), "", "ok", LONG_TEXT]


def _fake_m3distill_student(folder: Path) -> Path:
    """Give a sentence-transformers folder the marker and card of a finished m3distill student."""
    (folder / STUDENT_METADATA_FILE).write_text(json.dumps({"name": folder.name}), encoding="utf-8")
    (folder / "README.md").write_text(CARD, encoding="utf-8")
    return folder


def _copy(folder: Path, target: Path) -> Path:
    shutil.copytree(folder, target)
    return target


def _digests(folder: Path) -> dict[str, str]:
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def bert_student(tmp_path_factory, minilm_teacher) -> Path:
    """A 1-layer student of the packaged MiniLM (BERT tokenizer: token_type_ids), saved untrained, marked as an
    m3distill student, inside a students/ folder."""
    folder = tmp_path_factory.mktemp("bert") / "students" / "student-1L"
    build_student(minilm_teacher, [5]).save(str(folder))
    return _fake_m3distill_student(folder)


@pytest.fixture(scope="module")
def exported_bert(bert_student, tmp_path_factory) -> Path:
    """A copy of ``bert_student`` with its export (read-only: copy it before changing it)."""
    folder = _copy(bert_student, tmp_path_factory.mktemp("exported-bert") / "students" / "student-1L")
    export_student(folder, ExportConfig(), texts=_texts(), show_progress=False)
    return folder


@pytest.fixture(scope="module")
def xlmr_student(tmp_path_factory) -> Path:
    """The tiny XLM-R stand-in (bge-m3's architecture, CLS pooling) with a tokenizer that gives no token_type_ids,
    as XLM-R's does."""
    folder = make_xlmr_stand_in(tmp_path_factory.mktemp("xlmr") / "student", **TINY_SHAPE, max_seq_length=64)
    config_file = folder / "tokenizer_config.json"
    settings = json.loads(config_file.read_text(encoding="utf-8"))
    config_file.write_text(json.dumps({**settings, "model_input_names": ["input_ids", "attention_mask"]}),
                           encoding="utf-8")
    return folder


def _agreement(encoder: OnnxEncoder, model: SentenceTransformer, texts: list[str], batch_size: int) -> np.ndarray:
    reference = model.encode(texts, batch_size=batch_size, convert_to_numpy=True)
    found = encoder.encode(texts, batch_size=batch_size)
    assert found.dtype == np.float32 and found.shape == reference.shape
    return row_cosines(found, reference)


def test_a_bert_student_exports_both_variants_and_the_encoder_matches_sentence_transformers(exported_bert):
    record = read_export_record(exported_bert)
    assert exported_variants(exported_bert) == ["onnx", "int8"]
    assert record["format"] == 2 and record["outputs"] == ["dense"]
    assert record["graph_inputs"] == ["input_ids", "attention_mask", "token_type_ids"]
    # The export changes nothing the student's own fingerprints hash (the train stage still sees it as current).
    assert record["student"] == hash_model_files(exported_bert)
    assert record["variants"]["onnx"]["mean_cosine_vs_torch"] >= 0.9999
    # Fused by default: what the record counts is in the graph, and the float32 graph still matches below.
    assert record["graph_fusions"] == {"BiasGelu": 1, "LayerNormalization": 1, "SkipLayerNormalization": 2}
    assert _op_types(exported_bert / ONNX_VARIANT_FILES["onnx"]) >= {"BiasGelu", "SkipLayerNormalization"}

    model = SentenceTransformer(str(exported_bert), device="cpu")
    encoder = m3distill.onnx_encoder(exported_bert)
    assert (encoder.dim, encoder.max_seq_length, encoder.normalize) == (384, model.max_seq_length, True)
    assert encoder.weights_bytes == (exported_bert / ONNX_VARIANT_FILES["onnx"]).stat().st_size
    texts = _texts()
    for batch_size in (32, 1):
        assert _agreement(encoder, model, texts, batch_size).min() >= 0.9999, batch_size

    int8 = OnnxEncoder(exported_bert, "int8")
    assert int8.weights_bytes < encoder.weights_bytes
    recorded = record["variants"]["int8"]
    assert 0.95 < recorded["mean_cosine_vs_torch"] <= 1.0 + 1e-6
    assert recorded["min_cosine_vs_torch"] <= recorded["mean_cosine_vs_torch"]
    assert recorded["quantization"] == ExportConfig().quantization.model_dump(mode="json")
    assert _agreement(int8, model, texts, 32).mean() > 0.95
    assert encoder.encode([]).shape == (0, 384)


def _op_types(graph_file: Path) -> set[str]:
    import onnx

    return {node.op_type for node in onnx.load(str(graph_file), load_external_data=False).graph.node}


def test_a_fused_graph_that_departs_from_the_student_is_replaced_by_the_plain_one(bert_student, tmp_path,
                                                                                    monkeypatch, caplog):
    import onnx
    from onnx import numpy_helper

    import m3distill.exporting.onnx as export_onnx

    fuse = export_onnx.fuse_graph

    def fuse_and_damage(graph_file: Path, **kwargs) -> dict[str, int]:
        """Fuse as the export does, then replace the feed-forward weights with noise: a fusion gone wrong."""
        fused = fuse(graph_file, **kwargs)
        graph = onnx.load(str(graph_file))
        for weight in graph.graph.initializer:
            if list(weight.dims) == [384, 1536]:
                noise = np.random.default_rng(0).normal(size=(384, 1536)).astype(np.float32)
                weight.CopyFrom(numpy_helper.from_array(noise, weight.name))
        onnx.save(graph, str(graph_file))
        return fused

    monkeypatch.setattr(export_onnx, "fuse_graph", fuse_and_damage)
    folder = _copy(bert_student, tmp_path / "student-1L")
    with caplog.at_level("WARNING", logger="m3distill.exporting.onnx"):
        export_student(folder, ExportConfig(variants=["onnx"]), texts=_texts()[:12], show_progress=False)
    assert "the fused graph departs from the torch student" in caplog.text
    assert read_export_record(folder)["graph_fusions"] is None
    assert "SkipLayerNormalization" not in _op_types(folder / ONNX_VARIANT_FILES["onnx"])
    model = SentenceTransformer(str(folder), device="cpu")
    assert _agreement(OnnxEncoder(folder), model, _texts(), 8).min() >= 0.9999


def test_with_fusions_off_the_plain_graph_is_exported_and_an_earlier_fused_one_is_stale(exported_bert, tmp_path):
    folder = _copy(exported_bert, tmp_path / "student-1L")
    plain = ExportConfig(graph_fusions=False)
    status = export_status(folder, plain)
    assert status.state == "stale" and "export.graph_fusions" in status.reason
    export_student(folder, plain, texts=_texts()[:12], show_progress=False, force=True)
    assert read_export_record(folder)["graph_fusions"] is None and export_status(folder, plain).current
    assert not _op_types(folder / ONNX_VARIANT_FILES["onnx"]) & {"BiasGelu", "SkipLayerNormalization"}
    model = SentenceTransformer(str(folder), device="cpu")
    assert _agreement(OnnxEncoder(folder), model, _texts(), 8).min() >= 0.9999


def test_a_shorter_max_seq_length_truncates_as_sentence_transformers_does(exported_bert):
    model = SentenceTransformer(str(exported_bert), device="cpu")
    model.max_seq_length = 16
    encoder = OnnxEncoder(exported_bert, max_seq_length=16)
    assert _agreement(encoder, model, [LONG_TEXT, "short"], 2).min() >= 0.9999


def test_an_xlmr_student_without_token_type_ids_exports_with_the_tokenizers_inputs(xlmr_student, tmp_path):
    folder = _copy(xlmr_student, tmp_path / "student")
    model = SentenceTransformer(str(folder), device="cpu")
    assert "token_type_ids" not in model.preprocess(["a text"])
    result = export_student(folder, ExportConfig(variants=["onnx"]), texts=_texts(), show_progress=False)
    assert list(result.variants) == ["onnx"] and not (folder / ONNX_VARIANT_FILES["int8"]).exists()
    assert read_export_record(folder)["graph_inputs"] == ["input_ids", "attention_mask"]
    assert _agreement(OnnxEncoder(folder), model, _texts(), 8).min() >= 0.9999


def test_large_weights_go_into_external_data_that_the_encoder_loads(xlmr_student, tmp_path, monkeypatch):
    import m3distill.exporting.onnx as export_onnx

    monkeypatch.setattr(export_onnx, "EXTERNAL_DATA_ABOVE_BYTES", 0)
    folder = _copy(xlmr_student, tmp_path / "student")
    result = export_student(folder, ExportConfig(), texts=_texts()[:12], show_progress=False)
    record = read_export_record(folder)
    assert record["external_data"] is True
    for variant, entry in record["variants"].items():
        assert len(entry["files"]) == 2 and all((folder / name).is_file() for name in entry["files"]), entry
        encoder = OnnxEncoder(folder, variant)
        assert encoder.weights_bytes == entry["bytes"] == result.variants[variant].bytes
        assert encoder.weights_bytes == sum((folder / name).stat().st_size for name in entry["files"])
    model = SentenceTransformer(str(folder), device="cpu")
    assert _agreement(OnnxEncoder(folder), model, _texts(), 8).min() >= 0.9999


def test_the_encoder_runs_where_torch_and_transformers_cannot_be_imported(exported_bert):
    script = (
        "import sys\n"
        "for name in ('torch', 'transformers', 'sentence_transformers'):\n"
        "    sys.modules[name] = None  # any import of them raises ImportError\n"
        "import m3distill\n"
        f"encoder = m3distill.onnx_encoder({str(exported_bert)!r}, 'int8', threads=1)\n"
        "print(encoder.encode(['a question', 'a passage']).shape)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT / "src")})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "(2, 384)"


def test_a_current_export_is_skipped_and_force_replaces_it_whole_with_one_card_section(exported_bert, tmp_path):
    folder = _copy(exported_bert, tmp_path / "student-1L")
    card = (folder / "README.md").read_text(encoding="utf-8")
    assert card.count(EXPORT_SECTION_START) == 1
    assert card.index("## ONNX and int8") < card.index("## Model")
    assert "onnx/model_qint8_quantized.onnx" in card and "m3distill.onnx_encoder(" in card
    before = _digests(folder / "onnx")

    again = export_student(folder, ExportConfig(), texts=_texts(), show_progress=False)
    assert again.skipped and list(again.variants) == ["onnx", "int8"]
    assert _digests(folder / "onnx") == before

    redone = export_student(folder, ExportConfig(), texts=_texts()[:10], show_progress=False, force=True)
    assert not redone.skipped and read_export_record(folder)["verify_texts"] == 11
    assert (folder / "README.md").read_text(encoding="utf-8").count(EXPORT_SECTION_START) == 1
    assert not [path.name for path in folder.iterdir() if path.name.startswith(".")]
    assert with_export_section(card, read_export_record(folder)).count("## ONNX and int8") == 1


def test_a_failed_verification_leaves_the_old_export_whole(exported_bert, tmp_path, monkeypatch):
    import m3distill.exporting.onnx as export_onnx

    folder = _copy(exported_bert, tmp_path / "student-1L")
    before = _digests(folder / "onnx")
    card = (folder / "README.md").read_text(encoding="utf-8")
    monkeypatch.setattr(export_onnx, "_agreement", lambda *args: (0.5, 0.25))
    with pytest.raises(M3DistillError, match="below export.min_cosine 0.9999; nothing was written"):
        export_student(folder, ExportConfig(), texts=_texts()[:4], show_progress=False, force=True)
    assert _digests(folder / "onnx") == before
    assert (folder / "README.md").read_text(encoding="utf-8") == card
    assert not [path.name for path in folder.iterdir() if path.name.startswith(".")]


def test_a_user_onnx_folder_is_refused_and_left_untouched(bert_student, tmp_path, capsys):
    folder = _copy(bert_student, tmp_path / "students" / "student-1L")
    (folder / "onnx").mkdir()
    (folder / "onnx" / "model.onnx").write_bytes(b"mine")
    with pytest.raises(M3DistillError, match="m3distill did not write it"):
        export_student(folder, ExportConfig(), show_progress=False, force=True)
    assert main(["export", str(folder), "--force"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("m3distill export: error:") and "move it away" in error and "\n" not in error
    assert [path.name for path in (folder / "onnx").iterdir()] == ["model.onnx"]
    assert (folder / "onnx" / "model.onnx").read_bytes() == b"mine"


def test_a_changed_student_or_setting_makes_the_export_stale_and_alone_it_is_refused(exported_bert, tmp_path):
    folder = _copy(exported_bert, tmp_path / "student-1L")
    config = M3DistillConfig()
    assert ExportStage(config, [folder]).status().current
    assert export_status(folder, config.export.model_copy(update={"verify_texts": 3})).current

    other = config.model_copy(update={"export": ExportConfig(opset=19)})
    status = ExportStage(other, [folder]).status()
    assert status.state == "stale" and "export.opset is 19 now, 18 when it was made" in status.reason
    with pytest.raises(M3DistillError, match="out of date: .*pass --force"):
        ExportStage(other, [folder]).run(show_progress=False)
    with pytest.raises(M3DistillError, match="out of date: .*pass --force"):  # the API decides as the stage does
        export_student(folder, other.export, show_progress=False)

    settings = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    (folder / "config.json").write_text(json.dumps({**settings, "note": "edited"}), encoding="utf-8")
    assert "student contents changed" in export_status(folder, config.export).reason


def test_the_cli_exports_a_students_folder_and_names_bad_paths_in_one_line(exported_bert, tmp_path, capsys,
                                                                           monkeypatch):
    monkeypatch.chdir(tmp_path)
    students = _copy(exported_bert.parent, tmp_path / "students")
    assert main(["export", str(students)]) == 0
    assert "student-1L: up to date, skipped: onnx" in capsys.readouterr().out

    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("x", encoding="utf-8")
    for path, message in ((tmp_path / "missing", "not found"), (tmp_path / "notes", "neither a sentence-transformers")):
        assert main(["export", str(path)]) == 2
        error = capsys.readouterr().err.strip()
        assert error.startswith("m3distill export: error:") and message in error and "\n" not in error
    assert main(["export", str(students), "--data", str(tmp_path / "missing")]) == 2
    assert "dataset directory not found" in capsys.readouterr().err


def test_the_pipeline_has_an_export_stage_only_when_enabled(tmp_path):
    assert stage_names(M3DistillConfig()) == ("synth", "teacher", "train", "evaluate")
    enabled = M3DistillConfig.model_validate({"export": {"enabled": True}})
    assert stage_names(enabled) == ("synth", "teacher", "train", "export", "evaluate")
    with pytest.raises(M3DistillError, match="export.enabled is false"):
        m3distill.run_pipeline(M3DistillConfig(run_dir=str(tmp_path / "run")), force=["export"])
    assert not (tmp_path / "run").exists()


def test_sentence_transformers_onnx_backend_loads_the_int8_file(exported_bert):
    try:
        model = SentenceTransformer(str(exported_bert), backend="onnx",
                                    model_kwargs={"file_name": ONNX_VARIANT_FILES["int8"]})
    except Exception as error:  # sentence-transformers raises a bare Exception when optimum is missing
        if "Optimum" not in str(error):
            raise
        pytest.skip("sentence-transformers' ONNX backend needs optimum-onnx, which does not install beside "
                    "transformers 5")
    reference = OnnxEncoder(exported_bert, "int8").encode(_texts())
    assert row_cosines(model.encode(_texts()), reference).min() >= 0.9999


@pytest.mark.slow
def test_the_pipeline_with_export_enabled_exports_every_student_once(sample_dir, tmp_path):
    from m3distill.layout import RunLayout

    config = M3DistillConfig.model_validate({
        "run_dir": str(tmp_path / "run"),
        "synth": {"corpus": str(sample_dir / "domain" / "en"), "max_documents": 6, "max_tokens": 64,
                  "overlap_tokens": 8, "questions_per_context": 1, "general_ratio": 0,
                  "splits": {"dev": 0.15, "test": 0.2}, "detect_language": False},
        "teacher": {"model": "sentence-transformers/all-MiniLM-L6-v2", "max_seq_length": 64, "batch_size": 32},
        "students": {"layers": [1], "strategy": "uniform"},
        "training": {"max_steps": 2, "eval_steps": 2, "batch_size": 16, "max_dev_texts": 20},
        "evaluation": {"k": [5], "speed": {"n_texts": 8, "batch_size": 8, "repeats": 1, "warmup_batches": 0,
                                           "min_seconds_per_repeat": 0}},
        "export": {"enabled": True, "variants": ["onnx"], "verify_texts": 16},
    })
    first = m3distill.run_pipeline(config, show_progress=False)
    assert [stage for stage, info in first.stages.items() if info["status"] == "ran"] == list(stage_names(config))
    student = RunLayout(config.run_dir).student("student-1L")
    assert exported_variants(student) == ["onnx"]
    assert 2 <= read_export_record(student)["verify_texts"] <= 17  # the run's test texts, plus the long one
    again = m3distill.run_pipeline(config, show_progress=False)
    assert {info["status"] for info in again.stages.values()} == {"skipped"}
    assert (student / EXPORT_RECORD_FILE).is_file()
