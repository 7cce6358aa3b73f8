"""``m3distill evaluate``: alignment, Qdrant retrieval, ground truth and speed of the teacher and its students.

:func:`evaluate_models` is the one entry point. It checks every input first (dataset, test split, k, model
folders, Qdrant connection), loads the models, encodes the test questions and the indexed contexts once per model,
then measures:

1. alignment of each student with the teacher (:mod:`m3distill.metrics`);
2. top-k retrieval with Qdrant for every model, P@k overlap for every pair of models and ground-truth
   Recall@k / MRR@10 / nDCG@10 (:mod:`m3distill.evaluation.retrieval`);
3. speed, size and memory (:mod:`m3distill.evaluation.speed`);

Every student folder with an ONNX export (``m3distill.exporting``; ``evaluation.onnx_variants``) adds a model per
exported variant, named by :func:`m3distill.report.variant_label` (``student-2L (onnx)``, ``student-2L (int8)``) and
run by onnxruntime's CPU provider (:mod:`m3distill.onnx_serving`) with as many threads as torch: encoded, searched
and timed like every model, so the report puts what exporting and quantizing cost (P@k with the teacher and with
the torch student, ground truth) beside what they gain (texts/s, speed-up, weights). The variants run on the CPU
whatever ``evaluation.device`` is; on another device their speed-up is left out (it would compare the hardware).
A variant is paired with the teacher, its torch student and that student's other variants only.

When the teacher is an **M3 model** (bge-m3's sparse and ColBERT head files beside it; see :mod:`m3distill.m3`),
every model with head files is encoded with all its outputs in one forward pass, and 1. and 2. cover the sparse,
ColBERT and hybrid outputs as well (exact search, metrics prefixed by the output's name). A student without head
files is evaluated on dense alone.

and writes the report (report.json, report.md, plots; see :mod:`m3distill.report`) into a folder beside
``OUT_DIR`` that replaces it in one rename once complete: a failed or killed evaluation leaves the previous report
whole. Embeddings are cached in ``OUT_DIR/.embeddings-cache`` while the evaluation runs
(:mod:`m3distill.evaluation.embeddings_cache`), so an interrupted evaluation resumes without re-encoding; the cache
leaves with the old folder when the new report is swapped in. ``OUT_DIR`` must be new, empty, or a report folder
m3distill wrote (report.json or the embeddings cache in it).

The phases, in order: check the inputs, load the models (:func:`_load`), encode (:func:`_encode`), align
(:func:`_measure_alignment`), search (:func:`_measure_retrieval` and the M3 outputs, real questions), time
(:func:`_measure_speed`), assemble the report (:func:`_assemble_report`) and write it.
"""

from __future__ import annotations

import importlib.metadata
import itertools
import logging
import platform
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sentence_transformers import SentenceTransformer
from tqdm.auto import tqdm

