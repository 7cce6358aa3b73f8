"""A persistent cache of LLM answers, so a rerun after a crash or Ctrl-C repeats no finished request.

One SQLite file in WAL mode; each answer is committed as soon as it arrives. It lives outside the dataset
directory (which only appears, atomically, when a run finishes), by default beside it as
``<dataset dir>.llm-cache.sqlite``. It stores raw answers, so changing the filters needs no new requests.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
from pathlib import Path

from m3distill.errors import M3DistillError

logger = logging.getLogger(__name__)

CACHE_SUFFIX = ".llm-cache.sqlite"


def default_cache_path(out_dir: str | Path) -> Path:
    """Where the answer cache of the dataset directory ``out_dir`` lives unless configured: right beside it."""
    out_dir = Path(out_dir)
    return out_dir.with_name(out_dir.name + CACHE_SUFFIX)


def answer_key(model: str, prompt_template: str, context_text: str, n: int) -> str:
    """The cache key of one request: what determines the answer (model, prompt template, context, n)."""
    payload = json.dumps([model, prompt_template, context_text, n], ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


class AnswerCache:
    """Raw answers by :func:`answer_key`. Use from one thread; close it (or use ``with``) when done.

    Args:
        path: the SQLite file; created with its parent folders when missing.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._connection = sqlite3.connect(self.path)
            self._connection.execute("PRAGMA journal_mode=WAL")
            self._connection.execute("CREATE TABLE IF NOT EXISTS answers (key TEXT PRIMARY KEY, answer TEXT NOT NULL)")
            self._connection.commit()
        except sqlite3.DatabaseError as error:
            raise M3DistillError(
                f"the LLM answer cache {self.path} cannot be used ({error}); delete it to start afresh"
            ) from error

    def get(self, key: str) -> str | None:
        """The cached answer for ``key``, or ``None``."""
        row = self._connection.execute("SELECT answer FROM answers WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def put(self, key: str, answer: str) -> None:
        """Store ``answer`` under ``key`` and commit at once."""
        self._connection.execute("INSERT OR REPLACE INTO answers (key, answer) VALUES (?, ?)", (key, answer))
        self._connection.commit()

    def __len__(self) -> int:
        return self._connection.execute("SELECT COUNT(*) FROM answers").fetchone()[0]

    def close(self) -> None:
        self._connection.close()

    def __enter__(self) -> AnswerCache:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
