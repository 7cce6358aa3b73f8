"""All three bge-m3 outputs from one ONNX graph: an M3 student's export returns its sparse weights and ColBERT
vectors beside the token embeddings, matches the torch student at export or writes nothing, and serves with
numpy, onnxruntime and tokenizers alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sentence_transformers import SentenceTransformer

import m3distill
from m3distill import export_student
from m3distill.config import ExportConfig
from m3distill.errors import M3DistillError
from m3distill.exporting import verification_texts
from m3distill.m3 import M3Heads, colbert_score, encode_m3, hybrid_score, load_m3_heads, sparse_score
from m3distill.onnx_serving import read_export_record
from m3distill.students.build import build_student
from m3distill.training import STUDENT_METADATA_FILE

REPO_ROOT = Path(__file__).resolve().parents[1]
LONG_TEXT = " ".join(["The quick brown fox jumps over the lazy dog near the riverbank."] * 60)


def _texts() -> list[str]:
    return [*verification_texts(ExportConfig(verify_texts=30)), "", "ok", LONG_TEXT]


@pytest.fixture(scope="module")
def m3_student(m3_teacher_path, tmp_path_factory) -> Path:
    """A 2-layer student of the M3 test teacher with the teacher's heads, saved as a finished m3distill student."""
    folder = tmp_path_factory.mktemp("m3-onnx") / "students" / "student-2L"
    teacher = SentenceTransformer(str(m3_teacher_path), device="cpu")
    build_student(teacher, [0, 5]).save(str(folder))
    M3Heads.load(m3_teacher_path).save(folder)
    (folder / STUDENT_METADATA_FILE).write_text(json.dumps({"name": folder.name}), encoding="utf-8")
    (folder / "README.md").write_text("# student-2L\n\n## Model\n", encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def exported_m3(m3_student) -> Path:
    export_student(m3_student, ExportConfig(), texts=_texts(), show_progress=False)
    return m3_student


def _torch_outputs(folder: Path, texts: list[str]):
    model = SentenceTransformer(str(folder), device="cpu")
    return encode_m3(model, load_m3_heads(model, folder), texts)


def test_an_m3_students_graph_returns_all_three_outputs_as_the_torch_student_does(exported_m3):
    record = read_export_record(exported_m3)
    assert record["outputs"] == ["dense", "sparse", "colbert"]
    assert record["graph_outputs"] == ["last_hidden_state", "sparse_weights", "colbert_vectors"]
    # The XLM-R encoder is fused (the heads ride along) and still meets the tolerances below.
    assert record["graph_fusions"].get("SkipLayerNormalization", 0) >= 2, record["graph_fusions"]
    fp32 = record["variants"]["onnx"]["m3_vs_torch"]
    assert fp32["sparse_max_abs_diff"] <= 1e-4 and fp32["sparse_same_ids"] == 1.0
    assert fp32["colbert_min_cosine"] >= 0.9999
    assert set(record["variants"]["int8"]["m3_vs_torch"]) == set(fp32)
    assert ".encode_m3(" in (exported_m3 / "README.md").read_text(encoding="utf-8")  # the card says how

    texts = ["How do I install a package?", "Wie ändere ich das Passwort?", "", LONG_TEXT]
    reference = _torch_outputs(exported_m3, texts)
    encoder = m3distill.onnx_encoder(exported_m3)
    assert encoder.outputs == ("dense", "sparse", "colbert")
    found = encoder.encode_m3(texts, batch_size=3)
    assert found.outputs == reference.outputs
    np.testing.assert_allclose(found.dense, reference.dense, atol=1e-5)
    for mine, theirs in zip(found.sparse, reference.sparse):
        assert mine.keys() == theirs.keys()
        assert max((abs(mine[token] - theirs[token]) for token in theirs), default=0.0) <= 1e-4
    for mine, theirs in zip(found.colbert, reference.colbert):
        assert mine.shape == theirs.shape
        np.testing.assert_allclose(mine, theirs, atol=1e-5)
    # The scores work on the export's outputs as on the torch student's.
    for score, args in ((sparse_score, (found.sparse[0], found.sparse[1])),
                        (colbert_score, (found.colbert[0], found.colbert[1]))):
        torch_args = (reference.sparse[0], reference.sparse[1]) if score is sparse_score else (
            reference.colbert[0], reference.colbert[1])
        assert score(*args) == pytest.approx(score(*torch_args), abs=1e-4)
    assert hybrid_score(0.5, 0.2, 0.4, (0.4, 0.2, 0.4)) == pytest.approx(0.4)
    # Dense alone, as before, from the same graph.
    np.testing.assert_allclose(encoder.encode(texts), found.dense, atol=1e-6)

    int8 = m3distill.onnx_encoder(exported_m3, "int8").encode_m3(texts)
    assert all(len(mine) == len(theirs) for mine, theirs in zip(int8.colbert, reference.colbert))


def test_the_three_outputs_come_without_torch_transformers_or_sentence_transformers(exported_m3):
    texts = ["a question", "a passage about packages"]
    script = (
        "import json, sys\n"
        "for name in ('torch', 'transformers', 'sentence_transformers'):\n"
        "    sys.modules[name] = None  # any import of them raises ImportError\n"
        "import m3distill\n"
        f"out = m3distill.onnx_encoder({str(exported_m3)!r}, 'onnx', threads=1).encode_m3({texts!r})\n"
        "print(json.dumps({'dense': out.dense.tolist(), 'sparse': [{str(k): v for k, v in s.items()} "
        "for s in out.sparse], 'colbert': [c.tolist() for c in out.colbert]}))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT / "src")})
    assert done.returncode == 0, done.stderr[-2000:]
    found = json.loads(done.stdout)
    reference = _torch_outputs(exported_m3, texts)
    np.testing.assert_allclose(np.array(found["dense"]), reference.dense, atol=1e-5)
    assert [{int(k): v for k, v in s.items()}.keys() for s in found["sparse"]] == [s.keys() for s in reference.sparse]
    for mine, theirs in zip(found["colbert"], reference.colbert):
        np.testing.assert_allclose(np.array(mine), theirs, atol=1e-5)


def test_an_export_that_departs_from_the_torch_heads_writes_nothing(m3_student, tmp_path, monkeypatch):
    import shutil

    import m3distill.exporting.onnx as export_onnx

    folder = tmp_path / "students" / m3_student.name
    shutil.copytree(m3_student, folder, ignore=shutil.ignore_patterns("onnx"))
    original = export_onnx._M3Encoder.forward

    def skewed(self, input_ids, attention_mask, token_type_ids=None):
        hidden, sparse, colbert = original(self, input_ids, attention_mask, token_type_ids)
        return hidden, sparse * 1.01, colbert

    monkeypatch.setattr(export_onnx._M3Encoder, "forward", skewed)
    with pytest.raises(M3DistillError, match="sparse weights"):
        export_student(folder, ExportConfig(variants=["onnx"]), texts=_texts()[:8], show_progress=False)
    assert not (folder / "onnx").exists()


def test_a_dense_only_students_export_is_unchanged(minilm_teacher, tmp_path):
    folder = tmp_path / "students" / "student-1L"
    build_student(minilm_teacher, [5]).save(str(folder))
    (folder / STUDENT_METADATA_FILE).write_text(json.dumps({"name": folder.name}), encoding="utf-8")
    export_student(folder, ExportConfig(variants=["onnx"]), texts=_texts()[:6], show_progress=False)
    record = read_export_record(folder)
    assert record["outputs"] == ["dense"] and record["graph_outputs"] == ["last_hidden_state"]
    assert "m3_vs_torch" not in record["variants"]["onnx"]
    encoder = m3distill.onnx_encoder(folder)
    outputs = encoder.encode_m3(["a text"])
    assert encoder.outputs == ("dense",) and outputs.sparse is None and outputs.dense.shape == (1, 384)


def test_a_trained_m3_student_loads_its_colbert_output_in_sentence_transformers_multi_vector_encoder(
        m3_teacher_path, small_dataset, tmp_path):
    from sentence_transformers import MultiVectorEncoder

    from m3distill.config import StudentsConfig, TeacherConfig, TrainingConfig
    from m3distill.evaluation.speed import size_on_disk
    from m3distill.teacher.cache import build_teacher_cache
    from m3distill.training import distil_students

    teacher = TeacherConfig(model=str(m3_teacher_path), device="cpu")
    build_teacher_cache(small_dataset, teacher, tmp_path / "cache", show_progress=False)
    training = TrainingConfig(max_steps=2, save_steps=2, eval_steps=2, batch_size=8, max_dev_texts=20,
                              early_stopping_patience=None)
    [result] = distil_students(small_dataset, tmp_path / "cache", teacher=teacher,
                               students=StudentsConfig(layers=[1]), training=training, out_dir=tmp_path / "students",
                               show_progress=False)
    texts = ["How do I install a package?", "Wie ändere ich das Passwort?", ""]
    reference = _torch_outputs(result.path, texts)
    native = MultiVectorEncoder(str(result.path / "multi_vector"), device="cpu").encode(texts)
    for mine, theirs in zip(native, reference.colbert):
        np.testing.assert_allclose(np.asarray(mine), theirs, atol=1e-6)
    # The encoder weights are shared with the student's (a hard link): counted once in the student's size, beside the
    # ColBERT projection's own small file.
    weights = result.path / "model.safetensors"
    projection = sum(path.stat().st_size for path in (result.path / "multi_vector").glob("*_Dense/*.safetensors"))
    assert (result.path / "multi_vector" / "model.safetensors").samefile(weights)
    assert size_on_disk(result.path) == weights.stat().st_size + projection > weights.stat().st_size
