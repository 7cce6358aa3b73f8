"""``m3distill evaluate``: alignment, Qdrant retrieval, ground truth and speed of the teacher and its students.

:func:`evaluate_models` is the one entry point. It checks every input first (dataset, test split, k, model
folders, Qdrant connection), loads the models, encodes the test questions and the indexed contexts once per model,
then measures:

1. alignment of each student with the teacher (:mod:`m3distill.metrics`);
2. top-k retrieval with Qdrant for every model, P@k overlap for every pair of models and ground-truth
   Recall@k / MRR@10 / nDCG@10 (:mod:`m3distill.evaluation.retrieval`);
3. speed, size and memory (:mod:`m3distill.evaluation.speed`);

and writes the report (report.json, report.md, plots; see :mod:`m3distill.report`) into a folder beside
``OUT_DIR`` that replaces it in one rename once complete: a failed or killed evaluation leaves the previous report
whole. Embeddings are cached in ``OUT_DIR/.embeddings-cache`` while the evaluation runs, so an interrupted
evaluation resumes without re-encoding; the cache leaves with the old folder when the new report is swapped in.
``OUT_DIR`` must be new, empty, or a report folder m3distill wrote (report.json or the embeddings cache in it).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import itertools
import logging
import platform
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sentence_transformers import SentenceTransformer
from tqdm.auto import tqdm

from m3distill import __version__
from m3distill.atomic import atomic_dir, atomic_path
from m3distill.config import EvaluationConfig, TeacherConfig
from m3distill.data.dataset import SynthDataset, load_synth_dataset
from m3distill.errors import M3DistillError
from m3distill.evaluation.retrieval import (
    INDEX_KINDS,
    IndexKind,
    VectorSearchBackend,
    check_k_fits,
    make_search_backend,
    search_depth,
)
from m3distill.evaluation.speed import (
    device_description,
    measure_speed,
    size_on_disk,
    speed_texts,
)
from m3distill.layout import REPORT_JSON_FILE, SPLITS
from m3distill.metrics import (
    SIZE_ON_DISK,
    PAIRS_DESCRIPTION,
    SimilarityPairs,
    alignment_metrics,
    draw_similarity_pairs,
    ground_truth_metrics,
    hnsw_vs_exact_metric,
    overlap_metric,
    query_side_index,
    query_side_overlap_metric,
    top_k_overlap,
)
from m3distill.models import (
    load_sentence_transformer,
    num_layers,
    resolve_device,
)
from m3distill.report import (
    AlignmentPairsInfo,
    DatasetSummary,
    DeviceInfo,
    HnswSettings,
    ModelReport,
    PairReport,
    Report,
    RetrievalSettings,
    SpeedPolicy,
    write_report,
)

logger = logging.getLogger(__name__)

TEACHER_LABEL = "teacher"
IN_MEMORY_SOURCE = "(in memory)"
EMBEDDINGS_CACHE_DIRNAME = ".embeddings-cache"
_VERSIONED_PACKAGES = ("torch", "transformers", "sentence-transformers", "qdrant-edge-py", "qdrant-client",
                       "ir-measures", "numpy")


@dataclass(frozen=True)
class _TestData:
    """The texts the evaluation encodes: test questions first, then every indexed context."""

    questions: list[str]
    contexts: list[str]
    own_context: np.ndarray  # per question: its context's row in ``contexts``
    test_context_rows: np.ndarray  # rows of ``contexts`` that are test contexts
    summary: dict[str, Any]


def evaluate_models(
    dataset_dir: str | Path,
    teacher: TeacherConfig,
    student_dirs: Sequence[str | Path],
    config: EvaluationConfig,
    out_dir: str | Path,
    *,
    show_progress: bool = True,
    qdrant_client=None,
    teacher_embeddings: Callable[[list[str]], np.ndarray | None] | None = None,
    student_models: Mapping[str, SentenceTransformer] | None = None,
    teacher_model: SentenceTransformer | None = None,
) -> Report:
    """Evaluate the teacher and its students on a dataset's test split and write the report to ``out_dir``.

    Args:
        dataset_dir: a dataset directory written by ``m3distill synth`` (see :mod:`m3distill.data.dataset`).
        teacher: the teacher model settings (model, revision, trust_remote_code, max_seq_length).
        student_dirs: sentence-transformers folders of the students; each is named by its folder name.
        config: what to measure and how (k, index kinds, Qdrant, distractors, pairs, speed, device).
        out_dir: the report directory; report.json, report.md and the plots are written there.
        show_progress: show progress bars.
        qdrant_client: a ``QdrantClient`` to search with instead of qdrant-edge or ``config.qdrant_url``.
        teacher_embeddings: optional source of the teacher's embeddings (e.g. a lookup in the teacher cache),
            called once with the list of texts; it returns an array of shape (texts, dim) equal to what
            ``teacher.encode(texts)`` gives, or ``None`` to have the teacher encode them. Saves the most
            expensive encoding; the teacher is still loaded for the speed measurement.
        student_models: students held in memory, by name, evaluated after the folders of ``student_dirs``.
        teacher_model: the teacher held in memory, used instead of loading ``teacher.model``.

    Returns the :class:`~m3distill.report.Report` (report.json holds ``report.to_json_dict()``). Raises
    :class:`M3DistillError`, before any encoding, for an incomplete dataset, an empty test split, a k larger than
    the indexed contexts, a student folder that is not a sentence-transformers model, or an ``out_dir`` holding
    files that are not an m3distill report.
    """
    started = time.time()
    out_dir = Path(out_dir)
    _check_report_dir(out_dir)
    data = _load_test_data(dataset_dir, config)
    check_k_fits(config.k, len(data.contexts))
    student_dirs = [Path(path) for path in student_dirs]
    for path in student_dirs:
        if not path.is_dir():
            raise M3DistillError(f"student folder not found: {path} (train it with `m3distill train`)")
    labels = _model_labels(student_dirs)
    student_models = dict(student_models or {})
    for name in student_models:
        if name in labels:
            raise ValueError(f"the in-memory student {name!r} has the name of another model; give it another name")
        labels.append(name)
    device = resolve_device(config.device)
    backend = make_search_backend(config, client=qdrant_client)
    timings: dict[str, float] = {}
    cache_dir = out_dir / EMBEDDINGS_CACHE_DIRNAME

    with _timed(timings, "load"):
        models = {**_load_models(teacher, dict(zip(labels[1:], student_dirs)), device, teacher_model),
                  **student_models}
    with _timed(timings, "encode"):
        embeddings = _embed_all(models, data.questions + data.contexts, cache_dir, config.batch_size, show_progress,
                                teacher_embeddings)
    metrics: dict[str, dict[str, Any]] = {label: {} for label in labels}
    pairs = _measure_alignment(embeddings, data, config, metrics)
    with _timed(timings, "retrieval"):
        pair_reports, depth = _measure_retrieval(embeddings, data, config, backend, metrics, show_progress)
    del embeddings
    with _timed(timings, "speed"):
        layers = {label: _layers(model) for label, model in models.items()}
        timed_texts = _measure_speed(models, layers, data, config, metrics, show_progress)

    model_reports = []
    sources = [IN_MEMORY_SOURCE if teacher_model is not None else teacher.model, *map(str, student_dirs),
               *[IN_MEMORY_SOURCE] * len(student_models)]
    for (label, model), source in zip(models.items(), sources):
        metrics[label][SIZE_ON_DISK] = None if source == IN_MEMORY_SOURCE else size_on_disk(source)
        model_reports.append(_describe_model(label, source, model, layers[label], metrics[label]))
    report = Report(
        m3distill_version=__version__,
        started_at=_iso(started),
        finished_at=_iso(time.time()),
        duration_s=time.time() - started,
        timings_s=timings,
        config={"teacher": teacher.model_dump(mode="json"), "evaluation": config.model_dump(mode="json")},
        versions=_library_versions(),
        device=DeviceInfo(name=str(device), description=device_description(device),
                          torch_threads=torch.get_num_threads(), platform=platform.platform()),
        dataset=DatasetSummary(**data.summary),
        alignment_pairs=AlignmentPairsInfo(
            n_pairs=len(pairs),
            n_matching=int(pairs.matching.sum()),
            n_non_matching=int((~pairs.matching).sum()),
            negatives_per_question=config.negatives_per_question,
            seed=config.seed,
            description=PAIRS_DESCRIPTION.format(negatives=config.negatives_per_question, seed=config.seed),
        ),
        retrieval=RetrievalSettings(
            backend=backend.name,
            qdrant_url=config.qdrant_url if qdrant_client is None else "(injected client)",
            indexes=_index_kinds(config),
            k=list(config.k),
            depth=depth,
            n_questions=len(data.questions),
            n_contexts=len(data.contexts),
            distractors=config.distractors,
            hnsw=HnswSettings(m=config.hnsw_m, ef_construct=config.hnsw_ef_construct, ef=config.hnsw_ef),
        ),
        speed=SpeedPolicy(
            n_texts=len(timed_texts),
            batch_size=config.speed.batch_size,
            repeats=config.speed.repeats,
            warmup_batches=config.speed.warmup_batches,
            min_seconds_per_repeat=config.speed.min_seconds_per_repeat,
            order="interleaved",
        ),
        models=model_reports,
        pairs=pair_reports,
    )
    # The new report replaces the old folder (and its embeddings cache) only once every file is written.
    with atomic_dir(out_dir.absolute(), overwrite=True) as new_report_dir:
        write_report(report, new_report_dir)
    logger.info("evaluated %d models in %.1fs; report in %s", len(labels), report.duration_s, out_dir)
    return report


def _check_report_dir(out_dir: Path) -> None:
    """Refuse an ``out_dir`` the new report may not replace: anything but a new, empty or m3distill report folder."""
    if not out_dir.exists():
        return
    if out_dir.is_dir():
        if (out_dir / REPORT_JSON_FILE).is_file() or (out_dir / EMBEDDINGS_CACHE_DIRNAME).is_dir():
            return
        if not any(out_dir.iterdir()):
            return
    raise M3DistillError(
        f"{out_dir} is not an m3distill report folder (no {REPORT_JSON_FILE}) and is not empty; the report replaces "
        "its folder, so choose another --out, or empty it yourself"
    )


def _load_models(teacher: TeacherConfig, students: dict[str, Path], device: str,
                 teacher_model: SentenceTransformer | None = None) -> dict[str, SentenceTransformer]:
    """The teacher and the students by label, teacher first."""
    loaded = {}
    # Students first: they are small, and a bad folder should fail before the big teacher is loaded.
    for label, path in students.items():
        loaded[label] = load_sentence_transformer(path, device=device)
    if teacher_model is not None:
        return {TEACHER_LABEL: teacher_model, **loaded}
    teacher_model = load_sentence_transformer(
        teacher.model, revision=teacher.revision, trust_remote_code=teacher.trust_remote_code, device=device,
        max_seq_length=teacher.max_seq_length,
    )
    return {TEACHER_LABEL: teacher_model, **loaded}


def _embed_all(
    models: dict[str, SentenceTransformer],
    texts: list[str],
    cache_dir: Path,
    batch_size: int,
    show_progress: bool,
    teacher_embeddings: Callable[[list[str]], np.ndarray | None] | None,
) -> dict[str, np.ndarray]:
    """Every model's embeddings of ``texts`` (questions, then contexts), encoded once per model."""
    embeddings = {}
    for label, model in models.items():
        provided = teacher_embeddings(texts) if label == TEACHER_LABEL and teacher_embeddings is not None else None
        if provided is None:
            embeddings[label] = _encode_cached(model, texts, cache_dir, label, batch_size, show_progress)
            continue
        provided = np.asarray(provided, dtype=np.float32)
        if provided.shape != (len(texts), model.get_embedding_dimension()):
            raise ValueError(f"teacher_embeddings returned shape {provided.shape}; expected "
                             f"({len(texts)}, {model.get_embedding_dimension()})")
        logger.info("teacher: using %d provided embeddings", len(texts))
        embeddings[label] = provided
    return embeddings


