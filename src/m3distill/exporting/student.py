"""One student's export: the ``onnx/`` folder written beside the old one, verified, then renamed into place.

    STUDENT/onnx/
      model.onnx                     float32 graph (+ model.onnx.data when the weights pass 1.5 GB)
      model_qint8_quantized.onnx     dynamic int8 weights
      m3distill_export.json          the record: what was exported, from which student, how close each variant stays

The record is m3distill's marker: an ``onnx/`` folder without it is the user's and is never touched. It carries the
export's fingerprint (the student's model files and the export settings), which the export stage
(:mod:`m3distill.stages.export`) compares: an export of the same student with the same settings is current and
skipped, and one of an older student (or other settings) is stale.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from m3distill._version import __version__
from m3distill.atomic import (
    atomic_dir,
    disk_space_for,
    refuse_files_not_ours,
    write_json_atomic,
    write_text_atomic,
)
from m3distill.config import ExportConfig, settings_record
from m3distill.errors import M3DistillError
from m3distill.fingerprint import CONTENTS, Fingerprint
from m3distill.onnx_serving import (
    EXPORT_RECORD_FILE,
    ONNX_DIR,
    ONNX_VARIANT_FILES,
    VARIANTS,
    export_files,
    read_export_record,
    serving_spec,
)

logger = logging.getLogger(__name__)

EXPORT_RECORD_FORMAT = 2  # 2: an M3 student's graph returns its sparse and ColBERT outputs too
# Long texts stop here when the student's limit is so high that one text of that length would cost more to verify
# than the rest together (bge-m3: 8192 tokens).
_LONG_TEXT_TOKENS_CAP = 1024


@dataclass(frozen=True)
class VariantResult:
    """One exported variant.

    Attributes:
        variant: ``onnx`` (float32) or ``int8``.
        file: its .onnx file.
        bytes: its size on disk, external data included.
        mean_cosine: mean cosine of its embeddings to the torch student's on the verification texts.
        min_cosine: the lowest of those cosines.
        seconds: time to write and verify it.
    """

    variant: str
    file: Path
    bytes: int
    mean_cosine: float
    min_cosine: float
    seconds: float


@dataclass
class ExportResult:
    """What exporting one student did (or found, when its export was current and ``skipped``)."""

    student_dir: Path
    variants: dict[str, VariantResult] = field(default_factory=dict)
    skipped: bool = False
    seconds: float = 0.0
    record: dict[str, Any] = field(default_factory=dict, repr=False)

    def line(self) -> str:
        """One line for a terminal: each variant's size and cosine to the torch student."""
        parts = [f"{name} {_megabytes(result.bytes)} (cosine to torch {result.mean_cosine:.6f} mean, "
                 f"{result.min_cosine:.6f} lowest)" for name, result in self.variants.items()]
        state = "up to date, skipped" if self.skipped else f"exported in {self.seconds:.1f} s"
        return f"{self.student_dir.name}: {state}: {', '.join(parts)}"


def _megabytes(size: int) -> str:
    return f"{size / 1e6:.1f} MB"


def check_onnx_dir_is_ours(student_dir: str | Path) -> None:
    """Raise :class:`M3DistillError` when ``student_dir/onnx`` exists without m3distill's export record (it is the
    user's), or holds files besides the export m3distill wrote (they are named): exporting replaces the folder."""
    onnx_dir = Path(student_dir) / ONNX_DIR
    if (onnx_dir.exists() or onnx_dir.is_symlink()) and read_export_record(student_dir) is None:
        raise M3DistillError(
            f"{onnx_dir} exists and m3distill did not write it (no {Path(EXPORT_RECORD_FILE).name}); move it away "
            "to export this student"
        )
    refuse_files_not_ours(onnx_dir, export_files(student_dir), replacing="exporting the student again")


def verification_texts(config: ExportConfig, dataset_dir: str | Path | None = None) -> list[str]:
    """The texts exports are verified on: ``config.verify_texts`` of a dataset's test split (contexts and questions
    in turn) when ``dataset_dir`` holds a finished dataset, else of the bundled sample corpus (paragraphs of every
    language in turn)."""
    from m3distill.data.dataset import is_complete_dataset, load_synth_dataset

    if dataset_dir is not None and is_complete_dataset(dataset_dir):
        dataset = load_synth_dataset(dataset_dir)
        kinds = [dataset.texts(["test"], [kind]) for kind in ("contexts", "questions")]
        texts = _in_turn(kinds, config.verify_texts)
        if texts:
            return texts
    return _sample_texts(config.verify_texts)


