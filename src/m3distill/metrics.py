"""The metric definitions: every metric's name and how it is computed, written here once.

Evaluation (:mod:`m3distill.evaluation`), the dev evaluation during training (:mod:`m3distill.training.dev_set`),
the layer search (:mod:`m3distill.students.search`) and the report all import them from here; the stages keep
only the orchestration (which texts, which models, which search backend).

**Alignment** of a student with the teacher, computed on embeddings both models made of the *same* texts
(flat names with the ``alignment_`` prefix):

* Embedding error: mean squared error per element (and x100, the figure sentence-transformers' ``MSEEvaluator``
  logs) and the mean cosine between the student's and the teacher's embedding of each text.
* Similarity agreement: over (question, context) pairs, the Pearson and Spearman correlation between the cosine
  similarity the student gives a pair and the one the teacher gives it (what ``EmbeddingSimilarityEvaluator``
  computes when the teacher's cosines are the gold scores).

Pairs are drawn by :func:`draw_similarity_pairs`: every test question with its own context (matching) plus
``negatives_per_question`` other test contexts drawn uniformly at random without replacement (non-matching).

**Retrieval** (flat names with the index kind as prefix, e.g. ``exact_overlap@10``):

* ``{index}_overlap@k`` (between two models): |top-k of A ∩ top-k of B| / k, averaged over questions
  (:func:`top_k_overlap`).
* ``{index}_recall@k``, ``{index}_mrr@10``, ``{index}_ndcg@10`` (per model): ground truth with each question's own
  context as its one relevant context, computed by ir-measures (R@k, RR@10, nDCG@10; :func:`ground_truth_metrics`).
* ``hnsw_vs_exact_overlap@k`` (per model): the overlap of a model's HNSW top-k with its own exact top-k (HNSW recall).

**Real questions** (``evaluation.real_questions``: people's questions, never trained on) are searched like the test
questions (exact search, among the same contexts), and each model's figures carry the prefix
:func:`real_questions_index`: ``real_questions_exact_overlap@k`` (per student: P@k of its top-k against the
teacher's), ``real_questions_query_side_exact_overlap@k`` (its questions searched among the teacher's context
embeddings), ``real_questions_exact_recall@k`` / ``_mrr@10`` / ``_ndcg@10`` (every context of a question's answer
document relevant; questions without one left out) and ``real_questions_mean_cosine`` (mean cosine of a student's
question embeddings to the teacher's).

**M3 outputs** (models with bge-m3's sparse and ColBERT heads, see :mod:`m3distill.m3`): retrieval by each output
beyond dense (:data:`M3_RETRIEVAL_OUTPUTS`: ``sparse``, ``colbert``, ``hybrid``; exact search) is measured as above
with the output's name as the prefix (:func:`output_prefix`): ``sparse_overlap@10``, ``colbert_mrr@10``,
``hybrid_recall@20``. Sparse search ranks only the contexts that share a token with the question, so its lists
can be shorter than k: ``{output}_overlap@k`` divides by the longer of the two lists instead of k
(:data:`M3_OVERLAP_SHORT_LISTS`), so two models that return the same contexts agree fully. Alignment of each output with the teacher's:

* ``alignment_sparse_spearman``: per text, the Spearman correlation of the student's and the teacher's weights over
  the token ids both give a weight, averaged over the texts where they share at least two ids (and neither gives
  them all the same weight); ``alignment_sparse_texts`` counts those texts.
* ``alignment_sparse_mass_covered``: per text, the share of the teacher's total weight that falls on token ids the
  student also weights, averaged over the texts the teacher gives any weight (:func:`sparse_alignment_metrics`).
* ``alignment_colbert_pearson``, ``alignment_colbert_spearman``: over the same (question, context) pairs as the
  dense correlations, the student's ColBERT (MaxSim) score of each pair against the teacher's.
* ``alignment_colbert_token_cosine``: per text, the mean cosine of the student's and the teacher's vector of each
  token, averaged over the texts where both have the same number of vectors of the same width
  (:func:`colbert_alignment_metrics`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import ir_measures
import numpy as np
from ir_measures import RR, R, nDCG
from scipy.stats import pearsonr, spearmanr

logger = logging.getLogger(__name__)

ALIGNMENT_PREFIX = "alignment"
MSE = f"{ALIGNMENT_PREFIX}_mse"
MSE_X100 = f"{ALIGNMENT_PREFIX}_mse_x100"
MEAN_COSINE = f"{ALIGNMENT_PREFIX}_mean_cosine"
PEARSON_COSINE = f"{ALIGNMENT_PREFIX}_pearson_cosine"
SPEARMAN_COSINE = f"{ALIGNMENT_PREFIX}_spearman_cosine"

# Speed and size (measured by m3distill.evaluation.speed)
SPEED_PREFIX = "speed"
TEXTS_PER_S = f"{SPEED_PREFIX}_texts_per_s"
TEXTS_PER_S_MIN = f"{TEXTS_PER_S}_min"
TEXTS_PER_S_MAX = f"{TEXTS_PER_S}_max"
SPEEDUP = f"{SPEED_PREFIX}_speedup_vs_teacher"
SPEEDUP_MIN = f"{SPEEDUP}_min"
SPEEDUP_MAX = f"{SPEEDUP}_max"
LAYER_RATIO = f"{SPEED_PREFIX}_layer_ratio"
SPEEDUP_SUSPECT = f"{SPEED_PREFIX}_speedup_suspect"
PARAMETERS = f"{SPEED_PREFIX}_parameters"
WEIGHTS_BYTES = f"{SPEED_PREFIX}_weights_bytes"
SIZE_ON_DISK = f"{SPEED_PREFIX}_size_on_disk_bytes"
PEAK_MEMORY = f"{SPEED_PREFIX}_peak_memory_increase_bytes"
MEMORY_MEASURE = f"{SPEED_PREFIX}_memory_measure"
SECONDS_PER_RUN = f"{SPEED_PREFIX}_seconds_per_run"
# What a timed pass produced: "dense", or "dense+sparse+colbert" for an M3 model timed on all three outputs at once.
SPEED_OUTPUTS = f"{SPEED_PREFIX}_outputs"


def speedup_limit(teacher_layers: int | None, student_layers: int | None) -> float | None:
    """The fastest a student can honestly be: teacher layers / student layers (``None`` when either is unknown);
    the value of :data:`LAYER_RATIO`."""
    if not teacher_layers or not student_layers:
        return None
    return teacher_layers / student_layers


def is_suspect_speedup(speedup: float | None, limit: float | None) -> bool:
    """True when a measured speed-up is above what the layer ratio allows, i.e. the timing was disturbed: the rule
    of :data:`SPEEDUP_SUSPECT`."""
    return speedup is not None and limit is not None and speedup > limit


PAIRS_DESCRIPTION = (
    "Each test question is paired with its own context (a matching pair) and with {negatives} other test "
    "contexts drawn uniformly at random without replacement (non-matching pairs; numpy default_rng seed {seed}). "
    "Pearson and Spearman correlate the student's cosine similarity of each pair with the teacher's."
)


@dataclass(frozen=True)
class SimilarityPairs:
    """(question, context) pairs as row numbers into one array of test-text embeddings.

    Attributes:
        left: row of each pair's question.
        right: row of each pair's context.
        matching: True where the context is the question's own.
    """

    left: np.ndarray
    right: np.ndarray
    matching: np.ndarray

    def __len__(self) -> int:
        return len(self.left)


def draw_similarity_pairs(
    question_rows: Sequence[int],
    own_context_rows: Sequence[int],
    context_rows: Sequence[int],
    negatives_per_question: int,
    seed: int,
) -> SimilarityPairs:
    """Each question with its own context plus ``negatives_per_question`` random other contexts.

    Args:
        question_rows: row of each test question in the embedding array.
        own_context_rows: row of each question's own context (same order as ``question_rows``).
        context_rows: rows of all test contexts, the pool non-matching contexts are drawn from.
        negatives_per_question: non-matching contexts per question; fewer when the pool is smaller.
        seed: seed of the numpy generator, so the same dataset always gives the same pairs.
    """
    if len(question_rows) != len(own_context_rows):
        raise ValueError("question_rows and own_context_rows must have the same length")
    rng = np.random.default_rng(seed)
    pool = np.asarray(context_rows, dtype=np.int64)
    left, right, matching = [], [], []
    for question, own in zip(question_rows, own_context_rows):
        left.append(question)
        right.append(own)
        matching.append(True)
        others = pool[pool != own]
        n_negatives = min(negatives_per_question, len(others))
        for context in rng.choice(others, size=n_negatives, replace=False) if n_negatives else ():
            left.append(question)
            right.append(int(context))
            matching.append(False)
    return SimilarityPairs(
        left=np.asarray(left, dtype=np.int64),
        right=np.asarray(right, dtype=np.int64),
        matching=np.asarray(matching, dtype=bool),
    )


def row_cosines(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Cosine similarity of each row of ``left`` with the same row of ``right``, in float64 (0 for a zero row)."""
    return np.einsum("ij,ij->i", _unit_rows(left), _unit_rows(right))


