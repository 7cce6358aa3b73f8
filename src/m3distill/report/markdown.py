"""report.md: the report's tables and a short guide to reading them, rendered from the :class:`Report` alone."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from m3distill import metrics as metric_names
from m3distill.metrics import (
    GROUND_TRUTH_CUTOFF,
    MEAN_COSINE,
    MSE,
    MSE_X100,
    PEARSON_COSINE,
    SPEARMAN_COSINE,
    hnsw_vs_exact_metric,
    mrr_metric,
    ndcg_metric,
    output_prefix,
    overlap_metric,
    REAL_QUESTIONS_MEAN_COSINE,
    query_side_index,
    query_side_overlap_metric,
    real_questions_index,
    recall_metric,
)
from m3distill.report.schema import MetricValue, Report, variant_title

_INDEX_TITLES = {"exact": "exact search", "hnsw": "HNSW search"}
_OUTPUT_TITLES = {"sparse": "sparse lexical weights", "colbert": "ColBERT multi-vector", "hybrid": "hybrid"}
_PHASE_ORDER = ("load", "encode", "retrieval", "speed")
_SUSPECT_MARK = "(!)"


def render_markdown(report: Report, plot_files: dict[str, str]) -> str:
    """The whole report.md for ``report``; ``plot_files`` maps plot titles to file names beside it."""
    ks = report.retrieval.k
    indexes = report.retrieval.indexes
    students = report.students
    lines = [
        "# m3distill evaluation report",
        "",
        _summary(report),
        "",
        *_real_questions_section(report),
    ]
    for index in indexes:
        lines += [f"## Top-k overlap between models (P@k, Qdrant {_INDEX_TITLES[index]})", ""]
        lines += _table(
            ["model pair", *[f"P@{k}" for k in ks]],
            [[f"{pair.a} vs {pair.b}", *[_fraction(pair.metrics.get(overlap_metric(index, k))) for k in ks]]
             for pair in report.pairs],
        ) or ["(only one model: no pairs)"]
        lines.append("")
    if "exact" in indexes and "hnsw" in indexes:
        lines += ["## HNSW recall against exact search (same model)", ""]
        lines += _table(
            ["model", *[f"recall@{k}" for k in ks]],
            [[model.name, *[_fraction(model.metrics.get(hnsw_vs_exact_metric(k))) for k in ks]]
             for model in report.models],
        )
        lines.append("")
    for index in indexes:
        lines += [f"## Ground truth: each question's own context ({_INDEX_TITLES[index]})", ""]
        lines += _table(
            ["model", *[f"Recall@{k}" for k in ks], f"MRR@{GROUND_TRUTH_CUTOFF}", f"nDCG@{GROUND_TRUTH_CUTOFF}"],
            [[model.name, *[_fraction(model.metrics.get(recall_metric(index, k))) for k in ks],
              _fraction(model.metrics.get(mrr_metric(index))), _fraction(model.metrics.get(ndcg_metric(index)))]
             for model in report.models],
        )
        lines.append("")
    query_side = [model for model in students if query_side_overlap_metric("exact", ks[0]) in model.metrics]
    if query_side:
        side = query_side_index("exact")
        lines += ["## Query-side stand-in: student questions searched in the teacher's index (exact search)", ""]
        lines += _table(
            ["student", *[f"P@{k} vs teacher" for k in ks], f"MRR@{GROUND_TRUTH_CUTOFF}",
             f"nDCG@{GROUND_TRUTH_CUTOFF}"],
            [[model.name, *[_fraction(model.metrics.get(query_side_overlap_metric("exact", k))) for k in ks],
              _fraction(model.metrics.get(mrr_metric(side))), _fraction(model.metrics.get(ndcg_metric(side)))]
             for model in query_side],
        )
        lines += ["", ("Contexts stay encoded by the teacher (an existing collection is kept); only the questions "
                       "are encoded by the student. P@k compares with the teacher's own top-k."), ""]
    lines += _m3_retrieval_sections(report)
    lines += ["## Alignment with the teacher (test split)", ""]
    lines += _table(
        ["student", "MSE per element", "MSE x100 (MSEEvaluator)", "mean cosine", "Pearson (cosine sim.)",
         "Spearman (cosine sim.)"],
        [[model.name, _small(model.metrics.get(MSE)),
          _fixed(model.metrics.get(MSE_X100), 4), _fraction(model.metrics.get(MEAN_COSINE)),
          _fraction(model.metrics.get(PEARSON_COSINE)),
          _fraction(model.metrics.get(SPEARMAN_COSINE))]
         for model in students],
    ) or ["(no students)"]
    pairs = report.alignment_pairs
    lines += ["", f"{pairs.description} {pairs.n_matching} matching and {pairs.n_non_matching} non-matching pairs.",
              ""]
    lines += _m3_alignment_sections(report)
    lines += _speed_section(report)
    lines += _vocabulary_section(report)
    lines += _serving_section(report)
    if plot_files:
        lines += ["## Plots", ""]
        lines += [f"![{title}]({file})" for title, file in plot_files.items()]
        lines.append("")
    lines += _guide(report)
    lines += _details(report)
    return "\n".join(lines).rstrip() + "\n"


def _real_questions_section(report: Report) -> list[str]:
    """The figures on people's questions, first: the test split's pseudo-questions resemble the training text."""
    real = report.real_questions
    if real is None:
        return []
    k = report.quality_k
    index, side = real_questions_index("exact"), real_questions_index(query_side_index("exact"))
    teacher_mrr = report.teacher.metrics.get(mrr_metric(index))
    rows = []
    for model in report.students:
        mrr = model.metrics.get(mrr_metric(index))
        rows.append([
            model.name, _fraction(model.metrics.get(overlap_metric(index, k))),
            _fraction(report.pair_metric(report.teacher.name, model.name, overlap_metric("exact", k))),
            _fraction(model.metrics.get(overlap_metric(side, k))),
            _fraction(mrr), _share(mrr, teacher_mrr), _fraction(model.metrics.get(recall_metric(index, k))),
            _fraction(model.metrics.get(REAL_QUESTIONS_MEAN_COSINE)),
        ])
    answered = (f"{real.n_answered} of them with their answer document among the indexed contexts (ground truth)"
                if real.n_answered else "none with an answer document among the indexed contexts (no ground truth)")
    return [
        "## Real questions: people's questions, never trained on", "",
        *(_table([
            "student", f"P@{k} vs teacher", f"P@{k} vs teacher (test-split pseudo-questions)",
            f"P@{k} vs teacher, query-side", f"MRR@{GROUND_TRUTH_CUTOFF}", "MRR / teacher's", f"Recall@{k}",
            "mean cosine to teacher (questions)"], rows) or ["(no students)"]),
        "",
        (f"{real.n_questions} questions from `{real.source}`, {answered}, searched (exact) among the same "
         f"{report.retrieval.n_contexts} contexts as the test questions; the teacher's MRR@{GROUND_TRUTH_CUTOFF} is "
         f"{_fraction(teacher_mrr)}. The test split's questions (the tables below) are generated from the corpus "
         "like the students' training questions, so students agree with the teacher more on them than on what "
         "people type: these are the figures to judge a student by."),
        "",
    ]


def _share(value: float | None, of: float | None) -> str:
    return "n/a" if value is None or not of else f"{100 * value / of:.1f}%"


def _m3_outputs(report: Report) -> list[str]:
    """The M3 outputs searched beside dense (none for a dense-only teacher)."""
    return [output for output in report.retrieval.outputs if output in _OUTPUT_TITLES]


def _output_title(report: Report, output: str) -> str:
    if output == "hybrid" and report.retrieval.hybrid_weights is not None:
        weights = ", ".join(f"{weight:g}" for weight in report.retrieval.hybrid_weights)
        return f"hybrid: dense, sparse, ColBERT weighted {weights}"
    return _OUTPUT_TITLES[output]


def _m3_retrieval_sections(report: Report) -> list[str]:
    """Per M3 output: P@k of every pair of models that both have it, and ground truth of every model that has it."""
    ks = report.retrieval.k
    lines: list[str] = []
    for output in _m3_outputs(report):
        prefix = output_prefix(output)
        title = _output_title(report, output)
        lines += [f"## Top-k overlap between models (P@k, {title}, exact search)", ""]
        lines += _table(
            ["model pair", *[f"P@{k}" for k in ks]],
            [[f"{pair.a} vs {pair.b}", *[_fraction(pair.metrics.get(overlap_metric(prefix, k))) for k in ks]]
             for pair in report.pairs if overlap_metric(prefix, ks[0]) in pair.metrics],
        ) or ["(fewer than two models with this output: no pairs)"]
        lines += ["", f"## Ground truth: each question's own context ({title}, exact search)", ""]
        lines += _table(
            ["model", *[f"Recall@{k}" for k in ks], f"MRR@{GROUND_TRUTH_CUTOFF}", f"nDCG@{GROUND_TRUTH_CUTOFF}"],
            [[model.name, *[_fraction(model.metrics.get(recall_metric(prefix, k))) for k in ks],
              _fraction(model.metrics.get(mrr_metric(prefix))), _fraction(model.metrics.get(ndcg_metric(prefix)))]
             for model in report.models if mrr_metric(prefix) in model.metrics],
        )
        lines.append("")
    # The note is about students missing their head files (an M3 student's exports carry what it carries).
    dense_only = [model.name for model in report.torch_models if _m3_outputs(report)
                  and mrr_metric(output_prefix(_m3_outputs(report)[0])) not in model.metrics]
    if dense_only:
        lines += [f"Dense output only (no M3 head files): {', '.join(dense_only)}.", ""]
    return lines


def _m3_alignment_sections(report: Report) -> list[str]:
    """Alignment of the students' sparse weights and ColBERT vectors with the teacher's (M3 teachers only)."""
    students = [model for model in report.students if metric_names.COLBERT_TOKEN_COSINE in model.metrics]
    if not _m3_outputs(report) or not students:
        return []
    lines = ["## Sparse lexical weights: alignment with the teacher (test split)", ""]
    lines += _table(
        ["student", "Spearman of shared-token weights", "texts compared", "teacher weight mass covered"],
        [[model.name, _fraction(model.metrics.get(metric_names.SPARSE_SPEARMAN)),
          _integer(model.metrics.get(metric_names.SPARSE_TEXTS)),
          _fraction(model.metrics.get(metric_names.SPARSE_MASS_COVERED))]
         for model in students],
    )
    lines += ["", "## ColBERT multi-vectors: alignment with the teacher (test split)", ""]
    lines += _table(
        ["student", "Pearson (MaxSim)", "Spearman (MaxSim)", "mean token cosine"],
        [[model.name, _fraction(model.metrics.get(metric_names.COLBERT_PEARSON)),
          _fraction(model.metrics.get(metric_names.COLBERT_SPEARMAN)),
          _fraction(model.metrics.get(metric_names.COLBERT_TOKEN_COSINE))]
         for model in students],
    )
    lines += ["", "ColBERT correlations use the same (question, context) pairs as the dense ones.", ""]
    return lines


def _serving_guide(report: Report) -> list[str]:
    if not any(model.is_variant for model in report.models):
        return []
    return [
        ("- **Serving variants**: a student named `NAME (onnx)` is its fp32 ONNX export, `NAME (int8)` its "
         "int8-quantized one, each run by onnxruntime on the CPU; every table above measures them like any model. "
         "Their quality next to the torch student's says what exporting and quantizing cost, their speed what they "
         "gain."),
    ]


def _m3_guide(report: Report) -> list[str]:
    if not _m3_outputs(report):
        return []
    return [
        ("- **M3 outputs** (sparse, ColBERT, hybrid): the same P@k and ground-truth figures for retrieval by each "
         "of bge-m3's other outputs, scored as FlagEmbedding does (sparse: sum over shared tokens of the weight "
         "products; ColBERT: MaxSim averaged over the question's vectors; hybrid: their weighted sum with dense), "
         "with exact search."),
        ("- **Sparse alignment**: per text, the Spearman correlation of the two models' weights over the tokens both "
         "weight (texts with at least two such tokens), and the share of the teacher's weight on tokens the student "
         "also weights. **ColBERT alignment**: Pearson/Spearman of the two models' MaxSim scores of the pairs, and "
         "the mean cosine of the two models' vectors of the same token."),
    ]


def _speed_section(report: Report) -> list[str]:
    lines = ["## Speed and size", ""]
    lines += _table(
        ["model", "layers", "parameters", "size on disk", "texts/s (min-max)", "speed-up (min-max)",
         "peak memory while encoding (+)"],
        [[model.name, _integer(model.layers), _integer(model.metrics.get(metric_names.PARAMETERS)),
          _bytes(model.metrics.get(metric_names.SIZE_ON_DISK)),
          _with_range(model.metrics, metric_names.TEXTS_PER_S, metric_names.TEXTS_PER_S_MIN, metric_names.TEXTS_PER_S_MAX, _rate),
          _with_range(model.metrics, metric_names.SPEEDUP, metric_names.SPEEDUP_MIN, metric_names.SPEEDUP_MAX, _times)
          + (f" {_SUSPECT_MARK}" if model.metrics.get(metric_names.SPEEDUP_SUSPECT) else ""),
          _bytes(model.metrics.get(metric_names.PEAK_MEMORY))]
         for model in report.models],
    )
    suspect = [model for model in report.models if model.metrics.get(metric_names.SPEEDUP_SUSPECT)]
    if suspect:
        lines += [
            "",
            f"{_SUSPECT_MARK} Suspect: a speed-up above the layer ratio (teacher layers / student layers: "
            + ", ".join(f"{_times(model.metrics.get(metric_names.LAYER_RATIO))} for {model.name}" for model in suspect)
            + "), which fewer layers of the same kind cannot give, means the machine was busy while timing; rerun "
            "the evaluation with more `speed.repeats` or a larger `speed.min_seconds_per_repeat`.",
        ]
    policy = report.speed
    memory_measures = sorted({str(model.metrics.get(metric_names.MEMORY_MEASURE)) for model in report.models})
    if policy.order == "interleaved":
        timing = (
            f"After {policy.warmup_batches} warm-up batches and one untimed pass that measures memory, the models "
            f"take turns ({', '.join(model.name for model in report.models)}) in each of {policy.repeats} repeats, "
            f"each turn encoding the texts as often as it takes to fill at least {policy.min_seconds_per_repeat:g} s; "
            "texts/s is the median over the repeats and the speed-up the median of each repeat's ratio to the "
            "teacher's texts/s in the same repeat"
        )
    else:  # reports of schema version 1
        timing = (f"After {policy.warmup_batches} warm-up batches, each model ran {policy.repeats} timed passes back "
                  "to back; texts/s is their median")
    lines += [
        "",
        (f"Device: {report.device.description} (`{report.device.name}`). Every model encodes the same "
         f"{policy.n_texts} test texts in batches of {policy.batch_size} (sorted by length). {timing}. Peak memory "
         f"is the increase over the loaded model while encoding, measured as {', '.join(memory_measures)}."
         + (" ONNX variants run on onnxruntime's CPU provider (see Serving variants); their memory is measured on "
            "their first pass, since onnxruntime keeps what a pass allocated."
            if any(model.is_variant for model in report.models) else "")
         + _outputs_timed(report)),
        "",
    ]
    return lines


def _outputs_timed(report: Report) -> str:
    """A sentence naming the models timed on all three M3 outputs at once ("" when every model gave dense alone)."""
    all_three = [model.name for model in report.models
                 if "+" in str(model.metrics.get(metric_names.SPEED_OUTPUTS, ""))]
    if not all_three:
        return ""
    return (f" {', '.join(all_three)} {'was' if len(all_three) == 1 else 'were'} timed producing dense, sparse and "
            "ColBERT outputs at once (one forward pass per batch, heads and post-processing included).")


def _vocabulary_section(report: Report) -> list[str]:
    models = [model for model in report.models if model.vocabulary]
    if not any(model.vocabulary.get("mode", "full") != "full" for model in models):
        return []  # every model has the teacher's vocabulary: the speed table's parameters say it all
    lines = ["## Vocabulary", ""]
    lines += _table(
        ["model", "vocabulary", "tokens", "embedding parameters", "other parameters", "question tokens not kept",
         "questions tokenized as the teacher's"],
        [[model.name, str(vocabulary.get("mode")),
          f"{_integer(vocabulary.get('size'))} of {_integer(vocabulary.get('teacher_size'))}",
          _integer(vocabulary.get("embedding_parameters")), _integer(vocabulary.get("other_parameters")),
          _fraction(vocabulary.get("changed_token_share")) if model.role == "student" else "",
          _fraction(vocabulary.get("identical_text_share")) if model.role == "student" else ""]
         for model in models for vocabulary in [model.vocabulary]],
    )
    return lines + [
        "",
        ("A trimmed student (`students.vocabulary`) keeps the tokens its training texts use (and with "
         "corpus+languages every token of their scripts), renumbered; its sparse weights are reported under the "
         "teacher's token ids. *Question tokens not kept*: the share of the teacher's tokens of the test questions "
         "that the student lacks, each split into smaller kept pieces."),
        "",
    ]


def _serving_outputs_table(report: Report, students: list, k: int) -> list[str]:
    """Per M3 output, each student and its exports: P@k against the teacher and against the torch student, MRR as a
    share of the teacher's ([] for a dense-only teacher, or exports that carry the dense output alone)."""
    teacher, rows = report.teacher, []
    for output in _m3_outputs(report):
        prefix = output_prefix(output)
        teacher_mrr = teacher.metrics.get(mrr_metric(prefix))
        for student in students:
            for model in (student, *report.variants_of(student.name)):
                if mrr_metric(prefix) not in model.metrics:
                    continue
                versus_self = 1.0 if model is student else report.pair_metric(model.name, student.name,
                                                                              overlap_metric(prefix, k))
                rows.append([output, model.name, variant_title(model.variant),
                             _fraction(report.pair_metric(model.name, teacher.name, overlap_metric(prefix, k))),
                             _fraction(versus_self), _share(model.metrics.get(mrr_metric(prefix)), teacher_mrr)])
    if not any(row[2] != variant_title(None) for row in rows):
        return []
    return ["", "Per output of bge-m3 (exact search; an M3 student's export returns all three from one graph):", "",
            *_table(["output", "model", "runtime", f"P@{k} vs teacher", f"P@{k} vs its torch self",
                     f"MRR@{GROUND_TRUTH_CUTOFF} / teacher's"], rows)]