def _measure_alignment(embeddings: dict[str, np.ndarray], data: _TestData, config: EvaluationConfig,
                       metrics: dict[str, dict[str, Any]]) -> SimilarityPairs:
    """Add each student's alignment metrics to ``metrics``; returns the pairs the correlations used."""
    n_questions = len(data.questions)
    pairs = draw_similarity_pairs(
        question_rows=np.arange(n_questions),
        own_context_rows=n_questions + data.own_context,
        context_rows=n_questions + data.test_context_rows,
        negatives_per_question=config.negatives_per_question,
        seed=config.seed,
    )
    test_text_rows = np.concatenate([np.arange(n_questions), n_questions + data.test_context_rows])
    for label, student in embeddings.items():
        if label != TEACHER_LABEL:
            metrics[label].update(
                alignment_metrics(student, embeddings[TEACHER_LABEL], pairs, text_rows=test_text_rows)
            )
    return pairs


def _measure_retrieval(
    embeddings: dict[str, np.ndarray],
    data: _TestData,
    config: EvaluationConfig,
    backend: VectorSearchBackend,
    metrics: dict[str, dict[str, Any]],
    show_progress: bool,
) -> tuple[list[PairReport], int]:
    """Add each model's ground-truth (and HNSW recall) metrics to ``metrics``; returns the pair reports and depth."""
    n_questions = len(data.questions)
    indexes = _index_kinds(config)
    depth = search_depth(config.k, len(data.contexts))
    tops: dict[str, dict[str, np.ndarray]] = {}
    for label in tqdm(list(embeddings), desc="Qdrant top-k", unit="model", disable=not show_progress):
        found = backend.search(label, embeddings[label][n_questions:], embeddings[label][:n_questions], depth, indexes)
        tops[label] = found
        for index in indexes:
            metrics[label].update(ground_truth_metrics(found[index], data.own_context, config.k, index))
        if "exact" in found and "hnsw" in found:
            for k in config.k:
                metrics[label][hnsw_vs_exact_metric(k)] = top_k_overlap(found["hnsw"], found["exact"], k)
    _measure_query_side(embeddings, data, config, backend, tops, depth, metrics)
    pair_reports = [
        PairReport(a=a, b=b, metrics={overlap_metric(index, k): top_k_overlap(tops[a][index], tops[b][index], k)
                                      for index in indexes for k in config.k})
        for a, b in itertools.combinations(tops, 2)
    ]
    return pair_reports, depth


