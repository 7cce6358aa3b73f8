"""Alignment of a student with the teacher, checked against sentence-transformers' own evaluators."""

from __future__ import annotations

import numpy as np
import pytest
from sentence_transformers.sentence_transformer.evaluation import EmbeddingSimilarityEvaluator, MSEEvaluator
from sentence_transformers.util import pairwise_cos_sim

from m3distill.data.dataset import load_synth_dataset
from m3distill.metrics import (
    MEAN_COSINE,
    MSE,
    MSE_X100,
    PEARSON_COSINE,
    SPEARMAN_COSINE,
    alignment_metrics,
    draw_similarity_pairs,
)
from m3distill.students.build import build_student


def test_alignment_equals_mse_and_similarity_evaluators(minilm_teacher, small_dataset):
    dataset = load_synth_dataset(small_dataset)
    questions = dataset.split_questions("test").head(16)
    contexts = dataset.split_contexts("test")
    texts = questions["text"].tolist() + contexts["text"].tolist()
    row_of_context = {cid: len(questions) + row for row, cid in enumerate(contexts["context_id"])}
    pairs = draw_similarity_pairs(
        np.arange(len(questions)), [row_of_context[c] for c in questions["context_id"]],
        list(row_of_context.values()), negatives_per_question=3, seed=1,
    )
    student = build_student(minilm_teacher, [0, 3])
    teacher_embeddings = minilm_teacher.encode(texts, convert_to_numpy=True)
    student_embeddings = student.encode(texts, convert_to_numpy=True)
    ours = alignment_metrics(student_embeddings, teacher_embeddings, pairs)

    mse_results = MSEEvaluator(texts, texts, teacher_model=minilm_teacher, name="test", write_csv=False)(student)
    assert ours[MSE_X100] == pytest.approx(-mse_results["test_negative_mse"], rel=1e-4)
    assert ours[MSE] == pytest.approx(ours[MSE_X100] / 100)

    left = [texts[i] for i in pairs.left]
    right = [texts[i] for i in pairs.right]
    gold = pairwise_cos_sim(teacher_embeddings[pairs.left], teacher_embeddings[pairs.right]).numpy().tolist()
    similarity = EmbeddingSimilarityEvaluator(left, right, gold, main_similarity="cosine", name="test", write_csv=False)
    theirs = similarity(student)
    assert ours[SPEARMAN_COSINE] == pytest.approx(theirs["test_spearman_cosine"], abs=1e-4)
    assert ours[PEARSON_COSINE] == pytest.approx(theirs["test_pearson_cosine"], abs=1e-4)
    assert 0 < ours[MEAN_COSINE] < 1  # an untrained 2-layer cut is neither identical nor unrelated


def test_teacher_against_itself_is_perfectly_aligned():
    embeddings = np.random.default_rng(0).standard_normal((30, 8))
    pairs = draw_similarity_pairs(range(10), range(10, 20), range(10, 30), negatives_per_question=2, seed=0)
    metrics = alignment_metrics(embeddings, embeddings.copy(), pairs)
    assert metrics[MSE] == 0.0
    assert metrics[MEAN_COSINE] == pytest.approx(1.0)
    assert metrics[PEARSON_COSINE] == pytest.approx(1.0)
    assert metrics[SPEARMAN_COSINE] == pytest.approx(1.0)


def test_embedding_error_hand_checked():
    teacher = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 2.0]])
    student = np.array([[1.0, 1.0], [0.0, 1.0], [2.0, 2.0]])
    pairs = draw_similarity_pairs([0, 1], [2, 2], [2], negatives_per_question=0, seed=0)
    metrics = alignment_metrics(student, teacher, pairs, text_rows=np.array([0, 1]))
    assert metrics[MSE] == pytest.approx(1 / 4)
    assert metrics[MSE_X100] == pytest.approx(25.0)
    assert metrics[MEAN_COSINE] == pytest.approx((1 / np.sqrt(2) + 1) / 2)


def test_constant_similarities_give_no_correlation_instead_of_nan():
    teacher = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    student = np.array([[1.0, 0.2], [0.3, 1.0], [1.0, 1.0]])
    pairs = draw_similarity_pairs([0, 1], [2, 2], [2], negatives_per_question=0, seed=0)
    metrics = alignment_metrics(student, teacher, pairs)
    assert metrics[PEARSON_COSINE] is None and metrics[SPEARMAN_COSINE] is None
    assert metrics[MSE] is not None


def test_pairs_hold_each_question_with_its_own_context_and_distinct_negatives():
    own = [10, 11, 12, 13, 10]
    pool = list(range(10, 16))
    pairs = draw_similarity_pairs(range(5), own, pool, negatives_per_question=3, seed=5)
    assert len(pairs) == 5 * 4
    for question, own_context in enumerate(own):
        mask = pairs.left == question
        assert pairs.right[mask & pairs.matching].tolist() == [own_context]
        negatives = pairs.right[mask & ~pairs.matching]
        assert len(negatives) == 3 and len(set(negatives)) == 3
        assert own_context not in negatives and set(negatives) <= set(pool)
    again = draw_similarity_pairs(range(5), own, pool, negatives_per_question=3, seed=5)
    np.testing.assert_array_equal(again.right, pairs.right)
    other_seed = draw_similarity_pairs(range(5), own, pool, negatives_per_question=3, seed=6)
    assert not np.array_equal(other_seed.right, pairs.right)


def test_negatives_are_capped_by_the_pool():
    pairs = draw_similarity_pairs([0, 1], [5, 6], [5, 6], negatives_per_question=4, seed=0)
    assert pairs.right.tolist() == [5, 6, 6, 5]
    assert pairs.matching.tolist() == [True, False, True, False]


def test_student_of_another_width_still_gets_correlations():
    rng = np.random.default_rng(1)
    teacher = rng.standard_normal((12, 8))
    student = teacher[:, :4] + 0.01 * rng.standard_normal((12, 4))
    pairs = draw_similarity_pairs(range(4), range(4, 8), range(4, 12), negatives_per_question=3, seed=0)
    metrics = alignment_metrics(student, teacher, pairs)
    assert metrics[MSE] is None and metrics[MSE_X100] is None and metrics[MEAN_COSINE] is None
    assert -1 <= metrics[SPEARMAN_COSINE] <= 1
