"""Real questions in the evaluation: people's questions (``evaluation.real_questions``) searched among the contexts.

The test split's questions come from the same generator as the training questions, so students resemble the
teacher on them more than on what people type. A file of real questions (an FAQ's, a search log's) gives the honest
figure: every model searches them (exact search) among the same indexed contexts as the test questions, and each
student gets P@k of its top-k against the teacher's, the query-side stand-in's P@k, the mean cosine of its question
embeddings to the teacher's and, for questions whose answer document is known, ground truth. Metric names are in
:mod:`m3distill.metrics` (``real_questions_*``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from m3distill.data.real_questions import RealQuestions, load_real_questions
from m3distill.evaluation.retrieval import VectorSearchBackend, search_depth
from m3distill.metrics import (
    REAL_QUESTIONS_MEAN_COSINE,
    ground_truth_metrics,
    overlap_metric,
    query_side_index,
    real_questions_index,
    row_cosines,
    top_k_overlap,
)
from m3distill.report import RealQuestionsInfo

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RealQuestionSet:
    """Real questions and, per question, the rows of the indexed contexts of its answer document (empty: none)."""

    questions: RealQuestions
    relevant: list[np.ndarray]

    @property
    def texts(self) -> list[str]:
        return self.questions.texts

    @property
    def answered(self) -> np.ndarray:
        """Rows of the questions whose answer is among the indexed contexts."""
        return np.array([row for row, rows in enumerate(self.relevant) if len(rows)], dtype=np.int64)


def real_question_set(path: str | Path, context_docs: Sequence[str]) -> RealQuestionSet:
    """Read the real questions at ``path`` and find each one's answer among contexts of documents ``context_docs``
    (the document id of every indexed context, in index order)."""
    questions = load_real_questions(path)
    rows_of_doc: dict[str, list[int]] = {}
    for row, doc_id in enumerate(context_docs):
        rows_of_doc.setdefault(doc_id, []).append(row)
    relevant = [np.array(rows_of_doc.get(doc_id, []) if doc_id else [], dtype=np.int64) for doc_id in questions.doc_ids]
    unknown = sum(bool(doc_id) and not len(rows) for doc_id, rows in zip(questions.doc_ids, relevant))
    if unknown:
        logger.warning("%d of the %d real questions in %s name an answer document that is not among the indexed "
                       "contexts: they count for agreement with the teacher, not for ground truth", unknown,
                       len(questions.texts), questions.source)
    return RealQuestionSet(questions=questions, relevant=relevant)


def measure_real_questions(
    questions: Mapping[str, np.ndarray],
    contexts: Mapping[str, np.ndarray],
    real: RealQuestionSet,
    ks: Sequence[int],
    backend: VectorSearchBackend,
    metrics: dict[str, dict[str, Any]],
    teacher: str,
) -> RealQuestionsInfo:
    """Search every model's real-question embeddings among its context embeddings; add the figures to ``metrics``.

    Args:
        questions: each model's (dense) embeddings of ``real.texts``, the teacher's under ``teacher``.
        contexts: each model's embeddings of the indexed contexts.
        real: the questions and their answers' context rows.
        ks: the cut-offs.
        backend: the search backend (exact search).
        metrics: model label -> its metrics, updated in place.
        teacher: the teacher's label.
    """
    n_contexts = len(contexts[teacher])
    depth = search_depth(ks, n_contexts)
    index, side = real_questions_index("exact"), real_questions_index(query_side_index("exact"))
    answered = real.answered
    relevant = [real.relevant[row] for row in answered]
    tops = {}
    for label, embedded in questions.items():
        tops[label] = backend.search(f"{label}-real-questions", contexts[label], embedded, depth, ["exact"])["exact"]
        if len(answered):
            metrics[label].update(ground_truth_metrics(tops[label][answered], relevant, ks, index))
    reference, teacher_questions, teacher_contexts = tops[teacher], questions[teacher], contexts[teacher]
    for label, embedded in questions.items():
        if label == teacher:
            continue
        for k in ks:
            metrics[label][overlap_metric(index, k)] = top_k_overlap(tops[label], reference, k)
        if embedded.shape[1] != teacher_questions.shape[1]:
            continue  # another width: no cosine to the teacher, no search in its index
        metrics[label][REAL_QUESTIONS_MEAN_COSINE] = float(np.mean(row_cosines(embedded, teacher_questions)))
        found = backend.search(f"{label}-real-questions-in-teacher", teacher_contexts, embedded, depth,
                               ["exact"])["exact"]
        for k in ks:
            metrics[label][overlap_metric(side, k)] = top_k_overlap(found, reference, k)
        if len(answered):
            metrics[label].update(ground_truth_metrics(found[answered], relevant, ks, side))
    return RealQuestionsInfo(source=str(real.questions.source), sha256=real.questions.sha256,
                             n_questions=len(real.texts), n_answered=len(answered))