def _measure_query_side(
    embeddings: dict[str, np.ndarray],
    data: _TestData,
    config: EvaluationConfig,
    backend: VectorSearchBackend,
    tops: dict[str, dict[str, np.ndarray]],
    depth: int,
    metrics: dict[str, dict[str, Any]],
) -> None:
    """The query-side stand-in: each student's questions searched (exact) in the teacher's index of the contexts.

    A user with a collection the teacher already encoded can keep it and encode only the questions with a
    student; these figures say what that gives. Students of another embedding width than the teacher's are skipped.
    """
    n_questions = len(data.questions)
    teacher = embeddings[TEACHER_LABEL]
    # The teacher's own exact top-k is the reference (its HNSW top-k when only HNSW ran).
    reference = tops[TEACHER_LABEL].get("exact", next(iter(tops[TEACHER_LABEL].values())))
    for label, student in embeddings.items():
        if label == TEACHER_LABEL or student.shape[1] != teacher.shape[1]:
            continue
        found = backend.search(f"{label}-in-teacher", teacher[n_questions:], student[:n_questions], depth, ["exact"])
        metrics[label].update(ground_truth_metrics(found["exact"], data.own_context, config.k,
                                                   query_side_index("exact")))
        for k in config.k:
            metrics[label][query_side_overlap_metric("exact", k)] = top_k_overlap(found["exact"], reference, k)


