"""``m3distill evaluate``: alignment, Qdrant retrieval, ground truth and speed of the teacher and its students.

:func:`evaluate_models` is the one entry point. It checks every input first (dataset, test split, k, model
folders, Qdrant connection), loads the models, encodes the test questions and the indexed contexts once per model,
then measures:

1. alignment of each student with the teacher (:mod:`m3distill.metrics`);
2. top-k retrieval with Qdrant for every model, P@k overlap for every pair of models and ground-truth
   Recall@k / MRR@10 / nDCG@10 (:mod:`m3distill.evaluation.retrieval`);
3. speed, size and memory (:mod:`m3distill.evaluation.speed`);

Every student folder with an ONNX export (``m3distill.export``; ``evaluation.onnx_variants``) adds a model per
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
whole. Embeddings are cached in ``OUT_DIR/.embeddings-cache`` while the evaluation runs, so an interrupted
evaluation resumes without re-encoding; the cache leaves with the old folder when the new report is swapped in.
``OUT_DIR`` must be new, empty, or a report folder m3distill wrote (report.json or the embeddings cache in it).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import itertools
import json
import logging
import platform
import re
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
from m3distill.atomic import atomic_dir, atomic_path, disk_space_for, refuse_files_not_ours
from m3distill.config import EvaluationConfig, TeacherConfig, settings_record
from m3distill.data.dataset import SynthDataset, load_synth_dataset
from m3distill.errors import M3DistillError
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
)
from m3distill.layout import (
    EMBEDDINGS_CACHE_DIRNAME,
    REPORT_FILES,
    REPORT_JSON_FILE,
    SPLITS,
    STUDENT_METADATA_FILE,
    folder_kind,
)
from m3distill.m3 import (
    DENSE,
    HEAD_FILES,
    M3_OUTPUTS,
    M3Embeddings,
    M3Heads,
    encode_m3,
    load_m3_heads,
)
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
    count_parameters,
    load_sentence_transformer,
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
    Report,
    RetrievalSettings,
    SpeedPolicy,
    variant_label,
    write_report,
)

logger = logging.getLogger(__name__)

TEACHER_LABEL = "teacher"
IN_MEMORY_SOURCE = "(in memory)"
_VERSIONED_PACKAGES = ("torch", "transformers", "sentence-transformers", "qdrant-edge-py", "qdrant-client",
                       "ir-measures", "numpy", "onnxruntime")
# Where a student keeps its ONNX exports (m3distill.onnx_serving.ONNX_DIR), for the warning without onnxruntime.
_ONNX_FOLDER = "onnx"
# ONNX variants always run here: the evaluation uses onnxruntime's CPU provider alone.
_ONNX_DEVICE = "cpu"
_ONNX_ENCODE_CHUNK = 1024  # texts per progress step while an ONNX variant encodes


@dataclass(frozen=True)
class _Variant:
    """A student's ONNX export, evaluated as a model of its own.

    Attributes:
        encoder: the loaded export (an :class:`m3distill.onnx_serving.OnnxEncoder`).
        student: the label of the torch student it was exported from.
        variant: which export (``onnx``, ``int8``).
        export: :func:`export_record_digest` of the student's folder: what pins the export's contents.
    """

    encoder: Any
    student: str
    variant: str
    export: str | None


@dataclass(frozen=True)
class _TestData:
    """The texts the evaluation encodes: test questions first, then every indexed context."""

    questions: list[str]
    contexts: list[str]
    own_context: np.ndarray  # per question: its context's row in ``contexts``
    test_context_rows: np.ndarray  # rows of ``contexts`` that are test contexts
    summary: dict[str, Any]
    context_docs: list[str]  # the document id of each context


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
    teacher_heads: M3Heads | None = None,
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
        teacher_heads: the in-memory teacher's M3 heads (sparse and ColBERT), making it an M3 teacher; without
            ``teacher_model`` the heads are read from the teacher's folder when it has head files.

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
    real = real_question_set(config.real_questions, data.context_docs) if config.real_questions else None
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

    if teacher_heads is not None and teacher_model is None:
        raise ValueError("teacher_heads needs teacher_model; a teacher loaded from its folder brings its own heads")

    with _timed(timings, "load"):
        folders = dict(zip(labels[1:], student_dirs))
        models = {**_load_models(teacher, folders, device, teacher_model), **student_models}
        heads = _load_heads(models, teacher, folders, teacher_model, teacher_heads)
        variants = _load_variants(folders, models, device) if config.onnx_variants else {}
    for label, variant in variants.items():
        if label in models:
            raise ValueError(f"{variant.student}'s {variant.variant} export would be named {label!r}, the name of "
                             "another model; give that model another name")
    # Each variant follows its torch student, in the tables as in the speed turns.
    labels = [name for label in labels
              for name in [label, *[own for own, variant in variants.items() if variant.student == label]]]
    texts = data.questions + data.contexts
    # The embeddings kept in the report folder until the report is written (float32; an M3 model's sparse and
    # ColBERT outputs come on top), then the report itself (a few plots).
    needed = 4 * len(texts) * sum(int(model.get_embedding_dimension()) for model in models.values()) * (
        1 + len(variants) / max(len(models), 1)) + 2_000_000
    with disk_space_for(out_dir, int(needed)), _timed(timings, "encode"):
        embeddings = _embed_all(models, heads, texts, cache_dir, config.batch_size, show_progress,
                                teacher_embeddings)
        embeddings.update({label: _encode_variant_cached(variant, texts, cache_dir, label, config.batch_size,
                                                         show_progress)
                           for label, variant in variants.items()})
        embeddings = {label: embeddings[label] for label in labels}
        real_embeddings = _embed_real_questions(real, models, variants, cache_dir, config.batch_size,
                                                show_progress) if real is not None else {}
    metrics: dict[str, dict[str, Any]] = {label: {} for label in labels}
    pairs = _measure_alignment(embeddings, data, config, metrics)
    with _timed(timings, "retrieval"):
        pair_reports, depth = _measure_retrieval(embeddings, data, config, backend, metrics, show_progress,
                                                 {label: variant.student for label, variant in variants.items()})
    real_questions = None
    if real is not None:
        with _timed(timings, "real_questions"):
            n_questions = len(data.questions)
            real_questions = measure_real_questions(
                {label: real_embeddings[label] for label in labels},
                {label: embeddings[label].dense[n_questions:] for label in labels}, real, config.k, backend, metrics,
                TEACHER_LABEL)
    outputs = [DENSE]
    if heads.get(TEACHER_LABEL) is not None:
        outputs += list(M3_RETRIEVAL_OUTPUTS)
        with _timed(timings, "retrieval_m3"):
            _measure_m3_retrieval(embeddings, data, config, backend, metrics, pair_reports, depth, show_progress)
    del embeddings
    with _timed(timings, "speed"):
        layers = {label: _layers(model) for label, model in models.items()}
        layers.update({label: layers[variant.student] for label, variant in variants.items()})
        timed: dict[str, SentenceTransformer | TimedModel] = {
            label: timed_onnx_encoder(variants[label].encoder,
                                      parameters=count_parameters(models[variants[label].student]))
            if label in variants else models[label]
            for label in labels
        }
        timed_texts = _measure_speed(timed, layers, data, config, metrics, show_progress)

    from m3distill.stages.fingerprint import dataset_fingerprint  # the stages import this module

    model_reports = []
    dataset_digest = dataset_fingerprint(dataset_dir)
    sources = dict(zip(models, [IN_MEMORY_SOURCE if teacher_model is not None else teacher.model,
                                *map(str, student_dirs), *[IN_MEMORY_SOURCE] * len(student_models)]))
    for label in labels:
        if label in variants:
            metrics[label][SIZE_ON_DISK] = variants[label].encoder.weights_bytes  # the .onnx file(s)
            model_reports.append(_describe_variant(label, variants[label], layers[label], metrics[label]))
            continue
        source = sources[label]
        metrics[label][SIZE_ON_DISK] = None if source == IN_MEMORY_SOURCE else size_on_disk(source)
        model_reports.append(_describe_model(label, source, models[label], layers[label], metrics[label],
                                             device, dataset_digest))
    report = Report(
        m3distill_version=__version__,
        started_at=_iso(started),
        finished_at=_iso(time.time()),
        duration_s=time.time() - started,
        timings_s=timings,
        config={"teacher": settings_record(teacher), "evaluation": settings_record(config)},
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
            qdrant_url=settings_record(config)["qdrant_url"] if qdrant_client is None else "(injected client)",
            indexes=_index_kinds(config),
            k=list(config.k),
            depth=depth,
            n_questions=len(data.questions),
            n_contexts=len(data.contexts),
            distractors=config.distractors,
            hnsw=HnswSettings(m=config.hnsw_m, ef_construct=config.hnsw_ef_construct, ef=config.hnsw_ef),
            outputs=outputs,
            hybrid_weights=tuple(config.hybrid_weights) if len(outputs) > 1 else None,
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
        real_questions=real_questions,
    )
    # The new report replaces the old folder (and its embeddings cache) only once every file is written.
    with disk_space_for(out_dir, 2_000_000), atomic_dir(out_dir.absolute(), overwrite=True,
                                                        ours=REPORT_FILES) as new_report_dir:
        write_report(report, new_report_dir)
    logger.info("evaluated %d models in %.1fs; report in %s", len(labels), report.duration_s, out_dir)
    return report


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


def _load_heads(
    models: dict[str, SentenceTransformer],
    teacher: TeacherConfig,
    student_folders: dict[str, Path],
    teacher_model: SentenceTransformer | None,
    teacher_heads: M3Heads | None,
) -> dict[str, M3Heads | None]:
    """Each model's M3 heads by label: ``None`` for a dense-only model, and for every model of a dense-only teacher.

    The teacher's come from ``teacher_heads`` (in memory) or its folder; a student's from its folder. A student of
    an M3 teacher without head files (or held in memory) is evaluated on dense alone, with a warning.
    """
    if teacher_model is not None:
        found = teacher_heads
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


def _load_variants(students: dict[str, Path], models: dict[str, SentenceTransformer],
                   device: str) -> dict[str, _Variant]:
    """Every exported ONNX variant of the student folders, by its label, loaded for onnxruntime's CPU provider.

    Each runs with as many threads as torch (a fair race on the CPU) and the torch student's sequence length.
    Without onnxruntime the exports are left out with a warning.
    """
    try:
        from m3distill.onnx_serving import OnnxEncoder, exported_variants
    except ImportError as error:
        exported = [label for label, folder in students.items() if (folder / _ONNX_FOLDER).is_dir()]
        if exported:
            logger.warning("the ONNX exports of %s are left out: %s (pip install onnxruntime, or set "
                           "evaluation.onnx_variants: false)", ", ".join(exported), error)
        return {}
    variants: dict[str, _Variant] = {}
    for label, folder in students.items():
        found = exported_variants(folder)
        export = export_record_digest(folder) if found else None
        for variant in found:
            try:
                encoder = OnnxEncoder(folder, variant, threads=torch.get_num_threads(),
                                      max_seq_length=models[label].max_seq_length)
            except M3DistillError:
                raise
            except Exception as error:  # onnxruntime's own errors: a damaged or foreign file
                cause = str(error).splitlines()[0] if str(error) else type(error).__name__
                raise M3DistillError(f"{folder}: its {variant} ONNX export does not load ({cause}); export the "
                                     "student again, or set evaluation.onnx_variants: false") from error
            variants[variant_label(label, variant)] = _Variant(encoder=encoder, student=label, variant=variant,
                                                               export=export)
    if variants:
        logger.info("evaluating %d ONNX variant(s) on onnxruntime's CPU provider: %s", len(variants),
                    ", ".join(variants))
        if torch.device(device).type != _ONNX_DEVICE:
            logger.info("the torch models run on %s and the ONNX variants on the CPU: the variants' texts/s are "
                        "CPU figures, reported without a speed-up over the teacher", device)
    return variants


def export_record_digest(student_dir: str | Path) -> str | None:
    """What pins a student's ONNX exports: the sha256 of its export record (which lists every exported file's
    sha256), or ``None`` for a student without one. A new export or a re-export changes it.

    Without onnxruntime it is ``None`` too: the exports cannot be evaluated, so they cannot change a report.
    """
    try:
        from m3distill.onnx_serving import EXPORT_RECORD_FILE
    except ImportError:
        return None
    record = Path(student_dir) / EXPORT_RECORD_FILE
    if not record.is_file():
        return None
    return hashlib.sha256(record.read_bytes()).hexdigest()


def _encode_variant_cached(variant: _Variant, texts: list[str], cache_dir: Path, label: str, batch_size: int,
                           show_progress: bool) -> M3Embeddings:
    """A variant's (dense) embeddings of ``texts``, from the cache when this export already encoded exactly these."""
    digest = hashlib.sha256()
    stat = Path(variant.encoder.file).stat()
    # The export record pins the files' contents; size and time also catch a file replaced behind its back.
    digest.update(f"{variant.variant}|{variant.export}|{stat.st_size}|{stat.st_mtime_ns}|"
                  f"{variant.encoder.max_seq_length}|{variant.encoder.dim}".encode())
    _digest_texts(digest, texts)
    cache_file = cache_dir / f"{_file_label(label)}-{digest.hexdigest()[:16]}.npy"
    if cache_file.is_file():
        logger.info("%s: reusing embeddings from %s", label, cache_file)
        return M3Embeddings(dense=np.load(cache_file))
    logger.info("%s: encoding %d texts with onnxruntime", label, len(texts))
    chunks = []
    for start in tqdm(range(0, len(texts), _ONNX_ENCODE_CHUNK), desc=f"encode {label}", unit="chunk",
                      disable=not show_progress):
        chunks.append(np.asarray(variant.encoder.encode(texts[start:start + _ONNX_ENCODE_CHUNK],
                                                        batch_size=batch_size), dtype=np.float32))
    dense = np.concatenate(chunks) if chunks else np.zeros((0, variant.encoder.dim), np.float32)
    with atomic_path(cache_file) as tmp, open(tmp, "wb") as handle:
        np.save(handle, dense)
    return M3Embeddings(dense=dense)