def embedding_error(student: np.ndarray, teacher: np.ndarray) -> tuple[float, float]:
    """(MSE per element, mean cosine) between a student's and the teacher's embeddings of the same texts.

    The one definition of both numbers: the test-split report, the dev evaluation during training and the layer
    search all use it.
    """
    student = np.asarray(student, dtype=np.float64)
    teacher = np.asarray(teacher, dtype=np.float64)
    return float(np.mean((teacher - student) ** 2)), float(np.mean(row_cosines(student, teacher)))


def pair_cosines(embeddings: np.ndarray, pairs: SimilarityPairs) -> np.ndarray:
    """Cosine similarity of every pair, in float64."""
    return row_cosines(embeddings[pairs.left], embeddings[pairs.right])


def alignment_metrics(
    student: np.ndarray, teacher: np.ndarray, pairs: SimilarityPairs, *, text_rows: np.ndarray | None = None
) -> dict[str, float | None]:
    """Alignment of a student with the teacher, as a flat dict of ``alignment_*`` metrics.

    Args:
        student: the student's embeddings, one row per text.
        teacher: the teacher's embeddings of the same texts in the same order.
        pairs: (question, context) pairs as rows of both arrays (see :func:`draw_similarity_pairs`).
        text_rows: rows the embedding error is averaged over (the test texts); all rows when ``None``.

    The MSE and mean cosine need embeddings of the same width; for a student of another width they are ``None``.
    The correlations are ``None`` with fewer than two pairs or when a model gives every pair the same similarity.
    """
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(
            f"student has {student.shape[0]} embeddings, teacher {teacher.shape[0]}: encode the same texts"
        )
    metrics: dict[str, float | None] = {MSE: None, MSE_X100: None, MEAN_COSINE: None}
    if student.shape[1] == teacher.shape[1]:
        rows = slice(None) if text_rows is None else text_rows
        mse, mean_cosine = embedding_error(student[rows], teacher[rows])
        metrics[MSE] = mse
        metrics[MSE_X100] = 100.0 * mse
        metrics[MEAN_COSINE] = mean_cosine
    else:
        logger.warning(
            "student embeddings are %d wide, the teacher's %d: MSE and mean cosine are left out",
            student.shape[1],
            teacher.shape[1],
        )
    student_cosines = pair_cosines(student, pairs)
    teacher_cosines = pair_cosines(teacher, pairs)
    if len(pairs) < 2 or np.ptp(teacher_cosines) == 0 or np.ptp(student_cosines) == 0:
        # A correlation with a constant is undefined; None (JSON null) instead of NaN keeps report.json valid JSON.
        logger.warning("fewer than two pairs, or one model gives every pair the same cosine similarity: "
                       "correlations are left out")
        metrics[PEARSON_COSINE] = metrics[SPEARMAN_COSINE] = None
    else:
        metrics[PEARSON_COSINE] = float(pearsonr(teacher_cosines, student_cosines)[0])
        metrics[SPEARMAN_COSINE] = float(spearmanr(teacher_cosines, student_cosines)[0])
    return metrics


