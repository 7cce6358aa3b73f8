"""The report as a typed object (:class:`Report`), its report.json schema (version 5), and reading it back.

report.json is the evaluation's single source of truth, ``Report.model_dump(mode="json")`` written with sorted
keys; report.md and the plots are rendered from it alone (``m3distill report DIR``). Keys (lists keep their
order)::

    schema_version       5
    m3distill_version    package version that wrote the report
    started_at           ISO-8601 UTC time the evaluation started; finished_at likewise; duration_s its length
    timings_s            {load, encode, retrieval, speed}: seconds spent in each phase
    config               {teacher: TeacherConfig, evaluation: EvaluationConfig} as used (see m3distill.config)
    versions             {python, m3distill, torch, transformers, sentence-transformers, qdrant-edge-py,
                          qdrant-client, ir-measures, numpy, onnxruntime}: installed versions (null when missing)
    device               {name: "cpu" / "cuda" / ..., description: GPU name or CPU model, torch_threads, platform}
    dataset              {path, manifest (the manifest's scalar fields), contexts_per_split, questions_per_split,
                          test_questions, test_contexts, indexed_contexts, test_languages: {language: contexts}}
    alignment_pairs      {n_pairs, n_matching, n_non_matching, negatives_per_question, seed, description}:
                          how the (question, context) pairs for the Pearson/Spearman figures were drawn
    retrieval            {backend: "qdrant-edge" | "qdrant-client", qdrant_url, indexes: ["exact", "hnsw"?],
                          k: [10, 20, ...], depth: contexts retrieved per question, n_questions, n_contexts,
                          distractors: "all" | "test", hnsw: {m, ef_construct, ef},
                          outputs: the outputs searched, ["dense"] or (M3 teacher) ["dense", "sparse", "colbert",
                          "hybrid"], hybrid_weights: [dense, sparse, ColBERT] weights of the hybrid score (null
                          without hybrid)}
    speed                {n_texts, batch_size, repeats, warmup_batches, min_seconds_per_repeat, order}: the
                          timing policy; order "interleaved" (the models take turns in every repeat; see
                          m3distill.evaluation.speed) or "sequential" (reports migrated from version 1)
    models               list, teacher first: {name, role: "teacher" | "student", source (folder, hub id or, for
                          an ONNX variant, its .onnx file), layers, embedding_dim, max_seq_length, metrics,
                          variant: null for a model run by torch, else the student's ONNX export it is ("onnx":
                          fp32, "int8": int8-quantized), variant_of: the name of the torch student it was exported
                          from (null for torch models), device: where it encoded and was timed ("cpu" for ONNX
                          variants, run by onnxruntime's CPU provider), learnt_test_contexts: true for a student
                          whose training learnt the test contexts (training.all_contexts; never the test
                          questions), false for one that held them out, null when unknown (the teacher, a folder
                          without m3distill metadata)}. A variant is named
                          "{variant_of} ({variant})" (variant_label), e.g. "student-2L (int8)", and follows its
                          torch student.
    pairs                list, one per unordered pair of models (teacher included): {a, b, metrics}; an ONNX
                          variant is paired with the teacher, its torch student and that student's other variants only
    real_questions       null, or {source, sha256, n_questions, n_answered}: the file of people's questions
                          (evaluation.real_questions) the models were also measured on, and how many of its questions
                          had their answer document among the indexed contexts (ground truth)

Metric names are flat, sentence-transformers style, with a prefix per family (the names are defined once, in
m3distill.metrics, speed's in m3distill.evaluation.speed):

    models[].metrics  alignment_mse, alignment_mse_x100 (students; null when embedding widths differ),
                      alignment_mean_cosine, alignment_pearson_cosine, alignment_spearman_cosine (students only)
                      {index}_recall@{k}, {index}_mrr@10, {index}_ndcg@10         for each index kind and k
                      hnsw_vs_exact_overlap@{k}   HNSW recall: HNSW top-k vs exact top-k, when both ran
                      query_side_exact_overlap@{k}, query_side_exact_recall@{k}, query_side_exact_mrr@10,
                      query_side_exact_ndcg@10    (students of the teacher's width) the student's questions
                                  searched exactly in the teacher's index: P@k vs the teacher's own top-k, and
                                  ground truth
                      speed_texts_per_s (median over the repeats), speed_texts_per_s_min, speed_texts_per_s_max,
                      speed_seconds_per_run (one pass over the texts at the median rate),
                      speed_speedup_vs_teacher (median of the per-repeat ratios to the teacher; null for a model
                      on another device than the teacher's), speed_speedup_vs_teacher_min,
                      speed_speedup_vs_teacher_max,
                      speed_layer_ratio (students: teacher layers / student layers, the highest honest speed-up;
                      null when unknown), speed_speedup_suspect (students run by torch: true when the median
                      speed-up is above the layer ratio; always false for ONNX variants, which another runtime
                      may honestly make faster), speed_parameters, speed_weights_bytes, speed_size_on_disk_bytes
                      (null when unknown), speed_peak_memory_increase_bytes, speed_memory_measure (how memory
                      was measured)
                      real_questions_exact_overlap@{k}, real_questions_query_side_exact_overlap@{k}
                                  (students) P@k against the teacher on the real questions, symmetric and query-side;
                      real_questions_exact_recall@{k}, _mrr@10, _ndcg@10 (every model), and the same with
                                  real_questions_query_side_exact_ (students): ground truth on the answered ones;
                      real_questions_mean_cosine (students) mean cosine of their question embeddings to the teacher's
                      M3 teacher, models with heads: {output}_recall@{k}, {output}_mrr@10, {output}_ndcg@10 for
                                  output sparse, colbert, hybrid (exact search); students with heads also
                                  alignment_sparse_spearman, alignment_sparse_texts, alignment_sparse_mass_covered,
                                  alignment_colbert_pearson, alignment_colbert_spearman, alignment_colbert_token_cosine
    pairs[].metrics   {index}_overlap@{k}: |top-k of a ∩ top-k of b| / k averaged over test questions;
                      {output}_overlap@{k} likewise per M3 output, for pairs of models that both have it

Versions: 1 had no spread, layer ratio or suspect flag and timed each model's repeats back to back; it is read
by migrating it (speed.order "sequential", min_seconds_per_repeat null, the suspect flag worked out from the
layers). 2 had no outputs or hybrid weights (it searched dense alone): it is read as outputs ["dense"] and
hybrid_weights null. 3 had no ONNX variants: its models are read as variant and variant_of null and device the
report's device. 4 had no real questions: it is read with real_questions null. A report of another version is
refused with one line that says what to do.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from m3distill.errors import M3DistillError
from m3distill.layout import REPORT_DIRNAME, REPORT_JSON_FILE

REPORT_SCHEMA_VERSION = 5

MetricValue = float | int | bool | str | None
"""A metric is a number, a flag, a label (e.g. how memory was measured) or null when it could not be measured."""


class _ReportPart(BaseModel):
    # A key this version does not know means the file is not what the schema version says: refuse, don't drop.
    model_config = ConfigDict(extra="forbid")


class DeviceInfo(_ReportPart):
    """Where the models ran."""

    name: str
    description: str
    torch_threads: int
    platform: str


class DatasetSummary(_ReportPart):
    """The dataset the evaluation read."""

    path: str
    manifest: dict[str, Any]
    contexts_per_split: dict[str, int]
    questions_per_split: dict[str, int]
    test_questions: int
    test_contexts: int
    indexed_contexts: int
    test_languages: dict[str, int]


class AlignmentPairsInfo(_ReportPart):
    """How the (question, context) pairs behind the Pearson/Spearman figures were drawn."""

    n_pairs: int
    n_matching: int
    n_non_matching: int
    negatives_per_question: int
    seed: int
    description: str


class HnswSettings(_ReportPart):
    m: int
    ef_construct: int
    ef: int


class RetrievalSettings(_ReportPart):
    """How the top-k searches were run."""

    backend: str
    qdrant_url: str | None
    indexes: list[Literal["exact", "hnsw"]]
    k: list[int]
    depth: int
    n_questions: int
    n_contexts: int
    distractors: Literal["all", "test"]
    hnsw: HnswSettings
    # The outputs searched: dense alone, or (an M3 teacher) dense, sparse, ColBERT and their hybrid.
    outputs: list[Literal["dense", "sparse", "colbert", "hybrid"]] = ["dense"]
    hybrid_weights: tuple[float, float, float] | None = None  # dense, sparse, ColBERT; None without hybrid


class SpeedPolicy(_ReportPart):
    """How the models were timed (see :mod:`m3distill.evaluation.speed`)."""

    n_texts: int
    batch_size: int
    repeats: int
    warmup_batches: int
    min_seconds_per_repeat: float | None
    order: Literal["interleaved", "sequential"]


class ModelReport(_ReportPart):
    """One evaluated model and its flat metrics (names defined in m3distill.metrics and evaluation.speed)."""

    name: str
    role: Literal["teacher", "student"]
    source: str
    layers: int | None
    embedding_dim: int | None
    max_seq_length: int | None
    metrics: dict[str, MetricValue]
    # A student's ONNX export evaluated as a model of its own: which one, and the torch student it came from.
    variant: str | None = None
    variant_of: str | None = None
    device: str | None = None  # where it encoded and was timed; ONNX variants run on the CPU whatever the report's
    # A student whose training learnt the test split's contexts (training.all_contexts; never the test questions).
    # None for the teacher and for a folder that does not say (a student from before this field, not m3distill's).
    learnt_test_contexts: bool | None = None
    # The model's token vocabulary (torch models; see m3distill.students.vocabulary): mode, size, the teacher's size,
    # parameters split into token embeddings and the rest, and on the test questions the share of the teacher's
    # tokens the model lacks and the share of questions tokenized as the teacher tokenizes them.
    vocabulary: dict[str, Any] | None = None

    @property
    def is_variant(self) -> bool:
        """True for a student's ONNX export, False for a model run by torch."""
        return self.variant is not None