def _embed_all(
    models: dict[str, SentenceTransformer],
    heads: dict[str, M3Heads | None],
    texts: list[str],
    cache_dir: Path,
    batch_size: int,
    show_progress: bool,
    teacher_embeddings: Callable[[list[str]], np.ndarray | None] | None,
) -> dict[str, M3Embeddings]:
    """Every model's embeddings of ``texts`` (questions, then contexts), all its outputs from one encoding."""
    embeddings = {}
    for label, model in models.items():
        provided = teacher_embeddings(texts) if label == TEACHER_LABEL and teacher_embeddings is not None else None
        if provided is not None:
            provided = np.asarray(provided, dtype=np.float32)
            if provided.shape != (len(texts), model.get_embedding_dimension()):
                raise ValueError(f"teacher_embeddings returned shape {provided.shape}; expected "
                                 f"({len(texts)}, {model.get_embedding_dimension()})")
            logger.info("teacher: using %d provided embeddings", len(texts))
            if heads[label] is None:
                embeddings[label] = M3Embeddings(dense=provided)
                continue
        found = _encode_cached(model, heads[label], texts, cache_dir, label, batch_size, show_progress)
        if provided is not None:
            # The sparse and ColBERT outputs need the encoding; dense stays the provided one (the teacher cache's).
            found.dense = provided
        embeddings[label] = found
    return embeddings


