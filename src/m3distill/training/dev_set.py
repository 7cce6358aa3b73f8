"""Dev evaluation during training: how close a student stays to the teacher on the dev split.

Two sentence-transformers evaluators, both fed from the teacher cache so the teacher never has to run:

- :class:`CachedMSEEvaluator` is sentence-transformers' MSEEvaluator with the teacher's embeddings taken from the
  cache (same numbers as MSEEvaluator given the teacher); it also reports the mean cosine to the teacher.
- EmbeddingSimilarityEvaluator on pairs of dev texts, each question with its own context and with a random other
  context, with the teacher's cosine as the gold score: does the student rank pairs as the teacher does?
- :class:`TeacherTopKEvaluator`: the dev questions searched (exact cosine) among the dev contexts plus a sample of
  the train contexts, by the student and by the teacher (cached): P@k of their top-k lists, the agreement a user
  feels. It is the metric that picks the checkpoint kept by default.

Metric names carry the prefix ``dev_`` (``dev_negative_mse``, ``dev_spearman_cosine``, ``dev_teacher_p@10``...); :func:`dev_metrics`
turns an evaluation into the flat, positive form stored in student metadata.

The student encodes through :func:`m3distill.encoding.encode_texts`: batches of ``batch_size`` texts, or cut by a
token budget (``training.dev_max_tokens_per_batch``), always in fp32: the dev metrics pick the checkpoint that is
kept, and reduced-precision rounding has no place in that choice (the student is small; fp32 costs little).
"""

from __future__ import annotations

import contextlib
import logging
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from sentence_transformers import SentenceTransformer
from sentence_transformers.base.evaluation import BaseEvaluator
from sentence_transformers.sentence_transformer.evaluation import (
    EmbeddingSimilarityEvaluator,
    MSEEvaluator,
    SequentialEvaluator,
)

from m3distill.data.dataset import SynthDataset
from m3distill.encoding import encode_texts
from m3distill.errors import M3DistillError
from m3distill.metrics import row_cosines, top_k_overlap
from m3distill.teacher.cache import TeacherCache

logger = logging.getLogger(__name__)

DEV_PREFIX = "dev"
DEV_TOP_K = 10


@dataclass(frozen=True)
class DevSet:
    """Dev texts with their teacher embeddings, and text pairs with the teacher's cosine.

    Attributes:
        texts: dev contexts and questions (a seeded sample of at most ``max_texts``).
        embeddings: the teacher's embeddings of ``texts`` (float32).
        pairs: (text, text) pairs: question and its context, question and a random other context.
        gold: the teacher's cosine similarity of each pair.
        queries: dev questions searched for the top-k agreement (dev contexts when there are no questions).
        query_embeddings: the teacher's embeddings of ``queries``.
        corpus: the contexts searched: every dev context plus a seeded sample of train contexts.
        corpus_embeddings: the teacher's embeddings of ``corpus``.
    """

    texts: list[str]
    embeddings: np.ndarray
    pairs: list[tuple[str, str]]
    gold: list[float]
    queries: list[str]
    query_embeddings: np.ndarray
    corpus: list[str]
    corpus_embeddings: np.ndarray


class _EncodingMemo:
    """Embeddings of texts by one model state, shared by the dev evaluators of one evaluation.

    The dev texts, the pairs' texts and the top-k queries and corpus overlap (the dev contexts and questions are in
    all three); each text is encoded once per evaluation. :class:`_DevEvaluator` empties the memo before each
    evaluation, since the weights change between evaluations.
    """

    def __init__(self, batch_size: int, max_tokens_per_batch: int | None = None):
        self.batch_size = batch_size
        self.max_tokens_per_batch = max_tokens_per_batch
        self._embeddings: dict[str, np.ndarray] = {}

    def clear(self) -> None:
        self._embeddings.clear()

    def encode(self, model: SentenceTransformer, sentences: Sequence[str]) -> np.ndarray:
        missing = [text for text in dict.fromkeys(sentences) if text not in self._embeddings]
        if missing:
            encoded = encode_texts(model, missing, batch_size=self.batch_size,
                                   max_tokens_per_batch=self.max_tokens_per_batch, precision="fp32")
            self._embeddings.update(zip(missing, encoded))
        return np.stack([self._embeddings[text] for text in sentences])


