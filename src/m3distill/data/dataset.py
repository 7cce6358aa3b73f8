"""The dataset directory that ``m3distill synth`` writes and every later stage reads.

    DATASET_DIR/
      contexts.parquet    context_id, doc_id, chunk_index, char_start, char_end, n_tokens, language, split, text
      questions.parquet   question_id, context_id, split, generator, text
      general.parquet     general_id, split ("train"), text
      crops.parquet       crop_id, context_id, split ("train"), kind ("sentence" | "span"), text
      manifest.json       written last: its presence marks the dataset complete

Every question belongs to exactly one context and shares its split. General texts and crops (sentences and random
spans of training contexts, see :mod:`m3distill.data.crops`) are training-only; a dataset written before crops
existed loads with an empty crops table. Each
Parquet file loads with ``datasets.load_dataset("parquet", data_files=...)`` as well as with pandas.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from m3distill.atomic import atomic_path
from m3distill.errors import M3DistillError
from m3distill.fingerprint import read_json
from m3distill.layout import CONTEXTS_FILE, CROPS_FILE, DATASET_MANIFEST_FILE, GENERAL_FILE, QUESTIONS_FILE, SPLITS

CONTEXT_SCHEMA = pa.schema(
    [
        ("context_id", pa.string()),
        ("doc_id", pa.string()),
        ("chunk_index", pa.int32()),
        ("char_start", pa.int64()),
        ("char_end", pa.int64()),
        ("n_tokens", pa.int32()),
        ("language", pa.string()),
        ("split", pa.string()),
        ("text", pa.string()),
    ]
)
QUESTION_SCHEMA = pa.schema(
    [
        ("question_id", pa.string()),
        ("context_id", pa.string()),
        ("split", pa.string()),
        ("generator", pa.string()),
        ("text", pa.string()),
    ]
)
GENERAL_SCHEMA = pa.schema([("general_id", pa.string()), ("split", pa.string()), ("text", pa.string())])
CROP_SCHEMA = pa.schema(
    [("crop_id", pa.string()), ("context_id", pa.string()), ("split", pa.string()), ("kind", pa.string()),
     ("text", pa.string())]
)

TABLES: dict[str, tuple[str, pa.Schema]] = {
    "contexts": (CONTEXTS_FILE, CONTEXT_SCHEMA),
    "questions": (QUESTIONS_FILE, QUESTION_SCHEMA),
    "general": (GENERAL_FILE, GENERAL_SCHEMA),
    "crops": (CROPS_FILE, CROP_SCHEMA),
}
# Tables a dataset of an earlier m3distill may lack: they load empty.
OPTIONAL_TABLES = frozenset({"crops"})
TEXT_KINDS = ("contexts", "questions", "crops", "general")


def write_table(path: str | Path, rows: pd.DataFrame | Sequence[dict[str, Any]], schema: pa.Schema) -> None:
    """Write ``rows`` as Parquet with ``schema``, atomically and byte-for-byte deterministically."""
    frame = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows), columns=schema.names)
    table = pa.Table.from_pandas(frame[schema.names], schema=schema, preserve_index=False).replace_schema_metadata(None)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")


@dataclass
class SynthDataset:
    """A loaded dataset directory: three tables and the manifest."""

    root: Path
    contexts: pd.DataFrame
    questions: pd.DataFrame
    general: pd.DataFrame
    manifest: dict[str, Any]
    crops: pd.DataFrame = None  # type: ignore[assignment]  # set in __post_init__ when not given

    def __post_init__(self) -> None:
        if self.crops is None:
            self.crops = pd.DataFrame({name: pd.Series(dtype=object) for name in CROP_SCHEMA.names})

    def split_contexts(self, split: str) -> pd.DataFrame:
        """Contexts of one split (``train``, ``dev`` or ``test``)."""
        _check_split(split)
        return self.contexts[self.contexts["split"] == split].reset_index(drop=True)

    def split_questions(self, split: str) -> pd.DataFrame:
        """Questions of one split."""
        _check_split(split)
        return self.questions[self.questions["split"] == split].reset_index(drop=True)

    def texts(self, splits: Iterable[str] = SPLITS, kinds: Iterable[str] = TEXT_KINDS) -> list[str]:
        """Unique texts of the given splits and kinds, in first-seen order (contexts, questions, crops, general)."""
        splits = set(splits)
        for split in splits:
            _check_split(split)
        seen: dict[str, None] = {}
        for kind in kinds:
            frame = getattr(self, kind)
            for text in frame.loc[frame["split"].isin(splits), "text"]:
                seen.setdefault(text, None)
        return list(seen)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")


def is_complete_dataset(path: str | Path) -> bool:
    """True when ``path`` holds a finished dataset (all tables and the manifest)."""
    path = Path(path)
    return all((path / name).is_file() for kind, (name, _) in TABLES.items() if kind not in OPTIONAL_TABLES) and (
        path / DATASET_MANIFEST_FILE
    ).is_file()


def require_complete_dataset(path: str | Path) -> None:
    """Raise :class:`M3DistillError`, saying what is missing, unless ``path`` holds a finished dataset."""
    path = Path(path)
    if not path.is_dir():
        raise M3DistillError(f"dataset directory not found: {path} (create one with `m3distill synth`)")
    missing = [name for kind, (name, _) in TABLES.items() if kind not in OPTIONAL_TABLES and not (path / name).is_file()]
    if not (path / DATASET_MANIFEST_FILE).is_file():
        missing.append(DATASET_MANIFEST_FILE)
    if missing:
        raise M3DistillError(
            f"{path} is not a complete m3distill dataset: {', '.join(missing)} missing "
            "(an interrupted `m3distill synth`? rerun it)"
        )


def load_synth_dataset(path: str | Path) -> SynthDataset:
    """Load a dataset directory written by ``m3distill synth``.

    Raises :class:`M3DistillError` when the directory is missing, incomplete or has the wrong columns.
    """
    path = Path(path)
    require_complete_dataset(path)
    frames: dict[str, pd.DataFrame] = {}
    for kind, (name, schema) in TABLES.items():
        file = path / name
        if not file.is_file() and kind in OPTIONAL_TABLES:
            continue
        if not file.is_file():
            raise M3DistillError(f"{path} is not a complete m3distill dataset: {name} is missing (rerun `m3distill synth`)")
        frame = pq.read_table(file).to_pandas()
        missing = [column for column in schema.names if column not in frame.columns]
        if missing:
            raise M3DistillError(f"{file} lacks column(s) {', '.join(missing)}: not written by this m3distill version")
        frames[kind] = frame
    try:
        manifest = json.loads((path / DATASET_MANIFEST_FILE).read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise M3DistillError(f"{path / DATASET_MANIFEST_FILE} is not valid JSON: {error}") from error
    return SynthDataset(root=path, manifest=manifest, **frames)


def dataset_fingerprint(dataset_dir: str | Path) -> str | None:
    """What identifies a finished dataset's contents: its manifest's ``input_hash`` (the inputs it was made from),
    or for a dataset written by other means the sha256 of its files. None when there is no finished dataset."""
    root = Path(dataset_dir)
    if not is_complete_dataset(root):
        return None
    manifest = read_json(root / DATASET_MANIFEST_FILE) or {}
    if isinstance(manifest.get("input_hash"), str):
        return manifest["input_hash"]
    digest = hashlib.sha256()
    for name in sorted([DATASET_MANIFEST_FILE, *(file for file, _ in TABLES.values())]):
        if (root / name).is_file():
            digest.update(name.encode() + b"\0" + hashlib.sha256((root / name).read_bytes()).digest())
    return digest.hexdigest()