def _embed_real_questions(real: RealQuestionSet, models: dict[str, SentenceTransformer],
                          variants: dict[str, _Variant], cache_dir: Path, batch_size: int,
                          show_progress: bool) -> dict[str, np.ndarray]:
    """Every model's dense embeddings of the real questions (their other outputs are not searched)."""
    found = {label: _encode_cached(model, None, real.texts, cache_dir, f"{label}-real-questions", batch_size,
                                   show_progress).dense
             for label, model in models.items()}
    found.update({label: _encode_variant_cached(variant, real.texts, cache_dir, f"{label}-real-questions",
                                                batch_size, show_progress).dense
                  for label, variant in variants.items()})
    return found


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


def _encode_cached(
    model: SentenceTransformer, heads: M3Heads | None, texts: list[str], cache_dir: Path, label: str,
    batch_size: int, show_progress: bool,
) -> M3Embeddings:
    """All outputs of ``model`` (with ``heads``) for ``texts``, from the cache when it already encoded exactly these.

    Dense alone is cached as ``.npy``; every output of an M3 model as ``.m3.npz`` (arrays only, no pickle).
    """
    fingerprint = _fingerprint(model, texts, heads)
    name = _file_label(label)
    cache_file = cache_dir / (f"{name}-{fingerprint}.npy" if heads is None else f"{name}-{fingerprint}.m3.npz")
    if cache_file.is_file():
        logger.info("%s: reusing embeddings from %s", label, cache_file)
        if heads is None:
            return M3Embeddings(dense=np.load(cache_file))
        return _read_m3_cache(cache_file)
    logger.info("%s: encoding %d texts%s", label, len(texts), "" if heads is None else " (dense, sparse, ColBERT)")
    embeddings = encode_m3(model, heads, texts, batch_size=batch_size, show_progress=show_progress,
                           desc=f"encode {label}")
    embeddings.dense = np.asarray(embeddings.dense, dtype=np.float32)
    with atomic_path(cache_file) as tmp, open(tmp, "wb") as handle:
        if heads is None:
            np.save(handle, embeddings.dense)
        else:
            _write_m3_cache(handle, embeddings)
    return embeddings