def _in_turn(groups: Sequence[Sequence[str]], limit: int) -> list[str]:
    """The first item of each group, then the second of each, ... up to ``limit`` distinct texts."""
    found: dict[str, None] = {}
    for index in range(max((len(group) for group in groups), default=0)):
        for group in groups:
            if index < len(group) and group[index].strip():
                found.setdefault(group[index], None)
                if len(found) == limit:
                    return list(found)
    return list(found)


def _sample_texts(limit: int) -> list[str]:
    from m3distill.resources import sample_corpus_dir

    languages = sorted(path for path in (sample_corpus_dir() / "domain").iterdir() if path.is_dir())
    per_language = []
    for language in languages:
        paragraphs = []
        for file in sorted(language.glob("*.txt"))[:8]:
            paragraphs += [part.strip()[:1000] for part in file.read_text(encoding="utf-8").split("\n\n")
                           if len(part.strip()) > 20]
        per_language.append(paragraphs)
    return _in_turn(per_language, limit)


def _with_long_text(texts: list[str], max_seq_length: int) -> list[str]:
    """``texts`` plus one text of about 8 characters per token of the student's limit (capped), so that truncation
    is verified too."""
    if not texts:
        raise M3DistillError("no texts to verify the export on")
    characters = 8 * min(max_seq_length, _LONG_TEXT_TOKENS_CAP)
    joined = " ".join(texts)
    return [*texts, (joined * (characters // max(len(joined), 1) + 1))[:characters]]


def write_export(student_dir: str | Path, config: ExportConfig, fingerprint: Fingerprint, *,
                 texts: Sequence[str] | None = None, show_progress: bool = True) -> ExportResult:
    """Export one student to ONNX (float32) and int8 in its ``onnx/`` folder, verified against the torch student.

    The new ``onnx/`` folder is written beside the student's as a hidden temporary folder and renamed into place
    only once every variant is written and the float32 one reaches ``config.min_cosine``; until then an earlier
    export stays whole. The student's model card gets a section on loading each variant. Whether an export is
    needed at all is the export stage's question (:mod:`m3distill.stages.export`); this writes one when asked.

    Args:
        student_dir: a sentence-transformers folder (a student, or any Transformer -> Pooling [-> Normalize] model).
        config: the export settings (``variants``, ``opset``, ``min_cosine``, ``quantization``...).
        fingerprint: what the export is made from (the export stage's), recorded in it.
        texts: verification texts; ``config.verify_texts`` texts of the bundled sample corpus when None. One text
            longer than the student's limit is added to them.
        show_progress: show a progress bar of the steps.

    Raises :class:`M3DistillError` when ``student_dir`` is not a sentence-transformers folder, when its ``onnx/``
    folder holds files m3distill did not write, or when the float32 graph misses ``config.min_cosine``.
    """
    from m3distill.exporting.onnx import build_variants
    from m3distill.m3 import is_m3_model

    student_dir = Path(student_dir)
    if not student_dir.is_dir():
        raise M3DistillError(f"student folder not found: {student_dir}")
    spec = serving_spec(student_dir)
    check_onnx_dir_is_ours(student_dir)
    onnx_dir = student_dir / ONNX_DIR
    verify_on = _with_long_text(list(texts) if texts is not None else verification_texts(config), spec.max_seq_length)
    started = time.perf_counter()
    steps = ["loading the student", "exporting float32", "verifying float32"]
    steps += ["quantising to int8", "verifying int8"] if "int8" in config.variants else []
    with tqdm(total=len(steps), desc=f"export {student_dir.name}", unit="step", disable=not show_progress,
              leave=False) as bar:

        def step(name: str) -> None:
            bar.n = steps.index(name)
            bar.set_postfix_str(name)

        with (disk_space_for(onnx_dir, _export_bytes(student_dir, config)),
              atomic_dir(onnx_dir, overwrite=True, ours=export_files(student_dir)) as tmp):
            built, facts = build_variants(student_dir, tmp, config, verify_on, step=step)
            record = {
                "format": EXPORT_RECORD_FORMAT,
                "m3distill_version": __version__,
                "student": fingerprint.parts.get("student" + CONTENTS),
                **fingerprint.to_record(),
                **facts,
                # An M3 student's graph returns its sparse and ColBERT outputs too (m3distill.exporting.onnx).
                "outputs": ["dense", "sparse", "colbert"] if len(facts["graph_outputs"]) > 1 else ["dense"],
                "m3_heads": is_m3_model(student_dir),
                "verify_texts": len(verify_on),
                "seconds": round(time.perf_counter() - started, 2),
                "variants": {
                    name: {
                        "file": ONNX_VARIANT_FILES[name],
                        "files": variant.files,
                        "bytes": sum((tmp / Path(file).name).stat().st_size for file in variant.files),
                        "sha256": _files_sha256(tmp, variant.files),
                        "mean_cosine_vs_torch": variant.mean_cosine,
                        "min_cosine_vs_torch": variant.min_cosine,
                        "seconds": round(variant.seconds, 2),
                        **({"m3_vs_torch": variant.m3} if variant.m3 is not None else {}),
                        **({"quantization": settings_record(config.quantization)} if name == "int8" else {}),
                    }
                    for name, variant in built.items()
                },
            }
            write_json_atomic(tmp / Path(EXPORT_RECORD_FILE).name, record)  # last: marks the export complete
            bar.n = len(steps)
    refresh_model_card(student_dir, record)
    result = _result_from_record(student_dir, record, skipped=False)
    logger.debug("%s", result.line())
    return result


def _export_bytes(student_dir: Path, config: ExportConfig) -> int:
    """About what an export of ``student_dir`` writes: the float32 graph holds the student's weights, int8 a
    quarter of them."""
    weights = sum(file.stat().st_size for pattern in ("*.safetensors", "*.bin") for file in student_dir.glob(pattern))
    return int(weights * (("onnx" in config.variants) + 0.25 * ("int8" in config.variants)))


def _files_sha256(folder: Path, files: list[str]) -> str:
    """sha256 over the names and contents of a variant's files (the .onnx file and its external data)."""
    import hashlib

    digest = hashlib.sha256()
    for name in files:
        digest.update(Path(name).name.encode("utf-8") + b"\0")
        file_digest = hashlib.sha256()
        with open(folder / Path(name).name, "rb") as handle:
            while chunk := handle.read(1 << 20):
                file_digest.update(chunk)
        digest.update(file_digest.digest())
    return digest.hexdigest()


def read_export_result(student_dir: str | Path) -> ExportResult:
    """What the export in ``student_dir`` holds, read from its record, as the result of an export found current
    (``skipped``)."""
    student_dir = Path(student_dir)
    return _result_from_record(student_dir, read_export_record(student_dir) or {}, skipped=True)


def _result_from_record(student_dir: Path, record: dict[str, Any], *, skipped: bool) -> ExportResult:
    variants = {}
    listed = record.get("variants") or {}
    for name, entry in ((name, listed[name]) for name in VARIANTS if name in listed):
        variants[name] = VariantResult(
            variant=name, file=student_dir / entry["file"], bytes=int(entry["bytes"]),
            mean_cosine=float(entry["mean_cosine_vs_torch"]), min_cosine=float(entry["min_cosine_vs_torch"]),
            seconds=float(entry.get("seconds", 0.0)),
        )
    return ExportResult(student_dir=student_dir, variants=variants, skipped=skipped,
                        seconds=float(record.get("seconds", 0.0)) if not skipped else 0.0, record=record)


def refresh_model_card(student_dir: Path, record: dict[str, Any]) -> None:
    """Write (or rewrite) the export section of an m3distill student's model card; other folders' READMEs are
    their owners'."""
    from m3distill.layout import STUDENT_METADATA_FILE
    from m3distill.training.model_card import with_export_section

    card = student_dir / "README.md"
    if not (student_dir / STUDENT_METADATA_FILE).is_file() or not card.is_file():
        return
    text = card.read_text(encoding="utf-8")
    updated = with_export_section(text, record)
    if updated != text:
        write_text_atomic(card, updated)
