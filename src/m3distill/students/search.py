"""The layer search: which layers a student keeps when the config leaves the choice to a search.

:func:`~m3distill.students.layer_plan.resolve_layer_plans` gives a student of strategy ``search`` a
:class:`~m3distill.students.layer_plan.LayerPlan` without layers; :func:`search_layer_plan` then builds every
candidate from :func:`candidate_plans`, optionally trains it for a few steps with MSE on the cached teacher
embeddings, scores it on dev texts (top-10 agreement with the teacher when the caller measures it, MSE and mean
cosine to the teacher) and keeps the candidate with the highest agreement (the lowest MSE when agreement is not
measured).
"""

from __future__ import annotations

import itertools
import logging
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from sentence_transformers import SentenceTransformer

from m3distill.metrics import embedding_error
from m3distill.models import num_layers
from m3distill.students.build import build_student
from m3distill.students.layer_plan import plan_layers

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CandidateScore:
    """A candidate plan's alignment with the teacher on dev texts: ``mse`` (lower is better), ``mean_cosine`` and
    ``top_k`` (dev top-10 agreement with the teacher, higher is better; ``None`` when not measured)."""

    layers: tuple[int, ...]
    mse: float
    mean_cosine: float
    top_k: float | None = None


@dataclass(frozen=True)
class SearchResult:
    """The chosen plan and every candidate's score, best first."""

    best: tuple[int, ...]
    candidates: tuple[CandidateScore, ...]
    steps: int
    n_dev_texts: int

    def to_dict(self) -> dict:
        """JSON-ready form for metadata and logs."""
        return {
            "best": list(self.best),
            "steps": self.steps,
            "n_dev_texts": self.n_dev_texts,
            "candidates": [{**asdict(score), "layers": list(score.layers)} for score in self.candidates],
        }


def candidate_plans(n_teacher_layers: int, n_layers: int, n_candidates: int, *, seed: int = 0) -> list[list[int]]:
    """Up to ``n_candidates`` distinct layer plans for a search, in a fixed order.

    The order is: spread, uniform, first, last, uniform shifted up by 1, 2, ...; any remaining places go to random
    plans drawn with ``seed``.
    """
    plan_layers(n_teacher_layers, n_layers)  # range check
    found: dict[tuple[int, ...], None] = {}
    uniform = plan_layers(n_teacher_layers, n_layers, "uniform")
    ordered = [plan_layers(n_teacher_layers, n_layers, strategy) for strategy in ("spread", "uniform", "first", "last")]
    ordered += [[layer + shift for layer in uniform] for shift in range(1, n_teacher_layers - uniform[-1])]
    for plan in ordered:
        found.setdefault(tuple(plan), None)
    possible = math.comb(n_teacher_layers, n_layers)
    rng = random.Random(seed)
    while len(found) < min(n_candidates, possible):
        found.setdefault(tuple(sorted(rng.sample(range(n_teacher_layers), n_layers))), None)
    return [list(plan) for plan in itertools.islice(found, n_candidates)]


@dataclass(frozen=True)
class SearchSettings:
    """How a layer search scores its candidates.

    Attributes:
        n_candidates: how many plans to score (see :func:`candidate_plans`).
        steps: MSE training steps on the training texts before scoring; 0 scores the untrained cuts.
        batch_size: batch size for training and encoding.
        learning_rate: AdamW learning rate for the training steps.
        seed: seed for candidate drawing and batch order.
        max_seq_length: student max sequence length; the teacher's when ``None``.
    """

    n_candidates: int = 6
    steps: int = 0
    batch_size: int = 32
    learning_rate: float = 1e-4
    seed: int = 42
    max_seq_length: int | None = None


def search_layer_plan(
    teacher: SentenceTransformer,
    n_layers: int,
    *,
    dev_texts: Sequence[str],
    dev_embeddings: np.ndarray,
    train_texts: Sequence[str] = (),
    train_embeddings: np.ndarray | None = None,
    settings: SearchSettings = SearchSettings(),
    top_k_score: Callable[[SentenceTransformer], float] | None = None,
) -> SearchResult:
    """Score candidate plans for an ``n_layers`` student and return the best one.

    Args:
        teacher: the loaded teacher; candidates are built from its layers (it is not modified).
        n_layers: layers the student keeps.
        dev_texts: texts the candidates are scored on.
        dev_embeddings: the teacher's embeddings of ``dev_texts`` (float32, one row per text).
        train_texts: texts for the training steps (``settings.steps``).
        train_embeddings: the teacher's embeddings of ``train_texts``.
        settings: how many candidates, training steps and their settings (:class:`SearchSettings`).
        top_k_score: the dev top-k agreement of a candidate with the teacher; when given, candidates are ranked by
            it (ties by MSE), else by dev MSE.
    """
    steps, batch_size = settings.steps, settings.batch_size
    if len(dev_texts) == 0 or len(dev_texts) != len(dev_embeddings):
        raise ValueError(
            f"need dev texts with one teacher embedding each, got {len(dev_texts)} texts and {len(dev_embeddings)} rows"
        )
    if steps and (train_embeddings is None or len(train_texts) != len(train_embeddings) or not train_texts):
        raise ValueError("search steps > 0 need train_texts with one teacher embedding each")
    plans = candidate_plans(num_layers(teacher), n_layers, settings.n_candidates, seed=settings.seed)
    scores = []
    for layers in plans:
        student = build_student(teacher, layers)
        if settings.max_seq_length is not None:
            student.max_seq_length = settings.max_seq_length
        if steps:
            _train_steps(student, train_texts, train_embeddings, steps=steps, batch_size=batch_size,
                         learning_rate=settings.learning_rate, seed=settings.seed)
        predicted = student.encode(list(dev_texts), batch_size=batch_size, convert_to_numpy=True, show_progress_bar=False)
        top_k = top_k_score(student) if top_k_score is not None else None
        scores.append(CandidateScore(tuple(layers), *embedding_error(predicted, dev_embeddings), top_k=top_k))
        logger.info("search %d layers: candidate %s dev mse %.6f, mean cosine %.4f, top-k agreement %s",
                    n_layers, layers, scores[-1].mse, scores[-1].mean_cosine,
                    "-" if top_k is None else f"{top_k:.3f}")
        del student
    ranked = tuple(sorted(scores, key=lambda score: (-(score.top_k or 0.0), score.mse)))
    result = SearchResult(best=ranked[0].layers, candidates=ranked, steps=steps, n_dev_texts=len(dev_texts))
    logger.info("search %d layers: picked %s of %d candidates", n_layers, list(result.best), len(ranked))
    return result


def _train_steps(
    student: SentenceTransformer, texts: Sequence[str], targets: np.ndarray, *, steps: int, batch_size: int,
    learning_rate: float, seed: int,
) -> None:
    """A few plain AdamW steps of MSE distillation: enough to rank candidates, far cheaper than a Trainer."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(student.parameters(), lr=learning_rate)
    student.train()
    for _ in range(steps):
        rows = torch.randint(len(texts), (min(batch_size, len(texts)),), generator=generator).tolist()
        features = student.preprocess([texts[row] for row in rows])
        features = {
            key: value.to(student.device) if isinstance(value, torch.Tensor) else value for key, value in features.items()
        }
        predicted = student(features)["sentence_embedding"]
        target = torch.as_tensor(targets[rows], device=predicted.device, dtype=predicted.dtype)
        loss = torch.nn.functional.mse_loss(predicted, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    student.eval()