def _serving_section(report: Report) -> list[str]:
    """Per student with ONNX variants: its torch self and each variant, with speed, size and fidelity side by side."""
    students = [model for model in report.torch_models if report.variants_of(model.name)]
    if not students:
        return []
    index = report.retrieval.indexes[0]
    k = report.quality_k
    overlap = overlap_metric(index, k)
    teacher = report.teacher
    teacher_mrr = teacher.metrics.get(mrr_metric(index))

    def row(model, torch_self) -> list[str]:
        mrr = model.metrics.get(mrr_metric(index))
        versus_self = (1.0 if model is torch_self else report.pair_metric(model.name, torch_self.name, overlap))
        return [
            model.name, variant_title(model.variant), f"`{model.device or report.device.name}`",
            _with_range(model.metrics, metric_names.TEXTS_PER_S, metric_names.TEXTS_PER_S_MIN,
                        metric_names.TEXTS_PER_S_MAX, _rate),
            _with_range(model.metrics, metric_names.SPEEDUP, metric_names.SPEEDUP_MIN, metric_names.SPEEDUP_MAX,
                        _times),
            _bytes(model.metrics.get(metric_names.WEIGHTS_BYTES)),
            _fraction(1.0 if model is teacher else report.pair_metric(model.name, teacher.name, overlap)),
            _fraction(versus_self),
            _fraction(mrr),
            _share(mrr, teacher_mrr),
        ]

    rows = [row(teacher, teacher)]
    for student in students:
        rows += [row(model, student) for model in (student, *report.variants_of(student.name))]
    lines = ["## Serving variants: torch and ONNX exports", ""]
    lines += _table(
        ["model", "runtime", "device", "texts/s (min-max)", "speed-up (min-max)", "weights",
         f"P@{k} vs teacher", f"P@{k} vs its torch self", f"MRR@{GROUND_TRUTH_CUTOFF}",
         f"MRR@{GROUND_TRUTH_CUTOFF} / teacher's"],
        rows,
    )
    lines += _serving_outputs_table(report, students, k)
    variants = [model for model in report.models if model.is_variant]
    devices = sorted({model.device or report.device.name for model in variants})
    other_device = any(device != report.device.name for device in devices)
    lines += [
        "",
        (f"Each student's ONNX exports ({', '.join(sorted({variant_title(model.variant) for model in variants}))}) "
         "run by onnxruntime's CPU provider with as many threads as torch, evaluated as models of their own: "
         f"timed in the same turns as the torch models, searched in the same {_INDEX_TITLES[index]}. Speed-up is "
         f"over the teacher run by torch on `{report.device.name}`"
         + (f"; the variants ran on `{', '.join(devices)}`, so their speed-up would compare the hardware and is "
            "n/a" if other_device else "")
         + ". ONNX variants may beat the layer ratio (fused kernels, int8 matrix products) and are never marked "
         f"suspect. P@{k} vs its torch self is the variant's top-{k} overlap with the torch student it was exported "
         "from: 1.000 means the export retrieves exactly what the student does."),
        "",
    ]
    return lines


