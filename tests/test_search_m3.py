"""Exact M3 search (dense, sparse, ColBERT and hybrid) in both Qdrant backends, against numpy scored by hand."""

from __future__ import annotations

import numpy as np
import pytest

from m3distill.evaluation.retrieval import (
    M3_SEARCH_OUTPUTS,
    EdgeSearchBackend,
    QdrantClientBackend,
)
from m3distill.m3 import M3Embeddings

VOCAB = 50
RARE_TOKEN = VOCAB - 1  # only in contexts RARE_CONTEXTS and in question RARE_QUESTION
RARE_CONTEXTS = (5, 6)
RARE_QUESTION = 2
EMPTY_CONTEXTS = (0, 1)
EMPTY_QUESTION = 0
K = 10
TOLERANCE = 1e-5  # Qdrant scores in float32


def _random_texts(rng: np.random.Generator, n: int, max_tokens: int) -> M3Embeddings:
    dense = rng.standard_normal((n, 8)).astype(np.float32)
    sparse = []
    for _ in range(n):
        tokens = rng.choice(RARE_TOKEN, size=int(rng.integers(1, max_tokens + 1)), replace=False)
        sparse.append({int(token): float(rng.uniform(0.05, 1.0)) for token in tokens})
    colbert = []
    for _ in range(n):
        vectors = rng.standard_normal((int(rng.integers(3, 10)), 16))
        colbert.append((vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32))
    return M3Embeddings(dense=dense, sparse=sparse, colbert=colbert)


@pytest.fixture(scope="module")
def m3_data() -> tuple[M3Embeddings, M3Embeddings]:
    """60 contexts and 12 questions; some without sparse weights, one question matching only two contexts."""
    rng = np.random.default_rng(11)
    contexts, questions = _random_texts(rng, 60, 4), _random_texts(rng, 12, 6)
    for row in EMPTY_CONTEXTS:
        contexts.sparse[row] = {}
    for row in RARE_CONTEXTS:
        contexts.sparse[row][RARE_TOKEN] = float(rng.uniform(0.2, 1.0))
    questions.sparse[EMPTY_QUESTION] = {}
    questions.sparse[RARE_QUESTION] = {RARE_TOKEN: 0.7}
    return contexts, questions


def _reference_scores(contexts: M3Embeddings, questions: M3Embeddings, weights) -> dict[str, np.ndarray]:
    """Every (question, context) score as FlagEmbedding defines it, computed here in float64."""
    unit_c = contexts.dense / np.linalg.norm(contexts.dense, axis=1, keepdims=True)
    unit_q = questions.dense / np.linalg.norm(questions.dense, axis=1, keepdims=True)
    dense = unit_q.astype(np.float64) @ unit_c.T.astype(np.float64)

    def bag(texts: M3Embeddings) -> np.ndarray:
        matrix = np.zeros((len(texts), VOCAB))
        for row, weights_of_text in enumerate(texts.sparse):
            for token, weight in weights_of_text.items():
                matrix[row, token] = weight
        return matrix

    sparse = bag(questions) @ bag(contexts).T
    colbert = np.array([
        [(q.astype(np.float64) @ c.T.astype(np.float64)).max(axis=1).mean() for c in contexts.colbert]
        for q in questions.colbert
    ])
    hybrid = weights[0] * dense + weights[1] * sparse + weights[2] * colbert
    return {"dense": dense, "sparse": sparse, "colbert": colbert, "hybrid": hybrid}


def _assert_exact_top(found: np.ndarray, scores: np.ndarray, k: int, *, only_positive: bool = False) -> None:
    """``found`` holds each question's k best contexts, best first, as the same set as the reference up to ties.

    With ``only_positive`` (sparse) only contexts scoring above 0 may appear, and -1 pads the rest.
    """
    assert found.shape == (len(scores), k) and found.dtype == np.int64
    for question, (ids, row_scores) in enumerate(zip(found, scores, strict=True)):
        eligible = np.flatnonzero(row_scores > 0) if only_positive else np.arange(len(row_scores))
        count = min(k, len(eligible))
        hits = ids[:count]
        assert np.all(ids[count:] == -1), f"question {question}: expected {count} hits then padding, got {ids}"
        if count == 0:
            continue
        assert len(set(hits.tolist())) == count and set(hits.tolist()) <= set(eligible.tolist()), (question, ids)
        hit_scores = row_scores[hits]
        assert np.all(np.diff(hit_scores) <= TOLERANCE), f"question {question}: not best first {hit_scores}"
        kth = np.sort(row_scores[eligible])[::-1][count - 1]
        must_have = set(np.flatnonzero(row_scores > kth + TOLERANCE).tolist()) & set(eligible.tolist())
        assert must_have <= set(hits.tolist()), f"question {question}: missing {must_have - set(hits.tolist())}"
        assert np.all(hit_scores >= kth - TOLERANCE), f"question {question}: {hit_scores} below the k-th {kth}"