from m3distill._version import __version__
from m3distill.atomic import atomic_dir, disk_space_for, refuse_files_not_ours
from m3distill.config import EvaluationConfig, TeacherConfig, settings_record
from m3distill.data.dataset import SynthDataset, dataset_fingerprint, load_synth_dataset
from m3distill.errors import M3DistillError
from m3distill.evaluation.embeddings_cache import EmbeddingsCache
from m3distill.evaluation.onnx_variants import Variant, load_variants
from m3distill.evaluation.real_questions import RealQuestionSet, measure_real_questions, real_question_set
from m3distill.evaluation.retrieval import (
    INDEX_KINDS,
    IndexKind,
    VectorSearchBackend,
    check_k_fits,
    make_search_backend,
    search_depth,
)
from m3distill.evaluation.speed import (
    TimedModel,
    device_description,
    measure_speed,
    size_on_disk,
    speed_texts,
    timed_onnx_encoder,
    timed_sentence_transformer,
)
from m3distill.layout import (
    EMBEDDINGS_CACHE_DIRNAME,
    HEAD_FILES,
    REPORT_FILES,
    REPORT_JSON_FILE,
    SPLITS,
    folder_kind,
)
from m3distill.m3 import DENSE, M3_OUTPUTS, M3Embeddings, M3Heads, load_m3_heads
from m3distill.metrics import (
    M3_OVERLAP_SHORT_LISTS,
    M3_RETRIEVAL_OUTPUTS,
    PAIRS_DESCRIPTION,
    SIZE_ON_DISK,
    SimilarityPairs,
    alignment_metrics,
    colbert_alignment_metrics,
    draw_similarity_pairs,
    ground_truth_metrics,
    hnsw_vs_exact_metric,
    output_prefix,
    overlap_metric,
    query_side_index,
    query_side_overlap_metric,
    sparse_alignment_metrics,
    top_k_overlap,
)
from m3distill.models import (
    count_embedding_parameters,
    count_parameters,
    load_sentence_transformer,
    load_teacher,
    local_model_folder,
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
    RealQuestionsInfo,
    Report,
    RetrievalSettings,
    SpeedPolicy,
    write_report,
)
from m3distill.students.folder import learnt_test_contexts
from m3distill.m3_outputs import read_vocabulary_map
from m3distill.students.vocabulary import tokenization_changes

logger = logging.getLogger(__name__)

TEACHER_LABEL = "teacher"
IN_MEMORY_SOURCE = "(in memory)"
_VERSIONED_PACKAGES = ("torch", "transformers", "sentence-transformers", "qdrant-edge-py", "qdrant-client",
                       "ir-measures", "numpy", "onnxruntime")


@dataclass(frozen=True)
class InMemory:
    """What the caller already holds, used instead of what the evaluation would load or encode.

    Attributes:
        teacher: the teacher held in memory, used instead of loading ``teacher.model``.
        teacher_heads: the in-memory teacher's M3 heads (sparse and ColBERT), making it an M3 teacher; without
            ``teacher`` the heads are read from the teacher's folder when it has head files.
        students: students held in memory, by name, evaluated after the student folders.
        teacher_embeddings: a source of the teacher's embeddings (e.g. a lookup in the teacher cache), called once
            with the list of texts; it returns an array of shape (texts, dim) equal to what ``teacher.encode(texts)``
            gives, or ``None`` to have the teacher encode them. Saves the most expensive encoding; the teacher is
            still loaded for the speed measurement.
    """

    teacher: SentenceTransformer | None = None
    teacher_heads: M3Heads | None = None
    students: Mapping[str, SentenceTransformer] = field(default_factory=dict)
    teacher_embeddings: Callable[[list[str]], np.ndarray | None] | None = None


@dataclass(frozen=True)
class _TestData:
    """The texts the evaluation encodes: test questions first, then every indexed context."""

    questions: list[str]
    contexts: list[str]
    own_context: np.ndarray  # per question: its context's row in ``contexts``
    test_context_rows: np.ndarray  # rows of ``contexts`` that are test contexts
    summary: dict[str, Any]
    context_docs: list[str]  # the document id of each context


@dataclass(frozen=True)
class _Inputs:
    """What the evaluation reads, checked before any model is loaded."""

    data: _TestData
    real: RealQuestionSet | None
    folders: dict[str, Path]  # the student folders by label, in order


@dataclass(frozen=True)
class _Models:
    """The evaluated models, loaded: every label in report order (each ONNX variant right after its torch student),
    the torch models (teacher first), their M3 heads, the variants, and where each torch model came from."""

    labels: list[str]
    torch: dict[str, SentenceTransformer]
    heads: dict[str, M3Heads | None]
    variants: dict[str, Variant]
    sources: dict[str, str]

    @property
    def m3_teacher(self) -> bool:
        """Whether the teacher is an M3 model: then every model with the heads is searched and timed on all three
        outputs, its exports included."""
        return self.heads.get(TEACHER_LABEL) is not None

    @property
    def variant_of(self) -> dict[str, str]:
        return {label: variant.student for label, variant in self.variants.items()}

    def layers(self) -> dict[str, int | None]:
        layers = {label: _layers(model) for label, model in self.torch.items()}
        layers.update({label: layers[variant.student] for label, variant in self.variants.items()})
        return layers