def _summary(report: Report) -> str:
    retrieval = report.retrieval
    n_students = len([model for model in report.students if not model.is_variant])
    distractors = ("all contexts: test ones plus train/dev ones as distractors" if retrieval.distractors == "all"
                   else "test contexts only")
    n_variants = len(report.models) - len(report.torch_models)
    exports = f" (and {n_variants} ONNX export{'s' if n_variants != 1 else ''} of them)" if n_variants else ""
    return (
        f"Teacher `{report.teacher.source}` and {n_students} student{'s' if n_students != 1 else ''}{exports} on the "
        "dataset "
        f"`{report.dataset.path}`: {retrieval.n_questions} test questions searched against {retrieval.n_contexts} "
        f"indexed contexts ({distractors}) with {retrieval.backend}. Evaluated {report.finished_at} on "
        f"{report.device.description} in {report.duration_s:.0f} s.{_test_contexts_note(report)}"
    )


def _test_contexts_note(report: Report) -> str:
    """Which students learnt the test contexts' text in training (never the test questions), when any did."""
    students = [model for model in report.students if not model.is_variant]
    learnt = [model.name for model in students if model.learnt_test_contexts]
    if not learnt:
        return ""
    who = "The students" if len(learnt) == len(students) else ", ".join(learnt)
    return (f" {who} learnt every context of the corpus in training, test ones included (training.all_contexts), "
            "but no test question: the figures measure unseen questions over the passages the students were "
            "distilled for.")


