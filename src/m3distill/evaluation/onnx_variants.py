"""The students' ONNX exports as models of their own in the evaluation.

Every student folder with an ONNX export (``m3distill.exporting``; ``evaluation.onnx_variants``) adds a model per
exported variant, named by :func:`m3distill.report.variant_label` (``student-2L (onnx)``, ``student-2L (int8)``) and
run by onnxruntime's CPU provider (:mod:`m3distill.onnx_serving`) with as many threads as torch, whatever
``evaluation.device`` is. Without onnxruntime the exports are left out with a warning.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sentence_transformers import SentenceTransformer
from tqdm.auto import tqdm

from m3distill.errors import M3DistillError
from m3distill.m3_outputs import M3Embeddings
from m3distill.report import ModelReport, variant_label

logger = logging.getLogger(__name__)

# Where a student keeps its ONNX exports (m3distill.onnx_serving.ONNX_DIR), for the warning without onnxruntime.
_ONNX_FOLDER = "onnx"
# ONNX variants always run here: the evaluation uses onnxruntime's CPU provider alone.
ONNX_DEVICE = "cpu"
_ENCODE_CHUNK = 1024  # texts per progress step while an ONNX variant encodes


@dataclass(frozen=True)
class Variant:
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

    def encode(self, texts: list[str], *, batch_size: int, label: str, show_progress: bool) -> np.ndarray:
        """Float32 embeddings of ``texts`` (a progress step per chunk of texts)."""
        chunks = [np.asarray(self.encoder.encode(chunk, batch_size=batch_size), dtype=np.float32)
                  for chunk in _chunks(texts, label, show_progress)]
        return np.concatenate(chunks) if chunks else np.zeros((0, self.encoder.dim), np.float32)

    @property
    def has_m3_outputs(self) -> bool:
        """Whether the export returns bge-m3's sparse and ColBERT outputs too (an M3 student's, record format 2)."""
        return len(self.encoder.outputs) > 1

    def encode_m3(self, texts: list[str], *, batch_size: int, label: str, show_progress: bool) -> M3Embeddings:
        """All the export's outputs of ``texts`` (dense, sparse, ColBERT), a progress step per chunk of texts."""
        chunks = [self.encoder.encode_m3(chunk, batch_size=batch_size)
                  for chunk in _chunks(texts, label, show_progress)]
        if not chunks:
            return M3Embeddings(dense=np.zeros((0, self.encoder.dim), np.float32), sparse=[], colbert=[])
        return M3Embeddings(dense=np.concatenate([chunk.dense for chunk in chunks]),
                            sparse=[weights for chunk in chunks for weights in chunk.sparse],
                            colbert=[vectors for chunk in chunks for vectors in chunk.colbert])

    def describe(self, label: str, layers: int | None, metrics: dict[str, Any]) -> ModelReport:
        """The variant's entry in the report."""
        return ModelReport(
            name=label,
            role="student",
            source=str(Path(self.encoder.file).resolve()),
            layers=layers,
            embedding_dim=self.encoder.dim,
            max_seq_length=self.encoder.max_seq_length,
            metrics=metrics,
            variant=self.variant,
            variant_of=self.student,
            device=ONNX_DEVICE,
        )


def load_variants(students: dict[str, Path], models: dict[str, SentenceTransformer],
                  device: str) -> dict[str, Variant]:
    """Every exported ONNX variant of the student folders, by its label, loaded for onnxruntime's CPU provider.

    Each runs with as many threads as torch (a fair race on the CPU) and the torch student's sequence length.
    Without onnxruntime the exports are left out with a warning.
    """
    try:
        from m3distill.onnx_serving import exported_variants
    except ImportError as error:
        exported = [label for label, folder in students.items() if (folder / _ONNX_FOLDER).is_dir()]
        if exported:
            logger.warning("the ONNX exports of %s are left out: %s (pip install onnxruntime, or set "
                           "evaluation.onnx_variants: false)", ", ".join(exported), error)
        return {}
    variants: dict[str, Variant] = {}
    for label, folder in students.items():
        found = exported_variants(folder)
        export = export_record_digest(folder) if found else None
        for variant in found:
            encoder = _load_encoder(folder, variant, models[label].max_seq_length)
            variants[variant_label(label, variant)] = Variant(encoder=encoder, student=label, variant=variant,
                                                              export=export)
    if variants:
        logger.info("evaluating %d ONNX variant(s) on onnxruntime's CPU provider: %s", len(variants),
                    ", ".join(variants))
        if torch.device(device).type != ONNX_DEVICE:
            logger.info("the torch models run on %s and the ONNX variants on the CPU: the variants' texts/s are "
                        "CPU figures, reported without a speed-up over the teacher", device)
    return variants


def _load_encoder(folder: Path, variant: str, max_seq_length: int) -> Any:
    from m3distill.onnx_serving import OnnxEncoder

    try:
        return OnnxEncoder(folder, variant, threads=torch.get_num_threads(), max_seq_length=max_seq_length)
    except M3DistillError:
        raise
    except Exception as error:  # onnxruntime's own errors: a damaged or foreign file
        cause = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise M3DistillError(f"{folder}: its {variant} ONNX export does not load ({cause}); export the student "
                             "again, or set evaluation.onnx_variants: false") from error


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


def _chunks(texts: list[str], label: str, show_progress: bool) -> Iterator[list[str]]:
    """``texts`` in chunks of :data:`_ENCODE_CHUNK`, with a progress bar over them."""
    for start in tqdm(range(0, len(texts), _ENCODE_CHUNK), desc=f"encode {label}", unit="chunk",
                      disable=not show_progress):
        yield texts[start:start + _ENCODE_CHUNK]
