"""Retrieval with Qdrant: each model's top-k contexts for every test question.

Search backends share one small interface, :class:`VectorSearchBackend`: index a model's context embeddings,
run every question, return the top ``limit`` context rows per question for each requested index kind, and
leave nothing behind.

* :class:`EdgeSearchBackend` (default): the embedded qdrant-edge engine in a temporary folder. ``exact`` search
  scores every context, so differences between models are the models', not approximate-search noise; ``hnsw``
  builds Qdrant's HNSW graph on the same shard and searches it too.
* :class:`QdrantClientBackend`: a Qdrant server or cluster through qdrant-client (one uniquely named collection
  per model, deleted afterwards); ``QdrantClient(":memory:")`` runs the same code in-process.

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
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, Protocol

import numpy as np

from m3distill.config import EvaluationConfig
from m3distill.errors import M3DistillError
from m3distill.metrics import GROUND_TRUTH_CUTOFF

logger = logging.getLogger(__name__)

IndexKind = Literal["exact", "hnsw"]
INDEX_KINDS: tuple[IndexKind, ...] = ("exact", "hnsw")
_QUERY_CHUNK = 256
_UPSERT_CHUNK = 1024


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
        folder = Path(tempfile.mkdtemp(prefix=f"m3distill-{_safe(label)}-", dir=self.work_dir))
        shard = None
        self.last_timings = {}
        try:
            started = time.perf_counter()
            shard = edge.EdgeShard.create(str(folder / "shard"), config)
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
        finally:
            if shard is not None:
                shard.close()
            shutil.rmtree(folder, ignore_errors=True)


class QdrantClientBackend:
    """A Qdrant server or cluster (or qdrant-client's in-process local mode) through qdrant-client.

    Each model gets a collection named ``m3distill-<model>-<random hex>``, deleted after its search.

    Args:
        client: a ``qdrant_client.QdrantClient``; ``QdrantClient(":memory:")`` for the in-process local mode.
        hnsw_m, hnsw_ef_construct, hnsw_ef: HNSW settings, as for :class:`EdgeSearchBackend`.
        index_timeout_s: how long to wait for the server to finish building HNSW before searching.
    """

    name = "qdrant-client"

    def __init__(self, client, *, hnsw_m: int = 16, hnsw_ef_construct: int = 100, hnsw_ef: int = 128,
                 index_timeout_s: float = 600.0):
        self.client = client
        self.hnsw_m = hnsw_m
        self.hnsw_ef_construct = hnsw_ef_construct
        self.hnsw_ef = hnsw_ef
        self.index_timeout_s = index_timeout_s

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
        raise M3DistillError(f"cannot reach Qdrant at {url}: {cause}") from error
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


def _as_top_array(hits: list[list[int]], limit: int) -> np.ndarray:
    top = np.full((len(hits), limit), -1, dtype=np.int64)
    for row, ids in enumerate(hits):
        top[row, : len(ids)] = ids[:limit]
    return top


def _safe(label: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in label)[:40] or "model"
