"""The evaluation's embeddings cache: each model's embeddings of the texts it encoded, kept in
``REPORT_DIR/.embeddings-cache`` while the evaluation runs, so that an interrupted evaluation resumes without
encoding again. The cache leaves with the old report folder when the new report is swapped in.

A file is named by the model's label and a digest of the model and the texts: dense alone as ``.npy``, every
output of an M3 model as ``.m3.npz`` (arrays only, no pickle), an ONNX variant's (dense) as ``.npy``.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import numpy as np
from sentence_transformers import SentenceTransformer

from m3distill.atomic import atomic_path
from m3distill.evaluation.onnx_variants import Variant
from m3distill.m3 import M3Embeddings, M3Heads, encode_m3

logger = logging.getLogger(__name__)


class EmbeddingsCache:
    """The embeddings cache in ``folder``, encoding what it does not hold in batches of ``batch_size``."""

    def __init__(self, folder: Path, *, batch_size: int, show_progress: bool) -> None:
        self.folder = Path(folder)
        self.batch_size = batch_size
        self.show_progress = show_progress

    def model(self, label: str, model: SentenceTransformer, heads: M3Heads | None, texts: list[str]) -> M3Embeddings:
        """All outputs of ``model`` (with ``heads``) for ``texts``, from the cache when it already encoded exactly
        these."""
        digest = _model_digest(model, texts, heads)
        file = self.folder / f"{_file_label(label)}-{digest}{'.npy' if heads is None else '.m3.npz'}"

        def encode() -> M3Embeddings:
            logger.info("%s: encoding %d texts%s", label, len(texts),
                        "" if heads is None else " (dense, sparse, ColBERT)")
            embeddings = encode_m3(model, heads, texts, batch_size=self.batch_size, show_progress=self.show_progress,
                                   desc=f"encode {label}")
            embeddings.dense = np.asarray(embeddings.dense, dtype=np.float32)
            return embeddings

        return self._cached(label, file, encode)

    def variant(self, label: str, variant: Variant, texts: list[str], *, m3: bool = True) -> M3Embeddings:
        """A variant's embeddings of ``texts`` (all three outputs of an M3 student's export, unless ``m3`` is off),
        from the cache when this export already encoded exactly these."""
        m3 = m3 and variant.has_m3_outputs
        digest = hashlib.sha256()
        stat = Path(variant.encoder.file).stat()
        # The export record pins the files' contents; size and time also catch a file replaced behind its back.
        digest.update(f"{variant.variant}|{variant.export}|{stat.st_size}|{stat.st_mtime_ns}|"
                      f"{variant.encoder.max_seq_length}|{variant.encoder.dim}".encode())
        _digest_texts(digest, texts)
        file = self.folder / f"{_file_label(label)}-{digest.hexdigest()[:16]}{'.m3.npz' if m3 else '.npy'}"

        def encode() -> M3Embeddings:
            logger.info("%s: encoding %d texts with onnxruntime", label, len(texts))
            if m3:
                return variant.encode_m3(texts, batch_size=self.batch_size, label=label,
                                         show_progress=self.show_progress)
            return M3Embeddings(dense=variant.encode(texts, batch_size=self.batch_size, label=label,
                                                     show_progress=self.show_progress))

        return self._cached(label, file, encode)

    @staticmethod
    def _cached(label: str, file: Path, encode: Callable[[], M3Embeddings]) -> M3Embeddings:
        m3 = file.name.endswith(".m3.npz")
        if file.is_file():
            logger.info("%s: reusing embeddings from %s", label, file)
            return read_m3_embeddings(file) if m3 else M3Embeddings(dense=np.load(file))
        embeddings = encode()
        with atomic_path(file) as tmp, open(tmp, "wb") as handle:
            if m3:
                write_m3_embeddings(handle, embeddings)
            else:
                np.save(handle, embeddings.dense)
        return embeddings


def write_m3_embeddings(handle: BinaryIO, embeddings: M3Embeddings) -> None:
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


def read_m3_embeddings(file: Path) -> M3Embeddings:
    """What :func:`write_m3_embeddings` wrote."""
    with np.load(file, allow_pickle=False) as stored:
        offsets, ids, weights = stored["sparse_offsets"], stored["sparse_ids"], stored["sparse_weights"]
        sparse = [dict(zip(ids[a:b].tolist(), weights[a:b].tolist())) for a, b in itertools.pairwise(offsets)]
        offsets, vectors = stored["colbert_offsets"], stored["colbert_vectors"]
        colbert = [np.ascontiguousarray(vectors[a:b]) for a, b in itertools.pairwise(offsets)]
        return M3Embeddings(dense=stored["dense"], sparse=sparse, colbert=colbert)


def _model_digest(model: SentenceTransformer, texts: list[str], heads: M3Heads | None = None) -> str:
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