def _measure_speed(models: dict[str, SentenceTransformer], layers: dict[str, int | None], data: _TestData,
                   config: EvaluationConfig, metrics: dict[str, dict[str, Any]], show_progress: bool) -> list[str]:
    """Add each model's speed metrics (and speed-up over the teacher) to ``metrics``; returns the timed texts."""
    test_texts = data.questions + [data.contexts[row] for row in data.test_context_rows]
    timed_texts = speed_texts(test_texts, config.speed.n_texts)
    measured = measure_speed(models, timed_texts, config.speed, teacher=TEACHER_LABEL, layers=layers,
                             show_progress=show_progress)
    for label, figures in measured.items():
        metrics[label].update(figures)
    return timed_texts


def _index_kinds(config: EvaluationConfig) -> list[IndexKind]:
    return [index for index in INDEX_KINDS if index in config.index]


@contextmanager
def _timed(timings: dict[str, float], phase: str) -> Iterator[None]:
    started = time.perf_counter()
    yield
    timings[phase] = time.perf_counter() - started


def _load_test_data(dataset_dir: str | Path, config: EvaluationConfig) -> _TestData:
    dataset: SynthDataset = load_synth_dataset(dataset_dir)
    contexts = dataset.contexts.drop_duplicates("context_id").reset_index(drop=True)
    if config.distractors == "test":
        contexts = contexts[contexts["split"] == "test"].reset_index(drop=True)
    questions = dataset.split_questions("test")
    test_contexts = contexts[contexts["split"] == "test"]
    if questions.empty or test_contexts.empty:
        raise M3DistillError(
            f"dataset {dataset.root} has an empty test split ({len(test_contexts)} test contexts, "
            f"{len(questions)} test questions); rebuild it with `m3distill synth` and synth.splits.test > 0"
        )
    row_of = {context_id: row for row, context_id in enumerate(contexts["context_id"])}
    known = questions["context_id"].isin(set(test_contexts["context_id"]))
    if not known.all():
        logger.warning("%d test questions point to no test context and are left out", int((~known).sum()))
        questions = questions[known].reset_index(drop=True)
    scalar_manifest = {
        key: value
        for key, value in dataset.manifest.items()
        if isinstance(value, (str, int, float, bool)) or value is None
    }
    summary = {
        "path": str(Path(dataset_dir).resolve()),
        "manifest": scalar_manifest,
        "contexts_per_split": {split: int((dataset.contexts["split"] == split).sum()) for split in SPLITS},
        "questions_per_split": {split: int((dataset.questions["split"] == split).sum()) for split in SPLITS},
        "test_questions": len(questions),
        "test_contexts": len(test_contexts),
        "indexed_contexts": len(contexts),
        "test_languages": {str(k): int(v) for k, v in test_contexts["language"].value_counts().sort_index().items()},
    }
    return _TestData(
        questions=questions["text"].tolist(),
        contexts=contexts["text"].tolist(),
        own_context=np.array([row_of[context_id] for context_id in questions["context_id"]], dtype=np.int64),
        test_context_rows=np.array(test_contexts.index.to_numpy(), dtype=np.int64),
        summary=summary,
    )


