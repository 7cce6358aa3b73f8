"""Real questions: queries people wrote or typed, read from a file, to measure students on (never to train on).

The file (``evaluation.real_questions``) is a ``.jsonl``, ``.csv`` or ``.parquet`` table with a ``text`` column, the
question, and optionally a ``doc_id`` column: the id of the document that answers it, as ``m3distill synth``
names the corpus's documents (for a folder corpus, the file's path under the folder, e.g. ``en/faq-12.txt``).
Questions without an answer document (search-log queries, say) still measure top-k agreement with the teacher;
those with one also measure ground truth (Recall@k, MRR@10, nDCG@10), every context of the document relevant.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from m3distill.errors import M3DistillError

REAL_QUESTION_SUFFIXES = (".jsonl", ".csv", ".parquet")


@dataclass(frozen=True)
class RealQuestions:
    """The questions of a file, in its order; ``doc_ids[i]`` is None where the file names no answer."""

    source: Path
    texts: list[str]
    doc_ids: list[str | None]
    sha256: str


def load_real_questions(path: str | Path) -> RealQuestions:
    """Read a real-question file (see the module's docstring).

    Raises:
        M3DistillError: the file is missing, of another kind, unreadable, without a ``text`` column of strings, or
            without any question.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise M3DistillError(f"real-question file not found: {path} (evaluation.real_questions)")
    if path.suffix.lower() not in REAL_QUESTION_SUFFIXES:
        raise M3DistillError(f"real-question file {path} must be one of {', '.join(REAL_QUESTION_SUFFIXES)}")
    data = path.read_bytes()
    try:
        if path.suffix.lower() == ".jsonl":
            frame = pd.read_json(path, lines=True, dtype=False)
        elif path.suffix.lower() == ".csv":
            frame = pd.read_csv(path, dtype=str, keep_default_na=False)
        else:
            frame = pd.read_parquet(path)
    except (ValueError, OSError, UnicodeDecodeError) as error:
        raise M3DistillError(f"cannot read the real-question file {path}: {str(error).splitlines()[0]}") from None
    if "text" not in frame.columns:
        raise M3DistillError(f"real-question file {path} has no 'text' column (columns: {', '.join(map(str, frame.columns))})")
    texts = frame["text"].tolist()
    if not all(isinstance(text, str) for text in texts):
        raise M3DistillError(f"the 'text' column of {path} must hold strings (questions), not numbers or nulls")
    keep = [row for row, text in enumerate(texts) if text.strip()]
    if not keep:
        raise M3DistillError(f"real-question file {path} holds no question")
    doc_ids = frame["doc_id"].tolist() if "doc_id" in frame.columns else [None] * len(texts)
    return RealQuestions(
        source=path,
        texts=[" ".join(texts[row].split()) for row in keep],
        doc_ids=[str(doc_ids[row]) if isinstance(doc_ids[row], str) and doc_ids[row] else None for row in keep],
        sha256=hashlib.sha256(data).hexdigest(),
    )


def real_questions_digest(path: str | Path | None) -> str | None:
    """The sha256 of a real-question file's bytes (what the evaluate stage's fingerprint records), None without
    one; a missing file reads as "missing" so that the stage says what changed instead of failing."""
    if path is None:
        return None
    try:
        return hashlib.sha256(Path(path).expanduser().read_bytes()).hexdigest()
    except OSError:
        return "missing"