def _guide(report: Report) -> list[str]:
    return [
        "## How to read this",
        "",
        ("- **P@k overlap** (model pair): the share of one model's top-k contexts that the other model also puts in "
         "its top-k, averaged over test questions. 1.0 means both return the same k contexts; against the teacher it "
         "says how well a student would stand in for it in an existing Qdrant collection's results."),
        ("- **Recall@k / MRR@10 / nDCG@10** (ground truth): each test question was generated from one context, "
         "which counts as its only relevant context. Recall@k: share of questions whose context is in the top k; "
         "MRR@10: mean of 1/rank of that context (0 beyond rank 10); nDCG@10: the same with a logarithmic discount. "
         "Computed with ir-measures."),
        "- **HNSW recall**: overlap of a model's approximate (HNSW) top-k with its own exact top-k.",
        *_m3_guide(report),
        ("- **MSE** (per element; x100 is the figure sentence-transformers' MSEEvaluator logs) and **mean cosine** "
         "compare the student's and the teacher's embedding of the same test text. **Pearson/Spearman** correlate "
         "the two models' cosine similarities of (question, context) pairs; 1.0 means the student ranks pairs "
         "exactly as the teacher does."),
        ("- **Speed-up**: texts/s over the teacher's texts/s, same texts, device and batch policy; min-max is the "
         "spread over the repeats. It cannot honestly exceed the layer ratio (teacher layers / student layers)."),
        *_serving_guide(report),
        "",
    ]