def _write_m3_cache(handle, embeddings: M3Embeddings) -> None:
    """Every output as flat arrays: sparse ids and weights and ColBERT vectors concatenated, with offsets per text."""
    sparse_counts = [len(weights) for weights in embeddings.sparse]
    colbert_counts = [len(vectors) for vectors in embeddings.colbert]
    width = embeddings.colbert[0].shape[1] if embeddings.colbert else 0
    np.savez(
        handle,
        dense=embeddings.dense,
        sparse_offsets=np.concatenate([[0], np.cumsum(sparse_counts)]).astype(np.int64),
        sparse_ids=np.array([token for weights in embeddings.sparse for token in weights], dtype=np.int64),
        sparse_weights=np.array([weight for weights in embeddings.sparse for weight in weights.values()],
                                dtype=np.float32),
        colbert_offsets=np.concatenate([[0], np.cumsum(colbert_counts)]).astype(np.int64),
        colbert_vectors=np.concatenate(embeddings.colbert).astype(np.float32) if embeddings.colbert
        else np.zeros((0, width), np.float32),
    )


def _read_m3_cache(cache_file: Path) -> M3Embeddings:
    with np.load(cache_file, allow_pickle=False) as stored:
        offsets, ids, weights = stored["sparse_offsets"], stored["sparse_ids"], stored["sparse_weights"]
        sparse = [dict(zip(ids[a:b].tolist(), weights[a:b].tolist())) for a, b in itertools.pairwise(offsets)]
        offsets, vectors = stored["colbert_offsets"], stored["colbert_vectors"]
        colbert = [np.ascontiguousarray(vectors[a:b]) for a, b in itertools.pairwise(offsets)]
        return M3Embeddings(dense=stored["dense"], sparse=sparse, colbert=colbert)


