"""The report.json schema (version 1), and reading a report back.

report.json is the evaluation's single source of truth; report.md and the plots are rendered from it alone
(``m3distill report DIR``). Keys (JSON objects are written with sorted keys; lists keep their order)::

    schema_version       1
    m3distill_version    package version that wrote the report
    started_at           ISO-8601 UTC time the evaluation started; finished_at likewise; duration_s its length
    timings_s            {load, encode, retrieval, speed}: seconds spent in each phase
    config               {teacher: TeacherConfig, evaluation: EvaluationConfig} as used (see m3distill.config)
    versions             {python, m3distill, torch, transformers, sentence-transformers, qdrant-edge-py,
                          qdrant-client, ir-measures, numpy}: installed versions (null when missing)
    device               {name: "cpu" / "cuda" / ..., description: GPU name or CPU model, torch_threads, platform}
    dataset              {path, manifest (the manifest's scalar fields), contexts_per_split, questions_per_split,
                          test_questions, test_contexts, indexed_contexts, test_languages: {language: contexts}}
    alignment_pairs      {n_pairs, n_matching, n_non_matching, negatives_per_question, seed, description}:
                          how the (question, context) pairs for the Pearson/Spearman figures were drawn
    retrieval            {backend: "qdrant-edge" | "qdrant-client", qdrant_url, indexes: ["exact", "hnsw"?],
                          k: [10, 20, ...], depth: contexts retrieved per question, n_questions, n_contexts,
                          distractors: "all" | "test", hnsw: {m, ef_construct, ef}}
    speed                {n_texts, batch_size, repeats, warmup_batches}: the timing policy
    models               list, teacher first: {name, role: "teacher" | "student", source (folder or hub id),
                          layers, embedding_dim, max_seq_length, metrics}
    pairs                list, one per unordered pair of models (teacher included): {a, b, metrics}

Metric names are flat, sentence-transformers style, with a prefix per family (the names are defined once, in
m3distill.evaluation.alignment / retrieval / speed):

    models[].metrics  alignment_mse, alignment_mse_x100 (students; null when embedding widths differ),
                      alignment_mean_cosine, alignment_pearson_cosine, alignment_spearman_cosine (students only)
                      {index}_recall@{k}, {index}_mrr@10, {index}_ndcg@10         for each index kind and k
                      hnsw_vs_exact_overlap@{k}   HNSW recall: HNSW top-k vs exact top-k, when both ran
                      query_side_exact_overlap@{k}, query_side_exact_recall@{k}, query_side_exact_mrr@10,
                      query_side_exact_ndcg@10    (students of the teacher's width) the student's questions
                                  searched exactly in the teacher's index: P@k vs the teacher's own top-k, and
                                  ground truth
                      speed_texts_per_s, speed_seconds_per_run, speed_speedup_vs_teacher, speed_parameters,
                      speed_weights_bytes, speed_size_on_disk_bytes (null when unknown),
                      speed_peak_memory_increase_bytes, speed_memory_measure (how memory was measured)
    pairs[].metrics   {index}_overlap@{k}: |top-k of a ∩ top-k of b| / k averaged over test questions
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from m3distill.errors import M3DistillError
from m3distill.layout import REPORT_DIRNAME, REPORT_JSON_FILE

REPORT_SCHEMA_VERSION = 1


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


def load_report(report_dir: str | Path) -> dict[str, Any]:
    """Read report.json from ``report_dir``, checking it is a report this version can render."""
    file = Path(report_dir) / REPORT_JSON_FILE
    try:
        report = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError as error:
        raise M3DistillError(f"{file} not found: run `m3distill evaluate` first") from error
    except json.JSONDecodeError as error:
        raise M3DistillError(f"{file} is not valid JSON ({error}); rerun `m3distill evaluate`") from error
    if not isinstance(report, dict) or "models" not in report or "schema_version" not in report:
        raise M3DistillError(f"{file} is not an m3distill report (no schema_version/models)")
    if report["schema_version"] > REPORT_SCHEMA_VERSION:
        raise M3DistillError(
            f"{file} has schema version {report['schema_version']}; this m3distill reads up to "
            f"{REPORT_SCHEMA_VERSION}: upgrade m3distill"
        )
    return report
