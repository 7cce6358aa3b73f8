"""Corpus ingestion: any supported input -> normalised, de-duplicated documents plus a report of what was dropped.

Supported inputs:

- a ``.txt`` / ``.md`` file (one document; its id is the file name);
- a ``.jsonl`` / ``.csv`` / ``.parquet`` file (one document per row; text and optional id column);
- a folder, searched recursively for the files above (hidden files and folders are skipped); a text file's
  document id is its path relative to the folder, a row's id is ``<relative path>#<id or row number>``;
- a Hugging Face dataset saved with ``save_to_disk`` (a ``Dataset`` or a ``DatasetDict``);
- a Hugging Face hub dataset id such as ``wikimedia/wikipedia`` (needs a network or a local ``datasets`` cache).

Every text is NFC-normalised, paragraph breaks become exactly ``\\n\\n`` and all other whitespace runs become
one space (see :func:`normalize_text`). Empty and exact-duplicate documents (after normalisation) are dropped and
counted in the :class:`IngestionReport`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import unicodedata
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from m3distill.errors import M3DistillError

logger = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".md")
TABLE_SUFFIXES = (".jsonl", ".csv", ".parquet")
SUPPORTED_SUFFIXES = TEXT_SUFFIXES + TABLE_SUFFIXES

# A blank line (possibly holding spaces or tabs) separates paragraphs; every other whitespace run is one space.
_PARAGRAPH_BREAK = re.compile(r"\n[^\S\n]*\n\s*")
_WHITESPACE_RUN = re.compile(r"\s+")
# C0 controls other than tab/newline/CR, and DEL: left-overs of formatting that tokenizers treat inconsistently.
_CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b\x0e-\x1f\x7f]")
# What a hub dataset id looks like: "name" or "owner/name".
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass(frozen=True)
class Document:
    """One normalised document: ``doc_id`` is unique within its corpus."""

    doc_id: str
    text: str


@dataclass
class IngestionReport:
    """What ingestion read and dropped.

    ``read`` counts every document found; ``kept = read - empty - duplicates - over_limit``. ``bad_files`` lists
    ``"<file>: <reason>"`` for files skipped with ``skip_bad_files``; ``ignored_files`` counts files in a folder
    whose suffix is not supported.
    """

    source: str
    files: int = 0
    read: int = 0
    empty: int = 0
    duplicates: int = 0
    over_limit: int = 0
    ignored_files: int = 0
    bad_files: list[str] = field(default_factory=list)

    @property
    def kept(self) -> int:
        return self.read - self.empty - self.duplicates - self.over_limit

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able form for the manifest (``kept`` included)."""
        return {**asdict(self), "kept": self.kept}


@dataclass
class Corpus:
    """Documents in input order, the ingestion report, and a sha256 fingerprint of the raw inputs."""

    documents: list[Document]
    report: IngestionReport
    fingerprint: str


class _BadFile(Exception):
    """A file that cannot be read as asked; becomes an M3DistillError or, with skip_bad_files, a counted warning."""


def normalize_text(text: str) -> str:
    """NFC-normalise ``text``, keep paragraph breaks as ``\\n\\n`` and collapse every other whitespace run to a space.

    Leading and trailing whitespace is removed; a text of only whitespace becomes ``""``.
    """
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL_CHARS.sub("", text)
    paragraphs = (_WHITESPACE_RUN.sub(" ", paragraph).strip() for paragraph in _PARAGRAPH_BREAK.split(text))
    return "\n\n".join(paragraph for paragraph in paragraphs if paragraph)