# Alignment of the M3 outputs (sparse lexical weights and ColBERT multi-vectors).
SPARSE_SPEARMAN = f"{ALIGNMENT_PREFIX}_sparse_spearman"
SPARSE_TEXTS = f"{ALIGNMENT_PREFIX}_sparse_texts"
SPARSE_MASS_COVERED = f"{ALIGNMENT_PREFIX}_sparse_mass_covered"
COLBERT_PEARSON = f"{ALIGNMENT_PREFIX}_colbert_pearson"
COLBERT_SPEARMAN = f"{ALIGNMENT_PREFIX}_colbert_spearman"
COLBERT_TOKEN_COSINE = f"{ALIGNMENT_PREFIX}_colbert_token_cosine"


def sparse_alignment_metrics(
    student: Sequence[dict[int, float]], teacher: Sequence[dict[int, float]]
) -> dict[str, float | int | None]:
    """Alignment of a student's sparse lexical weights with the teacher's, as ``alignment_sparse_*`` metrics.

    Args:
        student: the student's weights of each text (token id -> weight, as :func:`m3distill.m3.encode_m3` gives).
        teacher: the teacher's weights of the same texts in the same order.

    * ``alignment_sparse_spearman``: per text, the Spearman correlation of the two models' weights over the token
      ids both weight, averaged over the texts with at least two shared ids where neither model gives all of them
      the same weight (``None`` when no text qualifies); ``alignment_sparse_texts`` is the number of those texts.
    * ``alignment_sparse_mass_covered``: per text, the teacher's weight on the ids the student also weights over
      the teacher's total weight, averaged over the texts the teacher weights at all (``None`` when none): 1.0 when
      the student keeps every token the teacher finds lexically useful, whatever the weights.
    """
    if len(student) != len(teacher):
        raise ValueError(f"student has {len(student)} texts, teacher {len(teacher)}: encode the same texts")
    correlations, covered = [], []
    for student_weights, teacher_weights in zip(student, teacher):
        shared = sorted(set(student_weights) & set(teacher_weights))
        total = float(sum(teacher_weights.values()))
        if total > 0:
            covered.append(sum(teacher_weights[token] for token in shared) / total)
        if len(shared) < 2:
            continue
        teacher_values = np.array([teacher_weights[token] for token in shared], dtype=np.float64)
        student_values = np.array([student_weights[token] for token in shared], dtype=np.float64)
        if np.ptp(teacher_values) == 0 or np.ptp(student_values) == 0:
            continue  # a correlation with a constant is undefined
        correlations.append(float(spearmanr(teacher_values, student_values)[0]))
    return {
        SPARSE_SPEARMAN: float(np.mean(correlations)) if correlations else None,
        SPARSE_TEXTS: len(correlations),
        SPARSE_MASS_COVERED: float(np.mean(covered)) if covered else None,
    }


