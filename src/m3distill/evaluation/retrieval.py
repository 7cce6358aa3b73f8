"""Retrieval with Qdrant: each model's top-k contexts for every test question.

Search backends share one small interface, :class:`VectorSearchBackend`: index a model's context embeddings,
run every question, return the top ``limit`` context rows per question for each requested index kind, and
leave nothing behind.

* :class:`EdgeSearchBackend` (default): the embedded qdrant-edge engine in a temporary folder. ``exact`` search
  scores every context, so differences between models are the models', not approximate-search noise; ``hnsw``
  builds Qdrant's HNSW graph on the same shard and searches it too.
* :class:`QdrantClientBackend`: a Qdrant server or cluster through qdrant-client (one uniquely named collection
  per model, deleted afterwards); ``QdrantClient(":memory:")`` runs the same code in-process.

M3 models (dense, sparse and ColBERT outputs, :class:`m3distill.m3.M3Embeddings`) are searched with
``search_m3``: one collection per model with three named vectors, every output searched exactly, and the hybrid
score computed by Qdrant itself (see :data:`M3_SEARCH_OUTPUTS`).

What the top-k lists are worth (P@k overlap, Recall@k, MRR@10, nDCG@10) and the metrics' names are defined in
:mod:`m3distill.metrics`.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
import uuid
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np

from m3distill.config import EvaluationConfig, redact_url
from m3distill.errors import M3DistillError
from m3distill.metrics import GROUND_TRUTH_CUTOFF

if TYPE_CHECKING:  # m3 imports torch; the search itself needs only the arrays
    from m3distill.m3 import M3Embeddings

logger = logging.getLogger(__name__)

IndexKind = Literal["exact", "hnsw"]
INDEX_KINDS: tuple[IndexKind, ...] = ("exact", "hnsw")
_QUERY_CHUNK = 256
_UPSERT_CHUNK = 1024

M3SearchOutput = Literal["dense", "sparse", "colbert", "hybrid"]
# What ``search_m3`` can rank by: each of an M3 model's three scores, and FlagEmbedding's weighted hybrid of them.
M3_SEARCH_OUTPUTS: tuple[M3SearchOutput, ...] = ("dense", "sparse", "colbert", "hybrid")
# The named vectors each output reads; the collection holds only those the requested outputs need.
_VECTORS_READ: dict[str, tuple[str, ...]] = {
    "dense": ("dense",), "sparse": ("sparse",), "colbert": ("colbert",), "hybrid": ("dense", "sparse", "colbert"),
}
# The hybrid query's prefetches, in this order; sparse last, so a question without sparse weights just omits it.
_HYBRID_PREFETCHES = ("dense", "colbert", "sparse")
# A context sharing no token with the question is missing from the sparse prefetch: its sparse score is 0.
_HYBRID_DEFAULTS = {f"$score[{_HYBRID_PREFETCHES.index('sparse')}]": 0.0}


class VectorSearchBackend(Protocol):
    """Where top-k search runs. ``name`` identifies the backend in the report."""

    name: str

    def search(
        self, label: str, contexts: np.ndarray, questions: np.ndarray, limit: int, indexes: Sequence[IndexKind]
    ) -> dict[IndexKind, np.ndarray]:
        """Top ``limit`` context rows per question, best first, for each index kind.

        Args:
            label: the model's name, used to name temporary collections.
            contexts: context embeddings, one row per context; point id = row number.
            questions: question embeddings, one row per question.
            limit: contexts to keep per question.
            indexes: ``exact`` and/or ``hnsw``.

        Returns an int64 array of shape (questions, limit) per index kind; -1 pads short result lists.
        """
        ...

    def search_m3(
        self, label: str, contexts: M3Embeddings, questions: M3Embeddings, limit: int,
        outputs: Sequence[str], hybrid_weights: Sequence[float] = (1.0, 0.3, 1.0),
    ) -> dict[str, np.ndarray]:
        """Exact top ``limit`` context rows per question for each output in ``outputs``, best first.

        Args:
            label: the model's name, used to name temporary collections.
            contexts: the model's outputs for the contexts; point id = row number.
            questions: the model's outputs for the questions.
            limit: contexts to keep per question.
            outputs: a non-empty subset of :data:`M3_SEARCH_OUTPUTS`. ``dense`` ranks by cosine, ``sparse`` by the
                sum over shared tokens of the products of the weights, ``colbert`` by MaxSim, ``hybrid`` by
                ``w0 * dense + w1 * sparse + w2 * colbert`` with ColBERT averaged over the question's vectors, as
                FlagEmbedding scores them (:mod:`m3distill.m3`).
            hybrid_weights: ``(w0, w1, w2)``, ``EvaluationConfig.hybrid_weights``.

        Returns an int64 array of shape (questions, limit) per output; -1 pads short result lists (``sparse``
        leaves out contexts sharing no token with the question, so a question without weights gets only -1).
        """
        ...


class EdgeSearchBackend:
    """Embedded qdrant-edge shards in a temporary folder, one per model, deleted after the search.

    Args:
        hnsw_m: HNSW edges per node.
        hnsw_ef_construct: HNSW candidates while building.
        hnsw_ef: HNSW candidates while searching.
        work_dir: parent folder of the temporary shards (the system temp folder when ``None``).

    ``last_timings`` holds the seconds each phase of the last search took (upsert, build_hnsw, search_exact, ...).
    """

    name = "qdrant-edge"

    def __init__(
        self, *, hnsw_m: int = 16, hnsw_ef_construct: int = 100, hnsw_ef: int = 128, work_dir: str | Path | None = None
    ):
        self.hnsw_m = hnsw_m
        self.hnsw_ef_construct = hnsw_ef_construct
        self.hnsw_ef = hnsw_ef
        self.work_dir = work_dir
        self.last_timings: dict[str, float] = {}  # seconds per phase of the last search (upsert, build_hnsw, search_*)

    def search(
        self, label: str, contexts: np.ndarray, questions: np.ndarray, limit: int, indexes: Sequence[IndexKind]
    ) -> dict[IndexKind, np.ndarray]:
        import qdrant_edge as edge

        _check_search_inputs(contexts, questions, limit, indexes)
        build_hnsw = "hnsw" in indexes
        config = edge.EdgeConfig(
            vectors=edge.EdgeVectorParams(size=int(contexts.shape[1]), distance=edge.Distance.Cosine),
            # The thresholds are in KB: 1 makes Qdrant build (and use) the graph however small the corpus is.
            hnsw_config=edge.HnswIndexConfig(m=self.hnsw_m, ef_construct=self.hnsw_ef_construct, full_scan_threshold=1)
            if build_hnsw
            else None,
            optimizers=edge.EdgeOptimizersConfig(indexing_threshold=1) if build_hnsw else None,
            wal_enabled=False,
        )
        self.last_timings = {}
        with self._temporary_shard(label, config) as shard:
            started = time.perf_counter()
            for start in range(0, len(contexts), _UPSERT_CHUNK):
                rows = contexts[start : start + _UPSERT_CHUNK]
                points = [edge.Point(start + offset, row.tolist()) for offset, row in enumerate(rows)]
                shard.update(edge.UpdateOperation.upsert_points(points))
            self.last_timings["upsert"] = time.perf_counter() - started
            if build_hnsw:
                started = time.perf_counter()
                shard.optimize()
                self.last_timings["build_hnsw"] = time.perf_counter() - started
                info = shard.info()
                logger.info("%s: built HNSW over %d of %d contexts in %.1fs", label, info.indexed_vectors_count,
                            info.points_count, self.last_timings["build_hnsw"])
                if info.indexed_vectors_count < info.points_count:
                    logger.warning("%s: HNSW covers %d of %d contexts; the rest are searched exactly", label,
                                   info.indexed_vectors_count, info.points_count)
            results = {}
            for index in indexes:
                started = time.perf_counter()
                params = edge.SearchParams(exact=index == "exact", hnsw_ef=max(self.hnsw_ef, limit))
                hits: list[list[int]] = []
                for start in range(0, len(questions), _QUERY_CHUNK):
                    requests = [
                        edge.QueryRequest(limit=limit, query=edge.Query.Nearest(row.tolist()), params=params)
                        for row in questions[start : start + _QUERY_CHUNK]
                    ]
                    batch = shard.query_batch(edge.QueryBatchRequest(requests))
                    hits.extend([int(point.id) for point in scored] for scored in batch)
                results[index] = _as_top_array(hits, limit)
                self.last_timings[f"search_{index}"] = time.perf_counter() - started
            return results

    @contextmanager
    def _temporary_shard(self, label: str, config) -> Iterator:
        """A new qdrant-edge shard in a temporary folder, closed and deleted when the block ends (also on errors)."""
        import qdrant_edge as edge

        folder = Path(tempfile.mkdtemp(prefix=f"m3distill-{_safe(label)}-", dir=self.work_dir))
        shard = None
        try:
            shard = edge.EdgeShard.create(str(folder / "shard"), config)
            yield shard
        finally:
            if shard is not None:
                shard.close()
            shutil.rmtree(folder, ignore_errors=True)

    def search_m3(
        self, label: str, contexts: M3Embeddings, questions: M3Embeddings, limit: int,
        outputs: Sequence[str], hybrid_weights: Sequence[float] = (1.0, 0.3, 1.0),
    ) -> dict[str, np.ndarray]:
        """Exact top ``limit`` contexts per question for each M3 output, on a temporary qdrant-edge shard.

        Every output is searched exactly (``SearchParams(exact=True)``, no HNSW is built). ``hybrid`` is one
        Qdrant query per question: three prefetches (dense, ColBERT, sparse) and a ``Formula`` summing their
        weighted scores (see :meth:`VectorSearchBackend.search_m3` for the arguments). For exactness the dense and
        ColBERT prefetches take every context (limit = number of contexts), so their scores are never defaulted;
        the sparse prefetch returns only contexts sharing a token with the question, and the formula's default
        of 0 for the others is their true sparse score. The ColBERT weight is divided by the question's vector
        count, since Qdrant's MaxSim sums where FlagEmbedding averages. ``last_timings`` holds the seconds of the
        upsert and of each output's search.
        """
        import qdrant_edge as edge

        _check_m3_inputs(contexts, questions, limit, outputs, hybrid_weights)
        stored = _stored_vectors(outputs)
        vectors = {}
        if "dense" in stored:
            vectors["dense"] = edge.EdgeVectorParams(size=int(contexts.dense.shape[1]), distance=edge.Distance.Cosine)
        if "colbert" in stored:
            # Dot on the unit ColBERT rows is FlagEmbedding's score (Cosine would renormalise them).
            vectors["colbert"] = edge.EdgeVectorParams(
                size=_colbert_width(contexts), distance=edge.Distance.Dot,
                multivector_config=edge.MultiVectorConfig(edge.MultiVectorComparator.MaxSim),
            )
        config = edge.EdgeConfig(
            vectors=vectors or None,
            sparse_vectors={"sparse": edge.EdgeSparseVectorParams()} if "sparse" in stored else None,
            wal_enabled=False,
        )
        self.last_timings = {}
        with self._temporary_shard(label, config) as shard:
            started = time.perf_counter()
            for start in range(0, len(contexts), _UPSERT_CHUNK):
                points = [
                    edge.Point(row, _point_vectors(contexts, row, stored, lambda parts: edge.SparseVector(*parts)))
                    for row in range(start, min(start + _UPSERT_CHUNK, len(contexts)))
                ]
                shard.update(edge.UpdateOperation.upsert_points(points))
            self.last_timings["upsert"] = time.perf_counter() - started

            exact = edge.SearchParams(exact=True)

            def nearest(output: str, row: int):
                return edge.Query.Nearest(_query_vector(questions, output, row, lambda p: edge.SparseVector(*p)),
                                          using=output)

            def request(output: str, row: int):
                if output != "hybrid":
                    return edge.QueryRequest(limit=limit, query=nearest(output, row), params=exact)
                terms = _hybrid_terms(questions, row, hybrid_weights)
                formula = edge.Expression.Sum([
                    edge.Expression.Mult([edge.Expression.Constant(weight), edge.Expression.Variable(f"$score[{i}]")])
                    for i, (_, weight) in enumerate(terms)
                ])
                prefetches = [edge.Prefetch(limit=len(contexts), query=nearest(name, row), params=exact)
                              for name, _ in terms]
                return edge.QueryRequest(limit=limit, query=edge.Formula(formula, defaults=dict(_HYBRID_DEFAULTS)),
                                         prefetches=prefetches)

            def query_batch(requests: list) -> list[list[tuple[int, float]]]:
                batch = shard.query_batch(edge.QueryBatchRequest(requests))
                return [[(int(point.id), float(point.score)) for point in scored] for scored in batch]

            return _run_m3_queries(questions, limit, outputs, self.last_timings, request, query_batch)


class QdrantClientBackend:
    """A Qdrant server or cluster (or qdrant-client's in-process local mode) through qdrant-client.

    Each model gets a collection named ``m3distill-<model>-<random hex>``, deleted after its search.

    Args:
        client: a ``qdrant_client.QdrantClient``; ``QdrantClient(":memory:")`` for the in-process local mode.
        hnsw_m, hnsw_ef_construct, hnsw_ef: HNSW settings, as for :class:`EdgeSearchBackend`.
        index_timeout_s: how long to wait for the server to finish building HNSW before searching.

    ``last_timings`` holds the seconds each phase of the last ``search_m3`` took (upsert, search_dense, ...).
    """

    name = "qdrant-client"

    def __init__(self, client, *, hnsw_m: int = 16, hnsw_ef_construct: int = 100, hnsw_ef: int = 128,
                 index_timeout_s: float = 600.0):
        self.client = client
        self.hnsw_m = hnsw_m
        self.hnsw_ef_construct = hnsw_ef_construct
        self.hnsw_ef = hnsw_ef
        self.index_timeout_s = index_timeout_s
        self.last_timings: dict[str, float] = {}  # seconds per phase of the last search_m3 (upsert, search_*)

    def search(
        self, label: str, contexts: np.ndarray, questions: np.ndarray, limit: int, indexes: Sequence[IndexKind]
    ) -> dict[IndexKind, np.ndarray]:
        from qdrant_client import models

        _check_search_inputs(contexts, questions, limit, indexes)
        build_hnsw = "hnsw" in indexes
        collection = f"m3distill-{_safe(label)}-{uuid.uuid4().hex[:12]}"
        self.client.create_collection(
            collection,
            vectors_config=models.VectorParams(size=int(contexts.shape[1]), distance=models.Distance.COSINE),
            hnsw_config=models.HnswConfigDiff(
                m=self.hnsw_m, ef_construct=self.hnsw_ef_construct, full_scan_threshold=10
            ),
            # Qdrant only builds HNSW for segments above indexing_threshold KB; 1 makes it index any corpus.
            optimizers_config=models.OptimizersConfigDiff(indexing_threshold=1) if build_hnsw else None,
        )
        try:
            self.client.upload_collection(
                collection, vectors=np.asarray(contexts, dtype=np.float32), ids=range(len(contexts)),
                batch_size=256, wait=True,
            )
            if build_hnsw:
                self._wait_until_indexed(collection)
            results = {}
            for index in indexes:
                params = models.SearchParams(exact=index == "exact", hnsw_ef=max(self.hnsw_ef, limit))
                hits: list[list[int]] = []
                for start in range(0, len(questions), _QUERY_CHUNK):
                    requests = [
                        models.QueryRequest(query=row.tolist(), limit=limit, params=params)
                        for row in questions[start : start + _QUERY_CHUNK]
                    ]
                    responses = self.client.query_batch_points(collection, requests)
                    hits.extend([int(point.id) for point in response.points] for response in responses)
                results[index] = _as_top_array(hits, limit)
            return results
        finally:
            self.client.delete_collection(collection)

    def search_m3(
        self, label: str, contexts: M3Embeddings, questions: M3Embeddings, limit: int,
        outputs: Sequence[str], hybrid_weights: Sequence[float] = (1.0, 0.3, 1.0),
    ) -> dict[str, np.ndarray]:
        """Exact top ``limit`` contexts per question for each M3 output, in a temporary collection.

        The collection has HNSW switched off (``m=0``) and every query asks for exact search. ``hybrid`` is one
        ``FormulaQuery`` per question over three prefetches (dense, ColBERT, sparse) whose limits cover every
        context, as in :meth:`EdgeSearchBackend.search_m3` (qdrant-client's local mode runs formulas too).
        """
        from qdrant_client import models

        _check_m3_inputs(contexts, questions, limit, outputs, hybrid_weights)
        stored = _stored_vectors(outputs)
        vectors_config = {}
        if "dense" in stored:
            vectors_config["dense"] = models.VectorParams(size=int(contexts.dense.shape[1]),
                                                          distance=models.Distance.COSINE)
        if "colbert" in stored:
            vectors_config["colbert"] = models.VectorParams(
                size=_colbert_width(contexts), distance=models.Distance.DOT,
                multivector_config=models.MultiVectorConfig(comparator=models.MultiVectorComparator.MAX_SIM),
            )
        collection = f"m3distill-{_safe(label)}-{uuid.uuid4().hex[:12]}"
        self.last_timings = {}
        self.client.create_collection(
            collection,
            vectors_config=vectors_config,
            sparse_vectors_config={"sparse": models.SparseVectorParams()} if "sparse" in stored else None,
            hnsw_config=models.HnswConfigDiff(m=0),  # every search is exact: building graphs would be wasted work
        )
        try:
            started = time.perf_counter()

            def sparse_vector(parts: tuple[list[int], list[float]]):
                return models.SparseVector(indices=parts[0], values=parts[1])

            self.client.upload_points(
                collection,
                points=(models.PointStruct(id=row, vector=_point_vectors(contexts, row, stored, sparse_vector))
                        for row in range(len(contexts))),
                batch_size=256, wait=True,
            )
            self.last_timings["upsert"] = time.perf_counter() - started
            exact = models.SearchParams(exact=True)

            def request(output: str, row: int):
                if output != "hybrid":
                    return models.QueryRequest(query=_query_vector(questions, output, row, sparse_vector),
                                               using=output, limit=limit, params=exact)
                terms = _hybrid_terms(questions, row, hybrid_weights)
                formula = models.SumExpression(
                    sum=[models.MultExpression(mult=[weight, f"$score[{i}]"]) for i, (_, weight) in enumerate(terms)]
                )
                prefetch = [
                    models.Prefetch(query=_query_vector(questions, name, row, sparse_vector), using=name,
                                    limit=len(contexts), params=exact)
                    for name, _ in terms
                ]
                return models.QueryRequest(
                    prefetch=prefetch, query=models.FormulaQuery(formula=formula, defaults=dict(_HYBRID_DEFAULTS)),
                    limit=limit,
                )

            def query_batch(requests: list) -> list[list[tuple[int, float]]]:
                with warnings.catch_warnings():
                    # Local mode always searches exactly and says so for every request that asks for it.
                    warnings.filterwarnings("ignore", message="Local mode performs exact", category=UserWarning)
                    responses = self.client.query_batch_points(collection, requests)
                return [[(int(point.id), float(point.score)) for point in response.points] for response in responses]

            return _run_m3_queries(questions, limit, outputs, self.last_timings, request, query_batch)
        finally:
            self.client.delete_collection(collection)

    def _wait_until_indexed(self, collection: str) -> None:
        from qdrant_client import models

        deadline = time.monotonic() + self.index_timeout_s
        while True:
            info = self.client.get_collection(collection)
            if info.status == models.CollectionStatus.GREEN:
                return
            if time.monotonic() > deadline:
                logger.warning(
                    "collection %s still indexing after %.0fs; searching anyway", collection, self.index_timeout_s
                )
                return
            time.sleep(0.5)


def make_search_backend(
    config: EvaluationConfig, *, client=None, work_dir: str | Path | None = None
) -> VectorSearchBackend:
    """The backend ``config`` asks for: qdrant-client when a client is given or ``qdrant_url`` is set, else qdrant-edge.

    Args:
        config: the evaluation settings (``qdrant_url``, ``qdrant_api_key_env``, HNSW settings).
        client: an existing ``QdrantClient`` to use instead of connecting to ``qdrant_url``.
        work_dir: parent folder of qdrant-edge's temporary shards.

    ``qdrant_url=":memory:"`` gives qdrant-client's in-process local mode.
    """
    hnsw = dict(hnsw_m=config.hnsw_m, hnsw_ef_construct=config.hnsw_ef_construct, hnsw_ef=config.hnsw_ef)
    if client is None and config.qdrant_url:
        client = _connect(config.qdrant_url, config.qdrant_api_key_env)
    if client is not None:
        return QdrantClientBackend(client, **hnsw)
    return EdgeSearchBackend(**hnsw, work_dir=work_dir)


def _connect(url: str, api_key_env: str | None):
    from qdrant_client import QdrantClient

    if url == ":memory:":
        return QdrantClient(":memory:")
    api_key = None
    if api_key_env:
        api_key = os.environ.get(api_key_env)
        if not api_key:
            raise M3DistillError(f"environment variable {api_key_env} (evaluation.qdrant_api_key_env) is not set; "
                                 "export the Qdrant API key there")
    client = QdrantClient(url=url, api_key=api_key)
    try:
        client.get_collections()
    except Exception as error:  # any transport error: the user's URL, network or key is wrong
        cause = str(error).splitlines()[0] if str(error) else type(error).__name__
        shown = redact_url(url)  # the one line must not carry a credential written into the URL
        raise M3DistillError(f"cannot reach Qdrant at {shown}: {cause.replace(url, shown)}") from error
    return client


def check_k_fits(ks: Sequence[int], n_contexts: int) -> None:
    """Refuse a k larger than the number of indexed contexts, before any work is done."""
    too_large = [k for k in ks if k > n_contexts]
    if too_large:
        raise M3DistillError(
            f"k={max(too_large)} is larger than the {n_contexts} contexts in the index; choose k <= {n_contexts} "
            f"(--k) or index more contexts (evaluation.distractors: all)"
        )


def search_depth(ks: Sequence[int], n_contexts: int) -> int:
    """How many contexts to retrieve per question: the largest k, and at least 10 for MRR@10 and nDCG@10."""
    return min(max(max(ks), GROUND_TRUTH_CUTOFF), n_contexts)


def _check_search_inputs(contexts: np.ndarray, questions: np.ndarray, limit: int, indexes: Sequence[str]) -> None:
    if contexts.ndim != 2 or questions.ndim != 2 or contexts.shape[1] != questions.shape[1]:
        raise ValueError(f"contexts {contexts.shape} and questions {questions.shape} must be 2-D and equally wide")
    if not 1 <= limit <= len(contexts):
        raise ValueError(f"limit={limit} must be between 1 and the {len(contexts)} indexed contexts")
    unknown = [index for index in indexes if index not in INDEX_KINDS]
    if unknown or not indexes:
        raise ValueError(f"indexes must be a non-empty subset of {INDEX_KINDS}, got {list(indexes)}")


def _check_m3_inputs(
    contexts: M3Embeddings, questions: M3Embeddings, limit: int, outputs: Sequence[str],
    hybrid_weights: Sequence[float],
) -> None:
    """Refuse inputs ``search_m3`` cannot rank exactly, with what to change."""
    unknown = [output for output in outputs if output not in M3_SEARCH_OUTPUTS]
    if unknown or not outputs:
        raise ValueError(f"outputs must be a non-empty subset of {M3_SEARCH_OUTPUTS}, got {list(outputs)}")
    dense_c, dense_q = np.asarray(contexts.dense), np.asarray(questions.dense)
    if dense_c.ndim != 2 or dense_q.ndim != 2 or dense_c.shape[1] != dense_q.shape[1]:
        raise ValueError(f"dense contexts {dense_c.shape} and questions {dense_q.shape} must be 2-D and equally wide")
    if not 1 <= limit <= len(dense_c):
        raise ValueError(f"limit={limit} must be between 1 and the {len(dense_c)} indexed contexts")
    stored = _stored_vectors(outputs)
    for role, embeddings in (("contexts", contexts), ("questions", questions)):
        if "sparse" in stored:
            _check_sparse(role, embeddings, outputs)
        if "colbert" in stored:
            _check_colbert(role, embeddings, outputs)
    if "colbert" in stored and _colbert_width(contexts) != _colbert_width(questions):
        raise ValueError(f"ColBERT vectors of contexts ({_colbert_width(contexts)} wide) and questions "
                         f"({_colbert_width(questions)} wide) must be equally wide: encode both with the same model")
    if "hybrid" in outputs and (len(hybrid_weights) != 3 or not np.all(np.isfinite(hybrid_weights))):
        raise ValueError(f"hybrid_weights must be three finite numbers (dense, sparse, ColBERT), got "
                         f"{list(hybrid_weights)}")


def _check_sparse(role: str, embeddings: M3Embeddings, outputs: Sequence[str]) -> None:
    if embeddings.sparse is None:
        raise ValueError(f"the {role} have no sparse weights (a dense-only model?), which outputs {list(outputs)} "
                         "need; search a dense-only model with outputs=('dense',)")
    if len(embeddings.sparse) != len(embeddings):
        raise ValueError(f"the {role} have {len(embeddings.sparse)} sparse weight sets for {len(embeddings)} "
                         "dense rows; give one per text")
    for row, weights in enumerate(embeddings.sparse):
        if any(not (weight >= 0 and np.isfinite(weight)) for weight in weights.values()):
            raise ValueError(f"sparse weights of {role} row {row} must be finite and non-negative (bge-m3 keeps "
                             "only weights above zero)")


def _check_colbert(role: str, embeddings: M3Embeddings, outputs: Sequence[str]) -> None:
    if embeddings.colbert is None:
        raise ValueError(f"the {role} have no ColBERT vectors (a dense-only model?), which outputs {list(outputs)} "
                         "need; search a dense-only model with outputs=('dense',)")
    if len(embeddings.colbert) != len(embeddings):
        raise ValueError(f"the {role} have {len(embeddings.colbert)} ColBERT matrices for {len(embeddings)} dense "
                         "rows; give one per text")
    width = _colbert_width(embeddings)
    for row, matrix in enumerate(embeddings.colbert):
        if matrix.ndim != 2 or len(matrix) == 0 or matrix.shape[1] != width:
            raise ValueError(f"ColBERT vectors of {role} row {row} have shape {matrix.shape}; every text needs at "
                             f"least one vector, all {width} wide")


def _stored_vectors(outputs: Sequence[str]) -> set[str]:
    """The named vectors the collection must hold for ``outputs``."""
    return {name for output in outputs for name in _VECTORS_READ[output]}


def _colbert_width(embeddings: M3Embeddings) -> int:
    return int(embeddings.colbert[0].shape[-1]) if embeddings.colbert else 0


def _sparse_parts(weights: dict[int, float]) -> tuple[list[int], list[float]]:
    """Token ids and their weights, zero weights left out (they score nothing), sorted by token id."""
    tokens = sorted(int(token) for token, weight in weights.items() if weight > 0)
    return tokens, [float(weights[token]) for token in tokens]


def _point_vectors(
    contexts: M3Embeddings, row: int, stored: set[str], make_sparse: Callable[[tuple[list[int], list[float]]], Any]
) -> dict[str, Any]:
    """The named vectors of context ``row``; a context without sparse weights has no sparse vector at all."""
    vectors: dict[str, Any] = {}
    if "dense" in stored:
        vectors["dense"] = np.asarray(contexts.dense[row], dtype=np.float32).tolist()
    if "colbert" in stored:
        vectors["colbert"] = np.asarray(contexts.colbert[row], dtype=np.float32).tolist()
    if "sparse" in stored:
        parts = _sparse_parts(contexts.sparse[row])
        if parts[0]:
            vectors["sparse"] = make_sparse(parts)
    return vectors


def _query_vector(
    questions: M3Embeddings, name: str, row: int, make_sparse: Callable[[tuple[list[int], list[float]]], Any]
) -> Any:
    """Question ``row``'s vector named ``name``, in the form the backend's query takes."""
    if name == "sparse":
        return make_sparse(_sparse_parts(questions.sparse[row]))
    matrix = questions.dense if name == "dense" else questions.colbert
    return np.asarray(matrix[row], dtype=np.float32).tolist()


def _has_sparse(questions: M3Embeddings, row: int) -> bool:
    return any(weight > 0 for weight in questions.sparse[row].values())


def _hybrid_terms(questions: M3Embeddings, row: int, hybrid_weights: Sequence[float]) -> list[tuple[str, float]]:
    """The hybrid query's prefetches for question ``row``, in order, each with its weight in the formula.

    Qdrant's MaxSim sums over the question's vectors where FlagEmbedding averages, so the ColBERT weight is
    divided by the question's vector count. A question without sparse weights has no sparse prefetch: every
    context's sparse score is 0, the formula's default.
    """
    dense_weight, sparse_weight, colbert_weight = (float(weight) for weight in hybrid_weights)
    weights = {"dense": dense_weight, "colbert": colbert_weight / len(questions.colbert[row]), "sparse": sparse_weight}
    names = [name for name in _HYBRID_PREFETCHES if name != "sparse" or _has_sparse(questions, row)]
    return [(name, weights[name]) for name in names]


def _run_m3_queries(
    questions: M3Embeddings,
    limit: int,
    outputs: Sequence[str],
    timings: dict[str, float],
    request: Callable[[str, int], Any],
    query_batch: Callable[[list], list[list[tuple[int, float]]]],
) -> dict[str, np.ndarray]:
    """Run every question for each output in batches; the backend builds the requests and runs a batch.

    A question without sparse weights is not sent for ``sparse`` (nothing shares a token with it), and sparse hits
    scoring 0 (no shared token) are dropped, so both leave -1 padding.
    """
    results: dict[str, np.ndarray] = {}
    for output in outputs:
        started = time.perf_counter()
        rows = [row for row in range(len(questions)) if output != "sparse" or _has_sparse(questions, row)]
        hits: list[list[int]] = [[] for _ in range(len(questions))]
        for start in range(0, len(rows), _QUERY_CHUNK):
            chunk = rows[start : start + _QUERY_CHUNK]
            for row, scored in zip(chunk, query_batch([request(output, row) for row in chunk]), strict=True):
                hits[row] = [point_id for point_id, score in scored if output != "sparse" or score > 0]
        results[output] = _as_top_array(hits, limit)
        timings[f"search_{output}"] = time.perf_counter() - started
        logger.debug("searched %s for %d questions in %.2fs", output, len(questions), timings[f"search_{output}"])
    return results


def _as_top_array(hits: list[list[int]], limit: int) -> np.ndarray:
    top = np.full((len(hits), limit), -1, dtype=np.int64)
    for row, ids in enumerate(hits):
        top[row, : len(ids)] = ids[:limit]
    return top


def _safe(label: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in label)[:40] or "model"