def load_corpus(
    source: str | Path,
    *,
    text_column: str = "text",
    id_column: str | None = None,
    hf_split: str = "train",
    skip_bad_files: bool = False,
    max_documents: int | None = None,
    kind: str = "corpus",
) -> Corpus:
    """Read every document of ``source``, normalise it and drop empty and duplicate documents.

    Args:
        source: a file, a folder (searched recursively), a ``save_to_disk`` dataset folder or a hub dataset id.
        text_column: column holding the text in .jsonl/.csv/.parquet files and Hugging Face datasets.
        id_column: column holding a document id; the row number is used when ``None``.
        hf_split: split to read from a ``DatasetDict`` or a hub dataset.
        skip_bad_files: log and count undecodable files and files lacking a column instead of failing.
        max_documents: keep only the first this many documents (after dropping empty and duplicate ones).
        kind: what ``source`` is to the user, named in errors: ``corpus``, or ``general corpus`` for --general.

    Raises:
        M3DistillError: the source does not exist or cannot be loaded, a file is undecodable or lacks a column
            (without ``skip_bad_files``), a document id repeats, or no document is left.
    """
    source_text = str(source)
    report = IngestionReport(source=source_text)
    fingerprint = hashlib.sha256()
    raw = _read_source(source_text, text_column, id_column, hf_split, skip_bad_files, report, fingerprint, kind)
    documents = _clean(raw, report, source_text)
    if max_documents is not None and len(documents) > max_documents:
        report.over_limit = len(documents) - max_documents
        documents = documents[:max_documents]
    if not documents:
        raise M3DistillError(
            f"no documents left in the {kind} {source_text} ({report.read} read, {report.empty} empty, "
            f"{report.duplicates} duplicate, {len(report.bad_files)} bad files): give a corpus with text in it"
        )
    logger.info(
        "corpus %s: %d documents kept of %d read (%d empty, %d duplicate, %d bad files)",
        source_text, report.kept, report.read, report.empty, report.duplicates, len(report.bad_files),
    )
    return Corpus(documents=documents, report=report, fingerprint=fingerprint.hexdigest())


def _clean(raw: Iterator[tuple[str, Any]], report: IngestionReport, source: str) -> list[Document]:
    documents: list[Document] = []
    seen_texts: set[str] = set()
    seen_ids: set[str] = set()
    for doc_id, value in raw:
        report.read += 1
        text = normalize_text(_as_text(value))
        if not text:
            report.empty += 1
            continue
        if text in seen_texts:
            report.duplicates += 1
            continue
        if doc_id in seen_ids:
            raise M3DistillError(f"document id {doc_id!r} appears twice in {source}: ids must be unique")
        seen_texts.add(text)
        seen_ids.add(doc_id)
        documents.append(Document(doc_id=doc_id, text=text))
    return documents


def _as_text(value: Any) -> str:
    # Missing cells come back as None or NaN depending on the reader; both are empty documents.
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return value if isinstance(value, str) else str(value)


def _read_source(
    source: str,
    text_column: str,
    id_column: str | None,
    hf_split: str,
    skip_bad_files: bool,
    report: IngestionReport,
    fingerprint: Any,
    kind: str = "corpus",
) -> Iterator[tuple[str, Any]]:
    path = Path(source).expanduser()
    if path.is_dir():
        if _is_saved_hf_dataset(path):
            _fingerprint_folder(path, fingerprint)
            yield from _read_hf(_load_saved_hf(path, hf_split), text_column, id_column, str(path))
            return
        yield from _read_folder(path, text_column, id_column, skip_bad_files, report, fingerprint)
        return
    if path.is_file():
        if path.suffix.lower() not in SUPPORTED_SUFFIXES:
            raise M3DistillError(
                f"unsupported corpus file {path}: expected one of {', '.join(SUPPORTED_SUFFIXES)}, or a folder"
            )
        yield from _read_files([(path, path.name)], text_column, id_column, skip_bad_files, report, fingerprint,
                               prefix_rows=False)
        return
    if path.suffix.lower() in SUPPORTED_SUFFIXES or source.startswith((".", "/", "~")) or not _HUB_ID.match(source):
        raise M3DistillError(f"{kind} not found: {source} (expected a file, a folder or a Hugging Face dataset id)")
    fingerprint.update(f"hub:{source}:{hf_split}".encode())
    dataset = _load_hub(source, hf_split)
    fingerprint.update(str(getattr(dataset, "_fingerprint", "")).encode())
    yield from _read_hf(dataset, text_column, id_column, source)