def colbert_alignment_metrics(
    student: Sequence[np.ndarray],
    teacher: Sequence[np.ndarray],
    pairs: SimilarityPairs,
    *,
    text_rows: Sequence[int] | None = None,
) -> dict[str, float | None]:
    """Alignment of a student's ColBERT multi-vectors with the teacher's, as ``alignment_colbert_*`` metrics.

    Args:
        student: the student's ColBERT vectors of each text, (tokens, dim) each.
        teacher: the teacher's vectors of the same texts in the same order.
        pairs: (question, context) pairs as text rows (see :func:`draw_similarity_pairs`); the same pairs as the
            dense correlations.
        text_rows: texts the token-wise cosine is averaged over (the test texts); all texts when ``None``.

    * ``alignment_colbert_pearson`` / ``alignment_colbert_spearman``: correlation of the student's MaxSim score
      (:func:`m3distill.m3.colbert_score`) of each pair with the teacher's; ``None`` with fewer than two pairs or
      when a model gives every pair the same score.
    * ``alignment_colbert_token_cosine``: per text, the mean cosine between the two models' vectors of the same
      token, averaged over the texts where both have as many vectors of the same width (same tokenizer and head
      width); ``None`` when there is no such text.
    """
    # Imported here: the score lives with the M3 model code, which pulls in torch.
    from m3distill.m3 import colbert_score

    if len(student) != len(teacher):
        raise ValueError(f"student has {len(student)} texts, teacher {len(teacher)}: encode the same texts")
    metrics: dict[str, float | None] = {COLBERT_PEARSON: None, COLBERT_SPEARMAN: None, COLBERT_TOKEN_COSINE: None}
    student_scores = np.array([colbert_score(student[left], student[right])
                               for left, right in zip(pairs.left, pairs.right)], dtype=np.float64)
    teacher_scores = np.array([colbert_score(teacher[left], teacher[right])
                               for left, right in zip(pairs.left, pairs.right)], dtype=np.float64)
    if len(pairs) >= 2 and np.ptp(student_scores) > 0 and np.ptp(teacher_scores) > 0:
        metrics[COLBERT_PEARSON] = float(pearsonr(teacher_scores, student_scores)[0])
        metrics[COLBERT_SPEARMAN] = float(spearmanr(teacher_scores, student_scores)[0])
    else:
        logger.warning("fewer than two pairs, or one model gives every pair the same ColBERT score: "
                       "ColBERT correlations are left out")
    rows = range(len(teacher)) if text_rows is None else text_rows
    token_cosines = [float(np.mean(row_cosines(student[row], teacher[row]))) for row in rows
                     if student[row].shape == teacher[row].shape and len(teacher[row])]
    if token_cosines:
        metrics[COLBERT_TOKEN_COSINE] = float(np.mean(token_cosines))
    return metrics