# How each ONNX variant reads in tables and plots; a variant not listed reads as its name.
VARIANT_TITLES = {"onnx": "ONNX fp32", "int8": "ONNX int8"}
TORCH_TITLE = "torch"


def variant_label(model: str, variant: str) -> str:
    """The name of ``model``'s ONNX variant ``variant`` in a report: ``student-2L (int8)``."""
    return f"{model} ({variant})"


def variant_title(variant: str | None) -> str:
    """How a model's runtime and precision read in the report: ``torch`` or e.g. ``ONNX int8``."""
    return TORCH_TITLE if variant is None else VARIANT_TITLES.get(variant, variant)


class PairReport(_ReportPart):
    """Top-k overlap between two models."""

    a: str
    b: str
    metrics: dict[str, float]


class RealQuestionsInfo(_ReportPart):
    """The people's questions the models were also measured on (``evaluation.real_questions``)."""

    source: str
    sha256: str
    n_questions: int
    n_answered: int  # questions whose answer document is among the indexed contexts


class Report(_ReportPart):
    """A whole evaluation: what :func:`m3distill.evaluation.evaluate.evaluate_models` returns and report.json holds."""

    schema_version: Literal[5] = REPORT_SCHEMA_VERSION
    m3distill_version: str
    started_at: str
    finished_at: str
    duration_s: float
    timings_s: dict[str, float]
    config: dict[str, Any]
    versions: dict[str, str | None]
    device: DeviceInfo
    dataset: DatasetSummary
    alignment_pairs: AlignmentPairsInfo
    retrieval: RetrievalSettings
    speed: SpeedPolicy
    models: list[ModelReport]
    pairs: list[PairReport]
    real_questions: RealQuestionsInfo | None = None

    @property
    def teacher(self) -> ModelReport:
        """The teacher's entry (the first model)."""
        return next(model for model in self.models if model.role == "teacher")

    @property
    def students(self) -> list[ModelReport]:
        """Every student, ONNX variants included."""
        return [model for model in self.models if model.role == "student"]

    @property
    def torch_models(self) -> list[ModelReport]:
        """The teacher and the students as torch ran them (no ONNX variants)."""
        return [model for model in self.models if not model.is_variant]

    def variants_of(self, name: str) -> list[ModelReport]:
        """The ONNX variants of the model named ``name``, in report order."""
        return [model for model in self.models if model.variant_of == name]

    def pair_metric(self, a: str, b: str, metric: str) -> float | None:
        """The pair metric ``metric`` of models ``a`` and ``b`` (either order); ``None`` when not measured."""
        for pair in self.pairs:
            if {pair.a, pair.b} == {a, b}:
                return pair.metrics.get(metric)
        return None

    @property
    def quality_k(self) -> int:
        """The k of the headline figures (quality plot, CLI summary): 10 when measured, else the smallest k."""
        return 10 if 10 in self.retrieval.k else min(self.retrieval.k)

    def overlap_with_teacher(self, metric: str) -> dict[str, float]:
        """Model name -> the pair metric ``metric`` (e.g. ``exact_overlap@10``) against the teacher; 1.0 for it."""
        teacher = self.teacher.name
        overlaps = {teacher: 1.0}
        for pair in self.pairs:
            if teacher in (pair.a, pair.b) and metric in pair.metrics:
                overlaps[pair.b if pair.a == teacher else pair.a] = pair.metrics[metric]
        return overlaps

    def to_json_dict(self) -> dict[str, Any]:
        """The content of report.json."""
        return self.model_dump(mode="json")


