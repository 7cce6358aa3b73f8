"""What a trained student records it was made from: the fingerprint the training writes into its metadata and
the train stage (:mod:`m3distill.stages.train`) compares with the one of the current dataset, cache and settings.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from m3distill.config import settings_record
from m3distill.fingerprint import CONTENTS, Fingerprint, flatten


def cache_identity(cache_manifest: Mapping[str, Any]) -> dict[str, Any]:
    """The parts that pin the teacher embeddings in a finished cache: the teacher that made them (its files, not
    where they lay) and the storage dtype."""
    fingerprint = dict(cache_manifest.get("teacher") or {})
    if fingerprint.get("files_sha256"):
        fingerprint.pop("name", None)
    parts = {f"teacher.{key}": value for key, value in fingerprint.items()}
    if "files_sha256" in fingerprint:
        parts["teacher.files" + CONTENTS] = parts.pop("teacher.files_sha256")
    parts["teacher.dtype"] = cache_manifest.get("dtype")
    # bf16/fp16 teacher embeddings are other targets; fp32 caches (all caches before the precision field) add nothing.
    if cache_manifest.get("precision", "fp32") != "fp32":
        parts["teacher.precision"] = cache_manifest["precision"]
    return parts


# Settings that change where or how fast a student trains, not what it learns.
_TRAINING_LOGISTICS = ("device", "keep_checkpoints", "save_total_limit", "save_steps", "dev_max_tokens_per_batch")
# Settings added after students were first fingerprinted, with the value that leaves training as it was before
# them: while they hold it, they stay out of the fingerprint, so students trained before them stay current.
_ADDED_NEUTRAL = {"context_share": None}


def neutral_added_settings(training: Any) -> set[str]:
    """The settings of ``training`` added since the first fingerprints that hold the value that changes nothing."""
    return {name for name, value in _ADDED_NEUTRAL.items() if getattr(training, name, value) == value}


def training_identity(training: Any) -> dict[str, Any]:
    """The training settings that decide what a student learns, as its fingerprint holds them: the logistics and
    the neutral added settings (:func:`neutral_added_settings`) left out."""
    return settings_record(training, exclude=set(_TRAINING_LOGISTICS) | neutral_added_settings(training))


def student_fingerprint(dataset: str | None, cache_manifest: Mapping[str, Any], training: Any,
                        plan: Mapping[str, Any], teacher_heads: str | None = None) -> Fingerprint:
    """What a trained student is made from: the dataset, the teacher cache, the training settings and its plan.

    Args:
        dataset: :func:`~m3distill.data.dataset.dataset_fingerprint` of the dataset it trains on.
        cache_manifest: the teacher cache's manifest (:meth:`~m3distill.teacher.cache.TeacherCache.read_manifest`).
        training: the :class:`~m3distill.config.TrainingConfig`.
        plan: :func:`plan_spec` of the student.
        teacher_heads: :func:`m3distill.m3.head_files_sha256` of an M3 teacher (``None`` for a dense-only one):
            its students are trained against those heads, which the cache does not cover.
    """
    settings = training_identity(training)
    heads = {} if teacher_heads is None else {"teacher.heads" + CONTENTS: teacher_heads}
    return Fingerprint({
        "dataset" + CONTENTS: dataset,
        **cache_identity(cache_manifest),
        **heads,
        **flatten("training", settings),
        **flatten("student", dict(plan)),
    })


def plan_spec(n_layers: int, strategy: str, layers: Any, students: Any) -> dict[str, Any]:
    """A student's plan as its fingerprint sees it: explicit layers, or the count and the strategy that picks them
    (plus the search settings for ``search``); the same whether read from the config or from a resolved plan."""
    spec: dict[str, Any] = {"n_layers": n_layers, "strategy": strategy,
                            "layers": list(layers) if strategy == "explicit" else None}
    if strategy == "search":
        spec.update(search_candidates=students.search_candidates, search_steps=students.search_steps,
                    search_dev_texts=students.search_dev_texts)
    # A trimmed vocabulary is part of what the student is; "full" adds nothing, so earlier students stay current.
    vocabulary = getattr(students, "vocabulary", "full")
    if vocabulary != "full":
        spec.update(vocabulary=vocabulary, vocabulary_budget=students.vocabulary_budget)
    return spec
