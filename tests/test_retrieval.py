"""Top-k search with Qdrant (qdrant-edge and qdrant-client local mode), P@k overlap and ground-truth metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest

from m3distill.config import EvaluationConfig
from m3distill.errors import M3DistillError
from m3distill.evaluation.retrieval import (
    EdgeSearchBackend,
    QdrantClientBackend,
    check_k_fits,
    make_search_backend,
    search_depth,
)
from m3distill.metrics import ground_truth_metrics, top_k_overlap


@pytest.fixture(scope="module")
def vectors():
    """Clustered random vectors (so HNSW has structure to find) and questions near random contexts."""
    rng = np.random.default_rng(7)
    centers = rng.standard_normal((12, 24))
    contexts = centers[rng.integers(0, 12, size=400)] + 0.6 * rng.standard_normal((400, 24))
    questions = contexts[rng.integers(0, 400, size=40)] + 0.3 * rng.standard_normal((40, 24))
    return contexts.astype(np.float32), questions.astype(np.float32)


def _numpy_exact_top(contexts: np.ndarray, questions: np.ndarray, k: int) -> np.ndarray:
    unit_c = contexts / np.linalg.norm(contexts, axis=1, keepdims=True)
    unit_q = questions / np.linalg.norm(questions, axis=1, keepdims=True)
    return np.argsort(-(unit_q @ unit_c.T), axis=1, kind="stable")[:, :k]


def test_edge_exact_search_equals_numpy_exact_search(vectors):
    contexts, questions = vectors
    top = EdgeSearchBackend().search("teacher", contexts, questions, 25, ["exact"])["exact"]
    np.testing.assert_array_equal(top, _numpy_exact_top(contexts, questions, 25))


def test_qdrant_client_local_mode_equals_edge_exact(vectors):
    contexts, questions = vectors
    backend = make_search_backend(EvaluationConfig(qdrant_url=":memory:"))
    assert isinstance(backend, QdrantClientBackend)
    client_top = backend.search("student/3L", contexts, questions, 15, ["exact"])["exact"]
    edge_top = EdgeSearchBackend().search("student", contexts, questions, 15, ["exact"])["exact"]
    np.testing.assert_array_equal(client_top, edge_top)
    assert backend.client.get_collections().collections == []  # the per-model collection was deleted


def test_injected_client_is_used(vectors):
    from qdrant_client import QdrantClient

    client = QdrantClient(":memory:")
    backend = make_search_backend(EvaluationConfig(), client=client)
    assert isinstance(backend, QdrantClientBackend) and backend.client is client


def test_edge_hnsw_returns_distinct_valid_contexts_close_to_exact(vectors):
    contexts, questions = vectors
    found = EdgeSearchBackend(hnsw_m=16, hnsw_ef=64).search("m", contexts, questions, 10, ["exact", "hnsw"])
    hnsw = found["hnsw"]
    assert hnsw.shape == (40, 10)
    assert ((hnsw >= 0) & (hnsw < len(contexts))).all()
    assert all(len(set(row)) == 10 for row in hnsw)
    np.testing.assert_array_equal(found["exact"], _numpy_exact_top(contexts, questions, 10))
    # 400 clustered points are an easy graph: HNSW must find nearly all true neighbours.
    assert top_k_overlap(hnsw, found["exact"], 10) >= 0.9


def test_overlap_hand_checked():
    top_a = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    top_b = np.array([[2, 1, 9, 8], [5, 0, 8, 7]])
    assert top_k_overlap(top_a, top_b, 1) == pytest.approx((0 + 1) / 2)
    assert top_k_overlap(top_a, top_b, 2) == pytest.approx((2 / 2 + 1 / 2) / 2)
    assert top_k_overlap(top_a, top_b, 4) == pytest.approx((2 / 4 + 3 / 4) / 2)


def test_overlap_of_a_model_with_itself_is_one(vectors):
    contexts, questions = vectors
    top = _numpy_exact_top(contexts, questions, 30)
    assert all(top_k_overlap(top, top, k) == 1.0 for k in (1, 10, 30))


def test_overlap_ignores_padding():
    top_a = np.array([[3, 4, -1]])
    top_b = np.array([[4, 3, -1]])
    assert top_k_overlap(top_a, top_b, 3) == pytest.approx(2 / 3)


def test_ground_truth_hand_checked():
    # Own context (7) at rank 1, rank 3, and missing.
    top = np.array([[7, 1, 2], [3, 4, 7], [5, 6, 8]])
    metrics = ground_truth_metrics(top, [7, 7, 7], [1, 3], "exact")
    assert metrics["exact_recall@1"] == pytest.approx(1 / 3)
    assert metrics["exact_recall@3"] == pytest.approx(2 / 3)
    assert metrics["exact_mrr@10"] == pytest.approx((1 + 1 / 3 + 0) / 3)
    assert metrics["exact_ndcg@10"] == pytest.approx((1 + 1 / math.log2(4) + 0) / 3)


def test_ground_truth_is_perfect_when_own_context_ranks_first():
    top = np.array([[0, 5, 6], [1, 0, 2], [2, 9, 1]])
    metrics = ground_truth_metrics(top, [0, 1, 2], [1, 3], "hnsw")
    assert metrics == {"hnsw_recall@1": 1.0, "hnsw_recall@3": 1.0, "hnsw_mrr@10": 1.0, "hnsw_ndcg@10": 1.0}


def test_k_larger_than_the_index_is_a_clear_error():
    check_k_fits([10, 30], 30)
    with pytest.raises(M3DistillError, match=r"k=50 is larger than the 30 contexts"):
        check_k_fits([10, 50], 30)


@pytest.mark.parametrize(("ks", "n_contexts", "depth"), [([5], 100, 10), ([10, 50], 100, 50), ([5], 7, 7)])
def test_search_depth_covers_k_and_the_ground_truth_cutoff(ks, n_contexts, depth):
    assert search_depth(ks, n_contexts) == depth