# Retrieval. MRR and nDCG are cut off at the 10th result.
GROUND_TRUTH_CUTOFF = 10


def overlap_metric(index: str, k: int) -> str:
    """Name of the P@k overlap between two models' top-k lists."""
    return f"{index}_overlap@{k}"


def recall_metric(index: str, k: int) -> str:
    """Name of Recall@k against each question's own context."""
    return f"{index}_recall@{k}"


def mrr_metric(index: str) -> str:
    """Name of MRR@10 against each question's own context."""
    return f"{index}_mrr@{GROUND_TRUTH_CUTOFF}"


def ndcg_metric(index: str) -> str:
    """Name of nDCG@10 against each question's own context."""
    return f"{index}_ndcg@{GROUND_TRUTH_CUTOFF}"


QUERY_SIDE = "query_side"


def query_side_index(index: str) -> str:
    """Metric prefix of a student's questions searched in the teacher's index (the query-side stand-in)."""
    return f"{QUERY_SIDE}_{index}"


def query_side_overlap_metric(index: str, k: int) -> str:
    """Name of the P@k overlap of the query-side stand-in's top-k with the teacher's own top-k."""
    return overlap_metric(query_side_index(index), k)


REAL_QUESTIONS = "real_questions"
REAL_QUESTIONS_MEAN_COSINE = f"{REAL_QUESTIONS}_mean_cosine"


def real_questions_index(index: str) -> str:
    """Metric prefix of the real questions searched by index kind ``index`` (``exact``, or a query-side one):
    ``overlap_metric(real_questions_index("exact"), 10)`` is ``real_questions_exact_overlap@10``."""
    return f"{REAL_QUESTIONS}_{index}"


# The outputs of an M3 model searched beside dense (the names of m3distill.m3's outputs, plus their hybrid);
# each is the prefix of its retrieval metrics. Dense keeps its index-kind prefixes (exact_, hnsw_).
HYBRID = "hybrid"
M3_RETRIEVAL_OUTPUTS = ("sparse", "colbert", HYBRID)
# How their P@k treats a list shorter than k (see top_k_overlap): sparse search leaves out contexts without a shared
# token, and a model that returns fewer contexts is not on that account less like another that returns the same.
M3_OVERLAP_SHORT_LISTS: Literal["miss", "longer"] = "longer"


def output_prefix(output: str) -> str:
    """Metric prefix of retrieval by an M3 output (``sparse``, ``colbert`` or ``hybrid``): the output's name.

    Use it with the name helpers above: ``overlap_metric(output_prefix("sparse"), 10)`` is ``sparse_overlap@10``.
    """
    if output not in M3_RETRIEVAL_OUTPUTS:
        raise ValueError(f"unknown M3 output {output!r}; expected one of {M3_RETRIEVAL_OUTPUTS}")
    return output


