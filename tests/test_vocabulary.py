"""Vocabulary trimming: a student keeps only the tokens its corpus needs, tokenizes its corpus exactly as the teacher
does, loads in plain sentence-transformers and onnxruntime, and reports sparse weights under the teacher's ids."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from sentence_transformers import SentenceTransformer
from stand_in import TINY_SHAPE, make_xlmr_stand_in, xlmr_tokenizer_file

import m3distill
from m3distill import export_student
from m3distill.config import (
    EvaluationConfig,
    ExportConfig,
    LossConfig,
    SpeedConfig,
    StudentsConfig,
    TeacherConfig,
    TrainingConfig,
)
from m3distill.data.dataset import load_synth_dataset
from m3distill.evaluation.evaluate import evaluate_models
from m3distill.layout import REPORT_MD_FILE, VOCABULARY_MAP_FILE
from m3distill.m3 import M3Heads, encode_m3, load_m3_heads
from m3distill.metrics import row_cosines
from m3distill.models import count_embedding_parameters, count_parameters
from m3distill.students.build import build_student
from m3distill.students.vocabulary import (
    choose_vocabulary,
    read_teacher_ids,
    tokenization_changes,
    trim_student,
    trim_tokenizer_json,
    write_vocabulary_map,
)
from m3distill.teacher.cache import build_teacher_cache
from m3distill.training import distil_students, read_student_metadata
from m3distill.training.losses import DistillationLoss

REPO_ROOT = Path(__file__).resolve().parents[1]
# Texts the corpus never saw, in its scripts (Latin, Cyrillic, Hangul, CJK) and with words it lacks.
UNSEEN = ["Wie installiere ich ein zusätzliches Paket auf meinem Rechner?", "Как обновить систему без интернета?",
          "패키지를 설치하는 방법은 무엇입니까?", "如何配置网络代理服务器", "xylophone quizzically zigzagged"]


def _corpus(sample_dir: Path, languages: tuple[str, ...] = ("en", "de", "ru", "ko", "zh"), limit: int = 6) -> list[str]:
    texts = []
    for language in languages:
        for path in sorted((sample_dir / "domain" / language).glob("*.txt"))[:limit]:
            texts += [part for part in path.read_text(encoding="utf-8").split("\n\n") if part.strip()]
    return texts


@pytest.fixture(scope="module")
def xlmr_teacher_dir(tmp_path_factory) -> Path:
    """The tiny XLM-R stand-in with bge-m3's own tokenizer (250,002 Unigram pieces) and bge-m3's heads."""
    return make_xlmr_stand_in(tmp_path_factory.mktemp("xlmr-vocab") / "teacher", **TINY_SHAPE, max_seq_length=128,
                              tokenizer="xlmr", m3_heads=True)


@pytest.fixture(scope="module")
def xlmr_teacher(xlmr_teacher_dir) -> SentenceTransformer:
    return SentenceTransformer(str(xlmr_teacher_dir), device="cpu")


def _unknowns(tokenizer, texts: list[str]) -> int:
    return sum(tokenizer(text)["input_ids"].count(tokenizer.unk_token_id) for text in texts)


@pytest.mark.parametrize("family", ["wordpiece", "unigram"])
def test_a_trimmed_student_embeds_its_corpus_exactly_as_the_untrimmed_one(family, minilm_teacher, xlmr_teacher,
                                                                           sample_dir, tmp_path):
    teacher = minilm_teacher if family == "wordpiece" else xlmr_teacher
    corpus = _corpus(sample_dir)
    choice = choose_vocabulary(teacher.tokenizer, corpus, "corpus")
    layers = [0, 5] if family == "wordpiece" else [0, 3]
    full, trimmed = build_student(teacher, layers), trim_student(build_student(teacher, layers), choice)
    assert len(trimmed.tokenizer) == choice.size < len(teacher.tokenizer) // 3

    # The teacher's tokenization of every corpus text, token for token, and so the same embeddings.
    assert tokenization_changes(teacher.tokenizer, trimmed.tokenizer, np.array(choice.kept_ids), corpus) == {
        "changed_token_share": 0.0, "identical_text_share": 1.0}
    np.testing.assert_allclose(trimmed.encode(corpus), full.encode(corpus), atol=1e-6)
    # The embedding table shrank to the kept rows; the layers are untouched.
    assert count_embedding_parameters(trimmed) == choice.size * trimmed.get_embedding_dimension()
    assert (count_parameters(full) - count_parameters(trimmed)
            == count_embedding_parameters(full) - count_embedding_parameters(trimmed))

    # Unseen text in the corpus's scripts: split into smaller kept pieces, never into new unknown tokens.
    assert _unknowns(trimmed.tokenizer, UNSEEN) == _unknowns(teacher.tokenizer, UNSEEN)
    changes = tokenization_changes(teacher.tokenizer, trimmed.tokenizer, np.array(choice.kept_ids), UNSEEN)
    assert 0 < changes["changed_token_share"] < 1 and changes["identical_text_share"] < 1

    # The saved folder loads in plain sentence-transformers, with a tokenizer.json alone (no slow vocabulary file
    # that would still hold every piece).
    trimmed.save(str(tmp_path))
    assert not (tmp_path / "vocab.txt").exists() and not list(tmp_path.glob("*.model"))
    loaded = SentenceTransformer(str(tmp_path), device="cpu")
    assert len(loaded.tokenizer) == choice.size
    np.testing.assert_allclose(loaded.encode(corpus[:8] + UNSEEN), trimmed.encode(corpus[:8] + UNSEEN), atol=1e-6)


def test_the_kept_pieces_follow_the_mode_and_the_budget(xlmr_teacher, sample_dir):
    tokenizer = xlmr_teacher.tokenizer
    english = _corpus(sample_dir, ("en",))
    corpus = choose_vocabulary(tokenizer, english, "corpus")
    languages = choose_vocabulary(tokenizer, english, "corpus+languages")
    assert corpus.scripts == languages.scripts == ["LATIN"]
    assert set(corpus.kept_ids) < set(languages.kept_ids)
    # Every piece of the English corpus's tokenization is kept, and the special tokens, whatever the mode.
    used = {token for text in english for token in tokenizer(text, add_special_tokens=False)["input_ids"]}
    specials = set(tokenizer.all_special_ids)
    assert used | specials <= set(corpus.kept_ids)
    assert corpus.corpus_tokens == len(used)
    # corpus+languages adds Latin pieces the corpus never used, and no Cyrillic or Hangul piece.
    added = [tokenizer.convert_ids_to_tokens(i) for i in sorted(set(languages.kept_ids) - set(corpus.kept_ids))]
    assert added and not any(re.search("[\u0400-\u04ff\uac00-\ud7af]", piece) for piece in added)

    budget = choose_vocabulary(tokenizer, english, "corpus", budget=100)
    assert budget.size < corpus.size and budget.budget == 100
    # The 100 most frequent corpus pieces are among the kept ones.
    counts: dict[int, int] = {}
    for text in english:
        for token in tokenizer(text, add_special_tokens=False)["input_ids"]:
            counts[token] = counts.get(token, 0) + 1
    top = sorted(counts, key=lambda token: -counts[token])[:50]
    assert set(top) <= set(budget.kept_ids)
    with pytest.raises(ValueError, match="budget"):
        choose_vocabulary(tokenizer, english, "corpus", budget=0)
    with pytest.raises(ValueError, match="mode"):
        choose_vocabulary(tokenizer, english, "all")


def test_every_id_the_tokenizer_mentions_is_renumbered():
    spec = json.loads(xlmr_tokenizer_file().read_text(encoding="utf-8"))
    kept = [0, 1, 2, 3, 6, 10, 250001]
    trimmed = trim_tokenizer_json(spec, kept)
    assert [piece for piece, _ in trimmed["model"]["vocab"]] == [spec["model"]["vocab"][i][0] for i in kept]
    assert {added["content"]: added["id"] for added in trimmed["added_tokens"]}["<mask>"] == 6
    assert trimmed["post_processor"]["special_tokens"]["</s>"]["ids"] == [2]
    with pytest.raises(ValueError, match="special tokens"):
        trim_tokenizer_json(spec, [0, 1, 2, 6])


def test_a_budget_needs_a_trimming_mode():
    with pytest.raises(ValidationError, match="vocabulary_budget"):
        StudentsConfig(vocabulary_budget=1000)
    assert StudentsConfig(vocabulary="corpus", vocabulary_budget=1000).vocabulary_budget == 1000


def test_sparse_weights_of_a_trimmed_m3_student_are_the_untrimmed_ones_under_the_teachers_ids(
        xlmr_teacher, xlmr_teacher_dir, sample_dir, tmp_path):
    corpus = _corpus(sample_dir)[:40]
    choice = choose_vocabulary(xlmr_teacher.tokenizer, corpus, "corpus")
    heads = M3Heads.load(xlmr_teacher_dir)
    full = build_student(xlmr_teacher, [0, 3])
    trimmed = trim_student(build_student(xlmr_teacher, [0, 3]), choice)
    trimmed.save(str(tmp_path))
    heads.save(tmp_path)
    write_vocabulary_map(tmp_path, choice)
    loaded = SentenceTransformer(str(tmp_path), device="cpu")

    reference = encode_m3(full, heads, corpus)
    found = encode_m3(loaded, load_m3_heads(loaded, tmp_path), corpus)
    np.testing.assert_allclose(found.dense, reference.dense, atol=1e-6)
    for mine, theirs in zip(found.sparse, reference.sparse):
        assert mine.keys() == theirs.keys()
        np.testing.assert_allclose([mine[key] for key in theirs], list(theirs.values()), atol=1e-6)
    for mine, theirs in zip(found.colbert, reference.colbert):
        np.testing.assert_allclose(mine, theirs, atol=1e-6)
    # Keys are the teacher's ids: without the map they would be the student's own, smaller numbers.
    assert max(max(weights) for weights in found.sparse if weights) >= choice.size
    assert read_teacher_ids(tmp_path).tolist() == choice.kept_ids


def test_the_online_teacher_reads_a_trimmed_students_batches_through_the_map(xlmr_teacher, sample_dir):
    corpus = _corpus(sample_dir)[:16]
    choice = choose_vocabulary(xlmr_teacher.tokenizer, corpus, "corpus")
    # All the teacher's layers: a trimmed copy of the teacher computes what the teacher computes, so the token loss
    # is zero exactly when the teacher is fed the teacher's ids.
    student = trim_student(build_student(xlmr_teacher, [0, 1, 2, 3]), choice)
    features = student.preprocess(corpus)
    labels = torch.as_tensor(xlmr_teacher.encode(corpus))
    config = LossConfig(cosine=1.0, token=1.0)
    mapped = DistillationLoss(student, config, teacher=xlmr_teacher,
                              teacher_token_ids=torch.tensor(choice.kept_ids))([dict(features)], labels)
    unmapped = DistillationLoss(student, config, teacher=xlmr_teacher)([dict(features)], labels)
    assert float(mapped) < 1e-6 < float(unmapped)


@pytest.fixture(scope="module")
def trimmed_m3_run(small_dataset, tmp_path_factory):
    """A tiny M3 teacher with bge-m3's tokenizer, its cache, and a 2-layer student trained with a trimmed
    vocabulary (the online teacher runs: the heads train)."""
    root = tmp_path_factory.mktemp("trimmed-run")
    teacher = make_xlmr_stand_in(root / "teacher", **TINY_SHAPE, max_seq_length=128, tokenizer="xlmr", m3_heads=True)
    config = TeacherConfig(model=str(teacher), device="cpu")
    build_teacher_cache(small_dataset, config, root / "cache", show_progress=False)
    training = TrainingConfig(max_steps=4, save_steps=2, eval_steps=2, batch_size=8, learning_rate=1e-3,
                              max_dev_texts=40, early_stopping_patience=None)
    [result] = distil_students(small_dataset, root / "cache", teacher=config,
                               students=StudentsConfig(layers=[2], vocabulary="corpus"), training=training,
                               out_dir=root / "students", show_progress=False)
    return teacher, result.path


def test_training_trims_before_distilling_and_records_the_vocabulary(trimmed_m3_run, tmp_path):
    teacher_dir, folder = trimmed_m3_run
    metadata = read_student_metadata(folder)
    vocabulary = metadata["vocabulary"]
    assert vocabulary["mode"] == "corpus" and vocabulary["teacher_size"] == 250002
    assert vocabulary["size"] == len(read_teacher_ids(folder)) < 250002 // 10
    assert metadata["parameters"]["student_embeddings"] == vocabulary["size"] * 64
    assert VOCABULARY_MAP_FILE in metadata["contents"]  # part of the student's identity
    assert "vocabulary" in (folder / "README.md").read_text(encoding="utf-8").lower()

    model = SentenceTransformer(str(folder), device="cpu")
    teacher = SentenceTransformer(str(teacher_dir), device="cpu")
    texts = ["Wie installiere ich ein Paket?", "How do I change the password?"]
    outputs = encode_m3(model, load_m3_heads(model, folder), texts)
    teacher_ids = {token for text in texts for token in teacher.tokenizer(text)["input_ids"]}
    kept = set(read_teacher_ids(folder).tolist())
    # Sparse keys are teacher ids of kept tokens (any text's pieces are kept pieces).
    assert all(set(weights) <= kept for weights in outputs.sparse)
    assert any(set(weights) & teacher_ids for weights in outputs.sparse)


def test_a_trimmed_student_exports_and_serves_without_torch_at_its_size(trimmed_m3_run, tmp_path):
    _, folder = trimmed_m3_run
    copy = tmp_path / "students" / folder.name
    shutil.copytree(folder, copy)
    texts = [*UNSEEN, "A short one.", ""]
    result = export_student(copy, ExportConfig(), texts=texts, show_progress=False)
    assert result is not None
    encoder = m3distill.onnx_encoder(copy)
    model = SentenceTransformer(str(copy), device="cpu")
    assert row_cosines(encoder.encode(texts), model.encode(texts)).min() >= 0.9999
    # The float32 graph holds the trimmed table: about its size, far below the full table's 250,002 x 64 floats.
    assert encoder.weights_bytes < 250002 * 64 * 4 / 4
    # All three outputs from the graph, the sparse ones under the teacher's ids, as the torch student gives them.
    served, reference = encoder.encode_m3(texts), encode_m3(model, load_m3_heads(model, copy), texts)
    assert [weights.keys() for weights in served.sparse] == [weights.keys() for weights in reference.sparse]
    assert max(max(weights, default=0) for weights in served.sparse) >= len(read_teacher_ids(copy))

    # int8 with the embedding table quantised too (Gather): smaller still, and close to the torch student.
    gather = ExportConfig.model_validate({"quantization": {"op_types": ["MatMul", "Gather"]}})
    export_student(copy, gather, texts=texts, show_progress=False, force=True)
    int8 = m3distill.onnx_encoder(copy, "int8")
    assert row_cosines(int8.encode(texts), model.encode(texts)).mean() > 0.95


def test_the_report_shows_each_models_vocabulary_and_the_question_tokens_it_lacks(trimmed_m3_run, small_dataset,
                                                                                  tmp_path):
    teacher_dir, folder = trimmed_m3_run
    config = EvaluationConfig(k=[5], distractors="test",
                              speed=SpeedConfig(n_texts=8, batch_size=8, repeats=1, warmup_batches=1,
                                                min_seconds_per_repeat=0))
    report = evaluate_models(small_dataset, TeacherConfig(model=str(teacher_dir)), [folder], config,
                             tmp_path / "report", show_progress=False)
    teacher, student = report.models
    assert teacher.vocabulary["mode"] == "full" and teacher.vocabulary["size"] == 250002
    assert student.vocabulary["mode"] == "corpus" and student.vocabulary["size"] == len(read_teacher_ids(folder))
    assert student.vocabulary["embedding_parameters"] == student.vocabulary["size"] * 64
    assert student.vocabulary["other_parameters"] < teacher.vocabulary["other_parameters"]  # 2 of 4 layers
    # The test questions are unseen: the share is measured, between 0 and 1, and the same as computed directly.
    questions = load_synth_dataset(small_dataset).split_questions("test")["text"].tolist()
    direct = tokenization_changes(SentenceTransformer(str(teacher_dir), device="cpu").tokenizer,
                                  SentenceTransformer(str(folder), device="cpu").tokenizer,
                                  read_teacher_ids(folder), questions)
    assert student.vocabulary["changed_token_share"] == pytest.approx(direct["changed_token_share"])
    markdown = (tmp_path / "report" / REPORT_MD_FILE).read_text(encoding="utf-8")
    assert "## Vocabulary" in markdown and f"{student.vocabulary['size']:,} of 250,002" in markdown


def test_a_tokenizer_that_cannot_be_trimmed_is_one_clear_error():
    from types import SimpleNamespace

    from m3distill.errors import M3DistillError

    bpe = SimpleNamespace(backend_tokenizer=SimpleNamespace(to_str=lambda: json.dumps({"model": {"type": "BPE"}})))
    with pytest.raises(M3DistillError, match="WordPiece and Unigram.*students.vocabulary to full"):
        choose_vocabulary(bpe, ["a text"], "corpus")
    with pytest.raises(M3DistillError, match="fast tokenizer"):
        choose_vocabulary(SimpleNamespace(), ["a text"], "corpus")