@contextlib.contextmanager
def own_forward_pass(model: SentenceTransformer) -> Iterator[SentenceTransformer]:
    """Run the block with ``model``'s own forward pass, in fp32.

    A Trainer in bf16 or fp16 has accelerate wrap the model's forward method in autocast, and the wrapper stays on
    the model object: every encode() through it computes in reduced precision, the dev evaluations included,
    unless the original method is put back for the while. A model without the wrapper is left as it is.
    """
    original = model.__dict__.get("_original_forward")
    wrapped = model.__dict__.get("forward")
    if original is None or wrapped is None:
        yield model
        return
    model.forward = original
    try:
        yield model
    finally:
        model.forward = wrapped


class _DevEvaluator(SequentialEvaluator):
    """The dev evaluators run in sequence over one memo of encodings, emptied at the start of each call."""

    def __init__(self, evaluators, memo: _EncodingMemo):
        super().__init__(evaluators)
        self.memo = memo

    def __call__(self, model, output_path=None, epoch: int = -1, steps: int = -1) -> dict[str, float]:
        self.memo.clear()
        try:
            with own_forward_pass(model):
                return super().__call__(model, output_path, epoch, steps)
        finally:
            self.memo.clear()


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
        self.memo: _EncodingMemo | None = None
        # MSEEvaluator embeds its source sentences with the teacher in __init__; embed_inputs(None, ...) below
        # answers from the cache instead.
        super().__init__(list(texts), list(texts), teacher_model=None, batch_size=batch_size, name=name, write_csv=False)

    def embed_inputs(self, model: SentenceTransformer | None, sentences, **kwargs) -> np.ndarray:
        if model is None:
            return self._teacher_embeddings
        if self.memo is not None:
            self._last_student_embeddings = self.memo.encode(model, sentences)
        else:
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

    memo: _EncodingMemo | None = None

    def embed_inputs(self, model: SentenceTransformer, sentences, **kwargs) -> np.ndarray:
        if self.memo is not None:
            return self.memo.encode(model, list(sentences))
        distinct = list(dict.fromkeys(sentences))
        embeddings = super().embed_inputs(model, distinct, **kwargs)
        row = {text: index for index, text in enumerate(distinct)}
        return embeddings[[row[text] for text in sentences]]


class TeacherTopKEvaluator(BaseEvaluator):
    """Top-k agreement with the teacher: P@k of the student's and the teacher's exact cosine top-k lists.

    The teacher's side comes from cached embeddings; the student encodes the queries and the corpus on each call.
    Reports ``{name}_teacher_p@k`` for each k (the mean share of the teacher's top-k the student also returns).

    Args:
        queries: texts searched.
        query_embeddings: the teacher's embeddings of ``queries``.
        corpus: texts searched among.
        corpus_embeddings: the teacher's embeddings of ``corpus``.
        ks: cut-offs, each at most ``len(corpus)``.
        batch_size: encoding batch size.
        name: metric prefix.
    """

    def __init__(
        self, queries: Sequence[str], query_embeddings: np.ndarray, corpus: Sequence[str],
        corpus_embeddings: np.ndarray, *, ks: Sequence[int] = (DEV_TOP_K,), batch_size: int = 32,
        name: str = DEV_PREFIX,
    ):
        super().__init__()
        if len(queries) != len(query_embeddings) or len(corpus) != len(corpus_embeddings):
            raise ValueError("each query and corpus text needs one teacher embedding")
        if not queries or max(ks) > len(corpus):
            raise ValueError(f"need queries and at least {max(ks)} corpus texts, got {len(queries)} and {len(corpus)}")
        self.queries, self.corpus = list(queries), list(corpus)
        self.ks = sorted(ks)
        self.batch_size = batch_size
        self.name = name
        self.primary_metric = f"teacher_p@{self.ks[0]}"
        self._teacher_top = _exact_top_k(query_embeddings, corpus_embeddings, self.ks[-1])
        self.memo: _EncodingMemo | None = None

    def __call__(
        self, model: SentenceTransformer, output_path: str | None = None, epoch: int = -1, steps: int = -1
    ) -> dict[str, float]:
        encoded = self.embed_inputs(model, self.queries + self.corpus)
        top = _exact_top_k(encoded[: len(self.queries)], encoded[len(self.queries) :], self.ks[-1])
        metrics = {f"teacher_p@{k}": top_k_overlap(top, self._teacher_top, k) for k in self.ks}
        metrics = self.prefix_name_to_metrics(metrics, self.name)
        self.store_metrics_in_model_card_data(model, metrics, epoch, steps)
        return metrics

    def embed_inputs(self, model: SentenceTransformer, sentences: list[str], **kwargs) -> np.ndarray:
        if self.memo is not None:
            return self.memo.encode(model, sentences)
        return model.encode(sentences, batch_size=self.batch_size, convert_to_numpy=True, show_progress_bar=False,
                            **kwargs)