def hnsw_vs_exact_metric(k: int) -> str:
    """Name of the overlap of a model's HNSW top-k with its exact top-k."""
    return f"hnsw_vs_exact_overlap@{k}"


def top_k_overlap(top_a: np.ndarray, top_b: np.ndarray, k: int, *,
                  short_lists: Literal["miss", "longer"] = "miss") -> float:
    """P@k overlap: |top-k of A ∩ top-k of B| / k, averaged over questions.

    Args:
        top_a: model A's ranked context rows, one row per question (at least k columns; -1 pads a short list).
        top_b: model B's, same questions in the same order.
        k: the cut-off.
        short_lists: what a list shorter than k counts as. ``"miss"``: its empty places are misses, the share is
            |A ∩ B| / k. ``"longer"``: the share is over the longer of the two lists, |A ∩ B| / max(|A|, |B|), and a
            question both models return nothing for counts as agreement (1.0). Full lists give the same either way.
    """
    if top_a.shape[0] != top_b.shape[0]:
        raise ValueError("both top-k arrays must hold the same questions")
    if top_a.shape[0] == 0:
        raise ValueError("no questions to compare")
    if min(top_a.shape[1], top_b.shape[1]) < k:
        raise ValueError(f"k={k} is deeper than the retrieved lists ({min(top_a.shape[1], top_b.shape[1])})")
    if short_lists not in ("miss", "longer"):
        raise ValueError(f"short_lists must be 'miss' or 'longer', got {short_lists!r}")
    shares = []
    for a, b in zip(top_a, top_b):
        found_a, found_b = _valid(a[:k]), _valid(b[:k])
        longer = max(len(found_a), len(found_b))
        if short_lists == "miss":
            shares.append(len(found_a & found_b) / k)
        else:
            shares.append(len(found_a & found_b) / longer if longer else 1.0)
    return float(np.mean(shares))


def ground_truth_metrics(
    top: np.ndarray, relevant: Sequence[int] | Sequence[Sequence[int]], ks: Sequence[int], index: str
) -> dict[str, float]:
    """Recall@k for each k, MRR@10 and nDCG@10 against each question's relevant contexts.

    Args:
        top: ranked context rows, one row per question.
        relevant: the row of each question's own context, or the rows of all its relevant contexts (the contexts
            of its answer document, say; Recall@k is then the share of them in the top k).
        ks: cut-offs for Recall@k.
        index: index kind, the metrics' name prefix.

    Computed by ir-measures; documents are scored by rank so its tie-breaking cannot reorder our lists.
    """
    if len(top) != len(relevant):
        raise ValueError("relevant contexts are needed for every question")
    depth = top.shape[1]
    qrels = [ir_measures.Qrel(str(q), str(int(context)), 1)
             for q, rows in enumerate(relevant) for context in np.atleast_1d(rows)]
    run = [
        ir_measures.ScoredDoc(str(q), str(int(context)), float(depth - rank))
        for q, row in enumerate(top)
        for rank, context in enumerate(row)
        if context >= 0
    ]
    measures = {recall_metric(index, k): R @ k for k in ks}
    measures[mrr_metric(index)] = RR @ GROUND_TRUTH_CUTOFF
    measures[ndcg_metric(index)] = nDCG @ GROUND_TRUTH_CUTOFF
    # ir-measures averages over the questions in qrels, so a question with an empty list counts as a miss.
    values = ir_measures.calc_aggregate(list(measures.values()), qrels, run)
    return {name: float(values.get(measure, 0.0)) for name, measure in measures.items()}


def _unit_rows(embeddings: np.ndarray) -> np.ndarray:
    embeddings = np.asarray(embeddings, dtype=np.float64)
    norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
    # A zero vector has no direction; treat its cosine with anything as 0 instead of NaN.
    return embeddings / np.where(norms == 0, 1.0, norms)


def _valid(row: np.ndarray) -> set[int]:
    return {int(x) for x in row if x >= 0}
