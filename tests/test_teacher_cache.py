"""The teacher cache: equal to encoding directly, resumable shard by shard, bound to the teacher that made it."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from m3distill.cli import main
from m3distill.config import TeacherConfig
from m3distill.data.dataset import TABLES, load_synth_dataset, write_table
from m3distill.errors import M3DistillError
from m3distill.fingerprint import hash_model_files
from m3distill.layout import DATASET_MANIFEST_FILE
from m3distill.models import load_sentence_transformer
from m3distill.teacher.cache import (
    CACHE_MANIFEST_FILE,
    TeacherCache,
    build_teacher_cache,
    cache_fingerprint,
    is_complete_cache,
    text_key,
)
from m3distill.stages import TeacherStage
from m3distill.teacher.fingerprint import teacher_fingerprint


def write_dataset_subset(source: Path, out_dir: Path, n_contexts: int, *, n_general: int = 5) -> Path:
    """A copy of a dataset directory keeping its first ``n_contexts`` contexts of each split and their questions."""
    dataset = load_synth_dataset(source)
    contexts = dataset.contexts.groupby("split", sort=False).head(n_contexts)
    tables = {
        "contexts": contexts,
        "questions": dataset.questions[dataset.questions["context_id"].isin(contexts["context_id"])],
        "general": dataset.general.head(n_general),
    }
    out_dir.mkdir(parents=True)
    for kind, (name, schema) in TABLES.items():
        if kind in tables:  # optional tables (crops) are left out of the subset
            write_table(out_dir / name, tables[kind], schema)
    shutil.copy(source / DATASET_MANIFEST_FILE, out_dir / DATASET_MANIFEST_FILE)
    return out_dir


@pytest.fixture(scope="module")
def tiny_dataset(small_dataset, tmp_path_factory) -> Path:
    """About 50 texts: 8 contexts per split, their questions and 5 general texts."""
    return write_dataset_subset(small_dataset, tmp_path_factory.mktemp("tiny") / "dataset", 8)


@pytest.fixture(scope="module")
def tiny_teacher(tiny_xlmr_path) -> TeacherConfig:
    return TeacherConfig(model=str(tiny_xlmr_path), shard_size=10, batch_size=4, device="cpu")


def test_text_key_is_the_sha256_of_the_utf8_text():
    assert text_key("Grüße") == hashlib.sha256("Grüße".encode()).hexdigest()
    assert text_key("a") != text_key("a ")


def test_cache_equals_encoding_with_the_teacher(tiny_dataset, minilm_teacher, minilm_path, tmp_path):
    teacher = TeacherConfig(model=str(minilm_path), shard_size=16, batch_size=8)
    summary = build_teacher_cache(tiny_dataset, teacher, tmp_path / "cache", model=minilm_teacher, show_progress=False)
    texts = load_synth_dataset(tiny_dataset).texts()
    assert summary.n_texts == summary.n_computed == len(texts) and summary.n_reused == 0
    assert summary.n_shards == -(-len(texts) // 16)

    cache = TeacherCache.open(tmp_path / "cache")
    reference = minilm_teacher.encode(texts, batch_size=8, convert_to_numpy=True)
    shuffled = np.random.default_rng(0).permutation(len(texts))
    got = cache.get([texts[i] for i in shuffled])
    assert got.dtype == np.float32 and got.shape == (len(texts), 384)
    np.testing.assert_allclose(got, reference[shuffled], atol=1e-5)
    assert len(cache) == len(texts) and texts[0] in cache and "not in the dataset" not in cache
    assert cache.dim == 384 and cache.fingerprint.normalize and cache.fingerprint.pooling_mode == "mean"
    manifest = json.loads((tmp_path / "cache" / CACHE_MANIFEST_FILE).read_text())
    assert manifest["count"] == len(texts) and set(manifest["outputs"]) == {"dense"}
    assert is_complete_cache(tmp_path / "cache") and cache_fingerprint(tmp_path / "cache") == cache.fingerprint


def test_missing_texts_are_counted_in_the_error(tiny_dataset, tiny_teacher, tmp_path):
    build_teacher_cache(tiny_dataset, tiny_teacher, tmp_path / "cache", show_progress=False)
    cache = TeacherCache.open(tmp_path / "cache")
    known = load_synth_dataset(tiny_dataset).texts()[:3]
    with pytest.raises(M3DistillError, match="2 of 5 texts are not in the teacher cache"):
        cache.get(known + ["unknown one", "unknown two"])


def test_float16_storage_is_close_to_float32(tiny_dataset, tiny_teacher, tmp_path):
    build_teacher_cache(tiny_dataset, tiny_teacher, tmp_path / "f32", show_progress=False)
    half = tiny_teacher.model_copy(update={"dtype": "float16"})
    build_teacher_cache(tiny_dataset, half, tmp_path / "f16", show_progress=False)
    texts = load_synth_dataset(tiny_dataset).texts()
    full, reduced = TeacherCache.open(tmp_path / "f32"), TeacherCache.open(tmp_path / "f16")
    assert reduced.dtype == "float16"
    assert np.load(next((tmp_path / "f16" / "shards").glob("*.dense.npy"))).dtype == np.float16
    assert reduced.get(texts).dtype == np.float32
    np.testing.assert_allclose(reduced.get(texts), full.get(texts), atol=2e-3)
    assert not np.array_equal(reduced.get(texts), full.get(texts))  # it really was rounded
    with pytest.raises(M3DistillError, match='teacher.dtype is "float16" now, "float32" when it was made'):
        TeacherStage(half, tiny_dataset, tmp_path / "f32").run(show_progress=False)


def test_interrupted_cache_resumes_to_the_uninterrupted_result(tiny_dataset, tiny_teacher, tmp_path):
    build_teacher_cache(tiny_dataset, tiny_teacher, tmp_path / "whole", show_progress=False)

    class Killed(Exception):
        pass

    def kill_after_two(info):
        if info.index == 1:
            raise Killed

    with pytest.raises(Killed):
        build_teacher_cache(tiny_dataset, tiny_teacher, tmp_path / "resumed", show_progress=False, on_shard=kill_after_two)
    assert not is_complete_cache(tmp_path / "resumed")
    with pytest.raises(M3DistillError, match="not a complete teacher cache"):
        TeacherCache.open(tmp_path / "resumed")

    embedded = []
    summary = build_teacher_cache(tiny_dataset, tiny_teacher, tmp_path / "resumed", show_progress=False,
                                  on_shard=lambda info: embedded.append(info.name))
    texts = load_synth_dataset(tiny_dataset).texts()
    assert summary.n_reused == 20 and summary.n_computed == len(texts) - 20
    assert embedded[0] == "shard-00002"  # the finished shards were not recomputed
    whole, resumed = TeacherCache.open(tmp_path / "whole"), TeacherCache.open(tmp_path / "resumed")
    assert np.array_equal(whole.get(texts), resumed.get(texts))
    for shard in (tmp_path / "whole" / "shards").iterdir():  # same texts in the same shards
        if shard.name.endswith(".keys.npy"):
            assert np.array_equal(np.load(shard), np.load(tmp_path / "resumed" / "shards" / shard.name))


def test_grown_dataset_embeds_only_the_new_texts(tiny_dataset, small_dataset, tiny_teacher, tmp_path):
    build_teacher_cache(tiny_dataset, tiny_teacher, tmp_path / "cache", show_progress=False)
    bigger = write_dataset_subset(small_dataset, tmp_path / "bigger", 10)
    old_texts, new_texts = load_synth_dataset(tiny_dataset).texts(), load_synth_dataset(bigger).texts()
    summary = build_teacher_cache(bigger, tiny_teacher, tmp_path / "cache", show_progress=False)
    assert summary.n_computed == len(set(new_texts) - set(old_texts)) > 0
    assert len(TeacherCache.open(tmp_path / "cache").get(new_texts)) == len(new_texts)


def test_cache_of_another_teacher_is_refused(tiny_dataset, tiny_teacher, minilm_path, tmp_path):
    # The teacher stage compares the teachers, for a finished cache and for one a killed run left unfinished alike.
    TeacherStage(tiny_teacher, tiny_dataset, tmp_path / "cache").run(show_progress=False)
    unfinished = shutil.copytree(tmp_path / "cache", tmp_path / "unfinished")
    (unfinished / CACHE_MANIFEST_FILE).unlink()
    for cache in (tmp_path / "cache", unfinished):
        with pytest.raises(M3DistillError, match="out of date: teacher.model contents changed"):
            TeacherStage(TeacherConfig(model=str(minilm_path), device="cpu"), tiny_dataset, cache).run(
                show_progress=False)
        shorter = tiny_teacher.model_copy(update={"max_seq_length": 32})
        with pytest.raises(M3DistillError, match="teacher.max_seq_length is 32 now, "):
            TeacherStage(shorter, tiny_dataset, cache).run(show_progress=False)


def test_a_cache_with_the_manifest_of_before_one_fingerprint_record_stays_current(tiny_dataset, tiny_teacher, tmp_path):
    """Format 1 kept the teacher's fingerprint as "fingerprint" and the teacher stage's record nested in "inputs";
    format 2 keeps one record, as every stage's output does. A format-1 cache reads the same and stays current."""
    stage = TeacherStage(tiny_teacher, tiny_dataset, tmp_path / "cache")
    stage.run(show_progress=False)
    manifest_file = tmp_path / "cache" / CACHE_MANIFEST_FILE
    manifest = json.loads(manifest_file.read_text())
    assert manifest["format"] == 2 and manifest["fingerprint"] == stage.fingerprint().digest
    old = {**{key: value for key, value in manifest.items() if key not in ("fingerprint", "inputs", "teacher")},
           "format": 1, "fingerprint": manifest["teacher"],
           "inputs": {"fingerprint": manifest["fingerprint"], "inputs": manifest["inputs"]}}
    manifest_file.write_text(json.dumps(old))
    assert TeacherStage(tiny_teacher, tiny_dataset, tmp_path / "cache").status().current
    assert cache_fingerprint(tmp_path / "cache").to_dict() == manifest["teacher"]
    assert len(TeacherCache.open(tmp_path / "cache")) == len(load_synth_dataset(tiny_dataset).texts())