def _read_folder(
    root: Path,
    text_column: str,
    id_column: str | None,
    skip_bad_files: bool,
    report: IngestionReport,
    fingerprint: Any,
) -> Iterator[tuple[str, Any]]:
    files: list[tuple[Path, str]] = []
    for file in sorted(root.rglob("*")):
        relative = file.relative_to(root)
        if any(part.startswith(".") for part in relative.parts) or not file.is_file():
            continue
        if file.suffix.lower() not in SUPPORTED_SUFFIXES:
            report.ignored_files += 1
            logger.debug("ignoring %s: unsupported suffix", file)
            continue
        files.append((file, relative.as_posix()))
    if not files:
        raise M3DistillError(f"no {', '.join(SUPPORTED_SUFFIXES)} files found under {root}")
    yield from _read_files(files, text_column, id_column, skip_bad_files, report, fingerprint, prefix_rows=True)


def _read_files(
    files: list[tuple[Path, str]],
    text_column: str,
    id_column: str | None,
    skip_bad_files: bool,
    report: IngestionReport,
    fingerprint: Any,
    *,
    prefix_rows: bool,
) -> Iterator[tuple[str, Any]]:
    for file, name in files:
        data = file.read_bytes()
        fingerprint.update(f"{name}\0{len(data)}\0".encode())
        fingerprint.update(data)
        try:
            rows = _parse_file(file, data, text_column, id_column)
        except _BadFile as bad:
            if not skip_bad_files:
                raise M3DistillError(f"cannot read {file}: {bad}; fix or remove it, or pass --skip-bad-files") from None
            logger.warning("skipping %s: %s", file, bad)
            report.bad_files.append(f"{name}: {bad}")
            continue
        report.files += 1
        if rows is None:
            yield name, _decode(data)
            continue
        for row_id, text in rows:
            yield (f"{name}#{row_id}" if prefix_rows else row_id), text


def _parse_file(file: Path, data: bytes, text_column: str, id_column: str | None) -> list[tuple[str, Any]] | None:
    """Rows ``(id, text)`` of a table file; ``None`` for a text file (after checking it decodes)."""
    suffix = file.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        _decode(data)
        return None
    if suffix == ".jsonl":
        return _jsonl_rows(_decode(data), text_column, id_column)
    if suffix == ".csv":
        return _csv_rows(_decode(data), text_column, id_column)
    return _parquet_rows(data, text_column, id_column)