def find_report_dir(path: str | Path) -> Path:
    """The report directory for ``path``: ``path`` itself when it holds report.json, else ``path/report``.

    Raises :class:`M3DistillError` when neither holds a report.
    """
    path = Path(path)
    for candidate in (path, path / REPORT_DIRNAME):
        if (candidate / REPORT_JSON_FILE).is_file():
            return candidate
    raise M3DistillError(
        f"no {REPORT_JSON_FILE} in {path} or {path / REPORT_DIRNAME}: pass a run or report directory written by "
        "`m3distill evaluate`"
    )


def is_complete_report(report_dir: str | Path) -> bool:
    """True when ``report_dir`` holds a finished report (report.json is written last)."""
    return (Path(report_dir) / REPORT_JSON_FILE).is_file()


def load_report(report_dir: str | Path) -> Report:
    """Read report.json from ``report_dir`` (migrating a report of an older version), checked against the schema.

    Raises :class:`M3DistillError` with one line for a missing or unreadable file, a report of a version this
    m3distill does not read, or content that does not match its version's schema.
    """
    file = Path(report_dir) / REPORT_JSON_FILE
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError as error:
        raise M3DistillError(f"{file} not found: run `m3distill evaluate` first") from error
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise M3DistillError(f"{file} is not valid JSON ({error}); rerun `m3distill evaluate`") from error
    return report_from_json_dict(data, source=str(file))


