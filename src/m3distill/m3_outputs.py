"""bge-m3's three outputs as data, and FlagEmbedding's scores over them: numpy only (no torch), so that the torch
side (:mod:`m3distill.m3`) and the onnxruntime side (:mod:`m3distill.onnx_serving`) return and score the same thing.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from m3distill.errors import M3DistillError
from m3distill.layout import VOCABULARY_MAP_FILE

# The output kinds of an M3 model, in FlagEmbedding's order; a dense-only model has the first alone.
DENSE, SPARSE, COLBERT = "dense", "sparse", "colbert"
M3_OUTPUTS = (DENSE, SPARSE, COLBERT)
# The special tokens FlagEmbedding leaves out of the sparse weights (those a tokenizer has).
UNUSED_SPECIAL_TOKENS = ("cls_token", "eos_token", "pad_token", "unk_token")


@dataclass
class M3Embeddings:
    """Every output of a model for a list of texts, one entry per text in order.

    ``sparse`` and ``colbert`` are ``None`` for a dense-only model.
    """

    dense: np.ndarray  # (texts, dim) float32
    sparse: list[dict[int, float]] | None = None  # token id -> weight, weights > 0 only
    colbert: list[np.ndarray] | None = None  # (tokens, colbert_dim) float32 each, unit rows

    def __len__(self) -> int:
        return len(self.dense)

    @property
    def outputs(self) -> tuple[str, ...]:
        return M3_OUTPUTS if self.sparse is not None and self.colbert is not None else (DENSE,)

    def rows(self, rows: Sequence[int] | slice) -> M3Embeddings:
        """The embeddings of the texts at ``rows`` (a slice or row numbers)."""
        picked = range(len(self))[rows] if isinstance(rows, slice) else [int(row) for row in rows]
        return M3Embeddings(
            dense=self.dense[list(picked)],
            sparse=None if self.sparse is None else [self.sparse[row] for row in picked],
            colbert=None if self.colbert is None else [self.colbert[row] for row in picked],
        )


def max_weight_per_id(ids: Iterable[int], weights: Iterable[float]) -> dict[int, float]:
    """One text's sparse weights: the largest weight of each token id, weights above zero only."""
    result: dict[int, float] = {}
    for token_id, weight in zip(ids, weights):
        if weight > result.get(token_id, 0.0):
            result[token_id] = weight
    return result


# Scores, as FlagEmbedding computes them.

def sparse_score(query: dict[int, float], document: dict[int, float]) -> float:
    """Lexical matching score: the sum over shared token ids of the product of the two weights."""
    if len(document) < len(query):
        query, document = document, query
    return float(sum(weight * document[token] for token, weight in query.items() if token in document))


def colbert_score(query: np.ndarray, document: np.ndarray) -> float:
    """MaxSim averaged over the query's vectors: mean over query tokens of the best dot product in the document."""
    if len(query) == 0 or len(document) == 0:
        return 0.0
    return float((query @ document.T).max(axis=1).sum() / len(query))


def hybrid_score(dense: float, sparse: float, colbert: float, weights: Sequence[float]) -> float:
    """FlagEmbedding's hybrid score: the weighted mean of the three scores (dense, sparse, ColBERT).

    FlagEmbedding divides the weighted sum by the sum of the weights; the search ranks by the weighted sum, which
    orders the contexts of a question the same way.
    """
    return float((weights[0] * dense + weights[1] * sparse + weights[2] * colbert) / sum(weights))


def read_vocabulary_map(folder: str | Path | None) -> dict[str, Any] | None:
    """The vocabulary map of a student with a trimmed vocabulary (``m3distill_vocabulary.json``, written by
    :mod:`m3distill.students.vocabulary`): its record, with ``teacher_ids`` (the teacher's id of each of the student's
    token ids, through which its sparse weights are keyed as the teacher's) as an array; None for a model with its
    teacher's vocabulary."""
    if folder is None or not (Path(folder) / VOCABULARY_MAP_FILE).is_file():
        return None
    path = Path(folder) / VOCABULARY_MAP_FILE
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        record["teacher_ids"] = np.asarray(record["teacher_ids"], dtype=np.int64)
        if record["teacher_ids"].ndim != 1:
            raise ValueError("teacher_ids is not a list of ids")
        return record
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        raise M3DistillError(f"{path} is not a readable vocabulary map ({type(error).__name__}); copy the student "
                             "folder again or retrain it") from error
