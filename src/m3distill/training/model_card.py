"""The README.md model card of a trained student, written from the same facts as its metadata file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from m3distill.layout import VOCABULARY_MAP_FILE

_METRICS = (
    ("teacher_p@10", "top-10 agreement with the teacher (dev questions among dev + train contexts)", "{:.4f}"),
    ("mse", "MSE to the teacher (per dimension)", "{:.6f}"),
    ("mse_x100", "MSE x100 (sentence-transformers scale)", "{:.4f}"),
    ("mean_cosine", "mean cosine to the teacher", "{:.4f}"),
    ("spearman_cosine", "Spearman of pair cosines vs the teacher's", "{:.4f}"),
    ("pearson_cosine", "Pearson of pair cosines vs the teacher's", "{:.4f}"),
)


def _loss_terms(loss: dict[str, Any] | None) -> str:
    if not loss:
        return "MSE"
    names = {"mse": "MSE", "cosine": "cosine", "in_batch_kl": "in-batch similarity KL", "anchor_kl": "anchor similarity KL",
             "token": "token-level hidden-state MSE (online teacher)",
             "sparse": "sparse-weight MSE (online teacher)", "colbert": "ColBERT-vector cosine (online teacher)"}
    return "loss: " + " + ".join(f"{loss[key]:g} x {name}" for key, name in names.items() if loss.get(key))


_HEAD_METRICS = (
    ("sparse_spearman", "sparse: Spearman of the weights over the token ids both weight (mean over texts)"),
    ("sparse_mass_covered", "sparse: share of the teacher's weight on token ids the student weights too"),
    ("colbert_token_cosine", "ColBERT: cosine to the teacher's vector of the same token (mean)"),
)


def _outputs_section(metadata: dict[str, Any]) -> list[str]:
    """Which of bge-m3's outputs the student has, how to get them, and how close each one stays on dev texts."""
    outputs = metadata.get("outputs") or ["dense"]
    if outputs == ["dense"]:
        return []
    pooling = metadata["teacher"]["pooling_mode"]
    lines = [
        "## Outputs",
        "",
        f"Like its teacher, this student has bge-m3's three outputs: **{', '.join(outputs)}**. The folder holds the "
        "sparse and ColBERT heads (`sparse_linear.pt`, `colbert_linear.pt`, trained with the student), so "
        "FlagEmbedding loads all three (sentence-transformers gives the dense one):",
        "",
        "```python",
        "from FlagEmbedding import BGEM3FlagModel",
        f"model = BGEM3FlagModel('path/to/this/folder', pooling_method='{pooling}')",
        "out = model.encode(['a passage'], return_dense=True, return_sparse=True, return_colbert_vecs=True)",
        "```",
        "",
        "or, with m3distill: `m3distill.encode_m3(model, m3distill.load_m3_heads(model, folder), texts)`.",
        "",
    ]
    before, after = metadata.get("dev_heads_before") or {}, metadata.get("dev_heads_after") or {}
    rows = [f"| {label} | {_maybe(before.get(key))} | {_maybe(after.get(key))} |"
            for key, label in _HEAD_METRICS if key in after]
    if rows:
        lines += ["How close the sparse and ColBERT outputs stay to the teacher's on dev texts (dense: see *Dev "
                  "metrics* below):", "", "| metric | heads copied, before training | after training |",
                  "|---|---|---|", *rows, ""]
    return lines