def report_from_json_dict(data: Any, source: str = "report") -> Report:
    """A :class:`Report` from report.json's parsed content; see :func:`load_report`."""
    if not isinstance(data, dict) or "models" not in data or "schema_version" not in data:
        raise M3DistillError(f"{source} is not an m3distill report (no schema_version/models)")
    version = data["schema_version"]
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise M3DistillError(f"{source} has an unknown schema version {version!r}; rerun `m3distill evaluate`")
    if version > REPORT_SCHEMA_VERSION:
        raise M3DistillError(
            f"{source} has schema version {version}; this m3distill reads versions 1 to {REPORT_SCHEMA_VERSION}: "
            "upgrade m3distill"
        )
    if version == 1:
        data = _migrate_v1(data)
    if data["schema_version"] == 2:
        data = _migrate_v2(data)
    if data["schema_version"] == 3:
        data = _migrate_v3(data)
    if data["schema_version"] == 4:
        data = dict(data, schema_version=5)  # version 4 had no real questions: real_questions stays null
    try:
        return Report.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "(top level)"
        raise M3DistillError(
            f"{source} does not match report schema {REPORT_SCHEMA_VERSION}: {where}: {first['msg']}; "
            "rerun `m3distill evaluate`"
        ) from error


def _migrate_v1(data: dict[str, Any]) -> dict[str, Any]:
    """Version 1 -> 2: the timing policy says its repeats were sequential; students get the layer-ratio check."""
    from m3distill.metrics import LAYER_RATIO, SPEEDUP, SPEEDUP_SUSPECT, is_suspect_speedup, speedup_limit

    data = json.loads(json.dumps(data))  # a deep copy: the caller's dict stays as it was
    data["schema_version"] = 2
    if isinstance(data.get("speed"), dict):
        data["speed"].setdefault("min_seconds_per_repeat", None)
        data["speed"].setdefault("order", "sequential")
    models = [model for model in data["models"] if isinstance(model, dict)]
    teacher_layers = next((model.get("layers") for model in models if model.get("role") == "teacher"), None)
    for model in models:
        metrics = model.get("metrics")
        if model.get("role") != "student" or not isinstance(metrics, dict):
            continue
        limit = speedup_limit(teacher_layers, model.get("layers"))
        metrics.setdefault(LAYER_RATIO, limit)
        metrics.setdefault(SPEEDUP_SUSPECT, is_suspect_speedup(metrics.get(SPEEDUP), limit))
    return data


def _migrate_v2(data: dict[str, Any]) -> dict[str, Any]:
    """Version 2 -> 3: a version-2 evaluation searched the dense output alone."""
    data = json.loads(json.dumps(data))  # a deep copy: the caller's dict stays as it was
    data["schema_version"] = 3
    if isinstance(data.get("retrieval"), dict):
        data["retrieval"].setdefault("outputs", ["dense"])
        data["retrieval"].setdefault("hybrid_weights", None)
    return data


def _migrate_v3(data: dict[str, Any]) -> dict[str, Any]:
    """Version 3 -> 4: a version-3 evaluation had no ONNX variants and ran every model on the report's device."""
    data = json.loads(json.dumps(data))  # a deep copy: the caller's dict stays as it was
    data["schema_version"] = 4
    device = data["device"].get("name") if isinstance(data.get("device"), dict) else None
    for model in data["models"]:
        if isinstance(model, dict):
            model.setdefault("device", device)
    return data