def _decode(data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise _BadFile(f"not valid UTF-8 (undecodable byte at offset {error.start})") from None


def _columns_or_fail(columns: list[str], text_column: str, id_column: str | None) -> None:
    for column, flag in ((text_column, "--text-column"), (id_column, "--id-column")):
        if column is not None and column not in columns:
            raise _BadFile(f"no column {column!r} (columns: {', '.join(map(str, columns)) or 'none'}); choose one with {flag}")


def _row_id(row: dict[str, Any] | Any, id_column: str | None, number: int) -> str:
    return str(number) if id_column is None else str(row[id_column])


def _not_text(values: Any, text_column: str) -> _BadFile:
    """The refusal of a text column that holds something else (numbers read as the documents "1", "2", "3")."""
    return _BadFile(f"column {text_column!r} holds {values}, not text; choose the text column with --text-column")


def _jsonl_rows(text: str, text_column: str, id_column: str | None) -> list[tuple[str, Any]]:
    rows = []
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise _BadFile(f"line {line_number} is not valid JSON ({error.msg})") from None
        if not isinstance(record, dict):
            raise _BadFile(f"line {line_number} is not a JSON object")
        try:
            _columns_or_fail(list(record), text_column, id_column)
            if not isinstance(record[text_column], str | None):
                raise _not_text(f"a {type(record[text_column]).__name__}", text_column)
        except _BadFile as bad:
            raise _BadFile(f"line {line_number}: {bad}") from None
        rows.append((_row_id(record, id_column, len(rows)), record[text_column]))
    return rows


def _csv_rows(text: str, text_column: str, id_column: str | None) -> list[tuple[str, Any]]:
    import csv
    import io

    try:
        reader = csv.DictReader(io.StringIO(text, newline=""))
        _columns_or_fail(list(reader.fieldnames or []), text_column, id_column)
        rows = [(_row_id(row, id_column, number), row[text_column]) for number, row in enumerate(reader)]
    except csv.Error as error:
        raise _BadFile(f"not a valid CSV file ({error})") from None
    _warn_if_rows_merged(text, rows)
    return rows


def _warn_if_rows_merged(text: str, rows: list[tuple[str, Any]]) -> None:
    """Warn when one CSV row swallowed most of the file's lines: an unterminated quote makes every row after it part
    of one field, so the file reads as a single document (and a split of 1/0/0) without any error."""
    lines = sum(1 for line in text.splitlines()[1:] if line.strip())
    spans = [len((value or "").splitlines()) for _, value in rows]
    longest = max(spans, default=0)
    if lines >= 4 and longest > lines / 2 and len(rows) < lines / 2:
        logger.warning(
            "CSV parsing gave %d rows from %d lines: row %d alone spans %d lines. An unterminated quote (\") merges "
            "the rows after it into one document; check the file's quoting", len(rows), lines,
            spans.index(longest) + 1, longest,
        )


def _parquet_rows(data: bytes, text_column: str, id_column: str | None) -> list[tuple[str, Any]]:
    try:
        table = pq.read_table(pa.BufferReader(data))
    except (pa.ArrowException, OSError) as error:
        raise _BadFile(f"not a valid Parquet file ({str(error).splitlines()[0]})") from None
    _columns_or_fail(table.column_names, text_column, id_column)
    kind = table.schema.field(text_column).type
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)
            or pa.types.is_null(kind)):
        raise _not_text(f"{kind} values", text_column)
    texts = table.column(text_column).to_pylist()
    ids = table.column(id_column).to_pylist() if id_column else range(len(texts))
    return [(str(row_id), text) for row_id, text in zip(ids, texts)]


def _is_saved_hf_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (
        (path / "state.json").is_file() and (path / "dataset_info.json").is_file()
    )


def _fingerprint_folder(path: Path, fingerprint: Any) -> None:
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        fingerprint.update(f"{file.relative_to(path).as_posix()}\0".encode())
        fingerprint.update(file.read_bytes())


def _load_saved_hf(path: Path, split: str) -> Any:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as error:  # datasets raises many types for a damaged folder
        raise M3DistillError(f"cannot load the saved dataset in {path}: {str(error).splitlines()[0]}") from error
    return _pick_split(loaded, split, str(path))


def _load_hub(name: str, split: str) -> Any:
    import datasets

    try:
        loaded = datasets.load_dataset(name, split=split)
    except Exception as error:  # offline, unknown id, gated, unknown split: all end the same way for the user
        first_line = (str(error).splitlines() or [type(error).__name__])[0]
        raise M3DistillError(
            f"could not load Hugging Face dataset {name!r} (split {split!r}): it is not a local path, and fetching "
            f"it failed (no network, unknown id or split?). Save it with `save_to_disk` on a machine with network "
            f"access and pass that folder. Cause: {first_line}"
        ) from error
    return _pick_split(loaded, split, name)


def _pick_split(loaded: Any, split: str, name: str) -> Any:
    import datasets

    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise M3DistillError(f"dataset {name} has no split {split!r} (splits: {', '.join(loaded)}); set --hf-split")
        return loaded[split]
    return loaded


def _read_hf(dataset: Any, text_column: str, id_column: str | None, name: str) -> Iterator[tuple[str, Any]]:
    try:
        _columns_or_fail(list(dataset.column_names), text_column, id_column)
        kind = getattr((getattr(dataset, "features", None) or {}).get(text_column), "dtype", "string")
        if kind not in ("string", "large_string", "null"):
            raise _not_text(f"{kind} values", text_column)
    except _BadFile as bad:
        raise M3DistillError(f"dataset {name}: {bad}") from None
    texts = dataset[text_column]
    ids = dataset[id_column] if id_column else range(len(texts))
    for row_id, text in zip(ids, texts):
        yield str(row_id), text
