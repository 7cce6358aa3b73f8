"""The teacher's fingerprint: what must match for cached embeddings to be reused.

A fingerprint names the model and pins its content (the hub revision, or for a folder the SHA-256 of its config,
tokenizer, module and weight files) together with every setting that changes the embeddings: maximum sequence
length, pooling mode, normalisation, embedding dimension and the dtype of the model's weights. The cache records it;
the teacher and train stages compare it with the configured teacher, so a cache of another teacher is never silently
reused.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from sentence_transformers import SentenceTransformer

from m3distill.errors import M3DistillError
from m3distill.fingerprint import hash_model_files
from m3distill.models import local_model_folder, resolve_model_name

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TeacherFingerprint:
    """Everything about a teacher that determines its embeddings.

    Attributes:
        name: the model as given (hub id) or the resolved folder path.
        revision: the hub commit the files came from, when known.
        files_sha256: SHA-256 over the model folder's relative file names and contents, when the files are local.
        max_seq_length: tokens per text after truncation.
        pooling_mode: the Pooling module's mode (``cls``, ``mean``, ...), or ``none``.
        normalize: whether the model ends in a Normalize module (unit-length embeddings).
        dim: embedding dimension.
        model_dtype: dtype of the model's weights (``torch.float32``...).
    """

    name: str
    revision: str | None
    files_sha256: str | None
    max_seq_length: int
    pooling_mode: str
    normalize: bool
    dim: int
    model_dtype: str

    def to_dict(self) -> dict[str, Any]:
        """The fingerprint as a JSON-ready dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TeacherFingerprint:
        """Read a fingerprint written by :meth:`to_dict`."""
        known = {field.name for field in fields(cls)}
        missing = known - data.keys()
        if missing:
            raise M3DistillError(
                f"teacher fingerprint lacks field(s) {', '.join(sorted(missing))}: written by another m3distill version"
            )
        return cls(**{key: data[key] for key in known})


def teacher_fingerprint(
    model: SentenceTransformer, name_or_path: str | Path, *, revision: str | None = None
) -> TeacherFingerprint:
    """Fingerprint a loaded teacher.

    Args:
        model: the loaded sentence-transformers model (after any max_seq_length override).
        name_or_path: what the model was loaded from: a folder or a hub id.
        revision: the hub revision asked for; the snapshot's commit is used when the files are in the local cache.
    """
    folder, resolved_revision = _model_files(name_or_path, revision)
    name = str(folder) if folder is not None and Path(str(name_or_path)).expanduser().exists() else str(name_or_path)
    pooling_mode, normalize = _pooling_and_normalize(model)
    return TeacherFingerprint(
        name=name,
        revision=resolved_revision,
        files_sha256=hash_model_files(folder) if folder is not None else None,
        max_seq_length=int(model.max_seq_length),
        pooling_mode=pooling_mode,
        normalize=normalize,
        dim=int(model.get_embedding_dimension()),
        model_dtype=str(next(model.parameters()).dtype),
    )


def _model_files(name_or_path: str | Path, revision: str | None) -> tuple[Path | None, str | None]:
    """The local folder holding the model's files and the revision they came from."""
    folder = local_model_folder(name_or_path, revision)
    if folder is None or Path(resolve_model_name(name_or_path)).expanduser().is_dir():
        return folder, revision
    # Hub snapshots live in folders named by their commit hash.
    return folder, folder.name


def _pooling_and_normalize(model: SentenceTransformer) -> tuple[str, bool]:
    pooling_mode, normalize = "none", False
    for module in model:
        kind = type(module).__name__
        if kind == "Pooling":
            pooling_mode = str(module.get_config_dict().get("pooling_mode", "unknown"))
        elif kind == "Normalize":
            normalize = True
    return pooling_mode, normalize