@dataclass
class _Measured:
    """What the measurements gave: every model's metrics by label, and what the report says of how."""

    metrics: dict[str, dict[str, Any]]
    pairs: SimilarityPairs | None = None
    pair_reports: list[PairReport] = field(default_factory=list)
    depth: int = 0
    outputs: list[str] = field(default_factory=lambda: [DENSE])
    real_questions: RealQuestionsInfo | None = None
    timed_texts: list[str] = field(default_factory=list)
    layers: dict[str, int | None] = field(default_factory=dict)


def evaluate_models(
    dataset_dir: str | Path,
    teacher: TeacherConfig,
    student_dirs: Sequence[str | Path],
    config: EvaluationConfig,
    out_dir: str | Path,
    *,
    show_progress: bool = True,
    qdrant_client=None,
    in_memory: InMemory | None = None,
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
        in_memory: models and teacher embeddings held in memory (:class:`InMemory`).

    Returns the :class:`~m3distill.report.Report` (report.json holds ``report.to_json_dict()``). Raises
    :class:`M3DistillError`, before any encoding, for an incomplete dataset, an empty test split, a k larger than
    the indexed contexts, a student folder that is not a sentence-transformers model, or an ``out_dir`` holding
    files that are not an m3distill report.
    """
    started = time.time()
    out_dir, in_memory = Path(out_dir), in_memory or InMemory()
    inputs = _check_inputs(dataset_dir, student_dirs, config, out_dir, in_memory)
    device = resolve_device(config.device)
    backend = make_search_backend(config, client=qdrant_client)
    if in_memory.teacher_heads is not None and in_memory.teacher is None:
        raise ValueError("teacher_heads needs teacher_model; a teacher loaded from its folder brings its own heads")
    timings: dict[str, float] = {}
    with _timed(timings, "load"):
        models = _load(teacher, inputs.folders, in_memory, device, onnx_variants=config.onnx_variants)
    cache = EmbeddingsCache(out_dir / EMBEDDINGS_CACHE_DIRNAME, batch_size=config.batch_size,
                            show_progress=show_progress)
    with disk_space_for(out_dir, _bytes_needed(models, inputs.data)), _timed(timings, "encode"):
        embeddings = _encode(models, inputs.data.questions + inputs.data.contexts, cache, in_memory.teacher_embeddings)
        real_embeddings = _encode_real_questions(inputs.real, models, cache)
    measured = _measure(models, embeddings, real_embeddings, inputs, config, backend, timings, show_progress)
    report = _assemble_report(
        models, measured, inputs.data, _ReportSettings(teacher, config, backend.name, qdrant_client is not None,
                                                       device, started, timings, dataset_fingerprint(dataset_dir)))
    # The new report replaces the old folder (and its embeddings cache) only once every file is written.
    with disk_space_for(out_dir, 2_000_000), atomic_dir(out_dir.absolute(), overwrite=True,
                                                        ours=REPORT_FILES) as new_report_dir:
        write_report(report, new_report_dir)
    logger.info("evaluated %d models in %.1fs; report in %s", len(models.labels), report.duration_s, out_dir)
    return report


def _check_inputs(dataset_dir: str | Path, student_dirs: Sequence[str | Path], config: EvaluationConfig,
                  out_dir: Path, in_memory: InMemory) -> _Inputs:
    """The test data, the real questions and the student folders by label, once each is checked (and the report
    folder may be replaced); raises before anything is loaded."""
    _check_report_dir(out_dir)
    data = _load_test_data(dataset_dir, config)
    check_k_fits(config.k, len(data.contexts))
    real = real_question_set(config.real_questions, data.context_docs) if config.real_questions else None
    folders = [Path(path) for path in student_dirs]
    for path in folders:
        if not path.is_dir():
            raise M3DistillError(f"student folder not found: {path} (train it with `m3distill train`)")
    labels = _model_labels(folders)
    for name in in_memory.students:
        if name in labels:
            raise ValueError(f"the in-memory student {name!r} has the name of another model; give it another name")
        labels.append(name)
    return _Inputs(data=data, real=real, folders=dict(zip(labels[1:], folders)))


def _load(teacher: TeacherConfig, folders: dict[str, Path], in_memory: InMemory, device: str, *,
          onnx_variants: bool) -> _Models:
    """The load phase: the teacher and the students (from their folders or memory), their M3 heads and the
    students' ONNX variants."""
    loaded = {}
    # Students first: they are small, and a bad folder should fail before the big teacher is loaded.
    for label, path in folders.items():
        loaded[label] = load_sentence_transformer(path, device=device)
    teacher_model = in_memory.teacher if in_memory.teacher is not None else load_teacher(teacher, device=device)
    models = {TEACHER_LABEL: teacher_model, **loaded, **in_memory.students}
    heads = _load_heads(models, teacher, folders, in_memory)
    variants = load_variants(folders, models, device) if onnx_variants else {}
    for label, variant in variants.items():
        if label in models:
            raise ValueError(f"{variant.student}'s {variant.variant} export would be named {label!r}, the name of "
                             "another model; give that model another name")
    # Each variant follows its torch student, in the tables as in the speed turns.
    labels = [name for label in models
              for name in [label, *[own for own, variant in variants.items() if variant.student == label]]]
    sources = {TEACHER_LABEL: IN_MEMORY_SOURCE if in_memory.teacher is not None else teacher.model,
               **{label: str(path) for label, path in folders.items()},
               **dict.fromkeys(in_memory.students, IN_MEMORY_SOURCE)}
    return _Models(labels=labels, torch=models, heads=heads, variants=variants, sources=sources)


def _bytes_needed(models: _Models, data: _TestData) -> int:
    """About what the evaluation keeps in the report folder: the embeddings until the report is written (float32;
    an M3 model's sparse and ColBERT outputs come on top), then the report itself (a few plots)."""
    texts = len(data.questions) + len(data.contexts)
    widths = sum(int(model.get_embedding_dimension()) for model in models.torch.values())
    return int(4 * texts * widths * (1 + len(models.variants) / max(len(models.torch), 1)) + 2_000_000)


def _encode(models: _Models, texts: list[str], cache: EmbeddingsCache,
            teacher_embeddings: Callable[[list[str]], np.ndarray | None] | None) -> dict[str, M3Embeddings]:
    """The encode phase: every model's embeddings of ``texts`` (questions, then contexts), all its outputs from one
    encoding, in report order."""
    embeddings = {}
    for label, model in models.torch.items():
        provided = teacher_embeddings(texts) if label == TEACHER_LABEL and teacher_embeddings is not None else None
        if provided is not None:
            provided = np.asarray(provided, dtype=np.float32)
            if provided.shape != (len(texts), model.get_embedding_dimension()):
                raise ValueError(f"teacher_embeddings returned shape {provided.shape}; expected "
                                 f"({len(texts)}, {model.get_embedding_dimension()})")
            logger.info("teacher: using %d provided embeddings", len(texts))
            if models.heads[label] is None:
                embeddings[label] = M3Embeddings(dense=provided)
                continue
        found = cache.model(label, model, models.heads[label], texts)
        if provided is not None:
            # The sparse and ColBERT outputs need the encoding; dense stays the provided one (the teacher cache's).
            found.dense = provided
        embeddings[label] = found
    embeddings.update({label: cache.variant(label, variant, texts, m3=models.m3_teacher)
                       for label, variant in models.variants.items()})
    return {label: embeddings[label] for label in models.labels}


def _encode_real_questions(real: RealQuestionSet | None, models: _Models,
                           cache: EmbeddingsCache) -> dict[str, np.ndarray]:
    """Every model's dense embeddings of the real questions (their other outputs are not searched)."""
    if real is None:
        return {}
    found = {label: cache.model(f"{label}-real-questions", model, None, real.texts).dense
             for label, model in models.torch.items()}
    found.update({label: cache.variant(f"{label}-real-questions", variant, real.texts, m3=False).dense
                  for label, variant in models.variants.items()})
    return found


def _measure(models: _Models, embeddings: dict[str, M3Embeddings], real_embeddings: dict[str, np.ndarray],
             inputs: _Inputs, config: EvaluationConfig, backend: VectorSearchBackend, timings: dict[str, float],
             show_progress: bool) -> _Measured:
    """Align, search (every model's dense output, the real questions, the M3 outputs), then time the models."""
    data = inputs.data
    measured = _Measured(metrics={label: {} for label in models.labels})
    measured.pairs = _measure_alignment(embeddings, data, config, measured.metrics)
    with _timed(timings, "retrieval"):
        measured.pair_reports, measured.depth = _measure_retrieval(
            embeddings, data, config, backend, measured.metrics, show_progress, models.variant_of)
    if inputs.real is not None:
        with _timed(timings, "real_questions"):
            n_questions = len(data.questions)
            measured.real_questions = measure_real_questions(
                {label: real_embeddings[label] for label in models.labels},
                {label: embeddings[label].dense[n_questions:] for label in models.labels}, inputs.real, config.k,
                backend, measured.metrics, TEACHER_LABEL)
    if models.m3_teacher:
        measured.outputs += list(M3_RETRIEVAL_OUTPUTS)
        with _timed(timings, "retrieval_m3"):
            _measure_m3_retrieval(embeddings, data, config, backend, measured.metrics, measured.pair_reports,
                                  measured.depth, show_progress)
    embeddings.clear()  # the speed measurement wants the memory
    with _timed(timings, "speed"):
        measured.layers = models.layers()
        timed: dict[str, SentenceTransformer | TimedModel] = {
            label: timed_onnx_encoder(models.variants[label].encoder, all_outputs=models.m3_teacher,
                                      parameters=count_parameters(models.torch[models.variants[label].student]))
            if label in models.variants else
            timed_sentence_transformer(models.torch[label], heads=models.heads[label])
            if models.heads.get(label) is not None else models.torch[label]
            for label in models.labels
        }
        measured.timed_texts = _measure_speed(timed, measured.layers, data, config, measured.metrics, show_progress)
    return measured


@dataclass(frozen=True)
class _ReportSettings:
    """How the evaluation ran, as the report records it."""

    teacher: TeacherConfig
    config: EvaluationConfig
    backend: str
    injected_client: bool
    device: str
    started: float
    timings: dict[str, float]
    dataset_digest: str | None


def _assemble_report(models: _Models, measured: _Measured, data: _TestData, run: _ReportSettings) -> Report:
    """The report: every model's entry and metrics, and how they were measured."""
    config, pairs = run.config, measured.pairs
    return Report(
        m3distill_version=__version__,
        started_at=_iso(run.started),
        finished_at=_iso(time.time()),
        duration_s=time.time() - run.started,
        timings_s=run.timings,
        config={"teacher": settings_record(run.teacher), "evaluation": settings_record(config)},
        versions=_library_versions(),
        device=DeviceInfo(name=str(run.device), description=device_description(run.device),
                          torch_threads=torch.get_num_threads(), platform=platform.platform()),
        dataset=DatasetSummary(**data.summary),
        alignment_pairs=AlignmentPairsInfo(
            n_pairs=len(pairs), n_matching=int(pairs.matching.sum()), n_non_matching=int((~pairs.matching).sum()),
            negatives_per_question=config.negatives_per_question, seed=config.seed,
            description=PAIRS_DESCRIPTION.format(negatives=config.negatives_per_question, seed=config.seed),
        ),
        retrieval=RetrievalSettings(
            backend=run.backend,
            qdrant_url=settings_record(config)["qdrant_url"] if not run.injected_client else "(injected client)",
            indexes=_index_kinds(config), k=list(config.k), depth=measured.depth, n_questions=len(data.questions),
            n_contexts=len(data.contexts), distractors=config.distractors,
            hnsw=HnswSettings(m=config.hnsw_m, ef_construct=config.hnsw_ef_construct, ef=config.hnsw_ef),
            outputs=measured.outputs,
            hybrid_weights=tuple(config.hybrid_weights) if len(measured.outputs) > 1 else None,
        ),
        speed=SpeedPolicy(
            n_texts=len(measured.timed_texts), batch_size=config.speed.batch_size, repeats=config.speed.repeats,
            warmup_batches=config.speed.warmup_batches, min_seconds_per_repeat=config.speed.min_seconds_per_repeat,
            order="interleaved",
        ),
        models=_model_reports(models, measured, run.device, run.dataset_digest, data.questions),
        pairs=measured.pair_reports,
        real_questions=measured.real_questions,
    )


def _model_reports(models: _Models, measured: _Measured, device: str, dataset_digest: str | None,
                   questions: Sequence[str]) -> list[ModelReport]:
    """Each model's entry in the report, with its size on disk added to its metrics."""
    reports = []
    teacher = models.torch[TEACHER_LABEL]
    for label in models.labels:
        metrics, layers = measured.metrics[label], measured.layers[label]
        if label in models.variants:
            metrics[SIZE_ON_DISK] = models.variants[label].encoder.weights_bytes  # the .onnx file(s)
            reports.append(models.variants[label].describe(label, layers, metrics))
            continue
        source = models.sources[label]
        metrics[SIZE_ON_DISK] = None if source == IN_MEMORY_SOURCE else size_on_disk(source)
        report = _describe_model(label, source, models.torch[label], layers, metrics, device, dataset_digest)
        report.vocabulary = _vocabulary(models.torch[label], source, teacher, questions)
        reports.append(report)
    return reports


def _vocabulary(model: SentenceTransformer, source: str, teacher: SentenceTransformer,
                questions: Sequence[str]) -> dict[str, Any] | None:
    """A torch model's vocabulary entry in the report (see :class:`ModelReport`)."""
    try:
        embeddings = count_embedding_parameters(model)
    except M3DistillError:
        return None
    trimmed = read_vocabulary_map(source) if source != IN_MEMORY_SOURCE else None
    teacher_ids = trimmed["teacher_ids"] if trimmed is not None else None
    record = {"mode": trimmed.get("mode", "trimmed") if trimmed else "full", "size": len(model.tokenizer),
              "teacher_size": len(teacher.tokenizer), "embedding_parameters": embeddings,
              "other_parameters": count_parameters(model) - embeddings}
    if model is not teacher:
        record.update(tokenization_changes(teacher.tokenizer, model.tokenizer, teacher_ids, questions))
    return record


def _check_report_dir(out_dir: Path) -> None:
    """Refuse an ``out_dir`` the new report may not replace: anything but a new, empty or m3distill report folder,
    and a report folder holding files m3distill did not write (named)."""
    if not out_dir.exists():
        return
    if out_dir.is_dir():
        if (out_dir / REPORT_JSON_FILE).is_file() or (out_dir / EMBEDDINGS_CACHE_DIRNAME).is_dir():
            refuse_files_not_ours(out_dir, REPORT_FILES, replacing="writing the new report")
            return
        if not any(out_dir.iterdir()):
            return
    kind = folder_kind(out_dir)
    raise M3DistillError(
        f"{out_dir} is not an m3distill report folder (no {REPORT_JSON_FILE}) and is not empty"
        f"{f' (it is {kind})' if kind else ''}; the report replaces its folder, so choose another --out, or empty it "
        "yourself"
    )


def _load_heads(models: dict[str, SentenceTransformer], teacher: TeacherConfig, student_folders: dict[str, Path],
                in_memory: InMemory) -> dict[str, M3Heads | None]:
    """Each model's M3 heads by label: ``None`` for a dense-only model, and for every model of a dense-only teacher.

    The teacher's come from ``teacher_heads`` (in memory) or its folder; a student's from its folder. A student of
    an M3 teacher without head files (or held in memory) is evaluated on dense alone, with a warning.
    """
    if in_memory.teacher is not None:
        found = in_memory.teacher_heads
    else:
        found = load_m3_heads(models[TEACHER_LABEL], local_model_folder(teacher.model, teacher.revision))
    heads: dict[str, M3Heads | None] = {label: None for label in models}
    if found is None:
        return heads
    heads[TEACHER_LABEL] = found
    logger.info("the teacher is an M3 model: evaluating its dense, sparse and ColBERT outputs")
    for label, model in models.items():
        if label == TEACHER_LABEL:
            continue
        heads[label] = load_m3_heads(model, student_folders[label]) if label in student_folders else None
        if heads[label] is None:
            logger.warning("%s has no M3 head files (%s): evaluated on its dense output alone", label,
                           " and ".join(HEAD_FILES))
    return heads


def _measure_alignment(embeddings: dict[str, M3Embeddings], data: _TestData, config: EvaluationConfig,
                       metrics: dict[str, dict[str, Any]]) -> SimilarityPairs:
    """Add each student's alignment metrics to ``metrics``; returns the pairs the correlations used.

    Students that share the teacher's M3 outputs get the sparse and ColBERT alignment too, on the same texts and
    pairs as dense.
    """
    n_questions = len(data.questions)
    pairs = draw_similarity_pairs(
        question_rows=np.arange(n_questions),
        own_context_rows=n_questions + data.own_context,
        context_rows=n_questions + data.test_context_rows,
        negatives_per_question=config.negatives_per_question,
        seed=config.seed,
    )
    test_text_rows = np.concatenate([np.arange(n_questions), n_questions + data.test_context_rows])
    teacher = embeddings[TEACHER_LABEL]
    for label, student in embeddings.items():
        if label == TEACHER_LABEL:
            continue
        metrics[label].update(alignment_metrics(student.dense, teacher.dense, pairs, text_rows=test_text_rows))
        if _has_m3_outputs(student) and _has_m3_outputs(teacher):
            metrics[label].update(sparse_alignment_metrics([student.sparse[row] for row in test_text_rows],
                                                           [teacher.sparse[row] for row in test_text_rows]))
            metrics[label].update(colbert_alignment_metrics(student.colbert, teacher.colbert, pairs,
                                                            text_rows=test_text_rows))
    return pairs


def _measure_retrieval(
    embeddings: dict[str, M3Embeddings],
    data: _TestData,
    config: EvaluationConfig,
    backend: VectorSearchBackend,
    metrics: dict[str, dict[str, Any]],
    show_progress: bool,
    variant_of: Mapping[str, str] | None = None,
) -> tuple[list[PairReport], int]:
    """Add each model's ground-truth (and HNSW recall) metrics to ``metrics``; returns the pair reports and depth.

    ``variant_of`` maps each ONNX variant to its torch student: a variant is paired with the teacher, that student
    and its other variants only (its overlap with other students says nothing its student's does not).
    """
    n_questions = len(data.questions)
    indexes = _index_kinds(config)
    depth = search_depth(config.k, len(data.contexts))
    tops: dict[str, dict[str, np.ndarray]] = {}
    for label in tqdm(list(embeddings), desc="Qdrant top-k", unit="model", disable=not show_progress):
        dense = embeddings[label].dense
        found = backend.search(label, dense[n_questions:], dense[:n_questions], depth, indexes)
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
        for a, b in itertools.combinations(tops, 2) if _compared(a, b, variant_of or {})
    ]
    return pair_reports, depth