def _model_labels(student_dirs: Sequence[Path]) -> list[str]:
    labels = [TEACHER_LABEL]
    for path in student_dirs:
        base = path.resolve().name or "student"
        label, number = base, 2
        while label in labels:
            label, number = f"{base}-{number}", number + 1
        labels.append(label)
    return labels


def _encode_cached(
    model: SentenceTransformer, texts: list[str], cache_dir: Path, label: str, batch_size: int, show_progress: bool
) -> np.ndarray:
    """Embeddings of ``texts``, from the cache when this model already encoded exactly these texts."""
    cache_file = cache_dir / f"{label}-{_fingerprint(model, texts)}.npy"
    if cache_file.is_file():
        logger.info("%s: reusing embeddings from %s", label, cache_file)
        return np.load(cache_file)
    logger.info("%s: encoding %d texts", label, len(texts))
    embeddings = model.encode(texts, batch_size=batch_size, show_progress_bar=show_progress, convert_to_numpy=True)
    embeddings = np.asarray(embeddings, dtype=np.float32)
    with atomic_path(cache_file) as tmp, open(tmp, "wb") as handle:
        np.save(handle, embeddings)
    return embeddings


def _fingerprint(model: SentenceTransformer, texts: list[str]) -> str:
    # The weights' checksum would be exact but slow for big models; the parameter bytes of a few tensors plus
    # shapes catch every realistic change (retraining, another layer plan) cheaply.
    digest = hashlib.sha256()
    digest.update(f"{model.max_seq_length}|{model.get_embedding_dimension()}".encode())
    parameters = list(model.parameters())
    for parameter in parameters[:: max(1, len(parameters) // 8)]:
        digest.update(str(tuple(parameter.shape)).encode())
        digest.update(parameter.detach().flatten()[:4096].float().cpu().numpy().tobytes())
    for text in texts:
        digest.update(text.encode("utf-8", errors="surrogatepass"))
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def _layers(model: SentenceTransformer) -> int | None:
    try:
        return num_layers(model)
    except M3DistillError:
        return None


def _describe_model(label: str, source: str, model: SentenceTransformer, layers: int | None,
                    metrics: dict[str, Any]) -> ModelReport:
    return ModelReport(
        name=label,
        role="teacher" if label == TEACHER_LABEL else "student",
        source=str(Path(source).resolve()) if Path(source).exists() else source,
        layers=layers,
        embedding_dim=model.get_embedding_dimension(),
        max_seq_length=model.max_seq_length,
        metrics=metrics,
    )


def _library_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version(), "m3distill": __version__}
    for package in _VERSIONED_PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, tz=timezone.utc).isoformat(timespec="seconds")
