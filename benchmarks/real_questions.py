"""Scoring students on real questions: people-written FAQ questions searched among the passages of their corpus.

Used by ``fidelity.py`` (the ``faq`` corpus, its default). The sets come from :mod:`faq_sets`; the students are
trained on the passages alone (``m3distill synth`` with the offline generator on ``corpus/``), so the real
questions are never seen in training. Every question is searched (exact cosine) among all contexts of the corpus,
the other sets' passages included, by the teacher and by the student:

- ``p@10``, ``p@50``: the student's top-k against the teacher's (the student encodes questions and passages);
- ``query_side_p@10``: the student's question embeddings searched among the teacher's passage embeddings (the
  stand-in for a collection indexed with the teacher);
- ``mrr_share``, ``recall_share``: MRR@10 and Recall@10 of the student's results (relevant: every context of the
  question's answer document) as a share of the teacher's;
- ``cos_questions``, ``cos_passages``: mean cosine of the student's embeddings to the teacher's, over the set's
  questions and over the contexts of the set's documents.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from m3distill.data.dataset import load_synth_dataset
from m3distill.metrics import ground_truth_metrics, mrr_metric, recall_metric, row_cosines, top_k_overlap
from m3distill.teacher.cache import TeacherCache

FIGURES = ("p@10", "p@50", "query_side_p@10", "mrr_share", "recall_share", "cos_questions", "cos_passages")


class RealQuestionSearch:
    """The real questions of ``questions_file`` and every context of a dataset made from their corpus."""

    def __init__(self, questions_file: Path, dataset_dir: Path, cache_dir: Path, teacher, work: Path,
                 batch_size: int = 32):
        lines = [json.loads(line) for line in questions_file.read_text(encoding="utf-8").splitlines() if line]
        dataset = load_synth_dataset(dataset_dir)
        self.contexts = list(dataset.contexts["text"])
        self.contexts_ids = list(dataset.contexts["context_id"])
        doc_of_row = dataset.contexts["doc_id"].to_numpy()
        rows_of_doc: dict[str, list[int]] = {}
        for row, doc_id in enumerate(doc_of_row):
            rows_of_doc.setdefault(doc_id, []).append(row)
        # A question whose answer was too short to be a passage has no document in the corpus: left out.
        lines = [line for line in lines if line["doc_id"] in rows_of_doc]
        self.questions = [line["text"] for line in lines]
        self.sets = [line["set"] for line in lines]
        self.set_names = list(dict.fromkeys(self.sets))
        self.relevant = [rows_of_doc[line["doc_id"]] for line in lines]
        self.set_context_rows = {
            name: np.flatnonzero([doc_id.split("/", 1)[0] == name for doc_id in doc_of_row]) for name in self.set_names
        }
        self.batch_size = batch_size
        self.teacher_c = TeacherCache.open(cache_dir).get(self.contexts)
        self.teacher_q = _teacher_questions(teacher, self.questions, work)
        self.teacher_top = top_k_rows(self.teacher_q, self.teacher_c)
        self.teacher_gt = self._ground_truth(self.teacher_top)

    def _set_rows(self, name: str, only: np.ndarray | None = None) -> np.ndarray:
        return np.array([i for i, s in enumerate(self.sets) if s == name and (only is None or only[i])])

    def _ground_truth(self, top: np.ndarray, only: np.ndarray | None = None) -> dict[str, tuple[float, float]]:
        figures = {}
        for name in self.set_names:
            rows = self._set_rows(name, only)
            gt = ground_truth_metrics(top[rows], [self.relevant[i] for i in rows], [10], "exact")
            figures[name] = (gt[mrr_metric("exact")], gt[recall_metric("exact", 10)])
        return figures

    def odd_half(self) -> np.ndarray:
        """Every other question of each set, from its second (``True``): the half that benchmarks/fidelity.py's
        half-seen ceiling row never trains on; it trains on the other half, :meth:`even_half_texts`."""
        odd = np.zeros(len(self.questions), dtype=bool)
        for name in self.set_names:
            odd[self._set_rows(name)[1::2]] = True
        return odd

    def even_half_texts(self) -> list[str]:
        odd = self.odd_half()
        return [text for text, is_odd in zip(self.questions, odd) if not is_odd]

    def measure(self, student_q: np.ndarray, student_c: np.ndarray,
                only: np.ndarray | None = None) -> dict[str, dict[str, float]]:
        """Figures per set, and their unweighted mean under ``"mean"``, from the student's embeddings of the
        questions and of every context (in :attr:`contexts` order); ``only`` (a mask over the questions) scores
        those questions alone."""
        top = top_k_rows(student_q, student_c)
        query_side = top_k_rows(student_q, self.teacher_c)
        gt = self._ground_truth(top, only)
        teacher_gt = self.teacher_gt if only is None else self._ground_truth(self.teacher_top, only)
        cos_q = row_cosines(student_q, self.teacher_q)
        cos_c = row_cosines(student_c, self.teacher_c)
        per_set = {}
        for name in self.set_names:
            rows = self._set_rows(name, only)
            teacher_mrr, teacher_recall = teacher_gt[name]
            per_set[name] = {
                "questions": len(rows),
                "p@10": top_k_overlap(top[rows], self.teacher_top[rows], 10),
                "p@50": top_k_overlap(top[rows], self.teacher_top[rows], 50),
                "query_side_p@10": top_k_overlap(query_side[rows], self.teacher_top[rows], 10),
                "mrr_share": gt[name][0] / teacher_mrr if teacher_mrr else float("nan"),
                "recall_share": gt[name][1] / teacher_recall if teacher_recall else float("nan"),
                "cos_questions": float(np.mean(cos_q[rows])),
                "cos_passages": float(np.mean(cos_c[self.set_context_rows[name]])),
                "teacher_mrr": teacher_mrr, "teacher_recall": teacher_recall,
            }
        per_set["mean"] = {key: float(np.mean([per_set[name][key] for name in self.set_names]))
                           for key in (*FIGURES, "teacher_mrr", "teacher_recall")}
        per_set["mean"]["questions"] = len(self.questions) if only is None else int(np.sum(only))
        return per_set


def _teacher_questions(teacher, questions: list[str], work: Path) -> np.ndarray:
    """The teacher's embeddings of the real questions, computed once per question list and kept in ``work``."""
    digest = hashlib.sha256(json.dumps([teacher.model, teacher.max_seq_length, questions]).encode()).hexdigest()[:16]
    path = work / f"teacher-real-questions-{digest}.npy"
    if path.is_file():
        return np.load(path)
    from m3distill.models import load_sentence_transformer

    model = load_sentence_transformer(teacher.model, device="cpu", max_seq_length=teacher.max_seq_length)
    embeddings = model.encode(questions, batch_size=teacher.batch_size, convert_to_numpy=True, show_progress_bar=False)
    np.save(path, embeddings)
    return embeddings


def top_k_rows(queries: np.ndarray, contexts: np.ndarray, k: int = 50) -> np.ndarray:
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    c = contexts / np.linalg.norm(contexts, axis=1, keepdims=True)
    return np.argsort(-(q @ c.T), axis=1, kind="stable")[:, :k]