def _backend(name: str, tmp_path):
    if name == "edge":
        return EdgeSearchBackend(work_dir=tmp_path)
    from qdrant_client import QdrantClient

    return QdrantClientBackend(QdrantClient(":memory:"))


BACKENDS = ["edge", "qdrant-client-local"]


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_every_output_is_the_exact_top_k(m3_data, backend_name, tmp_path):
    contexts, questions = m3_data
    backend = _backend(backend_name, tmp_path)
    found = backend.search_m3("student", contexts, questions, K, M3_SEARCH_OUTPUTS)
    assert set(found) == set(M3_SEARCH_OUTPUTS)
    reference = _reference_scores(contexts, questions, (1.0, 0.3, 1.0))
    for output in M3_SEARCH_OUTPUTS:
        _assert_exact_top(found[output], reference[output], K, only_positive=output == "sparse")
    assert set(backend.last_timings) == {"upsert"} | {f"search_{output}" for output in M3_SEARCH_OUTPUTS}


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_hybrid_follows_the_weights_given(m3_data, backend_name, tmp_path):
    contexts, questions = m3_data
    weights = (0.2, 2.0, 0.5)
    backend = _backend(backend_name, tmp_path)
    found = backend.search_m3("student", contexts, questions, K, ["hybrid"], hybrid_weights=weights)["hybrid"]
    _assert_exact_top(found, _reference_scores(contexts, questions, weights)["hybrid"], K)
    default = backend.search_m3("student", contexts, questions, K, ["hybrid"])["hybrid"]
    assert not np.array_equal(found, default)  # the weights changed the ranking, so the check above means something


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_texts_without_sparse_weights_pad_sparse_and_still_rank_in_hybrid(m3_data, backend_name, tmp_path):
    contexts, questions = m3_data
    found = _backend(backend_name, tmp_path).search_m3("student", contexts, questions, K, ["sparse", "hybrid"])
    assert np.all(found["sparse"][EMPTY_QUESTION] == -1)
    assert set(found["sparse"][RARE_QUESTION][:2].tolist()) == set(RARE_CONTEXTS)
    assert np.all(found["sparse"][RARE_QUESTION][2:] == -1)
    assert not set(EMPTY_CONTEXTS) & set(found["sparse"].ravel().tolist())
    assert np.all(found["hybrid"] >= 0)  # every context has a hybrid score, sparse or not
    reference = _reference_scores(contexts, questions, (1.0, 0.3, 1.0))["hybrid"]
    _assert_exact_top(found["hybrid"][[EMPTY_QUESTION]], reference[[EMPTY_QUESTION]], K)


def test_searches_leave_nothing_behind(m3_data, tmp_path):
    from qdrant_client import QdrantClient

    contexts, questions = m3_data
    EdgeSearchBackend(work_dir=tmp_path).search_m3("student", contexts, questions, K, ["colbert"])
    assert list(tmp_path.iterdir()) == []
    client = QdrantClient(":memory:")
    QdrantClientBackend(client).search_m3("student", contexts, questions, K, ["sparse"])
    assert client.get_collections().collections == []


def test_a_dense_only_model_can_still_be_searched_by_its_dense_output(m3_data, tmp_path):
    contexts, questions = m3_data
    dense_only_c, dense_only_q = M3Embeddings(dense=contexts.dense), M3Embeddings(dense=questions.dense)
    found = EdgeSearchBackend(work_dir=tmp_path).search_m3("m", dense_only_c, dense_only_q, K, ["dense"])["dense"]
    _assert_exact_top(found, _reference_scores(contexts, questions, (1.0, 0.3, 1.0))["dense"], K)


@pytest.mark.parametrize(
    ("outputs", "weights", "strip", "message"),
    [
        (["sparse"], (1.0, 0.3, 1.0), "sparse", "no sparse weights"),
        (["hybrid"], (1.0, 0.3, 1.0), "colbert", "no ColBERT vectors"),
        (["bm25"], (1.0, 0.3, 1.0), None, "subset of"),
        ([], (1.0, 0.3, 1.0), None, "non-empty"),
        (["hybrid"], (1.0, 0.3), None, "three finite numbers"),
    ],
)
def test_inputs_that_cannot_be_searched_are_clear_errors(m3_data, outputs, weights, strip, message, tmp_path):
    contexts, questions = m3_data
    if strip:
        contexts = M3Embeddings(dense=contexts.dense, **{
            name: getattr(contexts, name) for name in ("sparse", "colbert") if name != strip
        })
    with pytest.raises(ValueError, match=message):
        EdgeSearchBackend(work_dir=tmp_path).search_m3("m", contexts, questions, K, outputs, hybrid_weights=weights)