def _fingerprint(model: SentenceTransformer, texts: list[str], heads: M3Heads | None = None) -> str:
    # The weights' checksum would be exact but slow for big models; the parameter bytes of a few tensors plus
    # shapes catch every realistic change (retraining, another layer plan) cheaply. The heads are small: all of them.
    digest = hashlib.sha256()
    digest.update(f"{model.max_seq_length}|{model.get_embedding_dimension()}".encode())
    parameters = list(model.parameters())
    for parameter in parameters[:: max(1, len(parameters) // 8)]:
        digest.update(str(tuple(parameter.shape)).encode())
        digest.update(parameter.detach().flatten()[:4096].float().cpu().numpy().tobytes())
    if heads is not None:
        digest.update(b"m3-heads")
        for parameter in heads.parameters():
            digest.update(str(tuple(parameter.shape)).encode())
            digest.update(parameter.detach().float().cpu().numpy().tobytes())
    _digest_texts(digest, texts)
    return digest.hexdigest()[:16]


def _digest_texts(digest, texts: list[str]) -> None:
    for text in texts:
        digest.update(text.encode("utf-8", errors="surrogatepass"))
        digest.update(b"\0")


def _file_label(label: str) -> str:
    """``label`` as part of a file name: ``student-2L (int8)`` -> ``student-2L-int8``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", label).strip("-") or "model"


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
        learnt_test_contexts=None if label == TEACHER_LABEL else _learnt_test_contexts(source, dataset_digest),
    )


def _learnt_test_contexts(source: str, dataset_digest: str | None) -> bool | None:
    """Whether an m3distill student learnt the evaluated test split's contexts (``training.all_contexts``): None
    when its folder does not say, or when it was trained on another dataset than the one evaluated."""
    from m3distill.stages.fingerprint import CONTENTS

    try:
        metadata = json.loads((Path(source) / STUDENT_METADATA_FILE).read_text(encoding="utf-8"))
        learnt = metadata["data"]["all_contexts"]
        trained_on = metadata["inputs"]["dataset" + CONTENTS]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(learnt, bool) or dataset_digest is None or trained_on != dataset_digest:
        return None
    return learnt


def _describe_variant(label: str, variant: _Variant, layers: int | None, metrics: dict[str, Any]) -> ModelReport:
    return ModelReport(
        name=label,
        role="student",
        source=str(Path(variant.encoder.file).resolve()),
        layers=layers,
        embedding_dim=variant.encoder.dim,
        max_seq_length=variant.encoder.max_seq_length,
        metrics=metrics,
        variant=variant.variant,
        variant_of=variant.student,
        device=_ONNX_DEVICE,
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
