"""Search-time figures for the evaluation: qdrant-edge exact vs HNSW vs numpy, on random clustered vectors.

    python benchmarks/bench_eval.py                      # 20k contexts x 384 dims, 1000 questions, top-50
    python benchmarks/bench_eval.py --contexts 100000 --dim 1024

Prints the seconds of each phase as m3distill's evaluation runs it (qdrant-edge: upsert, HNSW build, exact
search, HNSW search; numpy: one matrix product plus argpartition and a sort of the top k), the agreement of
qdrant-edge exact search with numpy, and HNSW's recall against exact search.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from m3distill.evaluation.retrieval import EdgeSearchBackend
from m3distill.metrics import top_k_overlap


def _clustered(n: int, dim: int, rng: np.random.Generator, centers: np.ndarray) -> np.ndarray:
    return (centers[rng.integers(0, len(centers), size=n)] + 0.5 * rng.standard_normal((n, dim))).astype(np.float32)


def _numpy_top(contexts: np.ndarray, questions: np.ndarray, k: int) -> np.ndarray:
    unit_c = contexts / np.linalg.norm(contexts, axis=1, keepdims=True)
    unit_q = questions / np.linalg.norm(questions, axis=1, keepdims=True)
    scores = unit_q @ unit_c.T
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1)
    return np.take_along_axis(part, order, axis=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, default=20_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--questions", type=int, default=1_000)
    parser.add_argument("--k", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    centers = 2.0 * rng.standard_normal((200, args.dim))
    contexts = _clustered(args.contexts, args.dim, rng, centers)
    questions = _clustered(args.questions, args.dim, rng, centers)
    print(f"{args.contexts} contexts x {args.dim} dims, {args.questions} questions, top-{args.k}")

    started = time.perf_counter()
    reference = _numpy_top(contexts, questions, args.k)
    print(f"  numpy exact search            {time.perf_counter() - started:7.2f} s")

    backend = EdgeSearchBackend()
    found = backend.search("bench", contexts, questions, args.k, ["exact", "hnsw"])
    timings = backend.last_timings
    print(f"  qdrant-edge upsert            {timings['upsert']:7.2f} s")
    print(f"  qdrant-edge exact search      {timings['search_exact']:7.2f} s   "
          f"agreement with numpy P@{args.k} = {top_k_overlap(found['exact'], reference, args.k):.4f}")
    print(f"  qdrant-edge HNSW build        {timings['build_hnsw']:7.2f} s   (m={backend.hnsw_m}, "
          f"ef_construct={backend.hnsw_ef_construct})")
    print(f"  qdrant-edge HNSW search       {timings['search_hnsw']:7.2f} s   "
          f"recall@{args.k} vs exact = {top_k_overlap(found['hnsw'], found['exact'], args.k):.4f} "
          f"(ef={backend.hnsw_ef})")


if __name__ == "__main__":
    main()