def _compared(a: str, b: str, variant_of: Mapping[str, str]) -> bool:
    """Whether models ``a`` and ``b`` get a pair report: any two torch models; a variant with its own family."""
    family_a, family_b = variant_of.get(a, a), variant_of.get(b, b)
    if a not in variant_of and b not in variant_of:
        return True
    return family_a == family_b or TEACHER_LABEL in (a, b)


def _measure_query_side(
    embeddings: dict[str, M3Embeddings],
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
    teacher = embeddings[TEACHER_LABEL].dense
    # The teacher's own exact top-k is the reference (its HNSW top-k when only HNSW ran).
    reference = tops[TEACHER_LABEL].get("exact", next(iter(tops[TEACHER_LABEL].values())))
    for label, embedded in embeddings.items():
        student = embedded.dense
        if label == TEACHER_LABEL or student.shape[1] != teacher.shape[1]:
            continue
        found = backend.search(f"{label}-in-teacher", teacher[n_questions:], student[:n_questions], depth, ["exact"])
        metrics[label].update(ground_truth_metrics(found["exact"], data.own_context, config.k,
                                                   query_side_index("exact")))
        for k in config.k:
            metrics[label][query_side_overlap_metric("exact", k)] = top_k_overlap(found["exact"], reference, k)


def _measure_m3_retrieval(
    embeddings: dict[str, M3Embeddings],
    data: _TestData,
    config: EvaluationConfig,
    backend: VectorSearchBackend,
    metrics: dict[str, dict[str, Any]],
    pair_reports: list[PairReport],
    depth: int,
    show_progress: bool,
) -> None:
    """Retrieval by the sparse, ColBERT and hybrid outputs (exact search) of every model that has them.

    Adds each such model's ground-truth metrics (prefixed by the output) to ``metrics`` and, to the report of
    every pair of such models, their P@k overlap per output.
    """
    n_questions = len(data.questions)
    tops: dict[str, dict[str, np.ndarray]] = {}
    with_outputs = [label for label, embedded in embeddings.items() if _has_m3_outputs(embedded)]
    for label in tqdm(with_outputs, desc="Qdrant top-k (M3 outputs)", unit="model", disable=not show_progress):
        embedded = embeddings[label]
        found = backend.search_m3(label, embedded.rows(slice(n_questions, None)), embedded.rows(slice(0, n_questions)),
                                  depth, outputs=list(M3_RETRIEVAL_OUTPUTS), hybrid_weights=config.hybrid_weights)
        tops[label] = found
        for output in M3_RETRIEVAL_OUTPUTS:
            metrics[label].update(ground_truth_metrics(found[output], data.own_context, config.k,
                                                       output_prefix(output)))
    for pair in pair_reports:
        if pair.a in tops and pair.b in tops:
            pair.metrics.update({
                overlap_metric(output_prefix(output), k): top_k_overlap(
                    tops[pair.a][output], tops[pair.b][output], k, short_lists=M3_OVERLAP_SHORT_LISTS)
                for output in M3_RETRIEVAL_OUTPUTS for k in config.k
            })


def _has_m3_outputs(embedded: M3Embeddings) -> bool:
    return embedded.outputs == M3_OUTPUTS


def _measure_speed(models: Mapping[str, SentenceTransformer | TimedModel], layers: dict[str, int | None],
                   data: _TestData, config: EvaluationConfig, metrics: dict[str, dict[str, Any]],
                   show_progress: bool) -> list[str]:
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
        context_docs=contexts["doc_id"].tolist(),
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


def _layers(model: SentenceTransformer) -> int | None:
    try:
        return num_layers(model)
    except M3DistillError:
        return None


def _describe_model(label: str, source: str, model: SentenceTransformer, layers: int | None,
                    metrics: dict[str, Any], device: str, dataset_digest: str | None) -> ModelReport:
    return ModelReport(
        name=label,
        role="teacher" if label == TEACHER_LABEL else "student",
        source=str(Path(source).resolve()) if Path(source).exists() else source,
        layers=layers,
        embedding_dim=model.get_embedding_dimension(),
        max_seq_length=model.max_seq_length,
        metrics=metrics,
        device=str(device),
        learnt_test_contexts=None if label == TEACHER_LABEL else learnt_test_contexts(source, dataset_digest),
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