def _exact_top_k(queries: np.ndarray, corpus: np.ndarray, k: int) -> np.ndarray:
    """Rows of ``corpus`` by descending cosine similarity to each query, the first ``k`` (ties by row)."""
    queries = queries / np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-12)
    corpus = corpus / np.maximum(np.linalg.norm(corpus, axis=1, keepdims=True), 1e-12)
    scores = queries.astype(np.float32) @ corpus.astype(np.float32).T
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def build_dev_set(
    dataset: SynthDataset, cache: TeacherCache, *, max_texts: int = 2000, corpus_size: int = 1000, seed: int = 42
) -> DevSet:
    """The dev texts and pairs the evaluators use, drawn reproducibly from the dev split.

    Args:
        dataset: the loaded dataset directory.
        cache: the teacher cache holding the dev texts.
        max_texts: at most this many texts for MSE, this many pairs and this many top-k queries.
        corpus_size: contexts searched by the top-k agreement: every dev context, topped up with train contexts
            up to this many.
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

    queries = list(dict.fromkeys(text for text, _ in anchors))
    corpus = list(dict.fromkeys(contexts["text"]))
    in_corpus = set(corpus)
    train_contexts = [text for text in dict.fromkeys(dataset.split_contexts("train")["text"]) if text not in in_corpus]
    corpus += random.Random(seed).sample(train_contexts, min(len(train_contexts), max(0, corpus_size - len(corpus))))
    logger.info("dev set: %d texts, %d pairs, %d queries among %d contexts", len(texts), len(pairs), len(queries),
                len(corpus))
    return DevSet(texts=texts, embeddings=embeddings, pairs=pairs, gold=gold, queries=queries,
                  query_embeddings=cache.get(queries), corpus=corpus, corpus_embeddings=cache.get(corpus))


def dev_evaluator(
    dev: DevSet, *, batch_size: int = 32, max_tokens_per_batch: int | None = None
) -> SequentialEvaluator:
    """The evaluators the Trainer runs on the dev set: cached MSE (plus mean cosine), cosine Spearman, and top-k
    agreement with the teacher (when the dev corpus holds at least :data:`DEV_TOP_K` contexts), encoding each
    distinct text once per evaluation, in fp32.

    Args:
        dev: the dev set (:func:`build_dev_set`).
        batch_size: the most texts per encoding batch.
        max_tokens_per_batch: cut length-sorted batches of at most this many padded tokens (``None``: batches of
            ``batch_size`` texts); see :func:`m3distill.encoding.encode_texts`.
    """
    evaluators = [
        CachedMSEEvaluator(dev.texts, dev.embeddings, batch_size=batch_size),
        _PairSimilarityEvaluator(
            [a for a, _ in dev.pairs], [b for _, b in dev.pairs], dev.gold, batch_size=batch_size,
            main_similarity="cosine", name=DEV_PREFIX, write_csv=False,
        ),
    ]
    if len(dev.corpus) >= DEV_TOP_K:
        evaluators.append(TeacherTopKEvaluator(dev.queries, dev.query_embeddings, dev.corpus, dev.corpus_embeddings,
                                               batch_size=batch_size))
    memo = _EncodingMemo(batch_size, max_tokens_per_batch)
    for evaluator in evaluators:
        evaluator.memo = memo
    return _DevEvaluator(evaluators, memo)


def dev_metrics(raw: dict[str, float]) -> dict[str, float]:
    """Evaluator output (with or without the Trainer's ``eval_`` prefix) as positive, named dev metrics.

    Returns ``mse`` (mean squared error per dimension), ``mse_x100`` (sentence-transformers' scale),
    ``mean_cosine``, ``spearman_cosine``, ``pearson_cosine`` and, when measured, ``teacher_p@10``.
    """
    values = {key.removeprefix("eval_").removeprefix(f"{DEV_PREFIX}_"): float(value) for key, value in raw.items()}
    mse_x100 = -values["negative_mse"]
    metrics = {
        "mse": mse_x100 / 100,
        "mse_x100": mse_x100,
        "mean_cosine": values["mean_cosine"],
        "spearman_cosine": values["spearman_cosine"],
        "pearson_cosine": values["pearson_cosine"],
    }
    top_k = f"teacher_p@{DEV_TOP_K}"
    if top_k in values:
        metrics[top_k] = values[top_k]
    return metrics