def _details(report: Report) -> list[str]:
    versions = ", ".join(f"{name} {version}" for name, version in sorted(report.versions.items()) if version)
    phases = sorted(
        report.timings_s, key=lambda phase: (_PHASE_ORDER.index(phase) if phase in _PHASE_ORDER else 99, phase)
    )
    timings = ", ".join(f"{phase} {report.timings_s[phase]:.1f} s" for phase in phases)
    models = "; ".join(f"{model.name}: `{model.source}`" for model in report.models)
    hnsw = report.retrieval.hnsw
    return [
        "## Run details",
        "",
        f"- Models: {models}",
        (f"- k: {', '.join(map(str, report.retrieval.k))}; indexes: {', '.join(report.retrieval.indexes)}; "
         f"HNSW m={hnsw.m}, ef_construct={hnsw.ef_construct}, ef={hnsw.ef}"),
        f"- Phases: {timings}",
        f"- Versions: {versions}",
        f"- Started {report.started_at}, finished {report.finished_at}; every number is in report.json.",
        "",
    ]


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    if not rows:
        return []
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _fraction(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _fixed(value: float | None, digits: int) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def _small(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3g}"


def _times(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def _rate(value: float | None) -> str:
    return _fixed(value, 1)


def _with_range(metrics: Mapping[str, MetricValue], median: str, low: str, high: str,
                show: Callable[[float | None], str]) -> str:
    """``median (low-high)``, or the median alone when no spread was measured (reports of version 1)."""
    text = show(metrics.get(median))
    if metrics.get(low) is None or metrics.get(high) is None:
        return text
    return f"{text} ({show(metrics.get(low))}-{show(metrics.get(high))})"


def _share(value: float | None, reference: float | None) -> str:
    """``value`` as a percentage of ``reference``."""
    return "n/a" if value is None or not reference else f"{value / reference:.1%}"


def _integer(value: int | None) -> str:
    return "n/a" if value is None else f"{value:,}"


def _bytes(value: int | None) -> str:
    if value is None:
        return "n/a"
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(size) < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"
