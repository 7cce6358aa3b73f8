"""The teacher's fingerprint: what must match for cached embeddings to be reused.

A fingerprint names the model and pins its content (the hub revision, or for a folder the SHA-256 of its config,
tokenizer, module and weight files) together with every setting that changes the embeddings: maximum sequence
length, pooling mode, normalisation, embedding dimension and the dtype of the model's weights. A cache written by a
teacher with a different fingerprint is refused, never silently reused.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from sentence_transformers import SentenceTransformer

from m3distill.errors import M3DistillError
from m3distill.models import local_model_folder, resolve_model_name

logger = logging.getLogger(__name__)

# Files that define a sentence-transformers model: configs, tokenizers, module code and weights. READMEs, ONNX or
# OpenVINO exports and training leftovers do not change the embeddings and are not hashed.
_HASHED_SUFFIXES = (".json", ".txt", ".model", ".safetensors", ".bin", ".py", ".tiktoken")
_UNHASHED_NAMES = ("README.md", "trainer_state.json", "training_args.bin", "optimizer.pt", "scheduler.pt")
_HASH_CHUNK_BYTES = 1 << 20


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


def check_fingerprint(expected: TeacherFingerprint, found: TeacherFingerprint, *, where: str) -> None:
    """Raise :class:`M3DistillError` naming the first field where ``found`` (stored in ``where``) differs.

    The model's identity is its file hash when both sides have one (so a moved folder still matches), else its
    name and revision.
    """
    compared = ["max_seq_length", "pooling_mode", "normalize", "dim", "model_dtype"]
    if expected.files_sha256 and found.files_sha256:
        compared.insert(0, "files_sha256")
    else:
        compared[:0] = ["name", "revision"]
    for field_name in compared:
        want, have = getattr(expected, field_name), getattr(found, field_name)
        if want != have:
            raise M3DistillError(
                f"{where} was made by another teacher: {field_name} is {_short(have)} there but {_short(want)} for "
                f"{expected.name}; use another output folder or delete it to recompute"
            )


def _short(value: Any) -> str:
    # Hashes are recognisable by their first 12 digits; the full 64 make the one-line error unreadable.
    return repr(value[:12] + "...") if isinstance(value, str) and len(value) == 64 else repr(value)


def hash_model_files(folder: str | Path) -> str:
    """SHA-256 over the relative names and full contents of the files that define the model in ``folder``.

    Top-level files and those inside the module folders listed in modules.json are hashed; see
    ``_HASHED_SUFFIXES``. Contents are read in 1 MiB chunks, so memory stays flat for multi-GB weights.
    """
    return combine_file_digests(model_file_digests(folder))


def model_file_digests(folder: str | Path, *, leave_out: tuple[str, ...] = (),
                       also: tuple[str, ...] = ()) -> dict[str, str]:
    """The SHA-256 of each file :func:`hash_model_files` hashes, by relative name, in the order it hashes them.

    Args:
        folder: a sentence-transformers model folder.
        leave_out: top-level files not to hash (a record m3distill keeps beside the model, for one).
        also: further top-level files to hash when present (an M3 model's head files).
    """
    folder = Path(folder)
    names = [name for name in _model_file_list(folder) if name not in leave_out]
    names += [name for name in also if (folder / name).is_file() and name not in names]
    digests = {}
    for relative in names:
        with open(folder / relative, "rb") as handle:
            file_digest = hashlib.file_digest(handle, "sha256") if hasattr(hashlib, "file_digest") else _chunked(handle)
        digests[relative] = file_digest.hexdigest()
    return digests


def combine_file_digests(digests: dict[str, str]) -> str:
    """One SHA-256 of :func:`model_file_digests`: their names and digests, in their order."""
    digest = hashlib.sha256()
    for relative, file_digest in digests.items():
        digest.update(relative.encode("utf-8") + b"\0" + bytes.fromhex(file_digest))
    return digest.hexdigest()


def _chunked(handle) -> Any:
    digest = hashlib.sha256()
    while chunk := handle.read(_HASH_CHUNK_BYTES):
        digest.update(chunk)
    return digest


def _model_file_list(folder: Path) -> list[str]:
    subfolders = {""}
    modules_file = folder / "modules.json"
    if modules_file.is_file():
        try:
            subfolders |= {entry.get("path", "") for entry in json.loads(modules_file.read_text(encoding="utf-8"))}
        except (json.JSONDecodeError, AttributeError) as error:
            raise M3DistillError(f"{modules_file} is not a valid modules.json: {error}") from error
    found = []
    for subfolder in sorted(subfolders):
        directory = folder / subfolder
        if not directory.is_dir():
            continue
        for file in sorted(directory.iterdir()):
            if file.is_file() and file.suffix in _HASHED_SUFFIXES and file.name not in _UNHASHED_NAMES:
                found.append(file.relative_to(folder).as_posix())
    return found


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
