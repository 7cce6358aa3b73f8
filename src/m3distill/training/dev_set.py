"""Dev evaluation during training: how close a student stays to the teacher on the dev split.

Two sentence-transformers evaluators, both fed from the teacher cache so the teacher never has to run:

- :class:`CachedMSEEvaluator` is sentence-transformers' MSEEvaluator with the teacher's embeddings taken from the
  cache (same numbers as MSEEvaluator given the teacher); it also reports the mean cosine to the teacher.
- EmbeddingSimilarityEvaluator on pairs of dev texts, each question with its own context and with a random other
  context, with the teacher's cosine as the gold score: does the student rank pairs as the teacher does?

Metric names carry the prefix ``dev_`` (``dev_negative_mse``, ``dev_spearman_cosine``...); :func:`dev_metrics`
turns an evaluation into the flat, positive form stored in student metadata.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.evaluation import (
    EmbeddingSimilarityEvaluator,
    MSEEvaluator,
    SequentialEvaluator,
)

from m3distill.data.dataset import SynthDataset
from m3distill.errors import M3DistillError
from m3distill.evaluation.alignment import row_cosines
from m3distill.teacher.cache import TeacherCache

logger = logging.getLogger(__name__)

DEV_PREFIX = "dev"


@dataclass(frozen=True)
class DevSet:
    """Dev texts with their teacher embeddings, and text pairs with the teacher's cosine.

    Attributes:
        texts: dev contexts and questions (a seeded sample of at most ``max_texts``).
        embeddings: the teacher's embeddings of ``texts`` (float32).
        pairs: (text, text) pairs: question and its context, question and a random other context.
        gold: the teacher's cosine similarity of each pair.
    """

    texts: list[str]
    embeddings: np.ndarray
    pairs: list[tuple[str, str]]
    gold: list[float]


class CachedMSEEvaluator(MSEEvaluator):
    """MSEEvaluator whose teacher side comes from cached embeddings; adds ``mean_cosine`` to the metrics.

    Args:
        texts: texts the student encodes.
        teacher_embeddings: the teacher's embeddings of ``texts``, one row per text.
        batch_size: encoding batch size.
        name: metric prefix.
    """

    def __init__(
        self, texts: Sequence[str], teacher_embeddings: np.ndarray, *, batch_size: int = 32, name: str = DEV_PREFIX
    ):
        if len(texts) != len(teacher_embeddings):
            raise ValueError(f"{len(texts)} texts but {len(teacher_embeddings)} teacher embeddings")
        self._teacher_embeddings = np.asarray(teacher_embeddings, dtype=np.float32)
        self._last_student_embeddings: np.ndarray | None = None
        # MSEEvaluator embeds its source sentences with the teacher in __init__; embed_inputs(None, ...) below
        # answers from the cache instead.
        super().__init__(list(texts), list(texts), teacher_model=None, batch_size=batch_size, name=name, write_csv=False)

    def embed_inputs(self, model: SentenceTransformer | None, sentences, **kwargs) -> np.ndarray:
        if model is None:
            return self._teacher_embeddings
        self._last_student_embeddings = super().embed_inputs(model, sentences, **kwargs)
        return self._last_student_embeddings

    def __call__(
        self, model: SentenceTransformer, output_path: str | None = None, epoch: int = -1, steps: int = -1
    ) -> dict[str, float]:
        metrics = super().__call__(model, output_path, epoch, steps)
        metrics[f"{self.name}_mean_cosine"] = float(
            np.mean(row_cosines(self._last_student_embeddings, self._teacher_embeddings))
        )
        return metrics


class _PairSimilarityEvaluator(EmbeddingSimilarityEvaluator):
    """EmbeddingSimilarityEvaluator that encodes each distinct text once (a context recurs in many pairs)."""

    def embed_inputs(self, model: SentenceTransformer, sentences, **kwargs) -> np.ndarray:
        distinct = list(dict.fromkeys(sentences))
        embeddings = super().embed_inputs(model, distinct, **kwargs)
        row = {text: index for index, text in enumerate(distinct)}
        return embeddings[[row[text] for text in sentences]]


def build_dev_set(dataset: SynthDataset, cache: TeacherCache, *, max_texts: int = 2000, seed: int = 42) -> DevSet:
    """The dev texts and pairs the evaluators use, drawn reproducibly from the dev split.

    Args:
        dataset: the loaded dataset directory.
        cache: the teacher cache holding the dev texts.
        max_texts: at most this many texts for MSE, and this many pairs.
        seed: seed of the sample and of the random non-matching contexts.

    Raises:
        M3DistillError: the dev split is empty.
    """
    rng = random.Random(seed)
    texts = dataset.texts(["dev"], ["contexts", "questions"])
    if len(texts) < 2:
        raise M3DistillError(
            f"the dataset {dataset.root} has {len(texts)} dev text(s); training needs a dev split "
            "(rerun `m3distill synth` with synth.splits.dev > 0)"
        )
    if len(texts) > max_texts:
        texts = rng.sample(texts, max_texts)
    embeddings = cache.get(texts)

    contexts = dataset.split_contexts("dev")
    context_text = dict(zip(contexts["context_id"], contexts["text"]))
    questions = dataset.split_questions("dev")
    anchors = list(zip(questions["text"], questions["context_id"]))
    if not anchors:  # no questions: pair contexts with each other
        anchors = list(zip(contexts["text"], contexts["context_id"]))
    rng.shuffle(anchors)
    anchors = anchors[: max(1, max_texts // 2)]
    context_ids = list(context_text)
    pairs: list[tuple[str, str]] = []
    for text, context_id in anchors:
        if context_text[context_id] != text:
            pairs.append((text, context_text[context_id]))
        other = rng.choice(context_ids)
        if other != context_id and context_text[other] != text:
            pairs.append((text, context_text[other]))
    if len(pairs) < 2:
        raise M3DistillError(f"the dev split of {dataset.root} is too small to form text pairs; give it more contexts")
    gold = row_cosines(cache.get([a for a, _ in pairs]), cache.get([b for _, b in pairs])).tolist()
    logger.info("dev set: %d texts, %d pairs", len(texts), len(pairs))
    return DevSet(texts=texts, embeddings=embeddings, pairs=pairs, gold=gold)


def dev_evaluator(dev: DevSet, *, batch_size: int = 32) -> SequentialEvaluator:
    """The evaluators the Trainer runs on the dev set: cached MSE (plus mean cosine), then cosine Spearman."""
    return SequentialEvaluator(
        [
            CachedMSEEvaluator(dev.texts, dev.embeddings, batch_size=batch_size),
            _PairSimilarityEvaluator(
                [a for a, _ in dev.pairs], [b for _, b in dev.pairs], dev.gold, batch_size=batch_size,
                main_similarity="cosine", name=DEV_PREFIX, write_csv=False,
            ),
        ]
    )


def dev_metrics(raw: dict[str, float]) -> dict[str, float]:
    """Evaluator output (with or without the Trainer's ``eval_`` prefix) as positive, named dev metrics.

    Returns ``mse`` (mean squared error per dimension), ``mse_x100`` (sentence-transformers' scale),
    ``mean_cosine``, ``spearman_cosine`` and ``pearson_cosine``.
    """
    values = {key.removeprefix("eval_").removeprefix(f"{DEV_PREFIX}_"): float(value) for key, value in raw.items()}
    mse_x100 = -values["negative_mse"]
    return {
        "mse": mse_x100 / 100,
        "mse_x100": mse_x100,
        "mean_cosine": values["mean_cosine"],
        "spearman_cosine": values["spearman_cosine"],
        "pearson_cosine": values["pearson_cosine"],
    }