def _maybe(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


# The export section sits between these markers, so that `m3distill export` can rewrite it in place.
EXPORT_SECTION_START = "<!-- m3distill export: written by `m3distill export` -->"
EXPORT_SECTION_END = "<!-- /m3distill export -->"
_VARIANT_LABELS = {"onnx": "float32", "int8": "dynamic int8 weights"}


def export_section(record: dict[str, Any]) -> list[str]:
    """The card's section on the ONNX exports: each variant's file, size and agreement with the torch student, and
    how to load it with sentence-transformers' ONNX backend or with onnxruntime alone."""
    variants = record.get("variants") or {}
    rows = []
    for name, entry in variants.items():
        label = _VARIANT_LABELS.get(name, name)
        quantization = entry.get("quantization")
        if quantization:
            label += (f" ({quantization['weight_type']}, {'per channel' if quantization['per_channel'] else 'per tensor'}"
                      f", {'/'.join(quantization['op_types'])})")
        rows.append(f"| {name} | {label} | `{entry['file']}` | {entry['bytes'] / 1e6:.1f} MB | "
                    f"{entry['mean_cosine_vs_torch']:.6f} ({entry['min_cosine_vs_torch']:.6f}) |")
    example = "int8" if "int8" in variants else next(iter(variants), "onnx")
    file = variants.get(example, {}).get("file", "onnx/model.onnx")
    lines = [
        EXPORT_SECTION_START,
        "## ONNX and int8",
        "",
        f"`m3distill export` wrote ONNX versions of this student (opset {record.get('opset')}), each checked against "
        f"the torch student on {record.get('verify_texts', '-')} texts:",
        "",
        "| variant | weights | file | size | mean cosine to the torch student (lowest) |",
        "|---|---|---|---:|---:|",
        *rows,
        "",
        "With sentence-transformers' ONNX backend (`pip install sentence-transformers[onnx]`):",
        "",
        "```python",
        "from sentence_transformers import SentenceTransformer",
        f"model = SentenceTransformer('path/to/this/folder', backend='onnx', model_kwargs={{'file_name': '{file}'}})",
        "```",
        "",
        "With onnxruntime alone (numpy, onnxruntime and tokenizers; no torch), through m3distill:",
        "",
        "```python",
        "import m3distill",
        f"embeddings = m3distill.onnx_encoder('path/to/this/folder', '{example}').encode(['a question', 'a passage'])",
        "```",
        "",
    ]
    if record.get("m3_heads") and record.get("outputs") == ["dense"]:
        lines += ["The ONNX files give the dense output only: the sparse and ColBERT outputs need the torch folder "
                  "and its head files (see *Outputs* above).", ""]
    elif len(record.get("outputs") or []) > 1:
        lines += ["Each graph returns bge-m3's three outputs from one run (token embeddings, sparse weights, ColBERT "
                  "vectors); all three, as `m3distill.encode_m3` gives them for the torch student:", "", "```python",
                  f"outputs = m3distill.onnx_encoder('path/to/this/folder', '{example}').encode_m3(['a question'])",
                  "outputs.dense, outputs.sparse, outputs.colbert", "```", ""]
    return [*lines, EXPORT_SECTION_END]


def with_export_section(card: str, record: dict[str, Any] | None) -> str:
    """``card`` with its export section replaced by the one for ``record`` (removed when ``record`` is None), or
    inserted before the *Model* section when it has none yet."""
    start, end = card.find(EXPORT_SECTION_START), card.find(EXPORT_SECTION_END)
    if start != -1 and end > start:
        card = card[:start] + card[end + len(EXPORT_SECTION_END):].lstrip("\n")
    if record is None:
        return card
    section = "\n".join(export_section(record)) + "\n\n"
    anchor = card.find("\n## Model\n")
    if anchor == -1:
        return card.rstrip("\n") + "\n\n" + section.rstrip("\n") + "\n"
    return card[:anchor + 1] + section + card[anchor + 1:]


def _training_section(settings: dict[str, Any]) -> list[str]:
    lines = ["## Training", "", "| setting | value |", "|---|---|"]
    for key in ("epochs", "max_steps", "global_step", "batch_size", "learning_rate", "lr_scheduler", "warmup_ratio",
                "weight_decay", "precision", "world_size", "best_metric", "best_step", "early_stopping_patience",
                "texts_seen", "seconds_per_step", "train_seconds"):
        value = settings.get(key)
        if isinstance(value, float):
            value = f"{value:.4g}"
        lines.append(f"| {key} | {value if value is not None else '-'} |")
    return lines


def _dev_metrics_section(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    lines = ["", "## Dev metrics", "", "| metric | before training | after training |", "|---|---|---|"]
    for key, label, fmt in _METRICS:
        if key in before and key in after:
            lines.append(f"| {label} | {fmt.format(before[key])} | {fmt.format(after[key])} |")
    return lines


def _search_section(search: dict[str, Any] | None) -> list[str]:
    if not search:
        return []
    lines = [
        "",
        "## Layer search",
        "",
        f"{len(search['candidates'])} candidate plans scored on {search['n_dev_texts']} dev texts after "
        f"{search['steps']} training steps each (highest dev top-10 agreement wins; lowest MSE when it was not "
        "measured):",
        "",
        "| layers | dev top-10 agreement | dev MSE | mean cosine |",
        "|---|---|---|---|",
    ]
    for candidate in search["candidates"]:
        top_k = candidate.get("top_k")
        lines.append(f"| {candidate['layers']} | {'-' if top_k is None else f'{top_k:.4f}'} | "
                     f"{candidate['mse']:.6f} | {candidate['mean_cosine']:.4f} |")
    return lines


def _vocabulary_rows(vocabulary: dict[str, Any] | None, params: dict[str, Any]) -> list[str]:
    if not vocabulary:
        return []
    size, teacher_size = vocabulary["size"], vocabulary["teacher_size"]
    rows = [f"| vocabulary | {size:,} tokens of the teacher's {teacher_size:,} ({vocabulary['mode']}"
            + (f", budget {vocabulary['budget']:,}" if vocabulary.get("budget") else "")
            + (f"; scripts {', '.join(vocabulary['scripts'])}" if vocabulary.get("scripts") else "") + ") |"]
    if params.get("student_embeddings") is not None:
        rows.append(f"| token-embedding parameters | {params['student_embeddings']:,} "
                    f"(other parameters {params['student'] - params['student_embeddings']:,}) |")
    if vocabulary["mode"] != "full":
        rows.append(f"| token ids | renumbered; `{VOCABULARY_MAP_FILE}` holds the teacher's id of each (sparse "
                    "weights are reported under the teacher's ids) |")
    return rows


def student_model_card(metadata: dict[str, Any]) -> str:
    """Markdown model card for a student; ``metadata`` is what goes into ``m3distill_student.json``."""
    teacher = metadata["teacher"]
    params = metadata["parameters"]
    data = metadata["data"]
    settings = metadata["training"]
    layers = ", ".join(str(layer) for layer in metadata["layers"])
    # A local teacher folder is named by its last part in prose; only hub ids go into base_model.
    is_folder = Path(teacher["name"]).is_absolute() or teacher["name"].startswith(".")
    short_name = Path(teacher["name"]).name if is_folder else teacher["name"]
    lines = [
        "---",
        "library_name: sentence-transformers",
        "pipeline_tag: sentence-similarity",
        "tags: [sentence-transformers, feature-extraction, distillation, m3distill]",
        *([] if is_folder else [f"base_model: {teacher['name']}"]),
        "---",
        "",
        f"# {metadata['name']}: a {len(metadata['layers'])}-layer student of {short_name}",
        "",
        f"Distilled with m3distill {metadata['m3distill_version']}: the teacher's embeddings, its layers "
        f"**{layers}** (0-based, strategy `{metadata['strategy']}`), its {teacher['pooling_mode']} pooling"
        f"{' and L2 normalisation' if teacher['normalize'] else ''}, trained to reproduce the teacher's embeddings "
        f"({_loss_terms(settings.get('loss'))}). Load it with plain sentence-transformers:",
        "",
        "```python",
        "from sentence_transformers import SentenceTransformer",
        "model = SentenceTransformer('path/to/this/folder')",
        "embeddings = model.encode(['a question', 'a passage'])",
        "```",
        "",
        *_outputs_section(metadata),
        "## Model",
        "",
        "| | |",
        "|---|---|",
        f"| teacher | `{teacher['name']}` (revision {teacher['revision'] or 'n/a'}, files sha256 "
        f"{(teacher['files_sha256'] or 'n/a')[:16]}) |",
        f"| kept layers | {layers} of the teacher's |",
        f"| parameters | {params['student']:,} (teacher {params['teacher']:,}, {params['student'] / params['teacher']:.1%}) |",
        *_vocabulary_rows(metadata.get("vocabulary"), params),
        f"| embedding dimension | {teacher['dim']} |",
        f"| max sequence length | {settings['max_seq_length']} |",
        "",
        "## Data",
        "",
        f"- training texts ({', '.join(settings.get('texts') or ['contexts', 'questions', 'general'])} of the train "
        f"split{', plus the dev and test contexts' if data.get('all_contexts') else ''}): {data['train_texts']:,}; "
        f"seen {settings.get('passes_over_train_texts', '-')} times each on average",
        f"- dev texts: {data['dev_texts']:,}; dev pairs (question with its context / a random context): {data['dev_pairs']:,}",
        "",
    ]
    lines += _training_section(settings)
    lines += _dev_metrics_section(metadata["dev_before"], metadata["dev_after"])
    lines += _search_section(metadata.get("search"))
    return "\n".join(lines) + "\n"