def test_fingerprint_follows_file_contents(tiny_xlmr_path, tmp_path):
    copy = Path(shutil.copytree(tiny_xlmr_path, tmp_path / "copy"))
    assert hash_model_files(copy) == hash_model_files(tiny_xlmr_path)  # the folder's place does not matter
    (copy / "README.md").write_text("notes")
    assert hash_model_files(copy) == hash_model_files(tiny_xlmr_path)  # nor its README
    config = json.loads((copy / "config.json").read_text())
    config["layer_norm_eps"] = 1e-6
    (copy / "config.json").write_text(json.dumps(config))
    assert hash_model_files(copy) != hash_model_files(tiny_xlmr_path)
    model = load_sentence_transformer(tiny_xlmr_path, device="cpu")
    fingerprint = teacher_fingerprint(model, tiny_xlmr_path)
    assert (fingerprint.pooling_mode, fingerprint.normalize, fingerprint.dim) == ("cls", True, 64)


def test_incomplete_dataset_is_refused_and_nothing_written(tmp_path, tiny_teacher):
    (tmp_path / "dataset").mkdir()
    with pytest.raises(M3DistillError, match="not a complete m3distill dataset"):
        build_teacher_cache(tmp_path / "dataset", tiny_teacher, tmp_path / "cache", show_progress=False)
    assert not (tmp_path / "cache").exists()


def test_teacher_cli_builds_the_cache_and_refuses_bad_inputs(tiny_dataset, tiny_xlmr_path, minilm_path, tmp_path, capsys):
    out = tmp_path / "cache"
    assert main(["-q", "teacher", "--data", str(tiny_dataset), "--teacher", str(tiny_xlmr_path), "--out", str(out),
                 "--dtype", "float16", "--shard-size", "16", "--device", "cpu"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("m3distill teacher:") and "float16" in line and "\n" not in line
    assert TeacherCache.open(out).dtype == "float16"

    missing = ["-q", "teacher", "--data", str(tmp_path / "none"), "--teacher", str(tiny_xlmr_path), "--out", str(tmp_path / "x")]
    assert main(missing) == 2
    assert not (tmp_path / "x").exists()
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("m3distill teacher: error: dataset directory not found")
    assert main(["-q", "teacher", "--data", str(tiny_dataset), "--teacher", str(minilm_path), "--out", str(out),
                 "--dtype", "float16"]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]  # (transformers' loading bar may come first)
    assert error.startswith("m3distill teacher: error:") and "out of date: " in error
    assert "teacher.model contents changed" in error
    assert "--force" in error


@pytest.mark.parametrize("damaged", ["dense", "keys"])
def test_a_truncated_shard_is_one_clear_error_and_the_next_run_redoes_it(tiny_teacher, tmp_path, damaged, capsys):
    from conftest import write_small_dataset

    small_dataset = write_small_dataset(tmp_path / "dataset", per_language=1)
    cache_dir = tmp_path / "cache"
    build_teacher_cache(small_dataset, tiny_teacher, cache_dir, show_progress=False)
    texts = load_synth_dataset(small_dataset).texts()
    expected = TeacherCache.open(cache_dir).get(texts)
    shard = cache_dir / "shards" / f"shard-00001.{damaged}.npy"
    with open(shard, "r+b") as handle:
        handle.truncate(shard.stat().st_size - 100)  # a disk that filled up, a copy cut short

    with pytest.raises(M3DistillError, match=r"damaged: shard shard-00001 .*rerun `m3distill teacher`"):
        TeacherCache.open(cache_dir)
    # Through a command that reads the cache: one line, exit 2.
    code = main(["-q", "train", "--data", str(small_dataset), "--cache", str(cache_dir), "--out",
                 str(tmp_path / "students"), "--layers", "1", "--max-steps", "1"])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and error.startswith("m3distill train: error: teacher cache") and "shard-00001" in error

    summary = build_teacher_cache(small_dataset, tiny_teacher, cache_dir, show_progress=False)
    assert summary.n_computed == 10  # the damaged shard's texts, and no others
    np.testing.assert_allclose(TeacherCache.open(cache_dir).get(texts), expected, atol=1e-6)


@pytest.mark.parametrize("damaged", ["dense", "keys"])
def test_a_shard_changed_in_place_is_caught_by_its_checksum_and_the_next_teacher_run_redoes_it(
    tiny_teacher, tiny_xlmr_path, tmp_path, damaged, capsys
):
    from conftest import write_small_dataset

    from m3distill.config import M3DistillConfig

    dataset = write_small_dataset(tmp_path / "dataset", per_language=1)
    cache_dir = tmp_path / "cache"
    config = M3DistillConfig(teacher=tiny_teacher)
    TeacherStage(config, dataset, cache_dir).run(show_progress=False)
    texts = load_synth_dataset(dataset).texts()
    expected = TeacherCache.open(cache_dir).get(texts)
    shard = cache_dir / "shards" / f"shard-00000.{damaged}.npy"
    size = shard.stat().st_size
    with open(shard, "r+b") as handle:  # bytes overwritten inside the file: the size and the header stay right
        handle.seek(size - 200)
        handle.write(bytes(reversed(handle.read(100))) if damaged == "keys" else b"\x7f" * 100)
    assert shard.stat().st_size == size

    with pytest.raises(M3DistillError, match=rf"shard shard-00000 has a {damaged} file that does not match the "
                                             r"checksum recorded when it was written"):
        TeacherCache.open(cache_dir)
    code = main(["-q", "train", "--data", str(dataset), "--cache", str(cache_dir), "--out", str(tmp_path / "students"),
                 "--layers", "1", "--max-steps", "1"])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and "shard-00000" in error and "rerun `m3distill teacher`" in error
    assert TeacherStage(config, dataset, cache_dir).status().state == "missing"  # run embeds it again

    assert main(["-q", "teacher", "--config", _config_file(tmp_path, tiny_teacher), "--data", str(dataset), "--out",
                 str(cache_dir)]) == 0
    assert "(10 embedded, " in capsys.readouterr().out  # the damaged shard's texts, and no others
    np.testing.assert_allclose(TeacherCache.open(cache_dir).get(texts), expected, atol=1e-6)
    assert TeacherStage(config, dataset, cache_dir).status().current


def _config_file(folder: Path, teacher: TeacherConfig) -> str:
    import yaml

    path = folder / "teacher.yaml"
    path.write_text(yaml.safe_dump({"teacher": teacher.model_dump(mode="json")}), encoding="utf-8")
    return str(path)


def test_a_cache_from_before_checksums_opens_and_the_next_teacher_run_records_them(tiny_dataset, tiny_teacher,
                                                                                    tmp_path, caplog):
    cache_dir = tmp_path / "cache"
    build_teacher_cache(tiny_dataset, tiny_teacher, cache_dir, show_progress=False)
    manifest = json.loads((cache_dir / CACHE_MANIFEST_FILE).read_text(encoding="utf-8"))
    recorded = {entry["name"]: entry.pop("checksums") for entry in manifest["shards"]}
    (cache_dir / CACHE_MANIFEST_FILE).write_text(json.dumps(manifest), encoding="utf-8")

    with caplog.at_level("INFO", logger="m3distill"):
        assert len(TeacherCache.open(cache_dir)) > 0
    assert "records no checksums" in caplog.text

    summary = build_teacher_cache(tiny_dataset, tiny_teacher, cache_dir, show_progress=False)
    assert summary.n_computed == 0
    manifest = json.loads((cache_dir / CACHE_MANIFEST_FILE).read_text(encoding="utf-8"))
    assert {entry["name"]: entry["checksums"] for entry in manifest["shards"]} == recorded
